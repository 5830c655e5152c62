package asyncamqp_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/async"
	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/sync/errgroup"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/config"
)

// unitBlock is a valid driver block; nothing dials it in these tests.
func unitBlock(over map[string]interface{}) map[string]interface{} {
	b := map[string]interface{}{
		"host":     "amqp://user:s3cr3t@127.0.0.1:1/",
		"name":     "unit-queue",
		"exchange": "unit-exchange",
	}
	for k, v := range over {
		if v == nil {
			delete(b, k)
			continue
		}
		b[k] = v
	}
	return b
}

// blocks splits a block holding every field into the agent's two blocks:
// KrakenD's fields under async/amqp, the driver's own under its namespace.
func blocks(block map[string]interface{}) luraconfig.ExtraConfig {
	std, ext := map[string]interface{}{}, map[string]interface{}{}
	for k, v := range block {
		if config.Standard(k) {
			std[k] = v
		} else {
			ext[k] = v
		}
	}
	extra := luraconfig.ExtraConfig{asyncamqp.Namespace: std}
	if len(ext) > 0 {
		extra[asyncamqp.ExtensionNamespace] = ext
	}
	return extra
}

// unitAgent is an agent as Lura's parser leaves it, with extra as its
// extra_config.
func unitAgent(name string, extra luraconfig.ExtraConfig) *luraconfig.AsyncAgent {
	return &luraconfig.AsyncAgent{
		Name:       name,
		Connection: luraconfig.Connection{MaxRetries: 1, HealthInterval: time.Second},
		Consumer:   luraconfig.Consumer{Topic: "orders.*", Workers: 1, Timeout: time.Second},
		Backend: []*luraconfig.Backend{{
			Host:       []string{"http://127.0.0.1:1"},
			URLPattern: "/events/{routing_key}",
			Method:     "POST",
		}},
		ExtraConfig: extra,
	}
}

// unitLogger logs at DEBUG into a buffer.
func unitLogger(t *testing.T) (logging.Logger, *bytes.Buffer) {
	t.Helper()
	buf := &bytes.Buffer{}
	l, err := logging.NewLogger("DEBUG", buf, "")
	if err != nil {
		t.Fatal(err)
	}
	return l, buf
}

func logLines(buf *bytes.Buffer) []string {
	s := strings.TrimRight(buf.String(), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// xfail reports failures. A case marked with a known bug must still fail
// (it is then skipped, naming the bug), so the mark has to go as soon as
// the bug is fixed.
func xfail(t *testing.T, knownBug string, failures []string) {
	t.Helper()
	switch {
	case knownBug == "":
		for _, f := range failures {
			t.Error(f)
		}
	case len(failures) == 0:
		t.Errorf("known bug %q no longer reproduces: remove the mark from this case", knownBug)
	default:
		t.Skipf("KNOWN BUG, not fixed yet: %s; got: %s", knownBug, strings.Join(failures, "; "))
	}
}

// noProxy fails the test if the agent ever dispatches.
func noProxy(t *testing.T) proxy.Proxy {
	return func(context.Context, *proxy.Request) (*proxy.Response, error) {
		t.Error("the proxy was called")
		return nil, errors.New("unexpected")
	}
}

// assertNothingStarted checks that no goroutine runs in g (limited to 1):
// a started agent would hold the only slot.
func assertNothingStarted(t *testing.T, g *errgroup.Group) {
	t.Helper()
	if !g.TryGo(func() error { return nil }) {
		t.Error("StartAgent added a goroutine to the errgroup")
	}
	if err := g.Wait(); err != nil {
		t.Errorf("errgroup returned %v", err)
	}
}

func TestPluginStartAgentDeclines(t *testing.T) {
	for _, tc := range []struct {
		name  string
		agent *luraconfig.AsyncAgent
	}{
		{"no agent", nil},
		{"nil extra_config", unitAgent("a", nil)},
		{"empty extra_config", unitAgent("a", luraconfig.ExtraConfig{})},
		{"another driver's block", unitAgent("a", luraconfig.ExtraConfig{"async/kafka": unitBlock(nil)})},
		{"a near miss of the namespace", unitAgent("a", luraconfig.ExtraConfig{"async/amqp/": unitBlock(nil)})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logger, buf := unitLogger(t)
			g := &errgroup.Group{}
			g.SetLimit(1)
			ok := asyncamqp.StartAgent(context.Background(), async.Options{
				Agent:  tc.agent,
				Proxy:  noProxy(t),
				G:      g,
				Logger: logger,
			})
			if ok {
				t.Error("StartAgent returned true for an agent without an async/amqp block")
			}
			assertNothingStarted(t, g)
			if buf.Len() != 0 {
				t.Errorf("StartAgent logged for an agent that is not its own: %q", buf.String())
			}
		})
	}
}

// Declining lets the next factory of the starter take the agent.
func TestPluginStartAgentInAgentStarter(t *testing.T) {
	for _, tc := range []struct {
		name     string
		extra    luraconfig.ExtraConfig
		wantNext bool
	}{
		{"not ours: the next factory is asked", luraconfig.ExtraConfig{"async/kafka": map[string]interface{}{}}, true},
		{"ours but invalid: the next factory is not asked", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(map[string]interface{}{"host": nil})}, false},
		{"legacy key, invalid: the next factory is not asked", luraconfig.ExtraConfig{asyncamqp.LegacyNamespace: map[string]interface{}{}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logger, _ := unitLogger(t)
			asked := false
			next := func(context.Context, async.Options) bool {
				asked = true
				return true
			}
			wait := async.AgentStarter{asyncamqp.StartAgent, next}.Start(
				context.Background(), []*luraconfig.AsyncAgent{unitAgent("a", tc.extra)}, logger, make(chan string, 1),
				proxy.FactoryFunc(func(*luraconfig.EndpointConfig) (proxy.Proxy, error) { return noProxy(t), nil }),
			)
			if err := wait(); err != nil {
				t.Errorf("agents returned %v", err)
			}
			if asked != tc.wantNext {
				t.Errorf("next factory asked = %t, want %t", asked, tc.wantNext)
			}
		})
	}
}

