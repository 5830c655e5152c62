package driver

import (
	"context"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

// nopAcker settles nothing: the benchmark measures the driver's own work
// per message (mapping, dispatch, outcome, settling), without a broker.
type nopAcker struct{}

func (nopAcker) Ack(uint64, bool) error        { return nil }
func (nopAcker) Nack(uint64, bool, bool) error { return nil }
func (nopAcker) Reject(uint64, bool) error     { return nil }

// benchWork pushes b.N deliveries through one worker, with a pipeline
// that answers 200 at once.
func benchWork(b *testing.B, opts Options) {
	opts.Name, opts.Workers, opts.Timeout, opts.Logger = "bench", 1, time.Minute, logging.NoOp
	opts.Session = consumer.Settings{Topology: consumer.Topology{Exchange: "x", Queue: "q"}, AutoAck: true}
	opts.Proxy = func(context.Context, *proxy.Request) (*proxy.Response, error) {
		return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil
	}
	a := mustNew(opts)
	body := make([]byte, 512)
	ch := make(chan amqp.Delivery, 256)
	go func() {
		for i := 0; i < b.N; i++ {
			ch <- amqp.Delivery{
				Acknowledger: nopAcker{}, DeliveryTag: uint64(i + 1), Exchange: "x", RoutingKey: "orders.created",
				ContentType: "application/json", MessageId: "m-1", Body: body,
				Headers: amqp.Table{"tenant": "acme", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
			}
		}
		close(ch)
	}()
	b.ReportAllocs()
	b.ResetTimer()
	a.work(context.Background(), context.Background(), a.flowOf(&fakeSession{ch: ch}))
}

// BenchmarkWork is the path of every message with no tracer and no
// propagator (OpenTelemetry's global no-ops).
func BenchmarkWork(b *testing.B) { benchWork(b, Options{}) }

// BenchmarkWorkBackPressure is BenchmarkWork with back_pressure on, its
// default: a healthy backend pays one lock per dispatch start and end.
func BenchmarkWorkBackPressure(b *testing.B) { benchWork(b, Options{BackPressure: true}) }
