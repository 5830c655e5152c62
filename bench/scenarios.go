package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/luraproject/lura/v2/async"
	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	"github.com/luraproject/lura/v2/transport/http/server"
	amqp "github.com/rabbitmq/amqp091-go"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// point is one W/prefetch setting: consumer workers and basic.qos count.
type point struct{ workers, prefetch int }

func (p point) String() string { return fmt.Sprintf("%d/%d", p.workers, p.prefetch) }

// scenario is one way of moving the pre-loaded queue to the backend.
type scenario struct {
	name  string // as given to -only
	label string
	run   func(ctx context.Context, e *env, p point, queue string, n int) (outcome, error)
	// floor names the scenario that ours is compared with; empty for
	// the reference scenarios.
	floor string
	// optional scenarios run only when -only names them.
	optional bool
}

var scenarios = []scenario{
	{name: "broker", label: "(d) amqp091, ack only", run: runBroker},
	{name: "http", label: "(c) amqp091 + net/http", run: runHTTP},
	{name: "floor", label: "(b) amqp091 + Lura no-op", run: runFloor("no-op")},
	{name: "floor-json", label: "(b) amqp091 + Lura json", run: runFloor("")},
	{name: "ours", label: "(a) ours, no-op", run: runOurs("no-op", false, nil), floor: "floor"},
	{name: "ours-json", label: "(a) ours, json", run: runOurs("", false, nil), floor: "floor-json", optional: true},
	{name: "ours-traced", label: "(a) ours, no-op, traced", run: runOurs("no-op", true, nil), floor: "floor", optional: true},
	{name: "ours-nobp", label: "(a) ours, no-op, back_pressure off", floor: "floor", optional: true,
		run: runOurs("no-op", false, map[string]any{"back_pressure": false})},
	{name: "ours-ordered", label: "(a) ours, no-op, ordering_key (50 keys)", floor: "floor", optional: true,
		run: runOurs("no-op", false, map[string]any{"ordering_key": "header:" + orderHeader})},
}

// orderHeader carries each message's ordering key, one of orderKeys.
const (
	orderHeader = "order"
	orderKeys   = 50
)

// dispatchTimeout is the agents' consumer.timeout, and the floor's.
const dispatchTimeout = 10 * time.Second

// env is what every scenario shares.
type env struct {
	broker  *broker
	backend *backend
	logger  logging.Logger
	// client is scenario (c)'s: as many idle connections per host as the
	// largest W.
	client *http.Client
	// cpuProfile and memProfile, when set, profile the first run of (a)
	// at each point; multiPoint adds the point to the file names.
	cpuProfile, memProfile string
	multiPoint             bool
	profiled               map[point]bool
}

// measure pre-loads a fresh queue with n messages, runs the scenario on
// it, checks what the backend saw and what is left, and deletes the queue.
func (e *env) measure(ctx context.Context, s scenario, p point, run, n int) (outcome, error) {
	queue := e.broker.queueName(s.name, p, run)
	defer e.broker.deleteQueues(queue)
	if err := e.broker.preload(ctx, queue, n); err != nil {
		return outcome{}, err
	}
	if err := e.backend.reset(ctx); err != nil {
		return outcome{}, err
	}
	// Collect the pre-loader's garbage now, not during the timed phase.
	runtime.GC()
	rctx, cancel := context.WithTimeout(ctx, runTimeout(n))
	defer cancel()
	out, err := s.run(rctx, e, p, queue, n)
	if err != nil {
		return out, err
	}
	seen, err := e.backend.count(ctx)
	if err != nil {
		return out, err
	}
	if seen > 0 {
		out.dups = seen - n
	}
	out.left, err = e.broker.ready(queue)
	return out, err
}

// runTimeout bounds one run: a minute plus 5ms a message.
func runTimeout(n int) time.Duration { return time.Minute + time.Duration(n)*5*time.Millisecond }

// handler processes one delivery of the plain consumer; true acks it.
type handler func(ctx context.Context, d *amqp.Delivery) bool

