// Package driver runs one async agent: it keeps an AMQP session open
// (reconnecting with the agent's backoff), feeds deliveries to a fixed pool
// of workers, pushes each message through the Lura backend pipeline, and
// turns the outcome into an ack or a nack. It pings the gateway's health
// channel while it consumes.
package driver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// ErrGaveUp is returned by Run when the agent's connection retries are
// exhausted.
var ErrGaveUp = errors.New("connection retries exhausted")

// Defaults for agent fields left empty by code that skips Lura's parser.
const (
	DefaultTimeout        = 2 * time.Second
	DefaultHealthInterval = time.Second
	// MaxBackoff caps the wait between connection attempts: Lura's
	// exponential strategy doubles without bound.
	MaxBackoff = time.Minute
	// stableSession is how long a session must last for the retry count
	// to start again from zero.
	stableSession = 5 * time.Second
	// maxBackoffStep is the largest retry count given to the backoff
	// strategy: 2^30 s is far past MaxBackoff already.
	maxBackoffStep = 30
)

// Options is everything an agent needs; the plugin fills it from Lura's
// async.Options and the parsed driver block.
type Options struct {
	Name           string
	Session        consumer.Settings
	Workers        int
	Timeout        time.Duration
	MaxRate        float64
	HealthInterval time.Duration
	NackDiscard    bool
	// Retry and DeadLetter drive failed messages, unless AutoAck or
	// NackDiscard leave them to the broker.
	Retry      config.Retry
	DeadLetter config.DeadLetter
	// ShutdownTimeout bounds in-flight dispatches at shutdown; 0 means
	// Timeout.
	ShutdownTimeout time.Duration
	// MaxBodyBytes bounds the body sent to the backend; a larger message
	// is dead-lettered undispatched. 0 means no bound.
	MaxBodyBytes int
	// MeterProvider records the agent's metrics, TracerProvider its
	// consumer spans, and Propagator reads the publisher's trace context
	// from the message headers and writes it into the backend request.
	// Each one left nil is OpenTelemetry's global one.
	MeterProvider  metric.MeterProvider
	TracerProvider trace.TracerProvider
	Propagator     propagation.TextMapPropagator
	// URLParams fills the request params ({routing_key}...) for the
	// backends' url_pattern; without placeholders they are left empty.
	URLParams      bool
	Proxy          proxy.Proxy
	Ping           chan<- string
	ShouldContinue func(int) bool
	Backoff        func(int) time.Duration
	Logger         logging.Logger
}

// Agent is one running async agent.
type Agent struct {
	opts    Options
	log     logger
	limiter *rate.Limiter
	stats   stats
	metrics *metrics
	tracing *tracing
	// retryQueues names the agent's retry queues: a message that comes
	// back from one of them carries headers the driver believes.
	retryQueues map[string]bool
	// received counts deliveries over the agent's life.
	received atomic.Int64
}

// stats counts, between two reports, what the log summarises.
type stats struct {
	failed         atomic.Int64 // failed dispatches
	lastReason     atomic.Value // string
	unsettled      atomic.Int64 // acks/nacks refused by a closed channel
	deadLettered   atomic.Int64
	lastDeadLetter atomic.Value // string
	exhausted      atomic.Int64 // out of attempts with no dead-letter set
	copyFailed     atomic.Int64 // retry or dead-letter copies not confirmed
	lastCopyError  atomic.Value // string
}

