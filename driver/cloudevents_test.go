package driver

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// ceAgent is an agent with the cloudevents option (or without), logging
// at DEBUG into logs when given.
func ceAgent(on bool, logs *bytes.Buffer) *Agent {
	logger := logging.NoOp
	if logs != nil {
		logger, _ = logging.NewLogger("DEBUG", logs, "")
	}
	return mustNew(Options{Name: "ce", Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}},
		Workers: 1, Timeout: time.Second, Logger: logger, CloudEvents: on, IdempotencyHeader: "Idempotency-Key",
		Retry: config.Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}})
}

// binaryEvent is a valid event in binary mode, its attributes under
// prefix, with one header that is not an attribute.
func binaryEvent(prefix string) *amqp.Delivery {
	return &amqp.Delivery{
		Exchange: "orders", RoutingKey: "orders.created", ContentType: "application/json; charset=utf-8",
		Body: []byte(`{"order":1}`),
		Headers: amqp.Table{
			prefix + "specversion": "1.0",
			prefix + "id":          "A234-1234-1234",
			prefix + "source":      "https://example.com/orders",
			prefix + "type":        "com.example.order.created",
			prefix + "subject":     "order/1",
			prefix + "dataschema":  "https://example.com/schemas/order.json",
			prefix + "time":        time.Date(2018, 4, 5, 17, 31, 0, 0, time.UTC),
			prefix + "tenant":      "acme",
			prefix + "priority":    int32(5),
			prefix + "urgent":      true,
			"tenant_id":            "acme",
		},
	}
}

// ceRequest maps a delivery as an agent does and returns the request's
// headers.
func ceRequest(a *Agent, d *amqp.Delivery) map[string][]string {
	m := a.msg(d)
	req := newRequest(m, false)
	req.Headers[a.opts.IdempotencyHeader] = []string{idempotencyKey(m)}
	return req.Headers
}

func TestCloudEventsBinaryMode(t *testing.T) {
	want := map[string]string{
		"Ce-Specversion": "1.0",
		"Ce-Id":          "A234-1234-1234",
		"Ce-Source":      "https://example.com/orders",
		"Ce-Type":        "com.example.order.created",
		"Ce-Subject":     "order/1",
		"Ce-Dataschema":  "https://example.com/schemas/order.json",
		"Ce-Time":        "2018-04-05T17:31:00Z",
		"Ce-Tenant":      "acme",
		"Ce-Priority":    "5",
		"Ce-Urgent":      "true",
		"Content-Type":   "application/json; charset=utf-8",
		// Not an attribute: sent as usual.
		"X-Amqp-Header-Tenant_id": "acme",
		// The event's natural key.
		"Idempotency-Key": "https://example.com/orders A234-1234-1234",
	}
	for _, prefix := range []string{"cloudEvents:", "cloudEvents_"} {
		t.Run(prefix, func(t *testing.T) {
			h := ceRequest(ceAgent(true, nil), binaryEvent(prefix))
			for name, value := range want {
				if got := h[name]; len(got) != 1 || got[0] != value {
					t.Errorf("%s: %q, want %q", name, got, value)
				}
			}
			for name := range h {
				if strings.HasPrefix(name, HeaderPrefix+"Cloudevents") {
					t.Errorf("attribute header %s sent again as an AMQP header", name)
				}
				if name == "Ce-Datacontenttype" {
					t.Error("datacontenttype sent as a ce- header")
				}
			}
		})
	}
}

