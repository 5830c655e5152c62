//go:build integration

package asyncamqp_test

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// Poison messages, dead letters and bad input: a message that keeps
// failing is retried with growing delays up to its bound and then
// dead-lettered, never lost and never spun; a message the backend refuses
// as bad is dead-lettered at once; odd messages never crash the agent.

// dispatch is one request a backend saw, with the time it arrived.
type dispatch struct {
	id, attempt string
	at          time.Time
}

// dispatchLog records every dispatch; it is safe for concurrent use.
type dispatchLog struct {
	mu   sync.Mutex
	list []dispatch
}

func (l *dispatchLog) add(r received) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.list = append(l.list, dispatch{id: r.Header.Get("X-Amqp-Message-Id"), attempt: r.Header.Get("X-Amqp-Attempt"), at: time.Now()})
}

// of lists the dispatches of one message, in arrival order.
func (l *dispatchLog) of(id string) []dispatch {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []dispatch
	for _, d := range l.list {
		if d.id == id {
			out = append(out, d)
		}
	}
	return out
}

func (l *dispatchLog) all() []dispatch {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.list)
}

func attemptsOf(ds []dispatch) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.attempt
	}
	return out
}

// checkGaps fails the test for each gap between successive dispatches
// shorter than 90% of its lower bound; bounds past the list reuse the
// last one.
func checkGaps(t *testing.T, ds []dispatch, bounds ...time.Duration) {
	t.Helper()
	for i := 1; i < len(ds); i++ {
		bound := bounds[min(i, len(bounds))-1]
		if gap := ds[i].at.Sub(ds[i-1].at); gap < bound*9/10 {
			t.Errorf("attempt %s came %s after attempt %s, want at least %s (retry delay %s)",
				ds[i].attempt, gap.Round(time.Millisecond), ds[i-1].attempt, bound*9/10, bound)
		}
	}
}

func gapsOf(ds []dispatch) []string {
	var out []string
	for i := 1; i < len(ds); i++ {
		out = append(out, ds[i].at.Sub(ds[i-1].at).Round(time.Millisecond).String())
	}
	return out
}

// takeAll gets every ready message off a queue and acks it.
func takeAll(t *testing.T, conn *amqp.Connection, queue string) []amqp.Delivery {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	var out []amqp.Delivery
	for {
		d, ok, err := ch.Get(queue, false)
		if err != nil {
			t.Fatalf("get from %q: %v", queue, err)
		}
		if !ok {
			return out
		}
		_ = d.Ack(false)
		out = append(out, d)
	}
}

// ready is the number of ready messages of a queue, -1 if it does not
// exist.
func ready(t *testing.T, queue string) int {
	q, ok := brokertest.Queue(t, queue)
	if !ok {
		return -1
	}
	return q.Ready
}

// checkDeadLetter compares the headers the driver puts on a dead letter.
func checkDeadLetter(t *testing.T, d amqp.Delivery, attempts int64, agent, reason, key string) {
	t.Helper()
	if got := d.Headers["x-krakend-attempts"]; got != attempts {
		t.Errorf("x-krakend-attempts = %#v, want int64(%d)", got, attempts)
	}
	if got, _ := d.Headers["x-krakend-last-error"].(string); !strings.Contains(got, reason) {
		t.Errorf("x-krakend-last-error = %q, want it to name %q", got, reason)
	}
	if agent != "" && d.Headers["x-krakend-agent"] != agent {
		t.Errorf("x-krakend-agent = %#v, want %q", d.Headers["x-krakend-agent"], agent)
	}
	if got := d.Headers["x-krakend-original-routing-key"]; got != key {
		t.Errorf("x-krakend-original-routing-key = %#v, want %q", got, key)
	}
}

