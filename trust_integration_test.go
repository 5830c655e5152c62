//go:build integration

package asyncamqp_test

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// A publisher that may only write to the agent's exchange sets the
// driver's own headers on its messages: a forged attempt counter (out of
// range, to crash the failure path, or high, to skip the retries), a
// forged origin (to change the routing key the backend sees and where the
// dead letter goes), a forged x-death naming the agent's retry queue, and
// the headers the broker acts on when the driver publishes a copy (CC,
// BCC, a malformed x-death, plugin headers). None of it is believed or
// passed to the broker: the agent survives, every message gets exactly
// its retries, and the backend and the dead letter see the real routing
// key.
func TestHostilePublisherCannotCrashSpoofOrSkipRetries(t *testing.T) {
	f := newFixture(t)
	dlq := brokertest.Name(t, "dlq")
	brokertest.Cleanup(t, f.conn, dlq, "")
	var log dispatchLog
	seen := map[string]bool{}
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		id := r.Header.Get("X-Amqp-Message-Id")
		switch {
		case strings.HasPrefix(id, "always-"):
			return http.StatusInternalServerError
		case !seen[id]: // every other message fails its first dispatch
			seen[id] = true
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	const agent = "hostile"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry":       fastRetry(3),
			"dead_letter": map[string]interface{}{"queue": dlq},
		})})
	gw.waitPing(t, agent)

	retryQueue := f.queue + ".retry.50ms"
	forgedDeath := []interface{}{amqp.Table{"queue": retryQueue, "reason": "expired", "count": int64(1), "exchange": ""}}
	spoof := amqp.Table{
		"x-krakend-original-routing-key": "admin.purge",
		"x-krakend-original-exchange":    "admin",
		"x-death":                        forgedDeath,
	}
	messages := map[string]amqp.Table{
		"negative":      {"x-krakend-attempts": int64(-1)},
		"max-int64":     {"x-krakend-attempts": int64(math.MaxInt64)},
		"min-int64":     {"x-krakend-attempts": int64(math.MinInt64)},
		"int8":          {"x-krakend-attempts": int8(-128)},
		"spoofed":       spoof,
		"always-skip":   {"x-krakend-attempts": int64(2), "x-death": forgedDeath},
		"always-origin": spoof,
		// What the broker acts on when the driver publishes a copy (see
		// copies_integration_test.go for each case on its own).
		"cc":             {"CC": []interface{}{f.queue, retryQueue}},
		"always-bcc":     {"BCC": []interface{}{f.queue}},
		"bad-death":      {"x-death": []interface{}{"not a table"}},
		"always-delayed": {"x-delay": int32(-1), "x-first-death-queue": f.queue, "x-krakend-kept-CC": []interface{}{f.queue}},
	}
	for id, h := range messages {
		f.pub.Publish(f.exchange, "k."+id, amqp.Publishing{MessageId: id, Headers: h, Body: []byte(`{}`)})
	}
	f.pub.Publish(f.exchange, "k.after", amqp.Publishing{MessageId: "after", Body: []byte(`{}`)})
	brokertest.Eventually(t, 30*time.Second, "the always-failing messages dead-lettered", func() bool { return ready(t, dlq) >= 4 })
	f.waitEmpty(t)

	for id := range messages {
		want := []string{"1", "2"}
		if strings.HasPrefix(id, "always-") {
			want = []string{"1", "2", "3"}
		}
		if got := attemptsOf(log.of(id)); !slices.Equal(got, want) {
			t.Errorf("message %q: dispatched with X-Amqp-Attempt %v, want %v", id, got, want)
		}
	}
	for _, r := range be.requests() {
		id := r.Header.Get("X-Amqp-Message-Id")
		if key := r.Header.Get("X-Amqp-Routing-Key"); key != "k."+id {
			t.Errorf("message %q: the backend saw routing key %q, want the real %q", id, key, "k."+id)
		}
		if ex := r.Header.Get("X-Amqp-Exchange"); ex != f.exchange {
			t.Errorf("message %q: the backend saw exchange %q, want %q", id, ex, f.exchange)
		}
	}
	dead := takeAll(t, f.conn, dlq)
	if got := deadIDs(dead); len(got) != 4 {
		t.Fatalf("dead letters %v, want the four always-failing messages", got)
	}
	for _, d := range dead {
		checkDeadLetter(t, d, 3, agent, "500", "k."+d.MessageId)
		if d.Headers["x-krakend-original-exchange"] != f.exchange {
			t.Errorf("dead letter %q: original exchange %v, want %q", d.MessageId, d.Headers["x-krakend-original-exchange"], f.exchange)
		}
	}
	if got := attemptsOf(log.of("after")); !slices.Equal(got, []string{"1", "2"}) {
		t.Errorf("a message after the hostile ones: attempts %v, want [1 2]", got)
	}
	if strings.Contains(gw.logs.String(), "panic") {
		t.Errorf("something panicked:\n%s", gw.logs.String())
	}
	select {
	case err := <-gw.done:
		t.Fatalf("the agent stopped (%v)", err)
	default:
	}
}

