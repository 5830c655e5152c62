//go:build integration

package cetest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"
	"github.com/luraproject/lura/v2/async"
	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// receiver is a CloudEvents HTTP receiver: it decodes every request
// with the SDK's HTTP binding and keeps the event, or why it could not.
type receiver struct {
	*httptest.Server
	mu     sync.Mutex
	events map[string]received // by X-Amqp-Message-Id
}

type received struct {
	event *event.Event
	err   error
}

func newReceiver(t *testing.T) *receiver {
	r := &receiver{events: map[string]received{}}
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		e, err := cehttp.NewEventFromHTTPRequest(req)
		if err == nil {
			if verr := e.Validate(); verr != nil {
				err = verr
			}
		}
		r.mu.Lock()
		r.events[req.Header.Get("X-Amqp-Message-Id")] = received{e, err}
		r.mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
	}))
	t.Cleanup(r.Close)
	return r
}

func (r *receiver) get(id string) (received, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	got, ok := r.events[id]
	return got, ok
}

// startAgent runs one agent with cloudevents on, as KrakenD starts it,
// until the test ends.
func startAgent(t *testing.T, backendURL, queue, exchange string) {
	t.Helper()
	doc, _ := json.Marshal(map[string]interface{}{"version": 3, "async_agent": []interface{}{map[string]interface{}{
		"name":       "events",
		"connection": map[string]interface{}{"max_retries": 3, "health_interval": "1s"},
		"consumer":   map[string]interface{}{"topic": "events.*", "workers": 2, "timeout": "2s"},
		"backend":    []interface{}{map[string]interface{}{"host": []string{backendURL}, "url_pattern": "/events", "encoding": "no-op"}},
		"extra_config": map[string]interface{}{
			asyncamqp.Namespace:          map[string]interface{}{"host": brokertest.URL(), "name": queue, "exchange": exchange, "durable": true},
			asyncamqp.ExtensionNamespace: map[string]interface{}{"cloudevents": true},
		},
	}}})
	cfg, err := luraconfig.NewParserWithFileReader(func(string) ([]byte, error) { return doc, nil }).Parse("krakend.json")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ping := make(chan string, 16)
	wait := async.AgentStarter{asyncamqp.StartAgent}.Start(ctx, cfg.AsyncAgents, logging.NoOp, ping, proxy.DefaultFactory(logging.NoOp))
	done := make(chan error, 1)
	go func() { done <- wait() }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("the agent did not stop")
		}
	})
	select {
	case <-ping:
	case <-time.After(20 * time.Second):
		t.Fatal("the agent never pinged")
	}
}

// want is an event as its publisher meant it, in the SDK's terms.
type want struct {
	id, source, typ, subject, dataschema, contentType string
	time                                              time.Time
	extensions                                        map[string]string
	data                                              string
}

var when = time.Date(2024, 5, 1, 12, 30, 15, 0, time.UTC)

// binary is an event in binary mode with every core attribute and an
// extension of each AMQP type, under prefix.
func binary(prefix string) (amqp.Publishing, want) {
	h := amqp.Table{
		prefix + "specversion": "1.0",
		prefix + "id":          "B-" + prefix,
		prefix + "source":      "https://example.com/orders",
		prefix + "type":        "com.example.order.created",
		prefix + "subject":     "Grüße aus Köln, \"100%\"",
		prefix + "dataschema":  "https://example.com/schemas/order.json",
		prefix + "time":        when,
		prefix + "tenant":      "acme",
		prefix + "priority":    int32(-5),
		prefix + "count":       int64(7),
		prefix + "urgent":      true,
		prefix + "blob":        []byte{0, 1, 2, 0xfe, 0xff},
		prefix + "at":          when,
		"tenant_id":            "not an attribute",
	}
	return amqp.Publishing{ContentType: "application/json; charset=utf-8", Headers: h, Body: []byte(`{"order":1}`)}, want{
		id: "B-" + prefix, source: "https://example.com/orders", typ: "com.example.order.created",
		subject: "Grüße aus Köln, \"100%\"", dataschema: "https://example.com/schemas/order.json",
		contentType: "application/json; charset=utf-8", time: when, data: `{"order":1}`,
		extensions: map[string]string{"tenant": "acme", "priority": "-5", "count": "7", "urgent": "true",
			"blob": "AAEC/v8=", "at": "2024-05-01T12:30:15Z"},
	}
}

