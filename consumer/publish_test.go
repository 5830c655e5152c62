package consumer

import (
	"context"
	"errors"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

// ackedConfirm is a confirm the broker has acked; at runs when the
// publisher has it in hand, before it checks the returns.
type ackedConfirm struct{ at func() }

func (c ackedConfirm) WaitContext(context.Context) (bool, error) {
	if c.at != nil {
		c.at()
	}
	return true, nil
}

// fakeChannel is a confirming channel with no broker: each publish hands
// returned(msg) to the return watcher's channel, if it is not nil, before
// its confirm, in the order amqp091 does it.
type fakeChannel struct {
	*confirmChannel
	returns chan amqp.Return
}

func newFakeChannel(returns chan amqp.Return, returned func(amqp.Publishing) *amqp.Return, confirmed func()) *fakeChannel {
	c := newConfirmChannel(make(chan *amqp.Error, 1))
	c.send = func(_ context.Context, exchange, key string, msg amqp.Publishing) (confirmation, error) {
		if r := returned(msg); r != nil {
			returns <- *r
		}
		return ackedConfirm{at: confirmed}, nil
	}
	return &fakeChannel{confirmChannel: c, returns: returns}
}

// stop ends the watcher as amqp091 does when the channel closes.
func (f *fakeChannel) stop(t *testing.T) {
	close(f.returns)
	<-f.dead
}

func returnedAsIs(msg amqp.Publishing) *amqp.Return {
	return &amqp.Return{ReplyCode: amqp.NoRoute, ReplyText: "NO_ROUTE", Headers: msg.Headers, Body: msg.Body}
}

func notReturned(amqp.Publishing) *amqp.Return { return nil }

// TestPublishIsNoSuccessWhenTheReturnCheckDidNotComplete: the context
// ends once the broker has confirmed a copy but before the watcher has
// recorded its basic.return (here: before the watcher runs at all). The
// publish must not report success, or the driver would ack a message
// whose copy went nowhere.
func TestPublishIsNoSuccessWhenTheReturnCheckDidNotComplete(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	f := newFakeChannel(make(chan amqp.Return, 1), returnedAsIs, cancel)
	err := f.publish(ctx, "", "q.dead", amqp.Publishing{Body: []byte("x")})
	go f.watch(f.returns)
	f.stop(t)
	if err == nil {
		t.Fatal("publish reported success although its return was not checked")
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("publish: %v, want an error wrapping context.Canceled", err)
	}
}

// TestPublishChecksEveryReturnHandedOver: a return is recorded before the
// publish reads its verdict, whether the watcher's channel holds it in a
// buffer or not; a return the publish cannot match (no publish id) makes
// every publish in flight uncertain, never a success.
func TestPublishChecksEveryReturnHandedOver(t *testing.T) {
	noID := func(msg amqp.Publishing) *amqp.Return {
		r := returnedAsIs(msg)
		r.Headers = amqp.Table{"other": "header"}
		return r
	}
	for _, tc := range []struct {
		name     string
		buffer   int
		returned func(amqp.Publishing) *amqp.Return
		check    func(error) bool
		want     string
	}{
		{"routed", 0, notReturned, func(err error) bool { return err == nil }, "nil"},
		{"returned", 0, returnedAsIs, func(err error) bool { return errors.Is(err, ErrUnroutable) }, "ErrUnroutable"},
		{"returned through a buffer", 16, returnedAsIs, func(err error) bool { return errors.Is(err, ErrUnroutable) }, "ErrUnroutable"},
		{"returned without a publish id", 0, noID, func(err error) bool { return err != nil }, "an error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeChannel(make(chan amqp.Return, tc.buffer), tc.returned, nil)
			go f.watch(f.returns)
			defer f.stop(t)
			// The watcher's select picks at random among ready cases:
			// repeat so that an unordered one is caught.
			for range 200 {
				if err := f.publish(t.Context(), "", "q.dead", amqp.Publishing{Body: []byte("x")}); !tc.check(err) {
					t.Fatalf("publish: %v, want %s", err, tc.want)
				}
			}
		})
	}
}
