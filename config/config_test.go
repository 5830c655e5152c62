package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	luraconfig "github.com/luraproject/lura/v2/config"
)

// defaultRetry is the retry policy of a block that sets none.
var defaultRetry = Retry{MaxAttempts: 10, Delay: time.Second, MaxDelay: time.Minute, Multiplier: 2}

// validBlock is the smallest valid driver block, as Lura's JSON parser
// hands it over.
func validBlock() map[string]interface{} {
	return map[string]interface{}{
		"host":     "amqp://guest:guest@localhost:5672/",
		"name":     "orders-queue",
		"exchange": "orders",
	}
}

// with returns validBlock with some keys replaced; a nil value removes the
// key (use null{} to send an explicit JSON null).
func with(over map[string]interface{}) map[string]interface{} {
	b := validBlock()
	for k, v := range over {
		if v == nil {
			delete(b, k)
			continue
		}
		if _, isNull := v.(null); isNull {
			b[k] = nil
			continue
		}
		b[k] = v
	}
	return b
}

type null struct{}

// fieldErrors flattens a (possibly joined) error into its FieldErrors.
func fieldErrors(err error) []*FieldError {
	if err == nil {
		return nil
	}
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		var out []*FieldError
		for _, e := range joined.Unwrap() {
			out = append(out, fieldErrors(e)...)
		}
		return out
	}
	var fe *FieldError
	if errors.As(err, &fe) {
		return []*FieldError{fe}
	}
	return nil
}

func fieldNames(errs []*FieldError) []string {
	names := make([]string, len(errs))
	for i, e := range errs {
		names[i] = e.Field
	}
	return names
}

// expect runs check and reports its failures. A case marked with a known
// bug must still fail (it is then skipped, naming the bug), so the mark has
// to go as soon as the bug is fixed.
func expect(t *testing.T, knownBug string, check func(fail func(format string, args ...interface{}))) {
	t.Helper()
	var failures []string
	check(func(format string, args ...interface{}) {
		failures = append(failures, fmt.Sprintf(format, args...))
	})
	switch {
	case knownBug == "":
		for _, f := range failures {
			t.Error(f)
		}
	case len(failures) == 0:
		t.Errorf("known bug %q no longer reproduces: remove the mark from this case", knownBug)
	default:
		t.Skipf("KNOWN BUG, not fixed yet: %s; got: %s", knownBug, strings.Join(failures, "; "))
	}
}

func TestParseFullBlock(t *testing.T) {
	want := Config{
		Host:          "amqps://user:pass@rabbit.example.com:5671/vhost",
		Queue:         "orders-queue",
		Exchange:      "orders",
		Durable:       true,
		Delete:        true,
		Exclusive:     true,
		NoWait:        true,
		PrefetchCount: 25,
		PrefetchSize:  4096,
		AutoAck:       true,
		NoLocal:       true,
		NackDiscard:   true,
		Retry:         defaultRetry,
		ExchangeType:  "topic",
		Topology:      TopologyDeclare,
		BackPressure:  true,
	}
	block := func(count, size interface{}) map[string]interface{} {
		return map[string]interface{}{
			"host":           want.Host,
			"name":           want.Queue,
			"exchange":       want.Exchange,
			"durable":        true,
			"delete":         true,
			"exclusive":      true,
			"no_wait":        true,
			"prefetch_count": count,
			"prefetch_size":  size,
			"auto_ack":       true,
			"no_local":       true,
			"nack_discard":   true,
		}
	}
	for _, tc := range []struct {
		name  string
		block map[string]interface{}
	}{
		{"numbers as float64 (JSON)", block(float64(25), float64(4096))},
		{"numbers as int (YAML, code)", block(25, 4096)},
		{"numbers as int64", block(int64(25), int64(4096))},
		{"numbers as uint64", block(uint64(25), uint64(4096))},
		{"numbers as json.Number", block(json.Number("25"), json.Number("4096"))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.block)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Parse:\n got %+v\nwant %+v", got, want)
			}
		})
	}

	t.Run("from JSON text", func(t *testing.T) {
		var raw interface{}
		text := `{"host": "amqps://user:pass@rabbit.example.com:5671/vhost", "name": "orders-queue",
			"exchange": "orders", "durable": true, "delete": true, "exclusive": true, "no_wait": true,
			"prefetch_count": 25, "prefetch_size": 4096, "auto_ack": true, "no_local": true, "nack_discard": true}`
		if err := json.Unmarshal([]byte(text), &raw); err != nil {
			t.Fatal(err)
		}
		got, err := Parse(raw)
		if err != nil {
			t.Fatalf("Parse: %v", err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("Parse:\n got %+v\nwant %+v", got, want)
		}
	})
}

