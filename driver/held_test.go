package driver

import (
	"context"
	"errors"
	"io"
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

func (*refusingSession) Done() <-chan struct{} { return nil }

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

// selectiveSession refuses the copies to one exchange, for good, or
// every copy for a passing reason, as set.
type selectiveSession struct {
	copyRecorder
	ch       chan amqp.Delivery
	refuseTo string // copies to this exchange are unroutable
	blocked  atomic.Bool
	refused  atomic.Int64
}

func (s *selectiveSession) Deliveries() <-chan amqp.Delivery { return s.ch }

func (*selectiveSession) Done() <-chan struct{} { return nil }

func (s *selectiveSession) Publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	switch {
	case s.blocked.Load():
		s.refused.Add(1)
		return errors.New("publishing blocked by a broker alarm")
	case exchange == s.refuseTo:
		s.refused.Add(1)
		return consumer.ErrUnroutable
	}
	return s.copyRecorder.Publish(ctx, exchange, key, msg)
}

func (s *selectiveSession) copiesNow() []published {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]published(nil), s.copies...)
}

// waitUntil polls cond for up to 10 s, naming what it waits for.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A dead letter the broker refuses for good is not held without bound:
// after a few refusals its message is parked in the longest retry queue,
// marked, and acked; the backend is not called again.
func TestRefusedDeadLetterIsParked(t *testing.T) {
	var calls atomic.Int64
	a := mustNew(Options{
		Name: "parker", Workers: 1, Timeout: time.Second, Logger: logging.NoOp,
		Session:    consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 10},
		Retry:      config.Retry{MaxAttempts: 1, Delay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond, Multiplier: 2},
		DeadLetter: config.DeadLetter{Exchange: "dlx"},
		Proxy: func(context.Context, *proxy.Request) (*proxy.Response, error) {
			calls.Add(1)
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 500}}, nil
		},
	})
	sess := &selectiveSession{ch: make(chan amqp.Delivery, 1), refuseTo: "dlx"}
	acker := &fakeAcker{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.consume(context.Background(), context.Background(), sess, 1)
	}()
	sess.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Exchange: "orders", RoutingKey: "nobody.listens", Body: []byte("{}")}
	waitUntil(t, "the message to be settled", func() bool { return len(acker.byTag()[1]) > 0 })
	close(sess.ch)
	<-done

	if n := sess.refused.Load(); n != refusalsBeforePark {
		t.Errorf("the dead letter was refused %d times before the message was parked, want %d", n, refusalsBeforePark)
	}
	copies := sess.copiesNow()
	if got := routes(copies); len(got) != 1 || got[0] != "/work.retry.20ms" {
		t.Fatalf("copies %v, want one parked in the longest retry queue", got)
	}
	why, _ := copies[0].msg.Headers[HeaderParked].(string)
	if !strings.Contains(why, "refused its dead-letter copy 3 times") || !strings.Contains(why, "route") {
		t.Errorf("parked with reason %q", why)
	}
	if calls := acker.byTag()[1]; len(calls) != 1 || calls[0].op != "ack" {
		t.Errorf("message settled %v, want one ack once parked", calls)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("the backend was called %d times, want once", n)
	}
}

// A parked message back from its retry queue is not dispatched: its dead
// letter is tried again. Once it is made, the message is acked.
func TestParkedMessageComesBackToItsDeadLetter(t *testing.T) {
	var calls atomic.Int64
	a := mustNew(Options{
		Name: "parker", Workers: 1, Timeout: time.Second, Logger: logging.NoOp,
		Session:    consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 10},
		Retry:      config.Retry{MaxAttempts: 2, Delay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond, Multiplier: 2},
		DeadLetter: config.DeadLetter{Exchange: "dlx"},
		Proxy: func(context.Context, *proxy.Request) (*proxy.Response, error) {
			calls.Add(1)
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil
		},
	})
	sess := &selectiveSession{ch: make(chan amqp.Delivery, 1)}
	acker := &fakeAcker{}
	back := expiredFrom(&amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Body: []byte("{}"), Headers: amqp.Table{
		HeaderParked: "the broker refused its dead-letter copy", HeaderAttempts: int64(2), HeaderLastError: "status 500",
		HeaderOriginalExchange: "orders", HeaderOriginalRoutingKey: "k",
	}}, "work.retry.20ms")
	sess.ch <- *back
	close(sess.ch)
	a.consume(context.Background(), context.Background(), sess, 1)
	if n := calls.Load(); n != 0 {
		t.Errorf("the backend was called %d times for a parked message", n)
	}
	copies := sess.copiesNow()
	if got := routes(copies); len(got) != 1 || got[0] != "dlx/k" {
		t.Fatalf("copies %v, want its dead letter", got)
	}
	if _, ok := copies[0].msg.Headers[HeaderParked]; ok {
		t.Errorf("the dead letter carries %s", HeaderParked)
	}
	if h := copies[0].msg.Headers; h[HeaderAttempts] != int64(2) || h[HeaderLastError] != "status 500" {
		t.Errorf("dead letter attempts %v, last error %v; want 2 and the failure it was parked with", h[HeaderAttempts], h[HeaderLastError])
	}
	if calls := acker.byTag()[1]; len(calls) != 1 || calls[0].op != "ack" {
		t.Errorf("message settled %v, want one ack", calls)
	}
}

// Held messages take at most half the prefetch window: while copies fail
// for a passing reason, a worker with one more to hold waits, and the
// other workers go on with healthy messages.
func TestHeldMessagesTakeABoundedShare(t *testing.T) {
	a := mustNew(Options{
		Name: "sharer", Workers: 2, Timeout: time.Second, Logger: logging.NoOp,
		Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 4},
		Retry:   config.Retry{MaxAttempts: 3, Delay: time.Hour, MaxDelay: time.Hour, Multiplier: 2},
		Proxy: func(_ context.Context, r *proxy.Request) (*proxy.Response, error) {
			body, _ := io.ReadAll(r.Body)
			status := 200
			if string(body) == "fail" {
				status = 500
			}
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: status}}, nil
		},
	})
	sess := &selectiveSession{ch: make(chan amqp.Delivery, 8)}
	sess.blocked.Store(true)
	acker := &fakeAcker{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.consume(ctx, context.Background(), sess, 2)
	}()
	for tag := uint64(1); tag <= 3; tag++ {
		sess.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: tag, Body: []byte("fail")}
	}
	waitUntil(t, "two messages held", func() bool { return a.metrics.heldNow() == 2 })
	for tag := uint64(4); tag <= 8; tag++ {
		sess.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: tag, Body: []byte("ok")}
	}
	waitUntil(t, "the healthy messages to be acked", func() bool {
		by := acker.byTag()
		for tag := uint64(4); tag <= 8; tag++ {
			if len(by[tag]) == 0 {
				return false
			}
		}
		return true
	})
	if n := a.metrics.heldNow(); n != 2 {
		t.Errorf("%d messages held, want 2 (half the prefetch window of 4)", n)
	}
	cancel()
	close(sess.ch)
	<-done
	// The failed message a worker could not hold went back to the queue
	// when the agent stopped; the two held ones go back with the session.
	by := acker.byTag()
	var settled []settleCall
	for tag := uint64(1); tag <= 3; tag++ {
		settled = append(settled, by[tag]...)
	}
	if len(settled) != 1 || settled[0].op != "nack" || !settled[0].requeue {
		t.Errorf("the failed messages were settled %v, want one nack with requeue", settled)
	}
}