func TestPluginStartAgentInvalid(t *testing.T) {
	for _, tc := range []struct {
		name  string
		agent *luraconfig.AsyncAgent
		// want holds substrings of the one ERROR line.
		want     []string
		knownBug string
	}{
		{
			name:  "missing host",
			agent: unitAgent("orders", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(map[string]interface{}{"host": nil})}),
			want:  []string{"[orders]", "host", "required"},
		},
		{
			name:  "unknown field",
			agent: unitAgent("orders", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(map[string]interface{}{"prefetchCount": 5.0})}),
			want:  []string{"[orders]", "prefetchCount", `did you mean "prefetch_count"`},
		},
		{
			name:  "legacy key",
			agent: unitAgent("legacy", luraconfig.ExtraConfig{asyncamqp.LegacyNamespace: unitBlock(map[string]interface{}{"prefetch_count": -1.0})}),
			want:  []string{"[legacy]", "prefetch_count", "between 0 and 65535"},
		},
		{
			name: "block and agent problems together",
			agent: func() *luraconfig.AsyncAgent {
				a := unitAgent("orders", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(map[string]interface{}{"exchange": nil})})
				a.Consumer.Topic = ""
				return a
			}(),
			want: []string{"[orders]", "extra_config.async/amqp.exchange", "consumer.topic"},
		},
		{
			name:  "block not an object",
			agent: unitAgent("orders", luraconfig.ExtraConfig{asyncamqp.Namespace: "amqp://localhost"}),
			want:  []string{"[orders]", "object"},
		},
		{
			name:  "several problems on one line",
			agent: unitAgent("orders", luraconfig.ExtraConfig{asyncamqp.Namespace: map[string]interface{}{"host": "http://user:s3cr3t@h/", "durable": "yes"}}),
			want:  []string{"[orders]", "host", "name", "exchange", "durable"},
		},
		{
			name: "valid block, consumer.topic missing",
			agent: func() *luraconfig.AsyncAgent {
				a := unitAgent("orders", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(nil)})
				a.Consumer.Topic = ""
				return a
			}(),
			want: []string{"[orders]", "consumer.topic"},
		},
		{
			name: "valid block, unknown url_pattern placeholder",
			agent: func() *luraconfig.AsyncAgent {
				a := unitAgent("orders", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(nil)})
				a.Backend[0].URLPattern = "/events/{foo}"
				return a
			}(),
			want: []string{"[orders]", "backend[0].url_pattern", "{foo}"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logger, buf := unitLogger(t)
			g := &errgroup.Group{}
			g.SetLimit(1)
			ok := asyncamqp.StartAgent(context.Background(), async.Options{
				Agent:  tc.agent,
				Proxy:  noProxy(t),
				G:      g,
				Logger: logger,
			})
			if !ok {
				t.Error("StartAgent returned false for an agent with an async/amqp block: another driver would take it")
			}
			assertNothingStarted(t, g)
			lines := logLines(buf)
			if len(lines) != 1 {
				t.Fatalf("logged %d lines, want exactly one ERROR line:\n%s", len(lines), buf.String())
			}
			line := lines[0]
			if !strings.Contains(line, " ERROR: ") {
				t.Errorf("the line is not at ERROR level: %q", line)
			}
			if !strings.Contains(line, "[SERVICE: AsyncAgent][AMQP]") {
				t.Errorf("the line lacks the service prefix: %q", line)
			}
			if strings.Contains(line, "s3cr3t") {
				t.Errorf("the line leaks the password: %q", line)
			}
			var failures []string
			for _, s := range tc.want {
				if !strings.Contains(line, s) {
					failures = append(failures, fmt.Sprintf("the line does not contain %q: %q", s, line))
				}
			}
			xfail(t, tc.knownBug, failures)
		})
	}
}

