package driver

import (
	"fmt"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	amqp "github.com/rabbitmq/amqp091-go"
)

// brokerChannel models what RabbitMQ does with acks and nacks on one
// channel: a tag is outstanding until settled, a multiple-ack settles
// every outstanding tag up to it, and settling an unknown tag is an
// error (PRECONDITION_FAILED in RabbitMQ).
type brokerChannel struct {
	mu          sync.Mutex
	outstanding map[uint64]bool
	acked       map[uint64]bool
	nacked      map[uint64]bool
	frames      int
	err         error
}

func newBrokerChannel(n int) *brokerChannel {
	b := &brokerChannel{outstanding: map[uint64]bool{}, acked: map[uint64]bool{}, nacked: map[uint64]bool{}}
	for tag := 1; tag <= n; tag++ {
		b.outstanding[uint64(tag)] = true
	}
	return b
}

func (b *brokerChannel) Ack(tag uint64, multiple bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.frames++
	if !b.outstanding[tag] && b.err == nil {
		b.err = fmt.Errorf("ack of unknown delivery tag %d", tag)
	}
	for t := range b.outstanding {
		if t == tag || multiple && t < tag {
			delete(b.outstanding, t)
			b.acked[t] = true
		}
	}
	return nil
}

func (b *brokerChannel) Nack(tag uint64, multiple, requeue bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.frames++
	if !b.outstanding[tag] || multiple {
		b.err = fmt.Errorf("bad nack of tag %d (multiple %t)", tag, multiple)
	}
	delete(b.outstanding, tag)
	b.nacked[tag] = true
	return nil
}

func (b *brokerChannel) Reject(tag uint64, requeue bool) error { return b.Nack(tag, false, requeue) }

func TestAcksSettleEveryTagOnceWhateverTheOrder(t *testing.T) {
	for _, tc := range []struct {
		name     string
		n        int
		prefetch int
		workers  int
		failEach int // every failEach-th tag is nacked
	}{
		{"one worker in order", 500, 10, 1, 7},
		{"many workers out of order", 2000, 100, 16, 5},
		{"no failures", 2000, 200, 64, 0},
		{"prefetch 1", 100, 1, 4, 3},
		{"unlimited prefetch", 1000, 0, 8, 11},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := mustNew(Options{Name: "acks", Logger: logging.NoOp})
			ch := newBrokerChannel(tc.n)
			q := newAcks(a, tc.prefetch)
			tags := make(chan uint64)
			var wg sync.WaitGroup
			for w := range tc.workers {
				wg.Add(1)
				go func(seed int64) {
					defer wg.Done()
					r := rand.New(rand.NewSource(seed))
					for tag := range tags {
						if r.Intn(4) == 0 {
							// finish out of order now and then
							defer q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: tag}}, !fails(tag, tc.failEach), true, OutcomeAcked)
							continue
						}
						q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: tag}}, !fails(tag, tc.failEach), true, OutcomeAcked)
					}
				}(int64(w))
			}
			for tag := 1; tag <= tc.n; tag++ {
				tags <- uint64(tag)
			}
			close(tags)
			wg.Wait()
			q.close()

			if ch.err != nil {
				t.Fatal(ch.err)
			}
			if len(ch.outstanding) != 0 {
				t.Fatalf("%d tags never settled", len(ch.outstanding))
			}
			for tag := uint64(1); tag <= uint64(tc.n); tag++ {
				if fails(tag, tc.failEach) != ch.nacked[tag] || fails(tag, tc.failEach) == ch.acked[tag] {
					t.Fatalf("tag %d: acked %t nacked %t, want nacked %t", tag, ch.acked[tag], ch.nacked[tag], fails(tag, tc.failEach))
				}
			}
			t.Logf("%d deliveries settled in %d frames", tc.n, ch.frames)
		})
	}
}

func fails(tag uint64, each int) bool { return each > 0 && tag%uint64(each) == 0 }

func TestAcksBatchConsecutiveTags(t *testing.T) {
	a := mustNew(Options{Name: "acks", Logger: logging.NoOp})
	ch := newBrokerChannel(100)
	q := idleAcks(a, 200)
	// Held back: the settler runs once the requests are queued.
	for tag := uint64(1); tag <= 100; tag++ {
		q.requests <- ackRequest{ch: ch, tag: tag, ack: true, outcome: OutcomeAcked}
	}
	go q.run()
	q.close()
	if len(ch.outstanding) != 0 || ch.err != nil {
		t.Fatalf("outstanding %d, err %v", len(ch.outstanding), ch.err)
	}
	if ch.frames > 5 {
		t.Errorf("100 consecutive acks took %d frames, want a few multiple-acks", ch.frames)
	}
}

func TestAcksDoNotHoldAFullWindowBehindASlowMessage(t *testing.T) {
	a := mustNew(Options{Name: "acks", Logger: logging.NoOp})
	ch := newBrokerChannel(21)
	q := newAcks(a, 20)
	// Tag 1 is slow; tags 2..11 finish: half the window is then acked one
	// by one, before tag 1 is done.
	for tag := uint64(2); tag <= 11; tag++ {
		q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: tag}}, true, false, OutcomeAcked)
	}
	waitFor(t, func() bool {
		ch.mu.Lock()
		defer ch.mu.Unlock()
		return len(ch.acked) == 10
	})
	q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: 1}}, true, false, OutcomeAcked)
	q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: 12}}, true, false, OutcomeAcked)
	q.close()
	if ch.err != nil {
		t.Fatal(ch.err)
	}
	if len(ch.acked) != 12 {
		t.Errorf("acked %d tags, want 12", len(ch.acked))
	}
}