// Each boolean lands in its own field: a positional slip (exclusive into
// delete, say) shows up here.
func TestParseEachBooleanField(t *testing.T) {
	for _, tc := range []struct {
		key string
		get func(Config) bool
	}{
		{"durable", func(c Config) bool { return c.Durable }},
		{"delete", func(c Config) bool { return c.Delete }},
		{"exclusive", func(c Config) bool { return c.Exclusive }},
		{"no_wait", func(c Config) bool { return c.NoWait }},
		{"auto_ack", func(c Config) bool { return c.AutoAck }},
		{"no_local", func(c Config) bool { return c.NoLocal }},
		{"nack_discard", func(c Config) bool { return c.NackDiscard }},
	} {
		t.Run(tc.key, func(t *testing.T) {
			got, err := Parse(with(map[string]interface{}{tc.key: true}))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !tc.get(got) {
				t.Errorf("%s: true was not stored in its field: %+v", tc.key, got)
			}
			want := Config{Host: got.Host, Queue: got.Queue, Exchange: got.Exchange, PrefetchCount: DefaultPrefetchCount, Retry: defaultRetry,
				ExchangeType: "topic", Topology: TopologyDeclare, BackPressure: true}
			cleared := got
			cleared.Durable, cleared.Delete, cleared.Exclusive, cleared.NoWait = false, false, false, false
			cleared.AutoAck, cleared.NoLocal, cleared.NackDiscard = false, false, false
			if !reflect.DeepEqual(cleared, want) {
				t.Errorf("%s: other fields changed: %+v", tc.key, got)
			}
			trues := 0
			for _, b := range []bool{got.Durable, got.Delete, got.Exclusive, got.NoWait, got.AutoAck, got.NoLocal, got.NackDiscard} {
				if b {
					trues++
				}
			}
			if trues != 1 {
				t.Errorf("%s: %d boolean fields set, want 1: %+v", tc.key, trues, got)
			}
		})
	}
}

func TestParseBackPressureAndOrderingKey(t *testing.T) {
	got, err := Parse(with(map[string]interface{}{"back_pressure": false, "ordering_key": "header:order_id"}))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if got.BackPressure || got.OrderingKey != "header:order_id" {
		t.Errorf("back_pressure %t, ordering_key %q", got.BackPressure, got.OrderingKey)
	}
	for _, key := range []string{"routing_key", "property:message_id", "property:correlation_id", "header:x"} {
		if _, err := Parse(with(map[string]interface{}{"ordering_key": key})); err != nil {
			t.Errorf("ordering_key %q: %v", key, err)
		}
	}
	for _, key := range []interface{}{"", "header:", "property:body", "routing-key", "message_id", 7} {
		_, err := Parse(with(map[string]interface{}{"ordering_key": key}))
		if err == nil || !strings.Contains(err.Error(), "ordering_key: must be \"routing_key\"") {
			t.Errorf("ordering_key %#v: error %v, want one naming the field and the choices", key, err)
		}
	}
	if _, err := Parse(with(map[string]interface{}{"back_pressure": "yes"})); err == nil || !strings.Contains(err.Error(), "back_pressure") {
		t.Errorf("back_pressure \"yes\": error %v", err)
	}
}

func TestParseCloudEvents(t *testing.T) {
	got, err := FromExtraConfig(map[string]interface{}{Namespace: validBlock(), ExtensionNamespace: map[string]interface{}{"cloudevents": true}})
	if err != nil || !got.CloudEvents {
		t.Fatalf("cloudevents true in the extension block: %t, %v", got.CloudEvents, err)
	}
	if got, _ := Parse(validBlock()); got.CloudEvents {
		t.Error("cloudevents is on by default")
	}
	for _, v := range []interface{}{"true", float64(1)} {
		_, err := Parse(with(map[string]interface{}{"cloudevents": v}))
		if err == nil || !strings.Contains(err.Error(), "cloudevents: must be true or false") {
			t.Errorf("cloudevents %#v: error %v, want one naming the field", v, err)
		}
	}
}

