//go:build integration

package oteltest_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/async"
	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/driver"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// A trace and a span of the publisher's, as a W3C traceparent carries them.
const (
	publisherTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	publisherSpan  = "00f067aa0ba902b7"
	traceparent    = "00-" + publisherTrace + "-" + publisherSpan + "-01"
)

// krakendState has the shape of KrakenD's telemetry state (krakend-otel's
// state.OTEL): more methods than the driver asks for.
type krakendState interface {
	Tracer() trace.Tracer
	Meter() metric.Meter
	Propagator() propagation.TextMapPropagator
	Shutdown(ctx context.Context)
	MeterProvider() metric.MeterProvider
	TracerProvider() trace.TracerProvider
}

type state struct {
	mp *sdkmetric.MeterProvider
	tp *sdktrace.TracerProvider
}

func (s *state) Tracer() trace.Tracer                      { return s.tp.Tracer("krakend") }
func (s *state) Meter() metric.Meter                       { return s.mp.Meter("krakend") }
func (s *state) Propagator() propagation.TextMapPropagator { return propagation.TraceContext{} }
func (s *state) Shutdown(ctx context.Context)              { _ = s.tp.Shutdown(ctx); _ = s.mp.Shutdown(ctx) }
func (s *state) MeterProvider() metric.MeterProvider       { return s.mp }
func (s *state) TracerProvider() trace.TracerProvider      { return s.tp }

// backend records the headers of every request and answers 500 to
// bodies that say "fail".
type backend struct {
	*httptest.Server
	mu      sync.Mutex
	headers map[string]http.Header // by X-Amqp-Message-Id
}

func newBackend(t *testing.T) *backend {
	b := &backend{headers: map[string]http.Header{}}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		b.mu.Lock()
		b.headers[r.Header.Get(driver.HeaderMessageID)] = r.Header.Clone()
		b.mu.Unlock()
		if string(body) == "fail" {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(b.Close)
	return b
}

func (b *backend) header(id string) (http.Header, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h, ok := b.headers[id]
	return h, ok
}

// startAgent starts one agent through the factory, as KrakenD starts its
// agents, and stops it when the test ends.
func startAgent(t *testing.T, factory async.Factory, backendURL, queue, exchange string) {
	t.Helper()
	doc, _ := json.Marshal(map[string]interface{}{"version": 3, "async_agent": []interface{}{map[string]interface{}{
		"name":       "traced",
		"connection": map[string]interface{}{"max_retries": 3, "health_interval": "1s"},
		"consumer":   map[string]interface{}{"topic": "orders.*", "workers": 2, "timeout": "2s"},
		"backend":    []interface{}{map[string]interface{}{"host": []string{backendURL}, "url_pattern": "/events", "encoding": "no-op"}},
		"extra_config": map[string]interface{}{
			asyncamqp.Namespace: map[string]interface{}{
				"host": brokertest.URL(), "name": queue, "exchange": exchange, "durable": true,
			},
			asyncamqp.ExtensionNamespace: map[string]interface{}{
				"retry": map[string]interface{}{"max_attempts": 5, "delay": "1m"},
			},
		},
	}}})
	cfg, err := luraconfig.NewParserWithFileReader(func(string) ([]byte, error) { return doc, nil }).Parse("krakend.json")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ping := make(chan string, 16)
	wait := async.AgentStarter{factory}.Start(ctx, cfg.AsyncAgents, logging.NoOp, ping, proxy.DefaultFactory(logging.NoOp))
	done := make(chan error, 1)
	go func() { done <- wait() }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("the agent did not stop")
		}
	})
	select {
	case <-ping:
	case <-time.After(20 * time.Second):
		t.Fatal("the agent never pinged")
	}
}

func publish(t *testing.T, pub *brokertest.Publisher, exchange, id, body string, headers amqp.Table) {
	t.Helper()
	pub.Publish(exchange, "orders.created", amqp.Publishing{MessageId: id, Body: []byte(body), Headers: headers})
}

