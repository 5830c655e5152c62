package driver

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	"github.com/luraproject/lura/v2/transport/http/client"
	amqp "github.com/rabbitmq/amqp091-go"

	driverconfig "github.com/krakend-contrib/async-amqp/config"
)

func readBody(t *testing.T, r *proxy.Request) []byte {
	t.Helper()
	if r.Body == nil {
		t.Fatal("request has no body")
	}
	b, err := io.ReadAll(r.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return b
}

func header(r *proxy.Request, name string) (string, bool) {
	v, ok := r.Headers[name]
	if !ok {
		return "", false
	}
	if len(v) != 1 {
		return strings.Join(v, ", "), true
	}
	return v[0], true
}

// isToken reports whether s is a valid HTTP header field name (RFC 9110
// token).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isTokenByte(s[i]) {
			return false
		}
	}
	return true
}

// validValue reports whether s is a header field value net/http sends:
// no control characters but horizontal tab.
func validValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// sendHeaders sends the request headers through net/http's client to a
// test server, which refuses (client side) any name or value that is not
// valid on the wire, and returns what the server saw.
func sendHeaders(t *testing.T, h map[string][]string) http.Header {
	t.Helper()
	seen := make(chan http.Header, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
	}))
	defer srv.Close()
	req, err := http.NewRequest(http.MethodPost, srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range h {
		if k == "Content-Length" {
			continue
		}
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("net/http refused the headers: %v", err)
	}
	_ = resp.Body.Close()
	return <-seen
}

func TestNewRequestBodyAndContentHeaders(t *testing.T) {
	for _, tc := range []struct {
		name     string
		d        amqp.Delivery
		wantType string
		wantEnc  string
		wantLen  string
	}{
		{
			name:     "json body",
			d:        amqp.Delivery{Body: []byte(`{"id":1}`), ContentType: "application/json", ContentEncoding: "utf-8"},
			wantType: "application/json", wantEnc: "utf-8", wantLen: "8",
		},
		{
			name:    "binary body without content type",
			d:       amqp.Delivery{Body: []byte{0, 1, 2, 0xff, '\r', '\n'}},
			wantLen: "6",
		},
		{
			name:     "empty body",
			d:        amqp.Delivery{ContentType: "text/plain"},
			wantType: "text/plain", wantLen: "0",
		},
		{
			name:     "gzip",
			d:        amqp.Delivery{Body: []byte("\x1f\x8b..."), ContentType: "application/octet-stream", ContentEncoding: "gzip"},
			wantType: "application/octet-stream", wantEnc: "gzip", wantLen: "5",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRequest(plain(&tc.d), true)
			if got := readBody(t, r); string(got) != string(tc.d.Body) {
				t.Errorf("body = %q, want %q", got, tc.d.Body)
			}
			for _, h := range []struct{ name, want string }{
				{"Content-Type", tc.wantType},
				{"Content-Encoding", tc.wantEnc},
				{"Content-Length", tc.wantLen},
			} {
				got, ok := header(r, h.name)
				if h.want == "" {
					if ok {
						t.Errorf("%s = %q, want it absent", h.name, got)
					}
					continue
				}
				if got != h.want {
					t.Errorf("%s = %q, want %q", h.name, got, h.want)
				}
			}
			if r.Method != http.MethodPost {
				t.Errorf("Method = %q, want POST", r.Method)
			}
		})
	}

	t.Run("the body is not shared with the delivery", func(t *testing.T) {
		d := amqp.Delivery{Body: []byte("abc")}
		r := newRequest(plain(&d), true)
		if err := r.Body.Close(); err != nil {
			t.Errorf("closing the body: %v", err)
		}
	})
}

