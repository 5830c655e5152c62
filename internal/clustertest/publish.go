package clustertest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// batch is how many messages are published before waiting for their
// confirms: what is published again when a node goes away mid-batch.
const batch = 100

// Publisher publishes numbered persistent messages to a queue through
// whichever node answers, directly (not through the proxies), waiting
// for the broker's confirms. A batch not wholly confirmed (its node died,
// a confirm did not come within 10 s) is published again through the
// next node: at least once, so a message may reach the queue twice.
type Publisher struct {
	c     *Cluster
	queue string
	conn  *amqp.Connection
	ch    *amqp.Channel
	next  int // index of the node to try first

	// Confirmed counts the messages confirmed; Resent those published
	// again because their batch was not wholly confirmed.
	Confirmed, Resent atomic.Int64
}

// NewPublisher publishes to queue through the default exchange.
func (c *Cluster) NewPublisher(queue string) *Publisher {
	return &Publisher{c: c, queue: queue}
}

// Run publishes the messages numbered from to to-1 (body and message id
// are the number), at most rate a second (0: as fast as the confirms
// come), and returns once all are confirmed or ctx ends.
func (p *Publisher) Run(ctx context.Context, from, to int, rate float64) error {
	defer p.close()
	start := time.Now()
	for lo := from; lo < to; lo += batch {
		hi := min(lo+batch, to)
		if err := p.publishUntilConfirmed(ctx, lo, hi); err != nil {
			return err
		}
		if rate > 0 {
			due := start.Add(time.Duration(float64(hi-from) / rate * float64(time.Second)))
			if !sleepUntil(ctx, due) {
				return ctx.Err()
			}
		}
	}
	return nil
}

func (p *Publisher) publishUntilConfirmed(ctx context.Context, lo, hi int) error {
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			p.Resent.Add(int64(hi - lo))
		}
		err := p.publish(ctx, lo, hi)
		if err == nil {
			p.Confirmed.Add(int64(hi - lo))
			return nil
		}
		p.close()
		if ctx.Err() != nil {
			return fmt.Errorf("publishing %d..%d: %w (last error: %v)", lo, hi-1, ctx.Err(), err)
		}
		if !sleepUntil(ctx, time.Now().Add(200*time.Millisecond)) {
			return ctx.Err()
		}
	}
}

// publish sends one batch and waits for every confirm.
func (p *Publisher) publish(ctx context.Context, lo, hi int) error {
	if err := p.connect(); err != nil {
		return err
	}
	wait, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	confs := make([]*amqp.DeferredConfirmation, 0, hi-lo)
	for i := lo; i < hi; i++ {
		id := strconv.Itoa(i)
		conf, err := p.ch.PublishWithDeferredConfirmWithContext(wait, "", p.queue, false, false, amqp.Publishing{
			ContentType: "text/plain", MessageId: id, Body: []byte(id), DeliveryMode: amqp.Persistent,
		})
		if err != nil {
			return err
		}
		confs = append(confs, conf)
	}
	for _, c := range confs {
		ok, err := c.WaitContext(wait)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("the broker refused a message (nack)")
		}
	}
	return nil
}

// connect opens a confirming channel on the first node that answers,
// starting after the node of the last connection.
func (p *Publisher) connect() error {
	if p.ch != nil && !p.ch.IsClosed() {
		return nil
	}
	p.close()
	var errs []error
	nodes := p.c.Nodes
	for i := range nodes {
		n := nodes[(p.next+i)%len(nodes)]
		conn, err := amqp.DialConfig(n.URL(), amqp.Config{Dial: amqp.DefaultDial(2 * time.Second)})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ch, err := conn.Channel()
		if err == nil {
			err = ch.Confirm(false)
		}
		if err != nil {
			_ = conn.Close()
			errs = append(errs, err)
			continue
		}
		p.conn, p.ch, p.next = conn, ch, (p.next+i+1)%len(nodes)
		return nil
	}
	return fmt.Errorf("no node to publish to: %w", errors.Join(errs...))
}

func (p *Publisher) close() {
	if p.conn != nil {
		_ = p.conn.Close()
	}
	p.conn, p.ch = nil, nil
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-timer.C:
		return true
	}
}
