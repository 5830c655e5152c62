//go:build integration

package asyncamqp_test

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// fixture is one test's queue, exchange, broker connection and publisher.
type fixture struct {
	conn            *amqp.Connection
	queue, exchange string
	pub             *brokertest.Publisher
}

func newFixture(t *testing.T) fixture {
	conn := brokertest.Dial(t)
	f := fixture{conn: conn, queue: brokertest.Name(t, "q"), exchange: brokertest.Name(t, "x")}
	brokertest.Cleanup(t, conn, f.queue, f.exchange)
	f.pub = brokertest.NewPublisher(t, conn)
	return f
}

func jsonBody(i int) []byte { return []byte(fmt.Sprintf(`{"n":%d}`, i)) }

// waitEmpty waits until the work queue and its retry queues hold nothing,
// ready or unacked.
func (f fixture) waitEmpty(t *testing.T) {
	t.Helper()
	brokertest.Eventually(t, 30*time.Second, "empty queues with nothing unacked", func() bool {
		return brokertest.Pending(t, f.queue) == 0
	})
}

// ids returns the message ids the backend saw, in arrival order.
func ids(reqs []received) []string {
	out := make([]string, 0, len(reqs))
	for _, r := range reqs {
		out = append(out, r.Header.Get("X-Amqp-Message-Id"))
	}
	return out
}

func TestAcksOn2xxAndEmptiesQueue(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "acks", Topic: "orders.*", Workers: 4, Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "acks")

	f.pub.PublishN(f.exchange, "orders.created", 200, jsonBody)

	brokertest.Eventually(t, 20*time.Second, "200 requests", func() bool { return be.count() >= 200 })
	f.waitEmpty(t)
	if n := be.count(); n != 200 {
		t.Errorf("backend got %d requests, want 200", n)
	}
}

func TestTopologyFlagsAsConfigured(t *testing.T) {
	cases := []struct {
		name  string
		flags map[string]interface{}
		want  brokertest.QueueInfo
	}{
		{"durable", map[string]interface{}{"durable": true}, brokertest.QueueInfo{Durable: true}},
		{"transient", map[string]interface{}{"durable": false}, brokertest.QueueInfo{}},
		{"auto-delete", map[string]interface{}{"durable": false, "delete": true}, brokertest.QueueInfo{AutoDelete: true}},
		{"exclusive", map[string]interface{}{"durable": false, "exclusive": true}, brokertest.QueueInfo{Exclusive: true}},
		{"no-wait", map[string]interface{}{"durable": true, "no_wait": true}, brokertest.QueueInfo{Durable: true}},
	}
	denied := brokertest.DeniesTransientQueues(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t)
			be := newBackend(t, nil)
			gw := startAgents(t, agentSpec{Name: c.name, Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, c.flags)})
			if denied && !c.want.Durable && !c.want.Exclusive {
				// RabbitMQ 4.3's rule: such a queue is refused, and the
				// agent says what to change.
				brokertest.Eventually(t, 30*time.Second, "the refusal in the log", func() bool {
					return len(gw.lines(c.name, "denies its deprecated feature transient_nonexcl_queues")) > 0
				})
				gw.expectLogs(t, "ERROR", "neither durable nor exclusive", `set "durable": true`)
				return
			}
			gw.waitPing(t, c.name)

			q, ok := brokertest.Queue(t, f.queue)
			if !ok {
				t.Fatalf("queue %q was not declared", f.queue)
			}
			if q.Durable != c.want.Durable || q.AutoDelete != c.want.AutoDelete || q.Exclusive != c.want.Exclusive {
				t.Errorf("queue flags: got durable=%t auto_delete=%t exclusive=%t, want %+v", q.Durable, q.AutoDelete, q.Exclusive, c.want)
			}
			kind, durable, autoDelete, internal, ok := brokertest.Exchange(t, f.exchange)
			if !ok || kind != "topic" || durable != c.want.Durable || autoDelete != c.want.AutoDelete || internal {
				t.Errorf("exchange: got found=%t type=%s durable=%t auto_delete=%t internal=%t", ok, kind, durable, autoDelete, internal)
			}
			// Every variant must still work end to end, and the exchange
			// must accept client publishes (never internal).
			f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "1", Body: []byte(`{}`)})
			brokertest.Eventually(t, 10*time.Second, "the message at the backend", func() bool { return be.count() == 1 })
		})
	}
}