// Each AMQP type becomes the canonical string of its CloudEvents type.
func TestCloudEventsValueTypes(t *testing.T) {
	cases := []struct {
		value interface{}
		want  string
	}{
		{"text", "text"},
		{true, "true"},
		{false, "false"},
		{int8(-8), "-8"},
		{uint8(8), "8"},
		{int16(-300), "-300"},
		{uint16(300), "300"},
		{int32(-70000), "-70000"},
		{uint32(70000), "70000"},
		{int64(1 << 40), "1099511627776"},
		{time.Date(2024, 5, 1, 12, 0, 0, 0, time.FixedZone("CEST", 7200)), "2024-05-01T10:00:00Z"},
		{[]byte{0, 1, 2, 0xff}, "AAEC/w=="},
		{amqp.Decimal{Scale: 2, Value: -5}, "-0.05"},
		{float64(1.5), "1.5"},
		{float32(2), "2"},
	}
	for _, tc := range cases {
		d := binaryEvent("cloudEvents:")
		d.Headers["cloudEvents:ext"] = tc.value
		h := ceRequest(ceAgent(true, nil), d)
		if got := h["Ce-Ext"]; len(got) != 1 || got[0] != tc.want {
			t.Errorf("%T %v: Ce-Ext %q, want %q", tc.value, tc.value, got, tc.want)
		}
	}
	// A void value leaves the attribute unset.
	d := binaryEvent("cloudEvents:")
	d.Headers["cloudEvents:subject"] = nil
	if h := ceRequest(ceAgent(true, nil), d); h["Ce-Subject"] != nil || h["Ce-Id"] == nil {
		t.Errorf("void subject: %v", h)
	}
	// time as text is passed as it was written.
	d = binaryEvent("cloudEvents:")
	d.Headers["cloudEvents:time"] = "2018-04-05T17:31:00.123+02:00"
	if h := ceRequest(ceAgent(true, nil), d); h["Ce-Time"][0] != "2018-04-05T17:31:00.123+02:00" {
		t.Errorf("time as text: Ce-Time %q", h["Ce-Time"])
	}
}

// Values are percent-encoded as the HTTP binding says.
func TestCloudEventsPercentEncoding(t *testing.T) {
	for in, want := range map[string]string{
		"Euro € 😀":       "Euro%20%E2%82%AC%20%F0%9F%98%80",
		`say "hi" 100%`:  "say%20%22hi%22%20100%25",
		"plain-ASCII/~!": "plain-ASCII/~!",
		"":               "",
		" ":              "%20",
		"ü":              "%C3%BC",
	} {
		if got := percentEncode(in); got != want {
			t.Errorf("percentEncode(%q) = %q, want %q", in, got, want)
		}
	}
	d := binaryEvent("cloudEvents_")
	d.Headers["cloudEvents_subject"] = "Grüße aus Köln"
	d.Headers["cloudEvents_source"] = "/a b"
	h := ceRequest(ceAgent(true, nil), d)
	if got := h["Ce-Subject"][0]; got != "Gr%C3%BC%C3%9Fe%20aus%20K%C3%B6ln" {
		t.Errorf("Ce-Subject %q", got)
	}
	if got := h["Idempotency-Key"][0]; got != "/a%20b A234-1234-1234" {
		t.Errorf("Idempotency-Key %q", got)
	}
}

func TestCloudEventsDataContentType(t *testing.T) {
	a := ceAgent(true, nil)
	t.Run("from the header when content_type is unset", func(t *testing.T) {
		d := binaryEvent("cloudEvents:")
		d.ContentType = ""
		d.Headers["cloudEvents:datacontenttype"] = "text/plain"
		h := ceRequest(a, d)
		if got := h["Content-Type"]; len(got) != 1 || got[0] != "text/plain" {
			t.Errorf("Content-Type %q", got)
		}
		if h["Ce-Datacontenttype"] != nil || h["X-Amqp-Header-Cloudevents-Datacontenttype"] != nil {
			t.Errorf("datacontenttype sent as a header too: %v", h)
		}
	})
	t.Run("none at all", func(t *testing.T) {
		d := binaryEvent("cloudEvents:")
		d.ContentType = ""
		h := ceRequest(a, d)
		if h["Content-Type"] != nil || h["Ce-Id"] == nil {
			t.Errorf("headers %v", h)
		}
	})
	t.Run("the header agreeing with content_type", func(t *testing.T) {
		d := binaryEvent("cloudEvents:")
		d.Headers["cloudEvents:datacontenttype"] = d.ContentType
		if h := ceRequest(a, d); h["Content-Type"][0] != d.ContentType || h["Ce-Id"] == nil {
			t.Errorf("headers %v", h)
		}
	})
}

