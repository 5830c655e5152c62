//go:build integration

package asyncamqp_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// Fault tests: the agent reaches the broker through a TCP proxy written in
// the tests (brokertest.Proxy), which cuts its connections or refuses new
// ones; the shared broker itself is never restarted. Publishing and
// inspection go to the broker directly.

// tally counts, per message id, the requests a backend answered and those
// it answered with a 2xx. Its methods are safe for concurrent use.
type tally struct {
	mu    sync.Mutex
	calls map[string]int
	ok    map[string]int
	first map[string]time.Time // first 2xx
	total int
}

func newTally() *tally {
	return &tally{calls: map[string]int{}, ok: map[string]int{}, first: map[string]time.Time{}}
}

func (c *tally) record(id string, status int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total++
	c.calls[id]++
	if status >= 200 && status < 300 {
		if c.ok[id] == 0 {
			c.first[id] = time.Now()
		}
		c.ok[id]++
	}
}

// distinctOK counts the ids answered with a 2xx at least once.
func (c *tally) distinctOK() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ok)
}

// okIDs returns the ids answered with a 2xx at least once.
func (c *tally) okIDs() map[string]bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]bool, len(c.ok))
	for id := range c.ok {
		out[id] = true
	}
	return out
}

// requests counts every request the backend answered.
func (c *tally) requests() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total
}

// counted wraps a status function so that every answer is tallied.
func (c *tally) counted(status func(n int, r received) int) func(n int, r received) int {
	return func(n int, r received) int {
		s := http.StatusOK
		if status != nil {
			s = status(n, r)
		}
		c.record(r.Header.Get("X-Amqp-Message-Id"), s)
		return s
	}
}

// withConnection sets an agent entry's Lura connection block.
func withConnection(entry map[string]interface{}, maxRetries int, backoff string) map[string]interface{} {
	entry["connection"] = map[string]interface{}{"max_retries": maxRetries, "backoff_strategy": backoff, "health_interval": "1s"}
	return entry
}

// publishAsync publishes n persistent messages with ids "0".."n-1" on
// its own confirming channel, from a goroutine, so that the test can act
// while they flow. rate > 0 paces it (messages per second). The channel
// yields nil once every message is confirmed, or the first error.
func publishAsync(conn *amqp.Connection, exchange, key string, n int, rate float64, body func(i int) []byte) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- publishN(conn, exchange, key, n, rate, body) }()
	return errc
}

func publishN(conn *amqp.Connection, exchange, key string, n int, rate float64, body func(i int) []byte) error {
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	const batch = 500
	start := time.Now()
	for from := 0; from < n; from += batch {
		if rate > 0 {
			// Pace by batch: batch k starts no sooner than k*batch/rate.
			if wait := time.Until(start.Add(time.Duration(float64(from) / rate * float64(time.Second)))); wait > 0 {
				time.Sleep(wait)
			}
		}
		confs := make([]*amqp.DeferredConfirmation, 0, batch)
		for i := from; i < min(from+batch, n); i++ {
			conf, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, false, false, amqp.Publishing{
				ContentType: "application/json", MessageId: strconv.Itoa(i), Body: body(i), DeliveryMode: amqp.Persistent,
			})
			if err != nil {
				return fmt.Errorf("publish message %d: %w", i, err)
			}
			confs = append(confs, conf)
		}
		for _, c := range confs {
			if ok, err := c.WaitContext(ctx); err != nil || !ok {
				return fmt.Errorf("publish not confirmed (ack %t): %v", ok, err)
			}
		}
	}
	return nil
}

// drainPings empties the gateway's health channel.
func (g *gateway) drainPings() {
	for {
		select {
		case <-g.ping:
		default:
			return
		}
	}
}

// lines returns the log lines of one agent that contain text.
func (g *gateway) lines(agent, text string) []string {
	var out []string
	for _, l := range strings.Split(g.logs.String(), "\n") {
		if strings.Contains(l, "[AMQP]["+agent+"]") && strings.Contains(l, text) {
			out = append(out, l)
		}
	}
	return out
}