func TestAutoDeleteQueueGoesWithItsConsumer(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	// Durable, so that RabbitMQ 4.3 allows it: auto-delete is the point.
	gw := startAgents(t, agentSpec{Name: "ad", Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"durable": true, "delete": true})})
	gw.waitPing(t, "ad")
	gw.stop(t)
	brokertest.Eventually(t, 10*time.Second, "the auto-delete queue to go", func() bool {
		_, ok := brokertest.Queue(t, f.queue)
		return !ok
	})
}

func TestExclusiveQueueRefusesASecondConsumer(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "excl", Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"durable": false, "exclusive": true})})
	gw.waitPing(t, "excl")

	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if _, err := ch.Consume(f.queue, "", false, false, false, false, nil); err == nil {
		t.Fatal("a second connection could consume from the exclusive queue")
	}
}

func TestExclusiveDoesNotMakeTheExchangeInternal(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "pub", Topic: "a.#", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"durable": false, "exclusive": true})})
	gw.waitPing(t, "pub")
	if _, _, _, internal, _ := brokertest.Exchange(t, f.exchange); internal {
		t.Fatal("exchange declared internal: clients cannot publish to it")
	}
	f.pub.Publish(f.exchange, "a.b", amqp.Publishing{MessageId: "x", Body: []byte(`{}`)})
	brokertest.Eventually(t, 10*time.Second, "the message at the backend", func() bool { return be.count() == 1 })
}

func TestTopicWildcardsRoute(t *testing.T) {
	f := newFixture(t)
	star, hash := newBackend(t, nil), newBackend(t, nil)
	q2 := brokertest.Name(t, "q2")
	brokertest.Cleanup(t, f.conn, q2, "")
	gw := startAgents(t,
		agentSpec{Name: "star", Topic: "orders.*", Workers: 1, Backend: star.URL, Block: block(f.queue, f.exchange, nil)},
		agentSpec{Name: "hash", Topic: "payments.#", Workers: 1, Backend: hash.URL, Block: block(q2, f.exchange, nil)},
	)
	gw.waitPing(t, "star")
	gw.waitPing(t, "hash")

	for i, key := range []string{"orders.created", "orders.eu.created", "payments", "payments.card", "payments.card.eu", "other.x"} {
		f.pub.Publish(f.exchange, key, amqp.Publishing{MessageId: strconv.Itoa(i), Body: []byte(`{}`)})
	}
	brokertest.Eventually(t, 10*time.Second, "routed messages", func() bool { return star.count() == 1 && hash.count() == 3 })
	keys := func(b *backend) []string {
		var out []string
		for _, r := range b.requests() {
			out = append(out, r.Header.Get("X-Amqp-Routing-Key"))
		}
		slices.Sort(out)
		return out
	}
	if got := keys(star); !slices.Equal(got, []string{"orders.created"}) {
		t.Errorf("orders.* got %v", got)
	}
	if got := keys(hash); !slices.Equal(got, []string{"payments", "payments.card", "payments.card.eu"}) {
		t.Errorf("payments.# got %v", got)
	}
}

func TestBodyAndMetadataReachTheBackend(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "meta", Topic: "orders.*", Workers: 1, Backend: be.URL,
		Pattern: "/orders/{routing_key}/{message_id}", Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "meta")

	body := []byte(`{"order":42,"note":"ünïcode"}`)
	ts := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	f.pub.Publish(f.exchange, "orders.created", amqp.Publishing{
		ContentType: "application/json", MessageId: "m-1", CorrelationId: "c-9", Type: "order.created",
		AppId: "shop", ReplyTo: "replies", Timestamp: ts, Body: body,
		Headers: amqp.Table{"tenant": "acme", "attempt": int32(3), "bad\nname": "line1\r\nline2"},
	})
	brokertest.Eventually(t, 10*time.Second, "one request", func() bool { return be.count() == 1 })
	r := be.requests()[0]
	if r.Method != http.MethodPost || r.Path != "/orders/orders.created/m-1" {
		t.Errorf("got %s %s, want POST /orders/orders.created/m-1", r.Method, r.Path)
	}
	if string(r.Body) != string(body) {
		t.Errorf("body: got %q, want %q", r.Body, body)
	}
	want := map[string]string{
		"Content-Type":           "application/json",
		"Content-Length":         strconv.Itoa(len(body)),
		"X-Amqp-Routing-Key":     "orders.created",
		"X-Amqp-Exchange":        f.exchange,
		"X-Amqp-Message-Id":      "m-1",
		"X-Amqp-Correlation-Id":  "c-9",
		"X-Amqp-Redelivered":     "false",
		"X-Amqp-Type":            "order.created",
		"X-Amqp-App-Id":          "shop",
		"X-Amqp-Reply-To":        "replies",
		"X-Amqp-Timestamp":       "2026-01-02T03:04:05Z",
		"X-Amqp-Header-Tenant":   "acme",
		"X-Amqp-Header-Attempt":  "3",
		"X-Amqp-Header-Bad-Name": "line1  line2",
	}
	for k, v := range want {
		if got := r.Header.Get(k); got != v {
			t.Errorf("header %s: got %q, want %q", k, got, v)
		}
	}
	f.waitEmpty(t)
}

