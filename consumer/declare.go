package consumer

import (
	"errors"
	"fmt"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
)

// Declaring: the exchange, the queue and its bindings, or a check that
// they exist; the retry queues and the dead-letter queue of the failure
// paths; and errors that name the field to change when the broker
// refuses one of them.

// declare maps the configuration to the declarations in one place,
// naming every positional flag.
func declare(ch *amqp.Channel, t Topology) error {
	switch t.Mode {
	case config.TopologyNone:
		return nil
	case config.TopologyPassive:
		return checkExists(ch, t)
	}
	const internal = false
	err := ch.ExchangeDeclare(t.Exchange, t.ExchangeType, t.Durable, t.AutoDelete, internal, t.NoWait, nil)
	if err != nil {
		return exchangeError(err, t)
	}
	_, err = ch.QueueDeclare(t.Queue, t.Durable, t.AutoDelete, t.Exclusive, t.NoWait, t.QueueArgs)
	if err != nil {
		return queueError(err, t)
	}
	for _, key := range t.RoutingKeys {
		if err := ch.QueueBind(t.Queue, key, t.Exchange, t.NoWait, nil); err != nil {
			return fmt.Errorf("bind queue %q to exchange %q with routing key %q: %w", t.Queue, t.Exchange, key, err)
		}
	}
	return nil
}

// checkExists passively declares the exchange and the queue: the broker
// answers 404 for one that is missing, and the error says which.
func checkExists(ch *amqp.Channel, t Topology) error {
	err := ch.ExchangeDeclarePassive(t.Exchange, t.ExchangeType, t.Durable, t.AutoDelete, false, false, nil)
	if isCode(err, amqp.NotFound) {
		return fmt.Errorf("exchange %q does not exist (topology is passive: the driver declares nothing): %w", t.Exchange, err)
	}
	if err != nil {
		return fmt.Errorf("check exchange %q: %w", t.Exchange, err)
	}
	_, err = ch.QueueDeclarePassive(t.Queue, t.Durable, t.AutoDelete, t.Exclusive, false, nil)
	if isCode(err, amqp.NotFound) {
		return fmt.Errorf("queue %q does not exist (topology is passive: the driver declares nothing): %w", t.Queue, err)
	}
	if err != nil {
		return fmt.Errorf("check queue %q: %w", t.Queue, err)
	}
	return nil
}

// declareFailurePaths declares the retry queues, whose TTL sends each
// message back to the work queue through the default exchange, and the
// dead-letter queue, or checks that the dead-letter exchange exists.
func declareFailurePaths(conn *amqp.Connection, ch *amqp.Channel, s Settings) error {
	for _, d := range s.RetryDelays {
		if err := declareRetryQueue(ch, s, d); err != nil {
			return err
		}
	}
	if s.DeadLetterQueue != "" {
		if err := declareDeadLetterQueue(conn, s); err != nil {
			return err
		}
	}
	if s.DeadLetterExchange != "" {
		if err := ch.ExchangeDeclarePassive(s.DeadLetterExchange, "topic", false, false, false, false, nil); err != nil {
			if isCode(err, amqp.NotFound) {
				return fmt.Errorf("dead-letter exchange %q does not exist: declare it and bind a queue to it: %w", s.DeadLetterExchange, err)
			}
			return fmt.Errorf("check dead-letter exchange %q: %w", s.DeadLetterExchange, err)
		}
	}
	return nil
}

// declareRetryQueue declares the retry queue of one delay: its TTL sends
// each message back to the work queue through the default exchange.
func declareRetryQueue(ch *amqp.Channel, s Settings, d time.Duration) error {
	name := RetryQueue(s.Queue, d)
	args := retryQueueArgs(s, d)
	// Exclusive like an exclusive work queue: RabbitMQ 4.3 refuses a
	// queue that is neither durable nor exclusive, and the retries of a
	// queue of one connection go with it anyway.
	const autoDelete, noWait = false, false
	if _, err := ch.QueueDeclare(name, s.Durable, autoDelete, s.Exclusive, noWait, args); err != nil {
		if denied := deniedFeature(err, name, s.Topology); denied != nil {
			return denied
		}
		if isCode(err, amqp.PreconditionFailed) || isCode(err, amqp.ResourceLocked) {
			return fmt.Errorf("declare retry queue %q: it exists with other arguments than %v (declared by an earlier "+
				"version or another agent?): delete it once it is empty, and the agent declares it again; the broker says: %w", name, args, err)
		}
		return fmt.Errorf("declare retry queue %q (ttl %s, back to %q): %w", name, d, s.Queue, err)
	}
	return nil
}

