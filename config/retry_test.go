package config

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseRetryDeadLetterShutdown(t *testing.T) {
	for _, tc := range []struct {
		name     string
		over     map[string]interface{}
		retry    Retry
		dead     DeadLetter
		shutdown time.Duration
	}{
		{
			name:  "defaults",
			retry: defaultRetry,
		},
		{
			name: "every retry field, numbers as float64 (JSON)",
			over: map[string]interface{}{"retry": map[string]interface{}{
				"max_attempts": float64(4), "delay": "200ms", "max_delay": "1s", "multiplier": float64(2)}},
			retry: Retry{MaxAttempts: 4, Delay: 200 * time.Millisecond, MaxDelay: time.Second, Multiplier: 2},
		},
		{
			name:  "numbers as int (YAML, code)",
			over:  map[string]interface{}{"retry": map[string]interface{}{"max_attempts": 7, "multiplier": 3}},
			retry: Retry{MaxAttempts: 7, Delay: DefaultDelay, MaxDelay: DefaultMaxDelay, Multiplier: 3},
		},
		{
			name: "numbers as json.Number",
			over: map[string]interface{}{"retry": map[string]interface{}{
				"max_attempts": json.Number("5"), "multiplier": json.Number("1.5")}},
			retry: Retry{MaxAttempts: 5, Delay: DefaultDelay, MaxDelay: DefaultMaxDelay, Multiplier: 1.5},
		},
		{
			name:  "a partial retry block keeps the other defaults",
			over:  map[string]interface{}{"retry": map[string]interface{}{"delay": "2s"}},
			retry: Retry{MaxAttempts: DefaultMaxAttempts, Delay: 2 * time.Second, MaxDelay: DefaultMaxDelay, Multiplier: DefaultMultiplier},
		},
		{
			name:  "an empty retry block is the default",
			over:  map[string]interface{}{"retry": map[string]interface{}{}},
			retry: defaultRetry,
		},
		{
			name: "dead_letter queue with statuses",
			over: map[string]interface{}{"dead_letter": map[string]interface{}{
				"queue": "orders.dead", "statuses": []interface{}{float64(400), 422, json.Number("409")}}},
			retry: defaultRetry,
			dead:  DeadLetter{Queue: "orders.dead", Statuses: []int{400, 422, 409}},
		},
		{
			name:  "dead_letter exchange and routing key",
			over:  map[string]interface{}{"dead_letter": map[string]interface{}{"exchange": "dlx", "routing_key": "failed"}},
			retry: defaultRetry,
			dead:  DeadLetter{Exchange: "dlx", RoutingKey: "failed"},
		},
		{
			name:  "dead_letter broker",
			over:  map[string]interface{}{"dead_letter": map[string]interface{}{"broker": true, "statuses": []interface{}{}}},
			retry: defaultRetry,
			dead:  DeadLetter{Broker: true},
		},
		{
			name:     "shutdown_timeout",
			over:     map[string]interface{}{"shutdown_timeout": "45s"},
			retry:    defaultRetry,
			shutdown: 45 * time.Second,
		},
		{
			name:     "shutdown_timeout 0 means the dispatch timeout",
			over:     map[string]interface{}{"shutdown_timeout": "0s"},
			retry:    defaultRetry,
			shutdown: 0,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(with(tc.over))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got.Retry != tc.retry {
				t.Errorf("Retry = %+v, want %+v", got.Retry, tc.retry)
			}
			if !reflect.DeepEqual(got.DeadLetter, tc.dead) {
				t.Errorf("DeadLetter = %+v, want %+v", got.DeadLetter, tc.dead)
			}
			if got.ShutdownTimeout != tc.shutdown {
				t.Errorf("ShutdownTimeout = %s, want %s", got.ShutdownTimeout, tc.shutdown)
			}
		})
	}

	t.Run("idempotency_header", func(t *testing.T) {
		got, err := Parse(with(map[string]interface{}{"idempotency_header": "Idempotency-Key"}))
		if err != nil || got.IdempotencyHeader != "Idempotency-Key" {
			t.Errorf("IdempotencyHeader = %q (%v)", got.IdempotencyHeader, err)
		}
	})

	t.Run("max_body_bytes", func(t *testing.T) {
		got, err := Parse(with(map[string]interface{}{"max_body_bytes": float64(1 << 20)}))
		if err != nil || got.MaxBodyBytes != 1<<20 {
			t.Errorf("MaxBodyBytes = %d (%v), want 1048576", got.MaxBodyBytes, err)
		}
		if got, _ := Parse(with(nil)); got.MaxBodyBytes != 0 {
			t.Errorf("default MaxBodyBytes = %d, want 0 (no bound)", got.MaxBodyBytes)
		}
	})

	t.Run("from JSON text", func(t *testing.T) {
		var raw map[string]interface{}
		text := `{"host": "amqp://localhost/", "name": "q", "exchange": "x", "shutdown_timeout": "3s",
			"retry": {"max_attempts": 3, "delay": "500ms", "max_delay": "4s", "multiplier": 2},
			"dead_letter": {"queue": "q.dead", "statuses": [400, 422]}}`
		if err := json.Unmarshal([]byte(text), &raw); err != nil {
			t.Fatal(err)
		}
		got, err := Parse(raw)
		if err != nil {
			t.Fatalf("Parse: %v", err)
		}
		want := Retry{MaxAttempts: 3, Delay: 500 * time.Millisecond, MaxDelay: 4 * time.Second, Multiplier: 2}
		if got.Retry != want || got.ShutdownTimeout != 3*time.Second ||
			!reflect.DeepEqual(got.DeadLetter, DeadLetter{Queue: "q.dead", Statuses: []int{400, 422}}) {
			t.Errorf("Parse: %+v", got)
		}
		if !got.DeadLetter.Enabled() {
			t.Error("a dead_letter queue is not Enabled")
		}
	})
}