func TestFailingBackendIsRetriedUntilItSucceeds(t *testing.T) {
	f := newFixture(t)
	var calls atomic.Int64
	// Fails the first two requests of every message, then succeeds.
	perMessage := map[string]int{}
	be := newBackend(t, func(_ int, r received) int {
		calls.Add(1)
		id := r.Header.Get("X-Amqp-Message-Id")
		perMessage[id]++
		if perMessage[id] <= 2 {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	// The deprecated placement, retry in async/amqp, still works.
	gw := startAgents(t, agentSpec{Name: "retry", Topic: "k", Workers: 1, Backend: be.URL, OldPlacement: true,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(5)})})
	gw.waitPing(t, "retry")
	gw.expectLogs(t, "extra_config.async/amqp: retry: deprecated placement, still read")
	f.pub.PublishN(f.exchange, "k", 20, jsonBody)
	brokertest.Eventually(t, 30*time.Second, "60 calls", func() bool { return calls.Load() >= 60 })
	f.waitEmpty(t)

	if calls.Load() != 60 {
		t.Errorf("got %d calls, want 60 (20 messages, 3 attempts each)", calls.Load())
	}
	attempts := map[string][]string{}
	for _, r := range be.requests() {
		id := r.Header.Get("X-Amqp-Message-Id")
		attempts[id] = append(attempts[id], r.Header.Get("X-Amqp-Attempt"))
		if got := r.Header.Get("X-Amqp-Routing-Key"); got != "k" {
			t.Errorf("message %s: routing key %q after a retry, want the original \"k\"", id, got)
		}
		if got := r.Header.Get("X-Amqp-Exchange"); got != f.exchange {
			t.Errorf("message %s: exchange %q after a retry, want the original", id, got)
		}
	}
	for id, got := range attempts {
		if !slices.Equal(got, []string{"1", "2", "3"}) {
			t.Errorf("message %s: attempts %v, want [1 2 3]", id, got)
		}
	}
}

// fastRetry is a retry block with short delays, for tests.
func fastRetry(attempts int) map[string]interface{} {
	return map[string]interface{}{"max_attempts": attempts, "delay": "50ms", "max_delay": "200ms", "multiplier": 2}
}

func TestMultiBackendPartialFailureIsNotAcked(t *testing.T) {
	f := newFixture(t)
	good := newBackend(t, nil)
	var fails atomic.Int64
	flaky := newBackend(t, func(n int, _ received) int {
		if n == 1 {
			fails.Add(1)
			return http.StatusBadGateway
		}
		return http.StatusOK
	})
	spec := agentSpec{Name: "multi", Topic: "k", Workers: 1, Backend: good.URL, Block: block(f.queue, f.exchange, nil)}
	entry := spec.entry()
	entry["backend"] = append(entry["backend"].([]interface{}), map[string]interface{}{
		"host": []string{flaky.URL}, "url_pattern": "/other", "method": "POST",
	})
	gw := startRaw(t, entry)
	gw.waitPing(t, "multi")
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "only", Body: []byte(`{}`)})
	f.waitEmpty(t)
	if good.count() != 2 || flaky.count() != 2 || fails.Load() != 1 {
		t.Errorf("want the message dispatched twice to both backends after one partial failure, got good=%d flaky=%d", good.count(), flaky.count())
	}
}

func TestNoOpEncodingReadsTheStatus(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, func(n int, _ received) int {
		if n == 1 {
			return http.StatusServiceUnavailable // Lura's no-op encoding returns this without an error
		}
		return http.StatusNoContent
	})
	gw := startAgents(t, agentSpec{Name: "noop", Topic: "k", Workers: 1, Encoding: "no-op", Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "noop")
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "a", Body: []byte(`x`)})
	f.waitEmpty(t)
	if be.count() != 2 {
		t.Errorf("a 503 under no-op encoding must requeue and a 204 ack: got %d requests, want 2", be.count())
	}
}

