//go:build integration

package asyncamqp_test

import (
	"net/http"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

const ceStructuredBody = `{"specversion":"1.0","type":"com.example.order.paid","source":"/orders","id":"S-1",` +
	`"subject":"order/2","comexampleext":"x","datacontenttype":"application/json","data":{"order":2}}`

// With cloudevents on, the backend gets a binary event as ce- headers
// (either AMQP prefix), a structured event as it was published, and an
// invalid event as a plain message; a retried event comes back the
// same, with the same idempotency key.
func TestCloudEventsReachTheBackend(t *testing.T) {
	f := newFixture(t)
	var mu sync.Mutex
	byID := map[string][]received{} // by X-Amqp-Message-Id
	be := newBackend(t, func(_ int, r received) int {
		mu.Lock()
		defer mu.Unlock()
		id := r.Header.Get("X-Amqp-Message-Id")
		byID[id] = append(byID[id], r)
		if id == "binary-colon" && len(byID[id]) == 1 {
			return http.StatusInternalServerError // retried once
		}
		return http.StatusOK
	})
	gw := startAgents(t, agentSpec{Name: "ce", Topic: "ce.#", Workers: 2, Backend: be.URL, Encoding: "no-op",
		Block: block(f.queue, f.exchange, map[string]interface{}{"cloudevents": true, "idempotency_header": "Idempotency-Key", "retry": fastRetry(3)})})
	gw.waitPing(t, "ce")

	when := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	binary := func(prefix, id string) amqp.Publishing {
		return amqp.Publishing{MessageId: id, ContentType: "application/json", Body: []byte(`{"order":1}`), Headers: amqp.Table{
			prefix + "specversion": "1.0", prefix + "id": "B-1", prefix + "source": "https://example.com/orders",
			prefix + "type": "com.example.order.created", prefix + "time": when, prefix + "subject": "Grüße",
			prefix + "priority": int32(5), prefix + "urgent": true, "tenant": "acme",
		}}
	}
	f.pub.Publish(f.exchange, "ce.binary", binary("cloudEvents:", "binary-colon"))
	f.pub.Publish(f.exchange, "ce.binary", binary("cloudEvents_", "binary-underscore"))
	f.pub.Publish(f.exchange, "ce.structured", amqp.Publishing{MessageId: "structured",
		ContentType: "application/cloudevents+json; charset=UTF-8", Body: []byte(ceStructuredBody)})
	invalid := binary("cloudEvents:", "invalid")
	delete(invalid.Headers, "cloudEvents:id")
	f.pub.Publish(f.exchange, "ce.invalid", invalid)

	brokertest.Eventually(t, 20*time.Second, "five requests", func() bool { return be.count() >= 5 })
	f.waitEmpty(t)
	mu.Lock()
	defer mu.Unlock()

	want := map[string]string{
		"Ce-Specversion": "1.0", "Ce-Id": "B-1", "Ce-Source": "https://example.com/orders",
		"Ce-Type": "com.example.order.created", "Ce-Time": "2024-05-01T12:00:00Z", "Ce-Subject": "Gr%C3%BC%C3%9Fe",
		"Ce-Priority": "5", "Ce-Urgent": "true", "Content-Type": "application/json",
		"X-Amqp-Header-Tenant": "acme", "Idempotency-Key": "https://example.com/orders B-1",
		"X-Amqp-Header-Cloudevents-Id": "", "X-Amqp-Header-Cloudevents_id": "",
	}
	for _, id := range []string{"binary-colon", "binary-underscore"} {
		reqs := byID[id]
		if id == "binary-colon" && len(reqs) != 2 {
			t.Errorf("%s: %d requests, want 2 (one retry)", id, len(reqs))
		}
		for i, r := range reqs {
			expectHeaders(t, id, i+1, r.Header, want)
			if string(r.Body) != `{"order":1}` {
				t.Errorf("%s: body %q", id, r.Body)
			}
		}
	}
	if reqs := byID["structured"]; len(reqs) == 1 {
		expectHeaders(t, "structured", 1, reqs[0].Header, map[string]string{
			"Content-Type": "application/cloudevents+json; charset=UTF-8", "Idempotency-Key": "/orders S-1", "Ce-Id": ""})
		if string(reqs[0].Body) != ceStructuredBody {
			t.Errorf("structured: body %q, want it as published", reqs[0].Body)
		}
	} else {
		t.Errorf("structured: %d requests, want 1", len(reqs))
	}
	if reqs := byID["invalid"]; len(reqs) == 1 {
		expectHeaders(t, "invalid", 1, reqs[0].Header, map[string]string{"Ce-Source": "", "Content-Type": "application/json",
			"X-Amqp-Header-Cloudevents-Source": "https://example.com/orders", "X-Amqp-Header-Cloudevents-Subject": "Grüße"})
	} else {
		t.Errorf("invalid: %d requests, want 1", len(reqs))
	}
	gw.expectLogs(t, `message "invalid": not a valid CloudEvent, sent as a plain message: no id`)
}

// expectHeaders checks each header; "" wants it absent.
func expectHeaders(t *testing.T, id string, n int, h http.Header, want map[string]string) {
	t.Helper()
	for name, value := range want {
		got, present := h[name]
		switch {
		case value == "" && present:
			t.Errorf("%s, request %d: %s = %q, want none", id, n, name, got)
		case value != "" && (len(got) != 1 || got[0] != value):
			t.Errorf("%s, request %d: %s = %q, want %q", id, n, name, got, value)
		}
	}
}