// A valid agent starts one goroutine in the errgroup, which returns nil
// (never an error, which would stop every agent) once the context ends.
// The context is cancelled up front, so nothing is dialled.
func TestPluginStartAgentValidStopsWithContext(t *testing.T) {
	for _, tc := range []struct {
		name  string
		extra luraconfig.ExtraConfig
	}{
		{"current key", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(nil)}},
		{"legacy key", luraconfig.ExtraConfig{asyncamqp.LegacyNamespace: unitBlock(nil)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logger, buf := unitLogger(t)
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			var g errgroup.Group
			ok := asyncamqp.StartAgent(ctx, async.Options{
				Agent:          unitAgent("valid", tc.extra),
				Proxy:          noProxy(t),
				G:              &g,
				ShouldContinue: func(int) bool { return false },
				BackoffF:       func(int) time.Duration { return time.Millisecond },
				Logger:         logger,
			})
			if !ok {
				t.Fatal("StartAgent returned false for a valid agent")
			}
			if err := g.Wait(); err != nil {
				t.Errorf("the agent returned %v into the errgroup", err)
			}
			if strings.Contains(buf.String(), " ERROR: ") {
				t.Errorf("a valid agent logged an error:\n%s", buf.String())
			}
			if strings.Contains(buf.String(), "s3cr3t") {
				t.Errorf("the log leaks the password:\n%s", buf.String())
			}
		})
	}
}

