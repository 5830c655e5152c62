package driver

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// Scope is the OpenTelemetry instrumentation scope of the driver.
const Scope = "github.com/krakend-contrib/async-amqp"

// Outcomes of a received message, the values of the outcome attribute of
// krakend.amqp.messages.settled. Each received message ends in exactly
// one of them.
const (
	OutcomeAcked        = "acked"
	OutcomeRequeued     = "requeued"
	OutcomeRetried      = "retried"
	OutcomeDeadLettered = "dead_lettered"
	OutcomeDiscarded    = "discarded"
	OutcomeAutoAcked    = "auto_acked"
	// OutcomeUnsettled: the ack or nack was refused (closed channel);
	// the broker redelivers the message.
	OutcomeUnsettled = "unsettled"
)

// metrics are the agent's instruments. Names follow the OpenTelemetry
// messaging conventions where they exist (received messages, process
// duration); the rest carry the krakend.amqp prefix.
type metrics struct {
	guard *guard
	attrs metric.MeasurementOption
	// by outcome and by dispatch result, built once: per-message
	// attribute sets would allocate on the hot path.
	outcomes  map[string]metric.MeasurementOption
	failures  map[string]metric.MeasurementOption // by error.type
	received  metric.Int64Counter
	settled   metric.Int64Counter
	duration  metric.Float64Histogram
	inFlight  metric.Int64UpDownCounter
	reconnect metric.Int64Counter
	held      metric.Int64UpDownCounter
	replies   metric.Int64Counter
	replied   map[string]metric.MeasurementOption // by reply outcome
	connected atomic.Int64
	blocked   atomic.Int64
	heldCount atomic.Int64
}

// guard keeps a bug in the build's telemetry (its MeterProvider,
// TracerProvider or propagator) from taking the gateway down or stopping
// a message: every call into them is made under a deferred catch, which
// recovers the panic and logs the first one at ERROR, once per agent.
// The call's measurement or span is lost; the message goes on. A nil
// guard recovers without logging.
type guard struct {
	log    logger
	logged atomic.Bool
}

// catch must be deferred directly: it recovers the panic of the call it
// guards. what names the telemetry that panicked.
func (g *guard) catch(what string) {
	if p := recover(); p != nil && g != nil && g.logged.CompareAndSwap(false, true) {
		g.log.Error(fmt.Sprintf("the build's %s panicked: %s; the agent goes on without it (further telemetry panics are not logged)",
			what, OneLine(fmt.Sprint(p))))
	}
}

// Where a telemetry panic came from, for its log line.
const (
	fromMeter  = "OpenTelemetry MeterProvider"
	fromTracer = "OpenTelemetry TracerProvider or propagator"
)

// newMetrics builds the agent's instruments; holding reads the
// back-pressure state (the workers and no pace without back-pressure).
// An instrument the build's provider fails to make, or panics making, is
// a no-op one.
func newMetrics(provider metric.MeterProvider, agent, queue string, holding func() pressureState, g *guard) *metrics {
	if provider == nil {
		provider = otel.GetMeterProvider()
	}
	if provider == nil { // a global set to nil
		provider = noop.NewMeterProvider()
	}
	base := []attribute.KeyValue{
		attribute.String("messaging.system", "rabbitmq"),
		attribute.String("messaging.destination.name", queue),
		attribute.String("krakend.async_agent", agent),
	}
	with := func(k, v string) metric.MeasurementOption {
		return metric.WithAttributeSet(attribute.NewSet(append(base[:len(base):len(base)], attribute.String(k, v))...))
	}
	m := &metrics{guard: g, attrs: metric.WithAttributeSet(attribute.NewSet(base...)), outcomes: map[string]metric.MeasurementOption{}}
	for _, o := range []string{OutcomeAcked, OutcomeRequeued, OutcomeRetried, OutcomeDeadLettered, OutcomeDiscarded, OutcomeAutoAcked, OutcomeUnsettled, OutcomeParked} {
		m.outcomes[o] = with("outcome", o)
	}
	m.replied = map[string]metric.MeasurementOption{}
	for _, o := range replyOutcomes {
		m.replied[o] = with("outcome", o)
	}
	m.failures = map[string]metric.MeasurementOption{}
	for _, kind := range []string{"timeout", "http_status", "incomplete", "no_response", "panic", kindTooLarge, "error"} {
		m.failures[kind] = with("error.type", kind)
	}
	m.instruments(provider, holding)
	var none noop.Meter
	if m.received == nil {
		m.received, _ = none.Int64Counter("")
	}
	if m.settled == nil {
		m.settled, _ = none.Int64Counter("")
	}
	if m.duration == nil {
		m.duration, _ = none.Float64Histogram("")
	}
	if m.inFlight == nil {
		m.inFlight, _ = none.Int64UpDownCounter("")
	}
	if m.reconnect == nil {
		m.reconnect, _ = none.Int64Counter("")
	}
	if m.held == nil {
		m.held, _ = none.Int64UpDownCounter("")
	}
	if m.replies == nil {
		m.replies, _ = none.Int64Counter("")
	}
	return m
}