func TestNackDiscardDropsFailures(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, func(int, received) int { return http.StatusInternalServerError })
	gw := startAgents(t, agentSpec{Name: "discard", Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"nack_discard": true})})
	gw.waitPing(t, "discard")
	f.pub.PublishN(f.exchange, "k", 5, jsonBody)
	f.waitEmpty(t)
	if be.count() != 5 {
		t.Errorf("nack_discard: got %d requests, want 5 (no redelivery)", be.count())
	}
}

func TestAutoAckDoesNotRequeueFailures(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, func(int, received) int { return http.StatusInternalServerError })
	gw := startAgents(t, agentSpec{Name: "autoack", Topic: "k", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"auto_ack": true})})
	gw.waitPing(t, "autoack")
	f.pub.PublishN(f.exchange, "k", 10, jsonBody)
	brokertest.Eventually(t, 10*time.Second, "10 requests", func() bool { return be.count() >= 10 })
	f.waitEmpty(t)
	gw.stop(t)
	if be.count() != 10 {
		t.Errorf("auto_ack: got %d requests, want 10 (failures are not requeued)", be.count())
	}
}

func TestUnackedNeverExceedsPrefetch(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	be.delay = 50 * time.Millisecond // long enough for several rabbitmqctl probes on a loaded machine
	gw := startAgents(t, agentSpec{Name: "qos", Topic: "k", Workers: 16, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"prefetch_count": 3})})
	gw.waitPing(t, "qos")
	f.pub.PublishN(f.exchange, "k", 150, jsonBody)
	maxUnacked := 0
	for be.count() < 150 {
		_, unacked := brokertest.Counts(t, f.queue)
		maxUnacked = max(maxUnacked, unacked)
		if in := int(be.maxIn.Load()); in > 3 {
			t.Fatalf("%d concurrent dispatches with prefetch_count 3", in)
		}
	}
	if maxUnacked > 3 {
		t.Errorf("saw %d unacked messages with prefetch_count 3", maxUnacked)
	}
	if maxUnacked == 0 {
		t.Error("never saw an unacked message: the probe did not observe the consumer")
	}
	f.waitEmpty(t)
}

func TestWorkersDispatchInParallel(t *testing.T) {
	f := newFixture(t)
	release := make(chan struct{})
	be := newBackend(t, nil)
	be.Config.Handler = gate(be, release)
	gw := startAgents(t, agentSpec{Name: "par", Topic: "k", Workers: 8, Timeout: "20s", Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"prefetch_count": 50})})
	gw.waitPing(t, "par")
	f.pub.PublishN(f.exchange, "k", 40, jsonBody)
	// All 8 workers must be inside the backend at once; none may exceed 8.
	brokertest.Eventually(t, 20*time.Second, "8 dispatches in flight", func() bool { return be.inFlight.Load() == 8 })
	close(release)
	f.waitEmpty(t)
	if got := be.maxIn.Load(); got != 8 {
		t.Errorf("max concurrent dispatches: got %d, want 8", got)
	}
}

// gate holds every request until release is closed.
func gate(b *backend, release <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.inFlight.Add(1)
		n := b.inFlight.Load()
		for m := b.maxIn.Load(); n > m && !b.maxIn.CompareAndSwap(m, n); m = b.maxIn.Load() {
		}
		<-release
		b.inFlight.Add(-1)
		b.mu.Lock()
		b.got = append(b.got, received{Header: r.Header.Clone()})
		b.mu.Unlock()
		_, _ = w.Write([]byte(`{}`))
	})
}

func TestExchangeOfAnotherTypeIsReported(t *testing.T) {
	f := newFixture(t)
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(f.exchange, "direct", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	ch.Close()
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "wrongtype", Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	brokertest.Eventually(t, 15*time.Second, "the error in the log", func() bool {
		return strings.Contains(gw.logs.String(), "already exists with other settings")
	})
	gw.expectLogs(t, "[AMQP][wrongtype]", f.exchange, "type topic", "'direct'", "retry 1")
}

func TestFiveThousandMessagesZeroDuplicates(t *testing.T) {
	f := newFixture(t)
	// Pre-load the queue before the agent starts: a start-up probe that
	// consumed and dropped its channel would show here as duplicates.
	ch, _ := f.conn.Channel()
	if err := ch.ExchangeDeclare(f.exchange, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(f.queue, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(f.queue, "bulk.#", f.exchange, false, nil); err != nil {
		t.Fatal(err)
	}
	ch.Close()
	const n = 5000
	f.pub.PublishN(f.exchange, "bulk.load", n, jsonBody)

	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "bulk", Topic: "bulk.#", Workers: 16, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"prefetch_count": 100})})
	gw.waitPing(t, "bulk")
	brokertest.Eventually(t, 2*time.Minute, "5000 requests", func() bool { return be.count() >= n })
	f.waitEmpty(t)
	seen := map[string]int{}
	for _, id := range ids(be.requests()) {
		seen[id]++
	}
	dups := be.count() - len(seen)
	if len(seen) != n || dups != 0 {
		t.Errorf("got %d distinct messages and %d duplicates, want %d and 0", len(seen), dups, n)
	}
}