func TestPluginCheck(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(a *luraconfig.AsyncAgent)
		// want holds substrings of the error; nil means no error.
		want        []string
		wantPattern []string // per backend, after Prepare
		knownBug    string
	}{
		{
			name:        "valid, {routing_key} rewritten",
			want:        nil,
			wantPattern: []string{"/events/{{.Routing_key}}"},
		},
		{
			name: "every backend rewritten",
			modify: func(a *luraconfig.AsyncAgent) {
				a.Backend = append(a.Backend,
					&luraconfig.Backend{URLPattern: "/m/{message_id}?c={correlation_id}"},
					&luraconfig.Backend{URLPattern: "/plain"},
					&luraconfig.Backend{URLPattern: "/{{.Exchange}}"})
			},
			wantPattern: []string{"/events/{{.Routing_key}}", "/m/{{.Message_id}}?c={{.Correlation_id}}", "/plain", "/{{.Exchange}}"},
		},
		{
			name:   "consumer.topic missing",
			modify: func(a *luraconfig.AsyncAgent) { a.Consumer.Topic = "" },
			want:   []string{`agent "unit"`, "consumer.topic"},
		},
		{
			name:   "consumer.topic blank",
			modify: func(a *luraconfig.AsyncAgent) { a.Consumer.Topic = "  " },
			want:   []string{`agent "unit"`, "consumer.topic"},
		},
		{
			name:   "negative max_rate",
			modify: func(a *luraconfig.AsyncAgent) { a.Consumer.MaxRate = -1 },
			want:   []string{`agent "unit"`, "consumer.max_rate", "-1"},
		},
		{
			name:   "negative timeout",
			modify: func(a *luraconfig.AsyncAgent) { a.Consumer.Timeout = -time.Second },
			want:   []string{`agent "unit"`, "consumer.timeout"},
		},
		{
			name:        "unknown url_pattern placeholder",
			modify:      func(a *luraconfig.AsyncAgent) { a.Backend[0].URLPattern = "/events/{foo}" },
			want:        []string{`agent "unit"`, "backend[0].url_pattern", "{foo}", "{routing_key}"},
			wantPattern: []string{"/events/{foo}"},
		},
		{
			name: "unknown placeholder in the second backend, the first still rewritten",
			modify: func(a *luraconfig.AsyncAgent) {
				a.Backend = append(a.Backend, &luraconfig.Backend{URLPattern: "/x/{bar}"})
			},
			want:        []string{"backend[1].url_pattern", "{bar}"},
			wantPattern: []string{"/events/{{.Routing_key}}", "/x/{bar}"},
		},
		{
			name: "block error names agent, block and field",
			modify: func(a *luraconfig.AsyncAgent) {
				delete(a.ExtraConfig[asyncamqp.Namespace].(map[string]interface{}), "exchange")
			},
			want: []string{`agent "unit": extra_config.async/amqp.exchange: required`},
		},
		{
			name: "legacy block error names async/amqp, the legacy key in brackets",
			modify: func(a *luraconfig.AsyncAgent) {
				a.ExtraConfig = luraconfig.ExtraConfig{asyncamqp.LegacyNamespace: unitBlock(map[string]interface{}{"durable": "yes"})}
			},
			want: []string{`agent "unit": extra_config.async/amqp (github.com/devopsfaith/krakend-amqp/agent).durable: must be true or false`},
		},
		{
			name: "every problem at once",
			modify: func(a *luraconfig.AsyncAgent) {
				a.Consumer.Topic = ""
				a.Consumer.MaxRate = -2
				a.Backend[0].URLPattern = "/{foo}"
				a.ExtraConfig[asyncamqp.Namespace] = map[string]interface{}{"host": "amqp://h", "name": "q", "exchange": "x", "bogus": true, "prefetch_count": 1.5}
			},
			want: []string{"consumer.topic", "consumer.max_rate", "backend[0].url_pattern", "extra_config.async/amqp.bogus", "extra_config.async/amqp.prefetch_count"},
		},
		{
			name: "no-op encoding with several backends",
			modify: func(a *luraconfig.AsyncAgent) {
				a.Backend[0].Encoding = "no-op"
				a.Backend = append(a.Backend, &luraconfig.Backend{URLPattern: "/b", Encoding: "no-op"})
			},
			want: []string{`agent "unit"`, "backend[0].encoding", "backend[1].encoding", "no-op"},
		},
		{
			name:        "no-op encoding with one backend",
			modify:      func(a *luraconfig.AsyncAgent) { a.Backend[0].Encoding = "no-op" },
			wantPattern: []string{"/events/{{.Routing_key}}"},
		},
		{
			name: "dead letters routed back to the queue by consumer.topic",
			modify: func(a *luraconfig.AsyncAgent) {
				a.ExtraConfig[asyncamqp.Namespace] = unitBlock(map[string]interface{}{
					"dead_letter": map[string]interface{}{"exchange": "unit-exchange", "routing_key": "orders.dead"}})
			},
			want: []string{`agent "unit": extra_config.async/amqp.dead_letter.routing_key`, `"orders.*"`, "forever"},
		},
		{
			name: "dead letters on the own exchange with a key consumer.topic does not match",
			modify: func(a *luraconfig.AsyncAgent) {
				a.ExtraConfig[asyncamqp.Namespace] = unitBlock(map[string]interface{}{
					"dead_letter": map[string]interface{}{"exchange": "unit-exchange", "routing_key": "dead.orders"}})
			},
			wantPattern: []string{"/events/{{.Routing_key}}"},
		},
		{
			name: "ordering_key without a prefetch limit",
			modify: func(a *luraconfig.AsyncAgent) {
				a.ExtraConfig[asyncamqp.Namespace] = unitBlock(map[string]interface{}{"ordering_key": "routing_key", "prefetch_count": 0})
			},
			want: []string{`agent "unit": extra_config.async/amqp.prefetch_count`, "ordering_key", "set prefetch_count to 1 or more"},
		},
		{
			name:   "block not an object",
			modify: func(a *luraconfig.AsyncAgent) { a.ExtraConfig[asyncamqp.Namespace] = []interface{}{} },
			want:   []string{`agent "unit": extra_config.async/amqp: the block must be an object`},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := unitAgent("unit", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(nil)})
			if tc.modify != nil {
				tc.modify(a)
			}
			var written []string
			for _, b := range a.Backend {
				written = append(written, b.URLPattern)
			}
			err := asyncamqp.Check(a)
			var failures []string
			fail := func(format string, args ...interface{}) { failures = append(failures, fmt.Sprintf(format, args...)) }
			if tc.want == nil && err != nil {
				fail("Check: %v", err)
			}
			if tc.want != nil {
				if err == nil {
					fail("Check: no error")
				} else {
					for _, s := range tc.want {
						if !strings.Contains(err.Error(), s) {
							fail("error does not contain %q:\n%s", s, err)
						}
					}
				}
			}
			// Check changes nothing; the step StartAgent runs rewrites
			// the placeholders into Lura's form.
			for i := range tc.wantPattern {
				if got := a.Backend[i].URLPattern; got != written[i] {
					fail("Check changed backend[%d].URLPattern from %q to %q", i, written[i], got)
				}
			}
			if err == nil {
				if _, err := asyncamqp.Prepare(a); err != nil {
					fail("Prepare: %v", err)
				}
			}
			for i, want := range tc.wantPattern {
				if got := a.Backend[i].URLPattern; err == nil && got != want {
					fail("backend[%d].URLPattern = %q after Prepare, want %q", i, got, want)
				}
			}
			xfail(t, tc.knownBug, failures)
		})
	}

	t.Run("nil agent", func(t *testing.T) {
		if err := asyncamqp.Check(nil); err == nil {
			t.Error("Check(nil): no error")
		}
	})

	t.Run("idempotent", func(t *testing.T) {
		a := unitAgent("unit", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(nil)})
		for i := 0; i < 2; i++ {
			if err := asyncamqp.Check(a); err != nil {
				t.Fatalf("Check #%d: %v", i+1, err)
			}
		}
		for i := 0; i < 2; i++ {
			if _, err := asyncamqp.Prepare(a); err != nil {
				t.Fatalf("Prepare #%d: %v", i+1, err)
			}
		}
		if got := a.Backend[0].URLPattern; got != "/events/{{.Routing_key}}" {
			t.Errorf("URLPattern after two checks and two prepares = %q", got)
		}
		if err := asyncamqp.Check(a); err != nil {
			t.Errorf("Check of a prepared agent: %v", err)
		}
	})

	t.Run("no block", func(t *testing.T) {
		err := asyncamqp.Check(unitAgent("unit", luraconfig.ExtraConfig{}))
		if !errors.Is(err, config.ErrNoConfig) {
			t.Errorf("Check error = %v, want one wrapping config.ErrNoConfig", err)
		}
		if err != nil && !strings.Contains(err.Error(), `agent "unit"`) {
			t.Errorf("error %q does not name the agent", err)
		}
	})

	t.Run("errors are FieldErrors underneath", func(t *testing.T) {
		a := unitAgent("unit", luraconfig.ExtraConfig{asyncamqp.Namespace: unitBlock(map[string]interface{}{"name": nil})})
		var fe *config.FieldError
		if err := asyncamqp.Check(a); !errors.As(err, &fe) || fe.Field != "name" {
			t.Errorf("Check error %v: want a *config.FieldError for name", err)
		}
	})
}

