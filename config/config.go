// Package config reads and validates the `async/amqp` block of a KrakenD
// async agent: it knows every field, its default and its AMQP meaning, and
// reports every problem by field name so an operator can fix the file in
// one go. It does no I/O.
package config

import (
	"errors"
	"fmt"
	"strings"

	luraconfig "github.com/luraproject/lura/v2/config"
)

// Namespace is the key of the driver block in an agent's extra_config.
const Namespace = "async/amqp"

// LegacyNamespace is the key KrakenD's own AMQP driver reads; files written
// for it keep working.
const LegacyNamespace = "github.com/devopsfaith/krakend-amqp/agent"

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
}

// FieldError names the field of the block that is wrong and why.
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Reason }

// FromExtraConfig reads the block under Namespace, or under LegacyNamespace
// when the first is absent. It returns ErrNoConfig when neither is there,
// and otherwise every problem found, joined.
func FromExtraConfig(extra luraconfig.ExtraConfig) (Config, error) {
	raw, ok := extra[Namespace]
	if !ok {
		raw, ok = extra[LegacyNamespace]
	}
	if !ok {
		return Config{}, ErrNoConfig
	}
	return Parse(raw)
}

// Parse reads one driver block, as decoded from JSON (or YAML) by Lura.
func Parse(raw interface{}) (Config, error) {
	block, ok := raw.(map[string]interface{})
	if !ok {
		return Config{}, fmt.Errorf("the block must be an object, got %s", typeName(raw))
	}
	cfg := Config{PrefetchCount: DefaultPrefetchCount}
	var errs []error
	bad := map[string]bool{}
	for _, key := range sortedKeys(block) {
		set, known := fields[key]
		if !known {
			errs = append(errs, &FieldError{Field: key, Reason: "unknown field" + suggest(key)})
			continue
		}
		if err := set(&cfg, block[key]); err != nil {
			bad[key] = true
			errs = append(errs, &FieldError{Field: key, Reason: err.Error()})
		}
	}
	errs = append(errs, cfg.validate(bad)...)
	return cfg, errors.Join(errs...)
}

// validate checks what no single field can: required fields and the host
// URL. Fields that already failed to parse are not reported twice.
func (c Config) validate(bad map[string]bool) []error {
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
	return errs
}
