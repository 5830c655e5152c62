package config

import (
	"math"
	"strings"
	"testing"
	"time"
)

// RetryDelays ends on every policy, even one Validate refuses: a policy
// given in code (driver.New) with a zero delay once made it loop forever.
func TestRetryDelaysEndsOnEveryPolicy(t *testing.T) {
	for _, r := range []Retry{
		{MaxAttempts: 3, Delay: 0, MaxDelay: time.Second, Multiplier: 2},
		{MaxAttempts: 3, Delay: -time.Second, MaxDelay: time.Second, Multiplier: 2},
		{MaxAttempts: 3, Delay: 0, MaxDelay: 0, Multiplier: 0},
		{MaxAttempts: 3, Delay: time.Millisecond, MaxDelay: time.Hour, Multiplier: math.Inf(1)},
		{MaxAttempts: 3, Delay: time.Millisecond, MaxDelay: time.Hour, Multiplier: math.NaN()},
		{MaxAttempts: 3, Delay: time.Millisecond, MaxDelay: time.Duration(math.MaxInt64), Multiplier: 100},
	} {
		done := make(chan []time.Duration, 1)
		go func() { done <- r.RetryDelays() }()
		select {
		case delays := <-done:
			if len(delays) == 0 || len(delays) > MaxRetryQueues+1 {
				t.Errorf("%+v: delays %v", r, delays)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%+v: RetryDelays does not return", r)
		}
	}
}

func TestRetryValidate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		retry Retry
		field string // "" for valid
		want  string
	}{
		{"the defaults", defaultRetry, "", ""},
		{"one attempt, one delay", Retry{MaxAttempts: 1, Delay: time.Millisecond, MaxDelay: time.Millisecond, Multiplier: 1}, "", ""},
		{"zero delay", Retry{MaxAttempts: 3, MaxDelay: time.Second, Multiplier: 2}, "retry.delay", "at least 1ms"},
		{"negative delay", Retry{MaxAttempts: 3, Delay: -time.Second, MaxDelay: time.Second, Multiplier: 2}, "retry.delay", "at least 1ms"},
		{"zero max_delay", Retry{MaxAttempts: 3, Delay: time.Millisecond, Multiplier: 2}, "retry.max_delay", "at least 1ms"},
		{"zero attempts", Retry{Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}, "retry.max_attempts", "between 1 and 1000000"},
		{"too many attempts", Retry{MaxAttempts: 2_000_000, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}, "retry.max_attempts", "between 1 and"},
		{"multiplier below 1", Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: 0.5}, "retry.multiplier", "between 1 and 100"},
		{"multiplier NaN", Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: math.NaN()}, "retry.multiplier", "between 1 and 100"},
		{"multiplier infinite", Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: math.Inf(1)}, "retry.multiplier", "between 1 and 100"},
		{"max_delay below delay", Retry{MaxAttempts: 3, Delay: 2 * time.Second, MaxDelay: time.Second, Multiplier: 2}, "retry.max_delay", "shorter than retry.delay"},
		{"too many retry queues", Retry{MaxAttempts: 3, Delay: time.Millisecond, MaxDelay: time.Hour, Multiplier: 1.1}, "retry", "more than 20"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.retry.Validate()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			errs := fieldErrors(err)
			if len(errs) != 1 || errs[0].Field != tc.field || !strings.Contains(errs[0].Reason, tc.want) {
				t.Errorf("Validate: %v, want one error on %s saying %q", err, tc.field, tc.want)
			}
		})
	}
}

func TestDeadLetterValidate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		dead  DeadLetter
		field string
	}{
		{"none", DeadLetter{}, ""},
		{"a queue with statuses", DeadLetter{Queue: "d", Statuses: []int{400, 422}}, ""},
		{"queue and exchange", DeadLetter{Queue: "d", Exchange: "x"}, "dead_letter"},
		{"routing key without exchange", DeadLetter{Queue: "d", RoutingKey: "k"}, "dead_letter.routing_key"},
		{"statuses without destination", DeadLetter{Statuses: []int{422}}, "dead_letter.statuses"},
		{"a status out of range", DeadLetter{Queue: "d", Statuses: []int{200}}, "dead_letter.statuses"},
	} {
		err := tc.dead.Validate()
		if tc.field == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		if errs := fieldErrors(err); len(errs) != 1 || errs[0].Field != tc.field {
			t.Errorf("%s: %v, want one error on %s", tc.name, err, tc.field)
		}
	}
}