// preload declares the work queue as the driver does and binds it, so
// that messages can wait in it before the agent starts.
func (f fixture) preload(t *testing.T, key string) {
	t.Helper()
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.ExchangeDeclare(f.exchange, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(f.queue, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(f.queue, key, f.exchange, false, nil); err != nil {
		t.Fatal(err)
	}
}

// flow is what one load run measured.
type flow struct {
	good           int
	span           time.Duration // first to last good dispatch
	rate           float64       // good messages per second over span
	duringRetries  int           // good dispatches between the poison's first and last attempt
	retryWindow    time.Duration // that window, cut at the last good dispatch
	rateInRetries  float64
	poisonAttempts []string
}

func TestPoisonMessageIsDeadLetteredAfterTheBound(t *testing.T) {
	const good, rounds = 2000, 2
	// Runs without and with the poison alternate, so that a busy machine
	// weighs on both alike.
	var runs [2][]flow
	for round := 1; round <= rounds; round++ {
		for i, poison := range []bool{false, true} {
			name := fmt.Sprintf("without poison %d", round)
			if poison {
				name = fmt.Sprintf("with poison %d", round)
			}
			t.Run(name, func(t *testing.T) {
				if r := poisonLoad(t, good, poison); !t.Failed() {
					runs[i] = append(runs[i], r)
				}
			})
		}
	}
	rate := func(fs []flow) float64 {
		var n int
		var span time.Duration
		for _, f := range fs {
			n, span = n+f.good-1, span+f.span
		}
		return float64(n) / span.Seconds()
	}
	for i, f := range runs[0] {
		t.Logf("run %d without poison: %d good messages in %s = %.0f msg/s", i+1, f.good, f.span.Round(time.Millisecond), f.rate)
	}
	for i, f := range runs[1] {
		t.Logf("run %d with one poison: %d good messages in %s = %.0f msg/s; between the poison's first and last attempt (%s, attempts %v): %d good = %.0f msg/s",
			i+1, f.good, f.span.Round(time.Millisecond), f.rate, f.retryWindow.Round(time.Millisecond), f.poisonAttempts, f.duringRetries, f.rateInRetries)
	}
	if len(runs[0]) > 0 && len(runs[1]) > 0 {
		t.Logf("good messages: %.0f msg/s without poison, %.0f msg/s with one poison (%.0f%%)",
			rate(runs[0]), rate(runs[1]), 100*rate(runs[1])/rate(runs[0]))
	}
}

// poisonLoad runs good messages, plus one poison message ahead of them
// when poison is set, through one agent, checks every outcome and
// measures the good messages' flow.
func poisonLoad(t *testing.T, good int, poison bool) flow {
	f := newFixture(t)
	dlq := brokertest.Name(t, "dlq")
	brokertest.Cleanup(t, f.conn, dlq, "")
	const key = "poison.created"
	poisonID := "poison"
	if !poison {
		poisonID = "-" // no message has it
	}
	var log dispatchLog
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		if r.Header.Get("X-Amqp-Message-Id") == poisonID {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})

	// Everything is in the queue before the agent starts: the poison
	// first, then the good ones.
	f.preload(t, "poison.#")
	body := []byte(`{"poison":true}`)
	if poison {
		f.pub.Publish(f.exchange, key, amqp.Publishing{MessageId: poisonID, ContentType: "application/json",
			DeliveryMode: amqp.Persistent, CorrelationId: "c-poison", Body: body})
	}
	f.pub.PublishN(f.exchange, key, good, jsonBody)

	const agent = "poisoned"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "poison.#", Workers: 16, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"prefetch_count": 64,
			"retry":          map[string]interface{}{"max_attempts": 4, "delay": "200ms", "multiplier": 2, "max_delay": "1s"},
			"dead_letter":    map[string]interface{}{"queue": dlq},
		})})

	goodSeen := func() int {
		ids := map[string]bool{}
		for _, d := range log.all() {
			if d.id != poisonID {
				ids[d.id] = true
			}
		}
		return len(ids)
	}
	brokertest.Eventually(t, 2*time.Minute, fmt.Sprintf("%d good messages at the backend", good), func() bool { return goodSeen() >= good })
	if poison {
		brokertest.Eventually(t, 30*time.Second, "the poison message in the dead-letter queue", func() bool { return ready(t, dlq) >= 1 })
	}
	f.waitEmpty(t)
	gw.stop(t)

	// Every good message exactly once.
	var first, last time.Time
	count := map[string]int{}
	for _, d := range log.all() {
		if d.id == poisonID {
			continue
		}
		count[d.id]++
		if first.IsZero() || d.at.Before(first) {
			first = d.at
		}
		if d.at.After(last) {
			last = d.at
		}
		if d.attempt != "1" {
			t.Errorf("good message %s dispatched with X-Amqp-Attempt %q", d.id, d.attempt)
		}
	}
	for i := range good {
		if n := count[strconv.Itoa(i)]; n != 1 {
			t.Errorf("good message %d delivered %d times, want once", i, n)
		}
	}
	if len(count) != good {
		t.Errorf("%d distinct good messages, want %d", len(count), good)
	}
	out := flow{good: len(count), span: last.Sub(first)}
	if out.span > 0 {
		out.rate = float64(out.good-1) / out.span.Seconds()
	}

	dead := takeAll(t, f.conn, dlq)
	if !poison {
		if len(dead) != 0 {
			t.Errorf("%d messages dead-lettered without a poison message", len(dead))
		}
		return out
	}

	// The poison: exactly four dispatches, 1..4, with growing gaps.
	p := log.of(poisonID)
	out.poisonAttempts = attemptsOf(p)
	if !slices.Equal(out.poisonAttempts, []string{"1", "2", "3", "4"}) {
		t.Errorf("poison dispatched with X-Amqp-Attempt %v, want [1 2 3 4]", out.poisonAttempts)
	}
	checkGaps(t, p, 200*time.Millisecond, 400*time.Millisecond, 800*time.Millisecond)
	t.Logf("poison attempts %v, gaps %v", out.poisonAttempts, gapsOf(p))

	if len(dead) != 1 {
		t.Fatalf("%d messages in the dead-letter queue, want exactly the poison", len(dead))
	}
	d := dead[0]
	checkDeadLetter(t, d, 4, agent, "500", key)
	if d.Headers["x-krakend-original-exchange"] != f.exchange {
		t.Errorf("x-krakend-original-exchange = %#v, want %q", d.Headers["x-krakend-original-exchange"], f.exchange)
	}
	if d.MessageId != poisonID || d.CorrelationId != "c-poison" || !bytes.Equal(d.Body, body) || d.ContentType != "application/json" {
		t.Errorf("dead letter changed: id %q, correlation id %q, content type %q, body %q", d.MessageId, d.CorrelationId, d.ContentType, d.Body)
	}
	if d.DeliveryMode != amqp.Persistent {
		t.Errorf("dead letter delivery mode %d, want persistent", d.DeliveryMode)
	}

	// The others' flow while the poison was being retried.
	if len(p) >= 2 {
		from, to := p[0].at, p[len(p)-1].at
		if last.Before(to) {
			to = last
		}
		out.retryWindow = to.Sub(from)
		for _, d := range log.all() {
			if d.id != poisonID && !d.at.Before(from) && !d.at.After(to) {
				out.duringRetries++
			}
		}
		if out.retryWindow > 0 {
			out.rateInRetries = float64(out.duringRetries) / out.retryWindow.Seconds()
		}
	}
	return out
}

