package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"

	amqp "github.com/rabbitmq/amqp091-go"
)

// routingKey is what the pre-loader publishes with; topic binds it.
const (
	routingKey = "bench.event"
	topic      = "bench.#"
	// batch is how many publishes wait for their confirms together.
	batch = 1000
)

// broker is the benchmark's own connection: it declares, pre-loads,
// counts and deletes queues. It is idle while a consumer is timed.
type broker struct {
	url      string
	conn     *amqp.Connection
	pub      *amqp.Channel // confirm mode
	exchange string        // a durable topic exchange, unique to this invocation
	prefix   string        // of every queue name of this invocation
	size     int           // message body bytes
	// traceparent gives each message a W3C traceparent header, as a
	// traced publisher does.
	traceparent bool
}

func dialBroker(url string, size int) (*broker, error) {
	conn, err := amqp.Dial(url)
	if err != nil {
		return nil, fmt.Errorf("no RabbitMQ answers at %s: %w", redact(url), err)
	}
	b := &broker{url: url, conn: conn, size: size, prefix: "bench-" + randomHex(4)}
	b.exchange = b.prefix
	if b.pub, err = conn.Channel(); err == nil {
		err = b.pub.Confirm(false)
	}
	if err == nil {
		err = b.pub.ExchangeDeclare(b.exchange, "topic", true, false, false, false, nil)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("set up the publishing channel: %w", err)
	}
	return b, nil
}

// version is the broker's product and version, e.g. "RabbitMQ 3.10.8".
func (b *broker) version() string {
	return fmt.Sprintf("%v %v", b.conn.Properties["product"], b.conn.Properties["version"])
}

// close deletes the exchange and closes the connection.
func (b *broker) close() {
	_ = b.do(func(ch *amqp.Channel) error { return ch.ExchangeDelete(b.exchange, false, false) })
	_ = b.conn.Close()
}

// do runs f on a fresh channel: a failed operation closes its channel.
func (b *broker) do(f func(ch *amqp.Channel) error) error {
	ch, err := b.conn.Channel()
	if err != nil {
		return err
	}
	defer ch.Close()
	return f(ch)
}

// declare creates an empty durable queue bound to the exchange with the
// flags the driver declares it with (durable, not auto-delete, not
// exclusive), so the driver's own declaration matches.
func (b *broker) declare(queue string) error {
	return b.do(func(ch *amqp.Channel) error {
		if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
			return fmt.Errorf("declare queue %q: %w", queue, err)
		}
		return ch.QueueBind(queue, topic, b.exchange, false, nil)
	})
}

// preload declares queue and publishes n persistent JSON messages to it
// through the exchange, waiting for the broker's confirms batch by batch.
func (b *broker) preload(ctx context.Context, queue string, n int) error {
	if err := b.declare(queue); err != nil {
		return err
	}
	confs := make([]*amqp.DeferredConfirmation, 0, batch)
	for i := 0; i < n; i += batch {
		confs = confs[:0]
		for j := i; j < min(i+batch, n); j++ {
			c, err := b.pub.PublishWithDeferredConfirmWithContext(ctx, b.exchange, routingKey, false, false, b.message(j, 0))
			if err != nil {
				return fmt.Errorf("pre-load %q: %w", queue, err)
			}
			confs = append(confs, c)
		}
		for _, c := range confs {
			if ok, err := c.WaitContext(ctx); err != nil || !ok {
				return fmt.Errorf("pre-load %q: publish not confirmed (%v)", queue, err)
			}
		}
	}
	return nil
}

// message is one persistent JSON message; ts, when not 0, stamps the
// publish time for the latency measure.
func (b *broker) message(id int, ts int64) amqp.Publishing {
	msg := amqp.Publishing{
		ContentType: "application/json", DeliveryMode: amqp.Persistent,
		MessageId: strconv.Itoa(id), Body: messageBody(id, ts, b.size),
		Headers: amqp.Table{orderHeader: fmt.Sprintf("key-%d", id%orderKeys)},
	}
	if b.traceparent {
		// A trace of its own per message, sampled.
		msg.Headers["traceparent"] = fmt.Sprintf("00-%032x-%016x-01", id+1, id+1)
	}
	return msg
}

// messageBody is a JSON object of exactly size bytes (or just longer, when
// size is too small for the fields): {"id":1,"ts":0,"pad":"xxx..."}.
func messageBody(id int, ts int64, size int) []byte {
	body := fmt.Appendf(nil, `{"id":%d,"ts":%d,"pad":"`, id, ts)
	for len(body) < size-2 {
		body = append(body, 'x')
	}
	return append(body, '"', '}')
}

// ready is the number of ready messages in queue (unacknowledged ones
// are not counted by a passive declare).
func (b *broker) ready(queue string) (int, error) {
	var n int
	err := b.do(func(ch *amqp.Channel) error {
		q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
		n = q.Messages
		return err
	})
	return n, err
}

// deleteQueues deletes queues, ignoring those that do not exist.
func (b *broker) deleteQueues(queues ...string) {
	for _, q := range queues {
		_ = b.do(func(ch *amqp.Channel) error {
			_, err := ch.QueueDelete(q, false, false, false)
			return err
		})
	}
}

// queueName is unique to the invocation, scenario, point and run.
func (b *broker) queueName(what string, p point, run int) string {
	return fmt.Sprintf("%s-%s-%d-%d-r%d", b.prefix, what, p.workers, p.prefetch, run)
}

func randomHex(n int) string {
	buf := make([]byte, n)
	_, _ = rand.Read(buf)
	return hex.EncodeToString(buf)
}

// redact hides the password of an AMQP URL.
func redact(url string) string {
	if u, err := amqp.ParseURI(url); err == nil {
		u.Password = "xxxxx"
		return u.String()
	}
	return "the AMQP URL"
}