func TestConnectionCutsLoseNothing(t *testing.T) {
	f := newFixture(t)
	p := brokertest.NewProxy(t, "")
	seen := newTally()
	be := newBackend(t, seen.counted(nil))
	spec := agentSpec{Name: "cuts", Topic: "k", Workers: 8, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"host": p.URL(), "prefetch_count": 50, "retry": fastRetry(5)})}
	// Four cuts within a few seconds: each session lasts less than the 5 s
	// after which the driver resets its retry count, so each cut counts as
	// a retry. Give the agent room for them (see the report).
	gw := startRaw(t, withConnection(spec.entry(), 10, "linear"))
	gw.waitPing(t, "cuts")

	const n = 10_000
	published := publishAsync(f.conn, f.exchange, "k", n, 0, jsonBody)
	for i, pct := range []int{15, 35, 55, 75} {
		at := n * pct / 100
		// Cut only once the agent is consuming again after the last cut
		// and the flow has reached the mark.
		brokertest.Eventually(t, 60*time.Second, fmt.Sprintf("%d%% of the messages at the backend and the agent consuming after %d cuts", pct, i), func() bool {
			return seen.distinctOK() >= at && len(gw.lines("cuts", "consuming queue")) == i+1
		})
		progress := seen.distinctOK()
		if got := p.Cut(); got != 2 {
			t.Fatalf("cut %d: closed %d connections through the proxy, want the agent's two (consuming, copies)", i+1, got)
		}
		if progress >= n {
			t.Fatalf("cut %d came after the flow ended (%d messages seen): nothing was in flight", i+1, progress)
		}
		t.Logf("cut %d with %d of %d messages at the backend", i+1, progress, n)
	}
	// The session of the last cut is over once its loss is logged; any
	// ping after that comes from a new session.
	brokertest.Eventually(t, 20*time.Second, "the fourth loss in the log", func() bool {
		return len(gw.lines("cuts", "session lost")) == 4
	})
	gw.drainPings()
	gw.waitPing(t, "cuts")

	if err := <-published; err != nil {
		t.Fatalf("publishing: %v", err)
	}
	brokertest.Eventually(t, 2*time.Minute, "every message answered 2xx", func() bool { return seen.distinctOK() == n })
	f.waitEmpty(t)

	if got := len(gw.lines("cuts", "session lost")); got != 4 {
		t.Errorf("%d 'session lost' lines for 4 cuts:\n%s", got, gw.logs.String())
	}
	if got := len(gw.lines("cuts", "consuming queue")); got != 5 {
		t.Errorf("%d 'consuming queue' lines for a start and 4 reconnects:\n%s", got, gw.logs.String())
	}
	if got := len(gw.lines("cuts", "giving up")); got != 0 {
		t.Errorf("the agent gave up:\n%s", gw.logs.String())
	}
	requests := seen.requests()
	t.Logf("%d requests for %d messages: %d duplicates over 4 cuts", requests, n, requests-n)
}

func TestHealthStopsWhileDisconnected(t *testing.T) {
	f := newFixture(t)
	p := brokertest.NewProxy(t, "")
	be := newBackend(t, nil)
	spec := agentSpec{Name: "dark", Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"host": p.URL()})}
	gw := startRaw(t, withConnection(spec.entry(), 10, "linear"))
	gw.waitPing(t, "dark")

	p.Pause()
	if got := p.Cut(); got != 2 {
		t.Fatalf("closed %d connections through the proxy, want the agent's two (consuming, copies)", got)
	}
	// Once the loss is logged the session is over: no ping may follow
	// until a new session consumes.
	brokertest.Eventually(t, 10*time.Second, "the loss in the log", func() bool {
		return len(gw.lines("dark", "session lost")) == 1
	})
	gw.drainPings()
	const interval = time.Second // health_interval
	quiet := time.NewTimer(2*interval + interval/2)
	defer quiet.Stop()
	select {
	case name := <-gw.ping:
		t.Fatalf("agent %q pinged while it could not reach the broker:\n%s", name, gw.logs.String())
	case <-quiet.C:
	}
	// The quiet spell covered a failed attempt (retry 1 after 1 s), not
	// just the first backoff.
	brokertest.Eventually(t, 10*time.Second, "a failed reconnection attempt", func() bool {
		return len(gw.lines("dark", "retry 2 in")) == 1
	})
	if got := len(gw.lines("dark", "consuming queue")); got != 1 {
		t.Fatalf("the agent consumed again while the proxy refused connections:\n%s", gw.logs.String())
	}

	p.Resume()
	gw.waitPing(t, "dark")
	if got := len(gw.lines("dark", "consuming queue")); got != 2 {
		t.Errorf("%d 'consuming queue' lines, want 2 (start and reconnect):\n%s", got, gw.logs.String())
	}
	// And it works again.
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "after", Body: []byte(`{}`)})
	brokertest.Eventually(t, 10*time.Second, "the message at the backend", func() bool { return be.count() == 1 })
	f.waitEmpty(t)
}