func TestPluginNamespaces(t *testing.T) {
	if asyncamqp.Namespace != "async/amqp" {
		t.Errorf("Namespace = %q", asyncamqp.Namespace)
	}
	if asyncamqp.LegacyNamespace != "github.com/devopsfaith/krakend-amqp/agent" {
		t.Errorf("LegacyNamespace = %q", asyncamqp.LegacyNamespace)
	}
}

// A Lura/KrakenD build registers the driver in its async.AgentStarter,
// ahead of any other AMQP factory, and starts every async_agent of the
// configuration with it. (Not run: it needs a krakend.json and a broker.)
func ExampleStartAgent() {
	cfg, err := luraconfig.NewParser().Parse("krakend.json")
	if err != nil {
		fmt.Println(err)
		return
	}
	logger, _ := logging.NewLogger("INFO", nil, "[KRAKEND]")
	ctx, stop := context.WithCancel(context.Background())
	defer stop()

	agentPing := make(chan string, len(cfg.AsyncAgents))
	go func() {
		for name := range agentPing {
			_ = name // feed the /__health endpoint
		}
	}()

	starter := async.AgentStarter{asyncamqp.StartAgent}
	wait := starter.Start(ctx, cfg.AsyncAgents, logger, agentPing, proxy.DefaultFactory(logger))
	if err := wait(); err != nil {
		fmt.Println(err)
	}
}

// A build that keeps its OpenTelemetry providers to itself, as KrakenD
// does in krakend-otel's state, gives them to the driver; a KrakenD CE
// build passes its getter: NewFactory(WithTelemetryFrom(state.GlobalState)).
// Whatever is not given is OpenTelemetry's global. (Not run: it needs a
// krakend.json and a broker.)
func ExampleNewFactory() {
	cfg, err := luraconfig.NewParser().Parse("krakend.json")
	if err != nil {
		fmt.Println(err)
		return
	}
	logger, _ := logging.NewLogger("INFO", nil, "[KRAKEND]")
	ctx, stop := context.WithCancel(context.Background())
	defer stop()

	// In a real build: the SDK providers the build exports with.
	meters := metricnoop.NewMeterProvider()
	tracers := tracenoop.NewTracerProvider()
	factory := asyncamqp.NewFactory(
		asyncamqp.WithMeterProvider(meters),
		asyncamqp.WithTracerProvider(tracers),
		asyncamqp.WithPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})),
	)

	agentPing := make(chan string, len(cfg.AsyncAgents))
	wait := async.AgentStarter{factory}.Start(ctx, cfg.AsyncAgents, logger, agentPing, proxy.DefaultFactory(logger))
	if err := wait(); err != nil {
		fmt.Println(err)
	}
}

