package driver

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/luraproject/lura/v2/transport/http/client"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// Headers the driver keeps on the copies it republishes.
const (
	// HeaderAttempts counts the failed dispatches of a message so far.
	HeaderAttempts = "x-krakend-attempts"
	// HeaderThrottles counts the 429 and 503 answers a message got: they
	// use up an attempt only every throttlesPerAttempt.
	HeaderThrottles = "x-krakend-throttles"
	// HeaderLastError is the reason of the last failed dispatch.
	HeaderLastError = "x-krakend-last-error"
	// HeaderAgent names the agent that dead-lettered the message.
	HeaderAgent = "x-krakend-agent"
	// HeaderOriginalExchange and HeaderOriginalRoutingKey keep where the
	// message was first published: a retry comes back through the
	// default exchange with the queue's name as routing key.
	HeaderOriginalExchange   = "x-krakend-original-exchange"
	HeaderOriginalRoutingKey = "x-krakend-original-routing-key"
	// internalPrefix marks the headers above; they are not passed to the
	// backend as X-Amqp-Header-*.
	internalPrefix = "x-krakend-"
)

// publisher is the part of a session that publishes copies.
type publisher interface {
	Publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error
}

// throttlesPerAttempt is how many 429 or 503 answers use up one attempt.
// An overload that lasts would otherwise dead-letter healthy messages; a
// backend that answers 503 for good (down behind a proxy) still ends in
// the dead letter, after that many times the attempts.
const throttlesPerAttempt = 10

// maxThrottles bounds the throttle count read from a message.
const maxThrottles = 1_000_000

// decision is what becomes of a failed message.
type decision struct {
	// outcome is OutcomeRetried or OutcomeDeadLettered.
	outcome string
	// attempt is the number of failed attempts the copy records, within
	// [0, max_attempts]: a throttled answer may use up none.
	attempt int
	// throttles counts the 429 and 503 answers, this one included.
	throttles int
	// delay is the wait of a retry: one of the declared retry delays.
	delay time.Duration
	// exhausted: retried after the last attempt, as no dead letter is
	// configured.
	exhausted bool
	// broker: dead-lettered by the queue's own dead-letter exchange.
	broker bool
	// exchange and key are where a dead-letter copy goes.
	exchange, key string
	// park, on a retry, marks the copy not to be dispatched again when
	// it comes back (HeaderParked), with the reason.
	park string
}

// decide chooses, from the validated attempt count and the failure,
// between a retry and a dead letter. It does no I/O.
func (a *Agent) decide(m *message, r result) decision {
	retry, dead := a.opts.Retry, a.opts.DeadLetter
	attempt, throttles := m.attempt(), m.throttles
	if r.kind == kindParked {
		attempt = m.failed // counted when it was parked
	}
	attempt = min(max(attempt, 1), retry.MaxAttempts)
	counted := true
	if r.throttled() {
		throttles = min(throttles+1, maxThrottles)
		counted = throttles%throttlesPerAttempt == 0
	}
	giveUp := counted && attempt >= retry.MaxAttempts || final(r.kind) ||
		r.status != 0 && slices.Contains(dead.Statuses, r.status)
	switch {
	case giveUp && dead.Broker && !m.retried && deathHeaders(m.d):
		// The broker's dead-lettering rewrites x-death and loses a
		// message whose x-death it cannot read: one its publisher set
		// goes through a retry queue first, which leaves the broker's
		// own.
		return decision{outcome: OutcomeRetried, attempt: attempt, throttles: throttles, delay: retry.DelayFor(1),
			park: "its publisher set x-death: it is rejected to the queue's dead-letter exchange once back from a retry queue"}
	case giveUp && dead.Broker:
		return decision{outcome: OutcomeDeadLettered, attempt: attempt, throttles: throttles, broker: true}
	case giveUp && dead.Enabled():
		d := decision{outcome: OutcomeDeadLettered, attempt: attempt, throttles: throttles, key: dead.Queue}
		if dead.Exchange != "" {
			d.exchange, d.key = dead.Exchange, dead.RoutingKey
			if d.key == "" {
				d.key = m.key
			}
		}
		return d
	case giveUp:
		// The longest declared delay: MaxDelay rounded to the
		// millisecond, as its retry queue was named.
		return decision{outcome: OutcomeRetried, attempt: attempt, throttles: throttles,
			delay: retry.DelayFor(math.MaxInt), exhausted: true}
	}
	d := decision{outcome: OutcomeRetried, attempt: attempt, throttles: throttles}
	if !counted {
		d.attempt = attempt - 1
	}
	switch {
	case r.retryAfter > 0:
		d.delay = retry.AtLeast(r.retryAfter)
	case r.throttled():
		// Backing off an overload: the wait grows with every throttle,
		// counted or not.
		d.delay = retry.DelayFor(m.failed + throttles)
	default:
		d.delay = retry.DelayFor(attempt)
	}
	return d
}