func TestParseDefaults(t *testing.T) {
	got, err := Parse(validBlock())
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := Config{
		Host:          "amqp://guest:guest@localhost:5672/",
		Queue:         "orders-queue",
		Exchange:      "orders",
		PrefetchCount: DefaultPrefetchCount,
		Retry:         defaultRetry,
		ExchangeType:  "topic",
		Topology:      TopologyDeclare,
		BackPressure:  true,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Parse:\n got %+v\nwant %+v", got, want)
	}
	if DefaultPrefetchCount != 10 {
		t.Errorf("DefaultPrefetchCount = %d, the documented default is 10", DefaultPrefetchCount)
	}
}

func TestParsePrefetchCount(t *testing.T) {
	for _, tc := range []struct {
		name  string
		value interface{}
		want  int
	}{
		{"absent gives the default", nil, 10},
		{"explicit 0 as float64 is kept", float64(0), 0},
		{"explicit 0 as int is kept", 0, 0},
		{"explicit 0 as json.Number is kept", json.Number("0"), 0},
		{"1 as float64", float64(1), 1},
		{"65535 as float64", float64(65535), 65535},
		{"65535 as int", 65535, 65535},
		{"65535 as json.Number", json.Number("65535"), 65535},
		{"a whole float64", 20.0, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(with(map[string]interface{}{"prefetch_count": tc.value}))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got.PrefetchCount != tc.want {
				t.Errorf("PrefetchCount = %d, want %d", got.PrefetchCount, tc.want)
			}
		})
	}
}

func TestParsePrefetchSize(t *testing.T) {
	for _, tc := range []struct {
		name  string
		value interface{}
		want  int
	}{
		{"absent is 0", nil, 0},
		{"max uint32 as float64", float64(math.MaxUint32), math.MaxUint32},
		{"max uint32 as int", math.MaxUint32, math.MaxUint32},
		{"json.Number", json.Number("65536"), 65536},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(with(map[string]interface{}{"prefetch_size": tc.value}))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got.PrefetchSize != tc.want {
				t.Errorf("PrefetchSize = %d, want %d", got.PrefetchSize, tc.want)
			}
		})
	}
}

func TestFromExtraConfig(t *testing.T) {
	current := with(map[string]interface{}{"name": "current-queue"})
	legacy := with(map[string]interface{}{"name": "legacy-queue"})
	for _, tc := range []struct {
		name      string
		extra     luraconfig.ExtraConfig
		wantQueue string
		wantErr   error
	}{
		{"current key", luraconfig.ExtraConfig{Namespace: current}, "current-queue", nil},
		{"legacy key alone", luraconfig.ExtraConfig{LegacyNamespace: legacy}, "legacy-queue", nil},
		{"current key wins over legacy", luraconfig.ExtraConfig{Namespace: current, LegacyNamespace: legacy}, "current-queue", nil},
		{"neither key", luraconfig.ExtraConfig{"async/kafka": current}, "", ErrNoConfig},
		{"empty extra_config", luraconfig.ExtraConfig{}, "", ErrNoConfig},
		{"nil extra_config", nil, "", ErrNoConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := FromExtraConfig(tc.extra)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("FromExtraConfig error = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("FromExtraConfig: %v", err)
			}
			if got.Queue != tc.wantQueue {
				t.Errorf("Queue = %q, want %q", got.Queue, tc.wantQueue)
			}
		})
	}

	t.Run("current key invalid is not rescued by a valid legacy key", func(t *testing.T) {
		_, err := FromExtraConfig(luraconfig.ExtraConfig{
			Namespace:       with(map[string]interface{}{"host": nil}),
			LegacyNamespace: legacy,
		})
		if err == nil || errors.Is(err, ErrNoConfig) {
			t.Fatalf("FromExtraConfig error = %v, want the current block's host error", err)
		}
		if !strings.Contains(err.Error(), "host") {
			t.Errorf("error %q does not name host", err)
		}
	})

	t.Run("current key present but not an object", func(t *testing.T) {
		_, err := FromExtraConfig(luraconfig.ExtraConfig{Namespace: "amqp://localhost"})
		if err == nil || errors.Is(err, ErrNoConfig) {
			t.Fatalf("FromExtraConfig error = %v, want a shape error", err)
		}
	})
}

