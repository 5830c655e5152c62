package asyncamqp

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"strings"

	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/encoding"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/driver"
)

// Check validates an agent for this driver: its driver blocks, async/amqp
// and ExtensionNamespace beside it (and the TLS files they name) and the Lura fields the driver relies on. Every
// error names the agent and the field. It changes nothing: StartAgent
// rewrites the url_pattern placeholders when it starts the agent.
func Check(agent *luraconfig.AsyncAgent) error {
	if agent == nil {
		return errors.New("no agent to check")
	}
	cfg, err := config.FromExtraConfig(agent.ExtraConfig)
	_, err = validate(agent, cfg, err)
	return err
}

// prepared is an agent ready to start: its blocks parsed and its TLS
// configuration loaded, each once.
type prepared struct {
	cfg config.Config
	tls *tls.Config
}

// Prepared is an agent Prepare found valid, ready to start: its blocks
// parsed and its TLS files read, once.
type Prepared struct {
	agent *luraconfig.AsyncAgent
	p     prepared
}

// Prepare validates an agent as Check does and, when it is valid, readies
// it to start as StartAgent would: it rewrites its backends' url_pattern
// placeholders in place into Lura's form. A factory given the result with
// WithPrepared starts that agent without parsing its blocks or reading
// its TLS files again. A gateway that checks its file before it starts
// the agents calls Prepare in place of Check and Warnings.
func Prepare(agent *luraconfig.AsyncAgent) (*Prepared, error) {
	if agent == nil {
		return nil, errors.New("no agent to prepare")
	}
	cfg, err := config.FromExtraConfig(agent.ExtraConfig)
	p, err := prepare(agent, cfg, err)
	if err != nil {
		return nil, err
	}
	return &Prepared{agent: agent, p: p}, nil
}

// Warnings are what Warnings says of the agent.
func (p *Prepared) Warnings() []string { return agentWarnings(p.agent, p.p.cfg) }

// prepare validates an agent as Check does, from its block parsed once,
// and rewrites its backends' url_pattern placeholders ({routing_key})
// in place into the form Lura's request builder fills in: Lura reads the
// pattern from the backend when it builds each request.
func prepare(agent *luraconfig.AsyncAgent, cfg config.Config, parseErr error) (prepared, error) {
	tlsConfig, err := validate(agent, cfg, parseErr)
	if err != nil {
		return prepared{}, err
	}
	for _, b := range agent.Backend {
		b.URLPattern, _ = driver.URLPattern(b.URLPattern) // validated above
	}
	return prepared{cfg: cfg, tls: tlsConfig}, nil
}

// validate returns the agent's TLS configuration and every problem of
// the agent, given its parsed block or the error that parsing returned.
func validate(agent *luraconfig.AsyncAgent, cfg config.Config, parseErr error) (*tls.Config, error) {
	var errs []error
	var tlsConfig *tls.Config
	if parseErr != nil {
		errs = append(errs, blockErrors(agent, cfg, parseErr))
	} else if t, err := cfg.TLS.Load(); err != nil {
		errs = append(errs, blockErrors(agent, cfg, err))
	} else {
		tlsConfig = t
	}
	if err := driver.CheckReply(cfg.Reply); err != nil {
		errs = append(errs, blockErrors(agent, cfg, err))
	}
	if needsTopic(cfg) && strings.TrimSpace(agent.Consumer.Topic) == "" {
		errs = append(errs, fmt.Errorf("agent %q: consumer.topic: required: the routing key the queue is bound with (\"#\" takes every message)", agent.Name))
	} else if parseErr == nil && len(cfg.RoutingKeys) == 0 {
		// Parse checked routing_keys; the binding is consumer.topic.
		if err := cfg.CheckDeadLetterLoop(agent.Consumer.Topic); err != nil {
			errs = append(errs, blockErrors(agent, cfg, err))
		}
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
		if _, err := driver.URLPattern(b.URLPattern); err != nil {
			errs = append(errs, fmt.Errorf("agent %q: backend[%d].url_pattern: %w", agent.Name, i, err))
		}
	}
	return tlsConfig, errors.Join(errs...)
}

// Warnings lists what in a valid agent works but costs something the
// operator should know, one line each naming the agent and the field: an
// unverified broker certificate, retries on a queue that can vanish, the
// driver's own fields still in async/amqp or the block under the legacy
// key (deprecated: KrakenD's schema refuses both, so `krakend check
// --lint` fails). It reads the keys as the file has them, before
// KrakenD's executor renames any. It says nothing of an agent this driver
// does not take or that Check refuses.
func Warnings(agent *luraconfig.AsyncAgent) []string {
	if agent == nil {
		return nil
	}
	cfg, err := config.FromExtraConfig(agent.ExtraConfig)
	if err != nil {
		return nil
	}
	return agentWarnings(agent, cfg)
}

