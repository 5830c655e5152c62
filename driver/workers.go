package driver

import (
	"context"
	"sync"

	amqp "github.com/rabbitmq/amqp091-go"
)

// consume runs the workers on a session until its deliveries end. Their
// messages are settled through one settler per session: the ack batcher
// (acks.go), or on the spot with auto_ack.
func (a *Agent) consume(ctx, bound context.Context, sess session, workers int) {
	f := &flow{session: sess, settler: directSettler{a}}
	if !a.opts.Session.AutoAck {
		q := newAcks(a, a.opts.Session.PrefetchCount)
		defer q.close()
		f.settler = q
		if a.ownsRetries() {
			f.held = newHeld(a, f)
			defer f.held.close() // before the settler closes
		}
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.work(ctx, bound, f)
		}()
	}
	wg.Wait()
}

// work handles deliveries until the channel closes. After shutdown has
// begun, messages not yet dispatched are handed back (nack with requeue),
// except with auto_ack, where the broker has already forgotten them.
//
// ctx ends when the agent stops; bound, when in-flight dispatches must
// end too (see drain).
func (a *Agent) work(ctx, bound context.Context, f *flow) {
	for d := range f.Deliveries() {
		a.handle(ctx, bound, f, &d)
	}
}

// session is what the workers use of a consumer session.
type session interface {
	Deliveries() <-chan amqp.Delivery
	publisher
}

// wait applies consumer.max_rate, shared by all workers of the agent.
func (a *Agent) wait(ctx context.Context) error {
	if a.limiter == nil {
		return nil
	}
	return a.limiter.Wait(ctx)
}
