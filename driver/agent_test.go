package driver

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/backoff"
	"github.com/luraproject/lura/v2/logging"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

func TestBackoffStaysWithinBoundsForEveryLuraStrategy(t *testing.T) {
	for _, name := range []string{"", "linear", "linear-jitter", "exponential", "exponential-jitter"} {
		t.Run(name, func(t *testing.T) {
			a := mustNew(Options{Name: "b", Backoff: backoff.GetByName(name)})
			for retries := 1; retries <= 200; retries++ {
				if got := a.backoff(retries); got <= 0 || got > MaxBackoff {
					t.Fatalf("retry %d: wait %s, want within (0, %s]", retries, got, MaxBackoff)
				}
			}
		})
	}
}

func TestBackoffFollowsTheStrategyBelowTheCap(t *testing.T) {
	a := mustNew(Options{Name: "b", Backoff: backoff.ExponentialBackoff})
	for retries, want := range map[int]time.Duration{1: 2 * time.Second, 3: 8 * time.Second, 5: 32 * time.Second, 6: MaxBackoff} {
		if got := a.backoff(retries); got != want {
			t.Errorf("retry %d: got %s, want %s", retries, got, want)
		}
	}
}

func TestBackoffSurvivesAPanickingStrategy(t *testing.T) {
	a := mustNew(Options{Name: "b", Backoff: func(int) time.Duration { panic("boom") }})
	if got := a.backoff(1); got != MaxBackoff {
		t.Errorf("got %s, want %s", got, MaxBackoff)
	}
}

func TestAfterRotatesToTheNextNode(t *testing.T) {
	urls := []string{"a", "b", "c"}
	for i, want := range [][]string{{"b", "c", "a"}, {"c", "a", "b"}, {"a", "b", "c"}} {
		if got := after(urls, i); !slices.Equal(got, want) {
			t.Errorf("after(%d) = %v, want %v", i, got, want)
		}
	}
	if got := after([]string{"only"}, 0); !slices.Equal(got, []string{"only"}) {
		t.Errorf("one URL: %v", got)
	}
}

func TestWarnsWhenPrefetchIsBelowWorkers(t *testing.T) {
	for _, tc := range []struct {
		prefetch, workers int
		warn              bool
	}{{10, 16, true}, {16, 16, false}, {0, 16, false}, {100, 16, false}} {
		buf := &bytes.Buffer{}
		l, _ := logging.NewLogger("WARNING", buf, "")
		mustNew(Options{Name: "p", Workers: tc.workers, Session: consumer.Settings{PrefetchCount: tc.prefetch}, Logger: l})
		if got := strings.Contains(buf.String(), "below consumer.workers"); got != tc.warn {
			t.Errorf("prefetch %d, workers %d: warned %t, want %t", tc.prefetch, tc.workers, got, tc.warn)
		}
	}
}

func TestUnreadableSessionError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("session lost: %w", &amqp.Error{Code: amqp.FrameError, Reason: amqp.ErrSyntax.Error()}), true},
		{&amqp.Error{Code: amqp.FrameError, Reason: amqp.ErrFrameTooLarge.Error()}, false},
		{&amqp.Error{Code: amqp.FrameError, Reason: amqp.ErrSyntax.Error(), Server: true}, false},
		{&amqp.Error{Code: amqp.ConnectionForced, Reason: "shutdown"}, false},
		{errors.New("EOF"), false},
	} {
		if got := unreadable(tc.err); got != tc.want {
			t.Errorf("unreadable(%v) = %t, want %t", tc.err, got, tc.want)
		}
	}
}

// mustNew is New for options a test knows to be valid.
func mustNew(opts Options) *Agent {
	a, err := New(opts)
	if err != nil {
		panic(err)
	}
	return a
}

