package consumer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"

	amqp "github.com/rabbitmq/amqp091-go"
)

// PublishIDHeader tags each copy the session publishes, so that a
// basic.return can be matched to its publish.
const PublishIDHeader = "x-krakend-publish-id"

// ErrUnroutable means the broker confirmed a copy but routed it nowhere.
var ErrUnroutable = errors.New("the broker could not route the message to any queue")

// publisher publishes copies of deliveries (retries, dead letters) on a
// connection of its own: a copy the broker refuses (a 406 for its size, a
// 404 for an exchange deleted meanwhile) closes only the publishing
// channel, which is opened again for the next copy, and a memory or disk
// alarm that blocks publishing never holds the consuming connection and
// its acks. A copy is safe only once the broker confirmed it and did not
// return it.
type publisher struct {
	conn *amqp.Connection
	mu   sync.Mutex
	ch   *confirmChannel // nil until the first publish, or after it closed
}

func newPublisher(conn *amqp.Connection) *publisher { return &publisher{conn: conn} }

// channel returns the open publishing channel, opening one if needed.
func (p *publisher) channel() (*confirmChannel, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ch != nil && !p.ch.closed() {
		return p.ch, nil
	}
	c, err := openConfirmChannel(p.conn)
	if err != nil {
		return nil, err
	}
	p.ch = c
	return c, nil
}

// publish sends msg and waits for the broker's verdict.
func (p *publisher) publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	c, err := p.channel()
	if err != nil {
		return err
	}
	return c.publish(ctx, exchange, key, msg)
}

// declare runs a declaration on the publishing channel.
func (p *publisher) declare(f func(ch *amqp.Channel) error) error {
	c, err := p.channel()
	if err != nil {
		return err
	}
	return f(c.ch)
}

func (p *publisher) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ch != nil {
		_ = p.ch.ch.Close()
	}
}

// confirmChannel is a channel in confirm mode that records the publishes
// the broker returned.
type confirmChannel struct {
	ch *amqp.Channel
	// send publishes with the mandatory flag and hands back the pending
	// confirm: the channel's own publish, replaced by fakes in tests.
	send    func(ctx context.Context, exchange, key string, msg amqp.Publishing) (confirmation, error)
	barrier chan chan struct{}
	dead    chan struct{} // closed when the channel is gone and every return is recorded
	closes  chan *amqp.Error
	mu      sync.Mutex
	back    map[string]bool // ids of the publishes in flight: true once the broker returned it
	strays  uint64          // returns that matched no publish in flight
	err     *amqp.Error     // why the broker closed the channel
}

// directReplyToPrefix starts the reply_to of a caller that uses
// RabbitMQ's direct reply-to: the broker writes the rest on delivery.
const directReplyToPrefix = "amq.rabbitmq.reply-to."

// directReplyTo tells whether a publish goes to a caller's direct
// reply-to name. Such a publish is sent without the mandatory flag:
// RabbitMQ (3.10 and 4.0 alike) returns every mandatory one as unroutable,
// also when it delivered it, so a return would say nothing, and would
// carry each reply's body back. A reply to a caller who left is dropped.
func directReplyTo(exchange, key string) bool {
	return exchange == "" && strings.HasPrefix(key, directReplyToPrefix)
}

// returnsBuffer is how many basic.returns amqp091 may hand over before
// the watcher takes them: amqp091 gives up a hand-over (the return is
// lost) when a listener does not take it within 5 seconds.
const returnsBuffer = 64

func openConfirmChannel(conn *amqp.Connection) (*confirmChannel, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open publishing channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		_ = ch.Close()
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	c := newConfirmChannel(ch.NotifyClose(make(chan *amqp.Error, 1)))
	c.ch = ch
	c.send = func(ctx context.Context, exchange, key string, msg amqp.Publishing) (confirmation, error) {
		mandatory, immediate := !directReplyTo(exchange, key), false
		return ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, mandatory, immediate, msg)
	}
	go c.watch(ch.NotifyReturn(make(chan amqp.Return, returnsBuffer)))
	return c, nil
}

