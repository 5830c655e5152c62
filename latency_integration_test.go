//go:build integration

package asyncamqp_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// Stray 503s (5% of the answers) and connection cuts every 1-3 s are no
// overload: with back-pressure on, the messages the backend never refused
// reach it as fast as with back-pressure off. Two agents run side by side,
// one with back-pressure and one without, on the same backend, the same
// load and their connections cut at the same moments; the test compares
// their p99 latencies, and their duplicates, with each other, never with
// a fixed time, so that a busy machine slows both alike.
func TestStrayFailuresAndCutsDoNotSlowTheAgent(t *testing.T) {
	const perSecond, seconds = 100, 20 // messages a second to each agent
	be := newStrayBackend(0.05)
	srv := httptest.NewServer(be)
	t.Cleanup(srv.Close)
	on := startStrayAgent(t, "stray-on", srv.URL, true)
	off := startStrayAgent(t, "stray-off", srv.URL, false)

	cuts := cutTogether(t, on.proxy, off.proxy)
	publishSteadily(t, perSecond, seconds, on.fixture, off.fixture)
	n := perSecond * seconds
	brokertest.Eventually(t, 2*time.Minute, "every message delivered", func() bool {
		return be.delivered("stray-on") == n && be.delivered("stray-off") == n
	})
	cutCount := cuts()
	on.waitEmpty(t)
	off.waitEmpty(t)

	onP99, offP99 := be.p99("stray-on"), be.p99("stray-off")
	t.Logf("%d cuts; p99 of the messages never refused: %s with back-pressure, %s without; duplicates %d and %d",
		cutCount, onP99, offP99, be.duplicates("stray-on"), be.duplicates("stray-off"))
	if cutCount == 0 {
		t.Fatal("no connection was cut")
	}
	// A message waiting for the back-pressure when its session ends
	// must not reach the backend twice: at most twice the duplicates
	// the cuts cost without back-pressure, plus one per cut.
	if dOn, dOff := be.duplicates("stray-on"), be.duplicates("stray-off"); dOn > 2*dOff+cutCount {
		t.Errorf("%d duplicates with back-pressure, %d without, over %d cuts", dOn, dOff, cutCount)
	}
	if onP99 > 2*offP99 {
		t.Errorf("with back-pressure the p99 is %s, over twice the %s without: stray 503s and reconnects slowed the agent down",
			onP99, offP99)
	}
}

// strayAgent is one agent of the test, with its queue and the proxy its
// connections go through.
type strayAgent struct {
	fixture
	proxy *brokertest.Proxy
}

func startStrayAgent(t *testing.T, name, backend string, backPressure bool) strayAgent {
	f := newFixture(t)
	p := brokertest.NewProxy(t, "")
	spec := agentSpec{Name: name, Topic: "k", Workers: 16, Backend: backend, Pattern: "/" + name,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"host": p.URL(), "prefetch_count": 100, "retry": fastRetry(5), "back_pressure": backPressure,
		})}
	// Cuts come sooner than the 5 s after which a session resets the
	// retry count: only unlimited retries keep the agent going.
	gw := startRaw(t, withConnection(spec.entry(), 0, "fixed"))
	gw.waitPing(t, name)
	return strayAgent{fixture: f, proxy: p}
}

// cutTogether cuts the connections through every proxy at once, every 1
// to 3 s, until the returned function is called; it returns the number
// of cuts.
func cutTogether(t *testing.T, proxies ...*brokertest.Proxy) func() int {
	stop, done := make(chan struct{}), make(chan int, 1)
	go func() {
		rnd, cuts := rand.New(rand.NewSource(time.Now().UnixNano())), 0
		for {
			select {
			case <-stop:
				done <- cuts
				return
			case <-time.After(time.Second + time.Duration(rnd.Int63n(int64(2*time.Second)))):
				for _, p := range proxies {
					p.Cut()
				}
				cuts++
			}
		}
	}()
	stopped := sync.OnceValue(func() int { close(stop); return <-done })
	t.Cleanup(func() { stopped() })
	return stopped
}

