package driver

import (
	"reflect"
	"slices"
	"testing"

	"github.com/luraproject/lura/v2/logging"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// hostileHeaders are headers a publisher may set for the broker, or a
// plugin, to act on when the driver publishes a copy.
func hostileHeaders() amqp.Table {
	return amqp.Table{
		"CC":                     []interface{}{"work"},
		"BCC":                    []interface{}{"other"},
		"cc":                     "lower-case too",
		"x-death":                []interface{}{amqp.Table{"count": "not a number"}},
		"x-first-death-queue":    "q",
		"X-Last-Death-Reason":    "rejected",
		"x-delay":                int32(-5000),
		"x-deduplication-header": "k",
		"x-cache-ttl":            int32(1),
		"x-delivery-count":       int64(99),
		"x-received-from":        []interface{}{amqp.Table{"uri": "amqp://elsewhere"}},
		"x-stream-filter-value":  "f",
		"tenant":                 "acme",
	}
}

func TestCopyCarriesNothingTheBrokerActsOn(t *testing.T) {
	a := mustNew(Options{Name: "copier", Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}}, Logger: logging.NoOp})
	d := fullDelivery()
	d.Headers = hostileHeaders()
	c := a.copyOf(a.msg(d), 1, 0, "500")
	if c.UserId != "" || c.Expiration != "" || c.ReplyTo != "" {
		t.Errorf("the copy carries user_id %q, expiration %q, reply_to %q", c.UserId, c.Expiration, c.ReplyTo)
	}
	for k := range hostileHeaders() {
		if k == "tenant" {
			continue
		}
		if _, ok := c.Headers[k]; ok {
			t.Errorf("the copy carries %q, which the broker acts on", k)
		}
		if _, ok := c.Headers[keptPrefix+k]; !ok {
			t.Errorf("the copy does not keep %q as %q", k, keptPrefix+k)
		}
	}
	if c.Headers["tenant"] != "acme" {
		t.Errorf("tenant = %v, want acme", c.Headers["tenant"])
	}
	if err := c.Headers.Validate(); err != nil {
		t.Errorf("the copy's headers cannot be published: %v", err)
	}
}

// A retry comes back as its publisher sent it: the backend sees the same
// headers and properties at every attempt, and nothing of the retry hop.
func TestRetryComesBackAsPublished(t *testing.T) {
	a := mustNew(Options{Name: "copier", Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}}, Logger: logging.NoOp})
	retryQueue := consumer.RetryQueue("work", a.opts.Session.RetryDelays[0])
	d := fullDelivery()
	d.Headers = hostileHeaders()
	first := a.msg(d)
	want := newRequest(first, true)

	c := a.copyOf(first, 1, 0, "500")
	back := expiredFrom(&amqp.Delivery{Headers: c.Headers, Body: c.Body, ContentType: c.ContentType,
		ContentEncoding: c.ContentEncoding, CorrelationId: c.CorrelationId, MessageId: c.MessageId,
		Timestamp: c.Timestamp, Type: c.Type, AppId: c.AppId, DeliveryMode: c.DeliveryMode, Priority: c.Priority}, retryQueue)
	second := a.msg(back)
	if !second.retried || second.attempt() != 2 {
		t.Fatalf("retried %t, attempt %d", second.retried, second.attempt())
	}
	got := newRequest(second, true)
	delete(got.Headers, HeaderAttempt)
	delete(want.Headers, HeaderAttempt)
	delete(got.Headers, HeaderExchange) // the first came through "orders"
	delete(want.Headers, HeaderExchange)
	if !reflect.DeepEqual(sortedValues(got.Headers), sortedValues(want.Headers)) {
		t.Errorf("the backend sees on a retry\n%v\nwant, as on the first attempt,\n%v", got.Headers, want.Headers)
	}
	// A copy of the copy keeps the same: nothing grows, nothing leaks.
	again := a.copyOf(second, 2, 0, "500")
	if !reflect.DeepEqual(withoutDriver(again.Headers, "x-krakend-attempts", "x-krakend-last-error"),
		withoutDriver(c.Headers, "x-krakend-attempts", "x-krakend-last-error")) {
		t.Errorf("second copy headers\n%v\nfirst\n%v", again.Headers, c.Headers)
	}
}

// sortedValues sorts the values of each header: two AMQP headers that
// clean to one name come in the order of a map.
func sortedValues(h map[string][]string) map[string][]string {
	out := make(map[string][]string, len(h))
	for k, v := range h {
		out[k] = slices.Sorted(slices.Values(v))
	}
	return out
}

func withoutDriver(h amqp.Table, names ...string) amqp.Table {
	out := amqp.Table{}
	for k, v := range h {
		out[k] = v
	}
	for _, n := range names {
		delete(out, n)
	}
	return out
}

// A publisher cannot make a delivery pass for a restored one: its own
// x-krakend-kept-* and x-krakend-original-* headers are dropped from the
// copy, and read only on a delivery back from a retry queue.
func TestPublisherCannotForgeKeptHeaders(t *testing.T) {
	a := mustNew(Options{Name: "copier", Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}}, Logger: logging.NoOp})
	d := &amqp.Delivery{Exchange: "orders", RoutingKey: "k", Headers: amqp.Table{
		keptPrefix + "CC": []interface{}{"work"}, HeaderOriginalUserID: "admin", HeaderParked: "forged",
	}}
	m := a.msg(d)
	if m.d.UserId != "" || m.parked != "" {
		t.Errorf("a publisher's message reads as user %q, parked %q", m.d.UserId, m.parked)
	}
	c := a.copyOf(m, 1, 0, "500")
	for _, k := range []string{keptPrefix + "CC", HeaderParked} {
		if _, ok := c.Headers[k]; ok {
			t.Errorf("the copy carries the publisher's %q", k)
		}
	}
	if _, ok := c.Headers[HeaderOriginalUserID]; ok {
		t.Errorf("the copy carries the publisher's %s", HeaderOriginalUserID)
	}
}
