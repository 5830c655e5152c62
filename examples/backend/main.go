// Command backend is the sample HTTP service of the krakend-amqp example.
// The gateway's async agents POST every message to it, and the plain
// endpoint GET /status is proxied to it.
//
// It logs each request it receives (method, path, the X-Amqp-Routing-Key
// and X-Amqp-Message-Id headers the driver sets, the body size) and
// answers 200 {"ok":true}; GET /status answers {"status":"ok"}. GET
// /__stats reports, as JSON, how many events arrived, how many distinct
// message ids, per routing key, and the end-to-end latency of events whose
// body carries "published_at_unix_nano" (examples/publisher writes it).
// DELETE /__stats resets the counts.
//
//	go run ./examples/backend -addr :8081
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"sync"
	"syscall"
	"time"
)

// maxLatencies bounds the latency samples kept for /__stats.
const maxLatencies = 1 << 20

func main() {
	addr := flag.String("addr", ":8081", "listen `address`")
	quiet := flag.Bool("q", false, "do not log each request")
	flag.Parse()
	logger := log.New(os.Stdout, "[backend] ", log.LstdFlags|log.Lmicroseconds)
	if err := serve(*addr, newHandler(logger, !*quiet), logger); err != nil {
		logger.Fatal(err)
	}
}

// serve listens until SIGINT or SIGTERM, then shuts down gracefully.
func serve(addr string, h http.Handler, logger *log.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	srv := &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	logger.Println("listening on", addr)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	logger.Println("stopping")
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdown); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func newHandler(logger *log.Logger, verbose bool) http.Handler {
	s := &stats{}
	s.reset()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		if verbose {
			logger.Printf("%s %s", r.Method, r.URL.Path)
		}
		writeJSON(w, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /__stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, s.snapshot())
	})
	mux.HandleFunc("DELETE /__stats", func(w http.ResponseWriter, _ *http.Request) {
		s.reset()
		writeJSON(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		size := s.record(r)
		if verbose {
			logger.Printf("%s %s key=%q id=%q bytes=%d", r.Method, r.URL.Path,
				r.Header.Get("X-Amqp-Routing-Key"), r.Header.Get("X-Amqp-Message-Id"), size)
		}
		writeJSON(w, map[string]bool{"ok": true})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// stats counts the events received.
type stats struct {
	mu        sync.Mutex
	requests  int
	ids       map[string]struct{}
	byKey     map[string]int
	latencies []time.Duration
}

func (s *stats) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = 0
	s.ids = map[string]struct{}{}
	s.byKey = map[string]int{}
	s.latencies = nil
}

// record counts one event and returns its body size.
func (s *stats) record(r *http.Request) int {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	received := time.Now()
	var event struct {
		PublishedAt int64 `json:"published_at_unix_nano"`
	}
	_ = json.Unmarshal(body, &event)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests++
	if id := r.Header.Get("X-Amqp-Message-Id"); id != "" {
		s.ids[id] = struct{}{}
	}
	if key := r.Header.Get("X-Amqp-Routing-Key"); key != "" {
		s.byKey[key]++
	}
	if event.PublishedAt > 0 && len(s.latencies) < maxLatencies {
		s.latencies = append(s.latencies, received.Sub(time.Unix(0, event.PublishedAt)))
	}
	return len(body)
}

// snapshot is the /__stats document.
type snapshot struct {
	Requests           int            `json:"requests"`
	DistinctMessageIDs int            `json:"distinct_message_ids"`
	ByRoutingKey       map[string]int `json:"by_routing_key"`
	Latency            latency        `json:"latency_ms"`
}

type latency struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50"`
	P99   float64 `json:"p99"`
	Max   float64 `json:"max"`
}

func (s *stats) snapshot() snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	byKey := make(map[string]int, len(s.byKey))
	for k, v := range s.byKey {
		byKey[k] = v
	}
	return snapshot{
		Requests:           s.requests,
		DistinctMessageIDs: len(s.ids),
		ByRoutingKey:       byKey,
		Latency:            percentiles(s.latencies),
	}
}

func percentiles(samples []time.Duration) latency {
	if len(samples) == 0 {
		return latency{}
	}
	sorted := append([]time.Duration(nil), samples...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	at := func(q float64) float64 {
		i := int(q * float64(len(sorted)-1))
		return float64(sorted[i].Microseconds()) / 1000
	}
	return latency{Count: len(sorted), P50: at(0.50), P99: at(0.99), Max: at(1)}
}