// Check validates an agent before start, as the gateway's check command
// does, without changing it: StartAgent rewrites the url_pattern
// placeholders into Lura's form when it starts the agent.
func ExampleCheck() {
	agent := &luraconfig.AsyncAgent{
		Name:     "orders",
		Consumer: luraconfig.Consumer{Topic: "orders.*"},
		Backend:  []*luraconfig.Backend{{URLPattern: "/orders/{routing_key}/{message_id}"}},
		ExtraConfig: luraconfig.ExtraConfig{
			asyncamqp.Namespace: map[string]interface{}{
				"host":     "amqp://guest:guest@localhost:5672/",
				"name":     "orders-queue",
				"exchange": "orders",
			},
		},
	}
	if err := asyncamqp.Check(agent); err != nil {
		fmt.Println(err)
	}
	fmt.Println(agent.Backend[0].URLPattern)

	agent.ExtraConfig[asyncamqp.Namespace] = map[string]interface{}{"host": "amqp://guest:guest@localhost:5672/", "name": "orders-queue"}
	fmt.Println(asyncamqp.Check(agent))
	// Output:
	// /orders/{routing_key}/{message_id}
	// agent "orders": extra_config.async/amqp.exchange: required, and must not be empty
}

func TestWarnings(t *testing.T) {
	for _, tc := range []struct {
		over map[string]interface{}
		want []string
	}{
		{nil, nil},
		{map[string]interface{}{"delete": true}, []string{`agent "w": delete or exclusive with the driver's retries`}},
		{map[string]interface{}{"exclusive": true}, []string{"the broker drops it if the queue is gone"}},
		{map[string]interface{}{"delete": true, "nack_discard": true}, nil},
		{map[string]interface{}{"delete": true, "auto_ack": true}, nil},
		{map[string]interface{}{"tls": map[string]interface{}{"insecure_skip_verify": true}, "host": "amqps://u:p@h/"}, []string{"insecure_skip_verify"}},
		// RabbitMQ 4 readiness.
		{map[string]interface{}{"durable": nil}, []string{`agent "w": durable false and exclusive false`}},
		{map[string]interface{}{"durable": false, "topology": "passive"}, nil},
		{map[string]interface{}{"durable": false, "exclusive": true, "auto_ack": true}, nil},
		{map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-mode": "lazy"}}, []string{"x-queue-mode lazy: RabbitMQ 4.3"}},
		{map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-version": 1}}, []string{"x-queue-version 1: RabbitMQ 4.3"}},
		{map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-version": 2}}, nil},
		{map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-master-locator": "min-masters"}}, []string{"x-queue-master-locator: RabbitMQ 4.3 and newer refuse it"}},
		{map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-type": "quorum"}}, []string{"x-delivery-limit: RabbitMQ 4.0 and newer give it a limit of 20"}},
		{map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-type": "quorum", "x-delivery-limit": 50}}, nil},
		{map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-type": "quorum", "x-delivery-limit": 0}}, []string{"x-delivery-limit 0: the quorum queue drops a message"}},
	} {
		block := unitBlock(map[string]interface{}{"durable": true})
		for k, v := range tc.over {
			if v == nil {
				delete(block, k)
				continue
			}
			block[k] = v
		}
		got := asyncamqp.Warnings(unitAgent("w", blocks(block)))
		if len(got) != len(tc.want) {
			t.Errorf("%v: warnings %q, want %d", tc.over, got, len(tc.want))
			continue
		}
		for i, w := range tc.want {
			if !strings.Contains(got[i], w) {
				t.Errorf("%v: warning %q lacks %q", tc.over, got[i], w)
			}
		}
	}
	if got := asyncamqp.Warnings(unitAgent("other", luraconfig.ExtraConfig{})); got != nil {
		t.Errorf("an agent of another driver: %q", got)
	}
}

// otelState has the methods of KrakenD's telemetry state (krakend-otel's
// state.OTEL) that the driver uses.
type otelState struct{}

func (otelState) MeterProvider() metric.MeterProvider       { return metricnoop.NewMeterProvider() }
func (otelState) TracerProvider() trace.TracerProvider      { return tracenoop.NewTracerProvider() }
func (otelState) Propagator() propagation.TextMapPropagator { return propagation.TraceContext{} }

// A KrakenD CE build passes krakend-otel's getter as it is:
// asyncamqp.NewFactory(asyncamqp.WithTelemetryFrom(state.GlobalState)).
// The getter is asked each time an agent starts, after KrakenD has set its
// telemetry up; a nil result leaves the agent on OpenTelemetry's globals.
func ExampleWithTelemetryFrom() {
	var current *otelState // set up later, before the agents start
	globalState := func() *otelState { return current }

	factory := asyncamqp.NewFactory(asyncamqp.WithTelemetryFrom(globalState))
	current = &otelState{}

	starter := async.AgentStarter{factory}
	fmt.Println(len(starter), "factory")
	// Output: 1 factory
}

// Warnings says what in a valid agent works at a cost; a check command
// prints them beside Check's errors.
func ExampleWarnings() {
	agent := &luraconfig.AsyncAgent{
		Name:     "orders",
		Consumer: luraconfig.Consumer{Topic: "orders.*"},
		ExtraConfig: luraconfig.ExtraConfig{
			asyncamqp.Namespace: map[string]interface{}{
				"host": "amqp://guest:guest@localhost:5672/", "name": "orders-queue", "exchange": "orders",
				"durable": true, "delete": true,
			},
		},
	}
	fmt.Println(asyncamqp.Check(agent))
	for _, w := range asyncamqp.Warnings(agent) {
		fmt.Println(w)
	}
	// Output:
	// <nil>
	// agent "orders": delete or exclusive with the driver's retries: a retry copy comes back to the queue through the broker's dead-lettering after its delay, and the broker drops it if the queue is gone by then (an auto-delete queue once its last consumer leaves, an exclusive one with its connection); use a durable, shared queue, or nack_discard
}

// TestExtensionBlock covers the two blocks: KrakenD's fields in
// async/amqp (or the legacy key), the driver's own in its namespace.
func TestExtensionBlock(t *testing.T) {
	std := func(over map[string]interface{}) map[string]interface{} {
		return unitBlock(mergeMaps(map[string]interface{}{"durable": true}, over))
	}
	for _, tc := range []struct {
		name  string
		extra luraconfig.ExtraConfig
		want  []string // substrings of the Check error, in order; none: valid
	}{
		{"both blocks", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(nil),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"retry": map[string]interface{}{"delay": "2s"}, "shutdown_timeout": "5s"},
		}, nil},
		{"comment keys", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(map[string]interface{}{"@comment": "orders", "$x": 1, "_y": 2, "#z": 3}),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"@comment": "retries"},
		}, nil},
		{"error in the new block names it", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(nil),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"retry": map[string]interface{}{"delay": "soon"}},
		}, []string{`agent "unit": extra_config.github.com/krakend-contrib/async-amqp.retry.delay: must be a duration`}},
		{"error beside the legacy key", luraconfig.ExtraConfig{
			asyncamqp.LegacyNamespace:    std(map[string]interface{}{"prefetch_count": "ten"}),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"max_body_bytes": -1},
		}, []string{
			`agent "unit": extra_config.github.com/krakend-contrib/async-amqp.max_body_bytes: must be between 0`,
			`agent "unit": extra_config.async/amqp (github.com/devopsfaith/krakend-amqp/agent).prefetch_count: must be a whole number`,
		}},
		{"old placement names async/amqp", luraconfig.ExtraConfig{
			asyncamqp.Namespace: std(map[string]interface{}{"retry": map[string]interface{}{"delay": "soon"}}),
		}, []string{`agent "unit": extra_config.async/amqp.retry.delay: must be a duration`}},
		{"cross-field error in the new block", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(nil),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"tls": map[string]interface{}{}},
		}, []string{`extra_config.github.com/krakend-contrib/async-amqp.tls: applies to amqps:// hosts only`}},
		{"set in both places", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(map[string]interface{}{"shutdown_timeout": "1s"}),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"shutdown_timeout": "5s"},
		}, []string{`extra_config.github.com/krakend-contrib/async-amqp.shutdown_timeout: also set in extra_config.async/amqp`}},
		{"standard field in the new block", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(nil),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"prefetch_count": 5},
		}, []string{`extra_config.github.com/krakend-contrib/async-amqp.prefetch_count: is one of KrakenD's own fields: it belongs in extra_config.async/amqp`}},
		{"unknown field in the new block", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(nil),
			asyncamqp.ExtensionNamespace: map[string]interface{}{"Retry": map[string]interface{}{}},
		}, []string{`extra_config.github.com/krakend-contrib/async-amqp.Retry: unknown field (did you mean "retry"?)`}},
		{"new block not an object", luraconfig.ExtraConfig{
			asyncamqp.Namespace:          std(nil),
			asyncamqp.ExtensionNamespace: "retry",
		}, []string{`agent "unit": extra_config.github.com/krakend-contrib/async-amqp: the block must be an object, got a string`}},
		{"new block alone", luraconfig.ExtraConfig{
			asyncamqp.ExtensionNamespace: map[string]interface{}{"shutdown_timeout": "5s"},
		}, []string{`agent "unit": no async/amqp block in extra_config: extra_config.github.com/krakend-contrib/async-amqp holds the driver's extensions and needs an "async/amqp" block beside it`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := asyncamqp.Check(unitAgent("unit", tc.extra))
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Check: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Check accepted it, want %q", tc.want)
			}
			lines := strings.Split(err.Error(), "\n")
			if len(lines) != len(tc.want) {
				t.Fatalf("Check: %d problems, want %d:\n%v", len(lines), len(tc.want), err)
			}
			for i, w := range tc.want {
				if !strings.Contains(lines[i], w) {
					t.Errorf("problem %d %q lacks %q", i, lines[i], w)
				}
			}
		})
	}
}

