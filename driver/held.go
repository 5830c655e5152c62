package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// OutcomeHeld is the span outcome of a failed message whose retry or
// dead-letter copy could not be made yet: it is held unacknowledged while
// the copy is tried again, and settled (counted) once the copy is made.
const OutcomeHeld = "held"

// OutcomeParked is the outcome of a message whose dead letter the broker
// refused for a reason that will not pass (an unroutable key, a refused
// copy): it waits in the longest retry queue instead, and its dead letter
// is tried again when it comes back, without calling the backend.
const OutcomeParked = "parked"

// refusalsBeforePark is how many times a copy may be refused for a
// reason that will not pass before its message stops being held.
const refusalsBeforePark = 3

// held keeps, for one session, the failed messages whose retry or
// dead-letter copy could not be made (a retry queue gone, an unroutable
// dead-letter exchange, a copy the broker refuses). They stay
// unacknowledged, so the backend is not called for them again, and each
// takes a prefetch slot. One goroutine tries the copies again with a
// growing wait (retry.delay doubling up to retry.max_delay) and acks each
// message once its copy is confirmed.
//
// Nothing is held without bound: a copy refused refusalsBeforePark times
// for a reason that will not pass is given up (see park), and the held
// messages take at most half the prefetch window, so that the rest of
// the queue flows; a worker with one more to hold waits for a slot.
// What is still held when the session ends goes back to the queue.
type held struct {
	agent *Agent
	f     *flow // the session's publisher and settler
	most  int   // most messages held at once
	mu    sync.Mutex
	list  []heldCopy
	taken int // copies being tried again, out of list meanwhile
	wake  chan struct{}
	freed chan struct{} // signalled when a held message is let go
	stop  chan struct{}
	done  chan struct{}
}

type heldCopy struct {
	m      *message
	dec    decision
	reason string
	// refusals counts the refusals that will not pass.
	refusals int
	err      error
}

func newHeld(a *Agent, f *flow) *held {
	h := &held{agent: a, f: f, most: heldShare(a.opts.Session.PrefetchCount), wake: make(chan struct{}, 1),
		freed: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go h.run()
	return h
}

// heldShare is the most messages held at once: half the prefetch window,
// at least one.
func heldShare(prefetch int) int {
	if prefetch == 0 {
		return 64
	}
	return max(prefetch/2, 1)
}

// add holds a message whose copy failed. It waits while the held share is
// full; it tells false when the session or the agent ends first (the
// message is then not held).
func (h *held) add(ctx context.Context, c heldCopy) bool {
	// Its settlement waits, held or not: the acks after it need not.
	h.f.settler.holding(c.m)
	for {
		h.mu.Lock()
		if len(h.list)+h.taken < h.most {
			h.list = append(h.list, c)
			h.mu.Unlock()
			break
		}
		h.mu.Unlock()
		signal(h.wake)
		select {
		case <-h.freed:
		case <-h.stop:
			return false
		case <-h.f.Done():
			return false
		case <-ctx.Done():
			return false
		}
	}
	h.agent.metrics.onHeld(1)
	signal(h.wake)
	return true
}

// signal wakes whoever waits on c, without blocking.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (h *held) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.list) + h.taken
}

func (h *held) run() {
	defer close(h.done)
	retry := h.agent.opts.Retry
	wait := retry.Delay
	for {
		if h.count() == 0 {
			select {
			case <-h.stop:
				return
			case <-h.wake:
				wait = retry.Delay
			}
			continue
		}
		if !h.sleep(wait) {
			return
		}
		if h.retryAll() {
			wait = retry.Delay
		} else {
			wait = min(2*wait, retry.MaxDelay)
		}
	}
}

// sleep waits d, or less when a worker waits for a held slot; it tells
// false when the session ends.
func (h *held) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return false
		case <-t.C:
			return true
		case <-h.wake:
			if h.full() {
				return true
			}
		}
	}
}

// full tells whether a worker waits for a held slot.
func (h *held) full() bool { return h.count() >= h.most }

// retryAll tries every held copy once and tells whether any was let go.
// When the share is full, fewer refusals are enough to give a copy up.
func (h *held) retryAll() bool {
	full := h.full()
	h.mu.Lock()
	list := h.list
	h.list, h.taken = nil, len(list)
	h.mu.Unlock()
	var kept []heldCopy
	for _, c := range list {
		if !h.retry(&c, full) {
			kept = append(kept, c)
		}
	}
	h.mu.Lock()
	h.list, h.taken = append(kept, h.list...), 0
	h.mu.Unlock()
	gone := len(kept) < len(list)
	if gone {
		h.agent.metrics.onHeld(int64(len(kept) - len(list)))
		signal(h.freed)
	}
	return gone
}