// Lura's default status handler turns a 202 or a 204 into a pipeline
// error under the JSON encoding: the backend took the message all the
// same, so it is acked once, never retried.
func TestEvery2xxIsASuccess(t *testing.T) {
	for _, encoding := range []string{"", "no-op"} {
		t.Run("encoding "+encoding, func(t *testing.T) {
			f := newFixture(t)
			var log dispatchLog
			be := newBackend(t, func(_ int, r received) int {
				log.add(r)
				switch r.Header.Get("X-Amqp-Message-Id") {
				case "accepted":
					return http.StatusAccepted
				case "no-content":
					return http.StatusNoContent
				}
				return http.StatusOK
			})
			gw := startAgents(t, agentSpec{Name: "statuses", Topic: "k", Workers: 1, Encoding: encoding, Backend: be.URL,
				Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(3)})})
			gw.waitPing(t, "statuses")
			for _, id := range []string{"accepted", "no-content", "ok"} {
				f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: id, Body: []byte(`{}`)})
			}
			brokertest.Eventually(t, 20*time.Second, "three dispatches", func() bool { return len(log.all()) >= 3 })
			f.waitEmpty(t)
			time.Sleep(300 * time.Millisecond) // longer than the retry delay: a retry would show
			for _, id := range []string{"accepted", "no-content", "ok"} {
				if got := attemptsOf(log.of(id)); !slices.Equal(got, []string{"1"}) {
					t.Errorf("message %q: dispatched with attempts %v, want once", id, got)
				}
			}
		})
	}
}

// With shutdown_timeout shorter than consumer.timeout, the dispatches
// still running at the bound are cancelled before the agent returns: no
// backend call goes on after Run, nothing is retried or acked, and every
// message is back in the queue.
func TestShutdownBoundCancelsDispatchesBeforeReturning(t *testing.T) {
	f := newFixture(t)
	var cancelled, finished atomic.Int64
	be := newBackend(t, nil)
	be.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Reading the body lets the server notice when the client
		// goes away.
		_, _ = io.ReadAll(r.Body)
		be.inFlight.Add(1)
		defer be.inFlight.Add(-1)
		select {
		case <-r.Context().Done():
			cancelled.Add(1)
		case <-time.After(20 * time.Second):
			finished.Add(1)
		}
	})
	gw := startAgents(t, agentSpec{Name: "bounded", Topic: "k", Workers: 2, Timeout: "30s", Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"shutdown_timeout": "300ms", "retry": fastRetry(3)})})
	gw.waitPing(t, "bounded")
	f.pub.PublishN(f.exchange, "k", 5, jsonBody)
	brokertest.Eventually(t, 10*time.Second, "two dispatches in flight", func() bool { return be.inFlight.Load() == 2 })

	start := time.Now()
	gw.stop(t)
	took := time.Since(start)
	// The backend saw both calls end by the time the agent returned.
	brokertest.Eventually(t, time.Second, "the backend to see both calls cancelled", func() bool { return cancelled.Load() == 2 })
	if took > 10*time.Second {
		t.Errorf("the agent took %s to stop with shutdown_timeout 300ms", took.Round(time.Millisecond))
	}
	if n := finished.Load(); n != 0 {
		t.Errorf("%d backend calls ran to their end after the stop", n)
	}
	brokertest.Eventually(t, 10*time.Second, "all five messages back in the queue", func() bool {
		ready, unacked := brokertest.Counts(t, f.queue)
		return ready == 5 && unacked == 0
	})
	if n := ready(t, f.queue+".retry.50ms"); n > 0 {
		t.Errorf("%d cancelled messages went to a retry queue; they should be back in the work queue", n)
	}
	gw.expectLogs(t, "cancelling them")
}