func TestParseInvalidField(t *testing.T) {
	for _, tc := range []struct {
		name  string
		block map[string]interface{}
		field string
		// reason holds substrings the FieldError's reason must contain.
		reason []string
	}{
		{"missing host", with(map[string]interface{}{"host": nil}), "host", []string{"required"}},
		{"missing name", with(map[string]interface{}{"name": nil}), "name", []string{"required"}},
		{"missing exchange", with(map[string]interface{}{"exchange": nil}), "exchange", []string{"required"}},
		{"empty host", with(map[string]interface{}{"host": ""}), "host", []string{"required", "empty"}},
		{"empty name", with(map[string]interface{}{"name": ""}), "name", []string{"empty"}},
		{"blank name", with(map[string]interface{}{"name": "   "}), "name", []string{"empty"}},
		{"empty exchange", with(map[string]interface{}{"exchange": ""}), "exchange", []string{"empty"}},
		{"host null", with(map[string]interface{}{"host": null{}}), "host", []string{"string", "null"}},
		{"name a number", with(map[string]interface{}{"name": float64(5)}), "name", []string{"string", "5"}},
		{"exchange a list", with(map[string]interface{}{"exchange": []interface{}{"a"}}), "exchange", []string{"string", "list"}},
		{"durable a string", with(map[string]interface{}{"durable": "true"}), "durable", []string{"true or false", "string"}},
		{"delete a number", with(map[string]interface{}{"delete": float64(1)}), "delete", []string{"true or false"}},
		{"exclusive a string", with(map[string]interface{}{"exclusive": "yes"}), "exclusive", []string{"true or false"}},
		{"no_wait null", with(map[string]interface{}{"no_wait": null{}}), "no_wait", []string{"true or false", "null"}},
		{"auto_ack a string", with(map[string]interface{}{"auto_ack": "false"}), "auto_ack", []string{"true or false"}},
		{"no_local an object", with(map[string]interface{}{"no_local": map[string]interface{}{}}), "no_local", []string{"true or false", "object"}},
		{"nack_discard a string", with(map[string]interface{}{"nack_discard": "1"}), "nack_discard", []string{"true or false"}},
		{"prefetch_count 1.5", with(map[string]interface{}{"prefetch_count": 1.5}), "prefetch_count", []string{"whole number", "1.5"}},
		{"prefetch_count json.Number 1.5", with(map[string]interface{}{"prefetch_count": json.Number("1.5")}), "prefetch_count", []string{"whole number", "1.5"}},
		{"prefetch_count a string", with(map[string]interface{}{"prefetch_count": "10"}), "prefetch_count", []string{"whole number", "string"}},
		{"prefetch_count a bool", with(map[string]interface{}{"prefetch_count": true}), "prefetch_count", []string{"whole number", "boolean"}},
		{"prefetch_count NaN", with(map[string]interface{}{"prefetch_count": math.NaN()}), "prefetch_count", []string{"whole number"}},
		{"prefetch_count +Inf", with(map[string]interface{}{"prefetch_count": math.Inf(1)}), "prefetch_count", []string{"whole number"}},
		{"prefetch_count -1 as float64", with(map[string]interface{}{"prefetch_count": float64(-1)}), "prefetch_count", []string{"between 0 and 65535", "-1"}},
		{"prefetch_count -1 as int", with(map[string]interface{}{"prefetch_count": -1}), "prefetch_count", []string{"between 0 and 65535", "-1"}},
		{"prefetch_count -1 as json.Number", with(map[string]interface{}{"prefetch_count": json.Number("-1")}), "prefetch_count", []string{"between 0 and 65535", "-1"}},
		{"prefetch_count 65536 as float64", with(map[string]interface{}{"prefetch_count": float64(65536)}), "prefetch_count", []string{"between 0 and 65535", "65536"}},
		{"prefetch_count 65536 as int", with(map[string]interface{}{"prefetch_count": 65536}), "prefetch_count", []string{"65536"}},
		{"prefetch_count 65536 as json.Number", with(map[string]interface{}{"prefetch_count": json.Number("65536")}), "prefetch_count", []string{"65536"}},
		{"prefetch_count huge float64", with(map[string]interface{}{"prefetch_count": 1e300}), "prefetch_count", []string{"whole number"}},
		{"prefetch_count huge uint64", with(map[string]interface{}{"prefetch_count": uint64(math.MaxUint64)}), "prefetch_count", []string{"whole number"}},
		{"prefetch_count huge json.Number", with(map[string]interface{}{"prefetch_count": json.Number("99999999999999999999")}), "prefetch_count", []string{"whole number"}},
		{"prefetch_size negative", with(map[string]interface{}{"prefetch_size": float64(-5)}), "prefetch_size", []string{"between 0 and 4294967295"}},
		{"prefetch_size above uint32", with(map[string]interface{}{"prefetch_size": float64(math.MaxUint32 + 1)}), "prefetch_size", []string{"between 0 and 4294967295"}},
		{"prefetch_size a string", with(map[string]interface{}{"prefetch_size": "0"}), "prefetch_size", []string{"whole number"}},
		{"unknown field", with(map[string]interface{}{"queue": "x"}), "queue", []string{"unknown field"}},
		{"unknown field prefetchCount", with(map[string]interface{}{"prefetchCount": float64(5)}), "prefetchCount", []string{"unknown field", `did you mean "prefetch_count"?`}},
		{"unknown field prefetch-count", with(map[string]interface{}{"prefetch-count": float64(5)}), "prefetch-count", []string{"unknown field", `did you mean "prefetch_count"?`}},
		{"unknown field AutoAck", with(map[string]interface{}{"AutoAck": true}), "AutoAck", []string{`did you mean "auto_ack"?`}},
		{"unknown field Durable", with(map[string]interface{}{"Durable": true}), "Durable", []string{`did you mean "durable"?`}},
		{"host with scheme http", with(map[string]interface{}{"host": "http://localhost:5672/"}), "host", []string{"amqp://", `"http"`}},
		{"host with no scheme", with(map[string]interface{}{"host": "localhost:5672"}), "host", []string{"amqp://"}},
		{"host with no hostname", with(map[string]interface{}{"host": "amqp://"}), "host", []string{"no host name"}},
		{"host with only a vhost", with(map[string]interface{}{"host": "amqp:///vhost"}), "host", []string{"no host name"}},
		{"host with credentials but no hostname", with(map[string]interface{}{"host": "amqp://user:pass@:5672/"}), "host", []string{"no host name"}},
		{"host opaque", with(map[string]interface{}{"host": "amqp:localhost"}), "host", []string{"no host name"}},
		{"host with port too big", with(map[string]interface{}{"host": "amqp://localhost:99999/"}), "host", []string{"invalid port", "99999"}},
		{"host with port 0", with(map[string]interface{}{"host": "amqp://localhost:0/"}), "host", []string{"invalid port", `"0"`}},
		{"host with port not a number", with(map[string]interface{}{"host": "amqp://localhost:abc/"}), "host", []string{"not a valid URL"}},
		{"host with a space", with(map[string]interface{}{"host": "amqp://local host/"}), "host", []string{"white space"}},
		{"host with a tab", with(map[string]interface{}{"host": "amqp://localhost/\tv"}), "host", []string{"white space"}},
		{"host with a newline", with(map[string]interface{}{"host": "amqp://localhost/\n"}), "host", []string{"white space"}},
		{"host with a bad escape", with(map[string]interface{}{"host": "amqp://localhost/%zz"}), "host", []string{"not a valid URL"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.block)
			if err == nil {
				t.Fatal("Parse: no error")
			}
			if !strings.Contains(err.Error(), tc.field+": ") {
				t.Errorf("error %q does not name the field %q", err, tc.field)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %q holds no *FieldError", err)
			}
			errs := fieldErrors(err)
			if len(errs) != 1 {
				t.Fatalf("got %d field errors %v, want 1: %q", len(errs), fieldNames(errs), err)
			}
			if errs[0].Field != tc.field {
				t.Errorf("FieldError.Field = %q, want %q", errs[0].Field, tc.field)
			}
			for _, s := range tc.reason {
				if !strings.Contains(errs[0].Reason, s) {
					t.Errorf("reason %q does not contain %q", errs[0].Reason, s)
				}
			}
		})
	}
}