// declareDeadLetterQueue declares the dead-letter queue durable, and a
// quorum queue when the work queue is one, so that dead letters survive
// a node's loss as the work does. One that exists already as a classic
// queue (declared by an earlier version) is kept as it is: the broker
// refuses the quorum declaration (406), which closes the channel, so it
// runs on a channel of its own and the queue is then only checked.
func declareDeadLetterQueue(conn *amqp.Connection, s Settings) error {
	const durable, autoDelete, exclusive, noWait = true, false, false, false
	name, args := s.DeadLetterQueue, deadLetterQueueArgs(s)
	err := onOwnChannel(conn, func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclare(name, durable, autoDelete, exclusive, noWait, args)
		return err
	})
	if args != nil && isCode(err, amqp.PreconditionFailed) {
		err = onOwnChannel(conn, func(ch *amqp.Channel) error {
			_, err := ch.QueueDeclarePassive(name, durable, autoDelete, exclusive, noWait, nil)
			return err
		})
	}
	if err != nil {
		return fmt.Errorf("declare dead-letter queue %q: %w", name, err)
	}
	return nil
}

// deadLetterQueueArgs follow the work queue's type: nil (classic) unless
// it is a quorum queue.
func deadLetterQueueArgs(s Settings) amqp.Table {
	if s.QueueArgs["x-queue-type"] == "quorum" {
		return amqp.Table{"x-queue-type": "quorum"}
	}
	return nil
}

// onOwnChannel runs f on a channel opened for it, and closes it.
func onOwnChannel(conn *amqp.Connection, f func(*amqp.Channel) error) error {
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	err = f(ch)
	if cerr := ch.Close(); err == nil && !errors.Is(cerr, amqp.ErrClosed) {
		err = cerr
	}
	return err
}

// retryQueueArgs are the arguments of a retry queue. The way back from a
// retry queue is the broker's dead-lettering, which is at-most-once for
// classic queues; for a quorum work queue the retry queues are quorum
// queues too, with at-least-once dead-lettering (which needs the
// reject-publish overflow).
func retryQueueArgs(s Settings, d time.Duration) amqp.Table {
	args := amqp.Table{
		"x-message-ttl":             d.Milliseconds(),
		"x-dead-letter-exchange":    "",
		"x-dead-letter-routing-key": s.Queue,
	}
	if s.QueueArgs["x-queue-type"] == "quorum" {
		args["x-queue-type"] = "quorum"
		args["x-dead-letter-strategy"] = "at-least-once"
		args["x-overflow"] = "reject-publish"
	}
	return args
}

// RetryQueues maps the names of a work queue's retry queues to their
// delays.
func RetryQueues(queue string, delays []time.Duration) map[string]time.Duration {
	names := make(map[string]time.Duration, len(delays))
	for _, d := range delays {
		names[RetryQueue(queue, d)] = d
	}
	return names
}

// RetryQueue names the retry queue of a work queue for one delay, e.g.
// orders.retry.30s.
func RetryQueue(queue string, d time.Duration) string {
	switch {
	case d%time.Hour == 0:
		return fmt.Sprintf("%s.retry.%dh", queue, d/time.Hour)
	case d%time.Minute == 0:
		return fmt.Sprintf("%s.retry.%dm", queue, d/time.Minute)
	case d%time.Second == 0:
		return fmt.Sprintf("%s.retry.%ds", queue, d/time.Second)
	}
	return fmt.Sprintf("%s.retry.%dms", queue, d.Milliseconds())
}

func exchangeError(err error, t Topology) error {
	if isCode(err, amqp.PreconditionFailed) {
		return fmt.Errorf("declare exchange %q: it already exists with other settings than this agent's "+
			"(type %s, durable %t, auto-delete %t); the broker says: %w",
			t.Exchange, t.ExchangeType, t.Durable, t.AutoDelete, err)
	}
	return fmt.Errorf("declare exchange %q: %w", t.Exchange, err)
}

func queueError(err error, t Topology) error {
	if denied := deniedFeature(err, t.Queue, t); denied != nil {
		return denied
	}
	switch {
	case isCode(err, amqp.PreconditionFailed):
		return fmt.Errorf("declare queue %q: it already exists with other settings than this agent's "+
			"(durable %t, auto-delete %t, exclusive %t, arguments %v); the broker says: %w",
			t.Queue, t.Durable, t.AutoDelete, t.Exclusive, t.QueueArgs, err)
	case isCode(err, amqp.ResourceLocked):
		return fmt.Errorf("declare queue %q: it is exclusive to another connection; the broker says: %w", t.Queue, err)
	}
	return fmt.Errorf("declare queue %q: %w", t.Queue, err)
}

func qosError(err error, s Settings) error {
	if isCode(err, amqp.NotImplemented) && s.PrefetchSize != 0 {
		return fmt.Errorf("set prefetch (basic.qos): the broker does not support prefetch_size %d "+
			"(RabbitMQ only supports 0): %w", s.PrefetchSize, err)
	}
	return fmt.Errorf("set prefetch (basic.qos) to %d messages, %d bytes: %w", s.PrefetchCount, s.PrefetchSize, err)
}

func isCode(err error, code int) bool {
	var aerr *amqp.Error
	return errors.As(err, &aerr) && aerr.Code == code
}
