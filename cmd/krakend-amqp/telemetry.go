package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// telemetry is what the gateway gives the driver: the Prometheus meter
// provider when metrics are on, the OTLP tracer provider when traces are
// on, and the W3C propagator. It is also made OpenTelemetry's global
// telemetry, as the owner of a process does. A nil provider leaves the
// driver on the global, a no-op.
type telemetry struct {
	meters     metric.MeterProvider
	tracers    trace.TracerProvider
	propagator propagation.TextMapPropagator
}

func (t telemetry) MeterProvider() metric.MeterProvider       { return t.meters }
func (t telemetry) TracerProvider() trace.TracerProvider      { return t.tracers }
func (t telemetry) Propagator() propagation.TextMapPropagator { return t.propagator }

// setGlobal makes the gateway's telemetry OpenTelemetry's global one.
func (t telemetry) setGlobal() {
	if t.meters != nil {
		otel.SetMeterProvider(t.meters)
	}
	if t.tracers != nil {
		otel.SetTracerProvider(t.tracers)
	}
	otel.SetTextMapPropagator(t.propagator)
}

// tracesShutdownTimeout bounds the flush of the last spans at exit.
const tracesShutdownTimeout = 5 * time.Second

// serviceResource describes the gateway to both metrics and traces;
// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over its defaults.
func serviceResource() *resource.Resource {
	res, err := resource.New(context.Background(),
		resource.WithAttributes(attribute.String("service.name", "krakend-amqp")),
		resource.WithFromEnv(),
		resource.WithTelemetrySDK())
	if err != nil {
		return resource.Default()
	}
	return res
}

// traceExport is what the standard OTEL_* variables ask of traces.
type traceExport struct {
	on       bool
	protocol string // "http/protobuf" or "grpc"
}

// traceExportFromEnv reads OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER and the
// OTLP protocol variables. Traces are exported when OTEL_TRACES_EXPORTER
// is "otlp", or when it is unset and an OTLP endpoint is set: a gateway
// with no collector configured sends nothing and logs no export errors.
// A value the gateway cannot honour is an error naming the variable.
func traceExportFromEnv(getenv func(string) string) (traceExport, error) {
	if strings.EqualFold(strings.TrimSpace(getenv("OTEL_SDK_DISABLED")), "true") {
		return traceExport{}, nil
	}
	var on bool
	switch exporters := strings.TrimSpace(getenv("OTEL_TRACES_EXPORTER")); exporters {
	case "":
		on = getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != ""
	case "none":
	default:
		for _, e := range strings.Split(exporters, ",") {
			if e = strings.TrimSpace(e); e != "otlp" && e != "none" {
				return traceExport{}, fmt.Errorf("OTEL_TRACES_EXPORTER=%q: krakend-amqp exports traces with otlp only (or none)", exporters)
			}
			on = on || e == "otlp"
		}
	}
	if !on {
		return traceExport{}, nil
	}
	name, protocol := "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		name, protocol = "OTEL_EXPORTER_OTLP_PROTOCOL", getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch protocol {
	case "", "http/protobuf":
		return traceExport{on: true, protocol: "http/protobuf"}, nil
	case "grpc":
		return traceExport{on: true, protocol: "grpc"}, nil
	}
	return traceExport{}, fmt.Errorf("%s=%q: krakend-amqp exports OTLP over http/protobuf or grpc", name, protocol)
}

// startTracing builds the tracer provider that exports the agents' spans
// over OTLP. The exporter reads its endpoint, headers, TLS and timeout
// from the OTEL_EXPORTER_OTLP_* variables, the batcher OTEL_BSP_*, and the
// sampler OTEL_TRACES_SAMPLER; nothing is sent before the first span.
func startTracing(ctx context.Context, e traceExport) (*sdktrace.TracerProvider, error) {
	var (
		exporter sdktrace.SpanExporter
		err      error
	)
	if e.protocol == "grpc" {
		exporter, err = otlptracegrpc.New(ctx)
	} else {
		exporter, err = otlptracehttp.New(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("traces: OTLP exporter: %w", err)
	}
	return sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(serviceResource())), nil
}

// stopTracing sends the spans still buffered, within a bound.
func stopTracing(tp *sdktrace.TracerProvider) error {
	ctx, cancel := context.WithTimeout(context.Background(), tracesShutdownTimeout)
	defer cancel()
	if err := tp.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// newPropagator carries W3C trace context and baggage, as KrakenD does.
func newPropagator() propagation.TextMapPropagator {
	return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
}
