package consumer

import (
	"errors"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestRetryQueueNames(t *testing.T) {
	for d, want := range map[time.Duration]string{
		50 * time.Millisecond:   "q.retry.50ms",
		time.Second:             "q.retry.1s",
		2500 * time.Millisecond: "q.retry.2500ms",
		time.Minute:             "q.retry.1m",
		90 * time.Second:        "q.retry.90s",
		2 * time.Hour:           "q.retry.2h",
	} {
		if got := RetryQueue("q", d); got != want {
			t.Errorf("RetryQueue(%s) = %q, want %q", d, got, want)
		}
	}
}

func TestDeclareErrorsSayWhatDiffers(t *testing.T) {
	precondition := &amqp.Error{Code: amqp.PreconditionFailed, Reason: "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x': received 'topic' but current is 'direct'"}
	topo := Topology{Exchange: "x", ExchangeType: "topic", Queue: "q", Durable: true}
	for _, tc := range []struct {
		name  string
		err   error
		want  []string
		wraps bool // the broker's own error stays reachable with errors.Is
	}{
		{"exchange of another type", exchangeError(precondition, topo), []string{`exchange "x"`, "already exists with other settings", "type topic", "current is 'direct'"}, true},
		{"queue with other flags", queueError(precondition, topo), []string{`queue "q"`, "already exists with other settings", "durable true"}, true},
		{"queue locked", queueError(&amqp.Error{Code: amqp.ResourceLocked, Reason: "RESOURCE_LOCKED"}, topo), []string{"exclusive to another connection"}, false},
		{"prefetch size", qosError(&amqp.Error{Code: amqp.NotImplemented, Reason: "NOT_IMPLEMENTED"}, Settings{PrefetchSize: 10}), []string{"prefetch_size 10", "only supports 0"}, false},
		{"other", exchangeError(errors.New("boom"), topo), []string{`declare exchange "x": boom`}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, w := range tc.want {
				if !strings.Contains(tc.err.Error(), w) {
					t.Errorf("%q lacks %q", tc.err, w)
				}
			}
			if tc.wraps && !errors.Is(tc.err, precondition) {
				t.Errorf("%q does not wrap the broker's error", tc.err)
			}
		})
	}
}

func TestConsumerTagIsUniqueAndBounded(t *testing.T) {
	a, b := consumerTag("orders"), consumerTag("orders")
	if a == b || !strings.HasPrefix(a, "krakend-amqp.orders.") {
		t.Errorf("tags %q and %q", a, b)
	}
	if long := consumerTag(strings.Repeat("x", 400)); len(long) > 255 {
		t.Errorf("tag of %d bytes, AMQP allows 255", len(long))
	}
}

func TestOpenWithNoURLIsAnError(t *testing.T) {
	if _, err := Open(t.Context(), Settings{}); err == nil || !strings.Contains(err.Error(), "no broker URL") {
		t.Errorf("Open with no URL: %v", err)
	}
}

// TestFailureQueuesFollowTheWorkQueueType: with a quorum work queue, the
// retry and dead-letter queues are quorum queues too, so that they
// survive the loss of a cluster node as the work queue does.
func TestFailureQueuesFollowTheWorkQueueType(t *testing.T) {
	quorum := Settings{Topology: Topology{Queue: "q", QueueArgs: amqp.Table{"x-queue-type": "quorum"}}}
	if got := deadLetterQueueArgs(quorum)["x-queue-type"]; got != "quorum" {
		t.Errorf("dead-letter queue of a quorum queue: x-queue-type %v, want quorum", got)
	}
	if got := retryQueueArgs(quorum, time.Second)["x-queue-type"]; got != "quorum" {
		t.Errorf("retry queue of a quorum queue: x-queue-type %v, want quorum", got)
	}
	classic := Settings{Topology: Topology{Queue: "q"}}
	if args := deadLetterQueueArgs(classic); args != nil {
		t.Errorf("dead-letter queue of a classic queue: arguments %v, want none", args)
	}
	if _, ok := retryQueueArgs(classic, time.Second)["x-queue-type"]; ok {
		t.Error("retry queue of a classic queue has an x-queue-type")
	}
}
