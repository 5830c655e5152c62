package driver

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// OutcomeHeld is the span outcome of a failed message whose retry or
// dead-letter copy could not be made yet: it is held unacknowledged while
// the copy is tried again, and settled (counted) once the copy is made.
const OutcomeHeld = "held"

// held keeps, for one session, the failed messages whose retry or
// dead-letter copy could not be made (a retry queue gone, an unroutable
// dead-letter exchange, a copy the broker refuses). They stay
// unacknowledged, so the backend is not called for them again, and each
// takes a prefetch slot: a broker that refuses every copy makes the agent
// stop taking messages, never spin. One goroutine tries the copies again
// with a growing wait (retry.delay doubling up to retry.max_delay) and
// acks each message once its copy is confirmed. What is still held when
// the session ends goes back to the queue.
type held struct {
	agent *Agent
	f     *flow // the session's publisher and settler
	mu    sync.Mutex
	list  []heldCopy
	wake  chan struct{}
	stop  chan struct{}
	done  chan struct{}
}

type heldCopy struct {
	m      *message
	dec    decision
	reason string
}

func newHeld(a *Agent, f *flow) *held {
	h := &held{agent: a, f: f, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go h.run()
	return h
}

// add holds a message whose copy failed.
func (h *held) add(c heldCopy) {
	h.f.settler.holding(c.m)
	h.mu.Lock()
	h.list = append(h.list, c)
	h.mu.Unlock()
	h.agent.metrics.onHeld(1)
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

func (h *held) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.list)
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
		t := time.NewTimer(wait)
		select {
		case <-h.stop:
			t.Stop()
			return
		case <-t.C:
		}
		if h.retryAll() {
			wait = retry.Delay
		} else {
			wait = min(2*wait, retry.MaxDelay)
		}
	}
}

// retryAll tries every held copy once and tells whether any was made.
func (h *held) retryAll() bool {
	h.mu.Lock()
	list := h.list
	h.list = nil
	h.mu.Unlock()
	var kept []heldCopy
	made := false
	for _, c := range list {
		if !h.retry(c) {
			kept = append(kept, c)
			continue
		}
		made = true
		h.agent.metrics.onHeld(-1)
	}
	h.mu.Lock()
	h.list = append(kept, h.list...)
	h.mu.Unlock()
	return made
}

// retry tries one copy again, and acks the message once it is made.
func (h *held) retry(c heldCopy) (made bool) {
	a := h.agent
	defer func() {
		if p := recover(); p != nil {
			a.log.Error(fmt.Sprintf("message %q: copying it panicked (%s); it stays held", shortID(c.m.d), oneLine(p)))
			made = false
		}
	}()
	if err := a.copy(context.Background(), h.f, c.m, c.dec, c.reason); err != nil {
		a.stats.copyFailed.Add(1)
		a.stats.lastCopyError.Store(err.Error())
		return false
	}
	a.settleAs(h.f, c.m, result{ok: true}, false, c.dec.outcome)
	return true
}

// close stops the retries; the messages still held go back to the queue
// with the session (counted unsettled).
func (h *held) close() {
	close(h.stop)
	<-h.done
	n := h.count()
	for range n {
		h.agent.metrics.onHeld(-1)
		h.agent.metrics.onSettled(OutcomeUnsettled)
	}
	if n > 0 {
		h.agent.log.Warning(n, "held messages go back to the queue with the session: their copies could not be made")
	}
}
