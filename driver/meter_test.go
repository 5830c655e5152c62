package driver

import (
	"context"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// meterRecorder is a MeterProvider that adds up what the driver records, by
// instrument name and outcome attribute ("" when none); histograms count
// their records under "<name>/", and those with an error.type under
// "<name>/error.type=<type>/" too. The library module leaves the
// OpenTelemetry SDK to the build, so its unit tests record on this; the
// SDK's own reader is used by internal/oteltest.
type meterRecorder struct {
	noop.MeterProvider
	mu     sync.Mutex
	totals map[string]int64
}

func newMeterRecorder() *meterRecorder { return &meterRecorder{totals: map[string]int64{}} }

func (r *meterRecorder) Meter(string, ...metric.MeterOption) metric.Meter {
	return recordingMeter{r: r}
}

func (r *meterRecorder) add(name string, n int64, attrs attribute.Set) {
	outcome, _ := attrs.Value("outcome")
	r.mu.Lock()
	r.totals[name+"/"+outcome.AsString()] += n
	r.mu.Unlock()
}

func (r *meterRecorder) snapshot() map[string]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int64, len(r.totals))
	for k, v := range r.totals {
		out[k] = v
	}
	return out
}

type recordingMeter struct {
	noop.Meter
	r *meterRecorder
}

func (m recordingMeter) Int64Counter(name string, _ ...metric.Int64CounterOption) (metric.Int64Counter, error) {
	return counterRecorder{adder: adder{name: name, r: m.r}}, nil
}

func (m recordingMeter) Int64UpDownCounter(name string, _ ...metric.Int64UpDownCounterOption) (metric.Int64UpDownCounter, error) {
	return upDownRecorder{adder: adder{name: name, r: m.r}}, nil
}

func (m recordingMeter) Float64Histogram(name string, _ ...metric.Float64HistogramOption) (metric.Float64Histogram, error) {
	return histogramRecorder{name: name, r: m.r}, nil
}

type adder struct {
	name string
	r    *meterRecorder
}

func (a adder) Add(_ context.Context, n int64, opts ...metric.AddOption) {
	a.r.add(a.name, n, metric.NewAddConfig(opts).Attributes())
}

type counterRecorder struct {
	noop.Int64Counter
	adder
}

func (c counterRecorder) Add(ctx context.Context, n int64, opts ...metric.AddOption) {
	c.adder.Add(ctx, n, opts...)
}

type upDownRecorder struct {
	noop.Int64UpDownCounter
	adder
}

func (c upDownRecorder) Add(ctx context.Context, n int64, opts ...metric.AddOption) {
	c.adder.Add(ctx, n, opts...)
}

type histogramRecorder struct {
	noop.Float64Histogram
	name string
	r    *meterRecorder
}

func (h histogramRecorder) Record(_ context.Context, _ float64, opts ...metric.RecordOption) {
	h.r.add(h.name, 1, *attribute.EmptySet())
	attrs := metric.NewRecordConfig(opts).Attributes()
	if kind, ok := attrs.Value("error.type"); ok {
		h.r.add(h.name+"/error.type="+kind.AsString(), 1, *attribute.EmptySet())
	}
}
