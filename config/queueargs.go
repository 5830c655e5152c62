package config

import (
	"fmt"
	"slices"
	"sort"
)

// queueArgs reads the queue_args object. Whole JSON numbers become int64,
// which is what RabbitMQ expects for lengths and TTLs; the known
// arguments are checked in checkQueueArgs.
func queueArgs(c *Config, v interface{}) error {
	m, ok := v.(map[string]interface{})
	if !ok {
		return fmt.Errorf("must be an object of queue arguments, got %s", typeName(v))
	}
	out := make(map[string]interface{}, len(m))
	for k, item := range m {
		switch x := item.(type) {
		case string, bool:
			out[k] = x
		case nil, []interface{}, map[string]interface{}:
			return fmt.Errorf("%s: must be a string, a number or a boolean, got %s", k, typeName(item))
		default:
			if n, ok := toInt(x); ok {
				out[k] = int64(n)
				continue
			}
			return fmt.Errorf("%s: must be a whole number, got %s", k, typeName(item))
		}
	}
	c.QueueArgs = out
	return nil
}

// argRule checks one known x-argument.
type argRule func(v interface{}) string

var queueArgRules = map[string]argRule{
	"x-queue-type":                enum("classic", "quorum"),
	"x-message-ttl":               nonNegative,
	"x-expires":                   positive,
	"x-max-length":                nonNegative,
	"x-max-length-bytes":          nonNegative,
	"x-max-priority":              between(1, 255),
	"x-delivery-limit":            deliveryLimit,
	"x-overflow":                  enum("drop-head", "reject-publish", "reject-publish-dlx"),
	"x-dead-letter-exchange":      isString,
	"x-dead-letter-routing-key":   isString,
	"x-dead-letter-strategy":      enum("at-most-once", "at-least-once"),
	"x-single-active-consumer":    isBool,
	"x-queue-mode":                enum("default", "lazy"),
	"x-quorum-initial-group-size": positive,
}

// checkQueueArgs validates the arguments RabbitMQ defines, and the
// combinations a quorum queue refuses, at config time rather than as a
// channel error at run time. Unknown arguments (plugins) pass through.
func (c Config) checkQueueArgs() []error {
	var errs []error
	keys := make([]string, 0, len(c.QueueArgs))
	for k := range c.QueueArgs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if rule, known := queueArgRules[k]; known {
			if reason := rule(c.QueueArgs[k]); reason != "" {
				errs = append(errs, &FieldError{Field: "queue_args." + k, Reason: reason})
			}
		}
	}
	if c.QueueArgs["x-queue-type"] != "quorum" {
		return errs
	}
	quorum := func(field, reason string) {
		errs = append(errs, &FieldError{Field: field, Reason: "a quorum queue " + reason})
	}
	if c.Exclusive {
		quorum("exclusive", "cannot be exclusive")
	}
	if c.Delete {
		quorum("delete", "cannot be auto-delete")
	}
	if !c.Durable {
		quorum("durable", "is always durable: set durable to true")
	}
	if _, set := c.QueueArgs["x-max-priority"]; set {
		quorum("queue_args.x-max-priority", "does not support priorities")
	}
	if c.QueueArgs["x-overflow"] == "reject-publish-dlx" {
		quorum("queue_args.x-overflow", "does not support reject-publish-dlx")
	}
	return errs
}

func enum(allowed ...string) argRule {
	return func(v interface{}) string {
		if s, ok := v.(string); ok && slices.Contains(allowed, s) {
			return ""
		}
		return fmt.Sprintf("must be one of %q, got %s", allowed, quoteOrType(v))
	}
}

func between(least, most int64) argRule {
	return func(v interface{}) string {
		if n, ok := v.(int64); ok && n >= least && n <= most {
			return ""
		}
		return fmt.Sprintf("must be a whole number from %d to %d, got %s", least, most, quoteOrType(v))
	}
}

var (
	nonNegative = between(0, 1<<53)
	positive    = between(1, 1<<53)
)

// deliveryLimit refuses a negative x-delivery-limit: RabbitMQ 4 reads it
// as no limit, but 3.x drops a message at its first return (a lost
// connection, a shutdown), so the same file would lose messages there.
func deliveryLimit(v interface{}) string {
	if reason := nonNegative(v); reason != "" {
		return reason + " (RabbitMQ 4 reads a negative limit as none, but 3.x drops a message the first time it goes back " +
			"to the queue; for no practical limit on every version, set a large one, e.g. 1000000)"
	}
	return ""
}

func isString(v interface{}) string {
	if _, ok := v.(string); ok {
		return ""
	}
	return "must be a string, got " + typeName(v)
}

func isBool(v interface{}) string {
	if _, ok := v.(bool); ok {
		return ""
	}
	return "must be true or false, got " + typeName(v)
}