// publishSteadily publishes perSecond messages a second to each
// fixture's exchange for the given seconds, in small batches every 50 ms,
// each with its publish time in the body and its index as message id.
func publishSteadily(t *testing.T, perSecond, seconds int, fixtures ...fixture) {
	t.Helper()
	const tick = 50 * time.Millisecond
	batch := perSecond * int(tick) / int(time.Second)
	chans := make([]*amqp.Channel, len(fixtures))
	for i, f := range fixtures {
		ch, err := f.conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		if err := ch.Confirm(false); err != nil {
			t.Fatal(err)
		}
		chans[i] = ch
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(seconds)*time.Second+time.Minute)
	defer cancel()
	var confs []*amqp.DeferredConfirmation
	start := time.Now()
	for next := 0; next < perSecond*seconds; next += batch {
		time.Sleep(time.Until(start.Add(time.Duration(next/batch) * tick)))
		for i, f := range fixtures {
			for id := next; id < next+batch; id++ {
				body := fmt.Sprintf(`{"ts":%d}`, time.Now().UnixNano())
				c, err := chans[i].PublishWithDeferredConfirmWithContext(ctx, f.exchange, "k", false, false, amqp.Publishing{
					ContentType: "application/json", MessageId: strconv.Itoa(id), Body: []byte(body), DeliveryMode: amqp.Persistent,
				})
				if err != nil {
					t.Fatal(err)
				}
				confs = append(confs, c)
			}
		}
	}
	for _, c := range confs {
		if ok, err := c.WaitContext(ctx); err != nil || !ok {
			t.Fatalf("publish not confirmed: %v", err)
		}
	}
}

// strayBackend answers 503 to a seeded random share of requests and
// records, per agent (the request path) and message id, the latency of
// the first 2xx and whether the message was ever refused.
type strayBackend struct {
	mu        sync.Mutex
	rnd       *rand.Rand
	failShare float64
	firstOK   map[string]map[string]time.Duration
	refused   map[string]map[string]bool
	oks       map[string]int
}

func newStrayBackend(failShare float64) *strayBackend {
	return &strayBackend{rnd: rand.New(rand.NewSource(time.Now().UnixNano())), failShare: failShare,
		firstOK: map[string]map[string]time.Duration{}, refused: map[string]map[string]bool{}, oks: map[string]int{}}
}

func (b *strayBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body struct {
		TS int64 `json:"ts"`
	}
	raw, _ := io.ReadAll(r.Body)
	_ = json.Unmarshal(raw, &body)
	agent, id := r.URL.Path[1:], r.Header.Get("X-Amqp-Message-Id")
	b.mu.Lock()
	fail := b.rnd.Float64() < b.failShare
	if b.firstOK[agent] == nil {
		b.firstOK[agent], b.refused[agent] = map[string]time.Duration{}, map[string]bool{}
	}
	if fail {
		b.refused[agent][id] = true
	} else {
		b.oks[agent]++
		if _, ok := b.firstOK[agent][id]; !ok {
			b.firstOK[agent][id] = time.Since(time.Unix(0, body.TS))
		}
	}
	b.mu.Unlock()
	if fail {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte(`{"ok":true}`))
}

func (b *strayBackend) delivered(agent string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.firstOK[agent])
}

func (b *strayBackend) duplicates(agent string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.oks[agent] - len(b.firstOK[agent])
}

// p99 is the 99th percentile latency of the agent's messages that were
// never refused.
func (b *strayBackend) p99(agent string) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	var ls []time.Duration
	for id, l := range b.firstOK[agent] {
		if !b.refused[agent][id] {
			ls = append(ls, l)
		}
	}
	if len(ls) == 0 {
		return 0
	}
	slices.Sort(ls)
	return ls[len(ls)*99/100].Round(time.Millisecond)
}