func TestNewRequestMetadataHeaders(t *testing.T) {
	ts := time.Date(2024, 3, 4, 5, 6, 7, 0, time.FixedZone("CET", 3600))
	full := amqp.Delivery{
		RoutingKey:    "orders.created",
		Exchange:      "orders",
		Redelivered:   true,
		MessageId:     "m-1",
		CorrelationId: "c-1",
		ReplyTo:       "amq.rabbitmq.reply-to",
		Type:          "order.created",
		AppId:         "shop",
		UserId:        "guest",
		Timestamp:     ts,
	}
	for _, tc := range []struct {
		name string
		d    amqp.Delivery
		want map[string]string // "" means absent
	}{
		{
			name: "every property",
			d:    full,
			want: map[string]string{
				HeaderRoutingKey:    "orders.created",
				HeaderExchange:      "orders",
				HeaderRedelivered:   "true",
				HeaderMessageID:     "m-1",
				HeaderCorrelationID: "c-1",
				HeaderReplyTo:       "amq.rabbitmq.reply-to",
				HeaderType:          "order.created",
				HeaderAppID:         "shop",
				HeaderUserID:        "guest",
				HeaderTimestamp:     "2024-03-04T04:06:07Z",
			},
		},
		{
			name: "no property: only redelivered",
			d:    amqp.Delivery{},
			want: map[string]string{
				HeaderRoutingKey:    "",
				HeaderExchange:      "",
				HeaderRedelivered:   "false",
				HeaderMessageID:     "",
				HeaderCorrelationID: "",
				HeaderReplyTo:       "",
				HeaderType:          "",
				HeaderAppID:         "",
				HeaderUserID:        "",
				HeaderTimestamp:     "",
			},
		},
		{
			name: "default exchange",
			d:    amqp.Delivery{RoutingKey: "q", Exchange: ""},
			want: map[string]string{HeaderRoutingKey: "q", HeaderExchange: "", HeaderRedelivered: "false"},
		},
		{
			name: "unix epoch timestamp is a timestamp",
			d:    amqp.Delivery{Timestamp: time.Unix(0, 0)},
			want: map[string]string{HeaderTimestamp: "1970-01-01T00:00:00Z"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRequest(plain(&tc.d), true)
			for name, want := range tc.want {
				got, ok := header(r, name)
				switch {
				case want == "" && ok:
					t.Errorf("%s = %q, want it absent", name, got)
				case want != "" && got != want:
					t.Errorf("%s = %q (present %t), want %q", name, got, ok, want)
				}
			}
		})
	}

	t.Run("names are canonical", func(t *testing.T) {
		r := newRequest(plain(&full), true)
		for name := range r.Headers {
			if c := http.CanonicalHeaderKey(name); c != name {
				t.Errorf("header %q is not in canonical form %q: Lura and net/http would miss it", name, c)
			}
		}
	})
}