func TestParseRetryDeadLetterInvalid(t *testing.T) {
	retry := func(m map[string]interface{}) map[string]interface{} {
		return with(map[string]interface{}{"retry": m})
	}
	dead := func(m map[string]interface{}) map[string]interface{} {
		return with(map[string]interface{}{"dead_letter": m})
	}
	for _, tc := range []struct {
		name   string
		block  map[string]interface{}
		field  string
		reason []string
	}{
		{"retry a string", with(map[string]interface{}{"retry": "fast"}), "retry", []string{"object", "string"}},
		{"queue_args.x-delivery-limit negative", with(map[string]interface{}{"queue_args": map[string]interface{}{"x-delivery-limit": float64(-1)}}),
			"queue_args.x-delivery-limit", []string{"3.x drops a message the first time", "1000000"}},
		{"retry a list", with(map[string]interface{}{"retry": []interface{}{}}), "retry", []string{"object", "list"}},
		{"retry.delay a number", retry(map[string]interface{}{"delay": float64(200)}), "retry.delay", []string{"duration", "200"}},
		{"retry.delay not a duration", retry(map[string]interface{}{"delay": "soon"}), "retry.delay", []string{"duration", `"soon"`}},
		{"retry.delay below 1ms", retry(map[string]interface{}{"delay": "500us"}), "retry.delay", []string{"at least 1ms"}},
		{"retry.delay negative", retry(map[string]interface{}{"delay": "-1s"}), "retry.delay", []string{"at least"}},
		{"retry.max_delay zero", retry(map[string]interface{}{"max_delay": "0s"}), "retry.max_delay", []string{"at least 1ms"}},
		{"retry.max_delay null", retry(map[string]interface{}{"max_delay": nil}), "retry.max_delay", []string{"duration", "null"}},
		{"retry.max_attempts 0", retry(map[string]interface{}{"max_attempts": float64(0)}), "retry.max_attempts", []string{"between 1 and"}},
		{"retry.max_attempts 1.5", retry(map[string]interface{}{"max_attempts": 1.5}), "retry.max_attempts", []string{"whole number"}},
		{"retry.max_attempts a string", retry(map[string]interface{}{"max_attempts": "3"}), "retry.max_attempts", []string{"whole number", "string"}},
		{"retry.max_attempts too many", retry(map[string]interface{}{"max_attempts": 2e6}), "retry.max_attempts", []string{"between 1 and 1000000"}},
		{"retry.multiplier below 1", retry(map[string]interface{}{"multiplier": 0.5}), "retry.multiplier", []string{"between 1 and 100"}},
		{"retry.multiplier a string", retry(map[string]interface{}{"multiplier": "2"}), "retry.multiplier", []string{"number", "string"}},
		{"retry.multiplier bad json.Number", retry(map[string]interface{}{"multiplier": json.Number("two")}), "retry.multiplier", []string{"number"}},
		{"retry unknown field", retry(map[string]interface{}{"attempts": float64(3)}), "retry.attempts", []string{"unknown field"}},
		{"retry typo", retry(map[string]interface{}{"maxDelay": "1s"}), "retry.maxDelay", []string{`did you mean "max_delay"?`}},
		{"max_delay shorter than delay", retry(map[string]interface{}{"delay": "2s", "max_delay": "1s"}), "retry.max_delay", []string{"shorter than retry.delay", "2s", "1s"}},
		{"more than 20 retry queues", retry(map[string]interface{}{"delay": "1ms", "max_delay": "1h", "multiplier": 1.1}), "retry", []string{"more than 20", "multiplier"}},
		{"dead_letter a string", with(map[string]interface{}{"dead_letter": "q"}), "dead_letter", []string{"object", "string"}},
		{"dead_letter.queue a number", dead(map[string]interface{}{"queue": float64(1)}), "dead_letter.queue", []string{"string"}},
		{"dead_letter.exchange a bool", dead(map[string]interface{}{"exchange": true}), "dead_letter.exchange", []string{"string"}},
		{"dead_letter.broker a string", dead(map[string]interface{}{"broker": "yes"}), "dead_letter.broker", []string{"true or false"}},
		{"dead_letter.statuses a number", dead(map[string]interface{}{"queue": "d", "statuses": float64(422)}), "dead_letter.statuses", []string{"list"}},
		{"dead_letter.statuses 200", dead(map[string]interface{}{"queue": "d", "statuses": []interface{}{float64(200)}}), "dead_letter.statuses", []string{"300 to 599", "200"}},
		{"dead_letter.statuses 600", dead(map[string]interface{}{"queue": "d", "statuses": []interface{}{600}}), "dead_letter.statuses", []string{"300 to 599"}},
		{"dead_letter.statuses a string", dead(map[string]interface{}{"queue": "d", "statuses": []interface{}{"422"}}), "dead_letter.statuses", []string{"300 to 599", "string"}},
		{"dead_letter.statuses 422.5", dead(map[string]interface{}{"queue": "d", "statuses": []interface{}{422.5}}), "dead_letter.statuses", []string{"300 to 599"}},
		{"dead_letter unknown field", dead(map[string]interface{}{"queue": "d", "ttl": "1s"}), "dead_letter.ttl", []string{"unknown field"}},
		{"dead_letter queue and exchange", dead(map[string]interface{}{"queue": "d", "exchange": "x"}), "dead_letter", []string{"only one of queue, exchange and broker"}},
		{"dead_letter queue and broker", dead(map[string]interface{}{"queue": "d", "broker": true}), "dead_letter", []string{"only one"}},
		{"dead_letter exchange and broker", dead(map[string]interface{}{"exchange": "x", "broker": true}), "dead_letter", []string{"only one"}},
		{"routing_key without exchange", dead(map[string]interface{}{"queue": "d", "routing_key": "k"}), "dead_letter.routing_key", []string{"dead_letter.exchange"}},
		{"statuses without destination", dead(map[string]interface{}{"statuses": []interface{}{float64(422)}}), "dead_letter.statuses", []string{"needs a destination"}},
		{"nack_discard with retry", with(map[string]interface{}{"nack_discard": true, "retry": map[string]interface{}{}}), "nack_discard", []string{"cannot be combined", "dead_letter.broker"}},
		{"nack_discard with dead_letter", with(map[string]interface{}{"nack_discard": true, "dead_letter": map[string]interface{}{"queue": "d"}}), "nack_discard", []string{"cannot be combined"}},
		{"auto_ack with retry", with(map[string]interface{}{"auto_ack": true, "retry": map[string]interface{}{"max_attempts": float64(3)}}), "auto_ack", []string{"cannot be combined"}},
		{"auto_ack with dead_letter", with(map[string]interface{}{"auto_ack": true, "dead_letter": map[string]interface{}{"broker": true}}), "auto_ack", []string{"cannot be combined"}},
		{"shutdown_timeout a number", with(map[string]interface{}{"shutdown_timeout": float64(5)}), "shutdown_timeout", []string{"duration", "5"}},
		{"shutdown_timeout not a duration", with(map[string]interface{}{"shutdown_timeout": "5 seconds"}), "shutdown_timeout", []string{"duration"}},
		{"shutdown_timeout negative", with(map[string]interface{}{"shutdown_timeout": "-1s"}), "shutdown_timeout", []string{"at least 0s"}},
		{"max_body_bytes negative", with(map[string]interface{}{"max_body_bytes": float64(-1)}), "max_body_bytes", []string{"between 0 and"}},
		{"max_body_bytes a string", with(map[string]interface{}{"max_body_bytes": "1MB"}), "max_body_bytes", []string{"whole number", "string"}},
		{"max_body_bytes a fraction", with(map[string]interface{}{"max_body_bytes": 1.5}), "max_body_bytes", []string{"whole number"}},
		{"idempotency_header empty", with(map[string]interface{}{"idempotency_header": ""}), "idempotency_header", []string{"HTTP header name"}},
		{"idempotency_header with a space", with(map[string]interface{}{"idempotency_header": "Idempotency Key"}), "idempotency_header", []string{"HTTP header name", `"Idempotency Key"`}},
		{"idempotency_header with a colon", with(map[string]interface{}{"idempotency_header": "X-Key:"}), "idempotency_header", []string{"HTTP header name"}},
		{"idempotency_header a number", with(map[string]interface{}{"idempotency_header": float64(1)}), "idempotency_header", []string{"HTTP header name", "number"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.block)
			if err == nil {
				t.Fatal("Parse: no error")
			}
			errs := fieldErrors(err)
			if len(errs) != 1 {
				t.Fatalf("got %d field errors %v, want 1: %q", len(errs), fieldNames(errs), err)
			}
			if errs[0].Field != tc.field {
				t.Errorf("FieldError.Field = %q, want %q (%q)", errs[0].Field, tc.field, err)
			}
			if !strings.Contains(err.Error(), tc.field+": ") {
				t.Errorf("error %q does not name the path %q", err, tc.field)
			}
			for _, s := range tc.reason {
				if !strings.Contains(errs[0].Reason, s) {
					t.Errorf("reason %q does not contain %q", errs[0].Reason, s)
				}
			}
		})
	}

	t.Run("every problem of the nested blocks is reported", func(t *testing.T) {
		_, err := Parse(with(map[string]interface{}{
			"retry":       map[string]interface{}{"delay": "x", "max_attempts": float64(0), "multiplier": "y"},
			"dead_letter": map[string]interface{}{"queue": float64(1), "statuses": "z"},
		}))
		got := strings.Join(fieldNames(fieldErrors(err)), " ")
		want := "dead_letter.queue dead_letter.statuses retry.delay retry.max_attempts retry.multiplier"
		if got != want {
			t.Errorf("fields %q, want %q (%v)", got, want, err)
		}
	})
}

