//go:build integration

package asyncamqp_test

import (
	"net/http"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// TestQuorumDeadLetterQueue: the dead-letter queue of a quorum work queue
// is declared as a quorum queue, so that it survives a node's loss as the
// work does; one that exists already as a classic queue (an earlier
// version declared it) is kept, and the agent dead-letters into it.
func TestQuorumDeadLetterQueue(t *testing.T) {
	for _, tc := range []struct {
		name, existing, want string
	}{
		{"new", "", "quorum"},
		{"classic already", "classic", "classic"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := brokertest.Dial(t)
			queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
			dead := queue + ".dead"
			brokertest.Cleanup(t, conn, queue, exchange)
			if tc.existing != "" {
				ch, err := conn.Channel()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := ch.QueueDeclare(dead, true, false, false, false, nil); err != nil {
					t.Fatal(err)
				}
				_ = ch.Close()
			}
			be := newBackend(t, func(int, received) int { return http.StatusBadRequest })
			g := startAgents(t, agentSpec{Name: "dlq", Topic: "k", Workers: 1, Backend: be.URL, Block: block(queue, exchange, map[string]interface{}{
				"queue_args":  map[string]interface{}{"x-queue-type": "quorum"},
				"dead_letter": map[string]interface{}{"queue": dead, "statuses": []interface{}{400}},
			})})
			g.waitPing(t, "dlq")
			brokertest.NewPublisher(t, conn).Publish(exchange, "k", amqp.Publishing{Body: []byte("bad"), DeliveryMode: amqp.Persistent})
			brokertest.Eventually(t, 30*time.Second, "the message in the dead-letter queue", func() bool {
				q, ok := brokertest.Queue(t, dead)
				return ok && q.Ready == 1
			})
			if got := queueType(t, dead); got != tc.want {
				t.Errorf("dead-letter queue is %q, want %q", got, tc.want)
			}
		})
	}
}
