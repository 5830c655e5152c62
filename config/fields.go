package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// setter stores one decoded JSON value into the Config.
type setter func(*Config, interface{}) error

// fields maps each key of the block to its setter: the one place where the
// JSON names meet the struct.
var fields = map[string]setter{
	"host":               str(func(c *Config) *string { return &c.Host }),
	"name":               str(func(c *Config) *string { return &c.Queue }),
	"exchange":           str(func(c *Config) *string { return &c.Exchange }),
	"durable":            boolean(func(c *Config) *bool { return &c.Durable }),
	"delete":             boolean(func(c *Config) *bool { return &c.Delete }),
	"exclusive":          boolean(func(c *Config) *bool { return &c.Exclusive }),
	"no_wait":            boolean(func(c *Config) *bool { return &c.NoWait }),
	"auto_ack":           boolean(func(c *Config) *bool { return &c.AutoAck }),
	"no_local":           boolean(func(c *Config) *bool { return &c.NoLocal }),
	"nack_discard":       boolean(func(c *Config) *bool { return &c.NackDiscard }),
	"prefetch_count":     integer(math.MaxUint16, func(c *Config) *int { return &c.PrefetchCount }),
	"prefetch_size":      integer(math.MaxUint32, func(c *Config) *int { return &c.PrefetchSize }),
	"shutdown_timeout":   duration(0, func(c *Config) *time.Duration { return &c.ShutdownTimeout }),
	"max_body_bytes":     integer(math.MaxInt32, func(c *Config) *int { return &c.MaxBodyBytes }),
	"idempotency_header": headerName(func(c *Config) *string { return &c.IdempotencyHeader }),
	"back_pressure":      boolean(func(c *Config) *bool { return &c.BackPressure }),
	"cloudevents":        boolean(func(c *Config) *bool { return &c.CloudEvents }),
	"ordering_key":       orderingKey,
	"retry":              object("retry", retryFields),
	"dead_letter":        object("dead_letter", deadLetterFields),
	"reply":              reply,
	"hosts":              stringList(false, func(c *Config) *[]string { return &c.Hosts }),
	"tls":                object("tls", tlsFields),
	"queue_args":         queueArgs,
	"routing_keys":       stringList(true, func(c *Config) *[]string { return &c.RoutingKeys }),
	"exchange_type":      oneOf([]string{"topic", "direct", "fanout"}, func(c *Config) *string { return &c.ExchangeType }),
	"topology":           oneOf([]string{TopologyDeclare, TopologyPassive, TopologyNone}, func(c *Config) *string { return &c.Topology }),
}

var tlsFields = map[string]setter{
	"ca_file":              str(func(c *Config) *string { return &c.TLS.CAFile }),
	"cert_file":            str(func(c *Config) *string { return &c.TLS.CertFile }),
	"key_file":             str(func(c *Config) *string { return &c.TLS.KeyFile }),
	"server_name":          str(func(c *Config) *string { return &c.TLS.ServerName }),
	"insecure_skip_verify": boolean(func(c *Config) *bool { return &c.TLS.InsecureSkipVerify }),
}

// stringList reads a list of strings; with allowEmpty false, no item
// may be blank.
func stringList(allowEmpty bool, field func(*Config) *[]string) setter {
	return func(c *Config, v interface{}) error {
		list, ok := v.([]interface{})
		if !ok {
			return fmt.Errorf("must be a list of strings, got %s", typeName(v))
		}
		out := make([]string, 0, len(list))
		for i, item := range list {
			s, ok := item.(string)
			if !ok {
				return fmt.Errorf("item %d must be a string, got %s", i, typeName(item))
			}
			if !allowEmpty && strings.TrimSpace(s) == "" {
				return fmt.Errorf("item %d must not be empty", i)
			}
			out = append(out, s)
		}
		*field(c) = out
		return nil
	}
}

func oneOf(allowed []string, field func(*Config) *string) setter {
	return func(c *Config, v interface{}) error {
		s, ok := v.(string)
		if !ok || !slices.Contains(allowed, s) {
			return fmt.Errorf("must be one of %q, got %s", allowed, quoteOrType(v))
		}
		*field(c) = s
		return nil
	}
}

func quoteOrType(v interface{}) string {
	if s, ok := v.(string); ok {
		return fmt.Sprintf("%q", s)
	}
	return typeName(v)
}