// consumePlain is the plain consumer of (b), (c) and (d): one connection
// and channel, basic.qos(prefetch), W goroutines ranging over the
// deliveries, each handling a delivery then acking it alone (or nacking
// it with requeue). It returns once n were acked. Connecting is timed.
func consumePlain(ctx context.Context, e *env, p point, queue string, n int, handle handler) (outcome, error) {
	m := startMeter()
	conn, err := amqp.Dial(e.broker.url)
	if err != nil {
		return outcome{}, err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return outcome{}, err
	}
	if err := ch.Qos(p.prefetch, 0, false); err != nil {
		return outcome{}, err
	}
	deliveries, err := ch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		return outcome{}, err
	}
	startup := time.Since(m.start)
	var acked atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range p.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range deliveries {
				if !handle(ctx, &d) {
					_ = d.Nack(false, true)
					continue
				}
				if d.Ack(false) == nil && acked.Add(1) == int64(n) {
					close(done)
				}
			}
		}()
	}
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("%d of %d messages acked: %w", acked.Load(), n, ctx.Err())
	}
	out := m.stop()
	out.startup = startup
	_ = ch.Close() // ends the deliveries
	wg.Wait()
	return out, err
}

// runBroker is (d): the broker-only ceiling.
func runBroker(ctx context.Context, e *env, p point, queue string, n int) (outcome, error) {
	return consumePlain(ctx, e, p, queue, n, func(context.Context, *amqp.Delivery) bool { return true })
}

// runHTTP is (c): a net/http POST of the body per message.
func runHTTP(ctx context.Context, e *env, p point, queue string, n int) (outcome, error) {
	url := e.backend.url + "/events"
	return consumePlain(ctx, e, p, queue, n, func(ctx context.Context, d *amqp.Delivery) bool {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(d.Body))
		if err != nil {
			return false
		}
		req.Header.Set("Content-Type", d.ContentType)
		resp, err := e.client.Do(req)
		if err != nil {
			return false
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode <= 299
	})
}

// runFloor is (b): the plain consumer calling a Lura proxy built by the
// default factory from the agent's parsed config, the way
// async.AgentStarter builds it, with the gateway's HTTP transport.
func runFloor(encoding string) func(context.Context, *env, point, string, int) (outcome, error) {
	return func(ctx context.Context, e *env, p point, queue string, n int) (outcome, error) {
		cfg, err := e.luraConfig(queue, p, encoding, nil)
		if err != nil {
			return outcome{}, err
		}
		server.InitHTTPDefaultTransport(cfg)
		agent := cfg.AsyncAgents[0]
		px, err := proxy.DefaultFactory(e.logger).New(&luraconfig.EndpointConfig{
			Endpoint: agent.Name, Timeout: agent.Consumer.Timeout, Backend: agent.Backend, ExtraConfig: agent.ExtraConfig,
		})
		if err != nil {
			return outcome{}, err
		}
		return consumePlain(ctx, e, p, queue, n, func(ctx context.Context, d *amqp.Delivery) bool {
			ctx, cancel := context.WithTimeout(ctx, dispatchTimeout)
			defer cancel()
			resp, err := px(ctx, &proxy.Request{
				Method:  http.MethodPost,
				Body:    io.NopCloser(bytes.NewReader(d.Body)),
				Headers: map[string][]string{"Content-Type": {d.ContentType}},
				Params:  map[string]string{},
			})
			if resp != nil && resp.Io != nil {
				_, _ = io.Copy(io.Discard, resp.Io)
				if c, ok := resp.Io.(io.Closer); ok {
					_ = c.Close()
				}
			}
			if err != nil || resp == nil || !resp.IsComplete {
				return false
			}
			s := resp.Metadata.StatusCode
			return s == 0 || s >= 200 && s <= 299
		})
	}
}

