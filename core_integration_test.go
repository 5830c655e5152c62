//go:build integration

package asyncamqp_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

func TestAcksOn2xxAndEmptiesQueue(t *testing.T) {
	conn := brokertest.Dial(t)
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	brokertest.Cleanup(t, conn, queue, exchange)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "acks", Topic: "orders.*", Workers: 4, Backend: be.URL, Block: block(queue, exchange, nil)})
	gw.waitPing(t, "acks")

	pub := brokertest.NewPublisher(t, conn)
	pub.PublishN(exchange, "orders.created", 200, func(i int) []byte { return []byte(fmt.Sprintf(`{"n":%d}`, i)) })

	brokertest.Eventually(t, 20*time.Second, "200 requests", func() bool { return be.count() >= 200 })
	brokertest.Eventually(t, 10*time.Second, "an empty queue", func() bool {
		ready, unacked := brokertest.Counts(t, queue)
		return ready == 0 && unacked == 0
	})
	if n := be.count(); n != 200 {
		t.Errorf("backend got %d requests, want 200", n)
	}
}
