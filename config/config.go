// Package config reads and validates the driver blocks of a KrakenD async
// agent: the `async/amqp` block, which holds KrakenD's own fields, and the
// block of the driver's extensions beside it. It knows every field, its
// default and its AMQP meaning, and reports every problem by field name so
// an operator can fix the file in one go. It does no I/O.
package config

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	luraconfig "github.com/luraproject/lura/v2/config"
)

// Namespace is the key of the driver block in an agent's extra_config. It
// holds KrakenD's own fields only (StandardFields), as KrakenD's schema
// requires.
const Namespace = "async/amqp"

// LegacyNamespace is the key KrakenD's own AMQP driver reads; files written
// for it keep working. KrakenD CE renames Namespace to it before agents
// start.
const LegacyNamespace = "github.com/devopsfaith/krakend-amqp/agent"

// ExtensionNamespace is the key of the block, beside Namespace, that holds
// the driver's own fields: every field that is not one of StandardFields.
// It is the module path, as KrakenD's convention for a component's
// namespace is.
const ExtensionNamespace = "github.com/krakend-contrib/async-amqp"

// StandardFields are the fields KrakenD's schema allows in the async/amqp
// block (with keys starting with @, $, _ or #, which both blocks ignore).
var StandardFields = []string{
	"host", "name", "exchange", "durable", "delete", "exclusive", "no_wait",
	"prefetch_count", "prefetch_size", "auto_ack", "no_local", "nack_discard",
}

// Standard tells whether field is one of StandardFields.
func Standard(field string) bool { return slices.Contains(StandardFields, field) }

// Comment tells whether a key is one KrakenD's schema leaves to the user
// (it starts with @, $, _ or #, as in "@comment"): both blocks ignore it.
func Comment(key string) bool { return key != "" && strings.ContainsRune("@$_#", rune(key[0])) }

// DefaultPrefetchCount is applied when prefetch_count is absent, so the
// broker never pushes an unbounded number of deliveries into memory.
const DefaultPrefetchCount = 10

// ErrNoConfig means the agent has no block for this driver.
var ErrNoConfig = errors.New("no async/amqp block in extra_config")

// Config is the driver block of one agent.
type Config struct {
	// Host is the connection URL (amqp:// or amqps://). It holds
	// credentials: log Redacted(Host), never Host.
	Host string
	// Queue is the queue name (field "name").
	Queue    string
	Exchange string
	// Durable applies to the exchange and the queue.
	Durable bool
	// Delete makes the queue and the exchange auto-delete.
	Delete        bool
	Exclusive     bool
	NoWait        bool
	PrefetchCount int
	PrefetchSize  int
	AutoAck       bool
	NoLocal       bool
	// NackDiscard drops failed messages instead of requeueing them.
	NackDiscard bool
	// Retry is how failed messages are retried (field "retry").
	Retry Retry
	// DeadLetter is where messages go when retries are exhausted or the
	// backend refused them (field "dead_letter").
	DeadLetter DeadLetter
	// Reply answers the messages that carry reply_to (field "reply").
	Reply Reply
	// ShutdownTimeout bounds how long in-flight dispatches may run once
	// the agent stops; 0 means the dispatch timeout.
	ShutdownTimeout time.Duration
	// MaxBodyBytes bounds the body of a message the backend is sent; a
	// larger one is dead-lettered undispatched. 0 means no bound.
	MaxBodyBytes int
	// IdempotencyHeader names the request header that carries a key
	// stable across redeliveries and retries of one message; "" sends none.
	IdempotencyHeader string
	// CloudEvents reads a message that is a CloudEvent under the AMQP
	// protocol binding and sends it to the backend under the HTTP
	// binding (field "cloudevents"); off unless set.
	CloudEvents bool
	// BackPressure slows the agent down while the backend answers 429
	// or 503, or times out; on unless set to false.
	BackPressure bool
	// OrderingKey, when set, dispatches the messages that share a key
	// one at a time, in delivery order: "routing_key", "header:<name>" or
	// "property:<name>" (see OrderingProperties).
	OrderingKey string
	// Hosts are more URLs of the same cluster, tried in turn after Host.
	Hosts []string
	// TLS configures amqps:// connections (field "tls").
	TLS TLS
	// QueueArgs are passed to the queue declaration (field "queue_args").
	QueueArgs map[string]interface{}
	// RoutingKeys bind the queue; none means the agent's consumer.topic.
	RoutingKeys []string
	// ExchangeType is topic unless set.
	ExchangeType string
	// Topology says what the driver declares: TopologyDeclare (default),
	// TopologyPassive or TopologyNone.
	Topology string
	// Source says where the fields were read from.
	Source Source
}

