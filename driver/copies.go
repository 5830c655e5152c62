package driver

import (
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
)

// A retry or dead-letter copy is the driver's own message, published with
// the gateway's credentials through the default exchange or the
// dead-letter exchange. It must not carry anything a publisher set for
// the broker (or a plugin) to act on: the broker would act on it with the
// gateway's authority. A copy is therefore built from an allow-list: the
// body, the properties that describe the content, and the publisher's
// headers minus those a broker interprets. What the broker would act on
// is kept under an x-krakend-kept-* name instead, which no broker reads,
// and given back to the backend when the copy returns from a retry queue:
// the backend sees every attempt as the publisher sent it.

// Headers that keep, on a copy, what the publisher set for the broker.
const (
	// HeaderOriginalUserID and HeaderOriginalReplyTo keep the user_id and
	// reply_to properties. RabbitMQ refuses a user_id that is not the
	// publishing connection's user, so a copy carrying it could never be
	// made.
	HeaderOriginalUserID  = "x-krakend-original-user-id"
	HeaderOriginalReplyTo = "x-krakend-original-reply-to"
	// keptPrefix precedes a publisher's header that a broker acts on.
	keptPrefix = "x-krakend-kept-"
	// HeaderParked marks a copy that is not dispatched again when it
	// comes back: its dead letter could not be made (or the message was
	// never fit to dispatch), and the driver tries the dead letter again.
	HeaderParked = "x-krakend-parked"
)

// brokerHeaders are the headers RabbitMQ or one of its plugins acts on
// when a message is published, routed, dead-lettered or moved between
// brokers; the names are compared without case.
var brokerHeaders = map[string]bool{
	"cc":                        true, // sender-selected distribution: more queues to route to
	"bcc":                       true, // the same, removed before delivery
	"x-death":                   true, // dead-lettering history, rewritten by the broker
	"x-delay":                   true, // delayed-message exchange plugin: the delay
	"x-deduplication-header":    true, // message deduplication plugin: the key
	"x-cache-ttl":               true, // message deduplication plugin: how long the key is kept
	"x-delivery-count":          true, // quorum queues' redelivery count
	"x-acquired-count":          true, // RabbitMQ 4's count of deliveries
	"x-stream-filter-value":     true, // stream filtering
	"x-received-from":           true, // federation: a message already seen is dropped
	"x-shovelled":               true, // shovel: where the message was moved from
	"x-shovelled-timestamp":     true,
	"x-recent-history-no-store": true, // recent-history exchange plugin
}

// interpreted tells whether a broker or plugin acts on a header.
func interpreted(k string) bool {
	lower := strings.ToLower(k)
	return brokerHeaders[lower] || deathHeader(lower)
}

// deathHeader tells whether a header, in lower case, is one the broker
// writes when it dead-letters a message.
func deathHeader(lower string) bool {
	return lower == "x-death" || strings.HasPrefix(lower, "x-first-death-") || strings.HasPrefix(lower, "x-last-death-")
}

// deathHeaders tells whether a delivery carries any of the headers the
// broker writes when it dead-letters a message.
func deathHeaders(d *amqp.Delivery) bool {
	for k := range d.Headers {
		if deathHeader(strings.ToLower(k)) {
			return true
		}
	}
	return false
}

// driverHeader tells whether a header is one of the driver's own
// (x-krakend-*), in any case.
func driverHeader(k string) bool {
	return len(k) >= len(internalPrefix) && strings.EqualFold(k[:len(internalPrefix)], internalPrefix)
}

// isKept tells whether a header keeps one of the publisher's.
func isKept(k string) bool {
	return len(k) > len(keptPrefix) && strings.EqualFold(k[:len(keptPrefix)], keptPrefix)
}

// copyHeaders are the publisher's headers as a copy carries them: the
// driver's own dropped, those a broker acts on kept under another name
// (dropped when that name would be longer than a table key may be).
func copyHeaders(d *amqp.Delivery, extra int) amqp.Table {
	h := make(amqp.Table, len(d.Headers)+extra)
	for k, v := range d.Headers {
		switch {
		case driverHeader(k):
		case interpreted(k):
			if len(keptPrefix)+len(k) <= maxNameLength {
				h[keptPrefix+k] = v
			}
		default:
			h[k] = v
		}
	}
	if d.UserId != "" {
		h[HeaderOriginalUserID] = d.UserId
	}
	if d.ReplyTo != "" {
		h[HeaderOriginalReplyTo] = d.ReplyTo
	}
	return h
}

// copyProperties are the properties a copy carries: those that describe
// the content. Never user_id (the broker checks it against the gateway's
// user), reply_to (kept in a header), nor expiration: the publisher's TTL
// bounds the wait before the first delivery; a retry copy waits its
// retry queue's delay and a dead letter is kept until someone takes it.
func copyProperties(d *amqp.Delivery, headers amqp.Table) amqp.Publishing {
	return amqp.Publishing{
		Headers: headers, ContentType: d.ContentType, ContentEncoding: d.ContentEncoding,
		DeliveryMode: d.DeliveryMode, Priority: d.Priority, CorrelationId: d.CorrelationId,
		MessageId: d.MessageId, Timestamp: d.Timestamp, Type: d.Type, AppId: d.AppId, Body: d.Body,
	}
}

// restored is a delivery back from one of the agent's retry queues as its
// publisher sent it: the kept headers and properties put back, and the
// driver's headers and the broker's record of the retry hop (x-death...)
// taken away. It shares the delivery's acknowledger and tag.
func restored(d *amqp.Delivery) *amqp.Delivery {
	v := *d
	v.Headers = make(amqp.Table, len(d.Headers))
	v.UserId, v.ReplyTo = "", ""
	for k, val := range d.Headers {
		switch {
		case isKept(k):
			v.Headers[k[len(keptPrefix):]] = val
		case driverHeader(k), interpreted(k):
		default:
			v.Headers[k] = val
		}
	}
	v.UserId = shortString(d.Headers[HeaderOriginalUserID])
	v.ReplyTo = shortString(d.Headers[HeaderOriginalReplyTo])
	return &v
}

// shortString reads a property kept in a header: any text that fits an
// AMQP short string, else "".
func shortString(v interface{}) string {
	if s, ok := v.(string); ok && len(s) <= maxNameLength {
		return s
	}
	return ""
}

// parkedReason reads the reason a copy was parked with; "" when it was
// not.
func parkedReason(d *amqp.Delivery) string {
	s, _ := d.Headers[HeaderParked].(string)
	return truncate(s, 1024)
}