// TestExtensionBlockAloneIsNotTaken: an agent with the new block and no
// async/amqp block is not this driver's, and the factory says so at once.
func TestExtensionBlockAloneIsNotTaken(t *testing.T) {
	agent := unitAgent("unit", luraconfig.ExtraConfig{asyncamqp.ExtensionNamespace: map[string]interface{}{"shutdown_timeout": "5s"}})
	if asyncamqp.StartAgent(context.Background(), async.Options{Agent: agent, Logger: logging.NoOp}) {
		t.Error("StartAgent took an agent without an async/amqp block")
	}
}

// TestDeprecatedPlacementWarns: extension fields in async/amqp and the
// legacy key still work, with a warning naming each and what to change.
func TestDeprecatedPlacementWarns(t *testing.T) {
	for _, key := range []string{asyncamqp.Namespace, asyncamqp.LegacyNamespace} {
		block := unitBlock(map[string]interface{}{"durable": true, "shutdown_timeout": "5s", "retry": map[string]interface{}{"delay": "2s"}})
		agent := unitAgent("old", luraconfig.ExtraConfig{key: block})
		if err := asyncamqp.Check(agent); err != nil {
			t.Fatalf("%s: Check: %v", key, err)
		}
		got := asyncamqp.Warnings(agent)
		path := "extra_config.async/amqp"
		if key == asyncamqp.LegacyNamespace {
			path += " (" + asyncamqp.LegacyNamespace + ")"
		}
		want := []string{`agent "old": ` + path + `: retry, shutdown_timeout: deprecated placement, still read: KrakenD's schema allows ` +
			"only its own fields in async/amqp, so `krakend check --lint` fails on them; move them to extra_config.github.com/krakend-contrib/async-amqp"}
		if key == asyncamqp.LegacyNamespace {
			want = append([]string{`agent "old": extra_config.` + asyncamqp.LegacyNamespace + `: the legacy key, still read: KrakenD's schema wants ` +
				`"async/amqp" in an agent's extra_config, so ` + "`krakend check --lint`" + ` fails on this agent; rename the block to "async/amqp"`}, want...)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: warnings %q, want %q", key, got, want)
		}
	}
	// The new layout says nothing of it.
	agent := unitAgent("new", blocks(unitBlock(map[string]interface{}{"durable": true, "shutdown_timeout": "5s"})))
	if got := asyncamqp.Warnings(agent); len(got) != 0 {
		t.Errorf("new layout: warnings %q", got)
	}
}