// prefetch_count 0 with ordering_key would let each key's line of
// waiting messages grow without bound.
func TestParseOrderingKeyNeedsAPrefetchLimit(t *testing.T) {
	for _, tc := range []struct {
		name string
		over map[string]interface{}
		ok   bool
	}{
		{"ordering_key with the default prefetch", map[string]interface{}{"ordering_key": "routing_key"}, true},
		{"ordering_key with prefetch 1", map[string]interface{}{"ordering_key": "header:k", "prefetch_count": float64(1)}, true},
		{"prefetch 0 alone", map[string]interface{}{"prefetch_count": float64(0)}, true},
		{"ordering_key with prefetch 0", map[string]interface{}{"ordering_key": "routing_key", "prefetch_count": float64(0)}, false},
		{"with auto_ack, where no prefetch applies", map[string]interface{}{"ordering_key": "property:message_id", "prefetch_count": 0, "auto_ack": true}, true},
		{"ordering_key with prefetch 0 as an int", map[string]interface{}{"ordering_key": "property:message_id", "prefetch_count": 0}, false},
	} {
		_, err := Parse(with(tc.over))
		if tc.ok {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		errs := fieldErrors(err)
		if len(errs) != 1 || errs[0].Field != "prefetch_count" || !strings.Contains(errs[0].Reason, "ordering_key") ||
			!strings.Contains(errs[0].Reason, "set prefetch_count to 1 or more") {
			t.Errorf("%s: %v, want one prefetch_count error naming ordering_key and what to set", tc.name, err)
		}
	}
	if err := CheckOrdering("routing_key", 0, false); err == nil {
		t.Error("CheckOrdering(routing_key, 0): no error")
	}
	if err := CheckOrdering("routing_key", 0, true); err != nil {
		t.Errorf("CheckOrdering with auto_ack: %v", err)
	}
	if err := CheckOrdering("", 0, false); err != nil {
		t.Errorf("CheckOrdering without a key: %v", err)
	}
	if errs := fieldErrors(CheckOrdering("property:nope", 10, false)); len(errs) != 1 || errs[0].Field != "ordering_key" {
		t.Errorf("CheckOrdering(property:nope): %v, want an ordering_key error", errs)
	}
}

// A dead-letter destination that routes back to the work queue is
// refused: every dead letter would be dispatched, fail and be
// dead-lettered again, forever. validBlock's exchange is "orders" and
// its queue "orders-queue".
func TestParseDeadLetterLoop(t *testing.T) {
	dead := func(dl map[string]interface{}, over map[string]interface{}) map[string]interface{} {
		b := with(over)
		b["dead_letter"] = dl
		return b
	}
	keys := func(k ...interface{}) map[string]interface{} { return map[string]interface{}{"routing_keys": k} }
	for _, tc := range []struct {
		name  string
		block map[string]interface{}
		field string // "" when accepted
	}{
		{"another exchange", dead(map[string]interface{}{"exchange": "dlx"}, nil), ""},
		{"another exchange, a matching key", dead(map[string]interface{}{"exchange": "dlx", "routing_key": "orders.created"}, keys("orders.*")), ""},
		{"own exchange, no routing key", dead(map[string]interface{}{"exchange": "orders"}, nil), "dead_letter.exchange"},
		{"own exchange, no routing key, routing_keys", dead(map[string]interface{}{"exchange": "orders"}, keys("orders.created")), "dead_letter.exchange"},
		{"own exchange, the binding key itself", dead(map[string]interface{}{"exchange": "orders", "routing_key": "orders.created"}, keys("orders.created")), "dead_letter.routing_key"},
		{"own exchange, matched by *", dead(map[string]interface{}{"exchange": "orders", "routing_key": "orders.dead"}, keys("billing.#", "orders.*")), "dead_letter.routing_key"},
		{"own exchange, matched by #", dead(map[string]interface{}{"exchange": "orders", "routing_key": "dead.orders.eu"}, keys("#")), "dead_letter.routing_key"},
		{"own exchange, matched by # in the middle", dead(map[string]interface{}{"exchange": "orders", "routing_key": "orders.eu.x.dead"}, keys("orders.#.dead")), "dead_letter.routing_key"},
		{"own exchange, * needs one word", dead(map[string]interface{}{"exchange": "orders", "routing_key": "orders"}, keys("orders.*")), ""},
		{"own exchange, * matches one word only", dead(map[string]interface{}{"exchange": "orders", "routing_key": "orders.eu.dead"}, keys("orders.*")), ""},
		{"own exchange, a key no binding matches", dead(map[string]interface{}{"exchange": "orders", "routing_key": "dead"}, keys("orders.*", "billing.#")), ""},
		{"own direct exchange, the same key", dead(map[string]interface{}{"exchange": "orders", "routing_key": "orders.*"},
			map[string]interface{}{"exchange_type": "direct", "routing_keys": []interface{}{"orders.*"}}), "dead_letter.routing_key"},
		{"own direct exchange, wildcards are plain words", dead(map[string]interface{}{"exchange": "orders", "routing_key": "orders.dead"},
			map[string]interface{}{"exchange_type": "direct", "routing_keys": []interface{}{"orders.*"}}), ""},
		{"own fanout exchange, any key", dead(map[string]interface{}{"exchange": "orders", "routing_key": "dead"},
			map[string]interface{}{"exchange_type": "fanout"}), "dead_letter.exchange"},
		{"own queue", dead(map[string]interface{}{"queue": "orders-queue"}, nil), "dead_letter.queue"},
		{"another queue", dead(map[string]interface{}{"queue": "orders-dead"}, nil), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.block)
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				return
			}
			errs := fieldErrors(err)
			if len(errs) != 1 || errs[0].Field != tc.field {
				t.Fatalf("Parse: %v, want one error on %s", err, tc.field)
			}
			if !strings.Contains(errs[0].Reason, "come back to the work queue") || !strings.Contains(errs[0].Reason, "forever") {
				t.Errorf("reason %q does not say why", errs[0].Reason)
			}
		})
	}
}