// A backend that reads CloudEvents with the SDK gets, for each event
// published under the AMQP binding, a valid event with every attribute
// and extension as published.
func TestSDKReadsEveryEvent(t *testing.T) {
	conn := brokertest.Dial(t)
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	brokertest.Cleanup(t, conn, queue, exchange)
	pub := brokertest.NewPublisher(t, conn)
	rcv := newReceiver(t)
	startAgent(t, rcv.URL, queue, exchange)

	wants := map[string]want{}
	send := func(id string, p amqp.Publishing, w want) {
		p.MessageId = id
		pub.Publish(exchange, "events.test", p)
		wants[id] = w
	}
	for _, prefix := range []string{"cloudEvents:", "cloudEvents_"} {
		p, w := binary(prefix)
		send("binary "+prefix, p, w)
	}
	p, w := binary("cloudEvents_")
	p.ContentType = ""
	p.Headers["cloudEvents_datacontenttype"] = "text/plain"
	p.Body = []byte("plain text")
	w.contentType, w.data = "text/plain", "plain text"
	send("binary, datacontenttype in a header", p, w)
	p, w = binary("cloudEvents:")
	p.ContentType, p.Body, w.contentType, w.data = "", nil, "", ""
	send("binary, no data", p, w)
	send("structured", amqp.Publishing{ContentType: "Application/CloudEvents+JSON; charset=UTF-8", Body: []byte(
		`{"specversion":"1.0","id":"S-1","source":"/orders","type":"com.example.order.paid","subject":"order/2",` +
			`"time":"2024-05-01T12:30:15Z","dataschema":"https://example.com/s.json","tenant":"acme","priority":5,"urgent":true,` +
			`"datacontenttype":"application/json","data":{"order":2}}`)}, want{
		id: "S-1", source: "/orders", typ: "com.example.order.paid", subject: "order/2", time: when,
		dataschema: "https://example.com/s.json", contentType: "application/json", data: `{"order":2}`,
		extensions: map[string]string{"tenant": "acme", "priority": "5", "urgent": "true"},
	})
	send("structured, base64 data", amqp.Publishing{ContentType: "application/cloudevents+json", Body: []byte(
		`{"specversion":"1.0","id":"S-2","source":"urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66","type":"t",` +
			`"datacontenttype":"application/octet-stream","data_base64":"AAECAw=="}`)}, want{
		id: "S-2", source: "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66", typ: "t",
		contentType: "application/octet-stream", data: "\x00\x01\x02\x03", extensions: map[string]string{},
	})

	brokertest.Eventually(t, 20*time.Second, fmt.Sprintf("%d events", len(wants)), func() bool {
		for id := range wants {
			if _, ok := rcv.get(id); !ok {
				return false
			}
		}
		return true
	})
	for id, w := range wants {
		got, _ := rcv.get(id)
		if got.err != nil {
			t.Errorf("%s: the SDK cannot read the event: %v", id, got.err)
			continue
		}
		checkEvent(t, id, got.event, w)
	}
}

func checkEvent(t *testing.T, id string, e *event.Event, w want) {
	t.Helper()
	same := func(name, got, want string) {
		if got != want {
			t.Errorf("%s: %s %q, want %q", id, name, got, want)
		}
	}
	same("specversion", e.SpecVersion(), "1.0")
	same("id", e.ID(), w.id)
	same("source", decoded(t, e.Source()), w.source)
	same("type", e.Type(), w.typ)
	same("subject", decoded(t, e.Subject()), w.subject)
	same("dataschema", e.DataSchema(), w.dataschema)
	same("datacontenttype", e.DataContentType(), w.contentType)
	same("data", string(e.Data()), w.data)
	if !e.Time().Equal(w.time) {
		t.Errorf("%s: time %s, want %s", id, e.Time(), w.time)
	}
	got := map[string]string{}
	for name, v := range e.Extensions() {
		got[name] = decoded(t, fmt.Sprint(v))
	}
	if fmt.Sprint(got) != fmt.Sprint(w.extensions) {
		t.Errorf("%s: extensions %v, want %v", id, got, w.extensions)
	}
}

// decoded percent-decodes a value read from a ce- header, as the HTTP
// binding tells a receiver to: the SDK (v2.16.2) hands header values over
// as they are sent.
func decoded(t *testing.T, s string) string {
	t.Helper()
	out, err := url.PathUnescape(s)
	if err != nil {
		t.Errorf("%q does not percent-decode: %v", s, err)
	}
	return out
}