// runOurs is (a): the driver, started as KrakenD starts agents; done when
// the backend saw n requests and nothing is left ready in the queue.
// traced gives it a tracer provider that records every span.
func runOurs(encoding string, traced bool, block map[string]any) func(context.Context, *env, point, string, int) (outcome, error) {
	return func(ctx context.Context, e *env, p point, queue string, n int) (outcome, error) {
		cfg, err := e.luraConfig(queue, p, encoding, block)
		if err != nil {
			return outcome{}, err
		}
		defer e.broker.deleteQueues(retryQueues(cfg)...)
		server.InitHTTPDefaultTransport(cfg)
		stopProfile, err := e.profile(p)
		if err != nil {
			return outcome{}, err
		}
		factory, stopTracing := asyncamqp.StartAgent, func() {}
		if traced {
			factory, stopTracing = tracedFactory()
		}
		defer stopTracing()
		m := startMeter()
		stop, err := e.startAgent(cfg, factory)
		startup := time.Since(m.start)
		if err == nil {
			err = e.waitDrained(ctx, queue, n)
		}
		out := m.stop()
		out.startup = startup
		stopProfile()
		return out, errors.Join(err, stop())
	}
}

// startAgent starts the agents of cfg exactly as a KrakenD gateway does,
// waits until the first one consumes (its first health ping) and returns
// the function that stops them.
func (e *env) startAgent(cfg luraconfig.ServiceConfig, factory async.Factory) (stop func() error, err error) {
	ctx, cancel := context.WithCancel(context.Background())
	ping := make(chan string, 1)
	wait := async.AgentStarter{factory}.Start(ctx, cfg.AsyncAgents, e.logger, ping, proxy.DefaultFactory(e.logger))
	stop = func() error {
		cancel()
		return wait()
	}
	select {
	case <-ping:
		return stop, nil
	case <-time.After(15 * time.Second):
		return stop, errors.New("the agent did not start consuming within 15s: see its log above")
	}
}

// waitDrained waits until the backend has seen n requests and no message
// is left ready in the queue (more requests than n are duplicates).
func (e *env) waitDrained(ctx context.Context, queue string, n int) error {
	for target := n; ; {
		got, err := e.backend.wait(ctx, target)
		if err != nil {
			return err
		}
		ready, err := e.broker.ready(queue)
		if err != nil || ready == 0 {
			return err
		}
		target = got + ready
	}
}

// luraConfig is a krakend.json with one async agent for queue, parsed by
// Lura's own parser: workers W, prefetch_count P, one POST backend with
// the encoding ("" for Lura's default, json), timeout 10s; block adds
// the driver's own fields, in its block beside async/amqp.
func (e *env) luraConfig(queue string, p point, encoding string, block map[string]any) (luraconfig.ServiceConfig, error) {
	backend := map[string]any{"host": []string{e.backend.url}, "url_pattern": "/events", "method": "POST"}
	if encoding != "" {
		backend["encoding"] = encoding
	}
	driver := map[string]any{
		"host": e.broker.url, "name": queue, "exchange": e.broker.exchange,
		"durable": true, "prefetch_count": p.prefetch,
	}
	extra := map[string]any{asyncamqp.Namespace: driver}
	if len(block) > 0 {
		extra[asyncamqp.ExtensionNamespace] = block
	}
	doc, err := json.Marshal(map[string]any{
		"version": 3,
		"async_agent": []any{map[string]any{
			"name":         "bench",
			"connection":   map[string]any{"max_retries": 3, "backoff_strategy": "linear"},
			"consumer":     map[string]any{"topic": topic, "workers": p.workers, "timeout": dispatchTimeout.String()},
			"backend":      []any{backend},
			"extra_config": extra,
		}},
	})
	if err != nil {
		return luraconfig.ServiceConfig{}, err
	}
	parser := luraconfig.NewParserWithFileReader(func(string) ([]byte, error) { return doc, nil })
	return parser.Parse("krakend.json")
}

// retryQueues names the retry queues the driver declares for the agent.
func retryQueues(cfg luraconfig.ServiceConfig) []string {
	agent := cfg.AsyncAgents[0]
	c, err := config.FromExtraConfig(agent.ExtraConfig)
	if err != nil {
		return nil
	}
	var names []string
	for _, d := range c.Retry.RetryDelays() {
		names = append(names, consumer.RetryQueue(c.Queue, d))
	}
	return names
}