// New checks the options, applying the documented defaults, and returns
// an agent ready to Run.
func New(opts Options) *Agent {
	a := &Agent{opts: opts, log: logger{l: opts.Logger, prefix: fmt.Sprintf("[SERVICE: AsyncAgent][AMQP][%s]", opts.Name)}}
	if a.opts.Logger == nil {
		a.log.l = logging.NoOp
	}
	if a.opts.Workers < 1 {
		a.log.Warning("consumer.workers is", a.opts.Workers, "- using 1 worker")
		a.opts.Workers = 1
	}
	if a.opts.Timeout <= 0 {
		a.log.Warning("consumer.timeout is not set - using", DefaultTimeout)
		a.opts.Timeout = DefaultTimeout
	}
	if a.opts.ShutdownTimeout <= 0 {
		a.opts.ShutdownTimeout = a.opts.Timeout
	}
	if a.opts.Retry.MaxAttempts < 1 {
		a.opts.Retry = config.Retry{MaxAttempts: config.DefaultMaxAttempts, Delay: config.DefaultDelay,
			MaxDelay: config.DefaultMaxDelay, Multiplier: config.DefaultMultiplier}
	}
	if a.ownsRetries() {
		a.opts.Session.Publish = true
		a.opts.Session.RetryDelays = a.opts.Retry.RetryDelays()
		a.opts.Session.DeadLetterQueue = a.opts.DeadLetter.Queue
		a.opts.Session.DeadLetterExchange = a.opts.DeadLetter.Exchange
		a.opts.Session.OnBlocked = a.onBlocked
		a.retryQueues = map[string]bool{}
		for _, d := range a.opts.Session.RetryDelays {
			a.retryQueues[consumer.RetryQueue(a.opts.Session.Queue, d)] = true
		}
	}
	if a.opts.HealthInterval <= 0 {
		a.opts.HealthInterval = DefaultHealthInterval
	}
	if a.opts.ShouldContinue == nil {
		a.opts.ShouldContinue = func(int) bool { return true }
	}
	if a.opts.Backoff == nil {
		a.opts.Backoff = func(int) time.Duration { return time.Second }
	}
	if a.opts.MaxRate > 0 {
		a.limiter = rate.NewLimiter(rate.Limit(a.opts.MaxRate), 1)
	}
	a.metrics = newMetrics(a.opts.MeterProvider, a.opts.Name, a.opts.Session.Queue)
	a.tracing = newTracing(a.opts.TracerProvider, a.opts.Propagator, a.opts.Name, a.opts.Session.Topology)
	if p := a.opts.Session.PrefetchCount; p > 0 && p < a.opts.Workers && !a.opts.Session.AutoAck {
		a.log.Warning(fmt.Sprintf("prefetch_count %d is below consumer.workers %d: only %d workers can have a message at a time", p, a.opts.Workers, p))
	}
	if a.opts.Session.NoLocal {
		a.log.Warning("no_local is passed to the broker, but RabbitMQ ignores it")
	}
	return a
}

// ownsRetries tells whether failed messages go through the driver's
// retry queues: not with auto_ack (the broker forgot them) nor with
// nack_discard (the broker drops or dead-letters them).
func (a *Agent) ownsRetries() bool {
	return !a.opts.Session.AutoAck && !a.opts.NackDiscard
}

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
			a.opts.Session.URLs = after(a.opts.Session.URLs, sess.Index())
		}
		if ctx.Err() != nil {
			a.log.Info("stopped")
			return nil
		}
		retries++
		if !a.opts.ShouldContinue(retries) {
			a.log.Error("giving up after", retries-1, "connection retries; last error:", oneLine(err))
			return ErrGaveUp
		}
		wait := a.backoff(retries)
		a.log.Warning(fmt.Sprintf("%s; retry %d in %s", oneLine(err), retries, wait))
		if !sleep(ctx, wait) {
			a.log.Info("stopped")
			return nil
		}
	}
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
			sess.Host(), oneLine(skipped)))
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

// consume runs the workers on a session until its deliveries end; acks
// go through one settler per session (see acks.go).
func (a *Agent) consume(ctx, bound context.Context, sess session, workers int) {
	if !a.opts.Session.AutoAck {
		q := newAcks(a, a.opts.Session.PrefetchCount)
		defer q.close()
		b := batched{session: sess, q: q}
		if a.ownsRetries() {
			b.held = newHeld(a, sess, b)
			defer b.held.close() // before the settler closes
		}
		sess = b
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.work(ctx, bound, sess)
		}()
	}
	wg.Wait()
}

// batched is a session whose acks go through a settler, with a holder
// for the messages whose copies fail.
type batched struct {
	session
	q    *acks
	held *held
}