func TestNewRequestTableHeaders(t *testing.T) {
	ts := time.Date(2024, 1, 2, 3, 4, 5, 0, time.FixedZone("X", -2*3600))
	d := amqp.Delivery{Headers: amqp.Table{
		"string":        "hello",
		"bytes":         []byte("raw bytes"),
		"bool-true":     true,
		"bool-false":    false,
		"int8":          int8(-8),
		"int16":         int16(-16),
		"int32":         int32(-32),
		"int64":         int64(-64),
		"uint8":         uint8(8),
		"uint16":        uint16(16),
		"uint32":        uint32(32),
		"float32":       float32(1.5),
		"float64":       float64(2.25),
		"time":          ts,
		"decimal":       amqp.Decimal{Scale: 2, Value: 12345},
		"decimal-neg":   amqp.Decimal{Scale: 2, Value: -12345},
		"decimal-small": amqp.Decimal{Scale: 3, Value: -5},
		"decimal-frac":  amqp.Decimal{Scale: 2, Value: 5},
		"decimal-int":   amqp.Decimal{Scale: 0, Value: -42},
		"decimal-exact": amqp.Decimal{Scale: 2, Value: 100},
		"table":         amqp.Table{"b": int32(1), "a": "x"},
		"array":         []interface{}{"a", int32(1), true},
		"x-death":       []interface{}{amqp.Table{"count": int64(2), "reason": "rejected"}},
		"empty-string":  "",
		"nil":           nil,
	}}
	r := newRequest(plain(&d), true)
	for _, tc := range []struct {
		key, name, want string
	}{
		{"string", "X-Amqp-Header-String", "hello"},
		{"bytes", "X-Amqp-Header-Bytes", "raw bytes"},
		{"bool-true", "X-Amqp-Header-Bool-True", "true"},
		{"bool-false", "X-Amqp-Header-Bool-False", "false"},
		{"int8", "X-Amqp-Header-Int8", "-8"},
		{"int16", "X-Amqp-Header-Int16", "-16"},
		{"int32", "X-Amqp-Header-Int32", "-32"},
		{"int64", "X-Amqp-Header-Int64", "-64"},
		{"uint8", "X-Amqp-Header-Uint8", "8"},
		{"uint16", "X-Amqp-Header-Uint16", "16"},
		{"uint32", "X-Amqp-Header-Uint32", "32"},
		{"float32", "X-Amqp-Header-Float32", "1.5"},
		{"float64", "X-Amqp-Header-Float64", "2.25"},
		{"time in UTC RFC3339", "X-Amqp-Header-Time", "2024-01-02T05:04:05Z"},
		{"decimal", "X-Amqp-Header-Decimal", "123.45"},
		{"negative decimal", "X-Amqp-Header-Decimal-Neg", "-123.45"},
		{"negative decimal below one", "X-Amqp-Header-Decimal-Small", "-0.005"},
		{"decimal below one", "X-Amqp-Header-Decimal-Frac", "0.05"},
		{"decimal with scale 0", "X-Amqp-Header-Decimal-Int", "-42"},
		{"decimal keeps trailing zeros", "X-Amqp-Header-Decimal-Exact", "1.00"},
		{"nested table as JSON", "X-Amqp-Header-Table", `{"a":"x","b":1}`},
		{"array as JSON", "X-Amqp-Header-Array", `["a",1,true]`},
		{"x-death as JSON", "X-Amqp-Header-X-Death", `[{"count":2,"reason":"rejected"}]`},
	} {
		t.Run(tc.key, func(t *testing.T) {
			got, ok := header(r, tc.name)
			if !ok {
				t.Fatalf("%s absent; headers: %v", tc.name, r.Headers)
			}
			if got != tc.want {
				t.Errorf("%s = %q, want %q", tc.name, got, tc.want)
			}
		})
	}
	for _, name := range []string{"X-Amqp-Header-Empty-String", "X-Amqp-Header-Nil"} {
		t.Run(name+" absent", func(t *testing.T) {
			if got, ok := header(r, name); ok {
				t.Errorf("%s = %q, want no header for an empty value", name, got)
			}
		})
	}
	t.Run("net/http accepts them all", func(t *testing.T) {
		seen := sendHeaders(t, r.Headers)
		if got := seen.Get("X-Amqp-Header-Decimal-Neg"); got != "-123.45" {
			t.Errorf("server saw X-Amqp-Header-Decimal-Neg = %q", got)
		}
	})
}

func TestDecimalString(t *testing.T) {
	for _, tc := range []struct {
		d    amqp.Decimal
		want string
	}{
		{amqp.Decimal{Scale: 0, Value: 0}, "0"},
		{amqp.Decimal{Scale: 1, Value: 0}, "0.0"},
		{amqp.Decimal{Scale: 2, Value: 1}, "0.01"},
		{amqp.Decimal{Scale: 2, Value: -1}, "-0.01"},
		{amqp.Decimal{Scale: 1, Value: -10}, "-1.0"},
		{amqp.Decimal{Scale: 4, Value: 2147483647}, "214748.3647"},
		{amqp.Decimal{Scale: 3, Value: -2147483648}, "-2147483.648"},
		{amqp.Decimal{Scale: 12, Value: -2147483648}, "-0.002147483648"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			if got := decimalString(tc.d); got != tc.want {
				t.Errorf("decimalString(%+v) = %q, want %q", tc.d, got, tc.want)
			}
		})
	}
}

