package driver

import (
	"context"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// cutAgent is an agent of two workers whose backend answers 200 to
// every message once gate lets it (a closed gate lets every one); calls
// counts the dispatches.
func cutAgent(calls *atomic.Int64, gate *chan struct{}) *Agent {
	return mustNew(Options{
		Name: "cut", Workers: 2, Timeout: 5 * time.Second, Logger: logging.NoOp,
		Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}, PrefetchCount: 10},
		Proxy: func(ctx context.Context, _ *proxy.Request) (*proxy.Response, error) {
			calls.Add(1)
			select {
			case <-*gate:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: http.StatusOK}}, nil
		},
	})
}

// cutMidway runs a session whose deliveries are all dispatched, then
// cut while the backend holds them: the dispatches end after the cut and
// the channel refuses their acks.
func cutMidway(t *testing.T, a *Agent, calls *atomic.Int64, gate chan struct{}, ds ...amqp.Delivery) {
	t.Helper()
	s, acker := newEndingSession(), &fakeAcker{err: amqp.ErrClosed}
	before := calls.Load()
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.consume(context.Background(), context.Background(), s, a.opts.Workers)
	}()
	for i, d := range ds {
		d.Acknowledger, d.DeliveryTag = acker, uint64(i+1)
		s.ch <- d
	}
	waitFor(t, func() bool { return calls.Load() == before+int64(len(ds)) })
	close(s.done)
	close(gate)
	close(s.ch)
	<-done
	if acker.count() == 0 {
		t.Fatal("no settlement tried in the cut session")
	}
}

// wantAcked fails unless deliveries 1..n were acked, one by one or by
// a multiple-ack, and nothing else was settled.
func wantAcked(t *testing.T, acker *fakeAcker, n int) {
	t.Helper()
	acked := map[uint64]bool{}
	acker.mu.Lock()
	defer acker.mu.Unlock()
	for _, c := range acker.calls {
		if c.op != "ack" {
			t.Errorf("settled %v, want acks only", c)
		}
		for tag := uint64(1); tag <= c.tag; tag++ {
			if tag == c.tag || c.multiple {
				acked[tag] = true
			}
		}
	}
	for tag := uint64(1); tag <= uint64(n); tag++ {
		if !acked[tag] {
			t.Errorf("delivery %d not acked: %v", tag, acker.calls)
		}
	}
}

// nextSession runs a session on ds to its end and returns how each
// delivery was settled.
func nextSession(a *Agent, ds ...amqp.Delivery) *fakeAcker {
	s, acker := newEndingSession(), &fakeAcker{}
	s.ch = make(chan amqp.Delivery, len(ds))
	for i, d := range ds {
		d.Acknowledger, d.DeliveryTag = acker, uint64(i+1)
		s.ch <- d
	}
	close(s.ch)
	close(s.publish)
	a.consume(context.Background(), context.Background(), s, a.opts.Workers)
	return acker
}

func order(id string) amqp.Delivery {
	return amqp.Delivery{Exchange: "x", RoutingKey: "k", MessageId: id, ContentType: "application/json",
		Headers: amqp.Table{"tenant": "a", "n": int32(1)}, Body: []byte(`{"id":"` + id + `"}`)}
}

func redelivered(d amqp.Delivery) amqp.Delivery {
	d.Redelivered = true
	return d
}

// A dispatch that ends after its session ended cannot be acked: the
// message is remembered, and its redelivery to the next session is acked
// without reaching the backend again. A quorum queue's delivery count,
// added on the redelivery, does not hide it.
func TestARedeliveryHandledBeforeTheCutIsAckedNotDispatched(t *testing.T) {
	var calls atomic.Int64
	gate := make(chan struct{})
	a := cutAgent(&calls, &gate)
	cutMidway(t, a, &calls, gate, order("1"))
	if n := a.leftovers.size.Load(); n != 1 {
		t.Fatalf("%d messages remembered after the cut, want 1", n)
	}
	again := redelivered(order("1"))
	again.Headers = amqp.Table{"tenant": "a", "n": int32(1), "x-delivery-count": int64(1)}
	acker := nextSession(a, again)
	if n := calls.Load(); n != 1 {
		t.Errorf("%d dispatches, want 1: the redelivery reached the backend again", n)
	}
	wantAcked(t, acker, 1)
	if n := a.leftovers.size.Load(); n != 0 {
		t.Errorf("%d messages still remembered, want 0", n)
	}
	if n := a.stats.leftovers.Load(); n != 1 {
		t.Errorf("stats count %d settled without a dispatch, want 1", n)
	}
}