func TestBackendDownThenBackLosesNothing(t *testing.T) {
	f := newFixture(t)
	dlq := brokertest.Name(t, "dlq")
	brokertest.Cleanup(t, f.conn, dlq, "")
	const (
		n        = 300
		outage   = 1500 * time.Millisecond
		attempts = 50
	)
	seen := newTally()
	var (
		firstOnce  sync.Once
		first      atomic.Int64 // unix nanos of the first request
		refused    atomic.Int64 // requests answered 503 or dropped
		maxAttempt atomic.Int64
	)
	down := func(r *http.Request) bool {
		firstOnce.Do(func() { first.Store(time.Now().UnixNano()) })
		if a, _ := strconv.ParseInt(r.Header.Get("X-Amqp-Attempt"), 10, 64); a > 0 {
			for m := maxAttempt.Load(); a > m && !maxAttempt.CompareAndSwap(m, a); m = maxAttempt.Load() {
			}
		}
		return time.Since(time.Unix(0, first.Load())) < outage
	}
	// While it is down the backend answers 503 or drops the connection,
	// alternately: both a 5xx and a connection error must be retried.
	be := &backend{status: seen.counted(func(int, received) int { return http.StatusOK })}
	be.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !down(r) {
			be.serve(w, r)
			return
		}
		if refused.Add(1)%2 == 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
			_ = c.Close()
		}
	}))
	t.Cleanup(be.Close)

	spec := agentSpec{Name: "outage", Topic: "k", Workers: 4, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry":       map[string]interface{}{"max_attempts": attempts, "delay": "50ms", "max_delay": "400ms", "multiplier": 2},
			"dead_letter": map[string]interface{}{"queue": dlq},
		})}
	gw := startAgents(t, spec)
	gw.waitPing(t, "outage")
	f.pub.PublishN(f.exchange, "k", n, jsonBody)

	brokertest.Eventually(t, time.Minute, "every message answered 2xx", func() bool { return seen.distinctOK() == n })
	f.waitEmpty(t)

	if refused.Load() == 0 {
		t.Fatal("the backend was never down: the test proved nothing")
	}
	q, ok := brokertest.Queue(t, dlq)
	if !ok {
		t.Fatalf("dead-letter queue %q was not declared", dlq)
	}
	if q.Ready+q.Unacked != 0 {
		t.Errorf("%d messages dead-lettered although the backend came back", q.Ready+q.Unacked)
	}
	if got := maxAttempt.Load(); got > attempts || got < 2 {
		t.Errorf("highest X-Amqp-Attempt %d, want between 2 (retried) and %d (the bound)", got, attempts)
	}
	if got := len(gw.lines("outage", "messages dead-lettered to")); got != 0 {
		t.Errorf("the log reports dead letters:\n%s", gw.logs.String())
	}
	t.Logf("%d refusals while down, %d answered requests, highest attempt %d", refused.Load(), seen.requests(), maxAttempt.Load())
}

func TestShutdownUnderLoadLosesNothing(t *testing.T) {
	f := newFixture(t)
	seen := newTally()
	be := newBackend(t, seen.counted(nil))
	be.delay = 3 * time.Millisecond
	gw := startAgents(t, agentSpec{Name: "drain", Topic: "k", Workers: 16, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"prefetch_count": 50})})
	gw.waitPing(t, "drain")

	const n = 3000
	f.pub.PublishN(f.exchange, "k", n, jsonBody)
	brokertest.Eventually(t, time.Minute, "half of the messages at the backend", func() bool { return seen.requests() >= n/2 })
	began := time.Now()
	gw.stop(t) // fails the test unless the agents return within 30 s
	t.Logf("agents returned %s after the cancel, %d of %d messages answered", time.Since(began).Round(time.Millisecond), seen.requests(), n)
	gw.expectLogs(t, "[AMQP][drain] stopping", "[AMQP][drain] stopped")

	q, ok := brokertest.Queue(t, f.queue)
	if !ok {
		t.Fatal("the queue is gone")
	}
	if q.Unacked != 0 || q.Consumers != 0 {
		t.Errorf("after the stop: %d unacked, %d consumers; want 0 and 0", q.Unacked, q.Consumers)
	}
	answered := seen.okIDs()
	if len(answered) >= n {
		t.Fatalf("the agent did not stop mid-flight: all %d messages were answered", n)
	}
	left := map[string]bool{}
	for _, id := range drainAll(t, f) {
		left[id] = true
	}
	both, lost := 0, 0
	for i := range n {
		id := strconv.Itoa(i)
		switch {
		case answered[id] && left[id]:
			both++
		case !answered[id] && !left[id]:
			lost++
		}
	}
	if lost != 0 {
		t.Errorf("lost %d of %d messages: %d answered 2xx, %d left in the queue", lost, n, len(answered), len(left))
	}
	// A dispatch that finished before the stop is acked, not abandoned:
	// no message is both answered and back in the queue.
	if both != 0 {
		t.Errorf("%d messages were answered 2xx and are still in the queue: in-flight dispatches were not settled", both)
	}
	if d := seen.requests() - len(answered); d != 0 {
		t.Errorf("%d duplicate requests without any fault", d)
	}
}