// Each broken rule makes the message a plain one, sent exactly as
// without the option, with a DEBUG line saying why.
func TestCloudEventsInvalidAreSentPlain(t *testing.T) {
	cases := []struct {
		name   string
		change func(d *amqp.Delivery)
		why    string
	}{
		{"no id", func(d *amqp.Delivery) { delete(d.Headers, "cloudEvents:id") }, "no id"},
		{"blank id", func(d *amqp.Delivery) { d.Headers["cloudEvents:id"] = "  " }, "no id"},
		{"no source", func(d *amqp.Delivery) { delete(d.Headers, "cloudEvents:source") }, "no source"},
		{"no type", func(d *amqp.Delivery) { delete(d.Headers, "cloudEvents:type") }, "no type"},
		{"no specversion", func(d *amqp.Delivery) { delete(d.Headers, "cloudEvents:specversion") }, `specversion ""`},
		{"specversion 0.3", func(d *amqp.Delivery) { d.Headers["cloudEvents:specversion"] = "0.3" }, `specversion "0.3"`},
		{"upper-case name", func(d *amqp.Delivery) { d.Headers["cloudEvents:Tenant"] = "x" }, "attribute name"},
		{"name with a dash", func(d *amqp.Delivery) { d.Headers["cloudEvents:my-ext"] = "x" }, "attribute name"},
		{"name data", func(d *amqp.Delivery) { d.Headers["cloudEvents:data"] = "x" }, "attribute name"},
		{"empty name", func(d *amqp.Delivery) { d.Headers["cloudEvents:"] = "x" }, "attribute name"},
		{"mixed prefixes", func(d *amqp.Delivery) { d.Headers["cloudEvents_ext"] = "x" }, "mix"},
		{"nested table", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = amqp.Table{"a": "b"} }, "table"},
		{"array", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = []interface{}{"a"} }, "array"},
		{"id as bytes", func(d *amqp.Delivery) { d.Headers["cloudEvents:id"] = []byte("1") }, "wants text"},
		{"type as a number", func(d *amqp.Delivery) { d.Headers["cloudEvents:type"] = int32(1) }, "wants text"},
		{"CR LF in a value", func(d *amqp.Delivery) { d.Headers["cloudEvents:subject"] = "a\r\nX-Evil: 1" }, "U+000D"},
		{"a C1 control", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = "a\u0085b" }, "U+0085"},
		{"a noncharacter", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = "a\uFFFEb" }, "U+FFFE"},
		{"invalid UTF-8", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = "a\xc0\xa0b" }, "UTF-8"},
		{"NaN", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = float64(nan()) }, "not a number"},
		{"huge value", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = strings.Repeat("x", maxAttributeBytes+1) }, "over"},
		{"huge binary", func(d *amqp.Delivery) { d.Headers["cloudEvents:ext"] = make([]byte, maxAttributeBytes+1) }, "over"},
		{"too much in all", func(d *amqp.Delivery) {
			for i := 0; i < 9; i++ {
				d.Headers["cloudEvents:ext"+string(rune('a'+i))] = strings.Repeat("x", maxAttributeBytes)
			}
		}, "in all"},
		{"too many", func(d *amqp.Delivery) {
			for i := 0; i < maxEventAttributes; i++ {
				d.Headers["cloudEvents:ext"+strings.Repeat("a", i+1)] = "x"
			}
		}, "more than"},
		{"relative dataschema", func(d *amqp.Delivery) { d.Headers["cloudEvents:dataschema"] = "/schema" }, "dataschema"},
		{"bad time", func(d *amqp.Delivery) { d.Headers["cloudEvents:time"] = "yesterday" }, "time"},
		{"time out of range", func(d *amqp.Delivery) { d.Headers["cloudEvents:time"] = time.Unix(1<<40, 0) }, "time"},
		{"empty subject", func(d *amqp.Delivery) { d.Headers["cloudEvents:subject"] = "" }, "subject"},
		{"source not a URI reference", func(d *amqp.Delivery) { d.Headers["cloudEvents:source"] = ":nope" }, "source"},
		{"content_type not a media type", func(d *amqp.Delivery) { d.ContentType = "json" }, "datacontenttype"},
		{"content_type with a control", func(d *amqp.Delivery) { d.ContentType = "text/plain\n" }, "content_type"},
		{"content_type and header differ", func(d *amqp.Delivery) { d.Headers["cloudEvents:datacontenttype"] = "text/xml" }, "differ"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := binaryEvent("cloudEvents:")
			tc.change(d)
			logs := &bytes.Buffer{}
			got := ceRequest(ceAgent(true, logs), d)
			want := ceRequest(ceAgent(false, nil), d)
			if !reflect.DeepEqual(sortedValues(got), sortedValues(want)) {
				t.Errorf("sent\n%v\nwant, as without the option,\n%v", got, want)
			}
			if !strings.Contains(logs.String(), "DEBUG") || !strings.Contains(logs.String(), "not a valid CloudEvent") ||
				!strings.Contains(logs.String(), tc.why) {
				t.Errorf("log %q lacks a DEBUG line with %q", logs.String(), tc.why)
			}
		})
	}
}