// fail handles a failed dispatch when the driver owns retries: the
// message is republished to a retry queue (or dead-lettered) and acked
// only once the broker confirmed the copy. A message whose copy cannot be
// made is held, unacknowledged, while the copy is tried again: the backend
// is not called for it meanwhile. It returns the outcome.
func (a *Agent) fail(ctx context.Context, f *flow, m *message, r result) string {
	m.last = r
	dec := a.decide(m, r)
	if dec.broker {
		a.stats.deadLettered.Add(1)
		a.stats.lastDeadLetter.Store(r.reason)
		return a.settleAs(f, m, result{reason: r.reason}, true, OutcomeDeadLettered)
	}
	// The copy waits for the broker's confirm: the acks of the messages
	// after it need not, since an ack kept waiting is lost with the
	// connection and its message is dispatched twice.
	f.settler.holding(m)
	if err := a.copy(ctx, f, m, dec, r.reason); err != nil {
		a.stats.copyFailed.Add(1)
		a.stats.lastCopyError.Store(err.Error())
		c := heldCopy{m: m, dec: dec, reason: r.reason, err: err}
		if permanent(err) {
			c.refusals = 1
		}
		if f.held != nil && ctx.Err() == nil && f.held.add(ctx, c) {
			return OutcomeHeld
		}
		// No holder (a session that settles on the spot), or stopping:
		// the message goes back to the queue.
		if !f.ended() {
			sleep(ctx, min(a.opts.Retry.Delay, 5*time.Second))
		}
		return a.settle(f, m, result{reason: r.reason}, false)
	}
	return a.settleAs(f, m, result{ok: true}, false, dec.outcome)
}

// copy makes the retry or dead-letter copy a decision calls for.
func (a *Agent) copy(ctx context.Context, pub publisher, m *message, dec decision, reason string) error {
	if dec.outcome == OutcomeDeadLettered {
		return a.deadLetter(ctx, pub, m, dec, reason)
	}
	if dec.exhausted {
		a.stats.exhausted.Add(1)
	}
	return a.retry(ctx, pub, m, dec, reason)
}

func (a *Agent) retry(ctx context.Context, pub publisher, m *message, dec decision, reason string) error {
	queue := consumer.RetryQueue(a.opts.Session.Queue, dec.delay)
	msg := a.copyOf(m, dec.attempt, dec.throttles, reason)
	if dec.park != "" {
		msg.Headers[HeaderParked] = dec.park
	}
	id := ""
	if a.unconfirmed != nil {
		id = a.unconfirmed.newID()
		msg.Headers[HeaderCopyID] = id
	}
	ctx, cancel := copyContext(ctx, m)
	defer cancel()
	err := pub.Publish(ctx, "", queue, fit(pub, msg))
	if err != nil {
		m.copyLost(id, err)
	}
	return err
}

// park sends a message whose dead letter the broker refuses to the
// longest retry queue, marked so that it is not dispatched again when it
// comes back: its dead letter is tried again then.
func (a *Agent) park(ctx context.Context, pub publisher, m *message, dec decision, reason, why string) error {
	msg := a.copyOf(m, dec.attempt, dec.throttles, reason)
	msg.Headers[HeaderParked] = truncate(why, 1024)
	ctx, cancel := copyContext(ctx, m)
	defer cancel()
	return pub.Publish(ctx, "", consumer.RetryQueue(a.opts.Session.Queue, a.parkDelay()), fit(pub, msg))
}

// parkDelay is how long a parked message waits: the longest retry delay.
func (a *Agent) parkDelay() time.Duration { return a.opts.Retry.DelayFor(math.MaxInt) }

func (a *Agent) deadLetter(ctx context.Context, pub publisher, m *message, dec decision, reason string) error {
	msg := a.copyOf(m, dec.attempt, dec.throttles, reason)
	msg.Headers[HeaderAgent] = a.opts.Name
	ctx, cancel := copyContext(ctx, m)
	defer cancel()
	if err := pub.Publish(ctx, dec.exchange, dec.key, fit(pub, msg)); err != nil {
		return err
	}
	a.stats.deadLettered.Add(1)
	a.stats.lastDeadLetter.Store(reason)
	return nil
}

// copyContext bounds a publish; it outlives ctx so that a copy started
// before shutdown still completes, until the shutdown bound.
func copyContext(ctx context.Context, m *message) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	stop := context.AfterFunc(m.bound, cancel)
	return ctx, func() { stop(); cancel() }
}

// copyOf builds the copy of a message (see copies.go), with its attempt
// count, the failure reason and where it was first published. Whatever
// x-krakend-* headers the message carried are dropped: the copy holds the
// driver's own, from what the driver believes of the message.
func (a *Agent) copyOf(m *message, attempt, throttles int, reason string) amqp.Publishing {
	h := copyHeaders(m.d, 6)
	h[HeaderAttempts] = int64(attempt)
	if throttles > 0 {
		h[HeaderThrottles] = int64(throttles)
	}
	h[HeaderLastError] = truncate(reason, 1024)
	h[HeaderOriginalExchange] = m.exchange
	h[HeaderOriginalRoutingKey] = m.key
	return copyProperties(m.d, h)
}

// statusOf finds the backend status behind a pipeline error, when Lura
// exposes one.
func statusOf(err error) int {
	var withCode interface{ StatusCode() int }
	if errors.As(err, &withCode) {
		return withCode.StatusCode()
	}
	var invalid *client.ErrInvalidStatus
	if errors.As(err, &invalid) {
		// Lura keeps the code unexported; its message starts with it.
		var code int
		if _, err := fmt.Sscanf(invalid.Error(), "invalid status code %d", &code); err == nil {
			return code
		}
	}
	return 0
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "")
}
