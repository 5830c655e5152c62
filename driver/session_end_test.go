package driver

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// endingSession is a session whose end the test decides; its copies
// wait for publish to be closed.
type endingSession struct {
	ch      chan amqp.Delivery
	done    chan struct{}
	publish chan struct{}
}

func newEndingSession() *endingSession {
	return &endingSession{ch: make(chan amqp.Delivery, 4), done: make(chan struct{}), publish: make(chan struct{})}
}

func (s *endingSession) Deliveries() <-chan amqp.Delivery { return s.ch }

func (s *endingSession) Done() <-chan struct{} { return s.done }

func (s *endingSession) Publish(ctx context.Context, _, _ string, _ amqp.Publishing) error {
	select {
	case <-s.publish:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// sessionAgent is an agent of two workers, prefetch 10, whose backend
// answers 503 to the body "busy" and 200 to the others; calls counts the
// dispatches.
func sessionAgent(backPressure bool, calls *atomic.Int64) *Agent {
	return mustNew(Options{
		Name: "ending", Workers: 2, Timeout: time.Second, Logger: logging.NoOp, BackPressure: backPressure,
		Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 10},
		Proxy: func(_ context.Context, r *proxy.Request) (*proxy.Response, error) {
			calls.Add(1)
			status := http.StatusOK
			if b := make([]byte, 4); r.Body != nil {
				n, _ := r.Body.Read(b)
				if string(b[:n]) == "busy" {
					status = http.StatusServiceUnavailable
				}
			}
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: status}}, nil
		},
	})
}

// A message waiting for the back-pressure when its session ends is not
// dispatched: its ack could not succeed, and the broker delivers it
// again, so the backend would see it twice. It goes back to the broker.
func TestAMessageWaitingForThePaceIsNotSentByAnEndedSession(t *testing.T) {
	var calls atomic.Int64
	a := sessionAgent(true, &calls)
	a.pressure.limit, a.pressure.inFlight = 1, 1 // one dispatch in flight, the most
	s, acker := newEndingSession(), &fakeAcker{}
	s.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Body: []byte("{}")}
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.consume(context.Background(), context.Background(), s, 2)
	}()
	waitFor(t, func() bool {
		a.pressure.mu.Lock()
		defer a.pressure.mu.Unlock()
		return a.pressure.waiting == 1
	})
	close(s.done)
	a.pressure.leave(answered) // the dispatch in flight ends
	close(s.ch)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the worker still waits after its session ended")
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("%d dispatches by an ended session, want none", n)
	}
	wantSettled(t, acker, 1, nackRequeue)
	if s := a.pressure.state(); a.pressure.inFlight != 0 || s.limit < 1 {
		t.Errorf("in flight %d, state %+v: the turn it did not take was not given back", a.pressure.inFlight, s)
	}
}

// While a failed message's copy waits for the broker's confirm, the
// messages after it are acked at once: an ack kept waiting is lost with
// the connection, and its message is dispatched twice.
func TestAcksDoNotWaitForACopy(t *testing.T) {
	var calls atomic.Int64
	a := sessionAgent(false, &calls)
	s, acker := newEndingSession(), &fakeAcker{}
	s.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Body: []byte("busy")}
	s.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 2, Body: []byte("{}")}
	close(s.ch)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		a.consume(context.Background(), context.Background(), s, 2)
	}()
	acked := func() bool { return len(acker.byTag()[2]) > 0 }
	deadline := time.Now().Add(5 * time.Second)
	for !acked() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	early := acked()
	close(s.publish)
	wg.Wait()
	if !early {
		t.Fatal("the ack of message 2 waited for the copy of message 1")
	}
	for tag, calls := range acker.byTag() {
		if len(calls) != 1 || calls[0].op != "ack" {
			t.Errorf("delivery %d: settled %v, want one ack", tag, calls)
		}
	}
}
