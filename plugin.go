// Package asyncamqp is the AMQP driver for KrakenD async agents. Add
// StartAgent to a Lura/KrakenD build's async.AgentStarter, ahead of any
// other AMQP factory, and every async_agent whose extra_config holds an
// "async/amqp" block (or KrakenD's legacy key) consumes its RabbitMQ queue
// and pushes each message through the agent's backend pipeline.
//
// StartAgent records metrics and traces on OpenTelemetry's globals. A
// build that keeps its telemetry elsewhere, as KrakenD does, uses the
// factory of NewFactory instead, with WithTelemetryFrom(state.GlobalState)
// in KrakenD CE.
package asyncamqp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/luraproject/lura/v2/async"
	"github.com/luraproject/lura/v2/backoff"
	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/encoding"
	"github.com/luraproject/lura/v2/logging"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
	"github.com/krakend-contrib/async-amqp/driver"
)

// Namespace is the extra_config key of the driver block.
const Namespace = config.Namespace

// LegacyNamespace is the key of KrakenD's own AMQP driver, also accepted.
const LegacyNamespace = config.LegacyNamespace

// StartAgent has the type of Lura's async.Factory. It returns false, at
// once and with no I/O, when the agent has no block for this driver, so
// another factory may take it. Otherwise the agent is this driver's: a
// configuration error is logged, naming the agent and the field, and that
// agent does not start; a valid agent runs in opts.G until its context
// ends. An agent never returns an error into opts.G, which would stop
// every other agent and the router.
//
// StartAgent records on OpenTelemetry's global providers; NewFactory
// returns the same factory recording on the telemetry a build gives it.
func StartAgent(ctx context.Context, opts async.Options) bool {
	return start(ctx, opts, settings{})
}

// NewFactory returns a factory that behaves as StartAgent, with the given
// options: the telemetry of the build, for instance.
func NewFactory(options ...Option) async.Factory {
	var s settings
	for _, o := range options {
		o(&s)
	}
	return func(ctx context.Context, opts async.Options) bool {
		return start(ctx, opts, s)
	}
}

func start(ctx context.Context, opts async.Options, s settings) bool {
	if opts.Agent == nil {
		return false
	}
	cfg, err := config.FromExtraConfig(opts.Agent.ExtraConfig)
	if errors.Is(err, config.ErrNoConfig) {
		return false
	}
	logger := opts.Logger
	if logger == nil {
		logger = logging.NoOp
	}
	prefix := fmt.Sprintf("[SERVICE: AsyncAgent][AMQP][%s]", opts.Agent.Name)
	if err := Check(opts.Agent); err != nil {
		logger.Error(prefix, "not started, invalid configuration:", strings.ReplaceAll(err.Error(), "\n", "; "))
		return true
	}
	tlsConfig, _ := cfg.TLS.Load() // checked above
	for _, w := range warnings(cfg) {
		logger.Warning(prefix, w)
	}
	warnIdleConns(logger, prefix, opts.Agent.Consumer.Workers)
	agentOpts := agentOptions(opts, cfg, tlsConfig)
	agentOpts.MeterProvider, agentOpts.TracerProvider, agentOpts.Propagator = s.providers(logger, prefix)
	agent := driver.New(agentOpts)
	opts.G.Go(func() error {
		_ = agent.Run(ctx)
		return nil
	})
	return true
}

