package driver

import "context"

// settler acks or nacks the messages of one session and counts their
// outcomes. It is chosen once per session: the ack batcher (acks.go)
// when the agent acks, the direct settler with auto_ack and in tests.
type settler interface {
	settle(m *message, ack, requeue bool, outcome string)
	// holding says a message stays unsettled for a while (its copy could
	// not be made): the acks of the messages after it need not wait.
	holding(m *message)
}

// directSettler acks or nacks each message on the spot.
type directSettler struct{ a *Agent }

func (s directSettler) settle(m *message, ack, requeue bool, outcome string) {
	s.a.recordSettle(settle(m.d, result{ok: ack}, !requeue), ackRequest{m: m, ack: ack, requeue: requeue, outcome: outcome})
}

func (directSettler) holding(*message) {}

// flow is what the workers of one session share: the session they take
// deliveries from and publish copies on, the settler of their messages,
// and the holder of the messages whose copies failed (nil when the
// driver does not own retries).
type flow struct {
	session
	// number counts the agent's sessions, from 1.
	number  uint64
	settler settler
	held    *held
	// unreadable tells whether the client library could not read a
	// delivery's headers (they arrive empty) and why; nil when the
	// session cannot tell.
	unreadable func(tag uint64) (string, bool)
	// live ends when the agent stops or the session's channel closes:
	// waits for the rate limit and the back-pressure end with it. Nil
	// in tests that build a flow by hand.
	live context.Context
}

// FrameMax is the frame_max of the session's publishing connection, 0
// when it cannot tell.
func (f *flow) FrameMax() int {
	if fm, ok := f.session.(framer); ok {
		return fm.FrameMax()
	}
	return 0
}

// ended tells whether the session's channel closed: its deliveries can
// no longer be settled, and the broker delivers them again.
func (f *flow) ended() bool {
	select {
	case <-f.Done():
		return true
	default:
		return false
	}
}

// settle acks a handled message and nacks the others, and returns the
// outcome.
func (a *Agent) settle(f *flow, m *message, r result, discard bool) string {
	if !r.ok {
		m.last = r
	}
	outcome := OutcomeAcked
	switch {
	case r.ok:
	case discard:
		outcome = OutcomeDiscarded
	default:
		outcome = OutcomeRequeued
	}
	return a.settleAs(f, m, r, discard, outcome)
}

// settleAs acks (r.ok) or nacks a message through the session's settler
// and returns the outcome it counts.
func (a *Agent) settleAs(f *flow, m *message, r result, discard bool, outcome string) string {
	if outcome == OutcomeDeadLettered || outcome == OutcomeDiscarded {
		a.replyFailure(m, f) // given up on: its caller need not wait
	}
	m.outcome = outcome
	a.grouped(m, r.ok || discard)
	f.settler.settle(m, r.ok, !discard, outcome)
	return outcome
}

// recordSettle counts a message's outcome, or counts it unsettled when
// the channel refused the ack or nack: the broker then redelivers it. A
// message refused after its handling was done (anything but a requeue)
// is remembered, so that its redelivery is not dispatched again.
func (a *Agent) recordSettle(err error, req ackRequest) {
	if err != nil {
		a.stats.unsettled.Add(1)
		a.metrics.onSettled(OutcomeUnsettled)
		a.log.Debug("ack/nack refused, the broker will redeliver:", err)
		if req.ack || !req.requeue {
			a.leftBehind(req.m, fate{ack: req.ack, outcome: req.outcome})
		}
		return
	}
	a.metrics.onSettled(req.outcome)
}
