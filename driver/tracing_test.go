package driver

import (
	"context"
	"net/http"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/propagation"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	"github.com/krakend-contrib/async-amqp/consumer"
)

const testTraceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

func TestTableCarrierReadsTraceHeaders(t *testing.T) {
	for _, tc := range []struct {
		name    string
		headers amqp.Table
		want    string
	}{
		{"lower case", amqp.Table{"traceparent": testTraceparent}, testTraceparent},
		{"any case", amqp.Table{"TraceParent": testTraceparent}, testTraceparent},
		{"bytes", amqp.Table{"traceparent": []byte(testTraceparent)}, testTraceparent},
		{"exact name first", amqp.Table{"traceparent": testTraceparent, "TRACEPARENT": "junk"}, testTraceparent},
		{"not text", amqp.Table{"traceparent": int64(7)}, ""},
		{"table", amqp.Table{"traceparent": amqp.Table{"a": "b"}}, ""},
		{"absent", nil, ""},
	} {
		if got := tableCarrier(tc.headers).Get("traceparent"); got != tc.want {
			t.Errorf("%s: Get = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// With no tracer, the publisher's span context passes through a
// non-recording span to the backend request unchanged; malformed or
// absent trace context injects nothing.
func TestTraceContextWithoutTracer(t *testing.T) {
	tr := newTracing(tracenoop.NewTracerProvider(), propagation.TraceContext{}, "a", consumer.Topology{Exchange: "x", Queue: "q"}, nil)
	for _, tc := range []struct {
		name    string
		headers amqp.Table
		want    string
	}{
		{"traced", amqp.Table{"traceparent": testTraceparent}, testTraceparent},
		{"malformed", amqp.Table{"traceparent": "00-zz-00f067aa0ba902b7-01"}, ""},
		{"all-zero trace id", amqp.Table{"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}, ""},
		{"absent", nil, ""},
	} {
		d := &amqp.Delivery{Headers: tc.headers}
		ctx, span := tr.begin(context.Background(), d)
		h := map[string][]string{}
		tr.inject(ctx, h)
		tr.end(span, plain(d), OutcomeAcked, result{ok: true})
		if got := http.Header(h).Get("Traceparent"); got != tc.want {
			t.Errorf("%s: backend traceparent %q, want %q", tc.name, got, tc.want)
		}
	}
	if tr.name != "process x" {
		t.Errorf("span name %q", tr.name)
	}
	if got := newTracing(nil, nil, "a", consumer.Topology{Queue: "q"}, nil).name; got != "process q" {
		t.Errorf("default exchange: span name %q, want the queue's", got)
	}
}

// BenchmarkWorkPropagated is BenchmarkWork with the W3C propagator and no
// tracer, as in the gateway without trace export: the publisher's
// traceparent is read and written into each backend request.
func BenchmarkWorkPropagated(b *testing.B) {
	benchWork(b, Options{TracerProvider: tracenoop.NewTracerProvider(), Propagator: propagation.TraceContext{}})
}