// retry tries one copy again, and settles the message once it is made or
// given up; it tells whether the message was let go.
func (h *held) retry(c *heldCopy, full bool) (gone bool) {
	a := h.agent
	defer func() {
		if p := recover(); p != nil {
			a.log.Error(fmt.Sprintf("message %q: copying it panicked (%s); it stays held", shortID(c.m.d), OneLine(p)))
			gone = false
		}
	}()
	err := a.copy(context.Background(), h.f, c.m, c.dec, c.reason)
	if err == nil {
		a.settleAs(h.f, c.m, result{ok: true}, false, c.dec.outcome)
		return true
	}
	a.stats.copyFailed.Add(1)
	a.stats.lastCopyError.Store(err.Error())
	if !permanent(err) {
		return false
	}
	c.refusals++
	c.err = err
	// A refusal closes the publishing channel for every copy on it: one
	// may be another copy's. When the share is full, two are enough.
	if c.refusals < refusalsBeforePark && (!full || c.refusals < 2) {
		return false
	}
	return h.giveUp(c)
}

// giveUp lets a message go whose copy the broker keeps refusing: a dead
// letter is parked in the longest retry queue, a retry is dead-lettered.
// It tells false when that fails too: the message stays held.
func (h *held) giveUp(c *heldCopy) bool {
	a := h.agent
	why := fmt.Sprintf("the broker refused its %s copy %d times: %s", copyKind(c.dec), c.refusals, OneLine(c.err))
	if c.dec.outcome == OutcomeDeadLettered {
		if err := a.park(context.Background(), h.f, c.m, c.dec, c.reason, why); err != nil {
			a.log.Error(fmt.Sprintf("message %q: %s; parking it in a retry queue failed too (%s): it stays held",
				shortID(c.m.d), why, OneLine(err)))
			return false
		}
		a.log.Error(fmt.Sprintf("message %q: %s; it is parked in %s and its dead letter tried again every %s, "+
			"without calling the backend", shortID(c.m.d), why, consumer.RetryQueue(a.opts.Session.Queue, a.parkDelay()), a.parkDelay()))
		a.settleAs(h.f, c.m, result{ok: true}, false, OutcomeParked)
		return true
	}
	if !a.opts.DeadLetter.Enabled() {
		return false
	}
	dec := a.decide(c.m, result{reason: why, kind: kindRefused})
	if dec.broker {
		a.log.Error(fmt.Sprintf("message %q: %s; it is rejected to the queue's dead-letter exchange", shortID(c.m.d), why))
		a.settleAs(h.f, c.m, result{reason: why}, true, OutcomeDeadLettered)
		return true
	}
	if err := a.copy(context.Background(), h.f, c.m, dec, why); err != nil {
		return false
	}
	a.log.Error(fmt.Sprintf("message %q: %s; it is dead-lettered", shortID(c.m.d), why))
	a.settleAs(h.f, c.m, result{ok: true}, false, dec.outcome)
	return true
}

func copyKind(dec decision) string {
	if dec.outcome == OutcomeDeadLettered {
		return "dead-letter"
	}
	return "retry"
}

// permanent tells whether the broker refused a copy for a reason that
// will not pass by trying again: nothing bound for its routing key, an
// exchange gone, refused access, a precondition or a size.
func permanent(err error) bool {
	if errors.Is(err, consumer.ErrUnroutable) {
		return true
	}
	var aerr *amqp.Error
	if !errors.As(err, &aerr) {
		return false
	}
	switch aerr.Code {
	case amqp.AccessRefused, amqp.NotFound, amqp.PreconditionFailed, amqp.ContentTooLarge, amqp.NotAllowed:
		return true
	}
	return false
}

// close stops the retries; the messages still held go back to the queue
// with the session (counted unsettled).
func (h *held) close() {
	close(h.stop)
	<-h.done
	n := h.count()
	for _, c := range h.list {
		h.agent.grouped(c.m, false) // back to the queue
	}
	for range n {
		h.agent.metrics.onHeld(-1)
		h.agent.metrics.onSettled(OutcomeUnsettled)
	}
	if n > 0 {
		h.agent.log.Warning(n, "held messages go back to the queue with the session: their copies could not be made")
	}
}