// Check validates an agent for this driver: its driver block and the Lura
// fields the driver relies on. It rewrites the backends' url_pattern
// placeholders ({routing_key}) into Lura's form. Every error names the
// agent and the field.
func Check(agent *luraconfig.AsyncAgent) error {
	if agent == nil {
		return errors.New("no agent to check")
	}
	var errs []error
	cfg, err := config.FromExtraConfig(agent.ExtraConfig)
	if err != nil {
		errs = append(errs, blockErrors(agent, err))
	} else if _, err := cfg.TLS.Load(); err != nil {
		errs = append(errs, blockErrors(agent, err))
	}
	if needsTopic(cfg) && strings.TrimSpace(agent.Consumer.Topic) == "" {
		errs = append(errs, fmt.Errorf("agent %q: consumer.topic: required: the routing key the queue is bound with (\"#\" takes every message)", agent.Name))
	}
	if agent.Consumer.MaxRate < 0 {
		errs = append(errs, fmt.Errorf("agent %q: consumer.max_rate: must be 0 (unlimited) or more, got %v", agent.Name, agent.Consumer.MaxRate))
	}
	if agent.Consumer.Timeout < 0 {
		errs = append(errs, fmt.Errorf("agent %q: consumer.timeout: must not be negative", agent.Name))
	}
	for i, b := range agent.Backend {
		if b.Encoding == encoding.NOOP && len(agent.Backend) > 1 {
			errs = append(errs, fmt.Errorf("agent %q: backend[%d].encoding: no-op works with one backend only: "+
				"Lura's merge of several backends drops their status codes, so a failure could be acked", agent.Name, i))
		}
		pattern, err := driver.URLPattern(b.URLPattern)
		if err != nil {
			errs = append(errs, fmt.Errorf("agent %q: backend[%d].url_pattern: %w", agent.Name, i, err))
			continue
		}
		b.URLPattern = pattern
	}
	return errors.Join(errs...)
}

// Warnings lists what in a valid agent works but costs something the
// operator should know, one line each naming the agent and the field: an
// unverified broker certificate, retries on a queue that can vanish. It
// says nothing of an agent this driver does not take or that Check
// refuses.
func Warnings(agent *luraconfig.AsyncAgent) []string {
	if agent == nil {
		return nil
	}
	cfg, err := config.FromExtraConfig(agent.ExtraConfig)
	if err != nil {
		return nil
	}
	var out []string
	for _, w := range warnings(cfg) {
		out = append(out, fmt.Sprintf("agent %q: %s", agent.Name, w))
	}
	return out
}

func warnings(cfg config.Config) []string {
	var out []string
	if cfg.TLS.InsecureSkipVerify {
		out = append(out, "tls.insecure_skip_verify is set: the broker's certificate is not verified")
	}
	if (cfg.Delete || cfg.Exclusive) && !cfg.AutoAck && !cfg.NackDiscard {
		out = append(out, "delete or exclusive with the driver's retries: a retry copy comes back to the queue "+
			"through the broker's dead-lettering after its delay, and the broker drops it if the queue is gone by then "+
			"(an auto-delete queue once its last consumer leaves, an exclusive one with its connection); "+
			"use a durable, shared queue, or nack_discard")
	}
	return out
}

// needsTopic tells whether the binding needs consumer.topic: not when
// routing_keys replace it, nor when the driver binds nothing.
func needsTopic(cfg config.Config) bool {
	return len(cfg.RoutingKeys) == 0 && cfg.ExchangeType != "fanout" && cfg.Topology == config.TopologyDeclare
}

// routingKeys are the binding keys: routing_keys, else consumer.topic.
func routingKeys(cfg config.Config, topic string) []string {
	if len(cfg.RoutingKeys) > 0 {
		return cfg.RoutingKeys
	}
	return []string{topic}
}

// warnIdleConns says when Go's default HTTP transport, which Lura's
// backend client uses, keeps fewer idle connections per host than the
// agent has workers: the others would open a new connection per message,
// at about twice the CPU. A gateway sets it from the service config with
// Lura's server.InitHTTPDefaultTransport.
func warnIdleConns(logger logging.Logger, prefix string, workers int) {
	t, ok := http.DefaultTransport.(*http.Transport)
	if !ok {
		return
	}
	idle := t.MaxIdleConnsPerHost
	if idle == 0 {
		idle = http.DefaultMaxIdleConnsPerHost
	}
	if idle < workers {
		logger.Warning(prefix, fmt.Sprintf("the HTTP transport keeps %d idle connections per backend host, fewer than "+
			"consumer.workers (%d): set max_idle_connections_per_host and initialise Lura's transport "+
			"(server.InitHTTPDefaultTransport), or backends get a new connection per message", idle, workers))
	}
}

