package driver

import (
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// A copy's properties travel in one content header frame, which the
// client does not split: one larger than the connection's frame_max
// makes the broker close the whole connection (FRAME_ERROR), and the
// copy could never be made. A publisher can send properties just under
// the limit, and the driver's headers would push the copy over it.

// framer is a session that knows the frame_max it negotiated.
type framer interface{ FrameMax() int }

// headerFrameBase is the content header frame's fixed part: the frame
// header and end (8), class, weight, body size and property flags (14).
const headerFrameBase = 8 + 14

// fit makes a copy's properties fit the publishing connection's frames:
// when they do not, the publisher's headers are dropped from it (the
// driver's own are kept) and its last error says so.
func fit(pub publisher, msg amqp.Publishing) amqp.Publishing {
	f, ok := pub.(framer)
	if !ok || f.FrameMax() <= 0 || headerFrameSize(msg) <= f.FrameMax() {
		return msg
	}
	h := make(amqp.Table, 8)
	for k, v := range msg.Headers {
		if driverHeader(k) && !isKept(k) {
			h[k] = v
		}
	}
	reason, _ := h[HeaderLastError].(string)
	h[HeaderLastError] = truncate("the message's headers were dropped from its copy, whose properties were over the frame size; "+reason, 1024)
	msg.Headers = h
	return msg
}

// headerFrameSize is the size on the wire of the content header frame of
// a publishing, as amqp091 writes it.
func headerFrameSize(msg amqp.Publishing) int {
	n := headerFrameBase
	for _, s := range []string{msg.ContentType, msg.ContentEncoding, msg.CorrelationId, msg.ReplyTo,
		msg.Expiration, msg.MessageId, msg.Type, msg.UserId, msg.AppId} {
		if s != "" {
			n += 1 + len(s)
		}
	}
	if len(msg.Headers) > 0 {
		n += 4 + tableSize(msg.Headers)
	}
	if msg.DeliveryMode != 0 {
		n++
	}
	if msg.Priority != 0 {
		n++
	}
	if !msg.Timestamp.IsZero() {
		n += 8
	}
	return n
}

// tableSize is the size of a table's entries on the wire.
func tableSize(t amqp.Table) int {
	n := 0
	for k, v := range t {
		n += 1 + len(k) + fieldSize(v)
	}
	return n
}

// fieldSize is the size of a field value on the wire, its type octet
// included.
func fieldSize(v interface{}) int {
	switch x := v.(type) {
	case bool, byte, int8:
		return 2
	case int16, uint16:
		return 3
	case int, int32, uint32, float32:
		return 5
	case int64, float64, time.Time:
		return 9
	case amqp.Decimal:
		return 6
	case string:
		return 5 + len(x)
	case []byte:
		return 5 + len(x)
	case amqp.Table:
		return 5 + tableSize(x)
	case []interface{}:
		n := 5
		for _, e := range x {
			n += fieldSize(e)
		}
		return n
	}
	return 1 // void
}