// work handles deliveries until the channel closes. After shutdown has
// begun, messages not yet dispatched are handed back (nack with requeue),
// except with auto_ack, where the broker has already forgotten them.
//
// ctx ends when the agent stops; bound, when in-flight dispatches must
// end too (see drain).
func (a *Agent) work(ctx, bound context.Context, sess session) {
	for d := range sess.Deliveries() {
		a.handle(ctx, bound, sess, &d)
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

// report logs, at most once per health interval, how many dispatches
// failed, instead of one line per message.
func (a *Agent) report() {
	if n := a.stats.failed.Swap(0); n > 0 {
		reason, _ := a.stats.lastReason.Load().(string)
		action := "requeued"
		if a.ownsRetries() {
			action = "scheduled for a retry or dead-lettered"
		}
		if a.opts.NackDiscard {
			action = "discarded (nack_discard)"
		}
		if a.opts.Session.AutoAck {
			action = "not requeued (auto_ack)"
		}
		a.log.Warning(fmt.Sprintf("%d messages failed and were %s; last failure: %s", n, action, reason))
	}
	if n := a.stats.deadLettered.Swap(0); n > 0 {
		reason, _ := a.stats.lastDeadLetter.Load().(string)
		a.log.Warning(fmt.Sprintf("%d messages dead-lettered to %s; last reason: %s", n, a.deadLetterName(), reason))
	}
	if n := a.stats.exhausted.Swap(0); n > 0 {
		a.log.Error(fmt.Sprintf("%d messages used their %d attempts and no dead_letter is configured: they are kept and retried every %s",
			n, a.opts.Retry.MaxAttempts, a.opts.Retry.MaxDelay))
	}
	if n := a.stats.copyFailed.Swap(0); n > 0 {
		reason, _ := a.stats.lastCopyError.Load().(string)
		a.log.Error(fmt.Sprintf("%d copies to a retry or dead-letter queue could not be made; %d messages are held unacknowledged, "+
			"not dispatched again, until their copy is made; last error: %s", n, a.metrics.heldNow(), reason))
	}
	if n := a.stats.unsettled.Swap(0); n > 0 {
		a.log.Warning(n, "acks/nacks were refused on a closed channel; the broker redelivers those messages")
	}
}

func (a *Agent) deadLetterName() string {
	switch d := a.opts.DeadLetter; {
	case d.Queue != "":
		return fmt.Sprintf("queue %q", d.Queue)
	case d.Exchange != "":
		return fmt.Sprintf("exchange %q", d.Exchange)
	}
	return "the queue's own dead-letter exchange"
}

// onBlocked hears the broker block and unblock the publishing
// connection (a memory or disk alarm): copies wait meanwhile, consuming
// and acks go on.
func (a *Agent) onBlocked(blocked bool, reason string) {
	a.metrics.onBlocked(blocked)
	if blocked {
		a.log.Warning(fmt.Sprintf("the broker blocks publishing (%s): retry and dead-letter copies wait until it lifts the alarm", reason))
		return
	}
	a.log.Info("the broker unblocked publishing")
}

// ping tells the gateway the agent is alive. It never blocks: a missed
// ping is followed by the next one.
func (a *Agent) ping() {
	if a.opts.Ping == nil {
		return
	}
	select {
	case a.opts.Ping <- a.opts.Name:
	default:
	}
}

// topologyLine says what the session declared or checked.
func (a *Agent) topologyLine() string {
	t := a.opts.Session.Topology
	var line string
	switch t.Mode {
	case config.TopologyPassive:
		line = fmt.Sprintf("topology checked: exchange %q and queue %q exist", t.Exchange, t.Queue)
	case config.TopologyNone:
		line = fmt.Sprintf("topology not declared: using the existing queue %q", t.Queue)
	default:
		line = fmt.Sprintf("topology declared: %s exchange %q, queue %q, %d binding(s)", t.ExchangeType, t.Exchange, t.Queue, len(t.RoutingKeys))
	}
	if n := len(a.opts.Session.RetryDelays); n > 0 {
		line += fmt.Sprintf(", %d retry queue(s)", n)
	}
	if d := a.opts.Session.DeadLetterQueue; d != "" {
		line += fmt.Sprintf(", dead-letter queue %q", d)
	}
	return line
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

// oneLine keeps a joined error (one line per broker URL) on one log line.
func oneLine(v interface{}) string { return strings.ReplaceAll(fmt.Sprint(v), "\n", "; ") }

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// logger prefixes every line with the agent, as Lura's components do.
type logger struct {
	l      logging.Logger
	prefix string
}

func (l logger) Debug(v ...interface{})   { l.l.Debug(append([]interface{}{l.prefix}, v...)...) }
func (l logger) Info(v ...interface{})    { l.l.Info(append([]interface{}{l.prefix}, v...)...) }
func (l logger) Warning(v ...interface{}) { l.l.Warning(append([]interface{}{l.prefix}, v...)...) }
func (l logger) Error(v ...interface{})   { l.l.Error(append([]interface{}{l.prefix}, v...)...) }