// With no routing_keys the binding is the agent's consumer.topic, which
// Parse does not know: CheckDeadLetterLoop checks it.
func TestCheckDeadLetterLoopWithTheTopic(t *testing.T) {
	cfg, err := Parse(with(map[string]interface{}{"dead_letter": map[string]interface{}{"exchange": "orders", "routing_key": "orders.dead"}}))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.CheckDeadLetterLoop("orders.*"); err == nil {
		t.Error("topic orders.* matches orders.dead: no error")
	}
	if err := cfg.CheckDeadLetterLoop("orders.created"); err != nil {
		t.Errorf("topic orders.created: %v", err)
	}
}

func TestTopicMatch(t *testing.T) {
	for _, tc := range []struct {
		binding, key string
		want         bool
	}{
		{"orders.created", "orders.created", true},
		{"orders.created", "orders.deleted", false},
		{"orders.*", "orders.created", true},
		{"orders.*", "orders", false},
		{"orders.*", "orders.created.eu", false},
		{"*.created", "orders.created", true},
		{"*", "orders", true},
		{"*", "", false},
		{"#", "", true},
		{"#", "a.b.c", true},
		{"orders.#", "orders", true},
		{"orders.#", "orders.a.b", true},
		{"orders.#", "billing.a", false},
		{"#.dead", "dead", true},
		{"#.dead", "a.b.dead", true},
		{"#.dead", "a.b.dead.x", false},
		{"a.#.z", "a.z", true},
		{"a.#.z", "a.b.c.z", true},
		{"a.#.#.z", "a.b.z", true},
		{"a.*.#", "a", false},
		{"a.*.#", "a.b", true},
		{"", "", true},
		{"", "a", false},
	} {
		if got := TopicMatch(tc.binding, tc.key); got != tc.want {
			t.Errorf("TopicMatch(%q, %q) = %t, want %t", tc.binding, tc.key, got, tc.want)
		}
	}
}