func TestRetryDelays(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		name  string
		retry Retry
		want  []time.Duration
	}{
		{"default: 1s doubling, capped at one minute", defaultRetry,
			[]time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 32 * time.Second, time.Minute}},
		{"the issue's poison policy", Retry{MaxAttempts: 4, Delay: 200 * ms, MaxDelay: time.Second, Multiplier: 2},
			[]time.Duration{200 * ms, 400 * ms, 800 * ms, time.Second}},
		{"multiplier 1 gives one delay", Retry{Delay: 500 * ms, MaxDelay: time.Minute, Multiplier: 1}, []time.Duration{500 * ms}},
		{"delay equal to max_delay", Retry{Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}, []time.Duration{time.Second}},
		{"rounded to the millisecond", Retry{Delay: 1234567 * time.Nanosecond, MaxDelay: 10 * ms, Multiplier: 3},
			[]time.Duration{1 * ms, 4 * ms, 10 * ms}}, // 1.23, 3.70, 11.1 capped
		{"equal after rounding: listed once", Retry{Delay: ms, MaxDelay: 3 * ms, Multiplier: 1.2},
			[]time.Duration{1 * ms, 2 * ms, 3 * ms}}, // 1, 1.2, 1.44, 1.73, 2.07, 2.49, 2.99, 3
		{"a max_delay that rounds down is still reached", Retry{Delay: ms, MaxDelay: 1400 * time.Microsecond, Multiplier: 2},
			[]time.Duration{1 * ms}},
		{"a max_delay off the millisecond", Retry{Delay: 400 * ms, MaxDelay: 1000400 * time.Microsecond, Multiplier: 2},
			[]time.Duration{400 * ms, 800 * ms, time.Second}},
		{"a max_delay that rounds up", Retry{Delay: ms, MaxDelay: 2600 * time.Microsecond, Multiplier: 2},
			[]time.Duration{1 * ms, 2 * ms, 3 * ms}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := delaysWithin(t, tc.retry)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("RetryDelays() = %v, want %v", got, tc.want)
			}
		})
	}

	t.Run("too many distinct delays stop just past the bound", func(t *testing.T) {
		got := delaysWithin(t, Retry{Delay: ms, MaxDelay: time.Hour, Multiplier: 1.1})
		if len(got) != MaxRetryQueues+1 {
			t.Errorf("%d delays, want %d (enough to refuse the policy)", len(got), MaxRetryQueues+1)
		}
	})

	t.Run("max_delay sub-millisecond values parse without hanging", func(t *testing.T) {
		done := make(chan error, 1)
		go func() {
			_, err := Parse(with(map[string]interface{}{"retry": map[string]interface{}{"delay": "1ms", "max_delay": "1.4ms"}}))
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Parse: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Parse hangs on max_delay 1.4ms")
		}
	})
}