func TestTelemetryGivenByTheBuild(t *testing.T) {
	conn := brokertest.Dial(t)
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	brokertest.Cleanup(t, conn, queue, exchange)
	be := newBackend(t)

	// The global providers record too, so that anything the driver put
	// on them would show.
	globalReader := sdkmetric.NewManualReader()
	globalSpans := tracetest.NewSpanRecorder()
	oldMeters, oldTracers := otel.GetMeterProvider(), otel.GetTracerProvider()
	otel.SetMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(globalReader)))
	otel.SetTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(globalSpans)))
	t.Cleanup(func() {
		otel.SetMeterProvider(oldMeters)
		otel.SetTracerProvider(oldTracers)
	})

	// The build's telemetry is set up after the factory is made and
	// before the agent starts, as in KrakenD.
	var current krakendState
	factory := asyncamqp.NewFactory(asyncamqp.WithTelemetryFrom(func() krakendState { return current }))
	reader := sdkmetric.NewManualReader()
	spans := tracetest.NewSpanRecorder()
	current = &state{
		mp: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)),
		tp: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans)),
	}
	startAgent(t, factory, be.URL, queue, exchange)

	pub := brokertest.NewPublisher(t, conn)
	publish(t, pub, exchange, "traced", "ok", amqp.Table{"traceparent": traceparent, "tracestate": "vendor=1"})
	publish(t, pub, exchange, "untraced", "ok", nil)
	publish(t, pub, exchange, "failing", "fail", amqp.Table{"Traceparent": traceparent})
	brokertest.Eventually(t, 20*time.Second, "three consumer spans", func() bool { return len(spans.Ended()) >= 3 })

	byID := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range spans.Ended() {
		byID[attr(s, "messaging.message.id")] = s
	}
	traced := byID["traced"]
	if traced == nil {
		t.Fatalf("no span for the traced message; spans: %v", names(spans.Ended()))
	}
	checkConsumerSpan(t, traced, exchange, queue)
	if got := traced.SpanContext().TraceID().String(); got != publisherTrace {
		t.Errorf("consumer span trace id %s, want the publisher's %s", got, publisherTrace)
	}
	if got := traced.Parent().SpanID().String(); got != publisherSpan {
		t.Errorf("consumer span parent %s, want the publisher's span %s", got, publisherSpan)
	}
	if got := traced.SpanContext().TraceState().Get("vendor"); got != "1" {
		t.Errorf("tracestate vendor=%q, want 1", got)
	}
	if got := attr(traced, driver.AttrOutcome); got != driver.OutcomeAcked {
		t.Errorf("outcome %q, want acked", got)
	}

	// The backend continues the publisher's trace, under the consumer span.
	h, _ := be.header("traced")
	want := "00-" + publisherTrace + "-" + traced.SpanContext().SpanID().String() + "-01"
	if got := h.Get("Traceparent"); got != want {
		t.Errorf("backend traceparent %q, want %q", got, want)
	}

	// A message with no trace context starts a trace of its own.
	untraced := byID["untraced"]
	if untraced == nil || untraced.Parent().IsValid() || untraced.SpanContext().TraceID().String() == publisherTrace {
		t.Errorf("the untraced message's span should be a root span: %v", untraced)
	}
	if h, _ := be.header("untraced"); untraced != nil && !strings.Contains(h.Get("Traceparent"), untraced.SpanContext().TraceID().String()) {
		t.Errorf("backend traceparent %q, want the consumer span's trace %s", h.Get("Traceparent"), untraced.SpanContext().TraceID())
	}

	// A failed dispatch: the header name's case does not matter, and the
	// span says what became of the message and why.
	failing := byID["failing"]
	if failing == nil {
		t.Fatal("no span for the failing message")
	}
	if failing.SpanContext().TraceID().String() != publisherTrace {
		t.Errorf("a Traceparent header was not read")
	}
	if got := attr(failing, driver.AttrOutcome); got != driver.OutcomeRetried {
		t.Errorf("failing outcome %q, want retried", got)
	}
	if failing.Status().Code != codes.Error || attr(failing, "error.type") != "http_status" {
		t.Errorf("failing span status %v, error.type %q", failing.Status(), attr(failing, "error.type"))
	}

	// Metrics went to the build's provider, nothing to the global one.
	if got := sum(t, reader, "messaging.client.consumed.messages"); got != 3 {
		t.Errorf("consumed messages on the given provider = %d, want 3", got)
	}
	if got := sum(t, reader, "krakend.amqp.messages.settled"); got != 3 {
		t.Errorf("settled messages on the given provider = %d, want 3", got)
	}
	if n := scopeMetrics(t, globalReader); n != 0 {
		t.Errorf("%d metrics of the driver on the global provider", n)
	}
	if n := len(globalSpans.Ended()); n != 0 {
		t.Errorf("%d spans on the global tracer provider", n)
	}
}

