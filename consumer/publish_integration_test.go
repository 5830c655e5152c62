//go:build integration

package consumer

import (
	"context"
	"errors"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// queueType reads a queue's type (classic, quorum) with rabbitmqctl.
func queueType(t *testing.T, name string) string {
	t.Helper()
	for _, f := range brokertest.Rabbitmqctl(t, "list_queues", "--no-table-headers", "name", "type") {
		if len(f) == 2 && f[0] == name {
			return f[1]
		}
	}
	t.Fatalf("queue %q does not exist", name)
	return ""
}

// TestPublishDeclaresADeletedDeadLetterQueueAgain: an operator deletes
// the dead-letter queue while the session runs; the next dead letter
// declares it again, as at connect (a quorum queue for a quorum work
// queue), and lands in it.
func TestPublishDeclaresADeletedDeadLetterQueueAgain(t *testing.T) {
	for _, tc := range []struct {
		name string
		args amqp.Table
		want string
	}{
		{"classic", nil, "classic"},
		{"quorum", amqp.Table{"x-queue-type": "quorum"}, "quorum"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := brokertest.Dial(t)
			queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
			dead := queue + ".dead"
			brokertest.Cleanup(t, conn, queue, exchange)

			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			sess, err := Open(ctx, Settings{
				URLs: []string{brokertest.URL()}, Name: "dlq-redeclare",
				Topology: Topology{Exchange: exchange, ExchangeType: "topic", Queue: queue, RoutingKeys: []string{"k"},
					QueueArgs: tc.args, Durable: true},
				PrefetchCount: 1, DeadLetterQueue: dead, Publish: true,
			})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer sess.Close()
			if got := queueType(t, dead); got != tc.want {
				t.Fatalf("dead-letter queue declared at connect as %s, want %s", got, tc.want)
			}

			ch, err := conn.Channel()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ch.QueueDelete(dead, false, false, false); err != nil {
				t.Fatalf("delete the dead-letter queue: %v", err)
			}
			_ = ch.Close()

			msg := amqp.Publishing{MessageId: "dead-1", Body: []byte(`{"a":1}`), DeliveryMode: amqp.Persistent}
			if err := sess.Publish(ctx, "", dead, msg); err != nil {
				t.Fatalf("Publish to the deleted dead-letter queue: %v", err)
			}
			if got := queueType(t, dead); got != tc.want {
				t.Errorf("dead-letter queue declared again as %s, want %s", got, tc.want)
			}
			if ids := brokertest.Drain(t, conn, dead); len(ids) != 1 || ids[0] != "dead-1" {
				t.Errorf("dead-letter queue holds %v, want [dead-1]", ids)
			}
		})
	}
}

// TestPublishRefusalsKeepTheBrokersCode: a copy the broker refuses comes
// back from Publish with the broker's *amqp.Error (and its code) reachable
// with errors.As, an unroutable one as ErrUnroutable; the next copy goes
// out on a fresh channel.
func TestPublishRefusalsKeepTheBrokersCode(t *testing.T) {
	conn := brokertest.Dial(t)
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	internal, unbound := exchange+"-internal", exchange+"-unbound"
	brokertest.Cleanup(t, conn, queue, exchange)
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.ExchangeDeclare(internal, "topic", false, true, true, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(unbound, "topic", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = ch.ExchangeDelete(internal, false, false)
		_ = ch.ExchangeDelete(unbound, false, false)
	})

	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	sess, err := Open(ctx, Settings{
		URLs: []string{brokertest.URL()}, Name: "refusals",
		Topology:      Topology{Exchange: exchange, ExchangeType: "topic", Queue: queue, RoutingKeys: []string{"k"}, Durable: true},
		PrefetchCount: 1, Publish: true,
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer sess.Close()

	body := amqp.Publishing{Body: []byte("x")}
	for _, tc := range []struct {
		name          string
		exchange, key string
		msg           amqp.Publishing
		code          int // 0: ErrUnroutable
	}{
		{"exchange not found", exchange + "-missing", "k", body, amqp.NotFound},
		{"internal exchange", internal, "k", body, amqp.AccessRefused},
		{"user_id of another user", exchange, "k", amqp.Publishing{UserId: "not-" + brokertest.Name(t, "user"), Body: []byte("x")}, amqp.PreconditionFailed},
		{"unroutable", unbound, "k", body, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Repeated: the next copy once went out on the closed
			// channel now and then.
			for range 5 {
				err := sess.Publish(ctx, tc.exchange, tc.key, tc.msg)
				var aerr *amqp.Error
				switch {
				case tc.code == 0 && !errors.Is(err, ErrUnroutable):
					t.Fatalf("Publish: %v, want ErrUnroutable", err)
				case tc.code != 0 && (!errors.As(err, &aerr) || aerr.Code != tc.code):
					t.Fatalf("Publish: %v, want an *amqp.Error with code %d", err, tc.code)
				}
				if err := sess.Publish(ctx, exchange, "k", body); err != nil {
					t.Fatalf("the next copy: %v", err)
				}
			}
		})
	}
}
