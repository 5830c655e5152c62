package consumer

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestDeniedFeature(t *testing.T) {
	reason := "INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated.\nIts use is not permitted per the configuration"
	err := fmt.Errorf("wrapped: %w", &amqp.Error{Code: amqp.InternalError, Reason: reason, Server: true})
	denied := deniedFeature(err, "orders", Topology{})
	var d *DeniedFeatureError
	if !errors.As(denied, &d) || d.Feature != "transient_nonexcl_queues" || d.Queue != "orders" {
		t.Fatalf("deniedFeature = %#v", denied)
	}
	msg := denied.Error()
	for _, want := range []string{`queue "orders"`, "transient_nonexcl_queues", `set "durable": true`, "RabbitMQ 4.3", "is deprecated."} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "not permitted") {
		t.Errorf("%q keeps the broker's advice", msg)
	}
	if !errors.Is(denied, err) && !errors.As(denied, new(*amqp.Error)) {
		t.Error("the broker's error is not in the chain")
	}
	locator := deniedFeature(&amqp.Error{Code: amqp.InternalError, Reason: "Feature `queue_master_locator` is deprecated."}, "q", Topology{})
	if locator == nil || !strings.Contains(locator.Error(), "x-queue-master-locator") {
		t.Errorf("queue_master_locator: %v", locator)
	}
	for _, other := range []error{
		&amqp.Error{Code: amqp.InternalError, Reason: "INTERNAL_ERROR"},
		&amqp.Error{Code: amqp.PreconditionFailed, Reason: "Feature `x` is deprecated"},
		errors.New("EOF"),
	} {
		if got := deniedFeature(other, "q", Topology{}); got != nil {
			t.Errorf("deniedFeature(%v) = %v, want nil", other, got)
		}
	}
}
