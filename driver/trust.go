package driver

import (
	"context"
	"fmt"
	"math"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"
)

// A delivery is input from whoever may publish to the agent's exchange:
// its headers and properties are validated before use, like a request to
// a server. The driver's own headers (the attempt count, where the message
// was first published) are believed only on a message that came back from
// one of this agent's retry queues; on any other they are ignored.

// message is a delivery as the driver reads it: validated once, when a
// worker takes it.
type message struct {
	d *amqp.Delivery
	// session is the number of the session the delivery came on.
	session uint64
	// fp is the fingerprint of raw once worked out (see leftovers.go).
	fp *[32]byte
	// raw is the delivery as received, before read restores a copy back
	// from a retry queue: what a redelivery repeats (see leftovers.go).
	raw *amqp.Delivery
	// exchange and key are where the message was first published.
	exchange, key string
	// failed counts the failed dispatches of the message before this
	// one, within [0, max_attempts-1].
	failed int
	// throttles counts the 429 and 503 answers the message got before
	// this dispatch, within [0, maxThrottles].
	throttles int
	// retried: the message came back from one of the agent's retry
	// queues; d is then the message as its publisher sent it (restored).
	retried bool
	// parked is why a copy back from a retry queue must not be
	// dispatched again (HeaderParked); "" for any other message.
	parked string
	// lastError is why a parked message failed.
	lastError string
	// deliveries is the queue's count of earlier deliveries of this
	// copy (a quorum queue's x-delivery-count on a redelivery); 0 when
	// the broker gave none.
	deliveries int64
	// unreadable is why the client library could not read the message's
	// headers; they arrived empty.
	unreadable string
	// event is the message read as a CloudEvent, with the cloudevents
	// option and a valid event; nil otherwise.
	event *event
	// outcome is set once an ack or nack was handed over for it.
	outcome string
	// last is the failure the message is given up on, for its error
	// reply.
	last result
	// unconfirmed are the ids of its retry copies whose publish failed
	// but which may exist; group is the group it claimed (unconfirmed.go).
	unconfirmed []lostCopy
	group       *group
	// bound ends when the dispatch and the copies of the message must
	// end: at the shutdown bound, not when the agent begins to stop.
	bound context.Context
}

// attempt is the number of this dispatch, within [1, max_attempts].
func (m *message) attempt() int { return m.failed + 1 }

// maxNameLength bounds an exchange name or routing key (an AMQP short
// string).
const maxNameLength = 255

// read validates what the driver uses of a delivery. A value of the wrong
// type or out of range is treated as absent or clamped, and logged at
// DEBUG.
func (a *Agent) read(m *message) {
	d := m.d
	m.exchange, m.key = d.Exchange, d.RoutingKey
	m.deliveries = deliveryCount(d)
	m.retried = a.fromRetryQueue(d)
	if m.retried {
		a.readRetried(m)
	}
	if a.opts.CloudEvents {
		m.event = a.readEvent(m.d)
	}
}

// readRetried reads what the driver wrote on a message back from one of
// its retry queues, and restores the message as its publisher sent it.
func (a *Agent) readRetried(m *message) {
	d := m.d
	m.parked = parkedReason(d)
	most := a.opts.Retry.MaxAttempts - 1
	if m.parked != "" {
		// A parked copy records its final count: it is not dispatched.
		most++
		m.lastError, _ = d.Headers[HeaderLastError].(string)
	}
	m.failed = a.readCount(d, HeaderAttempts, int64(most), true)
	m.throttles = a.readCount(d, HeaderThrottles, maxThrottles, false)
	exchange, okExchange := name(d.Headers[HeaderOriginalExchange])
	key, okKey := name(d.Headers[HeaderOriginalRoutingKey])
	if okExchange && okKey {
		m.exchange, m.key = exchange, key
	} else {
		a.log.Debug(fmt.Sprintf("message %q: %s or %s missing or invalid: the retry queue's exchange and key are used",
			shortID(d), HeaderOriginalExchange, HeaderOriginalRoutingKey))
	}
	m.d = restored(d)
}