func TestNewRequestHeaderNamesAreTokens(t *testing.T) {
	for _, tc := range []struct {
		key  string
		want string // "" means: only check it is a valid token
	}{
		{"trace-id", "X-Amqp-Header-Trace-Id"},
		{"TRACE-ID", "X-Amqp-Header-Trace-Id"},
		{"with space", "X-Amqp-Header-With-Space"},
		{"a:b", "X-Amqp-Header-A-B"},
		{"a\r\nInjected: 1", ""},
		{"naïve", ""},
		{"日本", ""},
		{"quote\"and(parens)", ""},
		{"", "X-Amqp-Header-"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			d := amqp.Delivery{Headers: amqp.Table{tc.key: "v"}}
			r := newRequest(plain(&d), true)
			var names []string
			for name := range r.Headers {
				if strings.HasPrefix(name, HeaderPrefix) {
					names = append(names, name)
				}
			}
			if len(names) != 1 {
				t.Fatalf("want one %s header, got %v", HeaderPrefix, names)
			}
			name := names[0]
			if !isToken(name) {
				t.Errorf("header name %q is not a valid token", name)
			}
			if tc.want != "" && name != tc.want {
				t.Errorf("header name = %q, want %q", name, tc.want)
			}
			if c := http.CanonicalHeaderKey(name); c != name {
				t.Errorf("header name %q is not canonical (%q)", name, c)
			}
			if seen := sendHeaders(t, r.Headers); seen.Get(name) != "v" {
				t.Errorf("server saw %s = %q, want v", name, seen.Get(name))
			}
		})
	}
}

// Keys that clean to one header name keep every value.
func TestNewRequestHeaderNameCollision(t *testing.T) {
	d := amqp.Delivery{Headers: amqp.Table{"a b": "one", "a:b": "two", "A-B": "three"}}
	r := newRequest(plain(&d), true)
	got := append([]string(nil), r.Headers["X-Amqp-Header-A-B"]...)
	sort.Strings(got)
	if want := []string{"one", "three", "two"}; strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("X-Amqp-Header-A-B = %q, want the values %q", got, want)
	}
	seen := sendHeaders(t, r.Headers)
	if n := len(seen.Values("X-Amqp-Header-A-B")); n != 3 {
		t.Errorf("server saw %d values, want 3", n)
	}
}

