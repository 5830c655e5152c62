package driver

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

func TestOrderingKeyReaders(t *testing.T) {
	a := mustNew(Options{Name: "o", Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}}, Logger: logging.NoOp})
	d := &amqp.Delivery{RoutingKey: "orders.created", MessageId: "m-1", CorrelationId: "c-1", Type: "t",
		Headers: amqp.Table{"order": "o-7", "account": int32(42), "bytes": []byte("b"), "table": amqp.Table{"x": 1}, "float": 1.5}}
	for spec, want := range map[string]string{
		"routing_key": "orders.created", "property:message_id": "m-1", "property:correlation_id": "c-1",
		"property:type": "t", "header:order": "o-7", "header:account": "42", "header:bytes": "b",
	} {
		if got, ok := orderingKey(spec)(a, d); !ok || got != want {
			t.Errorf("%s: %q %t, want %q", spec, got, ok, want)
		}
	}
	for _, spec := range []string{"header:table", "header:float", "header:missing", "property:app_id", "property:user_id"} {
		if got, ok := orderingKey(spec)(a, d); ok {
			t.Errorf("%s: key %q, want none", spec, got)
		}
	}
	if orderingKey("") != nil {
		t.Error("an empty ordering_key orders")
	}
	// A copy back from a retry queue is ordered by where it was first
	// published, not by the retry queue's routing.
	back := expiredFrom(&amqp.Delivery{Headers: amqp.Table{HeaderOriginalRoutingKey: "orders.created",
		HeaderOriginalExchange: "orders"}}, consumer.RetryQueue("work", a.opts.Session.RetryDelays[0]))
	if got, _ := orderingKey("routing_key")(a, back); got != "orders.created" {
		t.Errorf("a retried copy's routing key: %q", got)
	}
}

// Messages that share a key reach the backend one at a time, in delivery
// order; other keys run in parallel, and a message without the key is
// not held.
func TestOrderedKeysAreDispatchedInOrder(t *testing.T) {
	const keys, perKey, workers = 8, 40, 6
	var (
		mu       sync.Mutex
		seen     = map[string][]int{}
		busy     = map[string]bool{}
		inFlight atomic.Int64
		most     atomic.Int64
		overlap  []string
	)
	backend := func(_ context.Context, r *proxy.Request) (*proxy.Response, error) {
		key := "none"
		if h := r.Headers["X-Amqp-Header-Order"]; len(h) > 0 {
			key = h[0]
		}
		n, _ := strconv.Atoi(r.Headers["X-Amqp-Message-Id"][0])
		mu.Lock()
		if busy[key] {
			overlap = append(overlap, key)
		}
		busy[key] = true
		seen[key] = append(seen[key], n)
		mu.Unlock()
		if now := inFlight.Add(1); now > most.Load() {
			most.Store(now)
		}
		time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		inFlight.Add(-1)
		mu.Lock()
		busy[key] = false
		mu.Unlock()
		return &proxy.Response{IsComplete: true}, nil
	}
	a := mustNew(Options{Name: "ordered", Session: consumer.Settings{AutoAck: true}, Workers: workers, Timeout: time.Second,
		OrderingKey: "header:order", Proxy: backend, Logger: logging.NoOp})
	ch := make(chan amqp.Delivery, keys*perKey+1)
	for i := range keys * perKey {
		ch <- amqp.Delivery{DeliveryTag: uint64(i + 1), MessageId: strconv.Itoa(i),
			Headers: amqp.Table{"order": fmt.Sprintf("k%d", i%keys)}}
	}
	ch <- amqp.Delivery{DeliveryTag: keys*perKey + 1, MessageId: "-1", Headers: amqp.Table{}} // no key
	close(ch)
	ctx := context.Background()
	a.consume(ctx, ctx, &fakeSession{ch: ch}, workers)

	if len(overlap) > 0 {
		t.Errorf("keys dispatched twice at once: %v", overlap)
	}
	for k := range keys {
		got := seen[fmt.Sprintf("k%d", k)]
		if len(got) != perKey {
			t.Errorf("key k%d: %d messages, want %d", k, len(got), perKey)
		}
		for i := 1; i < len(got); i++ {
			if got[i] < got[i-1] {
				t.Errorf("key k%d: message %d after %d", k, got[i], got[i-1])
				break
			}
		}
	}
	if got := seen["none"]; len(got) != 1 {
		t.Errorf("the message without a key: dispatched %d times, want once", len(got))
	}
	if most.Load() < 2 {
		t.Errorf("at most %d dispatch in flight: keys did not run in parallel", most.Load())
	}
}

// BenchmarkOrderedKeys: 16 workers, 50 keys in turn, a backend of random
// latency (0 to 2 ms), with and without ordering_key. The sequencer's
// cost, and what waiting for busy keys costs, without a broker.
func BenchmarkOrderedKeys(b *testing.B) {
	for _, spec := range []string{"", "header:order"} {
		name := "unordered"
		if spec != "" {
			name = "ordered"
		}
		b.Run(name, func(b *testing.B) {
			backend := func(context.Context, *proxy.Request) (*proxy.Response, error) {
				time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
				return &proxy.Response{IsComplete: true}, nil
			}
			a := mustNew(Options{Name: "b", Session: consumer.Settings{AutoAck: true}, Workers: 16, Timeout: time.Minute,
				OrderingKey: spec, Proxy: backend, Logger: logging.NoOp})
			ch := make(chan amqp.Delivery, 100) // the prefetch window
			keys := make([]amqp.Table, 50)
			for i := range keys {
				keys[i] = amqp.Table{"order": fmt.Sprintf("k%d", i)}
			}
			go func() {
				for i := range b.N {
					ch <- amqp.Delivery{DeliveryTag: uint64(i + 1), Headers: keys[i%len(keys)]}
				}
				close(ch)
			}()
			b.ResetTimer()
			a.consume(context.Background(), context.Background(), &fakeSession{ch: ch}, 16)
		})
	}
}
