package driver

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"

	"github.com/krakend-contrib/async-amqp/consumer"
)

func TestMetricsCountEveryOutcomeOnce(t *testing.T) {
	rec := newMeterRecorder()
	p := &outcomeProxy{}
	a := mustNew(Options{Name: "m", Session: consumer.Settings{Topology: consumer.Topology{Queue: "q"}},
		Workers: 1, Timeout: time.Minute, Proxy: p.proxy, Logger: logging.NoOp, MeterProvider: rec})
	acker := &fakeAcker{}
	a.work(context.Background(), context.Background(), a.flowOf(deliveries(acker, "ok", "500", "err", "ok", "404")))

	got := rec.snapshot()
	want := map[string]int64{
		"messaging.client.consumed.messages/":   5,
		"krakend.amqp.messages.settled/acked":   2,
		"krakend.amqp.messages.settled/retried": 3,
		"messaging.process.duration/":           5,
		"krakend.amqp.dispatches.in_flight/":    0,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %d, want %d (all: %v)", k, got[k], v, got)
		}
	}
}

func TestMetricsCountRefusedAcksAsUnsettled(t *testing.T) {
	rec := newMeterRecorder()
	p := &outcomeProxy{}
	a := mustNew(Options{Name: "m", Workers: 1, Timeout: time.Minute, Proxy: p.proxy, Logger: logging.NoOp, MeterProvider: rec})
	a.work(context.Background(), context.Background(), a.flowOf(deliveries(&fakeAcker{err: context.Canceled}, "ok", "ok")))
	if got := rec.snapshot()["krakend.amqp.messages.settled/unsettled"]; got != 2 {
		t.Errorf("unsettled = %d, want 2", got)
	}
}

// A pipeline that panics is a failed dispatch: its duration carries
// error.type "panic", as the other failures carry theirs.
func TestMetricsRecordAPanickingDispatchAsAFailure(t *testing.T) {
	rec := newMeterRecorder()
	a := mustNew(Options{Name: "m", Workers: 1, Timeout: time.Minute, Logger: logging.NoOp, MeterProvider: rec, NackDiscard: true,
		Proxy: func(context.Context, *proxy.Request) (*proxy.Response, error) { panic("pipeline bug") }})
	a.work(context.Background(), context.Background(), a.flowOf(deliveries(&fakeAcker{}, "ok")))
	got := rec.snapshot()
	if got["messaging.process.duration/"] != 1 || got["messaging.process.duration/error.type=panic/"] != 1 {
		t.Errorf("a panicking dispatch is not recorded with error.type panic: %v", got)
	}
	if got["krakend.amqp.dispatches.in_flight/"] != 0 {
		t.Errorf("in flight after the panic: %v", got)
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

// Every outcome a message can be settled with carries its attribute:
// one without its attribute set would be counted under no outcome.
func TestMetricsKnowEveryOutcome(t *testing.T) {
	rec := newMeterRecorder()
	a := mustNew(Options{Name: "m", Logger: logging.NoOp, MeterProvider: rec})
	outcomes := []string{OutcomeAcked, OutcomeRequeued, OutcomeRetried, OutcomeDeadLettered, OutcomeDiscarded,
		OutcomeAutoAcked, OutcomeUnsettled, OutcomeParked}
	for _, o := range outcomes {
		a.metrics.onSettled(o)
	}
	got := rec.snapshot()
	for _, o := range outcomes {
		if got["krakend.amqp.messages.settled/"+o] != 1 {
			t.Errorf("outcome %s: settled %v", o, got)
		}
	}
}
