package driver

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/backoff"
	"github.com/luraproject/lura/v2/logging"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

func TestBackoffStaysWithinBoundsForEveryLuraStrategy(t *testing.T) {
	for _, name := range []string{"", "linear", "linear-jitter", "exponential", "exponential-jitter"} {
		t.Run(name, func(t *testing.T) {
			a := New(Options{Name: "b", Backoff: backoff.GetByName(name)})
			for retries := 1; retries <= 200; retries++ {
				if got := a.backoff(retries); got <= 0 || got > MaxBackoff {
					t.Fatalf("retry %d: wait %s, want within (0, %s]", retries, got, MaxBackoff)
				}
			}
		})
	}
}

func TestBackoffFollowsTheStrategyBelowTheCap(t *testing.T) {
	a := New(Options{Name: "b", Backoff: backoff.ExponentialBackoff})
	for retries, want := range map[int]time.Duration{1: 2 * time.Second, 3: 8 * time.Second, 5: 32 * time.Second, 6: MaxBackoff} {
		if got := a.backoff(retries); got != want {
			t.Errorf("retry %d: got %s, want %s", retries, got, want)
		}
	}
}

func TestBackoffSurvivesAPanickingStrategy(t *testing.T) {
	a := New(Options{Name: "b", Backoff: func(int) time.Duration { panic("boom") }})
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
		New(Options{Name: "p", Workers: tc.workers, Session: consumer.Settings{PrefetchCount: tc.prefetch}, Logger: l})
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
