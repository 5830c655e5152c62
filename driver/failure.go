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

// fail handles a failed dispatch when the driver owns retries: the
// message is republished to a retry queue (or dead-lettered) and acked
// only once the broker confirmed the copy. If the copy cannot be made,
// the message is requeued after a pause, so that nothing spins. It returns
// the outcome.
func (a *Agent) fail(ctx context.Context, pub publisher, d *amqp.Delivery, r result) string {
	attempt := failedAttempts(d.Headers) + 1
	retry := a.opts.Retry
	dead := a.opts.DeadLetter
	giveUp := attempt >= retry.MaxAttempts || r.status != 0 && slices.Contains(dead.Statuses, r.status)
	var err error
	outcome := OutcomeRetried
	switch {
	case giveUp && dead.Broker:
		a.stats.deadLettered.Add(1)
		a.stats.lastDeadLetter.Store(r.reason)
		return a.settleAs(pub, d, result{reason: r.reason}, true, OutcomeDeadLettered)
	case giveUp && dead.Enabled():
		outcome = OutcomeDeadLettered
		err = a.deadLetter(ctx, pub, d, attempt, r.reason)
	case giveUp:
		a.stats.exhausted.Add(1)
		// The longest declared delay: MaxDelay rounded to the
		// millisecond, as its retry queue was named.
		err = a.retry(ctx, pub, d, attempt, r.reason, retry.DelayFor(math.MaxInt))
	default:
		err = a.retry(ctx, pub, d, attempt, r.reason, retry.DelayFor(attempt))
	}
	if err != nil {
		a.stats.copyFailed.Add(1)
		a.stats.lastCopyError.Store(err.Error())
		sleep(ctx, min(retry.Delay, 5*time.Second))
		return a.settle(pub, d, result{reason: r.reason}, false)
	}
	return a.settleAs(pub, d, result{ok: true}, false, outcome)
}

func (a *Agent) retry(ctx context.Context, pub publisher, d *amqp.Delivery, attempt int, reason string, delay time.Duration) error {
	queue := consumer.RetryQueue(a.opts.Session.Queue, delay)
	ctx, cancel := copyContext(ctx)
	defer cancel()
	return pub.Publish(ctx, "", queue, a.copyOf(d, attempt, reason))
}

func (a *Agent) deadLetter(ctx context.Context, pub publisher, d *amqp.Delivery, attempt int, reason string) error {
	msg := a.copyOf(d, attempt, reason)
	msg.Headers[HeaderAgent] = a.opts.Name
	// A dead letter is kept until someone looks at it: the message's own
	// TTL would drop it from the dead-letter queue.
	msg.Expiration = ""
	exchange, key := "", a.opts.DeadLetter.Queue
	if a.opts.DeadLetter.Exchange != "" {
		exchange, key = a.opts.DeadLetter.Exchange, a.opts.DeadLetter.RoutingKey
		if key == "" {
			key, _ = msg.Headers[HeaderOriginalRoutingKey].(string)
		}
	}
	ctx, cancel := copyContext(ctx)
	defer cancel()
	if err := pub.Publish(ctx, exchange, key, msg); err != nil {
		return err
	}
	a.stats.deadLettered.Add(1)
	a.stats.lastDeadLetter.Store(reason)
	return nil
}

// copyContext bounds a publish; it outlives ctx so that a copy started
// before shutdown still completes.
func copyContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
}

// copyOf rebuilds a delivery as a publishing, with its attempt count, the
// failure reason and where it was first published.
func (a *Agent) copyOf(d *amqp.Delivery, attempt int, reason string) amqp.Publishing {
	h := make(amqp.Table, len(d.Headers)+4)
	for k, v := range d.Headers {
		if k != consumer.PublishIDHeader {
			h[k] = v
		}
	}
	h[HeaderAttempts] = int64(attempt)
	h[HeaderLastError] = truncate(reason, 1024)
	if _, ok := h[HeaderOriginalRoutingKey]; !ok {
		h[HeaderOriginalRoutingKey] = d.RoutingKey
		h[HeaderOriginalExchange] = d.Exchange
	}
	return amqp.Publishing{
		Headers: h, ContentType: d.ContentType, ContentEncoding: d.ContentEncoding,
		DeliveryMode: d.DeliveryMode, Priority: d.Priority, CorrelationId: d.CorrelationId,
		ReplyTo: d.ReplyTo, Expiration: d.Expiration, MessageId: d.MessageId, Timestamp: d.Timestamp,
		Type: d.Type, UserId: d.UserId, AppId: d.AppId, Body: d.Body,
	}
}

// failedAttempts reads the driver's attempt counter; a message never
// seen before has 0.
func failedAttempts(h amqp.Table) int {
	switch n := h[HeaderAttempts].(type) {
	case int64:
		return int(n)
	case int32:
		return int(n)
	case int:
		return n
	}
	return 0
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
