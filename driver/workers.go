package driver

import (
	"context"
	"errors"
	"sync"

	amqp "github.com/rabbitmq/amqp091-go"
)

// consume runs the workers on a session until its deliveries end. Their
// messages are settled through one settler per session: the ack batcher
// (acks.go), or on the spot with auto_ack.
func (a *Agent) consume(ctx, bound context.Context, sess session, workers int) {
	live, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		select {
		case <-sess.Done():
			stop()
		case <-live.Done():
		}
	}()
	f := &flow{session: sess, number: a.sessionNumber.Add(1), settler: directSettler{a}, live: live}
	if u, ok := sess.(interface {
		Unreadable(tag uint64) (string, bool)
	}); ok {
		f.unreadable = u.Unreadable
	}
	if !a.opts.Session.AutoAck {
		q := newAcks(a, a.opts.Session.PrefetchCount)
		defer q.close()
		f.settler = q
		if a.ownsRetries() {
			f.held = newHeld(a, f)
			defer f.held.close() // before the settler closes
		}
	}
	work := a.work
	if a.keyOf != nil {
		seq := newSequencer()
		lined := func(d *amqp.Delivery) { f.settler.holding(&message{d: d}) }
		go seq.feed(a, f.Deliveries(), a.keyOf, lined)
		work = func(ctx, bound context.Context, f *flow) { a.workInOrder(ctx, bound, f, seq) }
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			work(ctx, bound, f)
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

// workInOrder handles what the sequencer hands over: a message, then the
// ones behind it in its key's line.
func (a *Agent) workInOrder(ctx, bound context.Context, f *flow, seq *sequencer) {
	for item := range seq.work {
		for d := item.d; d != nil; d = seq.next(item.key) {
			a.handle(ctx, bound, f, d)
			if !item.keyed {
				break
			}
		}
	}
}

// session is what the workers use of a consumer session.
type session interface {
	Deliveries() <-chan amqp.Delivery
	// Done is closed when the session's deliveries can no longer be
	// acknowledged (its channel closed).
	Done() <-chan struct{}
	publisher
}

// wait applies consumer.max_rate and the back-pressure, both shared by
// all workers of the agent; held, when set, is called once if the
// back-pressure makes the dispatch wait. Once it returns nil, the
// dispatch must end with release.
func (a *Agent) wait(ctx context.Context, held func()) error {
	if a.limiter != nil {
		if err := a.limiter.Wait(ctx); err != nil {
			return err
		}
	}
	if a.pressure != nil {
		return a.pressure.enter(ctx, held)
	}
	return nil
}

// errSessionEnded says a message's session ended before its dispatch.
var errSessionEnded = errors.New("the session ended")

// waitInSession is wait for a message of a session. The wait ends with
// the session: a message dispatched after it could not be acked, and
// the broker delivers it again, so the backend would see it twice. While
// it waits for the back-pressure, the message is marked held, so that
// the acks of the messages after it are not kept waiting for it.
func (a *Agent) waitInSession(ctx context.Context, f *flow, m *message) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if f.ended() {
		return errSessionEnded
	}
	live := ctx
	if f.live != nil {
		live = f.live
	}
	err := a.wait(live, func() { f.settler.holding(m) })
	if ctx.Err() == nil && f.ended() {
		if err == nil {
			a.abandon()
		}
		return errSessionEnded
	}
	return err
}

// abandon gives back a turn that wait gave, for a dispatch that will
// not run.
func (a *Agent) abandon() {
	if a.pressure != nil {
		a.pressure.abandon()
	}
}

// release ends a dispatch that wait let start, with its answer.
func (a *Agent) release(r result) {
	if a.pressure != nil {
		a.pressure.leave(r)
	}
}
