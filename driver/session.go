package driver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// Run consumes until ctx is cancelled (it then returns nil) or until the
// connection retries are exhausted (ErrGaveUp). A lost session is
// reopened with the agent's backoff.
func (a *Agent) Run(ctx context.Context) error {
	retries, sessions := 0, 0
	for {
		sess, err := consumer.Open(ctx, a.opts.Session)
		if err == nil {
			if sessions++; sessions > 1 {
				a.metrics.onReconnect()
			}
			started, before := time.Now(), a.received.Load()
			err = a.serve(ctx, sess)
			// A session that worked is no failed attempt: only sessions
			// that die at once, with nothing consumed, add up to
			// max_retries.
			if time.Since(started) >= stableSession || a.received.Load() > before {
				retries = 0
			}
			// A message the client cannot read is no fault of the
			// connection: it must not make the agent give up.
			if unreadable(err) {
				a.log.Error(fmt.Sprintf("queue %q: the AMQP client could not read a delivery (%s); the session is not "+
					"counted as a failed connection attempt", a.opts.Session.Queue, OneLine(err)))
				retries = 0
			}
			a.opts.Session.URLs = after(a.opts.Session.URLs, sess.Index())
		}
		if ctx.Err() != nil {
			a.log.Info("stopped")
			return nil
		}
		retries++
		if !a.opts.ShouldContinue(retries) {
			a.log.Error("giving up after", retries-1, "connection retries; last error:", OneLine(err))
			return ErrGaveUp
		}
		wait := a.backoff(retries)
		line := fmt.Sprintf("%s; retry %d in %s", OneLine(err), retries, wait)
		// A feature the broker denies is the configuration's to mend, not
		// the network's: it is an error, not a passing fault.
		if denied := (*consumer.DeniedFeatureError)(nil); errors.As(err, &denied) {
			a.log.Error(line)
		} else {
			a.log.Warning(line)
		}
		if !sleep(ctx, wait) {
			a.log.Info("stopped")
			return nil
		}
	}
}

// unreadable tells whether a session ended because amqp091 could not
// decode a frame the broker sent (a message's headers beyond its limits):
// a client-side frame error about a field, not a network fault.
func unreadable(err error) bool {
	var aerr *amqp.Error
	return errors.As(err, &aerr) && aerr.Code == amqp.FrameError && !aerr.Server &&
		strings.Contains(aerr.Reason, amqp.ErrSyntax.Reason)
}

// backoff asks the agent's strategy how long to wait before a retry,
// within [0, MaxBackoff]. Lura's strategies shift by the retry count, so
// after ~60 retries they return 0 or panic (jitter): the count passed on
// is capped and a panic falls back to the maximum.
func (a *Agent) backoff(retries int) (wait time.Duration) {
	defer func() {
		if recover() != nil || wait <= 0 || wait > MaxBackoff {
			wait = MaxBackoff
		}
	}()
	return a.opts.Backoff(min(retries, maxBackoffStep))
}

// serve runs the workers on one session until the session ends or ctx is
// cancelled, and returns why the session ended.
func (a *Agent) serve(ctx context.Context, sess *consumer.Session) error {
	s := a.opts.Session
	if skipped := sess.Skipped(); skipped != nil {
		a.log.Warning(fmt.Sprintf("connected to %s after failing to reach the hosts before it: %s",
			sess.Host(), OneLine(skipped)))
	} else {
		a.log.Info("connected to", sess.Host())
	}
	a.log.Info(a.topologyLine())
	keys := make([]string, len(s.RoutingKeys))
	for i, k := range s.RoutingKeys {
		keys[i] = strconv.Quote(k)
	}
	a.log.Info(fmt.Sprintf("consuming queue %q bound to exchange %q with %s as %s (workers %d, prefetch %d)",
		s.Queue, s.Exchange, strings.Join(keys, ", "), sess.Tag(), a.opts.Workers, s.PrefetchCount))
	if a.pressure != nil {
		a.pressure.restart()
	}
	a.ping()
	a.metrics.onConnected(true)
	defer a.metrics.onConnected(false)

	// Dispatches and their copies run under bound: it outlives ctx, so
	// that in-flight messages may finish at shutdown, until drain cuts it.
	bound, cut := context.WithCancel(context.WithoutCancel(ctx))
	defer cut()
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.consume(ctx, bound, sess, a.opts.Workers)
	}()

	ticker := time.NewTicker(a.opts.HealthInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			a.ping()
			a.report()
		case <-done:
			a.report()
			err := sess.Err()
			_ = sess.Close()
			if err == nil {
				err = errors.New("the broker cancelled the consumer")
			}
			return fmt.Errorf("session lost: %w", err)
		case <-ctx.Done():
			a.drain(sess, done, cut)
			a.report()
			return nil
		}
	}
}

// drain stops deliveries and gives in-flight dispatches up to
// shutdown_timeout to finish and settle. Past that bound it cancels them
// (their messages go back to the queue) and closes the session. It
// returns only once every worker has ended, then closes the session:
// whatever is still unacknowledged goes back to the queue.
func (a *Agent) drain(sess *consumer.Session, done <-chan struct{}, cut context.CancelFunc) {
	a.log.Info("stopping: cancelling the consumer and waiting for in-flight messages")
	go func() { _ = sess.Cancel() }()
	bound := a.opts.ShutdownTimeout + time.Second
	if !closedWithin(done, bound) {
		a.log.Warning("in-flight messages did not finish within", bound, "- cancelling them; the broker requeues them")
		cut()
		if !closedWithin(done, closeGrace) {
			// A broker that does not answer the cancel keeps the
			// deliveries open: closing the session ends them.
			_ = sess.Close()
		}
		<-done
	}
	if err := sess.Close(); err != nil && !errors.Is(err, amqp.ErrClosed) {
		a.log.Debug("closing the session:", err)
	}
}

// closeGrace is how long cancelled dispatches get to hand their messages
// back before the session is closed under them.
const closeGrace = 2 * time.Second

// closedWithin tells whether done closed within d.
func closedWithin(done <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// after rotates a cluster's URLs so that the one after i comes first: a
// lost session is retried on the next node, and the node it was on is
// tried last.
func after(urls []string, i int) []string {
	if len(urls) < 2 {
		return urls
	}
	i = (i + 1) % len(urls)
	return append(append([]string(nil), urls[i:]...), urls[:i]...)
}

// sleep waits d, or until ctx ends; it tells whether d passed.
func sleep(ctx context.Context, d time.Duration) bool { return sleepOrWake(ctx, nil, d) == nil }
