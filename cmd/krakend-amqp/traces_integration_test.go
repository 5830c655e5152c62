//go:build integration

package main

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// collector is an OTLP/HTTP trace receiver that keeps every span with
// the service.name of its resource.
type collector struct {
	*httptest.Server
	mu    sync.Mutex
	spans []exported
}

type exported struct {
	service string
	span    *tracepb.Span
}

func newCollector(t *testing.T) *collector {
	c := &collector{}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var req collectortrace.ExportTraceServiceRequest
		if r.URL.Path != "/v1/traces" || proto.Unmarshal(body, &req) != nil {
			http.Error(w, "not an OTLP trace export", http.StatusBadRequest)
			return
		}
		c.mu.Lock()
		for _, rs := range req.ResourceSpans {
			service := ""
			for _, kv := range rs.GetResource().GetAttributes() {
				if kv.Key == "service.name" {
					service = kv.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					c.spans = append(c.spans, exported{service: service, span: s})
				}
			}
		}
		c.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
		_, _ = w.Write(out)
	}))
	t.Cleanup(c.Close)
	return c
}

func (c *collector) received() []exported {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]exported(nil), c.spans...)
}

// TestRunExportsTracesOverOTLP runs the gateway with the standard OTLP
// variables: the consumer span of a message published with a traceparent
// reaches the collector in the publisher's trace, and the backend request
// continues that trace under the consumer span.
func TestRunExportsTracesOverOTLP(t *testing.T) {
	const (
		traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
		spanID  = "00f067aa0ba902b7"
	)
	bin := buildGateway(t)
	conn := brokertest.Dial(t)
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	brokertest.Cleanup(t, conn, queue, exchange)
	backend := newRecorder(t)
	otlp := newCollector(t)

	port := freePort(t)
	file := writeDoc(t, t.TempDir(), "krakend.json", map[string]interface{}{
		"version": 3,
		"port":    port,
		"async_agent": []interface{}{map[string]interface{}{
			"name":     "traced",
			"consumer": map[string]interface{}{"topic": "k", "workers": 2, "timeout": "2s"},
			"backend":  []interface{}{map[string]interface{}{"host": []string{backend.URL}, "url_pattern": "/events", "method": "POST"}},
			"extra_config": map[string]interface{}{asyncamqp.Namespace: map[string]interface{}{
				"host": brokertest.URL(), "name": queue, "exchange": exchange, "durable": true,
			}},
		}},
	})
	gw := startGatewayWith(t, []string{
		"OTEL_EXPORTER_OTLP_ENDPOINT=" + otlp.URL,
		"OTEL_SERVICE_NAME=amqp-e2e",
		"OTEL_BSP_SCHEDULE_DELAY=100",
	}, bin, "run", "-c", file)
	gw.waitHealth(t, port, "traced")
	gw.expectLogs(t, "exporting traces over OTLP http/protobuf")

	pub := brokertest.NewPublisher(t, conn)
	pub.Publish(exchange, "k", amqp.Publishing{MessageId: "m-1", Body: []byte(`{}`),
		Headers: amqp.Table{"traceparent": "00-" + traceID + "-" + spanID + "-01"}})
	brokertest.Eventually(t, 20*time.Second, "the message at the backend", func() bool { return backend.count() == 1 })
	var consumer *tracepb.Span
	brokertest.Eventually(t, 20*time.Second, "the consumer span at the collector", func() bool {
		for _, e := range otlp.received() {
			if e.span.GetName() == "process "+exchange {
				consumer = e.span
				if e.service != "amqp-e2e" {
					t.Errorf("service.name %q, want OTEL_SERVICE_NAME's", e.service)
				}
			}
		}
		return consumer != nil
	})
	if got := fmt.Sprintf("%x", consumer.GetTraceId()); got != traceID {
		t.Errorf("consumer span trace %s, want the publisher's %s", got, traceID)
	}
	if got := fmt.Sprintf("%x", consumer.GetParentSpanId()); got != spanID {
		t.Errorf("consumer span parent %s, want the publisher's span %s", got, spanID)
	}
	if consumer.GetKind() != tracepb.Span_SPAN_KIND_CONSUMER {
		t.Errorf("span kind %v, want consumer", consumer.GetKind())
	}
	want := fmt.Sprintf("00-%s-%x-01", traceID, consumer.GetSpanId())
	if got := backend.requests()[0].Header.Get("Traceparent"); got != want {
		t.Errorf("backend traceparent %q, want %q", got, want)
	}
	if code := gw.terminate(t); code != exitOK {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	if strings.Contains(gw.out.String(), "traces export") {
		t.Errorf("the exporter reported errors:\n%s", gw.out.String())
	}
}