// Source is where the fields of a Config were read from.
type Source struct {
	// Key is the extra_config key of the standard block: Namespace or
	// LegacyNamespace ("" is Namespace).
	Key string
	// Misplaced are the extension fields read from the standard block,
	// sorted: the deprecated placement, which KrakenD's schema refuses.
	Misplaced []string
}

// KeyOf returns the extra_config key of the block a field was read from,
// or belongs in when it is absent: the standard block for StandardFields,
// misplaced fields and "" (the block as a whole), ExtensionNamespace for
// the others. field may be a path, e.g. retry.delay or hosts[1].
func (c Config) KeyOf(field string) string {
	top := field
	if i := strings.IndexAny(field, ".["); i >= 0 {
		top = field[:i]
	}
	if top == "" || Standard(top) || slices.Contains(c.Source.Misplaced, top) {
		return c.standardKey()
	}
	return ExtensionNamespace
}

func (c Config) standardKey() string {
	if c.Source.Key == "" {
		return Namespace
	}
	return c.Source.Key
}

// Path names a block in errors and warnings as the user wrote it:
// extra_config.<key>, except for LegacyNamespace, named
// extra_config.async/amqp (github.com/devopsfaith/krakend-amqp/agent):
// KrakenD CE renames async/amqp to the legacy key before agents start.
func Path(key string) string {
	if key == LegacyNamespace {
		return "extra_config." + Namespace + " (" + LegacyNamespace + ")"
	}
	return "extra_config." + key
}

// Topology modes: what the driver declares on the broker.
const (
	// TopologyDeclare declares the exchange and the queue and binds them.
	TopologyDeclare = "declare"
	// TopologyPassive checks that the exchange and the queue exist and
	// declares or binds neither; the driver's own retry and dead-letter
	// queues are still declared.
	TopologyPassive = "passive"
	// TopologyNone declares no exchange, queue or binding: the queue must
	// exist. Retry and dead-letter queues are still declared.
	TopologyNone = "none"
)

// TLS is the client side of an amqps:// connection. The files are read
// when the agent starts.
type TLS struct {
	CAFile             string
	CertFile           string
	KeyFile            string
	ServerName         string
	InsecureSkipVerify bool
}

// Retry is the delayed-retry policy of failed messages.
type Retry struct {
	// MaxAttempts counts dispatches, the first included.
	MaxAttempts int
	Delay       time.Duration
	MaxDelay    time.Duration
	Multiplier  float64
}

// Retry defaults: 1s, 2s, 4s ... capped at one minute, ten attempts.
const (
	DefaultMaxAttempts = 10
	DefaultDelay       = time.Second
	DefaultMaxDelay    = time.Minute
	DefaultMultiplier  = 2.0
)

// DeadLetter says where a message goes once it is given up on. Exactly
// one of Queue, Exchange or Broker may be set; none means "no
// dead-letter": the message is kept and retried at MaxDelay.
type DeadLetter struct {
	// Queue is declared by the driver and fed through the default exchange.
	Queue string
	// Exchange (with RoutingKey, default the message's own) must exist.
	Exchange   string
	RoutingKey string
	// Broker rejects the message without requeue, leaving it to the
	// queue's own x-dead-letter-exchange (policy or argument).
	Broker bool
	// Statuses are backend answers that dead-letter at once, without
	// retries (e.g. 400, 422: the message itself is bad).
	Statuses []int
}

// Enabled tells whether a dead-letter destination is configured.
func (d DeadLetter) Enabled() bool { return d.Queue != "" || d.Exchange != "" || d.Broker }

