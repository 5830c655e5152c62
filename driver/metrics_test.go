package driver

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// collect reads every int64 sum of the reader, keyed by instrument name
// and outcome attribute ("" when none).
func collect(t *testing.T, r *sdkmetric.ManualReader) map[string]int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch data := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range data.DataPoints {
					outcome, _ := p.Attributes.Value(attribute.Key("outcome"))
					out[m.Name+"/"+outcome.AsString()] += p.Value
				}
			case metricdata.Histogram[float64]:
				for _, p := range data.DataPoints {
					out[m.Name+"/count"] += int64(p.Count)
				}
			}
		}
	}
	return out
}

func TestMetricsCountEveryOutcomeOnce(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	meter := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("test")
	p := &outcomeProxy{}
	a := New(Options{Name: "m", Session: consumer.Settings{Topology: consumer.Topology{Queue: "q"}},
		Workers: 1, Timeout: time.Minute, Proxy: p.proxy, Logger: logging.NoOp, Meter: meter})
	acker := &fakeAcker{}
	a.work(context.Background(), deliveries(acker, "ok", "500", "err", "ok", "404"))

	got := collect(t, reader)
	want := map[string]int64{
		"messaging.client.consumed.messages/":   5,
		"krakend.amqp.messages.settled/acked":   2,
		"krakend.amqp.messages.settled/retried": 3,
		"messaging.process.duration/count":      5,
		"krakend.amqp.dispatches.in_flight/":    0,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %d, want %d (all: %v)", k, got[k], v, got)
		}
	}
}

func TestMetricsCountRefusedAcksAsUnsettled(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	meter := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("test")
	p := &outcomeProxy{}
	a := New(Options{Name: "m", Workers: 1, Timeout: time.Minute, Proxy: p.proxy, Logger: logging.NoOp, Meter: meter})
	a.work(context.Background(), deliveries(&fakeAcker{err: context.Canceled}, "ok", "ok"))
	if got := collect(t, reader)["krakend.amqp.messages.settled/unsettled"]; got != 2 {
		t.Errorf("unsettled = %d, want 2", got)
	}
}

func TestJudgeClassesFailures(t *testing.T) {
	for _, tc := range []struct {
		resp *proxy.Response
		err  error
		want string
	}{
		{&proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil, ""},
		{&proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 503}}, nil, "http_status"},
		{nil, fmt.Errorf("wrapped: %w", context.DeadlineExceeded), "timeout"},
		{nil, errors.New("connection refused"), "error"},
		{nil, nil, "no_response"},
		{&proxy.Response{}, nil, "incomplete"},
	} {
		if got := judge(tc.resp, tc.err).kind; got != tc.want {
			t.Errorf("judge(%v, %v).kind = %q, want %q", tc.resp, tc.err, got, tc.want)
		}
	}
}
