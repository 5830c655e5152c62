package driver

import (
	"sort"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// acks settles the deliveries of one session from a single goroutine, so
// that workers never wait on the channel's write lock, and acks runs of
// consecutive delivery tags with one multiple-ack frame.
//
// A multiple-ack of tag T settles every outstanding delivery up to T.
// That keeps at-least-once only if every tag up to T was handled: nacks
// are sent one by one, at once, before any multiple-ack that covers
// them; an ack is held until all lower tags are settled. So that a slow
// message does not hold the acks of many finished ones (they fill the
// prefetch window, and are lost with the connection), finished tags
// beyond a gap are acked one by one once they reach half the window, or
// have waited ackPatience.
type acks struct {
	agent    *Agent
	requests chan ackRequest
	done     chan struct{}
	// The state below belongs to the run goroutine.
	ch      amqp.Acknowledger
	next    uint64                // lowest tag not settled yet
	waiting map[uint64]ackRequest // acked tags above a gap
	sent    runs                  // tags above a gap settled one by one
	stuck   map[uint64]bool       // held tags: gaps that last
	hold    int                   // most finished tags kept waiting on a gap
}

type ackRequest struct {
	m       *message // remembered if the channel refuses the settlement
	ch      amqp.Acknowledger
	tag     uint64
	ack     bool
	requeue bool
	outcome string
	held    bool // not a settlement: the tag stays unsettled a while
}

func newAcks(a *Agent, prefetch int) *acks {
	q := idleAcks(a, prefetch)
	go q.run()
	return q
}

// idleAcks is a settler whose goroutine is not started yet.
func idleAcks(a *Agent, prefetch int) *acks {
	hold := prefetch / 2
	if prefetch == 0 {
		hold = 100
	}
	q := &acks{
		agent: a, requests: make(chan ackRequest, max(prefetch, 64)), done: make(chan struct{}),
		next: 1, waiting: map[uint64]ackRequest{}, stuck: map[uint64]bool{}, hold: max(hold, 1),
	}
	return q
}

// settle hands a settled message over; it never blocks for long.
func (q *acks) settle(m *message, ack, requeue bool, outcome string) {
	q.requests <- ackRequest{m: m, ch: m.d.Acknowledger, tag: m.d.DeliveryTag, ack: ack, requeue: requeue, outcome: outcome}
}

// holding marks a message whose settlement waits on its copy: finished
// messages after it are acked one by one at once rather than wait.
func (q *acks) holding(m *message) {
	q.requests <- ackRequest{ch: m.d.Acknowledger, tag: m.d.DeliveryTag, held: true}
}

// close flushes what is left and waits for the goroutine to end. Call it
// once every worker is done.
func (q *acks) close() {
	close(q.requests)
	<-q.done
}

// ackPatience bounds how long a finished message's ack waits behind a
// slower one: an ack kept waiting is lost with the connection, and its
// message reaches the backend twice.
const ackPatience = 20 * time.Millisecond

func (q *acks) run() {
	defer close(q.done)
	patience := time.NewTimer(ackPatience)
	patience.Stop()
	armed := false
	for {
		select {
		case req, ok := <-q.requests:
			if !ok {
				q.flush(true)
				return
			}
			q.take(req)
			q.drain()
			q.flush(false)
		case <-patience.C:
			armed = false
			q.flush(true)
		}
		if len(q.waiting) > 0 && !armed {
			patience.Reset(ackPatience)
			armed = true
		}
	}
}

// drain takes every request already queued, so that a burst ends in one
// ack frame.
func (q *acks) drain() {
	for {
		select {
		case req, ok := <-q.requests:
			if !ok {
				return
			}
			q.take(req)
		default:
			return
		}
	}
}

func (q *acks) take(req ackRequest) {
	q.ch = req.ch
	if req.held {
		q.stuck[req.tag] = true
		return
	}
	delete(q.stuck, req.tag)
	if !req.ack {
		q.agent.recordSettle(req.ch.Nack(req.tag, false, req.requeue), req)
		q.sent.add(req.tag)
		return
	}
	q.waiting[req.tag] = req
}

// flush acks the run of settled tags from next upwards with one
// multiple-ack; with all set, or when too many finished tags wait on a
// gap, it acks those one by one.
func (q *acks) flush(all bool) {
	var settled []ackRequest
	last := uint64(0)
	for {
		if req, ok := q.waiting[q.next]; ok {
			settled = append(settled, req)
			delete(q.waiting, q.next)
			last = q.next
		} else if len(q.sent) > 0 && q.sent[0].lo == q.next {
			// A run settled one by one: skip it (next++ below
			// steps past its end); a multiple-ack over it is harmless.
			q.next = q.sent[0].hi
			q.sent = q.sent[1:]
		} else {
			break
		}
		q.next++
	}
	if last != 0 {
		err := q.ch.Ack(last, true)
		for _, req := range settled {
			q.agent.recordSettle(err, req)
		}
	}
	if all || len(q.waiting) >= q.hold || q.stuck[q.next] {
		for tag, req := range q.waiting {
			q.agent.recordSettle(q.ch.Ack(tag, false), req)
			delete(q.waiting, tag)
			q.sent.add(tag)
		}
	}
}

// runs are the tags settled one by one above next, as sorted, disjoint,
// non-adjacent intervals: a tag that never settles (held, or left
// unacknowledged after a panic) leaves one run behind it however many
// tags are settled after it, so the state grows with the gaps, not with
// the messages.
type runs []run

// run is the interval of tags lo..hi, both settled.
type run struct{ lo, hi uint64 }

// add records tag, merging it into the run it touches.
func (s *runs) add(tag uint64) {
	r := *s
	// The first run that ends at tag-1 or later: every one before it
	// ends short of touching tag.
	i := sort.Search(len(r), func(i int) bool { return r[i].hi+1 >= tag })
	if i == len(r) || r[i].lo > tag+1 {
		r = append(r, run{})
		copy(r[i+1:], r[i:])
		r[i] = run{tag, tag}
		*s = r
		return
	}
	r[i].lo, r[i].hi = min(r[i].lo, tag), max(r[i].hi, tag)
	if i+1 < len(r) && r[i].hi+1 >= r[i+1].lo {
		r[i].hi = max(r[i].hi, r[i+1].hi)
		r = append(r[:i+1], r[i+2:]...)
	}
	*s = r
}
