package driver

import (
	"context"
	"errors"
	"fmt"

	amqp "github.com/rabbitmq/amqp091-go"
)

// handle takes one delivery from its dispatch to its ack, nack, retry or
// dead letter, inside the message's consumer span. Nothing in one
// message's handling can stop the worker: a panic is recovered, logged,
// and the message takes the failure path.
func (a *Agent) handle(ctx, bound context.Context, f *flow, d *amqp.Delivery) {
	a.metrics.onReceived()
	a.received.Add(1)
	m := &message{d: d, raw: d, session: f.number, exchange: d.Exchange, key: d.RoutingKey, bound: bound}
	if f.unreadable != nil {
		m.unreadable, _ = f.unreadable(d.DeliveryTag)
	}
	ctx, span := a.tracing.begin(ctx, d)
	outcome, r := a.safely(ctx, f, m)
	a.tracing.end(span, m, outcome, r)
}

// safely reads and processes a message, recovering from a panic in either.
func (a *Agent) safely(ctx context.Context, f *flow, m *message) (outcome string, r result) {
	defer func() {
		if p := recover(); p != nil {
			outcome, r = a.recovered(ctx, f, m, p)
		}
	}()
	a.read(m)
	return a.process(ctx, f, m)
}

// recovered handles a panic in the handling of one message: one ERROR
// line, then, unless the message was already settled, the failure path
// (a retry copy or a dead letter, with the reason in its headers).
func (a *Agent) recovered(ctx context.Context, f *flow, m *message, p interface{}) (string, result) {
	r := result{reason: OneLine(fmt.Sprint("panic while handling the message: ", p)), kind: "panic"}
	a.log.Error(fmt.Sprintf("message %q: %s; the agent goes on", shortID(m.d), r.reason))
	a.stats.failed.Add(1)
	a.stats.lastReason.Store(r.reason)
	if m.outcome != "" || a.opts.Session.AutoAck {
		return m.outcome, r
	}
	return a.failAfterPanic(ctx, f, m, r), r
}

// failAfterPanic sends a message whose handling panicked down the failure
// path. Should that panic too, the message is left unacknowledged: the
// broker redelivers it when the session ends, and nothing spins.
func (a *Agent) failAfterPanic(ctx context.Context, f *flow, m *message, r result) (outcome string) {
	defer func() {
		if p := recover(); p != nil {
			a.log.Error(fmt.Sprintf("message %q: its failure path panicked too (%v): it stays unacknowledged until the session ends",
				shortID(m.d), OneLine(fmt.Sprint(p))))
			a.metrics.onSettled(OutcomeUnsettled)
			outcome = OutcomeUnsettled
		}
	}()
	if !a.ownsRetries() {
		return a.settle(f, m, r, a.opts.NackDiscard)
	}
	return a.fail(ctx, f, m, r)
}

// process dispatches a message and settles it; it returns the outcome
// and the dispatch result.
func (a *Agent) process(ctx context.Context, f *flow, m *message) (string, result) {
	if a.opts.Session.AutoAck {
		return a.processAutoAcked(ctx, f, m)
	}
	// Handled before a cut lost its ack, or the same message as one
	// handled since a cut lost its copy's confirm: not dispatched again.
	if a.settledBefore(f, m) || a.settledInGroup(f, m) {
		return m.outcome, result{ok: true}
	}
	if r, unfit := a.unfit(m); unfit {
		a.stats.failed.Add(1)
		a.stats.lastReason.Store(r.reason)
		if !a.ownsRetries() {
			return a.settle(f, m, r, true), r
		}
		return a.fail(ctx, f, m, r), r
	}
	if err := a.waitInSession(ctx, f, m); err != nil {
		// Waiting behind an ordering key, for the limit or the pace, or
		// buffered, when the channel closed: its ack could not succeed,
		// and the broker delivers it again to the next session.
		r := result{reason: "its session ended before its dispatch"}
		if !errors.Is(err, errSessionEnded) {
			r.reason = "agent stopping"
		}
		return a.settle(f, m, r, false), r
	}
	r := a.dispatch(ctx, m)
	a.release(r)
	if !r.ok && m.bound.Err() != nil {
		// Cut short at the shutdown bound: not a failed attempt.
		r = result{reason: "cancelled at the shutdown bound"}
		return a.settle(f, m, r, false), r
	}
	if r.ok {
		r = a.replySuccess(ctx, f, m, r)
	}
	if r.ok || !a.ownsRetries() {
		return a.settle(f, m, r, a.opts.NackDiscard), r
	}
	return a.fail(ctx, f, m, r), r
}