// An operator deletes the agent's retry queue under it: the copies are not
// lost and do not make the backend be called faster than the retry
// policy allows. The driver declares the retry queue again and goes on.
func TestRetryQueueDeletedUnderTheAgent(t *testing.T) {
	f := newFixture(t)
	dlq := brokertest.Name(t, "dlq")
	brokertest.Cleanup(t, f.conn, dlq, "")
	var log dispatchLog
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		return http.StatusInternalServerError
	})
	const delay = 300 * time.Millisecond
	gw := startAgents(t, agentSpec{Name: "deleted", Topic: "k", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry":       map[string]interface{}{"max_attempts": 3, "delay": "300ms", "max_delay": "300ms"},
			"dead_letter": map[string]interface{}{"queue": dlq},
		})})
	gw.waitPing(t, "deleted")
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	retryQueue := f.queue + ".retry.300ms"
	if _, err := ch.QueueDelete(retryQueue, false, false, false); err != nil {
		t.Fatal(err)
	}

	const n = 20
	for i := range n {
		f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: fmt.Sprint("m-", i), Body: jsonBody(i)})
	}
	brokertest.Eventually(t, 30*time.Second, "every message dead-lettered", func() bool { return ready(t, dlq) >= n })
	f.waitEmpty(t)
	if ready(t, retryQueue) < 0 {
		t.Errorf("the retry queue %q was not declared again", retryQueue)
	}
	for i := range n {
		ds := log.of(fmt.Sprint("m-", i))
		if got := attemptsOf(ds); !slices.Equal(got, []string{"1", "2", "3"}) {
			t.Errorf("message m-%d: attempts %v, want [1 2 3]", i, got)
		}
		checkGaps(t, ds, delay)
	}
	t.Logf("%d messages, %d backend calls", n, len(log.all()))
}

// setAlarm raises a broker resource alarm, as a memory or disk shortage
// does: the broker blocks every connection that publishes. It is cleared
// when the test ends.
func setAlarm(t *testing.T) (clear func()) {
	t.Helper()
	brokertest.Rabbitmqctl(t, "eval", "rabbit_alarm:set_alarm({{resource_limit, disk, node()}, []}).")
	var once sync.Once
	clear = func() {
		once.Do(func() { brokertest.Rabbitmqctl(t, "eval", "rabbit_alarm:clear_alarm({resource_limit, disk, node()}).") })
	}
	t.Cleanup(clear)
	return clear
}

// While a broker alarm blocks publishing, the agent's copies wait, but it
// goes on consuming and acking: its acks travel on a connection that never
// publishes. The block is logged and shown in the metrics.
func TestBlockedPublishingDoesNotStallAcks(t *testing.T) {
	f := newFixture(t)
	var log dispatchLog
	var bad atomic.Int64
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		if r.Header.Get("X-Amqp-Message-Id") == "bad" && bad.Add(1) == 1 {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	// Nothing is dispatched before the alarm is up.
	release := make(chan struct{})
	be.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		be.serve(w, r)
	})
	gw := startAgents(t, agentSpec{Name: "blocked", Topic: "k", Workers: 4, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(3)})})
	gw.waitPing(t, "blocked")
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "bad", Body: []byte(`{}`)})
	for i := range 20 {
		f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: fmt.Sprint("good-", i), Body: []byte(`{}`)})
	}

	clear := setAlarm(t)
	close(release)
	brokertest.Eventually(t, 20*time.Second, "the block logged", func() bool {
		return strings.Contains(gw.logs.String(), "the broker blocks publishing")
	})
	// The 20 good messages are acked while the bad one's copy waits.
	brokertest.Eventually(t, 20*time.Second, "only the bad message left", func() bool {
		ready, unacked := brokertest.Counts(t, f.queue)
		return ready == 0 && unacked == 1
	})
	clear()
	brokertest.Eventually(t, 30*time.Second, "the bad message retried once unblocked", func() bool { return len(log.of("bad")) >= 2 })
	f.waitEmpty(t)
	gw.expectLogs(t, "the broker unblocked publishing")
	// A copy whose confirmation did not come while publishing was blocked
	// is tried again, and the first one may land as well: the retry can be
	// dispatched twice, never past its attempt.
	got := attemptsOf(log.of("bad"))
	if len(got) < 2 || len(got) > 3 || got[0] != "1" || slices.ContainsFunc(got[1:], func(a string) bool { return a != "2" }) {
		t.Errorf("the bad message: attempts %v, want 1, then 2 (once, or twice after a blocked copy)", got)
	}
}