func TestParseValidHosts(t *testing.T) {
	for _, host := range []string{
		"amqp://localhost",
		"amqp://localhost:5672",
		"amqps://localhost:5671/",
		"amqp://guest:guest@localhost:5672/",
		"amqp://user:p%40ss%2Fw%3Ard@rabbit.example.com/vhost",
		"amqp://user@localhost/%2F",
		"amqp://127.0.0.1:65535/",
		"amqp://[::1]:5672/",
		"amqp://localhost/?heartbeat=10&connection_timeout=5000",
	} {
		t.Run(host, func(t *testing.T) {
			got, err := Parse(with(map[string]interface{}{"host": host}))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got.Host != host {
				t.Errorf("Host = %q, want it unchanged %q", got.Host, host)
			}
		})
	}
}

func TestParseReportsEveryProblem(t *testing.T) {
	block := map[string]interface{}{
		"host":           "http://localhost/",
		"name":           float64(5),
		"durable":        "yes",
		"prefetch_count": float64(-1),
		"prefetch_size":  1.5,
		"prefetchCount":  float64(3),
		"bogus":          true,
	}
	_, err := Parse(block)
	if err == nil {
		t.Fatal("Parse: no error")
	}
	wantFields := []string{"host", "name", "exchange", "durable", "prefetch_count", "prefetch_size", "prefetchCount", "bogus"}
	got := fieldErrors(err)
	for _, f := range wantFields {
		t.Run(f, func(t *testing.T) {
			if !strings.Contains(err.Error(), f+": ") {
				t.Errorf("error text does not name %q:\n%s", f, err)
			}
			n := 0
			for _, e := range got {
				if e.Field == f {
					n++
				}
			}
			if n != 1 {
				t.Errorf("%d FieldErrors for %q, want exactly 1 (got fields %v)", n, f, fieldNames(got))
			}
		})
	}
	if len(got) != len(wantFields) {
		t.Errorf("got %d FieldErrors %v, want %d", len(got), fieldNames(got), len(wantFields))
	}
}