func agentWarnings(agent *luraconfig.AsyncAgent, cfg config.Config) []string {
	var out []string
	if cfg.Source.Key == config.LegacyNamespace {
		// Not logged when the agent starts: KrakenD's executor moves every
		// async/amqp block under the legacy key before it starts agents.
		out = append(out, fmt.Sprintf("agent %q: %s: the legacy key, still read: KrakenD's schema wants %q in an agent's "+
			"extra_config, so `krakend check --lint` fails on this agent; rename the block to %q",
			agent.Name, "extra_config."+config.LegacyNamespace, config.Namespace, config.Namespace))
	}
	for _, w := range warnings(cfg) {
		out = append(out, fmt.Sprintf("agent %q: %s", agent.Name, w))
	}
	return out
}

func warnings(cfg config.Config) []string {
	var out []string
	if m := cfg.Source.Misplaced; len(m) > 0 {
		out = append(out, fmt.Sprintf("%s: %s: deprecated placement, still read: KrakenD's schema allows only its own "+
			"fields in %s, so `krakend check --lint` fails on %s; move %s to %s",
			config.Path(cfg.KeyOf("")), strings.Join(m, ", "), config.Namespace, them(m), them(m), config.Path(config.ExtensionNamespace)))
	}
	if cfg.TLS.InsecureSkipVerify {
		out = append(out, "tls.insecure_skip_verify is set: the broker's certificate is not verified")
	}
	if (cfg.Delete || cfg.Exclusive) && !cfg.AutoAck && !cfg.NackDiscard {
		out = append(out, "delete or exclusive with the driver's retries: a retry copy comes back to the queue "+
			"through the broker's dead-lettering after its delay, and the broker drops it if the queue is gone by then "+
			"(an auto-delete queue once its last consumer leaves, an exclusive one with its connection); "+
			"use a durable, shared queue, or nack_discard")
	}
	out = append(out, replyWarnings(cfg)...)
	return append(out, rabbitMQ4Warnings(cfg)...)
}

// replyWarnings flag reply.to patterns that let a publisher choose almost
// any queue for the gateway's replies: reply_to is the publisher's.
func replyWarnings(cfg config.Config) []string {
	var out []string
	for _, p := range cfg.Reply.To {
		own := config.Reply{Enabled: true, To: []string{p}}.Answers(cfg.Queue)
		if strings.HasPrefix(p, "*") || own {
			out = append(out, fmt.Sprintf("reply.to %q lets any publisher send the gateway's replies to queues it picks "+
				"(the agent's own queue among them: %v); list the reply queues' names or a prefix of theirs", p, own))
		}
	}
	return out
}

// rabbitMQ4Warnings flag settings that work on the RabbitMQ 3.x this
// driver is tested on but that RabbitMQ 4 refuses or treats otherwise,
// so that an upgrade of the broker does not stop the agent by surprise.
func rabbitMQ4Warnings(cfg config.Config) []string {
	var out []string
	if cfg.Topology == config.TopologyDeclare {
		if !cfg.Durable && !cfg.Exclusive {
			out = append(out, `durable false and exclusive false (the defaults) declare a queue that is neither durable nor exclusive: `+
				`RabbitMQ 4.3 and newer refuse it (its deprecated feature transient_nonexcl_queues is denied by default; error 541) `+
				`and the agent cannot start there; set "durable": true (or "exclusive": true, for a queue of one connection)`)
		}
		if mode, ok := cfg.QueueArgs["x-queue-mode"]; ok {
			out = append(out, fmt.Sprintf("queue_args.x-queue-mode %v: RabbitMQ 4.3 and newer reject this argument "+
				"(every classic queue stores its messages on disk the lazy way since 3.12); remove it", mode))
		}
		if _, ok := cfg.QueueArgs["x-queue-master-locator"]; ok {
			out = append(out, "queue_args.x-queue-master-locator: RabbitMQ 4.3 and newer refuse it (its deprecated feature "+
				"queue_master_locator is denied by default; error 541) and the agent cannot start there; remove it")
		}
		if v, ok := cfg.QueueArgs["x-queue-version"]; ok && fmt.Sprint(v) == "1" {
			out = append(out, "queue_args.x-queue-version 1: RabbitMQ 4.3 and newer reject version 1 of the classic queue; "+
				"remove it (version 2 is the default since 3.12)")
		}
	}
	if _, limited := cfg.QueueArgs["x-delivery-limit"]; cfg.QueueArgs["x-queue-type"] == "quorum" && !limited {
		out = append(out, "a quorum queue without queue_args.x-delivery-limit: RabbitMQ 4.0 and newer give it a limit of 20 "+
			"(3.x has none), so a message that goes back to the queue 20 times (handed back at shutdown, returned by a lost "+
			"connection) is then dropped, or dead-lettered to the queue's dead-letter exchange, the one nack_discard and "+
			"dead_letter.broker send failures to; the driver's own retries are new copies and do not count; "+
			"set x-delivery-limit to the bound you want on every version")
	}
	if fmt.Sprint(cfg.QueueArgs["x-delivery-limit"]) == "0" && cfg.QueueArgs["x-queue-type"] == "quorum" {
		out = append(out, "queue_args.x-delivery-limit 0: the quorum queue drops a message (or dead-letters it to the queue's "+
			"dead-letter exchange) the first time it goes back to the queue, so every message in flight when a connection "+
			"is lost or the gateway stops is gone; set 1 or more")
	}
	return out
}