// deliveryCount is the x-delivery-count a quorum queue writes on a
// message it delivers again: read only on a redelivery, since on a first
// delivery the header, if any, is the publisher's. 0 when absent or not
// a positive integer.
func deliveryCount(d *amqp.Delivery) int64 {
	if !d.Redelivered {
		return 0
	}
	n, ok := integer(d.Headers["x-delivery-count"])
	if !ok || n < 1 {
		return 0
	}
	return n
}

// readEvent reads a message as a CloudEvent (see cloudevents.go): nil
// when it is none, or not a valid one, which a DEBUG line says.
func (a *Agent) readEvent(d *amqp.Delivery) *event {
	e, err := readEvent(d)
	if err != nil {
		a.log.Debug(fmt.Sprintf("message %q: not a valid CloudEvent, sent as a plain message: %s", shortID(d), OneLine(err)))
		return nil
	}
	return e
}

// publisherView is a delivery as its publisher sent it: restored when it
// came back from one of the agent's retry queues.
func (a *Agent) publisherView(d *amqp.Delivery) *amqp.Delivery {
	if a.fromRetryQueue(d) {
		return restored(d)
	}
	return d
}

// readCount reads a count the driver wrote in a header, clamped to
// [0, most]. A value out of range, of another type or, when required,
// missing is logged at DEBUG and read clamped, or as 0.
func (a *Agent) readCount(d *amqp.Delivery, header string, most int64, required bool) int {
	v, present := d.Headers[header]
	n, ok := integer(v)
	if !ok {
		if present || required {
			a.log.Debug(fmt.Sprintf("message %q: %s is missing or not an integer: counted as 0", shortID(d), header))
		}
		return 0
	}
	count := min(max(n, 0), most)
	if count != n {
		a.log.Debug(fmt.Sprintf("message %q: %s %d clamped to %d", shortID(d), header, n, count))
	}
	return int(count)
}

// fromRetryQueue tells whether the broker dead-lettered the delivery back
// from one of this agent's retry queues: it came through the default
// exchange with the work queue as routing key, and its newest x-death
// entry names a retry queue of the agent, expired. A publisher can write
// x-death, but not the exchange a delivery came through: only one allowed
// to publish to the default exchange could forge it.
func (a *Agent) fromRetryQueue(d *amqp.Delivery) bool {
	if len(a.retryQueues) == 0 || d.Exchange != "" || d.RoutingKey != a.opts.Session.Queue {
		return false
	}
	deaths, ok := d.Headers["x-death"].([]interface{})
	if !ok || len(deaths) == 0 {
		return false
	}
	newest, ok := deaths[0].(amqp.Table)
	if !ok {
		return false
	}
	queue, _ := newest["queue"].(string)
	reason, _ := newest["reason"].(string)
	_, ours := a.retryQueues[queue]
	return reason == "expired" && ours
}

// integer reads an AMQP integer of any width.
func integer(v interface{}) (int64, bool) {
	switch n := v.(type) {
	case int64:
		return n, true
	case int32:
		return int64(n), true
	case int16:
		return int64(n), true
	case int8:
		return int64(n), true
	case int:
		return int64(n), true
	case uint8:
		return int64(n), true
	case uint16:
		return int64(n), true
	case uint32:
		return int64(n), true
	case uint64:
		if n <= math.MaxInt64 {
			return int64(n), true
		}
	}
	return 0, false
}

// name reads an exchange name or routing key the driver wrote: text of
// at most 255 bytes.
func name(v interface{}) (string, bool) {
	s, ok := v.(string)
	if !ok || len(s) > maxNameLength || !utf8.ValidString(s) {
		return "", false
	}
	return s, true
}

// shortID names a message in a log line: its message id, cut short.
func shortID(d *amqp.Delivery) string { return truncate(d.MessageId, 64) }