// backoffFor returns the agent's backoff strategy. Lura's jitter
// strategies share one math/rand.Rand that is not safe for concurrent
// use, and agents back off concurrently: the same strategies are rebuilt
// here on Lura's plain ones with a goroutine-safe source. Any other name
// keeps what Lura chose.
func backoffFor(strategy string, lura backoff.TimeToWaitBeforeRetry) func(int) time.Duration {
	switch strings.ToLower(strategy) {
	case "linear-jitter":
		return withJitter(backoff.LinearBackoff)
	case "exponential-jitter":
		return withJitter(backoff.ExponentialBackoff)
	}
	return lura
}

// withJitter spreads each wait by up to a third either way, as Lura does.
func withJitter(base backoff.TimeToWaitBeforeRetry) func(int) time.Duration {
	return func(i int) time.Duration {
		ms := base(i).Milliseconds()
		spread := ms/3 + 1
		ms += rand.Int64N(2*spread) - spread
		return time.Duration(max(ms, 1)) * time.Millisecond
	}
}

// usesParams tells whether a backend's url_pattern (already rewritten by
// Check) has placeholders.
func usesParams(backends []*luraconfig.Backend) bool {
	for _, b := range backends {
		if driver.UsesParams(b.URLPattern) {
			return true
		}
	}
	return false
}

// blockErrors names the agent and the path of each problem of its
// driver block, e.g. extra_config.async/amqp.prefetch_count.
func blockErrors(agent *luraconfig.AsyncAgent, err error) error {
	if errors.Is(err, config.ErrNoConfig) {
		return fmt.Errorf("agent %q: %w", agent.Name, err)
	}
	path := "extra_config." + Namespace
	if _, ok := agent.ExtraConfig[Namespace]; !ok {
		path = "extra_config." + LegacyNamespace
	}
	var errs []error
	for _, e := range unjoin(err) {
		var field *config.FieldError
		if errors.As(e, &field) {
			errs = append(errs, fmt.Errorf("agent %q: %s.%w", agent.Name, path, e))
			continue
		}
		errs = append(errs, fmt.Errorf("agent %q: %s: %w", agent.Name, path, e))
	}
	return errors.Join(errs...)
}

func unjoin(err error) []error {
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		return joined.Unwrap()
	}
	return []error{err}
}

func agentOptions(opts async.Options, cfg config.Config, tlsConfig *tls.Config) driver.Options {
	a := opts.Agent
	return driver.Options{
		Name: a.Name,
		Session: consumer.Settings{
			URLs: cfg.URLs(),
			TLS:  tlsConfig,
			Topology: consumer.Topology{
				Exchange:     cfg.Exchange,
				ExchangeType: cfg.ExchangeType,
				Queue:        cfg.Queue,
				RoutingKeys:  routingKeys(cfg, a.Consumer.Topic),
				QueueArgs:    amqp.Table(cfg.QueueArgs),
				Mode:         cfg.Topology,
				Durable:      cfg.Durable,
				AutoDelete:   cfg.Delete,
				Exclusive:    cfg.Exclusive,
				NoWait:       cfg.NoWait,
			},
			PrefetchCount: cfg.PrefetchCount,
			PrefetchSize:  cfg.PrefetchSize,
			AutoAck:       cfg.AutoAck,
			NoLocal:       cfg.NoLocal,
			Name:          a.Name,
		},
		Workers:         a.Consumer.Workers,
		Timeout:         a.Consumer.Timeout,
		MaxRate:         a.Consumer.MaxRate,
		HealthInterval:  a.Connection.HealthInterval,
		NackDiscard:     cfg.NackDiscard,
		Retry:           cfg.Retry,
		DeadLetter:      cfg.DeadLetter,
		ShutdownTimeout: cfg.ShutdownTimeout,
		MaxBodyBytes:    cfg.MaxBodyBytes,
		URLParams:       usesParams(a.Backend),
		Proxy:           opts.Proxy,
		Ping:            opts.AgentPing,
		ShouldContinue:  opts.ShouldContinue,
		Backoff:         backoffFor(a.Connection.BackoffStrategy, opts.BackoffF),
		Logger:          opts.Logger,
	}
}