// latencyPoint is the W/prefetch of the latency and memory checks.
var latencyPoint = point{workers: 16, prefetch: 100}

// latency runs (a) on an empty queue while this process publishes rate
// messages a second for d, each stamped with its publish time; the
// backend reports receive time minus stamp.
func (e *env) latency(ctx context.Context, rate int, d time.Duration) (latencyReport, int, error) {
	queue := e.broker.queueName("latency", latencyPoint, 1)
	defer e.broker.deleteQueues(queue)
	if err := e.broker.declare(queue); err != nil {
		return latencyReport{}, 0, err
	}
	cfg, err := e.luraConfig(queue, latencyPoint, "no-op", nil)
	if err != nil {
		return latencyReport{}, 0, err
	}
	defer e.broker.deleteQueues(retryQueues(cfg)...)
	server.InitHTTPDefaultTransport(cfg)
	if err := e.backend.reset(ctx); err != nil {
		return latencyReport{}, 0, err
	}
	stop, err := e.startAgent(cfg, asyncamqp.StartAgent)
	if err != nil {
		return latencyReport{}, 0, errors.Join(err, stop())
	}
	total, err := e.publishAt(ctx, rate, d)
	if err == nil {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err = e.backend.wait(wctx, total)
		cancel()
	}
	var r latencyReport
	if err == nil {
		r, err = e.backend.latency(ctx)
	}
	return r, total, errors.Join(err, stop())
}

// publishAt publishes rate stamped messages a second for d (no confirms)
// and returns how many it published.
func (e *env) publishAt(ctx context.Context, rate int, d time.Duration) (int, error) {
	ch, err := e.broker.conn.Channel()
	if err != nil {
		return 0, err
	}
	defer ch.Close()
	interval := time.Second / time.Duration(rate)
	total := int(int64(rate) * int64(d) / int64(time.Second))
	start := time.Now()
	for sent := 0; sent < total; {
		due := min(total, int(time.Since(start)/interval)+1)
		for ; sent < due; sent++ {
			msg := e.broker.message(sent, time.Now().UnixNano())
			if err := ch.PublishWithContext(ctx, e.broker.exchange, routingKey, false, false, msg); err != nil {
				return sent, err
			}
		}
		time.Sleep(time.Until(start.Add(time.Duration(sent) * interval)))
	}
	return total, nil
}

// memory is the -rss check: resident memory of this process running (a)
// at latencyPoint, before the agent starts and after 10,000 and 100,000
// messages of one pre-loaded queue.
type memory struct{ before, at10k, at100k int64 }

func (e *env) memory(ctx context.Context) (memory, error) {
	const n = 100_000
	var m memory
	queue := e.broker.queueName("rss", latencyPoint, 1)
	defer e.broker.deleteQueues(queue)
	if err := e.broker.preload(ctx, queue, n); err != nil {
		return m, err
	}
	cfg, err := e.luraConfig(queue, latencyPoint, "no-op", nil)
	if err != nil {
		return m, err
	}
	defer e.broker.deleteQueues(retryQueues(cfg)...)
	server.InitHTTPDefaultTransport(cfg)
	if err := e.backend.reset(ctx); err != nil {
		return m, err
	}
	debug.FreeOSMemory()
	if m.before, err = rss(); err != nil {
		return m, err
	}
	stop, err := e.startAgent(cfg, asyncamqp.StartAgent)
	if err != nil {
		return m, errors.Join(err, stop())
	}
	wctx, cancel := context.WithTimeout(ctx, runTimeout(n))
	defer cancel()
	for _, at := range []struct {
		n   int
		rss *int64
	}{{10_000, &m.at10k}, {n, &m.at100k}} {
		if _, err = e.backend.wait(wctx, at.n); err != nil {
			break
		}
		if *at.rss, err = rss(); err != nil {
			break
		}
	}
	return m, errors.Join(err, stop())
}