func TestNewRequestHeaderValuesAreCleaned(t *testing.T) {
	for _, tc := range []struct {
		name  string
		value interface{}
		want  string
	}{
		{"CRLF injection", "a\r\nX-Injected: 1", "a  X-Injected: 1"},
		{"bare LF", "line1\nline2", "line1 line2"},
		{"NUL", "a\x00b", "a b"},
		{"DEL", "a\x7fb", "a b"},
		{"tab is kept", "a\tb", "a\tb"},
		{"non-ASCII is kept", "héllo 日本", "héllo 日本"},
		{"bytes with controls", []byte("x\r\ny\x01"), "x  y "},
		{"control in nested table", amqp.Table{"k": "a\nb"}, `{"k":"a\nb"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := amqp.Delivery{
				Headers:       amqp.Table{"h": tc.value},
				MessageId:     "id\r\n",
				CorrelationId: "c\x00",
				RoutingKey:    "rk\n",
				ContentType:   "text/plain\r\nX-Evil: 1",
			}
			r := newRequest(plain(&d), true)
			got, _ := header(r, "X-Amqp-Header-H")
			if got != tc.want {
				t.Errorf("value = %q, want %q", got, tc.want)
			}
			for name, vs := range r.Headers {
				for _, v := range vs {
					if !validValue(v) {
						t.Errorf("header %s = %q holds a control character", name, v)
					}
				}
			}
			if _, ok := r.Headers["X-Evil"]; ok {
				t.Error("a header was injected")
			}
			seen := sendHeaders(t, r.Headers)
			if seen.Get("X-Injected") != "" || seen.Get("X-Evil") != "" {
				t.Errorf("the server saw an injected header: %v", seen)
			}
		})
	}
}

func TestNewRequestParams(t *testing.T) {
	for _, tc := range []struct {
		name string
		d    amqp.Delivery
		want map[string]string
	}{
		{
			name: "plain values",
			d:    amqp.Delivery{RoutingKey: "orders.created", Exchange: "orders", MessageId: "m1", CorrelationId: "c1", Redelivered: true},
			want: map[string]string{"Routing_key": "orders.created", "Exchange": "orders", "Message_id": "m1", "Correlation_id": "c1", "Redelivered": "true"},
		},
		{
			name: "values are path-escaped",
			d:    amqp.Delivery{RoutingKey: "a/b c", Exchange: "x?y", MessageId: "id#1", CorrelationId: "{{.Exchange}}"},
			want: map[string]string{"Routing_key": "a%2Fb%20c", "Exchange": "x%3Fy", "Message_id": "id%231", "Correlation_id": "%7B%7B.Exchange%7D%7D", "Redelivered": "false"},
		},
		{
			name: "empty values",
			d:    amqp.Delivery{},
			want: map[string]string{"Routing_key": "", "Exchange": "", "Message_id": "", "Correlation_id": "", "Redelivered": "false"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRequest(plain(&tc.d), true)
			if len(r.Params) != len(tc.want) {
				t.Errorf("Params = %v, want %v", r.Params, tc.want)
			}
			for k, want := range tc.want {
				if got, ok := r.Params[k]; !ok || got != want {
					t.Errorf("Params[%q] = %q (present %t), want %q", k, got, ok, want)
				}
			}
		})
	}

	t.Run("one param per documented placeholder", func(t *testing.T) {
		r := newRequest(plain(&amqp.Delivery{}), true)
		for _, p := range Placeholders() {
			key := strings.ToUpper(p[:1]) + p[1:]
			if _, ok := r.Params[key]; !ok {
				t.Errorf("placeholder {%s} has no param %q", p, key)
			}
		}
	})
}

func TestURLPattern(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    string
		wantErr []string
	}{
		{name: "no placeholder", in: "/orders", want: "/orders"},
		{name: "empty", in: "", want: ""},
		{name: "routing key", in: "/events/{routing_key}", want: "/events/{{.Routing_key}}"},
		{
			name: "every placeholder",
			in:   "/{routing_key}/{exchange}/{message_id}/{correlation_id}/{redelivered}",
			want: "/{{.Routing_key}}/{{.Exchange}}/{{.Message_id}}/{{.Correlation_id}}/{{.Redelivered}}",
		},
		{name: "twice", in: "/{message_id}/{message_id}", want: "/{{.Message_id}}/{{.Message_id}}"},
		{name: "in the query", in: "/e?key={routing_key}", want: "/e?key={{.Routing_key}}"},
		{name: "already in Lura form", in: "/events/{{.Routing_key}}", want: "/events/{{.Routing_key}}"},
		{name: "mixed forms", in: "/{{.Exchange}}/{routing_key}", want: "/{{.Exchange}}/{{.Routing_key}}"},
		{
			name:    "unknown placeholder",
			in:      "/events/{foo}",
			wantErr: []string{"{foo}", "/events/{foo}", "{routing_key}", "{exchange}", "{message_id}", "{correlation_id}", "{redelivered}"},
		},
		{name: "unknown in Lura form", in: "/events/{{.Foo}}", wantErr: []string{"{{.Foo}}"}},
		{name: "several unknown, all named", in: "/{zeta}/{routing_key}/{alpha}", wantErr: []string{"{alpha}", "{zeta}"}},
		{name: "wrong case", in: "/{Routing_Key}", wantErr: []string{"{Routing_Key}"}},
		{name: "empty braces", in: "/{}", wantErr: []string{"{}"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := URLPattern(tc.in)
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("URLPattern(%q) = %q, want an error", tc.in, got)
				}
				for _, s := range tc.wantErr {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not contain %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("URLPattern(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Errorf("URLPattern(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestGeneratePathThroughLura(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pattern string
		d       amqp.Delivery
		want    string
	}{
		{
			name:    "escaped routing key and message id",
			pattern: "/events/{routing_key}/{message_id}",
			d:       amqp.Delivery{RoutingKey: "a/b c", MessageId: "id 1"},
			want:    "/events/a%2Fb%20c/id%201",
		},
		{
			name:    "plain values",
			pattern: "/events/{routing_key}/{message_id}",
			d:       amqp.Delivery{RoutingKey: "orders.created", MessageId: "42"},
			want:    "/events/orders.created/42",
		},
		{
			name:    "a value that looks like a placeholder is not expanded",
			pattern: "/{exchange}/{correlation_id}",
			d:       amqp.Delivery{Exchange: "x", CorrelationId: "{{.Exchange}}"},
			want:    "/x/%7B%7B.Exchange%7D%7D",
		},
		{
			name:    "redelivered",
			pattern: "/retry/{redelivered}",
			d:       amqp.Delivery{Redelivered: true},
			want:    "/retry/true",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pattern, err := URLPattern(tc.pattern)
			if err != nil {
				t.Fatal(err)
			}
			r := newRequest(plain(&tc.d), true)
			r.GeneratePath(pattern)
			if r.Path != tc.want {
				t.Errorf("Path = %q, want %q", r.Path, tc.want)
			}
		})
	}
}

// seen is what a test backend received.
type seen struct {
	method, path string
	header       http.Header
	body         string
}

// testBackend answers every request with status(n) (n counts from 1) and
// reports each request on a channel.
func testBackend(t *testing.T, status func(n int) int) (*httptest.Server, <-chan seen) {
	t.Helper()
	got := make(chan seen, 16)
	n := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		n++
		got <- seen{method: r.Method, path: r.URL.EscapedPath(), header: r.Header.Clone(), body: string(b)}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status(n))
		_, _ = io.WriteString(w, `{"ok":true}`)
	}))
	t.Cleanup(srv.Close)
	return srv, got
}

// luraPipeline builds the backend pipeline of an async agent the way
// Lura's async.AgentStarter does, after Lura's config parser and the
// driver's url_pattern rewrite (what Check does) have run.
func luraPipeline(t *testing.T, encoding string, backends ...*config.Backend) proxy.Proxy {
	t.Helper()
	for _, b := range backends {
		b.Encoding = encoding
		pattern, err := URLPattern(b.URLPattern)
		if err != nil {
			t.Fatal(err)
		}
		b.URLPattern = pattern
	}
	agent := &config.AsyncAgent{
		Name:     "test-agent",
		Consumer: config.Consumer{Topic: "#", Timeout: 5 * time.Second},
		Backend:  backends,
	}
	sc := config.ServiceConfig{Version: config.ConfigVersion, AsyncAgents: []*config.AsyncAgent{agent}}
	if err := sc.Init(); err != nil {
		t.Fatalf("lura config Init: %v", err)
	}
	endpoint := &config.EndpointConfig{
		Endpoint:    agent.Name,
		Timeout:     agent.Consumer.Timeout,
		Backend:     agent.Backend,
		ExtraConfig: agent.ExtraConfig,
	}
	p, err := proxy.NewDefaultFactory(proxy.CustomHTTPProxyFactory(client.NewHTTPClient), logging.NoOp).New(endpoint)
	if err != nil {
		t.Fatalf("lura proxy factory: %v", err)
	}
	return p
}

func TestDeliveryThroughLuraPipeline(t *testing.T) {
	srv, got := testBackend(t, func(int) int { return http.StatusOK })
	p := luraPipeline(t, "json", &config.Backend{
		Host:       []string{srv.URL},
		URLPattern: "/events/{routing_key}/{message_id}",
		Method:     http.MethodPost,
	})
	d := amqp.Delivery{
		Body:          []byte(`{"order":7}`),
		ContentType:   "application/json",
		RoutingKey:    "a/b c",
		Exchange:      "orders",
		MessageId:     "id 1",
		CorrelationId: "corr",
		Redelivered:   true,
		Timestamp:     time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC),
		Headers: amqp.Table{
			"tenant":     "acme",
			"bad name":   "x\r\nX-Injected: 1",
			"attempts":   int32(3),
			"decimal":    amqp.Decimal{Scale: 1, Value: -15},
			"nested":     amqp.Table{"k": "v"},
			"non-ascii":  "héllo",
			"binary":     []byte{0x01, 'a'},
			"null-value": nil,
		},
	}
	resp, err := p(testContext(t), newRequest(plain(&d), true))
	if r := judge(resp, err); !r.ok {
		t.Fatalf("judge: %s", r.reason)
	}
	var s seen
	select {
	case s = <-got:
	default:
		t.Fatal("the backend saw no request")
	}
	if s.method != http.MethodPost {
		t.Errorf("method = %s, want POST", s.method)
	}
	if want := "/events/a%2Fb%20c/id%201"; s.path != want {
		t.Errorf("path = %q, want %q", s.path, want)
	}
	if s.body != `{"order":7}` {
		t.Errorf("body = %q", s.body)
	}
	for name, want := range map[string]string{
		"Content-Type":               "application/json",
		"Content-Length":             "11",
		HeaderRoutingKey:             "a/b c",
		HeaderExchange:               "orders",
		HeaderMessageID:              "id 1",
		HeaderCorrelationID:          "corr",
		HeaderRedelivered:            "true",
		HeaderTimestamp:              "2024-01-01T00:00:00Z",
		"X-Amqp-Header-Tenant":       "acme",
		"X-Amqp-Header-Bad-Name":     "x  X-Injected: 1",
		"X-Amqp-Header-Attempts":     "3",
		"X-Amqp-Header-Decimal":      "-1.5",
		"X-Amqp-Header-Nested":       `{"k":"v"}`,
		"X-Amqp-Header-Non-Ascii":    "héllo",
		"X-Amqp-Header-Binary":       "a", // "\x01a" cleaned to " a", trimmed on the wire
		"X-Amqp-Header-Null-Value":   "",
		"X-Injected":                 "",
		"X-Amqp-Header-Missing-Name": "",
	} {
		if g := s.header.Get(name); g != want {
			t.Errorf("backend saw %s = %q, want %q", name, g, want)
		}
	}
}

func TestPathParamsCannotClimbThePath(t *testing.T) {
	for in, want := range map[string]string{".": "%2E", "..": "%2E%2E", "...": "...", "a..b": "a..b", "../x": "..%2Fx"} {
		req := newRequest(plain(&amqp.Delivery{MessageId: in}), true)
		if got := req.Params["Message_id"]; got != want {
			t.Errorf("message id %q: param %q, want %q", in, got, want)
		}
	}
}

func TestParamsOnlyWhenAPatternUsesThem(t *testing.T) {
	d := &amqp.Delivery{RoutingKey: "k", MessageId: "m"}
	if r := newRequest(plain(d), false); r.Params != nil {
		t.Errorf("params without placeholders: %v", r.Params)
	}
	if r := newRequest(plain(d), true); r.Params["Routing_key"] != "k" || r.Params["Message_id"] != "m" {
		t.Errorf("params: %v", r.Params)
	}
	for pattern, want := range map[string]bool{"/events": false, "/e/{{.Routing_key}}": true, "/e/{x}": false} {
		if got := UsesParams(pattern); got != want {
			t.Errorf("UsesParams(%q) = %t, want %t", pattern, got, want)
		}
	}
}

// plain reads a delivery as a message from a publisher: not from a retry
// queue, so none of the driver's own headers is believed.
func plain(d *amqp.Delivery) *message {
	return &message{d: d, exchange: d.Exchange, key: d.RoutingKey, bound: context.Background()}
}

func TestIdempotencyKey(t *testing.T) {
	a := failAgent(driverconfig.Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}, driverconfig.DeadLetter{})
	first := &amqp.Delivery{Exchange: "orders", RoutingKey: "orders.created", Body: []byte(`{"id":1}`)}
	key := idempotencyKey(a.msg(first))
	if !strings.HasPrefix(key, "sha256:") || len(key) != len("sha256:")+64 {
		t.Fatalf("key %q, want sha256: and 64 hex digits", key)
	}
	// The copy back from a retry queue carries the same key.
	c := a.copyOf(a.msg(first), 1, 0, "500")
	back := expiredFrom(&amqp.Delivery{Headers: c.Headers, Body: c.Body}, "work.retry.1s")
	if got := idempotencyKey(a.msg(back)); got != key {
		t.Errorf("retried copy: key %q, want %q", got, key)
	}
	for _, other := range []*amqp.Delivery{
		{Exchange: "orders", RoutingKey: "orders.created", Body: []byte(`{"id":2}`)},
		{Exchange: "orders", RoutingKey: "orders.updated", Body: []byte(`{"id":1}`)},
		{Exchange: "orders.created", RoutingKey: "", Body: []byte(`{"id":1}`)},
	} {
		if got := idempotencyKey(a.msg(other)); got == key {
			t.Errorf("%s/%s %s: same key as another message", other.Exchange, other.RoutingKey, other.Body)
		}
	}
	if got := idempotencyKey(a.msg(&amqp.Delivery{MessageId: "order-1\r\n", Body: []byte("x")})); got != "order-1  " {
		t.Errorf("a message id gives %q, want it cleaned for HTTP", got)
	}
}

// TestDeliveryCountOnlyOnARedelivery: X-Amqp-Delivery-Count carries a
// quorum queue's x-delivery-count when the broker delivers a message
// again, never a count a publisher set on a first delivery, and the
// count of this delivery, not the one kept from the copy's original.
func TestDeliveryCountOnlyOnARedelivery(t *testing.T) {
	a := failAgent(driverconfig.Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: 1}, driverconfig.DeadLetter{})
	retried := expiredFrom(&amqp.Delivery{Redelivered: true, Headers: amqp.Table{
		"x-delivery-count": int64(2), keptPrefix + "x-delivery-count": int64(9), HeaderAttempts: int32(1),
		HeaderOriginalExchange: "orders", HeaderOriginalRoutingKey: "k",
	}}, "work.retry.1s")
	for _, c := range []struct {
		name string
		d    *amqp.Delivery
		want string // "" means absent
	}{
		{"redelivered by a quorum queue", &amqp.Delivery{Redelivered: true, Headers: amqp.Table{"x-delivery-count": int64(3)}}, "3"},
		{"as RabbitMQ 3.x writes it", &amqp.Delivery{Redelivered: true, Headers: amqp.Table{"x-delivery-count": int32(1)}}, "1"},
		{"first delivery, the publisher's header", &amqp.Delivery{Headers: amqp.Table{"x-delivery-count": int64(7)}}, ""},
		{"redelivered, no count (a classic queue)", &amqp.Delivery{Redelivered: true}, ""},
		{"redelivered, not an integer", &amqp.Delivery{Redelivered: true, Headers: amqp.Table{"x-delivery-count": "5"}}, ""},
		{"redelivered, zero or negative", &amqp.Delivery{Redelivered: true, Headers: amqp.Table{"x-delivery-count": int64(-4)}}, ""},
		{"a retry copy delivered again", retried, "2"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, ok := header(newRequest(a.msg(c.d), false), HeaderDeliveryCount)
			if c.want == "" && ok || c.want != "" && got != c.want {
				t.Errorf("%s = %q (present %t), want %q", HeaderDeliveryCount, got, ok, c.want)
			}
		})
	}
}