// A field that fails to parse is reported once, for its type, and not a
// second time as missing.
func TestParseNoDoubleReport(t *testing.T) {
	for _, field := range []string{"host", "name", "exchange"} {
		t.Run(field, func(t *testing.T) {
			_, err := Parse(with(map[string]interface{}{field: true}))
			errs := fieldErrors(err)
			if len(errs) != 1 || errs[0].Field != field {
				t.Fatalf("got field errors %v (%v), want exactly one for %s", fieldNames(errs), err, field)
			}
			if strings.Contains(errs[0].Reason, "required") {
				t.Errorf("reason %q reports a present field as missing", errs[0].Reason)
			}
		})
	}
}

func TestParseNotAnObject(t *testing.T) {
	for _, tc := range []struct {
		name string
		raw  interface{}
		what string
	}{
		{"null", nil, "null"},
		{"a string", "amqp://localhost", "a string"},
		{"a list", []interface{}{validBlock()}, "a list"},
		{"a number", float64(1), "the number 1"},
		{"a boolean", true, "a boolean"},
		{"a typed map", map[string]string{"host": "amqp://localhost"}, "map[string]string"},
		{"lura ExtraConfig type", luraconfig.ExtraConfig(validBlock()), "config.ExtraConfig"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.raw)
			if err == nil {
				t.Fatal("Parse: no error")
			}
			if !strings.Contains(err.Error(), "object") || !strings.Contains(err.Error(), tc.what) {
				t.Errorf("error %q should say an object was expected and %s was given", err, tc.what)
			}
			if errors.Is(err, ErrNoConfig) {
				t.Errorf("a present but malformed block must not be ErrNoConfig")
			}
		})
	}
}

func TestParseNeverLeaksPassword(t *testing.T) {
	const secret = "s3cr3t"
	for _, tc := range []struct {
		host     string
		knownBug string
	}{
		{host: "amqp://user:s3cr3t@host:99999/"},
		{host: "amqp://user:s3cr3t@host:0/"},
		{host: "amqp://user:s3cr3t@host:port/"},
		{host: "amqp://user:s3cr3t@ho st/"},
		{host: "amqp://user:s3cr3t@host/\r\n"},
		{host: "http://user:s3cr3t@h/"},
		{host: "amqp://user:s3cr3t@/"},
		{host: "amqp://user:s3cr3t@[::1/"},
		{host: "amqp://user:s3cr3t@host/%zz"},
		{host: "amqp://us[er:s3cr3t@host/"},
		{host: "amqp:user:s3cr3t@host"},
		// An unencoded '/', '?' or '#' in the password ends the URL's
		// authority early, so url.Parse reads ":s3cr3t" as the port and
		// its error message quotes it.
		{host: "amqp://user:s3cr3t/x@host/"},
		{host: "amqp://user:s3cr3t?x@host/"},
		{host: "amqp://user:s3cr3t#x@host/"},
	} {
		t.Run(tc.host, func(t *testing.T) {
			_, err := Parse(with(map[string]interface{}{"host": tc.host}))
			if err == nil {
				t.Fatal("Parse: no error for an invalid host")
			}
			expect(t, tc.knownBug, func(fail func(string, ...interface{})) {
				if strings.Contains(err.Error(), secret) {
					fail("error text leaks the password: %q", err)
				}
				for _, fe := range fieldErrors(err) {
					if fe.Field == "host" && strings.Contains(fe.Reason, secret) {
						fail("FieldError.Reason leaks the password: %q", fe.Reason)
					}
				}
			})
		})
	}
}