func TestStatusDeadLettersAtOnce(t *testing.T) {
	for _, encoding := range []string{"no-op", ""} {
		name := encoding
		if name == "" {
			name = "json (default)"
		}
		t.Run(name, func(t *testing.T) {
			f := newFixture(t)
			dlq := brokertest.Name(t, "dlq")
			brokertest.Cleanup(t, f.conn, dlq, "")
			var log dispatchLog
			var flaky atomic.Int64
			be := newBackend(t, func(_ int, r received) int {
				log.add(r)
				switch r.Header.Get("X-Amqp-Message-Id") {
				case "bad":
					return http.StatusUnprocessableEntity
				case "flaky":
					if flaky.Add(1) <= 2 {
						return http.StatusInternalServerError
					}
				}
				return http.StatusOK
			})
			const agent = "statuses"
			gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 2, Encoding: encoding, Backend: be.URL,
				Block: block(f.queue, f.exchange, map[string]interface{}{
					"retry":       fastRetry(5),
					"dead_letter": map[string]interface{}{"queue": dlq, "statuses": []interface{}{422}},
				})})
			gw.waitPing(t, agent)

			for _, id := range []string{"bad", "flaky", "fine"} {
				f.pub.Publish(f.exchange, "k."+id, amqp.Publishing{MessageId: id, Body: []byte(`{"id":"` + id + `"}`)})
			}
			brokertest.Eventually(t, 30*time.Second, "the 422 in the dead-letter queue", func() bool { return ready(t, dlq) >= 1 })
			brokertest.Eventually(t, 30*time.Second, "the 500 retried until it succeeds", func() bool { return len(log.of("flaky")) >= 3 })
			f.waitEmpty(t)

			if got := attemptsOf(log.of("bad")); !slices.Equal(got, []string{"1"}) {
				t.Errorf("the 422 message was dispatched with attempts %v, want only [1]", got)
			}
			if got := attemptsOf(log.of("flaky")); !slices.Equal(got, []string{"1", "2", "3"}) {
				t.Errorf("a 500 under statuses [422] was dispatched with attempts %v, want [1 2 3] (retried)", got)
			}
			if got := attemptsOf(log.of("fine")); !slices.Equal(got, []string{"1"}) {
				t.Errorf("the good message: attempts %v, want [1]", got)
			}
			dead := takeAll(t, f.conn, dlq)
			if len(dead) != 1 || dead[0].MessageId != "bad" {
				t.Fatalf("dead-letter queue holds %d messages (%v), want only the 422 one", len(dead), deadIDs(dead))
			}
			checkDeadLetter(t, dead[0], 1, agent, "422", "k.bad")
			if string(dead[0].Body) != `{"id":"bad"}` {
				t.Errorf("dead letter body %q", dead[0].Body)
			}
		})
	}
}

