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

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// confirmLost is a session whose copies reach the broker but whose
// confirms never come: a publish returns an error once the session ends.
type confirmLost struct {
	*endingSession
	mu     sync.Mutex
	copies []amqp.Publishing
	queues []string
}

func (s *confirmLost) Publish(ctx context.Context, _, key string, msg amqp.Publishing) error {
	s.mu.Lock()
	s.copies, s.queues = append(s.copies, msg), append(s.queues, key)
	s.mu.Unlock()
	select {
	case <-s.done:
		return amqp.ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// back is the copy as the broker delivers it from its retry queue.
func (s *confirmLost) back(i int) amqp.Delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.copies[i]
	d := amqp.Delivery{ContentType: c.ContentType, MessageId: c.MessageId, Body: c.Body, Headers: c.Headers,
		Timestamp: c.Timestamp, DeliveryMode: c.DeliveryMode}
	return *expiredFrom(&d, s.queues[i])
}

// groupAgent is an agent of two workers whose backend answers 503 to a
// message id's first dispatch and 200 to the next ones; calls counts the
// dispatches.
func groupAgent(calls *atomic.Int64) *Agent {
	var mu sync.Mutex
	seen := map[string]bool{}
	return mustNew(Options{
		Name: "group", Workers: 2, Timeout: 5 * time.Second, Logger: logging.NoOp,
		Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 10},
		Retry:   config.Retry{MaxAttempts: 5, Delay: 50 * time.Millisecond, MaxDelay: 200 * time.Millisecond, Multiplier: 2},
		Proxy: func(_ context.Context, r *proxy.Request) (*proxy.Response, error) {
			calls.Add(1)
			id := r.Headers[HeaderMessageID][0]
			mu.Lock()
			first := !seen[id]
			seen[id] = true
			mu.Unlock()
			status := http.StatusOK
			if first {
				status = http.StatusServiceUnavailable
			}
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: status}}, nil
		},
	})
}

// copyLostInACut runs a session in which the message fails and its copy
// reaches the broker, but the session ends before the confirm: the
// message goes back to the queue, and the copy will come back too.
func copyLostInACut(t *testing.T, a *Agent, calls *atomic.Int64, d amqp.Delivery) *confirmLost {
	t.Helper()
	s := &confirmLost{endingSession: newEndingSession()}
	acker := &fakeAcker{err: amqp.ErrClosed}
	d.Acknowledger, d.DeliveryTag = acker, 1
	s.ch <- d
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.consume(context.Background(), context.Background(), s, a.opts.Workers)
	}()
	waitFor(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.copies) == 1
	})
	close(s.done)
	close(s.ch)
	<-done
	if n := calls.Load(); n != 1 {
		t.Fatalf("%d dispatches in the cut session, want 1", n)
	}
	if _, ok := s.copies[0].Headers[HeaderCopyID].(string); !ok {
		t.Fatalf("the copy carries no %s: %v", HeaderCopyID, s.copies[0].Headers)
	}
	return s
}

// A failed message whose retry copy's confirm a cut lost comes back, and
// so does the copy: the backend gets one of them, the other is acked.
func TestAMessageAndItsUnconfirmedCopyAreDispatchedOnce(t *testing.T) {
	for _, copyFirst := range []bool{false, true} {
		var calls atomic.Int64
		a := groupAgent(&calls)
		s := copyLostInACut(t, a, &calls, order("1"))
		ds := []amqp.Delivery{redelivered(order("1")), s.back(0)}
		if copyFirst {
			ds[0], ds[1] = ds[1], ds[0]
		}
		acker := nextSession(a, ds...)
		if n := calls.Load(); n != 2 {
			t.Errorf("copy first %t: %d dispatches, want 2 (one per session)", copyFirst, n)
		}
		wantAcked(t, acker, 2)
		if n := a.stats.leftovers.Load(); n != 1 {
			t.Errorf("copy first %t: %d messages settled without a dispatch, want 1", copyFirst, n)
		}
	}
}

// The group outlives a session: the message handled in one, its copy
// coming back in a later one is acked without a dispatch.
func TestAnUnconfirmedCopyOfAHandledMessageIsAckedInALaterSession(t *testing.T) {
	var calls atomic.Int64
	a := groupAgent(&calls)
	s := copyLostInACut(t, a, &calls, order("1"))
	nextSession(a, redelivered(order("1")))
	acker := nextSession(a, s.back(0))
	if n := calls.Load(); n != 2 {
		t.Errorf("%d dispatches, want 2", n)
	}
	wantAcked(t, acker, 1)
}

// Only the copy named in the group and redeliveries of the message are
// matched: another copy of the same content, a copy naming the group's
// copy but carrying something else (forged), and the same message
// published again, are dispatched.
func TestOnlyMembersOfAGroupAreMatched(t *testing.T) {
	var calls atomic.Int64
	a := groupAgent(&calls)
	s := copyLostInACut(t, a, &calls, order("1"))
	other := s.back(0)
	other.Headers = amqp.Table{}
	for k, v := range s.back(0).Headers {
		other.Headers[k] = v
	}
	other.Headers[HeaderCopyID] = "another"
	forged := s.back(0)
	forged.Body = []byte(`{"id":"forged"}`)
	nextSession(a, order("1"), other, forged)
	if n := calls.Load(); n != 4 {
		t.Errorf("%d dispatches, want 3: a message outside the group was not dispatched", n)
	}
}

// A message that is no member costs nothing: nothing is looked up while
// no group is open.
func TestNoGroupsNoLookups(t *testing.T) {
	var calls atomic.Int64
	a := groupAgent(&calls)
	d := redelivered(order("1"))
	m := &message{d: &d, raw: &d}
	if a.unconfirmed.member(m) || m.group != nil {
		t.Error("a redelivery joined a group with none open")
	}
}