// needsTopic tells whether the binding needs consumer.topic: not when
// routing_keys replace it, nor when the driver binds nothing.
func needsTopic(cfg config.Config) bool {
	return len(cfg.RoutingKeys) == 0 && cfg.ExchangeType != "fanout" && cfg.Topology == config.TopologyDeclare
}

func them(list []string) string {
	if len(list) == 1 {
		return "it"
	}
	return "them"
}

// blockErrors names the agent and the path of each problem of its
// driver blocks, in the block the user wrote the field in, e.g.
// extra_config.async/amqp.prefetch_count or
// extra_config.github.com/krakend-contrib/async-amqp.retry.delay.
func blockErrors(agent *luraconfig.AsyncAgent, cfg config.Config, err error) error {
	if errors.Is(err, config.ErrNoConfig) {
		return fmt.Errorf("agent %q: %w", agent.Name, err)
	}
	var errs []error
	for _, e := range config.Errors(err) {
		var field *config.FieldError
		if !errors.As(e, &field) {
			errs = append(errs, fmt.Errorf("agent %q: %s: %w", agent.Name, config.Path(cfg.KeyOf("")), e))
			continue
		}
		key := field.Key
		if key == "" {
			key = cfg.KeyOf(field.Field)
		}
		if field.Field == "" {
			errs = append(errs, fmt.Errorf("agent %q: %s: %w", agent.Name, config.Path(key), e))
			continue
		}
		errs = append(errs, fmt.Errorf("agent %q: %s.%w", agent.Name, config.Path(key), e))
	}
	return errors.Join(errs...)
}

// NewChecker returns a validation of a whole configuration for KrakenD's
// `check` command. It has the type of krakend-cobra's CustomValidationFunc
// (v2.8.0 and later), which that command runs on the parsed file: with
//
//	cmd.CustomValidationFunc = asyncamqp.NewChecker(os.Stderr)
//
// in KrakenD CE's main.go, `krakend check` fails on an invalid agent
// instead of printing "Syntax OK!". It returns one error per problem,
// each naming the agent and the field, for every agent that has a block
// for this driver; agents of other drivers are left alone. As that hook
// returns errors only, the warnings (Warnings) are written to w, one line
// each; w may be nil.
func NewChecker(w io.Writer) func(luraconfig.ServiceConfig) []error {
	return func(cfg luraconfig.ServiceConfig) []error {
		var errs []error
		for i, agent := range cfg.AsyncAgents {
			if agent == nil || !hasBlock(agent.ExtraConfig) {
				continue
			}
			named := *agent // Lura names unnamed agents only when it starts them
			if named.Name == "" {
				named.Name = fmt.Sprintf("AsyncAgent-%02d", i)
			}
			err := Check(&named)
			for _, e := range config.Errors(err) {
				errs = append(errs, errors.New(driver.OneLine(e)))
			}
			if err == nil && w != nil {
				for _, line := range Warnings(&named) {
					fmt.Fprintln(w, "WARNING:", line)
				}
			}
		}
		return errs
	}
}

// hasBlock tells whether an agent has any block this driver reads.
func hasBlock(extra luraconfig.ExtraConfig) bool {
	for _, key := range []string{Namespace, LegacyNamespace, ExtensionNamespace} {
		if _, ok := extra[key]; ok {
			return true
		}
	}
	return false
}