// New refuses what the configuration refuses and it cannot correct,
// naming the agent and the field, and returns at once: a retry policy
// with a zero delay once made it loop forever.
func TestNewRefusesWhatTheConfigurationRefuses(t *testing.T) {
	retry := config.Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}
	orders := consumer.Settings{Topology: consumer.Topology{Exchange: "orders", Queue: "orders-queue", RoutingKeys: []string{"orders.*"}}, PrefetchCount: 10}
	for _, tc := range []struct {
		name  string
		opts  Options
		field string // "" when valid
		want  string
	}{
		{"zero options", Options{}, "", ""},
		{"a valid retry and dead letter", Options{Session: orders, Retry: retry, DeadLetter: config.DeadLetter{Exchange: "orders", RoutingKey: "dead"}}, "", ""},
		{"workers and timeout get their defaults", Options{Workers: -1, Timeout: -time.Second}, "", ""},
		{"retry with a zero delay", Options{Retry: config.Retry{MaxAttempts: 3, MaxDelay: time.Second, Multiplier: 2}}, "retry.delay", "at least 1ms"},
		{"retry with only attempts", Options{Retry: config.Retry{MaxAttempts: 5}}, "retry.delay", "at least 1ms"},
		{"retry with zero attempts", Options{Retry: config.Retry{Delay: time.Second, MaxDelay: time.Second, Multiplier: 2}}, "retry.max_attempts", "between 1 and"},
		{"retry multiplier NaN", Options{Retry: config.Retry{MaxAttempts: 3, Delay: time.Second, MaxDelay: time.Second, Multiplier: math.NaN()}}, "retry.multiplier", "between 1 and 100"},
		{"retry max_delay below delay", Options{Retry: config.Retry{MaxAttempts: 3, Delay: time.Minute, MaxDelay: time.Second, Multiplier: 2}}, "retry.max_delay", "shorter than"},
		{"too many retry queues", Options{Retry: config.Retry{MaxAttempts: 3, Delay: time.Millisecond, MaxDelay: time.Hour, Multiplier: 1.01}}, "retry", "more than 20"},
		{"prefetch negative", Options{Session: consumer.Settings{PrefetchCount: -1}}, "prefetch_count", "between 0 and 65535"},
		{"prefetch over 65535", Options{Session: consumer.Settings{PrefetchCount: 70000}}, "prefetch_count", "between 0 and 65535"},
		{"prefetch size negative", Options{Session: consumer.Settings{PrefetchSize: -1}}, "prefetch_size", "between 0 and"},
		{"ordering key with prefetch 0", Options{OrderingKey: "routing_key"}, "prefetch_count", "ordering_key"},
		{"ordering key with auto_ack", Options{OrderingKey: "routing_key", Session: consumer.Settings{AutoAck: true}}, "", ""},
		{"ordering key unknown", Options{OrderingKey: "property:nope", Session: consumer.Settings{PrefetchCount: 10}}, "ordering_key", "routing_key"},
		{"idempotency header not a token", Options{IdempotencyHeader: "Idempotency Key"}, "idempotency_header", "HTTP header name"},
		{"max_rate negative", Options{MaxRate: -1}, "consumer.max_rate", "0 (unlimited) or more"},
		{"max_rate NaN", Options{MaxRate: math.NaN()}, "consumer.max_rate", "0 (unlimited) or more"},
		{"shutdown timeout negative", Options{ShutdownTimeout: -time.Second}, "shutdown_timeout", "at least 0s"},
		{"max body negative", Options{MaxBodyBytes: -1}, "max_body_bytes", "0 (no bound) or more"},
		{"two dead-letter destinations", Options{DeadLetter: config.DeadLetter{Queue: "d", Exchange: "x"}}, "dead_letter", "only one"},
		{"dead-letter status out of range", Options{DeadLetter: config.DeadLetter{Queue: "d", Statuses: []int{200}}}, "dead_letter.statuses", "300 to 599"},
		{"dead letters back to the own queue", Options{Session: orders, DeadLetter: config.DeadLetter{Queue: "orders-queue"}}, "dead_letter.queue", "forever"},
		{"dead letters back through the binding", Options{Session: orders, DeadLetter: config.DeadLetter{Exchange: "orders", RoutingKey: "orders.dead"}}, "dead_letter.routing_key", "forever"},
		{"dead letters keeping their key", Options{Session: orders, DeadLetter: config.DeadLetter{Exchange: "orders"}}, "dead_letter.exchange", "forever"},
		{"retry ignored with nack_discard", Options{NackDiscard: true, Retry: config.Retry{MaxAttempts: 3}}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.Name, tc.opts.Logger = "n", logging.NoOp
			type built struct {
				a   *Agent
				err error
			}
			done := make(chan built, 1)
			go func() {
				a, err := New(tc.opts)
				done <- built{a, err}
			}()
			var got built
			select {
			case got = <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("New does not return")
			}
			if tc.field == "" {
				if got.err != nil || got.a == nil {
					t.Fatalf("New: %v", got.err)
				}
				return
			}
			if got.err == nil {
				t.Fatal("New: no error")
			}
			var fe *config.FieldError
			if !errors.As(got.err, &fe) || fe.Field != tc.field || !strings.Contains(fe.Reason, tc.want) {
				t.Errorf("New: %v, want an error on %s saying %q", got.err, tc.field, tc.want)
			}
			if !strings.HasPrefix(got.err.Error(), `agent "n": `+tc.field+": ") {
				t.Errorf("New: %q does not name the agent and the field", got.err)
			}
		})
	}
}
