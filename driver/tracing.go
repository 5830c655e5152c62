package driver

import (
	"context"
	"net/http"
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// Span attributes of the consumer span beyond the OpenTelemetry messaging
// conventions.
const (
	// AttrOutcome is what became of the message: one of the Outcome
	// values (acked, retried, dead_lettered...).
	AttrOutcome = "krakend.amqp.outcome"
	// AttrAttempt is the number of this dispatch of the message, as in
	// the X-Amqp-Attempt request header.
	AttrAttempt = "krakend.amqp.attempt"
	// AttrAgent names the async agent, as on the metrics.
	AttrAgent = "krakend.async_agent"
)

// tracing starts one consumer span per message, as a child of the trace
// context the publisher put in the message headers (W3C traceparent,
// tracestate and baggage, through the propagator), and hands that span to
// the backend pipeline in the dispatch context.
type tracing struct {
	guard      *guard
	tracer     trace.Tracer
	propagator propagation.TextMapPropagator
	// name and start are built once: span names and options built per
	// message would allocate on the hot path even with no tracer.
	name  string
	start []trace.SpanStartOption
}

func newTracing(tp trace.TracerProvider, p propagation.TextMapPropagator, agent string, t consumer.Topology, g *guard) *tracing {
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	if tp == nil { // a global set to nil
		tp = tracenoop.NewTracerProvider()
	}
	if p == nil {
		p = otel.GetTextMapPropagator()
	}
	if p == nil {
		p = propagation.NewCompositeTextMapPropagator()
	}
	// The conventions name a span after its operation and destination,
	// the exchange for RabbitMQ; the queue stands in for the default one.
	destination := t.Exchange
	if destination == "" {
		destination = t.Queue
	}
	return &tracing{
		guard:      g,
		tracer:     tracerOf(tp, g),
		propagator: p,
		name:       "process " + destination,
		start: []trace.SpanStartOption{
			trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(
				attribute.String("messaging.system", "rabbitmq"),
				attribute.String("messaging.operation.type", "process"),
				attribute.String("messaging.operation.name", "process"),
				attribute.String("messaging.destination.subscription.name", t.Queue),
				attribute.String(AttrAgent, agent),
			),
		},
	}
}

// tracerOf is the provider's tracer, or a no-op one should the provider
// panic.
func tracerOf(tp trace.TracerProvider, g *guard) (tracer trace.Tracer) {
	defer func() {
		if tracer == nil {
			tracer = tracenoop.NewTracerProvider().Tracer(Scope)
		}
	}()
	defer g.catch(fromTracer)
	return tp.Tracer(Scope)
}

// begin starts the consumer span of a delivery. Its parent is the trace
// context read from the message headers, if any.
// The propagator and the tracer are the build's: a panic in them leaves
// the message without a span, never without its handling.
func (t *tracing) begin(ctx context.Context, d *amqp.Delivery) (spanCtx context.Context, span trace.Span) {
	defer func() {
		if span == nil { // the build's tracer or propagator panicked
			spanCtx, span = ctx, trace.SpanFromContext(context.Background())
		}
	}()
	defer t.guard.catch(fromTracer)
	spanCtx = t.propagator.Extract(ctx, tableCarrier(d.Headers))
	return t.tracer.Start(spanCtx, t.name, t.start...)
}

// end records the message and what became of it, and ends its span. A
// failed dispatch sets the error status with its reason; a message handed
// back undispatched at shutdown is no error. The attributes are set once,
// here, and only on a span that records: a sampler sees those of start.
func (t *tracing) end(span trace.Span, m *message, outcome string, r result) {
	defer t.guard.catch(fromTracer) // the message is settled already
	if span.IsRecording() {
		span.SetAttributes(messageAttributes(m, outcome, r)...)
		if !r.ok && r.kind != "" {
			span.SetStatus(codes.Error, r.reason)
		}
	}
	span.End()
}

// messageAttributes are the span attributes of one message, following the
// messaging conventions for RabbitMQ.
func messageAttributes(m *message, outcome string, r result) []attribute.KeyValue {
	d, key := m.d, m.key
	attrs := make([]attribute.KeyValue, 0, 9)
	attrs = append(attrs,
		attribute.String("messaging.destination.name", m.exchange),
		attribute.Int("messaging.message.body.size", len(d.Body)),
		attribute.Int64("messaging.rabbitmq.message.delivery_tag", int64(d.DeliveryTag)),
		attribute.Int(AttrAttempt, m.attempt()),
		attribute.String(AttrOutcome, outcome),
	)
	if key != "" {
		attrs = append(attrs, attribute.String("messaging.rabbitmq.destination.routing_key", key))
	}
	if d.MessageId != "" {
		attrs = append(attrs, attribute.String("messaging.message.id", d.MessageId))
	}
	if d.CorrelationId != "" {
		attrs = append(attrs, attribute.String("messaging.message.conversation_id", d.CorrelationId))
	}
	if !r.ok && r.kind != "" {
		attrs = append(attrs, attribute.String("error.type", r.kind))
	}
	return attrs
}

// inject writes the dispatch's trace context into the backend request
// headers (traceparent...), so that a backend continues the publisher's
// trace even when nothing in the pipeline injects one. A pipeline that
// instruments its HTTP client replaces them with its own client span's.
func (t *tracing) inject(ctx context.Context, headers map[string][]string) {
	defer t.guard.catch(fromTracer)
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return
	}
	t.propagator.Inject(ctx, propagation.HeaderCarrier(http.Header(headers)))
}

// tableCarrier reads a trace context from AMQP message headers. Names are
// matched exactly first, then regardless of case, since publishers write
// both "traceparent" and "Traceparent". Values that are not text are
// ignored; the propagator validates the rest.
type tableCarrier amqp.Table

func (c tableCarrier) Get(key string) string {
	if v, ok := c[key]; ok {
		return text(v)
	}
	for k, v := range c {
		if strings.EqualFold(k, key) {
			return text(v)
		}
	}
	return ""
}

// Set is never used: the driver reads trace context from messages only.
func (c tableCarrier) Set(string, string) {}

func (c tableCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

func text(v interface{}) string {
	switch s := v.(type) {
	case string:
		return s
	case []byte:
		return string(s)
	}
	return ""
}