// With a propagator and no tracer (as in a gateway without trace export),
// the backend still continues the publisher's trace. The tracer is a no-op
// one, as OpenTelemetry's global is until a build sets it (another test of
// this binary sets the global).
func TestPropagatorAloneCarriesTheTrace(t *testing.T) {
	conn := brokertest.Dial(t)
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	brokertest.Cleanup(t, conn, queue, exchange)
	be := newBackend(t)
	startAgent(t, asyncamqp.NewFactory(
		asyncamqp.WithPropagator(propagation.TraceContext{}), asyncamqp.WithTracerProvider(tracenoop.NewTracerProvider())), be.URL, queue, exchange)

	pub := brokertest.NewPublisher(t, conn)
	publish(t, pub, exchange, "traced", "ok", amqp.Table{"traceparent": traceparent})
	publish(t, pub, exchange, "untraced", "ok", nil)
	brokertest.Eventually(t, 20*time.Second, "both messages at the backend", func() bool {
		_, a := be.header("traced")
		_, b := be.header("untraced")
		return a && b
	})
	h, _ := be.header("traced")
	if got := h.Get("Traceparent"); got != traceparent {
		t.Errorf("backend traceparent %q, want the publisher's %q", got, traceparent)
	}
	if h, _ := be.header("untraced"); h.Get("Traceparent") != "" {
		t.Errorf("a message with no trace context got traceparent %q", h.Get("Traceparent"))
	}
}

func checkConsumerSpan(t *testing.T, s sdktrace.ReadOnlySpan, exchange, queue string) {
	t.Helper()
	if s.Name() != "process "+exchange || s.SpanKind() != trace.SpanKindConsumer {
		t.Errorf("span %q of kind %v, want %q of kind consumer", s.Name(), s.SpanKind(), "process "+exchange)
	}
	for k, want := range map[string]string{
		"messaging.system":                           "rabbitmq",
		"messaging.operation.type":                   "process",
		"messaging.destination.name":                 exchange,
		"messaging.destination.subscription.name":    queue,
		"messaging.rabbitmq.destination.routing_key": "orders.created",
		"messaging.message.id":                       "traced",
		driver.AttrAgent:                             "traced",
		driver.AttrAttempt:                           "1",
	} {
		if got := attr(s, k); got != want {
			t.Errorf("span attribute %s = %q, want %q", k, got, want)
		}
	}
}

func attr(s sdktrace.ReadOnlySpan, key string) string {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

func names(spans []sdktrace.ReadOnlySpan) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name()+" "+attr(s, "messaging.message.id"))
	}
	return out
}

// sum adds up the int64 sums of the driver's scope named name.
func sum(t *testing.T, r *sdkmetric.ManualReader, name string) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if data, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == name && sm.Scope.Name == driver.Scope {
				for _, p := range data.DataPoints {
					total += p.Value
				}
			}
		}
	}
	return total
}

// scopeMetrics counts the metrics of the driver's scope a reader holds.
func scopeMetrics(t *testing.T, r *sdkmetric.ManualReader) int {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name == driver.Scope {
			n += len(sm.Metrics)
		}
	}
	return n
}