// waitFor polls cond; the settler runs on its own goroutine.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 2000 && !cond(); i++ {
		runtimeGosched()
	}
	if !cond() {
		t.Fatal("condition not met")
	}
}

func runtimeGosched() { time.Sleep(time.Millisecond) }

// A held message (its copy failed) is a gap that lasts: the messages
// finished after it are acked at once, one by one, not after half the
// window, and the held one is acked on its own once its copy is made.
func TestAcksDoNotWaitOnAHeldMessage(t *testing.T) {
	a := mustNew(Options{Name: "acks", Logger: logging.NoOp})
	ch := newBrokerChannel(4)
	q := newAcks(a, 20)
	held := &message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: 1}}
	q.holding(held)
	for tag := uint64(2); tag <= 3; tag++ {
		q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: tag}}, true, false, OutcomeAcked)
	}
	waitFor(t, func() bool {
		ch.mu.Lock()
		defer ch.mu.Unlock()
		return len(ch.acked) == 2
	})
	q.settle(held, true, false, OutcomeRetried)
	q.close()
	if ch.err != nil {
		t.Fatal(ch.err)
	}
	if len(ch.acked) != 3 {
		t.Errorf("acked %d tags, want 3", len(ch.acked))
	}
}

// tallyAcker is a light Acknowledger for long runs: it counts each
// tag's settlements and fails on a multiple-ack at or above a tag that
// must stay unsettled.
type tallyAcker struct {
	mu      sync.Mutex
	unacked uint64 // the tag that must never be covered
	settled map[uint64]int
	err     error
}

func (c *tallyAcker) Ack(tag uint64, multiple bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if tag == c.unacked || multiple && tag > c.unacked {
		c.err = fmt.Errorf("ack(%d, multiple %t) covers tag %d", tag, multiple, c.unacked)
	}
	c.settled[tag]++
	return nil
}

func (c *tallyAcker) Nack(tag uint64, multiple, requeue bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.settled[tag]++
	return nil
}

func (c *tallyAcker) Reject(tag uint64, requeue bool) error { return c.Nack(tag, false, requeue) }

// One tag that never settles (held, or left unacknowledged after its
// failure path panicked) must not make the settler remember every tag
// settled after it: its state grows with the gaps, not the messages.
func TestAcksStateStaysBoundedBehindAStuckTag(t *testing.T) {
	const n = 100_000
	for _, held := range []bool{true, false} {
		t.Run(fmt.Sprintf("held %t", held), func(t *testing.T) {
			a := mustNew(Options{Name: "acks", Logger: logging.NoOp})
			ch := &tallyAcker{unacked: 1, settled: map[uint64]int{}}
			q := newAcks(a, 20)
			if held {
				q.holding(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: 1}})
			}
			for tag := uint64(2); tag <= n+1; tag++ {
				// every 10th fails: nacks are settled one by one too
				q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: tag}}, tag%10 != 0, true, OutcomeAcked)
			}
			q.close()
			if ch.err != nil {
				t.Fatal(ch.err)
			}
			for tag := uint64(2); tag <= n+1; tag++ {
				if ch.settled[tag] != 1 {
					t.Fatalf("tag %d settled %d times, want once", tag, ch.settled[tag])
				}
			}
			if len(q.sent) > 2 || len(q.waiting) != 0 {
				t.Errorf("after %d settlements behind one stuck tag: %d settled tags kept, %d waiting; want O(1)", n, len(q.sent), len(q.waiting))
			}
		})
	}
}

func TestRunsMergeTagsInAnyOrder(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	tags := r.Perm(1000)
	var s runs
	for i, tag := range tags {
		s.add(uint64(tag) + 2)
		for j := 1; j < len(s); j++ {
			if s[j-1].hi+1 >= s[j].lo || s[j].lo > s[j].hi {
				t.Fatalf("after %d adds: runs %v overlap, touch or are unsorted", i+1, s)
			}
		}
	}
	if len(s) != 1 || s[0] != (run{2, 1001}) {
		t.Errorf("runs %v, want one run 2..1001", s)
	}
}

// A slow message holds the acks of the few messages finished after it
// only briefly: they are acked one by one before it ends, not lost with
// the connection should it drop meanwhile.
func TestAcksDoNotWaitLongBehindASlowMessage(t *testing.T) {
	a := mustNew(Options{Name: "acks", Logger: logging.NoOp})
	ch := newBrokerChannel(4)
	q := newAcks(a, 20)
	for tag := uint64(2); tag <= 4; tag++ {
		q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: tag}}, true, false, OutcomeAcked)
	}
	waitFor(t, func() bool {
		ch.mu.Lock()
		defer ch.mu.Unlock()
		return len(ch.acked) == 3
	})
	q.settle(&message{d: &amqp.Delivery{Acknowledger: ch, DeliveryTag: 1}}, true, false, OutcomeAcked)
	q.close()
	if ch.err != nil || len(ch.acked) != 4 {
		t.Errorf("acked %d tags (error %v), want 4", len(ch.acked), ch.err)
	}
}
