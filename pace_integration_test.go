//go:build integration

package asyncamqp_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// With idempotency_header set, every dispatch of one message carries the
// same key, through its retries: the message_id when it has one, else a
// digest of its origin and body; two messages never share one.
func TestIdempotencyKeyIsStableAcrossRetries(t *testing.T) {
	f := newFixture(t)
	var mu sync.Mutex
	keys := map[string][]string{} // by body
	be := newBackend(t, func(_ int, r received) int {
		mu.Lock()
		defer mu.Unlock()
		body := string(r.Body)
		keys[body] = append(keys[body], r.Header.Get("Idempotency-Key"))
		if len(keys[body]) == 1 {
			return http.StatusServiceUnavailable // every message fails once
		}
		return http.StatusOK
	})
	gw := startAgents(t, agentSpec{Name: "idem", Topic: "k.#", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(3), "idempotency_header": "Idempotency-Key"})})
	gw.waitPing(t, "idem")
	f.pub.Publish(f.exchange, "k.a", amqp.Publishing{Body: []byte(`{"n":1}`)})
	f.pub.Publish(f.exchange, "k.b", amqp.Publishing{Body: []byte(`{"n":2}`)})
	f.pub.Publish(f.exchange, "k.a", amqp.Publishing{MessageId: "order-7", Body: []byte(`{"n":3}`)})
	brokertest.Eventually(t, 20*time.Second, "six dispatches", func() bool { return be.count() >= 6 })
	f.waitEmpty(t)

	mu.Lock()
	defer mu.Unlock()
	seen := map[string]string{}
	for body, ks := range keys {
		if len(ks) != 2 || ks[0] == "" || ks[0] != ks[1] {
			t.Errorf("message %s: keys %q, want the same key on both dispatches", body, ks)
			continue
		}
		if other, ok := seen[ks[0]]; ok {
			t.Errorf("messages %s and %s share the key %q", body, other, ks[0])
		}
		seen[ks[0]] = body
	}
	if got := keys[`{"n":3}`]; len(got) > 0 && got[0] != "order-7" {
		t.Errorf("a message with a message_id: key %q, want order-7", got[0])
	}
	if got := keys[`{"n":1}`]; len(got) > 0 && !strings.HasPrefix(got[0], "sha256:") {
		t.Errorf("a message without a message_id: key %q, want a sha256 digest", got[0])
	}
}
