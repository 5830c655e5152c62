// Package driver runs one async agent: it keeps an AMQP session open
// (reconnecting with the agent's backoff), feeds deliveries to a fixed pool
// of workers, pushes each message through the Lura backend pipeline, and
// turns the outcome into an ack or a nack. It pings the gateway's health
// channel while it consumes.
package driver

import (
	"errors"
	"fmt"
	"math"
	"net/textproto"
	"sync/atomic"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/net/http/httpguts"
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
	// Reply answers the messages that carry reply_to (see reply.go).
	Reply config.Reply
	// ShutdownTimeout bounds in-flight dispatches at shutdown; 0 means
	// Timeout.
	ShutdownTimeout time.Duration
	// MaxBodyBytes bounds the body sent to the backend; a larger message
	// is dead-lettered undispatched. 0 means no bound.
	MaxBodyBytes int
	// BackPressure slows the agent down while the backend answers 429 or
	// 503, or times out (see pressure.go).
	BackPressure bool
	// OrderingKey dispatches the messages sharing a key one at a time,
	// in delivery order (see ordered.go); "" orders nothing.
	OrderingKey string
	// IdempotencyHeader names the request header carrying the message's
	// idempotency key (see idempotencyKey); "" sends none.
	IdempotencyHeader string
	// CloudEvents reads a message that is a CloudEvent under the AMQP
	// binding and sends it to the backend under the HTTP binding (see
	// cloudevents.go).
	CloudEvents bool
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
	// pressure is nil without back-pressure.
	pressure *pressure
	// keyOf reads a delivery's ordering key; nil without ordering_key.
	keyOf   keyOf
	stats   stats
	metrics *metrics
	tracing *tracing
	// retryQueues names the agent's retry queues: a message that comes
	// back from one of them carries headers the driver believes.
	retryQueues map[string]time.Duration
	// received counts deliveries over the agent's life.
	received atomic.Int64
	// leftovers remembers the messages handled by a session that ended
	// before their acks went out; nil with auto_ack.
	leftovers *leftovers
	// sessionNumber numbers the sessions consumed, so that what a cut
	// left is told from what the next session receives.
	sessionNumber atomic.Uint64
	// unconfirmed groups a message with its retry copies whose confirm
	// was lost; nil when the driver does not own retries.
	unconfirmed *unconfirmed
}

// LogPrefix starts every log line about an agent, as Lura's components
// name theirs: [SERVICE: AsyncAgent][AMQP][<agent>].
func LogPrefix(agent string) string { return fmt.Sprintf("[SERVICE: AsyncAgent][AMQP][%s]", agent) }