var retryFields = map[string]setter{
	"max_attempts": bounded(1, MaxAttempts, func(c *Config) *int { return &c.Retry.MaxAttempts }),
	"delay":        duration(time.Millisecond, func(c *Config) *time.Duration { return &c.Retry.Delay }),
	"max_delay":    duration(time.Millisecond, func(c *Config) *time.Duration { return &c.Retry.MaxDelay }),
	"multiplier":   number(1, MaxMultiplier, func(c *Config) *float64 { return &c.Retry.Multiplier }),
}

var deadLetterFields = map[string]setter{
	"queue":       str(func(c *Config) *string { return &c.DeadLetter.Queue }),
	"exchange":    str(func(c *Config) *string { return &c.DeadLetter.Exchange }),
	"routing_key": str(func(c *Config) *string { return &c.DeadLetter.RoutingKey }),
	"broker":      boolean(func(c *Config) *bool { return &c.DeadLetter.Broker }),
	"statuses":    statuses,
}

// object reads a nested block with its own field table; its errors name
// the full path, e.g. retry.delay.
func object(name string, table map[string]setter) setter {
	return func(c *Config, v interface{}) error {
		m, ok := v.(map[string]interface{})
		if !ok {
			return fmt.Errorf("must be an object, got %s", typeName(v))
		}
		var errs []error
		for _, k := range sortedKeys(m) {
			path := name + "." + k
			set, known := table[k]
			if !known {
				errs = append(errs, &FieldError{Field: path, Reason: "unknown field" + suggest(table, k)})
				continue
			}
			if err := set(c, m[k]); err != nil {
				errs = append(errs, &FieldError{Field: path, Reason: err.Error()})
			}
		}
		return errors.Join(errs...)
	}
}

// pathErrors names key on every error of a setter, unless it already
// carries its own path (nested objects).
func pathErrors(key string, err error) []error {
	var out []error
	for _, e := range Errors(err) {
		if _, ok := e.(*FieldError); ok {
			out = append(out, e)
			continue
		}
		out = append(out, &FieldError{Field: key, Reason: e.Error()})
	}
	return out
}

func duration(least time.Duration, field func(*Config) *time.Duration) setter {
	return func(c *Config, v interface{}) error {
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("must be a duration such as \"1s\" or \"500ms\", got %s", typeName(v))
		}
		d, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("must be a duration such as \"1s\" or \"500ms\", got %q", s)
		}
		if d < least {
			return fmt.Errorf("must be at least %s, got %s", least, d)
		}
		*field(c) = d
		return nil
	}
}

func bounded(least, most int, field func(*Config) *int) setter {
	return func(c *Config, v interface{}) error {
		n, ok := toInt(v)
		if !ok {
			return fmt.Errorf("must be a whole number, got %s", typeName(v))
		}
		if n < least || n > most {
			return fmt.Errorf("must be between %d and %d, got %d", least, most, n)
		}
		*field(c) = n
		return nil
	}
}

func number(least, most float64, field func(*Config) *float64) setter {
	return func(c *Config, v interface{}) error {
		var f float64
		switch n := v.(type) {
		case float64:
			f = n
		case int:
			f = float64(n)
		case int64:
			f = float64(n)
		case json.Number:
			var err error
			if f, err = n.Float64(); err != nil {
				return fmt.Errorf("must be a number, got %q", n)
			}
		default:
			return fmt.Errorf("must be a number, got %s", typeName(v))
		}
		if f < least || f > most || math.IsNaN(f) {
			return fmt.Errorf("must be between %v and %v, got %v", least, most, f)
		}
		*field(c) = f
		return nil
	}
}

func statuses(c *Config, v interface{}) error {
	list, ok := v.([]interface{})
	if !ok {
		return fmt.Errorf("must be a list of HTTP status codes, got %s", typeName(v))
	}
	c.DeadLetter.Statuses = c.DeadLetter.Statuses[:0]
	for _, item := range list {
		n, ok := toInt(item)
		if !ok || n < 300 || n > 599 {
			return fmt.Errorf("must list HTTP statuses from 300 to 599, got %s", typeName(item))
		}
		c.DeadLetter.Statuses = append(c.DeadLetter.Statuses, n)
	}
	return nil
}

func str(field func(*Config) *string) setter {
	return func(c *Config, v interface{}) error {
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("must be a string, got %s", typeName(v))
		}
		*field(c) = s
		return nil
	}
}

