package driver

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// refusingSession delivers what the test sends and refuses the first
// copies it is asked to publish.
type refusingSession struct {
	copyRecorder
	ch      chan amqp.Delivery
	refuse  atomic.Int64
	refused atomic.Int64
}

func (s *refusingSession) Deliveries() <-chan amqp.Delivery { return s.ch }

func (s *refusingSession) Publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	if s.refuse.Add(-1) >= 0 {
		s.refused.Add(1)
		return consumer.ErrUnroutable
	}
	return s.copyRecorder.Publish(ctx, exchange, key, msg)
}

// A failed message whose copy cannot be made is held: the backend is not
// called for it again, the copy is tried again with a growing wait, and
// the message is acked once its copy is made.
func TestHeldMessagesAreNotDispatchedAgain(t *testing.T) {
	var calls atomic.Int64
	a := mustNew(Options{
		Name: "holder", Workers: 1, Timeout: time.Second, Logger: logging.NoOp,
		Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 10},
		Retry:   config.Retry{MaxAttempts: 3, Delay: 10 * time.Millisecond, MaxDelay: 40 * time.Millisecond, Multiplier: 2},
		Proxy: func(context.Context, *proxy.Request) (*proxy.Response, error) {
			calls.Add(1)
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 503}}, nil
		},
	})
	sess := &refusingSession{ch: make(chan amqp.Delivery, 1)}
	sess.refuse.Store(5)
	acker := &fakeAcker{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.consume(context.Background(), context.Background(), sess, 1)
	}()
	sess.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, RoutingKey: "k", Body: []byte("{}")}

	deadline := time.Now().Add(5 * time.Second)
	for len(acker.byTag()[1]) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	close(sess.ch)
	<-done
	if n := calls.Load(); n != 1 {
		t.Errorf("the backend was called %d times, want once: a held message is not dispatched again", n)
	}
	if n := sess.refused.Load(); n != 5 {
		t.Errorf("%d copies refused, want 5 tries before the one that worked", n)
	}
	if calls := acker.byTag()[1]; len(calls) != 1 || calls[0].op != "ack" {
		t.Errorf("message settled %v, want one ack once its copy was made", calls)
	}
	if got := routes(sess.copies); len(got) != 1 || got[0] != "/work.retry.10ms" {
		t.Errorf("copies %v, want one retry copy", got)
	}
	if n := a.metrics.heldNow(); n != 0 {
		t.Errorf("%d messages still counted held", n)
	}
}

// What is still held when the session ends goes back to the queue with
// it: neither acked nor nacked by the driver.
func TestHeldMessagesGoBackWithTheSession(t *testing.T) {
	a := mustNew(Options{
		Name: "holder", Workers: 1, Timeout: time.Second, Logger: logging.NoOp,
		Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 10},
		Retry:   config.Retry{MaxAttempts: 3, Delay: time.Hour, MaxDelay: time.Hour, Multiplier: 2},
		Proxy: func(context.Context, *proxy.Request) (*proxy.Response, error) {
			return nil, errors.New("connection refused")
		},
	})
	sess := &refusingSession{ch: make(chan amqp.Delivery, 2)}
	sess.refuse.Store(100)
	acker := &fakeAcker{}
	sess.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Body: []byte("{}")}
	sess.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 2, Body: []byte("{}")}
	close(sess.ch)
	a.consume(context.Background(), context.Background(), sess, 1)
	if calls := acker.byTag(); len(calls) != 0 {
		t.Errorf("held messages were settled: %v", calls)
	}
	if n := a.metrics.heldNow(); n != 0 {
		t.Errorf("%d messages still counted held after the session", n)
	}
}

// A message over max_body_bytes never reaches the backend: it is
// dead-lettered at once, with the reason.
func TestTooLargeIsDeadLetteredUndispatched(t *testing.T) {
	var calls atomic.Int64
	a := mustNew(Options{
		Name: "sizer", Workers: 1, Timeout: time.Second, Logger: logging.NoOp, MaxBodyBytes: 8,
		Session:    consumer.Settings{Topology: consumer.Topology{Queue: "work"}},
		DeadLetter: config.DeadLetter{Queue: "dead"},
		Proxy: func(context.Context, *proxy.Request) (*proxy.Response, error) {
			calls.Add(1)
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil
		},
	})
	pub, acker := &panickyPublisher{}, &fakeAcker{}
	ch := make(chan amqp.Delivery, 2)
	ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Body: []byte("123456789")}
	ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 2, Body: []byte("12345678")}
	close(ch)
	a.work(context.Background(), context.Background(), a.flowOf(panickySession{panickyPublisher: pub, ch: ch}))
	if n := calls.Load(); n != 1 {
		t.Errorf("the backend was called %d times, want once (the 8-byte message only)", n)
	}
	wantSettled(t, acker, 2, ack)
	if got := routes(pub.copies); len(got) != 1 || got[0] != "/dead" {
		t.Fatalf("copies %v, want the large message dead-lettered", got)
	}
	if reason, _ := pub.copies[0].msg.Headers[HeaderLastError].(string); !strings.Contains(reason, "max_body_bytes") {
		t.Errorf("dead letter reason %q does not name max_body_bytes", reason)
	}
}