func deadIDs(ds []amqp.Delivery) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.MessageId)
	}
	return out
}

func TestDeadLetterExchangeUnroutableKeepsTheMessage(t *testing.T) {
	f := newFixture(t)
	dlx, dlxq := brokertest.Name(t, "dlx"), brokertest.Name(t, "dlxq")
	brokertest.Cleanup(t, f.conn, dlxq, dlx)
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.ExchangeDeclare(dlx, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}

	var log dispatchLog
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		return http.StatusInternalServerError
	})
	const agent = "unroutable"
	const pause = 500 * time.Millisecond // the retry delay, also the wait before a held copy is tried again
	gw := startAgents(t, agentSpec{Name: agent, Topic: "orders.*", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry":       map[string]interface{}{"max_attempts": 2, "delay": "500ms", "max_delay": "500ms"},
			"dead_letter": map[string]interface{}{"exchange": dlx},
		})})
	gw.waitPing(t, agent)
	f.pub.Publish(f.exchange, "orders.poison", amqp.Publishing{MessageId: "poison", Body: []byte(`{"x":1}`)})

	// Attempt 1 goes to the retry queue; attempt 2's dead-letter copy
	// cannot be routed, so the message is held: not dispatched again,
	// while the copy is tried again.
	brokertest.Eventually(t, 30*time.Second, "the held dead letter reported", func() bool {
		return len(log.of("poison")) >= 2 && strings.Contains(gw.logs.String(), "messages are held")
	})
	heldSince := time.Now()
	if n := brokertest.Pending(t, f.queue); n < 1 {
		t.Fatalf("the poison message is gone (pending %d) although its dead-letter copy was never routed", n)
	}
	gw.expectLogs(t, "ERROR", "could not be made", "could not route the message", dlx)
	// Long enough for several tries of the copy (500ms, then 500ms).
	brokertest.Eventually(t, 10*time.Second, "several tries", func() bool { return time.Since(heldSince) > 2*pause })
	if got := attemptsOf(log.of("poison")); !slices.Equal(got, []string{"1", "2"}) {
		t.Errorf("attempts %v, want [1 2]: a held message is not dispatched again", got)
	}
	checkGaps(t, log.of("poison"), pause)
	if n := ready(t, dlxq); n != -1 {
		t.Fatalf("queue %q exists before the test declared it", dlxq)
	}

	// Once a queue is bound, the next try lands there.
	if _, err := ch.QueueDeclare(dlxq, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(dlxq, "#", dlx, false, nil); err != nil {
		t.Fatal(err)
	}
	brokertest.Eventually(t, 30*time.Second, "the poison message in the bound queue", func() bool { return ready(t, dlxq) >= 1 })
	f.waitEmpty(t)
	dead := takeAll(t, f.conn, dlxq)
	if len(dead) != 1 || dead[0].MessageId != "poison" {
		t.Fatalf("bound queue holds %v, want the poison message once", deadIDs(dead))
	}
	checkDeadLetter(t, dead[0], 2, agent, "500", "orders.poison")
	if dead[0].RoutingKey != "orders.poison" || dead[0].Exchange != dlx {
		t.Errorf("dead letter published to %q with %q, want %q with the original routing key", dead[0].Exchange, dead[0].RoutingKey, dlx)
	}
}

