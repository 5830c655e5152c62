// Package asyncamqp is the AMQP driver for KrakenD async agents. Add
// StartAgent to a Lura/KrakenD build's async.AgentStarter, ahead of any
// other AMQP factory, and every async_agent whose extra_config holds an
// "async/amqp" block (or KrakenD's legacy key) consumes its RabbitMQ queue
// and pushes each message through the agent's backend pipeline. The
// driver's own fields (retry, dead_letter, tls, ...) go in a block of
// their own beside it, under ExtensionNamespace, so that the file passes
// `krakend check --lint`.
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

// ExtensionNamespace is the key of the block, beside Namespace, that holds
// the driver's own fields (retry, dead_letter, tls, ...): KrakenD's schema
// allows only its own fields in Namespace, so `krakend check --lint`
// passes. Extension fields still read from Namespace are deprecated.
const ExtensionNamespace = config.ExtensionNamespace

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
	p, ready := s.prepared[opts.Agent]
	var cfg config.Config
	var err error
	if !ready {
		cfg, err = config.FromExtraConfig(opts.Agent.ExtraConfig)
		if errors.Is(err, config.ErrNoConfig) {
			return false
		}
	}
	logger := opts.Logger
	if logger == nil {
		logger = logging.NoOp
	}
	prefix := driver.LogPrefix(opts.Agent.Name)
	if !ready {
		if p, err = prepare(opts.Agent, cfg, err); err != nil {
			notStarted(logger, prefix, err)
			return true
		}
	}
	for _, w := range warnings(p.cfg) {
		logger.Warning(prefix, w)
	}
	warnIdleConns(logger, prefix, opts.Agent.Consumer.Workers)
	agentOpts := agentOptions(opts, p.cfg, p.tls)
	agentOpts.MeterProvider, agentOpts.TracerProvider, agentOpts.Propagator = s.providers(logger, prefix)
	agent, err := driver.New(agentOpts)
	if err != nil {
		notStarted(logger, prefix, err)
		return true
	}
	opts.G.Go(func() error {
		_ = agent.Run(ctx)
		return nil
	})
	return true
}

// notStarted logs, at ERROR, why an agent the driver owns does not start:
// it must not vanish quietly, as /__health does not list an agent that
// never pinged. Each problem names the agent, the field and what it must be.
func notStarted(logger logging.Logger, prefix string, err error) {
	logger.Error(prefix, "not started, invalid configuration:", driver.OneLine(err)+
		"; fix the block and restart the gateway (`krakend check` reports this before a start when the build sets "+
		"asyncamqp.NewChecker, and so does `krakend-amqp check -c krakend.json`)")
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
		Workers:           a.Consumer.Workers,
		Timeout:           a.Consumer.Timeout,
		MaxRate:           a.Consumer.MaxRate,
		HealthInterval:    a.Connection.HealthInterval,
		NackDiscard:       cfg.NackDiscard,
		Retry:             cfg.Retry,
		DeadLetter:        cfg.DeadLetter,
		Reply:             cfg.Reply,
		ShutdownTimeout:   cfg.ShutdownTimeout,
		MaxBodyBytes:      cfg.MaxBodyBytes,
		IdempotencyHeader: cfg.IdempotencyHeader,
		BackPressure:      cfg.BackPressure,
		CloudEvents:       cfg.CloudEvents,
		OrderingKey:       cfg.OrderingKey,
		URLParams:         usesParams(a.Backend),
		Proxy:             opts.Proxy,
		Ping:              opts.AgentPing,
		ShouldContinue:    opts.ShouldContinue,
		Backoff:           backoffFor(a.Connection.BackoffStrategy, opts.BackoffF),
		Logger:            opts.Logger,
	}
}