// headerName reads an HTTP header name: a token, as net/http requires.
func headerName(field func(*Config) *string) setter {
	return func(c *Config, v interface{}) error {
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("must be an HTTP header name such as \"Idempotency-Key\", got %s", typeName(v))
		}
		if !httpguts.ValidHeaderFieldName(s) {
			return fmt.Errorf("must be an HTTP header name (letters, digits and !#$%%&'*+-.^_`|~), got %q", s)
		}
		*field(c) = s
		return nil
	}
}

// OrderingProperties are the message properties an ordering_key may
// name as "property:<name>".
var OrderingProperties = []string{"message_id", "correlation_id", "user_id", "app_id", "type", "reply_to"}

func orderingKey(c *Config, v interface{}) error {
	s, _ := v.(string)
	if !validOrderingKey(s) {
		return orderingKeyError(v)
	}
	c.OrderingKey = s
	return nil
}

func validOrderingKey(s string) bool {
	kind, name, _ := strings.Cut(s, ":")
	return s == "routing_key" || kind == "header" && name != "" || kind == "property" && slices.Contains(OrderingProperties, name)
}

func orderingKeyError(v interface{}) error {
	return fmt.Errorf("must be \"routing_key\", \"header:<name>\" or \"property:<name>\" with a name among %q, got %s",
		OrderingProperties, quoteOrType(v))
}

func boolean(field func(*Config) *bool) setter {
	return func(c *Config, v interface{}) error {
		b, ok := v.(bool)
		if !ok {
			return fmt.Errorf("must be true or false, got %s", typeName(v))
		}
		*field(c) = b
		return nil
	}
}

func integer(max int, field func(*Config) *int) setter {
	return bounded(0, max, field)
}

// toInt accepts the number types Lura's parsers produce (JSON gives
// float64, YAML and code give ints), but only whole values.
func toInt(v interface{}) (int, bool) {
	switch n := v.(type) {
	case int:
		return n, true
	case int64:
		return int(n), true
	case uint64:
		if n > math.MaxInt64 {
			return 0, false
		}
		return int(n), true
	case float64:
		return toIntFloat(n, true)
	case json.Number:
		if i, err := n.Int64(); err == nil {
			return int(i), true
		}
		f, err := n.Float64()
		return toIntFloat(f, err == nil)
	}
	return 0, false
}

func toIntFloat(n float64, ok bool) (int, bool) {
	if !ok || n != math.Trunc(n) || math.IsInf(n, 0) || math.Abs(n) > 1<<53 {
		return 0, false
	}
	return int(n), true
}

func typeName(v interface{}) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case int, int64, uint64, float64, json.Number:
		return fmt.Sprintf("the number %v", v)
	case []interface{}:
		return "a list"
	case map[string]interface{}:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}

func sortedKeys(m map[string]interface{}) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// suggest names a known field that differs from key only in case, dashes
// or underscores, the usual typos.
func suggest(table map[string]setter, key string) string {
	fold := func(s string) string {
		return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(s))
	}
	for known := range table {
		if fold(known) == fold(key) {
			return fmt.Sprintf(" (did you mean %q?)", known)
		}
	}
	return ""
}

// checkHost validates the connection URL without ever echoing it: it may
// hold a password.
func checkHost(host string) error {
	if strings.ContainsAny(host, " \t\r\n") {
		return errors.New("must not contain white space")
	}
	u, err := url.Parse(host)
	if err != nil {
		// url.Parse's reason may quote the password (a '/' in it ends
		// the host early and the rest reads as a port): never echo it.
		return errors.New("is not a valid URL: expected amqp://user:password@host:5672/vhost, " +
			"with reserved characters (/ ? # @ : %) in the user name and password percent-encoded")
	}
	if u.Scheme != "amqp" && u.Scheme != "amqps" {
		return fmt.Errorf("must start with amqp:// or amqps://, got scheme %q", u.Scheme)
	}
	if u.Hostname() == "" {
		return errors.New("has no host name: expected amqp://user:password@host:5672/vhost")
	}
	if p := u.Port(); p != "" {
		if n, ok := toInt(json.Number(p)); !ok || n < 1 || n > math.MaxUint16 {
			return fmt.Errorf("has an invalid port %q", p)
		}
	}
	return nil
}

// Redacted returns the URL with its password replaced, fit for logs and
// errors. An unparsable URL yields a placeholder, never the input.
func Redacted(host string) string {
	u, err := url.Parse(host)
	if err != nil || u.Scheme == "" || u.Opaque != "" || u.Host == "" {
		return "<invalid amqp url>"
	}
	if u.User != nil {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
	}
	u.RawQuery = ""
	return u.String()
}