func TestDeadLetterByBroker(t *testing.T) {
	f := newFixture(t)
	dlx, dlxq := brokertest.Name(t, "dlx"), brokertest.Name(t, "dlxq")
	brokertest.Cleanup(t, f.conn, dlxq, dlx)
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.ExchangeDeclare(dlx, "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(dlxq, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(dlxq, "", dlx, false, nil); err != nil {
		t.Fatal(err)
	}
	// The driver declares the work queue without arguments (a queue
	// declared with x-dead-letter-exchange would conflict): a policy
	// gives it its dead-letter exchange.
	uri, err := amqp.ParseURI(brokertest.URL())
	if err != nil {
		t.Fatal(err)
	}
	policy := brokertest.Name(t, "policy")
	brokertest.Rabbitmqctl(t, "set_policy", "-p", uri.Vhost, "--apply-to", "queues", "--priority", "10",
		policy, "^"+f.queue+"$", `{"dead-letter-exchange":"`+dlx+`"}`)
	t.Cleanup(func() { brokertest.Rabbitmqctl(t, "clear_policy", "-p", uri.Vhost, policy) })

	var log dispatchLog
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		switch r.Header.Get("X-Amqp-Message-Id") {
		case "poison":
			return http.StatusInternalServerError
		case "forged":
			return http.StatusUnprocessableEntity
		}
		return http.StatusOK
	})
	const agent = "broker-dlx"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry":       map[string]interface{}{"max_attempts": 2, "delay": "50ms", "max_delay": "50ms"},
			"dead_letter": map[string]interface{}{"broker": true, "statuses": []int{422}},
		})})
	gw.waitPing(t, agent)
	brokertest.Eventually(t, 10*time.Second, "the policy on the work queue", func() bool {
		for _, row := range brokertest.Rabbitmqctl(t, "list_queues", "-p", uri.Vhost, "--no-table-headers", "name", "policy") {
			if len(row) == 2 && row[0] == f.queue && row[1] == policy {
				return true
			}
		}
		return false
	})

	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "poison", Body: []byte(`{"x":1}`)})
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "fine", Body: []byte(`{"x":2}`)})
	// RabbitMQ loses a message it dead-letters when it cannot read the
	// message's x-death: one its publisher set goes through a retry
	// queue first, without being dispatched again.
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "forged", Body: []byte(`{"x":3}`),
		Headers: amqp.Table{"x-death": []interface{}{"not a table"}}})
	brokertest.Eventually(t, 30*time.Second, "both messages in the broker's dead-letter queue", func() bool { return ready(t, dlxq) >= 2 })
	f.waitEmpty(t)
	if got := attemptsOf(log.of("forged")); !slices.Equal(got, []string{"1"}) {
		t.Errorf("forged dispatched with attempts %v, want [1]", got)
	}
	dead := takeAll(t, f.conn, dlxq)
	if got := deadIDs(dead); len(got) != 2 || !slices.Contains(got, "forged") {
		t.Fatalf("broker dead-letter queue holds %v, want poison and forged", got)
	}
	dead = slices.DeleteFunc(dead, func(d amqp.Delivery) bool { return d.MessageId == "forged" })

	if got := attemptsOf(log.of("poison")); !slices.Equal(got, []string{"1", "2"}) {
		t.Errorf("poison dispatched with attempts %v, want [1 2]", got)
	}
	if got := attemptsOf(log.of("fine")); !slices.Equal(got, []string{"1"}) {
		t.Errorf("good message dispatched with attempts %v, want [1]", got)
	}
	if len(dead) != 1 || dead[0].MessageId != "poison" || string(dead[0].Body) != `{"x":1}` {
		t.Fatalf("broker dead-letter queue holds %v, want the poison message once", deadIDs(dead))
	}
	deaths, _ := dead[0].Headers["x-death"].([]interface{})
	found := false
	for _, x := range deaths {
		if death, ok := x.(amqp.Table); ok && death["queue"] == f.queue && death["reason"] == "rejected" {
			found = true
		}
	}
	if !found {
		t.Errorf("x-death %v has no 'rejected' entry for the work queue %q", dead[0].Headers["x-death"], f.queue)
	}
	// The attempt count is the driver's: one failure recorded by the
	// retry copy, the second one is the broker's rejection.
	if got := dead[0].Headers["x-krakend-attempts"]; got != int64(1) {
		t.Errorf("x-krakend-attempts = %#v, want int64(1)", got)
	}
}

