package asyncamqp

import (
	"fmt"

	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// Telemetry is what a build gives the driver to report on: where its
// metrics and consumer spans go, and how trace context crosses the broker.
// KrakenD keeps these in its own telemetry state (krakend-otel's
// state.OTEL), not in OpenTelemetry's globals; that state has these
// methods. A method may return nil: that one falls back to the global.
type Telemetry interface {
	MeterProvider() metric.MeterProvider
	TracerProvider() trace.TracerProvider
	Propagator() propagation.TextMapPropagator
}

// Option sets up the factory that NewFactory returns.
type Option func(*settings)

// settings are the options of a factory. Providers given one by one win
// over those of a Telemetry; what neither gives is OpenTelemetry's global.
type settings struct {
	meterProvider  metric.MeterProvider
	tracerProvider trace.TracerProvider
	propagator     propagation.TextMapPropagator
	telemetry      func() Telemetry
	// prepared are agents validated already (WithPrepared).
	prepared map[*luraconfig.AsyncAgent]prepared
}

// WithPrepared gives the factory agents Prepare found valid: it starts
// each of them from what Prepare found, without parsing its blocks or
// reading its TLS files again. Other agents are parsed as usual.
func WithPrepared(agents ...*Prepared) Option {
	return func(s *settings) {
		if s.prepared == nil {
			s.prepared = map[*luraconfig.AsyncAgent]prepared{}
		}
		for _, a := range agents {
			if a != nil {
				s.prepared[a.agent] = a.p
			}
		}
	}
}

// WithTelemetry records every agent's metrics and spans on t.
func WithTelemetry(t Telemetry) Option {
	return func(s *settings) { s.telemetry = func() Telemetry { return t } }
}

// WithTelemetryFrom asks get for the telemetry each time an agent starts,
// for builds that set their telemetry up after building the agent
// starter. KrakenD registers its telemetry before it starts the agents,
// so a KrakenD build passes krakend-otel's getter as it is:
//
//	asyncamqp.NewFactory(asyncamqp.WithTelemetryFrom(state.GlobalState))
//
// A nil result, as before any telemetry is configured, means the globals.
func WithTelemetryFrom[T Telemetry](get func() T) Option {
	return func(s *settings) {
		if get == nil {
			s.telemetry = nil
			return
		}
		s.telemetry = func() Telemetry {
			t := get()
			if Telemetry(t) == nil {
				return nil
			}
			return t
		}
	}
}

// WithMeterProvider records every agent's metrics on mp.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(s *settings) { s.meterProvider = mp }
}

// WithTracerProvider records every agent's consumer spans on tp.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(s *settings) { s.tracerProvider = tp }
}

// WithPropagator reads the publisher's trace context from message headers,
// and writes it into backend requests, with p.
func WithPropagator(p propagation.TextMapPropagator) Option {
	return func(s *settings) { s.propagator = p }
}

// providers resolves the telemetry of an agent that starts now. A getter
// or a provider method that panics (a typed nil, say) is reported once
// and counts as nil: an agent never fails to start over telemetry.
func (s settings) providers(logger logging.Logger, prefix string) (mp metric.MeterProvider, tp trace.TracerProvider, p propagation.TextMapPropagator) {
	mp, tp, p = s.meterProvider, s.tracerProvider, s.propagator
	if s.telemetry == nil {
		return mp, tp, p
	}
	defer func() {
		if r := recover(); r != nil {
			logger.Warning(prefix, fmt.Sprintf("the build's telemetry failed (%v): using OpenTelemetry's global providers", r))
			mp, tp, p = s.meterProvider, s.tracerProvider, s.propagator
		}
	}()
	t := s.telemetry()
	if t == nil {
		return mp, tp, p
	}
	if mp == nil {
		mp = t.MeterProvider()
	}
	if tp == nil {
		tp = t.TracerProvider()
	}
	if p == nil {
		p = t.Propagator()
	}
	return mp, tp, p
}
