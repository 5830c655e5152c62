package driver

import (
	"strconv"
	"strings"
	"sync"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Ordered keys: with ordering_key set, the messages that share a key are
// handled one at a time, in the order the broker delivered them, while
// messages with other keys run in parallel on the workers. One goroutine
// takes the deliveries: a message whose key is busy waits in its key's
// line, the others go to the workers. The worker that ends a message
// takes the next one in its key's line. Nothing waits beyond the prefetch
// window: the broker sends no more than that unacknowledged.

// keyOf reads the ordering key of a delivery; ok is false when it has
// none (the message is then not ordered).
type keyOf func(a *Agent, d *amqp.Delivery) (key string, ok bool)

// orderingKey builds the key reader of an ordering_key, as config
// validated it; nil for "".
func orderingKey(spec string) keyOf {
	kind, name, _ := strings.Cut(spec, ":")
	switch {
	case spec == "routing_key":
		return routingKeyOf
	case kind == "header":
		return func(a *Agent, d *amqp.Delivery) (string, bool) { return headerKey(a.publisherView(d).Headers[name]) }
	case kind == "property":
		return func(a *Agent, d *amqp.Delivery) (string, bool) {
			v := property(a.publisherView(d), name)
			return v, v != ""
		}
	}
	return nil
}

// routingKeyOf is the key the message was first published with: a copy
// back from a retry queue carries it in a header.
func routingKeyOf(a *Agent, d *amqp.Delivery) (string, bool) {
	if a.fromRetryQueue(d) {
		if key, ok := name(d.Headers[HeaderOriginalRoutingKey]); ok {
			return key, true
		}
	}
	return d.RoutingKey, true
}

// headerKey reads a header a publisher set as a key: text or an integer;
// any other value (a table, a float, a list) is no key.
func headerKey(v interface{}) (string, bool) {
	switch s := v.(type) {
	case string:
		return s, true
	case []byte:
		return string(s), true
	}
	if n, ok := integer(v); ok {
		return strconv.FormatInt(n, 10), true
	}
	return "", false
}

func property(d *amqp.Delivery, name string) string {
	switch name {
	case "message_id":
		return d.MessageId
	case "correlation_id":
		return d.CorrelationId
	case "user_id":
		return d.UserId
	case "app_id":
		return d.AppId
	case "type":
		return d.Type
	case "reply_to":
		return d.ReplyTo
	}
	return ""
}

// sequenced is a delivery with its ordering key.
type sequenced struct {
	d     *amqp.Delivery
	key   string
	keyed bool
}

// sequencer keeps the lines of the busy keys.
type sequencer struct {
	mu    sync.Mutex
	lines map[string][]*amqp.Delivery // busy key → the messages behind it
	work  chan sequenced
}

func newSequencer() *sequencer {
	return &sequencer{lines: map[string][]*amqp.Delivery{}, work: make(chan sequenced)}
}

// feed takes the deliveries until they end, then closes the workers'
// channel. A message whose key is busy joins its line, and lined hears
// of it: its ack will be late, and the acks of the messages after it
// need not wait for it.
func (s *sequencer) feed(a *Agent, deliveries <-chan amqp.Delivery, key keyOf, lined func(*amqp.Delivery)) {
	defer close(s.work)
	for d := range deliveries {
		item := sequenced{d: &d}
		item.key, item.keyed = key(a, item.d)
		if item.keyed && s.queued(item) {
			lined(item.d)
			continue
		}
		s.work <- item
	}
}

// queued puts a message in its key's line if the key is busy, and marks
// the key busy otherwise.
func (s *sequencer) queued(item sequenced) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	line, busy := s.lines[item.key]
	if busy {
		s.lines[item.key] = append(line, item.d)
		return true
	}
	s.lines[item.key] = nil
	return false
}

// next takes the next message of a key's line, or frees the key.
func (s *sequencer) next(key string) *amqp.Delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	line := s.lines[key]
	if len(line) == 0 {
		delete(s.lines, key)
		return nil
	}
	s.lines[key] = line[1:]
	return line[0]
}
