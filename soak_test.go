//go:build integration && soak

package asyncamqp_test

// The soak test runs with `make soak` (tags integration and soak, no race
// detector); it is not part of `make test`. It uses the integration
// harness, hence both tags.

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// soakEnv reads a numeric setting from the environment.
func soakEnv(t *testing.T, name string, def int64) int64 {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

// soakBackend fails a seeded random share of requests with a 503 and
// records, per message id, the first 2xx and its end-to-end latency
// (publish timestamp in the body to the answer).
type soakBackend struct {
	mu        sync.Mutex
	rnd       *rand.Rand
	failShare float64
	firstOK   map[string]time.Duration
	oks       int
	requests  int
	failures  int
}

func (b *soakBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body struct {
		TS int64 `json:"ts"`
	}
	raw, _ := io.ReadAll(r.Body)
	_ = json.Unmarshal(raw, &body)
	id := r.Header.Get("X-Amqp-Message-Id")
	b.mu.Lock()
	b.requests++
	fail := b.rnd.Float64() < b.failShare
	if fail {
		b.failures++
	} else {
		b.oks++
		if _, ok := b.firstOK[id]; !ok {
			b.firstOK[id] = time.Since(time.Unix(0, body.TS))
		}
	}
	b.mu.Unlock()
	if fail {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte(`{"ok":true}`))
}

func (b *soakBackend) delivered() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.firstOK)
}

func TestSoak(t *testing.T) {
	n := int(soakEnv(t, "SOAK_MESSAGES", 100_000))
	seed := soakEnv(t, "SOAK_SEED", time.Now().UnixNano())
	rate := float64(soakEnv(t, "SOAK_RATE", 1000)) // messages per second, 0 = as fast as possible
	backPressure := soakEnv(t, "SOAK_BACK_PRESSURE", 1) != 0
	t.Logf("soak: %d messages, seed %d, publish rate %v/s, back_pressure %t", n, seed, rate, backPressure)

	f := newFixture(t)
	dlq := brokertest.Name(t, "dlq")
	brokertest.Cleanup(t, f.conn, dlq, "")
	p := brokertest.NewProxy(t, "")
	be := &soakBackend{rnd: rand.New(rand.NewSource(seed)), failShare: 0.05, firstOK: make(map[string]time.Duration, n)}
	srv := httptest.NewServer(be)
	t.Cleanup(srv.Close)

	spec := agentSpec{Name: "soak", Topic: "soak.#", Workers: 16, Backend: srv.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"host": p.URL(), "prefetch_count": 100,
			"retry": fastRetry(5), "dead_letter": map[string]interface{}{"queue": dlq},
			"back_pressure": backPressure,
		})}
	// Unlimited reconnections at a fixed second: cuts every 2-6 s keep
	// sessions shorter than the 5 s after which the driver resets its
	// retry count, so a bounded max_retries would end the run.
	gw := startRaw(t, withConnection(spec.entry(), 0, "fixed"))
	gw.waitPing(t, "soak")

	// Cut every connection through the proxy every 2 to 6 s.
	var cuts atomic.Int64
	stopCuts := make(chan struct{})
	cutsDone := make(chan struct{})
	go func() {
		defer close(cutsDone)
		rnd := rand.New(rand.NewSource(seed + 1))
		for {
			timer := time.NewTimer(2*time.Second + time.Duration(rnd.Int63n(int64(4*time.Second))))
			select {
			case <-stopCuts:
				timer.Stop()
				return
			case <-timer.C:
				if p.Cut() > 0 {
					cuts.Add(1)
				}
			}
		}
	}()
	stopCutting := sync.OnceFunc(func() { close(stopCuts); <-cutsDone })
	t.Cleanup(stopCutting)

	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	deadLettered := func() int {
		q, err := ch.QueueDeclarePassive(dlq, true, false, false, false, nil)
		if err != nil {
			t.Fatalf("dead-letter queue: %v", err)
		}
		return q.Messages
	}

	began := time.Now()
	published := publishAsync(f.conn, f.exchange, "soak.event", n, rate, func(i int) []byte {
		return []byte(fmt.Sprintf(`{"n":%d,"ts":%d}`, i, time.Now().UnixNano()))
	})
	progress := time.NewTicker(10 * time.Second)
	defer progress.Stop()
	for done := false; !done; {
		select {
		case err := <-published:
			if err != nil {
				t.Fatalf("publishing: %v", err)
			}
			done = true
		case <-progress.C:
			t.Logf("%s: %d delivered, %d cuts", time.Since(began).Round(time.Second), be.delivered(), cuts.Load())
		}
	}
	brokertest.Eventually(t, 30*time.Minute, "every message delivered or dead-lettered", func() bool {
		select {
		case <-progress.C:
			t.Logf("%s: %d delivered, %d cuts", time.Since(began).Round(time.Second), be.delivered(), cuts.Load())
		default:
		}
		return be.delivered()+deadLettered() >= n
	})
	wall := time.Since(began)
	stopCutting()
	f.waitEmpty(t)

	dead := map[string]bool{}
	for _, id := range brokertest.Drain(t, f.conn, dlq) {
		dead[id] = true
	}
	be.mu.Lock()
	defer be.mu.Unlock()
	var lost []string
	latencies := make([]time.Duration, 0, len(be.firstOK))
	for _, l := range be.firstOK {
		latencies = append(latencies, l)
	}
	for i := range n {
		id := strconv.Itoa(i)
		if _, ok := be.firstOK[id]; !ok && !dead[id] {
			lost = append(lost, id)
		}
	}
	slices.Sort(latencies)
	pct := func(q float64) time.Duration {
		if len(latencies) == 0 {
			return 0
		}
		return latencies[min(len(latencies)-1, int(q*float64(len(latencies))))].Round(time.Millisecond)
	}
	dups := be.oks - len(be.firstOK)
	summary := fmt.Sprintf("soak: published=%d delivered=%d duplicates=%d (%.2f per cut) dead-lettered=%d lost=%d cuts=%d wall=%s latency p50=%s p99=%s "+
		"(requests=%d 503s=%d seed=%d rate=%v/s back_pressure=%t)",
		n, len(be.firstOK), dups, float64(dups)/float64(max(cuts.Load(), 1)), len(dead), len(lost), cuts.Load(), wall.Round(time.Second),
		pct(0.50), pct(0.99), be.requests, be.failures, seed, rate, backPressure)
	t.Log(summary)
	fmt.Println(summary)
	if len(lost) > 0 {
		t.Errorf("lost %d messages, e.g. %v", len(lost), lost[:min(len(lost), 20)])
	}
	if cuts.Load() == 0 {
		t.Error("no connection was cut: the soak proved nothing about reconnection")
	}
	if gu := gw.lines("soak", "giving up"); len(gu) > 0 {
		t.Errorf("the agent gave up: %s", strings.Join(gu, "\n"))
	}
}
