//go:build integration

package asyncamqp_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/async"
	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	"github.com/luraproject/lura/v2/transport/http/server"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// received is one request as the backend saw it, and when.
type received struct {
	Method, Path, Query string
	Header              http.Header
	Body                []byte
	At                  time.Time
}

// backend is an httptest server that records requests and answers with
// the status its handler function chooses.
type backend struct {
	*httptest.Server
	mu       sync.Mutex
	got      []received
	inFlight atomic.Int64
	maxIn    atomic.Int64
	status   func(n int, r received) int // n counts requests from 1
	// respond, when set, answers in place of status and may set
	// response headers.
	respond func(w http.ResponseWriter, r received) int
	delay   time.Duration
}

func newBackend(t *testing.T, status func(n int, r received) int) *backend {
	b := &backend{status: status}
	if b.status == nil {
		b.status = func(int, received) int { return http.StatusOK }
	}
	b.Server = httptest.NewServer(http.HandlerFunc(b.serve))
	t.Cleanup(b.Close)
	return b
}

func (b *backend) serve(w http.ResponseWriter, r *http.Request) {
	n := b.inFlight.Add(1)
	defer b.inFlight.Add(-1)
	for {
		m := b.maxIn.Load()
		if n <= m || b.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	body, _ := io.ReadAll(r.Body)
	rec := received{Method: r.Method, Path: r.URL.EscapedPath(), Query: r.URL.RawQuery, Header: r.Header.Clone(), Body: body, At: time.Now()}
	b.mu.Lock()
	b.got = append(b.got, rec)
	count := len(b.got)
	b.mu.Unlock()
	if b.delay > 0 {
		time.Sleep(b.delay)
	}
	status := 0
	if b.respond != nil {
		status = b.respond(w, rec)
	} else {
		status = b.status(count, rec)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(`{"ok":true}`))
}

func (b *backend) requests() []received {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]received(nil), b.got...)
}

func (b *backend) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.got)
}

// agentSpec is what a test varies in one async_agent entry.
type agentSpec struct {
	Name     string
	Topic    string
	Workers  int
	Timeout  string
	MaxRate  float64
	Backend  string
	Pattern  string
	Encoding string
	// Block holds every field of the driver: entry puts KrakenD's under
	// async/amqp and the driver's own in their block beside it.
	Block map[string]interface{}
	// OldPlacement keeps every field in async/amqp, the deprecated
	// placement, which still works.
	OldPlacement bool
}

func (s agentSpec) entry() map[string]interface{} {
	pattern := s.Pattern
	if pattern == "" {
		pattern = "/events"
	}
	be := map[string]interface{}{"host": []string{s.Backend}, "url_pattern": pattern, "method": "POST"}
	if s.Encoding != "" {
		be["encoding"] = s.Encoding
	}
	timeout := s.Timeout
	if timeout == "" {
		timeout = "2s"
	}
	extra := blocks(s.Block)
	if s.OldPlacement {
		extra = luraconfig.ExtraConfig{asyncamqp.Namespace: s.Block}
	}
	return map[string]interface{}{
		"name":         s.Name,
		"connection":   map[string]interface{}{"max_retries": 3, "backoff_strategy": "linear", "health_interval": "1s"},
		"consumer":     map[string]interface{}{"topic": s.Topic, "workers": s.Workers, "timeout": timeout, "max_rate": s.MaxRate},
		"backend":      []interface{}{be},
		"extra_config": extra,
	}
}

// gateway is a running set of agents, started the way KrakenD does.
type gateway struct {
	cancel context.CancelFunc
	wait   func() error
	ping   chan string
	logs   *brokertest.Buffer
	done   chan error
	once   sync.Once
}

// startAgents parses a krakend.json holding the agents with Lura's own
// parser, initialises Lura's HTTP transport as a gateway does, and starts
// them through async.AgentStarter with Lura's default proxy factory.
func startAgents(t *testing.T, specs ...agentSpec) *gateway {
	t.Helper()
	var agents []interface{}
	for _, s := range specs {
		agents = append(agents, s.entry())
	}
	return startDoc(t, map[string]interface{}{"version": 3, "async_agent": agents})
}

// startDoc starts the agents of a whole krakend.json document.
func startDoc(t *testing.T, config map[string]interface{}) *gateway {
	t.Helper()
	doc, _ := json.Marshal(config)
	parser := luraconfig.NewParserWithFileReader(func(string) ([]byte, error) { return doc, nil })
	cfg, err := parser.Parse("krakend.json")
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	logs := &brokertest.Buffer{}
	logger, _ := logging.NewLogger("DEBUG", io.MultiWriter(logs, testWriter{t}), "")
	server.InitHTTPDefaultTransport(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	g := &gateway{cancel: cancel, ping: make(chan string, 64), logs: logs, done: make(chan error, 1)}
	g.wait = async.AgentStarter{asyncamqp.StartAgent}.Start(ctx, cfg.AsyncAgents, logger, g.ping, proxy.DefaultFactory(logger))
	go func() { g.done <- g.wait() }()
	t.Cleanup(func() { g.stop(t) })
	return g
}

// stop cancels the agents and waits for them to return.
func (g *gateway) stop(t *testing.T) {
	t.Helper()
	g.once.Do(func() {
		g.cancel()
		select {
		case err := <-g.done:
			if err != nil {
				t.Errorf("agents returned %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("agents did not stop within 30s")
		}
	})
}

// waitPing waits for the named agent's first health ping, which it sends
// once it is consuming.
func (g *gateway) waitPing(t *testing.T, name string) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case got := <-g.ping:
			if got == name {
				return
			}
		case <-timeout:
			t.Fatalf("agent %q never pinged; logs:\n%s", name, g.logs.String())
		}
	}
}

// block returns a driver block for the test broker with the given queue
// and exchange, plus overrides.
func block(queue, exchange string, over map[string]interface{}) map[string]interface{} {
	b := map[string]interface{}{"host": brokertest.URL(), "name": queue, "exchange": exchange, "durable": true}
	for k, v := range over {
		b[k] = v
	}
	return b
}

// testWriter shows agent logs with -v only.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	if testing.Verbose() && os.Getenv("AGENT_LOGS") != "" {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// startRaw starts agents from raw async_agent entries.
func startRaw(t *testing.T, entries ...map[string]interface{}) *gateway {
	t.Helper()
	var agents []interface{}
	for _, e := range entries {
		agents = append(agents, e)
	}
	return startDoc(t, map[string]interface{}{"version": 3, "async_agent": agents})
}

// expectLogs fails the test for each text the agents' log lacks.
func (g *gateway) expectLogs(t *testing.T, wants ...string) {
	t.Helper()
	logs := g.logs.String()
	for _, want := range wants {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}