// FieldError names the field of the block that is wrong and why.
type FieldError struct {
	// Key is the extra_config key of the block the error is about, when
	// the field alone does not tell (see Config.KeyOf); "" otherwise.
	Key string
	// Field is the path of the field in its block; "" for the whole block.
	Field  string
	Reason string
}

func (e *FieldError) Error() string {
	if e.Field == "" {
		return e.Reason
	}
	return e.Field + ": " + e.Reason
}

// FromExtraConfig reads the standard block under Namespace, or under
// LegacyNamespace when the first is absent, and the block under
// ExtensionNamespace when there is one. It returns an error that is
// ErrNoConfig when there is no standard block (the agent is not this
// driver's), and otherwise every problem found, joined.
func FromExtraConfig(extra luraconfig.ExtraConfig) (Config, error) {
	key := Namespace
	raw, ok := extra[Namespace]
	if !ok {
		key = LegacyNamespace
		raw, ok = extra[LegacyNamespace]
	}
	ext, hasExt := extra[ExtensionNamespace]
	if !ok {
		if hasExt {
			return Config{}, fmt.Errorf("%w: %s holds the driver's extensions and needs an %q block beside it",
				ErrNoConfig, Path(ExtensionNamespace), Namespace)
		}
		return Config{}, ErrNoConfig
	}
	return parse(key, raw, ext, hasExt)
}

// Parse reads one driver block holding every field, as decoded from JSON
// (or YAML) by Lura: the standard block of the deprecated placement.
// FromExtraConfig reads both blocks of an agent.
func Parse(raw interface{}) (Config, error) {
	return parse("", raw, nil, false)
}

// parse reads the standard block (under key) and the extension block.
// An extension field may still be in the standard block (Source.Misplaced),
// but not in both.
func parse(key string, raw, rawExt interface{}, hasExt bool) (Config, error) {
	cfg := Config{PrefetchCount: DefaultPrefetchCount, ExchangeType: "topic", Topology: TopologyDeclare, BackPressure: true, Retry: Retry{
		MaxAttempts: DefaultMaxAttempts, Delay: DefaultDelay, MaxDelay: DefaultMaxDelay, Multiplier: DefaultMultiplier,
	}, Source: Source{Key: key}}
	var errs []error
	block, ok := raw.(map[string]interface{})
	if !ok {
		errs = append(errs, &FieldError{Key: key, Reason: "the block must be an object, got " + typeName(raw)})
	}
	ext, ok := rawExt.(map[string]interface{})
	if hasExt && !ok {
		errs = append(errs, &FieldError{Key: ExtensionNamespace, Reason: "the block must be an object, got " + typeName(rawExt)})
	}
	if len(errs) > 0 {
		return cfg, errors.Join(errs...)
	}
	merged := map[string]interface{}{}
	for _, k := range sortedKeys(block) {
		if Comment(k) {
			continue
		}
		if _, known := fields[k]; !known {
			errs = append(errs, &FieldError{Key: key, Field: k, Reason: "unknown field" + suggest(fields, k)})
			continue
		}
		if _, twice := ext[k]; twice && !Standard(k) {
			errs = append(errs, &FieldError{Key: ExtensionNamespace, Field: k, Reason: fmt.Sprintf(
				"also set in %s: set it here only", Path(key))})
			continue
		}
		if !Standard(k) {
			cfg.Source.Misplaced = append(cfg.Source.Misplaced, k)
		}
		merged[k] = block[k]
	}
	for _, k := range sortedKeys(ext) {
		switch _, known := fields[k]; {
		case Comment(k):
		case Standard(k):
			errs = append(errs, &FieldError{Key: ExtensionNamespace, Field: k, Reason: fmt.Sprintf(
				"is one of KrakenD's own fields: it belongs in %s", Path(key))})
		case !known:
			errs = append(errs, &FieldError{Key: ExtensionNamespace, Field: k, Reason: "unknown field" + suggest(fields, k)})
		default:
			if _, twice := block[k]; !twice {
				merged[k] = ext[k]
			}
		}
	}
	bad := map[string]bool{}
	for _, k := range sortedKeys(merged) {
		if err := fields[k](&cfg, merged[k]); err != nil {
			bad[k] = true
			errs = append(errs, pathErrors(k, err)...)
		}
	}
	errs = append(errs, cfg.validate(merged, bad)...)
	return cfg, errors.Join(errs...)
}

