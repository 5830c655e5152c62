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

// publisher publishes copies of deliveries (retries, dead letters) on its
// own channel in confirm mode, mandatory, and reports a copy as safe only
// once the broker confirmed it and did not return it.
type publisher struct {
	ch      *amqp.Channel
	barrier chan chan struct{}
	dead    chan struct{} // closed when the channel is gone
	mu      sync.Mutex
	back    map[string]bool // publish ids the broker returned
}

func newPublisher(conn *amqp.Connection) (*publisher, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open publishing channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	p := &publisher{ch: ch, barrier: make(chan chan struct{}), dead: make(chan struct{}), back: map[string]bool{}}
	go p.watch(ch.NotifyReturn(make(chan amqp.Return)))
	return p, nil
}

// watch records returned publishes. amqp091 hands a basic.return over
// before it processes the matching confirm, on the same goroutine; the
// barrier request is served only after the return has been recorded.
func (p *publisher) watch(returns <-chan amqp.Return) {
	for {
		select {
		case r, ok := <-returns:
			if !ok {
				close(p.dead)
				return
			}
			if id, _ := r.Headers[PublishIDHeader].(string); id != "" {
				p.mu.Lock()
				p.back[id] = true
				p.mu.Unlock()
			}
		case done := <-p.barrier:
			close(done)
		}
	}
}

// publish sends msg and waits for the broker's verdict.
func (p *publisher) publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	id := publishID()
	headers := make(amqp.Table, len(msg.Headers)+1)
	for k, v := range msg.Headers {
		headers[k] = v
	}
	headers[PublishIDHeader] = id
	msg.Headers = headers
	conf, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, true, false, msg)
	if err != nil {
		return err
	}
	acked, err := conf.WaitContext(ctx)
	if err != nil {
		return err
	}
	if !acked {
		return errors.New("the broker refused the message (basic.nack)")
	}
	p.sync(ctx)
	p.mu.Lock()
	returned := p.back[id]
	delete(p.back, id)
	p.mu.Unlock()
	if returned {
		return ErrUnroutable
	}
	return nil
}

// sync waits until every return handed over so far is recorded.
func (p *publisher) sync(ctx context.Context) {
	done := make(chan struct{})
	select {
	case p.barrier <- done:
		<-done
	case <-p.dead:
	case <-ctx.Done():
	}
}

func publishID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