func TestRedacted(t *testing.T) {
	for _, tc := range []struct {
		name     string
		in       string
		want     string
		knownBug string
	}{
		{name: "password replaced, user kept", in: "amqp://user:s3cr3t@host:5672/vhost", want: "amqp://user:xxxxx@host:5672/vhost"},
		{name: "amqps", in: "amqps://guest:guest@rabbit.example.com/", want: "amqps://guest:xxxxx@rabbit.example.com/"},
		{name: "encoded password", in: "amqp://user:p%40ss%2Fword@host/", want: "amqp://user:xxxxx@host/"},
		{name: "empty password", in: "amqp://user:@host/", want: "amqp://user:xxxxx@host/"},
		{name: "user without password", in: "amqp://user@host/", want: "amqp://user@host/"},
		{name: "no credentials", in: "amqp://host:5672", want: "amqp://host:5672"},
		{name: "query dropped", in: "amqp://user:s3cr3t@host/?auth_mechanism=PLAIN&keyfile=/k", want: "amqp://user:xxxxx@host/"},
		{name: "unparsable: space in host", in: "amqp://user:s3cr3t@ho st/", want: "<invalid amqp url>"},
		{name: "unparsable: password with '/'", in: "amqp://user:s3cr3t/x@host/", want: "<invalid amqp url>"},
		{name: "unparsable: bad escape", in: "amqp://user:s3cr3t%zz@host/", want: "<invalid amqp url>"},
		{name: "no scheme, no slashes", in: "host-only", want: "<invalid amqp url>"},
		{name: "empty", in: "", want: "<invalid amqp url>"},
		{name: "opaque URL (no //)", in: "amqp:user:s3cr3t@host"},
		{name: "no scheme: user read as scheme", in: "user:s3cr3t@host:5672"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Redacted(tc.in)
			expect(t, tc.knownBug, func(fail func(string, ...interface{})) {
				if strings.Contains(got, "s3cr3t") {
					fail("Redacted(%q) = %q leaks the password", tc.in, got)
				}
				if tc.want != "" && got != tc.want {
					fail("Redacted(%q) = %q, want %q", tc.in, got, tc.want)
				}
				if got == "<invalid amqp url>" && tc.in != "" && strings.Contains(got, tc.in) {
					fail("placeholder %q contains the input", got)
				}
			})
		})
	}
}

func TestFieldErrorText(t *testing.T) {
	e := &FieldError{Field: "prefetch_count", Reason: "must be between 0 and 65535, got -1"}
	if got, want := e.Error(), "prefetch_count: must be between 0 and 65535, got -1"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

const fuzzMarker = "FUZZSECRET"

// markerInPassword reports whether host carries the marker where a person
// would see a password: after "scheme://user:" and before the last '@'.
func markerInPassword(host string) bool {
	i := strings.Index(host, "://")
	if i < 0 {
		return false
	}
	rest := host[i+3:]
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return false
	}
	userinfo := rest[:at]
	colon := strings.Index(userinfo, ":")
	return colon >= 0 && strings.Contains(userinfo[colon+1:], fuzzMarker)
}