func mergeMaps(a, b map[string]interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// TestWithPreparedParsesOnce: a factory given a Prepared agent starts it
// from what Prepare found; it does not read the agent's blocks again.
func TestWithPreparedParsesOnce(t *testing.T) {
	agent := unitAgent("once", blocks(unitBlock(map[string]interface{}{"durable": true, "shutdown_timeout": "5s"})))
	p, err := asyncamqp.Prepare(agent)
	if err != nil {
		t.Fatal(err)
	}
	if p.Config().ShutdownTimeout != 5*time.Second || len(p.Warnings()) != 0 {
		t.Fatalf("Prepare: %+v, warnings %q", p.Config(), p.Warnings())
	}
	// Were the blocks read again, the agent would not start.
	agent.ExtraConfig[asyncamqp.Namespace] = map[string]interface{}{"prefetch_count": "ten"}
	logger, buf := unitLogger(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var g errgroup.Group
	ok := asyncamqp.NewFactory(asyncamqp.WithPrepared(p))(ctx, async.Options{
		Agent:          agent,
		Proxy:          noProxy(t),
		G:              &g,
		ShouldContinue: func(int) bool { return false },
		BackoffF:       func(int) time.Duration { return time.Millisecond },
		Logger:         logger,
	})
	if !ok {
		t.Fatal("the factory did not take the prepared agent")
	}
	if err := g.Wait(); err != nil {
		t.Errorf("the agent returned %v into the errgroup", err)
	}
	if strings.Contains(buf.String(), "invalid configuration") {
		t.Errorf("the factory parsed the blocks again:\n%s", buf.String())
	}
	// Another agent is parsed as usual.
	other := unitAgent("other", luraconfig.ExtraConfig{asyncamqp.Namespace: map[string]interface{}{"prefetch_count": "ten"}})
	if !asyncamqp.NewFactory(asyncamqp.WithPrepared(p))(ctx, async.Options{Agent: other, G: &g, Logger: logger}) ||
		!strings.Contains(buf.String(), `agent "other": extra_config.async/amqp.prefetch_count`) {
		t.Errorf("an agent not prepared was not parsed:\n%s", buf.String())
	}
}