func TestNoDeadLetterKeepsRetryingAtMaxDelay(t *testing.T) {
	f := newFixture(t)
	var log dispatchLog
	var failing atomic.Bool
	failing.Store(true)
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		if failing.Load() {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	const agent = "no-dlx"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry": map[string]interface{}{"max_attempts": 2, "delay": "50ms", "max_delay": "300ms"},
		})})
	gw.waitPing(t, agent)
	start := time.Now()
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "poison", Body: []byte(`{}`)})

	const want = "used their 2 attempts and no dead_letter is configured"
	brokertest.Eventually(t, 30*time.Second, "five dispatches and the error in the log", func() bool {
		return len(log.of("poison")) >= 5 && strings.Contains(gw.logs.String(), want)
	})
	if n := brokertest.Pending(t, f.queue); n < 1 {
		t.Fatalf("the poison message is gone (pending %d) with no dead_letter configured", n)
	}
	p := log.of("poison")
	for i, d := range p {
		// The attempt the driver uses stays within 1..max_attempts.
		if want := strconv.Itoa(min(i+1, 2)); d.attempt != want {
			t.Errorf("dispatch %d has X-Amqp-Attempt %q, want %s", i+1, d.attempt, want)
		}
	}
	// 50ms before the bound, max_delay (300ms) after it.
	checkGaps(t, p, 50*time.Millisecond, 300*time.Millisecond)
	t.Logf("attempts %v, gaps %v", attemptsOf(p), gapsOf(p))

	lines := 0
	for _, line := range strings.Split(gw.logs.String(), "\n") {
		if strings.Contains(line, want) {
			lines++
			if !strings.Contains(line, "ERROR") || !strings.Contains(line, "[AMQP]["+agent+"]") || !strings.Contains(line, "300ms") {
				t.Errorf("not an ERROR line naming the agent and the delay: %q", line)
			}
		}
	}
	// At most one line per health interval (1s).
	if most := int(time.Since(start)/time.Second) + 2; lines > most {
		t.Errorf("%d error lines in %s: more than one per health interval", lines, time.Since(start).Round(time.Millisecond))
	}

	failing.Store(false)
	f.waitEmpty(t)
	final := log.of("poison")
	if n := len(final); n <= 2 {
		t.Errorf("dispatched %d times, want more than the 2 attempts: it is kept, never dropped", n)
	}
	gw.stop(t)
	if n := len(log.of("poison")); n != len(final) {
		t.Errorf("dispatched again after it succeeded (%d then %d)", len(final), n)
	}
}