func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		`{"host": "amqp://guest:guest@localhost:5672/", "name": "q", "exchange": "x"}`,
		`{"host": "amqps://u:FUZZSECRET@rabbit:5671/v", "name": "q", "exchange": "x", "durable": true, "delete": false,
		  "exclusive": true, "no_wait": false, "prefetch_count": 0, "prefetch_size": 0, "auto_ack": false,
		  "no_local": true, "nack_discard": true}`,
		`{"host": "amqp://u:FUZZSECRET@host:99999/", "name": "q", "exchange": "x"}`,
		`{"host": "amqp://u:FUZZSECRET@ho st/", "name": "q", "exchange": "x"}`,
		`{"host": "http://u:FUZZSECRET@h/", "name": "q", "exchange": "x"}`,
		`{"host": "amqp://u:FUZZSECRET@:5672/", "name": "q", "exchange": "x"}`,
		`{"host": "amqp://u:FUZZSECRET@h:abc/", "name": "q", "exchange": "x"}`,
		`{"host": "amqp://u:FUZZSECRET@h/%zz", "name": "q", "exchange": "x"}`,
		`{"host": "amqp://localhost", "name": "q", "exchange": "x", "prefetch_count": 1.5}`,
		`{"host": "amqp://localhost", "name": "q", "exchange": "x", "prefetch_count": -1}`,
		`{"host": "amqp://localhost", "name": "q", "exchange": "x", "prefetch_count": 65536}`,
		`{"host": "amqp://localhost", "name": "q", "exchange": "x", "prefetch_count": 1e400}`,
		`{"host": "amqp://localhost", "name": "q", "exchange": "x", "prefetchCount": 5}`,
		`{"host": "amqp://localhost", "name": "", "exchange": " "}`,
		`{"host": 1, "name": null, "exchange": [], "durable": "yes"}`,
		`{}`,
		`[]`,
		`"amqp://localhost"`,
		`null`,
		`12`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, input string) {
		var raw interface{}
		if err := json.Unmarshal([]byte(input), &raw); err != nil {
			t.Skip()
		}
		cfg, err := Parse(raw)
		if err == nil {
			if strings.TrimSpace(cfg.Host) == "" || strings.TrimSpace(cfg.Queue) == "" || strings.TrimSpace(cfg.Exchange) == "" {
				t.Errorf("no error but a required field is empty: %+v", cfg)
			}
			if cfg.PrefetchCount < 0 || cfg.PrefetchCount > math.MaxUint16 {
				t.Errorf("no error but PrefetchCount = %d", cfg.PrefetchCount)
			}
			if cfg.PrefetchSize < 0 || cfg.PrefetchSize > math.MaxUint32 {
				t.Errorf("no error but PrefetchSize = %d", cfg.PrefetchSize)
			}
			if err := checkHost(cfg.Host); err != nil {
				t.Errorf("no error but the host is invalid: %v", err)
			}
			return
		}
		block, _ := raw.(map[string]interface{})
		host, _ := block["host"].(string)
		if strings.Count(input, fuzzMarker) != 1 || !markerInPassword(host) {
			return
		}
		if strings.Contains(err.Error(), fuzzMarker) {
			t.Errorf("error text leaks the password of %q: %q", host, err)
		}
	})
}

func TestFromExtraConfigSource(t *testing.T) {
	std := map[string]interface{}{"host": "amqp://guest:guest@localhost:5672/", "name": "q", "exchange": "x",
		"retry": map[string]interface{}{"delay": "2s"}, "hosts": []interface{}{"amqp://h2/"}}
	ext := map[string]interface{}{"shutdown_timeout": "5s"}
	cfg, err := FromExtraConfig(map[string]interface{}{LegacyNamespace: std, ExtensionNamespace: ext})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Retry.Delay != 2*time.Second || cfg.ShutdownTimeout != 5*time.Second || len(cfg.Hosts) != 1 {
		t.Errorf("fields of both blocks not read: %+v", cfg)
	}
	if want := (Source{Key: LegacyNamespace, Misplaced: []string{"hosts", "retry"}}); !reflect.DeepEqual(cfg.Source, want) {
		t.Errorf("Source = %+v, want %+v", cfg.Source, want)
	}
	for field, want := range map[string]string{
		"": LegacyNamespace, "host": LegacyNamespace, "retry.delay": LegacyNamespace, "hosts[0]": LegacyNamespace,
		"shutdown_timeout": ExtensionNamespace, "dead_letter.queue": ExtensionNamespace,
	} {
		if got := cfg.KeyOf(field); got != want {
			t.Errorf("KeyOf(%q) = %q, want %q", field, got, want)
		}
	}
	if got, want := Path(LegacyNamespace), "extra_config.async/amqp (github.com/devopsfaith/krakend-amqp/agent)"; got != want {
		t.Errorf("Path(legacy) = %q, want %q", got, want)
	}
	if _, err := FromExtraConfig(map[string]interface{}{ExtensionNamespace: ext}); !errors.Is(err, ErrNoConfig) {
		t.Errorf("extension block alone: %v, want ErrNoConfig", err)
	}
}
