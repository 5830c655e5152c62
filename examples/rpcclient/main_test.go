package main

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func reply(status int64, failure string) *amqp.Delivery {
	h := amqp.Table{"x-krakend-status": status}
	if failure != "" {
		h["x-krakend-error"] = failure
	}
	return &amqp.Delivery{Headers: h, ContentType: "application/json", Body: []byte(`{"ok":true}`)}
}

func TestSummary(t *testing.T) {
	calls := []call{
		{took: 3 * time.Millisecond, reply: reply(200, "")},
		{took: 1 * time.Millisecond, reply: reply(200, "")},
		{took: 9 * time.Millisecond, reply: reply(502, "the backend pipeline failed")},
		{},
	}
	got := summary(calls)
	want := "3 replies to 4 requests (status 1×502, 2×200); round trip p50 3ms p99 9ms max 9ms"
	if got != want {
		t.Errorf("summary\n got %q\nwant %q", got, want)
	}
	if got := summary([]call{{}}); got != "0 replies to 1 requests" {
		t.Errorf("no replies: %q", got)
	}
}

func TestVerdict(t *testing.T) {
	ok := []call{{reply: reply(200, "")}}
	if err := verdict(ok, 1); err != nil {
		t.Errorf("a reply for each request failed: %v", err)
	}
	if err := verdict([]call{{reply: reply(200, "")}, {}}, 1); err == nil || !strings.Contains(err.Error(), "1 of 2 requests got no reply") {
		t.Errorf("a missing reply: %v", err)
	}
	if err := verdict([]call{{reply: reply(504, "the backend did not answer in time")}}, 1); err == nil ||
		!strings.Contains(err.Error(), "error reply") {
		t.Errorf("an error reply: %v", err)
	}
}

func TestPrintReply(t *testing.T) {
	var b bytes.Buffer
	printReply(&b, call{took: time.Millisecond, reply: reply(201, "")})
	for _, want := range []string{"status 201 in 1ms", "x-krakend-status: 201", "content-type: application/json", `{"ok":true}`} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	printReply(&b, call{})
	if b.String() != "no reply\n" {
		t.Errorf("no reply: %q", b.String())
	}
}

func TestParseFlags(t *testing.T) {
	o, err := parseFlags([]string{"-n", "5", "-key", "a.b"}, io.Discard)
	if err != nil || o.n != 5 || o.key != "a.b" || o.exchange != "rpc" {
		t.Errorf("options %+v, %v", o, err)
	}
	if _, err := parseFlags([]string{"-n", "0"}, io.Discard); err == nil {
		t.Error("-n 0 accepted")
	}
}

// TestCollect: replies are filed under their request by correlation id;
// a stranger's and a second reply are ignored.
func TestCollect(t *testing.T) {
	calls := make([]call, 2)
	replies := make(chan amqp.Delivery, 4)
	replies <- amqp.Delivery{CorrelationId: "1", Body: []byte("b")}
	replies <- amqp.Delivery{CorrelationId: "x"}
	replies <- amqp.Delivery{CorrelationId: "1", Body: []byte("again")}
	replies <- amqp.Delivery{CorrelationId: "0", Body: []byte("a")}
	if got := collect(t.Context(), replies, calls, time.Second); got != 2 {
		t.Fatalf("collected %d", got)
	}
	if string(calls[0].reply.Body) != "a" || string(calls[1].reply.Body) != "b" {
		t.Errorf("replies filed wrongly: %q, %q", calls[0].reply.Body, calls[1].reply.Body)
	}
}
