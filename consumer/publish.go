package consumer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
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
	dead    chan struct{} // closed when the channel is gone
	closes  chan *amqp.Error
	mu      sync.Mutex
	back    map[string]bool // publish ids the broker returned
	err     *amqp.Error     // why the broker closed the channel
}

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
		const mandatory, immediate = true, false
		return ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, mandatory, immediate, msg)
	}
	go c.watch(ch.NotifyReturn(make(chan amqp.Return)))
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

func (c *confirmChannel) closed() bool {
	select {
	case <-c.dead:
		return true
	default:
		return false
	}
}

// watch records returned publishes. amqp091 hands a basic.return over
// before it processes the matching confirm, on the same goroutine; the
// barrier request is served only after the return has been recorded.
func (c *confirmChannel) watch(returns <-chan amqp.Return) {
	for {
		select {
		case r, ok := <-returns:
			if !ok {
				close(c.dead)
				return
			}
			if id, _ := r.Headers[PublishIDHeader].(string); id != "" {
				c.mu.Lock()
				c.back[id] = true
				c.mu.Unlock()
			}
		case done := <-c.barrier:
			close(done)
		}
	}
}

func (c *confirmChannel) publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	id := publishID()
	headers := make(amqp.Table, len(msg.Headers)+1)
	for k, v := range msg.Headers {
		headers[k] = v
	}
	headers[PublishIDHeader] = id
	msg.Headers = headers
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
	c.sync(ctx)
	c.mu.Lock()
	returned := c.back[id]
	delete(c.back, id)
	c.mu.Unlock()
	if returned {
		return ErrUnroutable
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

// sync waits until every return handed over so far is recorded.
func (c *confirmChannel) sync(ctx context.Context) {
	done := make(chan struct{})
	select {
	case c.barrier <- done:
		<-done
	case <-c.dead:
	case <-ctx.Done():
	}
}

func publishID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