// processAutoAcked dispatches a message the broker has already
// forgotten: it is sent even when the agent is stopping.
func (a *Agent) processAutoAcked(ctx context.Context, f *flow, m *message) (string, result) {
	r, unfit := a.unfit(m)
	if !unfit {
		waited := a.wait(ctx, nil) == nil
		r = a.dispatch(ctx, m)
		if waited {
			a.release(r)
		}
	}
	if r.ok {
		a.replySuccess(ctx, f, m, r)
	} else {
		m.last = r
		a.replyFailure(m, f)
	}
	m.outcome = OutcomeAutoAcked
	a.metrics.onSettled(OutcomeAutoAcked)
	return OutcomeAutoAcked, r
}

// unfit tells whether a message must not reach the backend: its headers
// could not be read, it is too large, or it was parked because its dead
// letter could not be made (tried again now, when a dead-letter
// destination is still configured).
func (a *Agent) unfit(m *message) (result, bool) {
	if m.unreadable != "" {
		return result{reason: "its headers could not be read (" + m.unreadable + "): they were dropped and it is not sent to the backend",
			kind: kindUnreadable}, true
	}
	if m.parked != "" && a.opts.DeadLetter.Enabled() {
		reason := m.lastError
		if reason == "" {
			reason = m.parked
		}
		return result{reason: truncate(reason, 1024), kind: kindParked}, true
	}
	return a.tooLarge(m)
}

// tooLarge tells whether a message's body is over max_body_bytes: such a
// message never reaches the backend.
func (a *Agent) tooLarge(m *message) (result, bool) {
	if n := len(m.d.Body); a.opts.MaxBodyBytes > 0 && n > a.opts.MaxBodyBytes {
		return result{reason: fmt.Sprintf("the body of %d bytes is over max_body_bytes (%d): not sent to the backend", n, a.opts.MaxBodyBytes),
			kind: kindTooLarge}, true
	}
	return result{}, false
}

// dispatch runs the backend pipeline for one message. Its deadline is the
// dispatch timeout and it does not end with ctx: a dispatch in flight when
// the agent stops is allowed to finish, until the shutdown bound. It keeps
// ctx's values (the consumer span).
func (a *Agent) dispatch(ctx context.Context, m *message) (r result) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.opts.Timeout)
	defer context.AfterFunc(m.bound, cancel)()
	defer cancel()
	// Deferred before the recover below, so that it runs after it and
	// records a panic's error.type.
	start := a.metrics.onDispatch()
	defer func() { a.metrics.onDispatched(start, r.kind) }()
	defer func() {
		if p := recover(); p != nil {
			r = result{reason: OneLine(fmt.Sprint("the backend pipeline panicked: ", p)), kind: "panic"}
		}
		if !r.ok && m.bound.Err() == nil { // a cut at shutdown is no failure
			a.stats.failed.Add(1)
			a.stats.lastReason.Store(r.reason)
			a.log.Debug("dispatch failed:", r.reason)
		}
	}()
	req := newRequest(m, a.opts.URLParams)
	if h := a.opts.IdempotencyHeader; h != "" {
		req.Headers[h] = []string{idempotencyKey(m)}
	}
	a.tracing.inject(dctx, req.Headers)
	resp, err := a.opts.Proxy(dctx, req)
	r = judge(resp, err)
	if a.replyTo(m) != "" {
		r.answer = a.capture(resp, err, r)
	}
	discardBody(resp)
	return r
}