// Only a redelivery is matched: the same message published again (the
// redelivered flag is the broker's) is dispatched.
func TestAnIdenticalMessageNotRedeliveredIsDispatched(t *testing.T) {
	var calls atomic.Int64
	gate := make(chan struct{})
	a := cutAgent(&calls, &gate)
	cutMidway(t, a, &calls, gate, order("1"))
	acker := nextSession(a, order("1"))
	if n := calls.Load(); n != 2 {
		t.Errorf("%d dispatches, want 2: a message that is no redelivery was not dispatched", n)
	}
	wantAcked(t, acker, 1)
}

// Two identical messages both handled before the cut are remembered
// twice: both redeliveries are acked without a dispatch, and a third
// identical redelivery is dispatched.
func TestTwoIdenticalMessagesHandledCountTwice(t *testing.T) {
	var calls atomic.Int64
	gate := make(chan struct{})
	a := cutAgent(&calls, &gate)
	cutMidway(t, a, &calls, gate, order("1"), order("1"))
	acker := nextSession(a, redelivered(order("1")), redelivered(order("1")))
	if n := calls.Load(); n != 2 {
		t.Errorf("%d dispatches, want 2 (none in the second session)", n)
	}
	wantAcked(t, acker, 2)
	nextSession(a, redelivered(order("1")))
	if n := calls.Load(); n != 3 {
		t.Errorf("%d dispatches, want 3: a third identical redelivery was not dispatched", n)
	}
}

// A message the dead session handed back without dispatching it (its
// nack with requeue refused too) is not remembered: its redelivery is
// dispatched.
func TestARequeuedMessageIsDispatchedOnRedelivery(t *testing.T) {
	var calls atomic.Int64
	gate := make(chan struct{})
	close(gate)
	a := cutAgent(&calls, &gate)
	s, acker := newEndingSession(), &fakeAcker{err: amqp.ErrClosed}
	close(s.done) // the session ended before the message could be dispatched
	s.ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, MessageId: "1", Body: []byte(`{}`)}
	close(s.ch)
	a.consume(context.Background(), context.Background(), s, 2)
	wantSettled(t, acker, 1, nackRequeue)
	if !a.leftovers.empty() {
		t.Fatal("a message handed back undispatched was remembered")
	}
	again := nextSession(a, amqp.Delivery{MessageId: "1", Body: []byte(`{}`), Redelivered: true})
	if n := calls.Load(); n != 1 {
		t.Errorf("%d dispatches, want 1", n)
	}
	wantAcked(t, again, 1)
}

// A message given up on (nack without requeue) whose nack was refused is
// nacked the same way on its redelivery, not dispatched; the direct
// settler remembers it as the ack batcher does.
func TestARefusedDiscardIsDiscardedAgain(t *testing.T) {
	var calls atomic.Int64
	gate := make(chan struct{})
	close(gate)
	a := cutAgent(&calls, &gate)
	d := order("7")
	d.Acknowledger = &fakeAcker{err: amqp.ErrClosed}
	directSettler{a}.settle(&message{d: &d, raw: &d}, false, false, OutcomeDiscarded)
	acker := nextSession(a, redelivered(order("7")))
	if n := calls.Load(); n != 0 {
		t.Errorf("%d dispatches, want none", n)
	}
	wantSettled(t, acker, 1, nackDiscard)
}

// The key covers what a redelivery keeps and nothing it changes.
func TestFingerprint(t *testing.T) {
	base := order("1")
	base.Timestamp = time.Unix(1700000000, 0)
	base.Headers["nested"] = amqp.Table{"b": []interface{}{int64(1), "two", amqp.Table{"c": nil}}, "a": 1.5}
	key := fingerprint(&base)
	same := func(name string, change func(d *amqp.Delivery)) {
		d := base
		d.Headers = amqp.Table{}
		for k, v := range base.Headers {
			d.Headers[k] = v
		}
		change(&d)
		if fingerprint(&d) != key {
			t.Errorf("%s changes the key", name)
		}
	}
	differs := func(name string, change func(d *amqp.Delivery)) {
		d := base
		d.Headers = amqp.Table{}
		for k, v := range base.Headers {
			d.Headers[k] = v
		}
		change(&d)
		if fingerprint(&d) == key {
			t.Errorf("%s leaves the key as it was", name)
		}
	}
	same("the redelivered flag, tags and counts", func(d *amqp.Delivery) {
		d.Redelivered, d.DeliveryTag, d.ConsumerTag = true, 9, "ctag"
		d.Headers["x-delivery-count"] = int64(3)
		d.Headers["X-Acquired-Count"] = int64(4)
	})
	differs("the body", func(d *amqp.Delivery) { d.Body = []byte(`{"id":"2"}`) })
	differs("the routing key", func(d *amqp.Delivery) { d.RoutingKey = "k2" })
	differs("the message id", func(d *amqp.Delivery) { d.MessageId = "2" })
	differs("the timestamp", func(d *amqp.Delivery) { d.Timestamp = d.Timestamp.Add(time.Second) })
	differs("the priority", func(d *amqp.Delivery) { d.Priority = 5 })
	differs("the user id", func(d *amqp.Delivery) { d.UserId = "guest" })
	differs("a header's type", func(d *amqp.Delivery) { d.Headers["n"] = int64(1) })
	differs("a nested value", func(d *amqp.Delivery) {
		d.Headers["nested"] = amqp.Table{"b": []interface{}{int64(1), "two", amqp.Table{"c": false}}, "a": 1.5}
	})
	differs("a new header", func(d *amqp.Delivery) { d.Headers["x-delivery-count-other"] = int64(1) })
	differs("a header moved into the body", func(d *amqp.Delivery) {
		d.Headers = amqp.Table{}
		d.Body = append([]byte("tenant"), d.Body...)
	})
}