// delaysWithin runs RetryDelays, failing the test if it does not return.
func delaysWithin(t *testing.T, r Retry) []time.Duration {
	t.Helper()
	done := make(chan []time.Duration, 1)
	go func() { done <- r.RetryDelays() }()
	select {
	case d := <-done:
		return d
	case <-time.After(5 * time.Second):
		t.Fatalf("RetryDelays(%+v) does not return", r)
		return nil
	}
}

func TestDelayFor(t *testing.T) {
	r := Retry{MaxAttempts: 10, Delay: 200 * time.Millisecond, MaxDelay: time.Second, Multiplier: 2}
	for n, want := range map[int]time.Duration{
		1: 200 * time.Millisecond, 2: 400 * time.Millisecond, 3: 800 * time.Millisecond,
		4: time.Second, 5: time.Second, 9: time.Second, 1000: time.Second,
	} {
		if got := r.DelayFor(n); got != want {
			t.Errorf("DelayFor(%d) = %s, want %s", n, got, want)
		}
	}
	one := Retry{Delay: 3 * time.Second, MaxDelay: time.Minute, Multiplier: 1}
	for _, n := range []int{1, 2, 50} {
		if got := one.DelayFor(n); got != 3*time.Second {
			t.Errorf("multiplier 1: DelayFor(%d) = %s, want 3s", n, got)
		}
	}
}