func TestAttemptsSurviveAGatewayRestart(t *testing.T) {
	f := newFixture(t)
	dlq := brokertest.Name(t, "dlq")
	brokertest.Cleanup(t, f.conn, dlq, "")
	var before, after dispatchLog
	failWith := func(l *dispatchLog) func(int, received) int {
		return func(_ int, r received) int {
			l.add(r)
			return http.StatusInternalServerError
		}
	}
	spec := func(be *backend) agentSpec {
		return agentSpec{Name: "restart", Topic: "k", Workers: 1, Backend: be.URL,
			Block: block(f.queue, f.exchange, map[string]interface{}{
				// The retry delay leaves time to stop the gateway while
				// the message waits in its retry queue.
				"retry":       map[string]interface{}{"max_attempts": 3, "delay": "1s", "max_delay": "1s"},
				"dead_letter": map[string]interface{}{"queue": dlq},
			})}
	}
	be1 := newBackend(t, failWith(&before))
	gw1 := startAgents(t, spec(be1))
	gw1.waitPing(t, "restart")
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "poison", Body: []byte(`{}`)})
	brokertest.Eventually(t, 20*time.Second, "the first failed attempt", func() bool { return len(before.of("poison")) >= 1 })
	gw1.stop(t)
	if n := brokertest.Pending(t, f.queue); n < 1 {
		t.Fatalf("the message is gone after the gateway stopped (pending %d)", n)
	}

	be2 := newBackend(t, failWith(&after))
	gw2 := startAgents(t, spec(be2))
	gw2.waitPing(t, "restart")
	brokertest.Eventually(t, 30*time.Second, "the message in the dead-letter queue", func() bool { return ready(t, dlq) >= 1 })
	f.waitEmpty(t)

	first, second := attemptsOf(before.of("poison")), attemptsOf(after.of("poison"))
	t.Logf("attempts before the restart %v, after %v", first, second)
	if all := append(slices.Clone(first), second...); !slices.Equal(all, []string{"1", "2", "3"}) {
		t.Errorf("attempts before the restart %v, after %v; want 1, 2, 3 in all", first, second)
	}
	if len(second) == 0 {
		t.Error("the new gateway never dispatched the message")
	}
	dead := takeAll(t, f.conn, dlq)
	if len(dead) != 1 {
		t.Fatalf("%d dead letters, want 1", len(dead))
	}
	checkDeadLetter(t, dead[0], 3, "restart", "500", "k")
}

