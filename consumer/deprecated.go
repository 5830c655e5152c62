package consumer

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
)

// RabbitMQ 4 deprecates some features, and 4.3 denies three of them by
// default (an operator may deny them earlier with
// deprecated_features.permit.<name> = false). Using one then closes the
// connection with 541 INTERNAL_ERROR and a reason that names the
// feature. It is a configuration matter that no reconnect mends: the
// error says which field to change.

// DeniedFeatureError is a declaration the broker refused because it uses
// a deprecated feature the broker denies.
type DeniedFeatureError struct {
	// Feature is the broker's name of it, e.g. transient_nonexcl_queues.
	Feature string
	// Queue is the queue whose declaration was refused.
	Queue string
	// Fix says what to change in the agent's configuration.
	Fix string
	Err error
}

func (e *DeniedFeatureError) Error() string {
	said, _, _ := strings.Cut(e.Err.Error(), `\n`) // its first line: the rest is the broker's advice
	return fmt.Sprintf("declare queue %q: RabbitMQ denies its deprecated feature %s (denied by default from RabbitMQ 4.3): %s; the broker says: %s",
		e.Queue, e.Feature, e.Fix, said)
}

func (e *DeniedFeatureError) Unwrap() error { return e.Err }

var featureName = regexp.MustCompile("Feature `([a-z_]+)` is deprecated")

// deniedFeature turns a refusal for a denied deprecated feature into a
// DeniedFeatureError; nil for any other error.
func deniedFeature(err error, queue string, t Topology) error {
	var aerr *amqp.Error
	if !errors.As(err, &aerr) || aerr.Code != amqp.InternalError {
		return nil
	}
	m := featureName.FindStringSubmatch(aerr.Reason)
	if m == nil {
		return nil
	}
	return &DeniedFeatureError{Feature: m[1], Queue: queue, Fix: featureFix(m[1], t), Err: err}
}

// featureFix says what to change for a denied feature.
func featureFix(feature string, t Topology) string {
	switch feature {
	case "transient_nonexcl_queues":
		return `the queue is neither durable nor exclusive: set "durable": true in the agent's async/amqp block ` +
			`(or "exclusive": true, for a queue of one connection)`
	case "queue_master_locator":
		return "remove x-queue-master-locator from queue_args (RabbitMQ places queue leaders itself)"
	case "global_qos":
		return "the driver never asks for a global prefetch: report it"
	}
	return fmt.Sprintf("see RabbitMQ's deprecated features for %s, then change the agent's settings that use it (durable %t, exclusive %t, queue_args %v)",
		feature, t.Durable, t.Exclusive, t.QueueArgs)
}