// New checks the options as Check checks an agent's configuration,
// applying the documented defaults, and returns an agent ready to Run.
// Options the configuration would refuse, because the driver would loop,
// hold memory without bound or misbehave with them, are an error naming
// the agent and each field.
func New(opts Options) (*Agent, error) {
	if err := opts.validate(); err != nil {
		var errs []error
		for _, e := range config.Errors(err) {
			errs = append(errs, fmt.Errorf("agent %q: %w", opts.Name, e))
		}
		return nil, errors.Join(errs...)
	}
	a := &Agent{opts: opts, log: logger{l: opts.Logger, prefix: LogPrefix(opts.Name)}}
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
	if a.opts.Retry == (config.Retry{}) {
		a.opts.Retry = config.Retry{MaxAttempts: config.DefaultMaxAttempts, Delay: config.DefaultDelay,
			MaxDelay: config.DefaultMaxDelay, Multiplier: config.DefaultMultiplier}
	}
	if a.ownsRetries() {
		a.opts.Session.Publish = true
		a.opts.Session.RetryDelays = a.opts.Retry.RetryDelays()
		a.opts.Session.DeadLetterQueue = a.opts.DeadLetter.Queue
		a.opts.Session.DeadLetterExchange = a.opts.DeadLetter.Exchange
		a.opts.Session.OnBlocked = a.onBlocked
		a.retryQueues = consumer.RetryQueues(a.opts.Session.Queue, a.opts.Session.RetryDelays)
		a.unconfirmed = newUnconfirmed(a.opts.Session.PrefetchCount, a.opts.Retry.DelayFor(math.MaxInt))
	}
	// Lura copies request headers as they are named: canonical, as
	// net/http writes them, and worked out once, not per message.
	a.opts.IdempotencyHeader = textproto.CanonicalMIMEHeaderKey(a.opts.IdempotencyHeader)
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
	a.keyOf = orderingKey(a.opts.OrderingKey)
	if !a.opts.Session.AutoAck {
		a.leftovers = newLeftovers(a.opts.Session.PrefetchCount)
	}
	if a.opts.BackPressure {
		a.pressure = newPressure(a.opts.Workers, a.onPressure)
	}
	telemetry := &guard{log: a.log}
	a.metrics = newMetrics(a.opts.MeterProvider, a.opts.Name, a.opts.Session.Queue, a.pressureState, telemetry)
	a.tracing = newTracing(a.opts.TracerProvider, a.opts.Propagator, a.opts.Name, a.opts.Session.Topology, telemetry)
	if p := a.opts.Session.PrefetchCount; p > 0 && p < a.opts.Workers && !a.opts.Session.AutoAck {
		a.log.Warning(fmt.Sprintf("prefetch_count %d is below consumer.workers %d: only %d workers can have a message at a time", p, a.opts.Workers, p))
	}
	if a.opts.Session.NoLocal {
		a.log.Warning("no_local is passed to the broker, but RabbitMQ ignores it")
	}
	return a, nil
}

// validate refuses what the configuration refuses and New cannot
// correct; the fields it names are those of the agent's configuration.
// Workers, Timeout and HealthInterval left at 0 (or below) are given
// their defaults instead, as Lura does.
func (o Options) validate() error {
	var errs []error
	bad := func(field, format string, args ...interface{}) {
		errs = append(errs, &config.FieldError{Field: field, Reason: fmt.Sprintf(format, args...)})
	}
	if !(o.MaxRate >= 0) { // NaN too
		bad("consumer.max_rate", "must be 0 (unlimited) or more, got %v", o.MaxRate)
	}
	if o.ShutdownTimeout < 0 {
		bad("shutdown_timeout", "must be at least 0s, got %s", o.ShutdownTimeout)
	}
	if n := o.Session.PrefetchCount; n < 0 || n > math.MaxUint16 {
		bad("prefetch_count", "must be between 0 and %d, got %d", math.MaxUint16, n)
	}
	if n := o.Session.PrefetchSize; n < 0 || n > math.MaxUint32 {
		bad("prefetch_size", "must be between 0 and %d, got %d", uint32(math.MaxUint32), n)
	}
	if o.MaxBodyBytes < 0 {
		bad("max_body_bytes", "must be 0 (no bound) or more, got %d", o.MaxBodyBytes)
	}
	if h := o.IdempotencyHeader; h != "" && !httpguts.ValidHeaderFieldName(h) {
		bad("idempotency_header", "must be an HTTP header name, got %q", h)
	}
	if err := config.CheckOrdering(o.OrderingKey, o.Session.PrefetchCount, o.Session.AutoAck); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, config.Errors(CheckReply(o.Reply))...)
	// Retry and DeadLetter are used only when the driver owns retries;
	// a zero Retry is the default policy.
	if !o.Session.AutoAck && !o.NackDiscard {
		if o.Retry != (config.Retry{}) {
			errs = append(errs, config.Errors(o.Retry.Validate())...)
		}
		errs = append(errs, config.Errors(o.DeadLetter.Validate())...)
		t := o.Session.Topology
		if err := o.DeadLetter.CheckLoop(t.Queue, t.Exchange, t.ExchangeType, t.RoutingKeys); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ownsRetries tells whether failed messages go through the driver's
// retry queues: not with auto_ack (the broker forgot them) nor with
// nack_discard (the broker drops or dead-letters them).
func (a *Agent) ownsRetries() bool {
	return !a.opts.Session.AutoAck && !a.opts.NackDiscard
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