// instruments makes the instruments on the build's provider and
// registers the gauges' callback; a panic leaves the rest unmade.
func (m *metrics) instruments(provider metric.MeterProvider, holding func() pressureState) {
	defer m.guard.catch(fromMeter)
	meter := provider.Meter(Scope)
	// Instrument creation only fails on invalid names; a failed one is a
	// no-op instrument, never a reason to stop consuming.
	m.received, _ = meter.Int64Counter("messaging.client.consumed.messages",
		metric.WithDescription("Messages delivered to the agent by the broker."), metric.WithUnit("{message}"))
	m.settled, _ = meter.Int64Counter("krakend.amqp.messages.settled",
		metric.WithDescription("Received messages by outcome: acked, requeued, retried, dead_lettered, discarded, auto_acked, unsettled."),
		metric.WithUnit("{message}"))
	m.duration, _ = meter.Float64Histogram("messaging.process.duration",
		metric.WithDescription("Duration of one dispatch through the backend pipeline."), metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	m.inFlight, _ = meter.Int64UpDownCounter("krakend.amqp.dispatches.in_flight",
		metric.WithDescription("Dispatches running now."), metric.WithUnit("{dispatch}"))
	m.reconnect, _ = meter.Int64Counter("krakend.amqp.reconnects",
		metric.WithDescription("Sessions opened again after a lost or failed one."), metric.WithUnit("{reconnect}"))
	m.held, _ = meter.Int64UpDownCounter("krakend.amqp.messages.held",
		metric.WithDescription("Failed messages held unacknowledged because their retry or dead-letter copy could not be made yet."),
		metric.WithUnit("{message}"))
	m.replies, _ = meter.Int64Counter("krakend.amqp.replies",
		metric.WithDescription("Replies to reply_to by outcome: sent, error_sent, unroutable, refused, lost."),
		metric.WithUnit("{reply}"))
	state, _ := meter.Int64ObservableGauge("krakend.amqp.connection.state",
		metric.WithDescription("1 while the agent is connected and consuming, else 0."))
	blocked, _ := meter.Int64ObservableGauge("krakend.amqp.publisher.blocked",
		metric.WithDescription("1 while the broker blocks the agent's publishing connection (memory or disk alarm), else 0."))
	limited, _ := meter.Int64ObservableGauge("krakend.amqp.dispatches.limit",
		metric.WithDescription("Dispatches the agent lets run at once: consumer.workers, less while the backend pushes back (429, 503, timeouts)."),
		metric.WithUnit("{dispatch}"))
	paced, _ := meter.Float64ObservableGauge("krakend.amqp.dispatches.pace",
		metric.WithDescription("Dispatches a second the agent allows while the backend pushes back; 0 when it is not paced."),
		metric.WithUnit("{dispatch}/s"))
	if state != nil && blocked != nil && limited != nil && paced != nil {
		_, _ = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
			defer m.guard.catch(fromMeter) // called by the build's reader
			o.ObserveInt64(state, m.connected.Load(), m.attrs)
			o.ObserveInt64(blocked, m.blocked.Load(), m.attrs)
			s := holding()
			o.ObserveInt64(limited, int64(s.limit), m.attrs)
			o.ObserveFloat64(paced, s.pace, m.attrs)
			return nil
		}, state, blocked, limited, paced)
	}
}

func (m *metrics) onHeld(n int64) {
	m.heldCount.Add(n)
	defer m.guard.catch(fromMeter)
	m.held.Add(context.Background(), n, m.attrs)
}

func (m *metrics) heldNow() int64 { return m.heldCount.Load() }

func (m *metrics) onBlocked(blocked bool) {
	if blocked {
		m.blocked.Store(1)
		return
	}
	m.blocked.Store(0)
}

func (m *metrics) onReceived() {
	defer m.guard.catch(fromMeter)
	m.received.Add(context.Background(), 1, m.attrs)
}

func (m *metrics) onSettled(outcome string) {
	defer m.guard.catch(fromMeter)
	m.settled.Add(context.Background(), 1, m.outcomes[outcome])
}

// onDispatch counts a dispatch in flight; pass its failure class ("" for
// a success) to onDispatched, which records it as OpenTelemetry's
// error.type, as the messaging conventions do.
func (m *metrics) onDispatch() (start time.Time) {
	start = time.Now()
	defer m.guard.catch(fromMeter)
	m.inFlight.Add(context.Background(), 1, m.attrs)
	return start
}

func (m *metrics) onDispatched(start time.Time, failure string) {
	defer m.guard.catch(fromMeter)
	ctx := context.Background()
	m.inFlight.Add(ctx, -1, m.attrs)
	attrs := m.attrs
	if failure != "" {
		attrs = m.failures[failure]
	}
	m.duration.Record(ctx, time.Since(start).Seconds(), attrs)
}

func (m *metrics) onConnected(up bool) {
	if up {
		m.connected.Store(1)
		return
	}
	m.connected.Store(0)
}

func (m *metrics) onReplied(outcome string) {
	defer m.guard.catch(fromMeter)
	m.replies.Add(context.Background(), 1, m.replied[outcome])
}

func (m *metrics) onReconnect() {
	defer m.guard.catch(fromMeter)
	m.reconnect.Add(context.Background(), 1, m.attrs)
}