// confirmation is a publish's pending confirm (*amqp.DeferredConfirmation).
type confirmation interface {
	WaitContext(ctx context.Context) (bool, error)
}

// newConfirmChannel makes the bookkeeping of a confirming channel; the
// caller sets ch and send and starts watch.
func newConfirmChannel(closes chan *amqp.Error) *confirmChannel {
	return &confirmChannel{barrier: make(chan chan struct{}), dead: make(chan struct{}), back: map[string]bool{}, closes: closes}
}

// closed is true once the channel is closed: amqp091 marks it closed
// before it fails the pending confirms, the watcher ends later.
func (c *confirmChannel) closed() bool {
	if c.ch != nil && c.ch.IsClosed() {
		return true
	}
	select {
	case <-c.dead:
		return true
	default:
		return false
	}
}

// watch records returned publishes. amqp091 hands a basic.return over
// before it processes the matching confirm, on the same goroutine; a
// barrier request is served only once every return handed over before it
// has been recorded, including those still in the channel's buffer.
func (c *confirmChannel) watch(returns <-chan amqp.Return) {
	defer close(c.dead)
	for {
		select {
		case r, ok := <-returns:
			if !ok {
				return
			}
			c.record(r)
		case done := <-c.barrier:
			for drained := false; !drained; {
				select {
				case r, ok := <-returns:
					if !ok {
						close(done)
						return
					}
					c.record(r)
				default:
					drained = true
				}
			}
			close(done)
		}
	}
}

// record marks the publish a return belongs to. A return that matches no
// publish in flight (its id header is missing or altered, or its publish
// gave up waiting) is counted as a stray: it could be any of them.
func (c *confirmChannel) record(r amqp.Return) {
	id, _ := r.Headers[PublishIDHeader].(string)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, inFlight := c.back[id]; inFlight {
		c.back[id] = true
		return
	}
	c.strays++
}

// publish sends msg and returns nil only when the broker confirmed it and
// the check that it did not return it completed; any doubt is an error.
func (c *confirmChannel) publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	id := publishID()
	headers := make(amqp.Table, len(msg.Headers)+1)
	for k, v := range msg.Headers {
		headers[k] = v
	}
	headers[PublishIDHeader] = id
	msg.Headers = headers
	c.mu.Lock()
	c.back[id] = false
	strays := c.strays
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.back, id)
		c.mu.Unlock()
	}()
	conf, err := c.send(ctx, exchange, key, msg)
	if err != nil {
		return err
	}
	acked, err := conf.WaitContext(ctx)
	if err != nil {
		return err
	}
	if !acked {
		return c.refusal()
	}
	if err := c.sync(ctx); err != nil {
		return fmt.Errorf("the broker confirmed the message, but whether it routed it is unknown: %w", err)
	}
	c.mu.Lock()
	returned, unmatched := c.back[id], c.strays != strays
	c.mu.Unlock()
	switch {
	case returned:
		return ErrUnroutable
	case unmatched:
		return errors.New("the broker returned a message that matches no publish while this one was in flight: it may have been this one")
	}
	return nil
}

// refusal says why a publish was not confirmed: the broker closed the
// channel (amqp091 hands out its reason before it fails the pending
// confirms), or it nacked the message.
func (c *confirmChannel) refusal() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		select {
		case e, ok := <-c.closes:
			if ok && e != nil {
				c.err = e
			}
		default:
		}
	}
	if c.err != nil {
		return fmt.Errorf("the broker closed the publishing channel: %w", c.err)
	}
	return errors.New("the broker refused the message (basic.nack)")
}

// sync waits until every return handed over so far is recorded, and
// fails when ctx ends first.
func (c *confirmChannel) sync(ctx context.Context) error {
	done := make(chan struct{})
	select {
	case c.barrier <- done:
		<-done
		return nil
	case <-c.dead:
		return nil // the watcher recorded every return before it ended
	case <-ctx.Done():
		return ctx.Err()
	}
}

func publishID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
