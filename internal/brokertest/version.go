package brokertest

import (
	"errors"
	"strings"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

// The suite runs on RabbitMQ 3.10 and on 4.x with 4.3's deprecated
// features denied. Where their rules differ, a test asserts the rule of
// the broker it runs on, found by asking the broker, not by its version.

// DeniesTransientQueues tells whether the broker refuses a queue that is
// neither durable nor exclusive (RabbitMQ 4.3's default, the deprecated
// feature transient_nonexcl_queues denied).
func DeniesTransientQueues(t testing.TB) bool {
	t.Helper()
	conn := Dial(t)
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	name := Name(t, "probe")
	const durable, autoDelete, exclusive, noWait = false, true, false, false
	_, err = ch.QueueDeclare(name, durable, autoDelete, exclusive, noWait, nil)
	if err == nil {
		_, _ = ch.QueueDelete(name, false, false, false)
		return false
	}
	var aerr *amqp.Error
	if !errors.As(err, &aerr) || !strings.Contains(aerr.Reason, "transient_nonexcl_queues") {
		t.Fatalf("declare a transient queue to probe the broker: %v", err)
	}
	return true
}

// Version is the broker's version, as it tells its clients.
func Version(t testing.TB) string {
	t.Helper()
	v, _ := Dial(t).Properties["version"].(string)
	return v
}