// AtLeast picks the retry queue that honours a Retry-After: the shortest
// delay not below it, else the longest (max_delay).
func TestAtLeast(t *testing.T) {
	r := Retry{MaxAttempts: 10, Delay: 200 * time.Millisecond, MaxDelay: time.Second, Multiplier: 2}
	for in, want := range map[time.Duration]time.Duration{
		0: 200 * time.Millisecond, 200 * time.Millisecond: 200 * time.Millisecond,
		201 * time.Millisecond: 400 * time.Millisecond, 500 * time.Millisecond: 800 * time.Millisecond,
		time.Second: time.Second, 3 * time.Second: time.Second, 24 * time.Hour: time.Second,
	} {
		if got := r.AtLeast(in); got != want {
			t.Errorf("AtLeast(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestDeadLetterEnabled(t *testing.T) {
	for _, tc := range []struct {
		d    DeadLetter
		want bool
	}{
		{DeadLetter{}, false},
		{DeadLetter{Statuses: []int{422}}, false},
		{DeadLetter{RoutingKey: "k"}, false},
		{DeadLetter{Queue: "q"}, true},
		{DeadLetter{Exchange: "x"}, true},
		{DeadLetter{Broker: true}, true},
	} {
		if got := tc.d.Enabled(); got != tc.want {
			t.Errorf("%+v.Enabled() = %t, want %t", tc.d, got, tc.want)
		}
	}
}