// drainAll takes every message off the work queue and its retry queues,
// until none holds anything, and returns their ids.
func drainAll(t *testing.T, f fixture) []string {
	t.Helper()
	var ids []string
	brokertest.Eventually(t, 30*time.Second, "the work and retry queues drained", func() bool {
		ids = append(ids, brokertest.Drain(t, f.conn, f.queue)...)
		for _, row := range brokertest.Rabbitmqctl(t, "list_queues", "--no-table-headers", "name") {
			if strings.HasPrefix(row[0], f.queue+".retry.") {
				ids = append(ids, brokertest.Drain(t, f.conn, row[0])...)
			}
		}
		return brokertest.Pending(t, f.queue) == 0
	})
	return ids
}

func TestSetupFailuresAreClearAndBounded(t *testing.T) {
	broker, err := url.Parse(brokertest.URL())
	if err != nil {
		t.Fatal(err)
	}
	user := broker.User.Username()
	pass, _ := broker.User.Password()
	withAuth := func(password, host, vhost string) string {
		u := *broker
		u.User = url.UserPassword(user, password)
		if host != "" {
			u.Host = host
		}
		if vhost != "" {
			u.Path = "/" + vhost
		}
		return u.String()
	}
	const secret = "Wr0ngS3cret-Pa55"
	cases := []struct {
		name string
		// host and over adapt the driver block of the fixture's queue.
		host func(f fixture) string
		over func(t *testing.T, f fixture) map[string]interface{}
		// setUp prepares the broker before the agent starts.
		setUp func(t *testing.T, f fixture)
		want  string
	}{
		{
			name: "wrong-password",
			host: func(fixture) string { return withAuth(secret, "", "") },
			want: "username or password not allowed",
		},
		{
			name: "unreachable-port",
			host: func(fixture) string { return withAuth(secret, "127.0.0.1:1", "") },
			want: "connection refused",
		},
		{
			name: "missing-vhost",
			host: func(fixture) string { return withAuth(pass, "", "nope") },
			want: "vhost nope not found",
		},
		{
			name: "queue-with-other-flags",
			setUp: func(t *testing.T, f fixture) {
				ch, err := f.conn.Channel()
				if err != nil {
					t.Fatal(err)
				}
				defer ch.Close()
				args := amqp.Table{"x-max-length": int32(5)}
				if _, err := ch.QueueDeclare(f.queue, true, false, false, false, args); err != nil {
					t.Fatal(err)
				}
			},
			want: "already exists with other settings",
		},
		{
			name: "missing-dead-letter-exchange",
			over: func(t *testing.T, f fixture) map[string]interface{} {
				return map[string]interface{}{"dead_letter": map[string]interface{}{"exchange": brokertest.Name(t, "nodlx")}}
			},
			want: "does not exist",
		},
	}
	const maxRetries = 2
	retryLine := regexp.MustCompile(`; retry (\d+) in `)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			if c.setUp != nil {
				c.setUp(t, f)
			}
			over := map[string]interface{}{}
			if c.over != nil {
				over = c.over(t, f)
			}
			host := brokertest.URL()
			if c.host != nil {
				host = c.host(f)
			}
			over["host"] = host
			be := newBackend(t, nil)
			spec := agentSpec{Name: c.name, Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, over)}
			started := time.Now()
			gw := startRaw(t, withConnection(spec.entry(), maxRetries, "linear"))
			// Linear backoff: 1 s, then 2 s, then it gives up.
			brokertest.Eventually(t, 30*time.Second, "the agent to give up", func() bool {
				return len(gw.lines(c.name, "giving up")) > 0
			})
			if took := time.Since(started); took < 2500*time.Millisecond {
				t.Errorf("gave up after %s: the 1 s and 2 s waits were not honoured", took)
			}
			// Its only agent gone, the errgroup ends, but with no error: an
			// error would have cancelled every other agent and the router.
			select {
			case err := <-gw.done:
				if err != nil {
					t.Errorf("the agent returned %v into Lura's errgroup", err)
				}
				gw.done <- err // for gw.stop
			case <-time.After(10 * time.Second):
				t.Error("the agent did not return after giving up")
			}
			logs := gw.logs.String()
			for _, leak := range []string{secret, host, ":" + pass + "@"} {
				if strings.Contains(logs, leak) {
					t.Errorf("the log holds a password (%q):\n%s", leak, logs)
				}
			}
			if strings.Contains(strings.ToLower(logs), "panic") {
				t.Errorf("the log mentions a panic:\n%s", logs)
			}
			var retries []string
			for _, l := range gw.lines(c.name, "retry") {
				if m := retryLine.FindStringSubmatch(l); m != nil {
					retries = append(retries, m[1])
				}
			}
			if strings.Join(retries, ",") != "1,2" {
				t.Errorf("retry lines numbered %v, want [1 2] (max_retries %d):\n%s", retries, maxRetries, logs)
			}
			failures := append(gw.lines(c.name, "; retry "), gw.lines(c.name, "giving up")...)
			if len(failures) != maxRetries+1 {
				t.Errorf("%d failure lines, want %d (one per attempt):\n%s", len(failures), maxRetries+1, logs)
			}
			for _, l := range failures {
				if !strings.Contains(l, c.want) {
					t.Errorf("a failure line does not name the cause %q: %s", c.want, l)
				}
			}
			if got := len(gw.lines(c.name, "giving up after 2 connection retries")); got != 1 {
				t.Errorf("want one 'giving up after 2 connection retries' line:\n%s", logs)
			}
			if len(gw.lines(c.name, "consuming queue")) != 0 {
				t.Errorf("the agent consumed although its setup fails:\n%s", logs)
			}
		})
	}
}