// validate checks what no single field can: required fields and the host
// URL. Fields that already failed to parse are not reported twice.
func (c Config) validate(block map[string]interface{}, bad map[string]bool) []error {
	var errs []error
	required := func(field, value string) {
		if !bad[field] && strings.TrimSpace(value) == "" {
			errs = append(errs, &FieldError{Field: field, Reason: "required, and must not be empty"})
		}
	}
	required("host", c.Host)
	required("name", c.Queue)
	required("exchange", c.Exchange)
	if c.Host != "" && !bad["host"] {
		if err := checkHost(c.Host); err != nil {
			errs = append(errs, &FieldError{Field: "host", Reason: err.Error()})
		}
	}
	for i, h := range c.Hosts {
		if err := checkHost(h); err != nil {
			errs = append(errs, &FieldError{Field: fmt.Sprintf("hosts[%d]", i), Reason: err.Error()})
		}
	}
	if _, set := block["tls"]; set && !bad["tls"] && !c.usesTLS() {
		errs = append(errs, &FieldError{Field: "tls", Reason: "applies to amqps:// hosts only"})
	}
	if !bad["queue_args"] {
		errs = append(errs, c.checkQueueArgs()...)
	}
	if !bad["retry"] {
		errs = append(errs, c.Retry.checkDelays()...)
	}
	if c.OrderingKey != "" && c.PrefetchCount == 0 && !c.AutoAck && !bad["prefetch_count"] {
		errs = append(errs, errUnboundedOrdering)
	}
	_, hasRetry := block["retry"]
	_, hasDead := block["dead_letter"]
	if c.NackDiscard && (hasRetry || hasDead) {
		errs = append(errs, &FieldError{Field: "nack_discard", Reason: "cannot be combined with retry or dead_letter: use dead_letter.broker to leave failures to the queue's dead-letter exchange"})
	}
	if c.AutoAck && (hasRetry || hasDead) {
		errs = append(errs, &FieldError{Field: "auto_ack", Reason: "cannot be combined with retry or dead_letter: with auto_ack the broker has forgotten a message before it is dispatched"})
	}
	if !bad["dead_letter"] {
		errs = append(errs, c.DeadLetter.validate()...)
		// consumer.topic, the binding when routing_keys is empty, is
		// the agent's: CheckDeadLetterLoop checks it then.
		if err := c.DeadLetter.CheckLoop(c.Queue, c.Exchange, c.ExchangeType, c.RoutingKeys); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// errUnboundedOrdering refuses ordering_key without a prefetch limit.
var errUnboundedOrdering = &FieldError{Field: "prefetch_count", Reason: "0 (no limit) cannot be combined with ordering_key: " +
	"the messages waiting behind a busy key would pile up in memory without bound; " +
	fmt.Sprintf("set prefetch_count to 1 or more (the default is %d), or remove ordering_key", DefaultPrefetchCount)}

// CheckOrdering checks an ordering key given in code ("" for none) as
// Parse checks ordering_key, and refuses it with no prefetch limit: each
// key's line of waiting messages is bounded only by the prefetch window.
// With auto_ack the broker applies no prefetch at all, so prefetch_count
// changes nothing there.
func CheckOrdering(orderingKey string, prefetchCount int, autoAck bool) error {
	switch {
	case orderingKey == "":
	case !validOrderingKey(orderingKey):
		return &FieldError{Field: "ordering_key", Reason: orderingKeyError(orderingKey).Error()}
	case prefetchCount == 0 && !autoAck:
		return errUnboundedOrdering
	}
	return nil
}

// CheckDeadLetterLoop checks the dead-letter destination against the
// agent's binding: its routing_keys, or topic (the agent's
// consumer.topic) when there are none. Parse checks routing_keys only.
func (c Config) CheckDeadLetterLoop(topic string) error {
	keys := c.RoutingKeys
	if len(keys) == 0 {
		keys = []string{topic}
	}
	return c.DeadLetter.CheckLoop(c.Queue, c.Exchange, c.ExchangeType, keys)
}

// Validate checks a retry policy given in code as Parse checks the retry
// block: the bounds of each field, max_delay not shorter than delay, and
// at most MaxRetryQueues distinct delays. Its errors are FieldErrors
// naming retry.<field>.
func (r Retry) Validate() error {
	var errs []error
	if r.MaxAttempts < 1 || r.MaxAttempts > MaxAttempts {
		errs = append(errs, &FieldError{Field: "retry.max_attempts", Reason: fmt.Sprintf("must be between 1 and %d, got %d", MaxAttempts, r.MaxAttempts)})
	}
	if r.Delay < time.Millisecond {
		errs = append(errs, &FieldError{Field: "retry.delay", Reason: fmt.Sprintf("must be at least 1ms, got %s", r.Delay)})
	}
	if r.MaxDelay < time.Millisecond {
		errs = append(errs, &FieldError{Field: "retry.max_delay", Reason: fmt.Sprintf("must be at least 1ms, got %s", r.MaxDelay)})
	}
	if !(r.Multiplier >= 1 && r.Multiplier <= MaxMultiplier) { // NaN too
		errs = append(errs, &FieldError{Field: "retry.multiplier", Reason: fmt.Sprintf("must be between 1 and %d, got %v", MaxMultiplier, r.Multiplier)})
	}
	if len(errs) == 0 {
		errs = r.checkDelays()
	}
	return errors.Join(errs...)
}

// Bounds of the retry fields.
const (
	MaxAttempts   = 1_000_000
	MaxMultiplier = 100
)

// checkDelays checks what the retry fields give together.
func (r Retry) checkDelays() []error {
	if r.MaxDelay < r.Delay {
		return []error{&FieldError{Field: "retry.max_delay", Reason: fmt.Sprintf(
			"must not be shorter than retry.delay (%s), got %s", r.Delay, r.MaxDelay)}}
	}
	if n := len(r.RetryDelays()); n > MaxRetryQueues {
		return []error{&FieldError{Field: "retry", Reason: fmt.Sprintf(
			"delay, multiplier and max_delay give more than %d distinct delays, one retry queue each: raise the multiplier", MaxRetryQueues)}}
	}
	return nil
}

// Validate checks a dead-letter destination given in code as Parse
// checks the dead_letter block.
func (d DeadLetter) Validate() error {
	errs := d.validate()
	for _, s := range d.Statuses {
		if s < 300 || s > 599 {
			errs = append(errs, &FieldError{Field: "dead_letter.statuses", Reason: fmt.Sprintf("must list HTTP statuses from 300 to 599, got %d", s)})
			break
		}
	}
	return errors.Join(errs...)
}

// CheckLoop refuses a dead-letter destination that routes back to the
// work queue: the agent's own queue, or the agent's own exchange with a
// routing key one of its binding keys matches. Without
// dead_letter.routing_key a dead letter keeps the message's own key,
// which matched a binding to reach the queue; a fanout exchange routes
// every key. Every dead letter would then come back to be dispatched and
// fail again, forever. exchangeType "" is topic.
func (d DeadLetter) CheckLoop(queue, exchange, exchangeType string, bindingKeys []string) error {
	const forever = "every dead letter would come back to the work queue, and fail and be dead-lettered there again, forever"
	if d.Queue != "" && d.Queue == queue {
		return &FieldError{Field: "dead_letter.queue", Reason: fmt.Sprintf(
			"%q is the agent's own queue: %s; name another queue", d.Queue, forever)}
	}
	if d.Exchange == "" || d.Exchange != exchange {
		return nil
	}
	switch {
	case exchangeType == "fanout":
		return &FieldError{Field: "dead_letter.exchange", Reason: fmt.Sprintf(
			"%q is the agent's own fanout exchange, which routes every message to the work queue: %s; use another exchange", d.Exchange, forever)}
	case d.RoutingKey == "":
		return &FieldError{Field: "dead_letter.exchange", Reason: fmt.Sprintf(
			"%q is the agent's own exchange and, with no dead_letter.routing_key, a dead letter keeps the routing key "+
				"it was published with, which the queue's binding matches: %s; use another exchange, or set a "+
				"dead_letter.routing_key that no binding key of the agent (%q) matches", d.Exchange, forever, bindingKeys)}
	}
	for _, key := range bindingKeys {
		if routes(exchangeType, key, d.RoutingKey) {
			return &FieldError{Field: "dead_letter.routing_key", Reason: fmt.Sprintf(
				"%q on the agent's own exchange %q matches the binding key %q: %s; use another exchange, or a routing key "+
					"that no binding key of the agent (%q) matches", d.RoutingKey, d.Exchange, key, forever, bindingKeys)}
		}
	}
	return nil
}

func (d DeadLetter) validate() []error {
	set := 0
	for _, on := range []bool{d.Queue != "", d.Exchange != "", d.Broker} {
		if on {
			set++
		}
	}
	var errs []error
	if set > 1 {
		errs = append(errs, &FieldError{Field: "dead_letter", Reason: "set only one of queue, exchange and broker"})
	}
	if d.RoutingKey != "" && d.Exchange == "" {
		errs = append(errs, &FieldError{Field: "dead_letter.routing_key", Reason: "only applies with dead_letter.exchange"})
	}
	if len(d.Statuses) > 0 && !d.Enabled() {
		errs = append(errs, &FieldError{Field: "dead_letter.statuses", Reason: "needs a destination: dead_letter.queue, exchange or broker"})
	}
	return errs
}

// RetryDelays lists the distinct delays of the retry policy, shortest
// first: Delay, Delay*Multiplier, ... capped at MaxDelay, in whole
// milliseconds (each one is a retry queue).
func (r Retry) RetryDelays() []time.Duration {
	var out []time.Duration
	d := float64(r.Delay)
	for {
		capped := r.MaxDelay // also when d overflows a Duration
		if d < float64(r.MaxDelay) {
			capped = time.Duration(d)
		}
		step := capped.Round(time.Millisecond)
		if len(out) == 0 || step != out[len(out)-1] {
			out = append(out, step)
		}
		// The cap is reached on the unrounded delay: a max_delay that
		// rounds down (1.4ms) would otherwise never be reached. A delay
		// of 0 or less would never grow: Validate refuses it, and it
		// ends the list here rather than loop.
		if capped >= r.MaxDelay || !(r.Multiplier > 1) || d <= 0 || len(out) > MaxRetryQueues {
			return out
		}
		d *= r.Multiplier
	}
}

// DelayFor is the wait before the retry that follows failed attempt n;
// n below 1 counts as 1.
func (r Retry) DelayFor(n int) time.Duration {
	delays := r.RetryDelays()
	return delays[min(max(n, 1), len(delays))-1]
}

// AtLeast is the shortest retry delay of the policy that is at least d,
// or the longest when none is: the retry queue that honours a backend's
// Retry-After of d, capped by max_delay.
func (r Retry) AtLeast(d time.Duration) time.Duration {
	delays := r.RetryDelays()
	for _, delay := range delays {
		if delay >= d {
			return delay
		}
	}
	return delays[len(delays)-1]
}

// MaxRetryQueues bounds how many retry queues one policy may need.
const MaxRetryQueues = 20

// URLs lists the broker URLs in the order they are tried.
func (c Config) URLs() []string { return append([]string{c.Host}, c.Hosts...) }

func (c Config) usesTLS() bool {
	for _, u := range c.URLs() {
		if strings.HasPrefix(strings.ToLower(u), "amqps://") {
			return true
		}
	}
	return false
}

// Errors splits an error joined with errors.Join, at any depth, into its
// parts; a nil error has none. Parse, Check and the gateway report each
// part on a line of its own.
func Errors(err error) []error {
	if err == nil {
		return nil
	}
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return []error{err}
	}
	var errs []error
	for _, e := range joined.Unwrap() {
		errs = append(errs, Errors(e)...)
	}
	return errs
}