func nan() float64 { var z float64; return z / z }

// A message with no attribute header and no CloudEvents content type is
// not an event, and nothing is logged about it.
func TestCloudEventsPlainMessage(t *testing.T) {
	logs := &bytes.Buffer{}
	d := &amqp.Delivery{ContentType: "application/json", Headers: amqp.Table{"tenant": "acme"}, Body: []byte("{}")}
	if e, err := readEvent(d); e != nil || err != nil {
		t.Fatalf("readEvent: %v, %v", e, err)
	}
	got := ceRequest(ceAgent(true, logs), d)
	if want := ceRequest(ceAgent(false, nil), d); !reflect.DeepEqual(got, want) {
		t.Errorf("sent %v, want %v", got, want)
	}
	if logs.Len() != 0 {
		t.Errorf("logged %q", logs.String())
	}
	// Another format, or a batch, is passed on as it is, even with
	// attribute headers.
	for _, ct := range []string{"application/cloudevents+avro", "application/cloudevents-batch+json"} {
		d := binaryEvent("cloudEvents:")
		d.ContentType = ct
		if e, err := readEvent(d); e != nil || err != nil {
			t.Errorf("%s: readEvent: %v, %v", ct, e, err)
		}
	}
}

// Without the option, attribute headers are plain AMQP headers.
func TestCloudEventsOff(t *testing.T) {
	h := ceRequest(ceAgent(false, nil), binaryEvent("cloudEvents:"))
	if h["Ce-Id"] != nil || h["X-Amqp-Header-Cloudevents-Id"][0] != "A234-1234-1234" {
		t.Errorf("headers %v", h)
	}
	if !strings.HasPrefix(h["Idempotency-Key"][0], "sha256:") {
		t.Errorf("key %q", h["Idempotency-Key"])
	}
}

const structuredBody = `{"specversion":"1.0","type":"com.example.order.created","source":"/orders","id":"B-1",
"time":"2018-04-05T17:31:00Z","subject":null,"tenant":"acme","priority":5,"urgent":true,
"datacontenttype":"application/json","data":{"order":1}}`

func TestCloudEventsStructuredMode(t *testing.T) {
	for _, ct := range []string{"application/cloudevents+json", "application/cloudevents+json; charset=utf-8", "Application/CloudEvents+JSON ;charset=UTF-8"} {
		t.Run(ct, func(t *testing.T) {
			logs := &bytes.Buffer{}
			a := ceAgent(true, logs)
			d := &amqp.Delivery{ContentType: ct, Body: []byte(structuredBody), Headers: amqp.Table{"tenant_id": "acme"}}
			m := a.msg(d)
			if m.event == nil || !m.event.structured {
				t.Fatalf("not read as a structured event; log %q", logs.String())
			}
			req := newRequest(m, false)
			if got := readBody(t, req); string(got) != structuredBody {
				t.Errorf("body %q, want it as published", got)
			}
			if got := req.Headers["Content-Type"]; len(got) != 1 || got[0] != ct {
				t.Errorf("Content-Type %q, want %q", got, ct)
			}
			for name := range req.Headers {
				if strings.HasPrefix(name, "Ce-") {
					t.Errorf("structured mode sends %s", name)
				}
			}
			if got := idempotencyKey(m); got != "/orders B-1" {
				t.Errorf("key %q", got)
			}
		})
	}
}