func TestBadMessagesNeverCrashTheAgent(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	const agent = "bad-input"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k", Workers: 2, Timeout: "30s", Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(3)})})
	gw.waitPing(t, agent)

	binary := make([]byte, 256)
	for i := range binary {
		binary[i] = byte(i)
	}
	// 12 MiB: under RabbitMQ 4's default max_message_size of 16 MiB
	// (3.x allows 128 MiB).
	huge := make([]byte, 12<<20)
	for i := range huge {
		huge[i] = byte(i*31 + i>>12)
	}
	when := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	headers := amqp.Table{
		"string":                   "text",
		"bytes":                    []byte("raw bytes"),
		"bool":                     true,
		"int8":                     int8(-8),
		"uint8":                    byte(200),
		"int16":                    int16(-1600),
		"uint16":                   uint16(65000),
		"int32":                    int32(-320000),
		"uint32":                   uint32(4000000000),
		"int64":                    int64(-6400000000),
		"float32":                  float32(1.5),
		"float64":                  float64(-2.25),
		"decimal":                  amqp.Decimal{Scale: 2, Value: 12345},
		"time":                     when,
		"table":                    amqp.Table{"a": int32(1), "b": "x", "c": amqp.Table{"d": true}},
		"array":                    []interface{}{"x", int32(2), true, nil},
		"null":                     nil,
		"key with spaces\nand ünï": "v",
		"crlf":                     "line1\r\nline2",
		"x-krakend-attempts":       "garbage", // not the driver's type: counts as no attempt
	}
	wantHeaders := map[string]string{
		"X-Amqp-Header-String":                    "text",
		"X-Amqp-Header-Bytes":                     "raw bytes",
		"X-Amqp-Header-Bool":                      "true",
		"X-Amqp-Header-Int8":                      "-8",
		"X-Amqp-Header-Uint8":                     "200",
		"X-Amqp-Header-Int16":                     "-1600",
		"X-Amqp-Header-Uint16":                    "65000",
		"X-Amqp-Header-Int32":                     "-320000",
		"X-Amqp-Header-Uint32":                    "4000000000",
		"X-Amqp-Header-Int64":                     "-6400000000",
		"X-Amqp-Header-Float32":                   "1.5",
		"X-Amqp-Header-Float64":                   "-2.25",
		"X-Amqp-Header-Decimal":                   "123.45",
		"X-Amqp-Header-Time":                      "2026-01-02T03:04:05Z",
		"X-Amqp-Header-Table":                     `{"a":1,"b":"x","c":{"d":true}}`,
		"X-Amqp-Header-Array":                     `["x",2,true,null]`,
		"X-Amqp-Header-Null":                      "",
		"X-Amqp-Header-Key-With-Spaces-And---N--": "v",
		"X-Amqp-Header-Crlf":                      "line1  line2",
		"X-Amqp-Attempt":                          "1",
	}
	messages := []amqp.Publishing{
		{MessageId: "empty", Body: []byte{}},
		{MessageId: "binary", ContentType: "application/octet-stream", Body: binary},
		{MessageId: "huge", ContentType: "application/octet-stream", Body: huge},
		{MessageId: "headers", ContentType: "application/json", Body: []byte(`{"h":1}`), Headers: headers},
		{MessageId: "invalid-utf8", ContentType: "text/plain; charset=utf-8", Body: []byte("\xff\xfe\xc3(")},
	}
	for _, m := range messages {
		f.pub.Publish(f.exchange, "k", m)
	}
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "after", Body: []byte(`{"after":true}`)})
	brokertest.Eventually(t, 60*time.Second, "every message at the backend", func() bool { return be.count() >= len(messages)+1 })
	f.waitEmpty(t)

	got := map[string][]received{}
	for _, r := range be.requests() {
		id := r.Header.Get("X-Amqp-Message-Id")
		got[id] = append(got[id], r)
	}
	for _, m := range append(messages, amqp.Publishing{MessageId: "after", Body: []byte(`{"after":true}`)}) {
		rs := got[m.MessageId]
		if len(rs) != 1 {
			t.Errorf("message %q reached the backend %d times, want once", m.MessageId, len(rs))
			continue
		}
		r := rs[0]
		if !bytes.Equal(r.Body, m.Body) {
			t.Errorf("message %q: the backend got %d bytes, want the %d bytes published, byte for byte", m.MessageId, len(r.Body), len(m.Body))
		}
		if cl := r.Header.Get("Content-Length"); len(m.Body) > 0 && cl != strconv.Itoa(len(m.Body)) {
			t.Errorf("message %q: Content-Length %q, want %d", m.MessageId, cl, len(m.Body))
		}
		if m.ContentType != "" && r.Header.Get("Content-Type") != m.ContentType {
			t.Errorf("message %q: Content-Type %q, want %q", m.MessageId, r.Header.Get("Content-Type"), m.ContentType)
		}
	}
	if rs := got["headers"]; len(rs) == 1 {
		for name, want := range wantHeaders {
			if v := rs[0].Header.Values(name); want == "" && len(v) != 0 || want != "" && (len(v) != 1 || v[0] != want) {
				t.Errorf("header %s = %q, want %q", name, v, want)
			}
		}
		for name := range rs[0].Header {
			if strings.HasPrefix(strings.ToLower(name), "x-amqp-header-x-krakend") {
				t.Errorf("the driver's own header reached the backend as %s", name)
			}
		}
	}
	if strings.Contains(gw.logs.String(), "panicked") {
		t.Errorf("the pipeline panicked:\n%s", gw.logs.String())
	}
	select {
	case err := <-gw.done:
		t.Fatalf("the agents returned (%v) while messages were flowing", err)
	default:
	}
}