func TestCancelMidFlightLosesNothing(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	be.delay = 5 * time.Millisecond
	gw := startAgents(t, agentSpec{Name: "stop", Topic: "k", Workers: 4, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"prefetch_count": 20})})
	gw.waitPing(t, "stop")
	const n = 1000
	f.pub.PublishN(f.exchange, "k", n, jsonBody)
	brokertest.Eventually(t, 30*time.Second, "processing under way", func() bool { return be.count() >= 100 })
	gw.stop(t)

	_, unacked := brokertest.Counts(t, f.queue)
	if unacked != 0 {
		t.Errorf("%d messages still unacked after the agent stopped", unacked)
	}
	handled := map[string]bool{}
	for _, id := range ids(be.requests()) {
		handled[id] = true
	}
	left := brokertest.Drain(t, f.conn, f.queue)
	for _, id := range left {
		handled[id] = true
	}
	if len(handled) != n {
		t.Errorf("lost %d of %d messages: backend saw %d, queue kept %d", n-len(handled), n, be.count(), len(left))
	}
	if be.count() >= n {
		t.Errorf("the agent did not stop mid-flight (backend saw %d)", be.count())
	}
	if !strings.Contains(gw.logs.String(), "stopped") {
		t.Error("no 'stopped' line in the log")
	}
}

func TestConsumerTagAndConnectionNameAreVisible(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "visible", Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "visible")
	// One CI run on a busy shared broker listed no row for the queue
	// although the agent consumed it: the row is looked for a few times.
	var tag string
	for try := 0; try < 20 && tag == ""; try++ {
		if try > 0 {
			time.Sleep(250 * time.Millisecond)
		}
		for _, row := range brokertest.Rabbitmqctl(t, "list_consumers", "--no-table-headers", "queue_name", "consumer_tag") {
			if len(row) == 2 && row[0] == f.queue {
				tag = row[1]
			}
		}
	}
	if !strings.HasPrefix(tag, "krakend-amqp.visible.") {
		t.Errorf("consumer tag %q does not name the agent", tag)
	}
	found := false
	for _, row := range brokertest.Rabbitmqctl(t, "list_connections", "--no-table-headers", "client_properties") {
		if strings.Contains(strings.Join(row, " "), "krakend-amqp visible@") {
			found = true
		}
	}
	if !found {
		t.Error("no connection named after the agent in list_connections client_properties")
	}
}

// The agent pings at every health_interval (1s in the harness) while it
// consumes: over a 5 s window about 5 pings, with generous bounds for a
// busy machine, neither a flood nor silence.
func TestHealthPingsEveryInterval(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "health", Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "health")
	const window = 5 * time.Second
	pings, end := 0, time.After(window)
	for counting := true; counting; {
		select {
		case name := <-gw.ping:
			if name == "health" {
				pings++
			}
		case <-end:
			counting = false
		}
	}
	if pings < 2 || pings > 8 {
		t.Errorf("%d pings in %s with health_interval 1s, want about 5 (2 to 8)", pings, window)
	}
}

func TestMaxRateBoundsThroughput(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	var first, last atomic.Int64
	inner := be.status
	be.status = func(n int, r received) int {
		now := time.Now().UnixNano()
		first.CompareAndSwap(0, now)
		last.Store(now)
		return inner(n, r)
	}
	gw := startAgents(t, agentSpec{Name: "rate", Topic: "k", Workers: 8, MaxRate: 10, Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "rate")
	f.pub.PublishN(f.exchange, "k", 31, jsonBody)
	f.waitEmpty(t)
	// 31 messages at 10/s need at least 3 s between the first and the
	// last; a slower machine only makes it longer.
	if span := time.Duration(last.Load() - first.Load()); span < 2700*time.Millisecond {
		t.Errorf("31 messages at max_rate 10 took %s, want at least 3s", span)
	}
}