func TestCloudEventsStructuredInvalid(t *testing.T) {
	for name, body := range map[string]string{
		"not JSON":           `{"specversion":`,
		"an array":           `[{"specversion":"1.0"}]`,
		"no id":              `{"specversion":"1.0","type":"t","source":"/s"}`,
		"id a number":        `{"specversion":"1.0","type":"t","source":"/s","id":1}`,
		"specversion 0.3":    `{"specversion":"0.3","type":"t","source":"/s","id":"1"}`,
		"extension object":   `{"specversion":"1.0","type":"t","source":"/s","id":"1","ext":{"a":1}}`,
		"extension float":    `{"specversion":"1.0","type":"t","source":"/s","id":"1","ext":1.5}`,
		"extension too big":  `{"specversion":"1.0","type":"t","source":"/s","id":"1","ext":4294967296}`,
		"upper-case name":    `{"specversion":"1.0","type":"t","source":"/s","id":"1","Ext":"x"}`,
		"null bad name":      `{"specversion":"1.0","type":"t","source":"/s","id":"1","my-ext":null}`,
		"control in value":   `{"specversion":"1.0","type":"t","source":"/s","id":"1\n2"}`,
		"data and base64":    `{"specversion":"1.0","type":"t","source":"/s","id":"1","data":1,"data_base64":"AA=="}`,
		"base64 not base64":  `{"specversion":"1.0","type":"t","source":"/s","id":"1","data_base64":"*"}`,
		"bad datacontentype": `{"specversion":"1.0","type":"t","source":"/s","id":"1","datacontenttype":"json"}`,
	} {
		d := &amqp.Delivery{ContentType: "application/cloudevents+json", Body: []byte(body)}
		if e, err := readEvent(d); e != nil || err == nil {
			t.Errorf("%s: read as %v, %v", name, e, err)
		}
	}
	big := `{"specversion":"1.0","type":"t","source":"/s","id":"1","data":"` + strings.Repeat("x", maxStructuredBytes) + `"}`
	if _, err := readEvent(&amqp.Delivery{ContentType: "application/cloudevents+json", Body: []byte(big)}); err == nil {
		t.Error("a body over the bound was read")
	}
	ok := `{"specversion":"1.0","type":"t","source":"/s","id":"1","data_base64":"AAEC"}`
	if e, err := readEvent(&amqp.Delivery{ContentType: "application/cloudevents+json", Body: []byte(ok)}); e == nil || err != nil {
		t.Errorf("data_base64 event: %v, %v", e, err)
	}
}

// A retry copy carries the publisher's headers and content type, so a
// retried event reaches the backend as the same event, with the same
// key.
func TestCloudEventSurvivesRetry(t *testing.T) {
	for _, d := range []*amqp.Delivery{binaryEvent("cloudEvents:"), binaryEvent("cloudEvents_"),
		{Exchange: "orders", RoutingKey: "orders.created", ContentType: "application/cloudevents+json; charset=utf-8", Body: []byte(structuredBody)}} {
		a := ceAgent(true, nil)
		first := a.msg(d)
		if first.event == nil {
			t.Fatal("not read as an event")
		}
		want := ceRequest(a, d)
		c := a.copyOf(first, 1, 0, "500")
		back := expiredFrom(&amqp.Delivery{Headers: c.Headers, Body: c.Body, ContentType: c.ContentType,
			ContentEncoding: c.ContentEncoding, MessageId: c.MessageId, Timestamp: c.Timestamp, Type: c.Type}, "work.retry.1s")
		second := a.msg(back)
		if !second.retried || second.event == nil {
			t.Fatalf("retried %t, event %v", second.retried, second.event)
		}
		got := ceRequest(a, back)
		for _, h := range []map[string][]string{got, want} {
			delete(h, HeaderAttempt)
			delete(h, HeaderExchange)
		}
		if !reflect.DeepEqual(sortedValues(got), sortedValues(want)) {
			t.Errorf("the backend sees on a retry\n%v\nwant\n%v", got, want)
		}
	}
}
