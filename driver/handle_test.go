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
	"go.opentelemetry.io/otel/propagation"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// panickyPublisher panics on its first n publishes, then records.
type panickyPublisher struct {
	copyRecorder
	panics atomic.Int64
}

func (p *panickyPublisher) Publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	if p.panics.Add(-1) >= 0 {
		panic("publisher bug")
	}
	return p.copyRecorder.Publish(ctx, exchange, key, msg)
}

// panickySession is a one-delivery session whose publisher panics.
type panickySession struct {
	*panickyPublisher
	ch chan amqp.Delivery
}

func (s panickySession) Deliveries() <-chan amqp.Delivery { return s.ch }

func (panickySession) Done() <-chan struct{} { return nil }

func panicAgent(t *testing.T, logs *bytes.Buffer, opts Options) *Agent {
	t.Helper()
	logger, _ := logging.NewLogger("DEBUG", logs, "")
	opts.Name, opts.Workers, opts.Timeout, opts.Logger = "panicky", 1, time.Second, logger
	opts.Session = consumer.Settings{Topology: consumer.Topology{Exchange: "x", Queue: "work"}}
	opts.Retry = config.Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}
	opts.Proxy = func(context.Context, *proxy.Request) (*proxy.Response, error) {
		return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 500}}, nil
	}
	return mustNew(opts)
}

func oneDelivery(acker amqp.Acknowledger) chan amqp.Delivery {
	ch := make(chan amqp.Delivery, 1)
	ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Exchange: "x", RoutingKey: "k", MessageId: "m-1", Body: []byte("{}")}
	close(ch)
	return ch
}

// A panic in the failure path is recovered: one ERROR line naming the
// agent and the reason, then the message takes the failure path again,
// with the panic as its reason, and the worker goes on.
func TestPanicInTheFailurePathIsRecovered(t *testing.T) {
	logs := &bytes.Buffer{}
	a := panicAgent(t, logs, Options{})
	pub := &panickyPublisher{}
	pub.panics.Store(1)
	acker := &fakeAcker{}
	a.work(context.Background(), context.Background(), a.flowOf(panickySession{panickyPublisher: pub, ch: oneDelivery(acker)}))

	if got := routes(pub.copies); len(got) != 1 || got[0] != "/work.retry.1s" {
		t.Fatalf("copies %v, want one retry copy", got)
	}
	if reason, _ := pub.copies[0].msg.Headers[HeaderLastError].(string); !strings.Contains(reason, "panic") || !strings.Contains(reason, "publisher bug") {
		t.Errorf("the copy's %s is %q, want the panic", HeaderLastError, reason)
	}
	wantSettled(t, acker, 1, ack)
	errors := 0
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "ERROR") {
			errors++
			if !strings.Contains(line, "[AMQP][panicky]") || !strings.Contains(line, "publisher bug") || strings.Count(line, "\n") > 0 {
				t.Errorf("ERROR line %q does not name the agent and the reason", line)
			}
		}
	}
	if errors != 1 {
		t.Errorf("%d ERROR lines, want 1:\n%s", errors, logs)
	}
}

// When the failure path panics again, the message is left unacknowledged
// (the broker redelivers it when the session ends): nothing spins and
// the worker takes the next message.
func TestPanicTwiceLeavesTheMessageUnacked(t *testing.T) {
	logs := &bytes.Buffer{}
	a := panicAgent(t, logs, Options{})
	pub := &panickyPublisher{}
	pub.panics.Store(2)
	acker := &fakeAcker{}
	ch := make(chan amqp.Delivery, 2)
	ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, RoutingKey: "k", Body: []byte("{}")}
	ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 2, RoutingKey: "k", Body: []byte("{}")}
	close(ch)
	a.work(context.Background(), context.Background(), a.flowOf(panickySession{panickyPublisher: pub, ch: ch}))

	by := acker.byTag()
	if len(by[1]) != 0 {
		t.Errorf("message 1 was settled %v, want it left unacknowledged", by[1])
	}
	if len(by[2]) != 1 || by[2][0].op != "ack" {
		t.Errorf("message 2 settled %v, want one ack after its retry copy", by[2])
	}
	if !strings.Contains(logs.String(), "stays unacknowledged") {
		t.Errorf("no ERROR line says the message stays unacknowledged:\n%s", logs)
	}
}

// panickyPropagator stands for a build's propagator with a bug.
type panickyPropagator struct{ propagation.TraceContext }

func (panickyPropagator) Extract(context.Context, propagation.TextMapCarrier) context.Context {
	panic("propagator bug")
}

func TestPanicInTheBuildsTelemetryDoesNotStopTheMessage(t *testing.T) {
	logs := &bytes.Buffer{}
	a := panicAgent(t, logs, Options{Propagator: panickyPropagator{}})
	a.opts.Proxy = func(context.Context, *proxy.Request) (*proxy.Response, error) {
		return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil
	}
	acker := &fakeAcker{}
	a.work(context.Background(), context.Background(), a.flowOf(&fakeSession{ch: oneDelivery(acker)}))
	wantSettled(t, acker, 1, ack)
}

// panickyAcker panics when asked to settle.
type panickyAcker struct{ fakeAcker }

func (p *panickyAcker) Ack(uint64, bool) error { panic("acker bug") }

func TestPanicWhileSettlingIsNotSettledTwice(t *testing.T) {
	logs := &bytes.Buffer{}
	a := panicAgent(t, logs, Options{})
	a.opts.Proxy = func(context.Context, *proxy.Request) (*proxy.Response, error) {
		return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil
	}
	acker := &panickyAcker{}
	a.work(context.Background(), context.Background(), a.flowOf(panickySession{panickyPublisher: &panickyPublisher{}, ch: oneDelivery(acker)}))
	if calls := acker.byTag()[1]; len(calls) != 0 {
		t.Errorf("settled again after the panic: %v", calls)
	}
	if !strings.Contains(logs.String(), "acker bug") {
		t.Errorf("the panic is not logged:\n%s", logs)
	}
}