// A queue that is neither durable nor exclusive: RabbitMQ 3.x declares
// it; RabbitMQ 4.3 (the deprecated feature transient_nonexcl_queues
// denied) refuses it, closing the connection with 541. There the agent
// says at ERROR what to change and which rule, tries once per step of
// its backoff (one connection each), and gives up after max_retries.
func TestTransientQueueFollowsTheBrokersRule(t *testing.T) {
	f := newFixture(t)
	p := brokertest.NewProxy(t, "")
	be := newBackend(t, nil)
	const agent = "transient-rule"
	spec := agentSpec{Name: agent, Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"host": p.URL(), "durable": false})}
	const maxRetries = 2
	gw := startRaw(t, withConnection(spec.entry(), maxRetries, "linear"))
	if !brokertest.DeniesTransientQueues(t) {
		t.Logf("RabbitMQ %s allows transient queues", brokertest.Version(t))
		gw.waitPing(t, agent)
		f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "1", Body: []byte(`{}`)})
		brokertest.Eventually(t, 10*time.Second, "the message at the backend", func() bool { return be.count() == 1 })
		if q, ok := brokertest.Queue(t, f.queue); !ok || q.Durable || q.Exclusive {
			t.Errorf("queue %+v, want a transient, non-exclusive one", q)
		}
		return
	}
	t.Logf("RabbitMQ %s denies transient queues", brokertest.Version(t))
	brokertest.Eventually(t, 30*time.Second, "the agent to give up", func() bool {
		return len(gw.lines(agent, "giving up")) > 0
	})
	logs := gw.logs.String()
	refusals := gw.lines(agent, "ERROR")
	if len(refusals) != maxRetries+1 {
		t.Errorf("%d ERROR lines, want %d (one per attempt):\n%s", len(refusals), maxRetries+1, logs)
	}
	for _, l := range gw.lines(agent, "; retry ") {
		for _, want := range []string{"ERROR", f.queue, "transient_nonexcl_queues", "neither durable nor exclusive",
			`set "durable": true`, "RabbitMQ 4.3"} {
			if !strings.Contains(l, want) {
				t.Errorf("a refusal line lacks %q: %s", want, l)
			}
		}
	}
	// One connection per attempt, the linear backoff's 1 s and 2 s apart.
	accepts := p.Accepts()
	if len(accepts) != maxRetries+1 {
		t.Fatalf("%d connections, want %d: one per attempt", len(accepts), maxRetries+1)
	}
	for i, want := range []time.Duration{time.Second, 2 * time.Second} {
		if gap := accepts[i+1].Sub(accepts[i]); gap < want-100*time.Millisecond {
			t.Errorf("attempt %d came %s after the one before, want the backoff's %s", i+2, gap, want)
		}
	}
	if len(gw.lines(agent, "consuming queue")) != 0 {
		t.Errorf("the agent consumed although the broker refuses its queue:\n%s", logs)
	}
}

