package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"sort"
	"strings"
)

// setter stores one decoded JSON value into the Config.
type setter func(*Config, interface{}) error

// fields maps each key of the block to its setter: the one place where the
// JSON names meet the struct.
var fields = map[string]setter{
	"host":           str(func(c *Config) *string { return &c.Host }),
	"name":           str(func(c *Config) *string { return &c.Queue }),
	"exchange":       str(func(c *Config) *string { return &c.Exchange }),
	"durable":        boolean(func(c *Config) *bool { return &c.Durable }),
	"delete":         boolean(func(c *Config) *bool { return &c.Delete }),
	"exclusive":      boolean(func(c *Config) *bool { return &c.Exclusive }),
	"no_wait":        boolean(func(c *Config) *bool { return &c.NoWait }),
	"auto_ack":       boolean(func(c *Config) *bool { return &c.AutoAck }),
	"no_local":       boolean(func(c *Config) *bool { return &c.NoLocal }),
	"nack_discard":   boolean(func(c *Config) *bool { return &c.NackDiscard }),
	"prefetch_count": integer(math.MaxUint16, func(c *Config) *int { return &c.PrefetchCount }),
	"prefetch_size":  integer(math.MaxUint32, func(c *Config) *int { return &c.PrefetchSize }),
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
	return func(c *Config, v interface{}) error {
		n, ok := toInt(v)
		if !ok {
			return fmt.Errorf("must be a whole number, got %s", typeName(v))
		}
		if n < 0 || n > max {
			return fmt.Errorf("must be between 0 and %d, got %d", max, n)
		}
		*field(c) = n
		return nil
	}
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
func suggest(key string) string {
	fold := func(s string) string {
		return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(s))
	}
	for known := range fields {
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
