package config

import (
	"fmt"
	"slices"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// Reply makes the agent answer each message that carries reply_to with
// the backend's answer (field "reply"): RabbitMQ's request and reply
// pattern. It is off unless the block has a reply object.
type Reply struct {
	// Enabled is set by the presence of the reply object.
	Enabled bool
	// To are the reply_to names the agent answers, each a pattern where
	// "*" stands for any text. A reply_to that matches none gets no
	// reply: reply_to is the publisher's choice, and the reply goes out
	// with the gateway's credentials.
	To []string
	// Headers are the backend answer's headers copied into the reply
	// (encoding no-op only: Lura keeps no headers otherwise).
	Headers []string
	// MaxBodyBytes bounds the body of a reply; a larger answer is
	// replied to with an error and no body.
	MaxBodyBytes int
	// Errors sends an error reply when the agent gives up on a message
	// (dead letter, discard): the caller need not wait for its timeout.
	Errors bool
}

// Defaults of a reply object.
const (
	DefaultReplyMaxBodyBytes = 1 << 20
	// MaxReplyBodyBytes is RabbitMQ 4's default max_message_size.
	MaxReplyBodyBytes = 16 << 20
)

// DefaultReplyTo are the reply_to names answered by default: RabbitMQ's
// direct reply-to (the broker rewrites "amq.rabbitmq.reply-to" into one of
// these on delivery) and the server-named queues RPC clients declare.
var DefaultReplyTo = []string{"amq.rabbitmq.reply-to.*", "amq.gen-*"}

var replyFields = map[string]setter{
	"to":             stringList(false, func(c *Config) *[]string { return &c.Reply.To }),
	"headers":        headerNames(func(c *Config) *[]string { return &c.Reply.Headers }),
	"max_body_bytes": bounded(0, MaxReplyBodyBytes, func(c *Config) *int { return &c.Reply.MaxBodyBytes }),
	"errors":         boolean(func(c *Config) *bool { return &c.Reply.Errors }),
}

// reply reads the reply object over its defaults.
func reply(c *Config, v interface{}) error {
	c.Reply = Reply{Enabled: true, To: slices.Clone(DefaultReplyTo), MaxBodyBytes: DefaultReplyMaxBodyBytes, Errors: true}
	return object("reply", replyFields)(c, v)
}

// headerNames reads a list of HTTP header names.
func headerNames(field func(*Config) *[]string) setter {
	return func(c *Config, v interface{}) error {
		var names []string
		if err := stringList(false, func(*Config) *[]string { return &names })(c, v); err != nil {
			return err
		}
		for i, n := range names {
			if !httpguts.ValidHeaderFieldName(n) {
				return fmt.Errorf("item %d must be an HTTP header name, got %q", i, n)
			}
		}
		*field(c) = names
		return nil
	}
}

// Answers tells whether a reply_to is one of the names the agent answers.
func (r Reply) Answers(replyTo string) bool {
	if !r.Enabled || replyTo == "" {
		return false
	}
	for _, p := range r.To {
		if match(p, replyTo) {
			return true
		}
	}
	return false
}

// match reports whether s matches pattern, where "*" stands for any text
// (none included) and every other character for itself.
func match(pattern, s string) bool {
	parts := strings.Split(pattern, "*")
	if len(parts) == 1 {
		return pattern == s
	}
	if !strings.HasPrefix(s, parts[0]) {
		return false
	}
	s = s[len(parts[0]):]
	last := parts[len(parts)-1]
	for _, p := range parts[1 : len(parts)-1] {
		i := strings.Index(s, p)
		if i < 0 {
			return false
		}
		s = s[i+len(p):]
	}
	return len(s) >= len(last) && strings.HasSuffix(s, last)
}
