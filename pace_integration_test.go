//go:build integration

package asyncamqp_test

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/time/rate"

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

// A 429 with Retry-After: 3 on one message: its next attempt comes no
// sooner than 3 s later, through the retry queue that is at least that
// long, and the other messages are not held behind it.
func TestRetryAfterIsHonouredWithoutDelayingOthers(t *testing.T) {
	f := newFixture(t)
	var first atomic.Bool
	be := newBackend(t, nil)
	be.respond = func(w http.ResponseWriter, r received) int {
		if r.Header.Get("X-Amqp-Message-Id") == "0" && first.CompareAndSwap(false, true) {
			w.Header().Set("Retry-After", "3")
			return http.StatusTooManyRequests
		}
		return http.StatusOK
	}
	retry := map[string]interface{}{"max_attempts": 3, "delay": "100ms", "max_delay": "5s", "multiplier": 2}
	gw := startAgents(t, agentSpec{Name: "after", Topic: "k", Workers: 4, Backend: be.URL, Encoding: "no-op",
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": retry})})
	gw.waitPing(t, "after")
	const n = 50
	f.pub.PublishN(f.exchange, "k", n, jsonBody)
	brokertest.Eventually(t, 30*time.Second, "51 dispatches", func() bool { return be.count() >= n+1 })
	f.waitEmpty(t)

	got := be.requests()
	var tries []time.Time
	lastOther := time.Time{}
	for _, r := range got {
		if r.Header.Get("X-Amqp-Message-Id") == "0" {
			tries = append(tries, r.At)
		} else if r.At.After(lastOther) {
			lastOther = r.At
		}
	}
	if len(tries) != 2 || len(got) != n+1 {
		t.Fatalf("message 0 dispatched %d times, %d dispatches in all; want 2 and %d", len(tries), len(got), n+1)
	}
	if wait := tries[1].Sub(tries[0]); wait < 3*time.Second {
		t.Errorf("the retry came %s after the 429, sooner than its Retry-After of 3s", wait)
	}
	if !lastOther.Before(tries[1]) {
		t.Errorf("the other messages were held behind the retry: the last one came at %s, the retry at %s", lastOther, tries[1])
	}
	if _, ok := brokertest.Queue(t, f.queue+".retry.3200ms"); !ok {
		t.Errorf("no retry queue %s.retry.3200ms, the one a Retry-After of 3s needs", f.queue)
	}
}

// A backend that takes perSecond requests a second and answers 429 to the
// rest: every message is delivered once, none is dead-lettered, and the
// agent's attempts stay close to what the backend takes. The agent's log
// says when the backend pushes back.
func TestOverloadedBackendIsNotHammered(t *testing.T) {
	f := newFixture(t)
	dead := brokertest.Name(t, "dead")
	brokertest.Cleanup(t, f.conn, dead, "")
	const perSecond, n = 200, 2000
	limiter := rate.NewLimiter(perSecond, perSecond/10)
	var okMu sync.Mutex
	handled := map[string]int{}
	be := newBackend(t, func(_ int, r received) int {
		if !limiter.Allow() {
			return http.StatusTooManyRequests
		}
		okMu.Lock()
		handled[string(r.Body)]++
		okMu.Unlock()
		return http.StatusOK
	})
	retry := map[string]interface{}{"max_attempts": 2, "delay": "100ms", "max_delay": "400ms", "multiplier": 2}
	gw := startAgents(t, agentSpec{Name: "busy", Topic: "k", Workers: 16, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": retry, "prefetch_count": 64,
			"dead_letter": map[string]interface{}{"queue": dead}})})
	gw.waitPing(t, "busy")
	f.pub.PublishN(f.exchange, "k", n, jsonBody)
	brokertest.Eventually(t, 60*time.Second, "every message handled", func() bool {
		okMu.Lock()
		defer okMu.Unlock()
		return len(handled) == n
	})
	f.waitEmpty(t)

	if ready, _ := brokertest.Counts(t, dead); ready != 0 {
		t.Errorf("%d messages dead-lettered by 429s", ready)
	}
	for body, times := range handled {
		if times != 1 {
			t.Errorf("message %s handled %d times", body, times)
		}
	}
	got := be.requests()
	bySecond := map[int]int{}
	for _, r := range got {
		bySecond[int(r.At.Sub(got[0].At)/time.Second)]++
	}
	t.Logf("%d attempts for %d messages (backend takes %d/s); attempts per second: %v", len(got), n, perSecond, bySecond)
	// Without back-pressure the 429s alone outnumber the messages
	// several times over; with it, about one attempt in ten is refused.
	if len(got) > n*3/2 {
		t.Errorf("%d attempts for %d messages: the backend was hammered", len(got), n)
	}
	gw.expectLogs(t, "the backend pushes back (status 429)")
}