// Dispatches in flight when a cut comes end after it: their acks are
// refused, and the broker delivers their messages again to the next
// session. The agent remembers what it handled, and acks those
// redeliveries without sending them to the backend again: every message
// reaches it exactly once. On a quorum queue too, whose redeliveries
// carry an x-delivery-count the first delivery did not.
func TestCutsDoNotSendInFlightMessagesTwice(t *testing.T) {
	for _, queueType := range []string{"classic", "quorum"} {
		t.Run(queueType, func(t *testing.T) { inFlightAtCuts(t, queueType) })
	}
}

func inFlightAtCuts(t *testing.T, queueType string) {
	f := newFixture(t)
	p := brokertest.NewProxy(t, "")
	seen := newTally()
	var lastAnswer atomic.Int64 // unix nanos
	be := newBackend(t, seen.counted(func(int, received) int {
		lastAnswer.Store(time.Now().UnixNano())
		return http.StatusOK
	}))
	be.delay = 300 * time.Millisecond
	const workers = 8
	spec := agentSpec{Name: "inflight", Topic: "k", Workers: workers, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"host": p.URL(), "prefetch_count": 20, "retry": fastRetry(5),
			"queue_args": map[string]interface{}{"x-queue-type": queueType}})}
	gw := startRaw(t, withConnection(spec.entry(), 10, "linear"))
	gw.waitPing(t, "inflight")

	const n = 200
	if err := publishN(f.conn, f.exchange, "k", n, 0, jsonBody); err != nil {
		t.Fatalf("publishing: %v", err)
	}
	const cuts = 3
	for i, pct := range []int{20, 45, 70} {
		at := n * pct / 100
		// Cut while every worker's dispatch is at the backend, well after
		// the last answer (its ack is out) and well before the next.
		brokertest.Eventually(t, 60*time.Second, fmt.Sprintf("%d%% at the backend, %d dispatches in flight mid-way", pct, workers), func() bool {
			since := time.Since(time.Unix(0, lastAnswer.Load()))
			return seen.distinctOK() >= at && len(gw.lines("inflight", "consuming queue")) == i+1 &&
				be.inFlight.Load() == workers && since > 100*time.Millisecond && since < 180*time.Millisecond
		})
		if got := p.Cut(); got == 0 {
			t.Fatalf("cut %d closed no connection", i+1)
		}
		t.Logf("cut %d with %d of %d messages at the backend", i+1, seen.distinctOK(), n)
	}
	brokertest.Eventually(t, 2*time.Minute, "every message answered 2xx", func() bool { return seen.distinctOK() == n })
	f.waitEmpty(t)

	if got := len(gw.lines("inflight", "session lost")); got != cuts {
		t.Errorf("%d 'session lost' lines for %d cuts", got, cuts)
	}
	seen.mu.Lock()
	defer seen.mu.Unlock()
	for i := range n {
		id := strconv.Itoa(i)
		if seen.calls[id] != 1 || seen.ok[id] != 1 {
			t.Errorf("message %s: %d requests, %d answered 2xx; want exactly one", id, seen.calls[id], seen.ok[id])
		}
	}
	if seen.total != n {
		t.Errorf("%d requests for %d messages", seen.total, n)
	}
	if got := len(gw.lines("inflight", "not dispatched again")); got < workers {
		t.Errorf("%d redeliveries settled without a dispatch, want at least %d (a cut's in-flight dispatches)", got, workers)
	}
}