// Entries expire after leftoverTTL and the oldest go first over the
// bound: either can only cost a duplicate.
func TestLeftoversExpireAndAreBounded(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLeftovers(1)
	l.now = func() time.Time { return now }
	if l.most != minLeftovers {
		t.Fatalf("bound %d for prefetch 1, want %d", l.most, minLeftovers)
	}
	old, young := [32]byte{1}, [32]byte{2}
	l.add(old, fate{ack: true, outcome: OutcomeAcked}, 1)
	now = now.Add(leftoverTTL / 2)
	l.add(young, fate{ack: true, outcome: OutcomeAcked}, 1)
	now = now.Add(leftoverTTL/2 + time.Second)
	if _, ok := l.take(old); ok {
		t.Error("an entry older than leftoverTTL was taken")
	}
	if _, ok := l.take(young); !ok {
		t.Error("a younger entry was forgotten")
	}
	if !l.empty() {
		t.Errorf("%d entries left, want none", l.size.Load())
	}

	nth := func(i int) [32]byte { return [32]byte{byte(i), byte(i >> 8), 7} }
	for i := range minLeftovers + 10 {
		l.add(nth(i), fate{ack: true, outcome: OutcomeAcked}, 1)
	}
	if n := l.size.Load(); n != minLeftovers {
		t.Fatalf("%d entries, want the bound %d", n, minLeftovers)
	}
	if _, ok := l.take(nth(0)); ok {
		t.Error("the oldest entry is still there over the bound")
	}
	if _, ok := l.take(nth(minLeftovers + 9)); !ok {
		t.Error("the newest entry was dropped")
	}
	if len(l.order) > 2*l.most+1 {
		t.Errorf("%d entries kept in order for a bound of %d", len(l.order), l.most)
	}
	if n := newLeftovers(1000).most; n != 4000 {
		t.Errorf("bound %d for prefetch 1000, want 4000", n)
	}
}

// TestAFirstDeliveryEndsWhatACutLeft: once the next session gets a
// message that is no redelivery, the cut's redeliveries have come (a
// queue hands them back first), so what the cut left is forgotten: a
// later redelivery of the same content is dispatched, never taken for
// the one that never came back.
func TestAFirstDeliveryEndsWhatACutLeft(t *testing.T) {
	var calls atomic.Int64
	gate := make(chan struct{})
	a := cutAgent(&calls, &gate)
	a.opts.Workers = 1
	cutMidway(t, a, &calls, gate, order("1"))
	if a.leftovers.empty() {
		t.Fatal("the cut left nothing to remember")
	}
	acker := nextSession(a, order("2"), redelivered(order("1")))
	if n := calls.Load(); n != 3 {
		t.Errorf("%d dispatches, want 3: the redelivery after a first delivery was not dispatched", n)
	}
	if !a.leftovers.empty() {
		t.Error("what the cut left is still remembered after a first delivery")
	}
	wantAcked(t, acker, 2)
}

// TestForgetKeepsTheSessionsOwn: a first delivery forgets what earlier
// sessions left, never what its own session left (the dead session's
// buffered deliveries are handed out after its cut, while its
// in-flight dispatches are still being remembered).
func TestForgetKeepsTheSessionsOwn(t *testing.T) {
	l := newLeftovers(1)
	l.add([32]byte{1}, fate{ack: true, outcome: OutcomeAcked}, 1)
	l.add([32]byte{2}, fate{ack: true, outcome: OutcomeAcked}, 2)
	l.add([32]byte{1}, fate{ack: true, outcome: OutcomeAcked}, 2)
	l.forget(2)
	if n := l.size.Load(); n != 2 {
		t.Fatalf("%d entries after forgetting session 1's, want session 2's 2", n)
	}
	for _, k := range [][32]byte{{1}, {2}} {
		if _, ok := l.take(k); !ok {
			t.Errorf("session 2's entry %v was forgotten", k[0])
		}
	}
	if _, ok := l.take([32]byte{1}); ok {
		t.Error("session 1's entry was kept")
	}
}