// Ordered keys: 50 keys × 200 messages, 16 workers, a backend of random
// latency. Per key, the backend sees the messages in publish order.
func TestOrderingKeyKeepsPublishOrderPerKey(t *testing.T) {
	f := newFixture(t)
	const keys, perKey = 50, 200
	var (
		mu      sync.Mutex
		busy    = map[string]bool{}
		overlap int
	)
	be := newBackend(t, func(_ int, r received) int {
		key := r.Header.Get("X-Amqp-Header-Order")
		mu.Lock()
		if busy[key] {
			overlap++
		}
		busy[key] = true
		mu.Unlock()
		time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
		mu.Lock()
		busy[key] = false
		mu.Unlock()
		return http.StatusOK
	})
	gw := startAgents(t, agentSpec{Name: "ordered", Topic: "k", Workers: 16, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"ordering_key": "header:order", "prefetch_count": 100})})
	gw.waitPing(t, "ordered")
	publishByKey(t, f, keys, perKey)
	brokertest.Eventually(t, 60*time.Second, "every message dispatched", func() bool { return be.count() >= keys*perKey })
	f.waitEmpty(t)

	last := map[string]int{}
	for _, r := range be.requests() {
		seq, _ := strconv.Atoi(r.Header.Get("X-Amqp-Message-Id"))
		key := r.Header.Get("X-Amqp-Header-Order")
		if prev, ok := last[key]; ok && seq < prev {
			t.Errorf("key %s: message %d reached the backend after %d", key, seq, prev)
		}
		last[key] = seq
	}
	if len(last) != keys || be.count() != keys*perKey {
		t.Errorf("%d keys and %d dispatches, want %d and %d", len(last), be.count(), keys, keys*perKey)
	}
	if overlap > 0 {
		t.Errorf("%d dispatches ran beside another of their key", overlap)
	}
}

// publishByKey publishes perKey messages for each of keys keys,
// interleaved, with the key in the "order" header and a message id that
// grows in publish order.
func publishByKey(t *testing.T, f fixture, keys, perKey int) {
	t.Helper()
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	var confs []*amqp.DeferredConfirmation
	for i := range keys * perKey {
		c, err := ch.PublishWithDeferredConfirm(f.exchange, "k", false, false, amqp.Publishing{
			MessageId: strconv.Itoa(i), Headers: amqp.Table{"order": fmt.Sprintf("key-%d", i%keys)}, Body: jsonBody(i),
		})
		if err != nil {
			t.Fatal(err)
		}
		confs = append(confs, c)
	}
	for _, c := range confs {
		if !c.Wait() {
			t.Fatal("a keyed message was not confirmed")
		}
	}
}

// When the channel dies, the messages waiting behind a busy key belong
// to a session whose acks can no longer succeed: they are not dispatched
// by it (that would make each one a certain duplicate), and the next
// session takes them from the broker.
func TestOrderedLinesOfADeadSessionAreNotDispatched(t *testing.T) {
	f := newFixture(t)
	var log dispatchLog
	started, release := make(chan struct{}, 1), make(chan struct{})
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		if r.Header.Get("X-Amqp-Message-Id") == "a-0" && len(log.of("a-0")) == 1 {
			started <- struct{}{}
			<-release // until the connection is cut
		}
		return http.StatusOK
	})
	const agent = "ordered-cut"
	spec := agentSpec{Name: agent, Topic: "k.#", Workers: 4, Backend: be.URL, Timeout: "60s",
		Block: block(f.queue, f.exchange, map[string]interface{}{"ordering_key": "routing_key", "prefetch_count": 20})}
	gw := startRaw(t, withConnection(spec.entry(), 10, "linear"))
	gw.waitPing(t, agent)
	const behind = 6
	for i := range behind + 1 {
		f.pub.Publish(f.exchange, "k.a", amqp.Publishing{MessageId: fmt.Sprint("a-", i), Body: []byte(`{}`)})
	}
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the first message of the key never reached the backend")
	}
	// Every message of the key is delivered and waits behind a-0.
	brokertest.Eventually(t, 10*time.Second, "the key's messages delivered", func() bool {
		_, unacked := brokertest.Counts(t, f.queue)
		return unacked == behind+1
	})
	n := brokertest.CloseConnections(t, "krakend-amqp "+agent+"@")
	close(release)
	if n != 2 {
		t.Fatalf("closed %d connections, want the agent's two", n)
	}
	brokertest.Eventually(t, 30*time.Second, "every message dispatched", func() bool {
		for i := 1; i <= behind; i++ {
			if len(log.of(fmt.Sprint("a-", i))) == 0 {
				return false
			}
		}
		return true
	})
	f.waitEmpty(t)
	for i := 1; i <= behind; i++ {
		if n := len(log.of(fmt.Sprint("a-", i))); n != 1 {
			t.Errorf("a-%d dispatched %d times, want once: its dead session must not send it", i, n)
		}
	}
	if n := len(log.of("a-0")); n > 2 {
		t.Errorf("a-0 dispatched %d times, want at most twice (in flight at the cut)", n)
	}
}
