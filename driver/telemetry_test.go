package driver

import (
	"bytes"
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// The fakes below stand for a build's telemetry with a bug: each panics
// where the driver calls it.

// panickyMeterProvider makes instruments that panic on every call.
type panickyMeterProvider struct{ metricnoop.MeterProvider }

func (panickyMeterProvider) Meter(string, ...metric.MeterOption) metric.Meter { return panickyMeter{} }

type panickyMeter struct{ metricnoop.Meter }

func (panickyMeter) Int64Counter(string, ...metric.Int64CounterOption) (metric.Int64Counter, error) {
	return panickyCounter{}, nil
}

func (panickyMeter) Int64UpDownCounter(string, ...metric.Int64UpDownCounterOption) (metric.Int64UpDownCounter, error) {
	return panickyUpDownCounter{}, nil
}

func (panickyMeter) Float64Histogram(string, ...metric.Float64HistogramOption) (metric.Float64Histogram, error) {
	return panickyHistogram{}, nil
}

type panickyCounter struct{ metricnoop.Int64Counter }

func (panickyCounter) Add(context.Context, int64, ...metric.AddOption) { panic("meter bug: counter") }

type panickyUpDownCounter struct{ metricnoop.Int64UpDownCounter }

func (panickyUpDownCounter) Add(context.Context, int64, ...metric.AddOption) {
	panic("meter bug: up-down counter")
}

type panickyHistogram struct{ metricnoop.Float64Histogram }

func (panickyHistogram) Record(context.Context, float64, ...metric.RecordOption) {
	panic("meter bug: histogram")
}

// brokenMeterProvider panics when asked for a meter.
type brokenMeterProvider struct{ metricnoop.MeterProvider }

func (brokenMeterProvider) Meter(string, ...metric.MeterOption) metric.Meter {
	panic("meter bug: provider")
}

// panickyTracerProvider's tracer panics when it starts a span.
type panickyTracerProvider struct{ tracenoop.TracerProvider }

func (panickyTracerProvider) Tracer(string, ...trace.TracerOption) trace.Tracer {
	return panickyTracer{}
}

type panickyTracer struct{ tracenoop.Tracer }

func (panickyTracer) Start(context.Context, string, ...trace.SpanStartOption) (context.Context, trace.Span) {
	panic("tracer bug: start")
}

// brokenTracerProvider panics when asked for a tracer.
type brokenTracerProvider struct{ tracenoop.TracerProvider }

func (brokenTracerProvider) Tracer(string, ...trace.TracerOption) trace.Tracer {
	panic("tracer bug: provider")
}

// panickySpanProvider's spans panic on every call.
type panickySpanProvider struct{ tracenoop.TracerProvider }

func (panickySpanProvider) Tracer(string, ...trace.TracerOption) trace.Tracer {
	return panickySpanTracer{}
}

type panickySpanTracer struct{ tracenoop.Tracer }

func (panickySpanTracer) Start(ctx context.Context, _ string, _ ...trace.SpanStartOption) (context.Context, trace.Span) {
	s := panickySpan{}
	return trace.ContextWithSpan(ctx, s), s
}

type panickySpan struct{ tracenoop.Span }

func (panickySpan) SpanContext() trace.SpanContext          { panic("tracer bug: span context") }
func (panickySpan) IsRecording() bool                       { panic("tracer bug: is recording") }
func (panickySpan) SetAttributes(...attribute.KeyValue)     {}
func (panickySpan) End(...trace.SpanEndOption)              { panic("tracer bug: end") }
func (panickySpan) SetStatus(codes.Code, string)            {}
func (panickySpan) RecordError(error, ...trace.EventOption) {}
func (panickySpan) AddEvent(string, ...trace.EventOption)   {}
func (panickySpan) SetName(string)                          {}
func (panickySpan) TracerProvider() trace.TracerProvider    { return panickySpanProvider{} }
func (panickySpan) AddLink(trace.Link)                      {}

// injectPanicker reads trace context but panics writing it.
type injectPanicker struct{ propagation.TraceContext }

func (injectPanicker) Inject(context.Context, propagation.TextMapCarrier) {
	panic("propagator bug: inject")
}

// A panic in the build's meter, tracer or propagator takes neither the
// gateway nor the message down: every message is dispatched and acked,
// and one ERROR line names the agent and the panic.
func TestPanicInTheBuildsTelemetryIsRecoveredAndLoggedOnce(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"instruments", Options{MeterProvider: panickyMeterProvider{}}},
		{"meter provider", Options{MeterProvider: brokenMeterProvider{}}},
		{"tracer", Options{TracerProvider: panickyTracerProvider{}}},
		{"tracer provider", Options{TracerProvider: brokenTracerProvider{}}},
		{"spans", Options{TracerProvider: panickySpanProvider{}}},
		{"propagator", Options{TracerProvider: tracenoop.NewTracerProvider(), Propagator: injectPanicker{}}},
		{"everything", Options{MeterProvider: panickyMeterProvider{}, TracerProvider: panickyTracerProvider{}, Propagator: panickyPropagator{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &bytes.Buffer{}
			logger, _ := logging.NewLogger("DEBUG", logs, "")
			opts := tc.opts
			opts.Name, opts.Workers, opts.Timeout, opts.Logger = "telemetry", 1, time.Minute, logger
			opts.Session = consumer.Settings{Topology: consumer.Topology{Exchange: "x", Queue: "q"}}
			var dispatched atomic.Int64
			opts.Proxy = func(context.Context, *proxy.Request) (*proxy.Response, error) {
				dispatched.Add(1)
				return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil
			}
			a := mustNew(opts)
			const n = 3
			ch := make(chan amqp.Delivery, n)
			acker := &fakeAcker{}
			for tag := uint64(1); tag <= n; tag++ {
				ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: tag, Exchange: "x", RoutingKey: "k", Body: []byte("{}"),
					Headers: amqp.Table{"traceparent": testTraceparent}}
			}
			close(ch)
			a.work(context.Background(), context.Background(), a.flowOf(&fakeSession{ch: ch}))

			if got := dispatched.Load(); got != n {
				t.Errorf("%d dispatches, want %d", got, n)
			}
			wantSettled(t, acker, n, ack)
			var errs []string
			for _, line := range strings.Split(logs.String(), "\n") {
				if strings.Contains(line, "ERROR") {
					errs = append(errs, line)
				}
			}
			if len(errs) != 1 || !strings.Contains(errs[0], "[AMQP][telemetry]") || !strings.Contains(errs[0], "bug") {
				t.Errorf("ERROR lines %q, want one naming the agent and the panic; all logs:\n%s", errs, logs)
			}
		})
	}
}
