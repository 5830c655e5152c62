package main

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/luraproject/lura/v2/async"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	asyncamqp "github.com/krakend-contrib/async-amqp"
)

// tracedFactory is the driver with a tracer provider that samples every
// span and hands them, in batches, to an exporter that counts and drops
// them: the cost of tracing in the gateway, not of a collector. It
// returns the function that flushes and stops the provider.
func tracedFactory() (async.Factory, func()) {
	exporter := &discardExporter{}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()), sdktrace.WithBatcher(exporter))
	factory := asyncamqp.NewFactory(
		asyncamqp.WithTracerProvider(tp),
		asyncamqp.WithPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})),
	)
	return factory, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = tp.Shutdown(ctx)
		progress("traced: %d spans exported", exporter.spans.Load())
	}
}

// discardExporter counts the spans it is given.
type discardExporter struct{ spans atomic.Int64 }

func (d *discardExporter) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	d.spans.Add(int64(len(spans)))
	return nil
}

func (d *discardExporter) Shutdown(context.Context) error { return nil }
