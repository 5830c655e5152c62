//go:build integration

package consumer_test

import (
	"context"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// TestUnreadableHeadersDoNotStopTheSession: RabbitMQ takes a message
// whose header amqp091 refuses to read (an array of 8193 elements); the
// session still gets it, with its headers replaced and Unreadable saying
// why, and the healthy message behind it on the same session.
func TestUnreadableHeadersDoNotStopTheSession(t *testing.T) {
	for name, args := range map[string]amqp.Table{
		"classic": nil,
		"quorum":  {"x-queue-type": "quorum"},
	} {
		t.Run(name, func(t *testing.T) {
			conn := brokertest.Dial(t)
			queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
			brokertest.Cleanup(t, conn, queue, exchange)
			ch, err := conn.Channel()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ch.QueueDeclare(queue, true, false, false, false, args); err != nil {
				t.Fatal(err)
			}
			big := make([]any, 8193)
			for i := range big {
				big[i] = int32(i)
			}
			pub := brokertest.NewPublisher(t, conn)
			pub.Publish("", queue, amqp.Publishing{Headers: amqp.Table{"big": big}, Body: []byte("poison")})
			pub.Publish("", queue, amqp.Publishing{Headers: amqp.Table{"ok": "yes"}, Body: []byte("fine")})
			if q, err := ch.QueueDeclarePassive(queue, true, false, false, false, args); err != nil || q.Messages != 2 {
				t.Fatalf("the broker holds %d messages (%v), want 2", q.Messages, err)
			}

			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			sess, err := consumer.Open(ctx, consumer.Settings{
				URLs: []string{brokertest.URL()},
				Topology: consumer.Topology{
					Exchange: exchange, ExchangeType: "topic", Queue: queue, RoutingKeys: []string{"#"},
					QueueArgs: args, Mode: config.TopologyDeclare, Durable: true,
				},
				PrefetchCount: 10,
				Name:          "unreadable-test",
				DialTimeout:   5 * time.Second,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer sess.Close()
			next := func() amqp.Delivery {
				t.Helper()
				select {
				case d, ok := <-sess.Deliveries():
					if !ok {
						t.Fatalf("deliveries closed: %v", sess.Err())
					}
					if err := d.Ack(false); err != nil {
						t.Fatal(err)
					}
					return d
				case <-ctx.Done():
					t.Fatal("no delivery")
				}
				return amqp.Delivery{}
			}
			poison := next()
			if _, ok := poison.Headers["big"]; ok || string(poison.Body) != "poison" {
				t.Errorf("first delivery: headers %v, body %q", poison.Headers, poison.Body)
			}
			reason, ok := sess.Unreadable(poison.DeliveryTag)
			if !ok || !strings.Contains(reason, `"big"`) || !strings.Contains(reason, "8192") {
				t.Errorf("Unreadable(%d) = %q, %t; want the header and the limit named", poison.DeliveryTag, reason, ok)
			}
			healthy := next()
			if healthy.Headers["ok"] != "yes" || string(healthy.Body) != "fine" {
				t.Errorf("healthy delivery: headers %v, body %q", healthy.Headers, healthy.Body)
			}
			if reason, ok := sess.Unreadable(healthy.DeliveryTag); ok {
				t.Errorf("healthy delivery reported unreadable: %q", reason)
			}
		})
	}
}
