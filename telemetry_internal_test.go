package asyncamqp

import (
	"bytes"
	"strings"
	"testing"

	"github.com/luraproject/lura/v2/logging"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// buildTelemetry is a build's telemetry: values of its own, so that the
// test can tell which provider the driver was given.
type buildTelemetry struct {
	mp metric.MeterProvider
	tp trace.TracerProvider
	p  propagation.TextMapPropagator
}

func (b *buildTelemetry) MeterProvider() metric.MeterProvider       { return b.mp }
func (b *buildTelemetry) TracerProvider() trace.TracerProvider      { return b.tp }
func (b *buildTelemetry) Propagator() propagation.TextMapPropagator { return b.p }

// Providers the test can tell apart: pointers to distinct zero-size values
// may compare equal, so each has a field.
type meters struct {
	metricnoop.MeterProvider
	id int
}

type tracers struct {
	tracenoop.TracerProvider
	id int
}

func resolve(t *testing.T, opts ...Option) (metric.MeterProvider, trace.TracerProvider, propagation.TextMapPropagator, string) {
	t.Helper()
	var s settings
	for _, o := range opts {
		o(&s)
	}
	buf := &bytes.Buffer{}
	logger, _ := logging.NewLogger("WARNING", buf, "")
	mp, tp, p := s.providers(logger, "[x]")
	return mp, tp, p, buf.String()
}

func TestTelemetryResolution(t *testing.T) {
	build := &buildTelemetry{mp: &meters{id: 1}, tp: &tracers{id: 1}, p: propagation.TraceContext{}}
	own := &meters{id: 2}

	mp, tp, p, _ := resolve(t)
	if mp != nil || tp != nil || p != nil {
		t.Errorf("no options: want nil (the globals), got %v %v %v", mp, tp, p)
	}

	mp, tp, p, _ = resolve(t, WithTelemetry(build))
	if mp != build.mp || tp != build.tp || p != build.p {
		t.Errorf("WithTelemetry: got %v %v %v", mp, tp, p)
	}

	// A provider given on its own wins over the build's.
	mp, tp, _, _ = resolve(t, WithMeterProvider(own), WithTelemetry(build))
	if mp != own || tp != build.tp {
		t.Errorf("WithMeterProvider with WithTelemetry: got %v %v", mp, tp)
	}

	// The getter is asked when the agent starts, not when the option is made.
	var current *buildTelemetry
	opt := WithTelemetryFrom(func() *buildTelemetry { return current })
	current = build
	if mp, _, _, _ = resolve(t, opt); mp != build.mp {
		t.Errorf("WithTelemetryFrom: got %v, want the telemetry set after the option", mp)
	}

	// A getter of an interface type returning nil, as krakend-otel's
	// state.GlobalState does before telemetry is configured: the globals.
	type otelState interface {
		Telemetry
		Shutdown()
	}
	mp, tp, p, logs := resolve(t, WithTelemetryFrom(func() otelState { return nil }))
	if mp != nil || tp != nil || p != nil || logs != "" {
		t.Errorf("nil state: got %v %v %v, logs %q", mp, tp, p, logs)
	}

	// A provider method that returns nil leaves that provider to the global.
	mp, tp, _, _ = resolve(t, WithTelemetry(&buildTelemetry{tp: build.tp}))
	if mp != nil || tp != build.tp {
		t.Errorf("partial telemetry: got %v %v", mp, tp)
	}
}

func TestTelemetryThatPanicsFallsBack(t *testing.T) {
	var typedNil *buildTelemetry // its methods dereference nil
	own := &tracers{id: 2}
	mp, tp, p, logs := resolve(t, WithTracerProvider(own), WithTelemetryFrom(func() *buildTelemetry { return typedNil }))
	if mp != nil || tp != own || p != nil {
		t.Errorf("got %v %v %v, want the explicit tracer provider only", mp, tp, p)
	}
	if !strings.Contains(logs, "the build's telemetry failed") {
		t.Errorf("no warning: %q", logs)
	}
	if _, _, _, logs := resolve(t, WithTelemetryFrom[Telemetry](nil)); logs != "" {
		t.Errorf("nil getter: %q", logs)
	}
}
