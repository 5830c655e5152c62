// Command publisher publishes test events to a RabbitMQ topic exchange for
// the krakend-amqp example, with publisher confirms.
//
// Each event has a unique MessageId and a JSON body holding its sequence
// number and the time it was published ("published_at_unix_nano"), so a
// consumer can compute the end-to-end latency. Events are published
// mandatory: an event no queue is bound for comes back and is counted as
// unroutable (start the gateway first; it declares and binds the queues).
// The exchange is declared, as a durable topic exchange, when it is
// missing. On a terminal, stderr shows a progress bar. The last line is a
// summary; the exit status is 1 if any event was not confirmed or was
// unroutable.
//
//	go run ./examples/publisher -n 1000 -exchange events -key orders.created
//
// Three other modes publish nothing; make demo uses them:
//
//	publisher -ping                  # does a broker answer at -url? (exit 1 if not)
//	publisher -inspect krakend.json  # message counts of the queues the file's agents use
//	publisher -cleanup krakend.json  # delete those queues and the agents' exchanges
//
// -inspect and -cleanup read every agent with an "async/amqp" (or legacy)
// block and connect to its "host": the queues are the agent's queue, its
// retry queues (name.retry.1s, ...) and its dead-letter queue, when the
// driver declares them. -cleanup is meant for throwaway copies such as the
// demo's: it deletes only queues with no consumer and exchanges with no
// binding left, and leaves the rest with an error.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
)

const defaultURL = "amqp://guest:guest@localhost:5672/"

// options are the command-line flags.
type options struct {
	url      string
	exchange string
	key      string
	n        int
	size     int
	rate     float64
	window   int
	// cloudevents makes each event a CloudEvent in binary mode.
	cloudevents bool

	// The modes that publish nothing.
	ping    bool
	inspect string // a krakend.json
	cleanup string // a krakend.json
}

func main() {
	opts := parseFlags()
	switch {
	case opts.ping:
		exitOn(ping(os.Stdout, opts.url))
	case opts.inspect != "":
		exitOn(inspectQueues(os.Stdout, opts.inspect, opts.url))
	case opts.cleanup != "":
		exitOn(cleanupTopology(os.Stdout, opts.cleanup, opts.url))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	summary, err := run(ctx, opts)
	if summary != "" {
		fmt.Println(summary)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "publisher:", err)
		stop()
		os.Exit(1)
	}
}

func parseFlags() options {
	url := os.Getenv("AMQP_URL")
	if url == "" {
		url = defaultURL
	}
	var o options
	flag.StringVar(&o.url, "url", url, "broker `URL` (default from AMQP_URL)")
	flag.StringVar(&o.exchange, "exchange", "events", "topic `exchange` to publish to; declared durable if missing")
	flag.StringVar(&o.key, "key", "orders.created", "routing `key`")
	flag.IntVar(&o.n, "n", 1000, "number of events")
	flag.IntVar(&o.size, "size", 0, "body size in `bytes` (at least the JSON envelope, about 120 bytes)")
	flag.Float64Var(&o.rate, "rate", 0, "events per second, 0 = unlimited")
	flag.IntVar(&o.window, "window", 256, "most events awaiting a broker confirm at once")
	flag.BoolVar(&o.cloudevents, "cloudevents", false, "publish each event as a CloudEvent, binary mode of the AMQP binding (docs/cloudevents.md)")
	flag.BoolVar(&o.ping, "ping", false, "only check that a broker answers at -url, and print its version")
	flag.StringVar(&o.inspect, "inspect", "", "only print the message counts of the queues the agents of this krakend.json `file` use")
	flag.StringVar(&o.cleanup, "cleanup", "", "only delete the queues and exchanges the agents of this krakend.json `file` use (if unused)")
	flag.Parse()
	modes := 0
	for _, on := range []bool{o.ping, o.inspect != "", o.cleanup != ""} {
		if on {
			modes++
		}
	}
	if flag.NArg() > 0 || o.n < 0 || o.size < 0 || o.rate < 0 || o.window < 1 || modes > 1 {
		if modes > 1 {
			fmt.Fprintln(os.Stderr, "publisher: -ping, -inspect and -cleanup exclude one another")
		}
		flag.Usage()
		os.Exit(2)
	}
	return o
}

// exitOn ends a mode: status 0, or 1 after printing err.
func exitOn(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "publisher:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// run publishes the events and returns the summary line.
func run(ctx context.Context, o options) (string, error) {
	conn, err := amqp.DialConfig(o.url, amqp.Config{
		Properties: amqp.Table{"connection_name": "krakend-amqp example publisher"},
	})
	if err != nil {
		return "", fmt.Errorf("connecting to %s: %w", config.Redacted(o.url), err)
	}
	defer conn.Close()
	if err := ensureExchange(conn, o.exchange); err != nil {
		return "", err
	}
	p, err := newPublisher(conn, o)
	if err != nil {
		return "", err
	}
	started := time.Now()
	err = p.publishAll(ctx)
	elapsed := time.Since(started)
	p.close()
	return p.summary(elapsed), errors.Join(err, p.verdict())
}

// ensureExchange declares the exchange as a durable topic exchange unless
// it already exists (whatever its settings: the gateway may have declared
// it otherwise).
func ensureExchange(conn *amqp.Connection, name string) error {
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	err = ch.ExchangeDeclarePassive(name, "topic", true, false, false, false, nil)
	if err == nil {
		return ch.Close()
	}
	var amqpErr *amqp.Error
	if !errors.As(err, &amqpErr) || amqpErr.Code != amqp.NotFound {
		return fmt.Errorf("exchange %q: %w", name, err)
	}
	// The failed passive declare closed that channel.
	if ch, err = conn.Channel(); err != nil {
		return err
	}
	defer ch.Close()
	err = ch.ExchangeDeclare(name, "topic", true /* durable */, false /* autoDelete */, false /* internal */, false /* noWait */, nil)
	if err != nil {
		return fmt.Errorf("declaring exchange %q: %w", name, err)
	}
	fmt.Fprintf(os.Stderr, "declared the durable topic exchange %q\n", name)
	return nil
}

// publisher publishes on one confirming channel.
type publisher struct {
	o        options
	ch       *amqp.Channel
	runID    string
	returns  chan amqp.Return
	returned chan int // the number of returned events, once returns closes
	progress *progress

	published, confirmed, nacked atomic.Int64
}

func newPublisher(conn *amqp.Connection, o options) (*publisher, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, err
	}
	if err := ch.Confirm(false); err != nil {
		return nil, fmt.Errorf("enabling publisher confirms: %w", err)
	}
	var id [4]byte
	_, _ = rand.Read(id[:])
	p := &publisher{o: o, ch: ch, runID: hex.EncodeToString(id[:]), returned: make(chan int, 1)}
	// Returns must always be drained, or the connection blocks.
	p.returns = ch.NotifyReturn(make(chan amqp.Return, 64))
	go func() {
		n := 0
		for range p.returns {
			n++
		}
		p.returned <- n
	}()
	if isTerminal(os.Stderr) {
		p.progress = startProgress(os.Stderr, o.n, &p.confirmed)
	}
	return p, nil
}

// publishAll publishes o.n events at o.rate, keeping at most o.window
// unconfirmed, and waits for every confirm.
func (p *publisher) publishAll(ctx context.Context) error {
	var pending []*amqp.DeferredConfirmation
	interval := time.Duration(0)
	if p.o.rate > 0 {
		interval = time.Duration(float64(time.Second) / p.o.rate)
	}
	start := time.Now()
	for i := range p.o.n {
		if !pace(ctx, start.Add(time.Duration(i)*interval)) {
			break
		}
		conf, err := p.publish(ctx, i+1)
		if err != nil {
			return err
		}
		pending = append(pending, conf)
		if len(pending) >= p.o.window {
			if err := p.await(pending[0]); err != nil {
				return err
			}
			pending = pending[1:]
		}
	}
	for _, conf := range pending {
		if err := p.await(conf); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	return nil
}

func (p *publisher) publish(ctx context.Context, seq int) (*amqp.DeferredConfirmation, error) {
	id := fmt.Sprintf("%s-%06d", p.runID, seq)
	now := time.Now()
	msg := amqp.Publishing{
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent,
		MessageId:    id,
		Timestamp:    now,
		AppId:        "krakend-amqp-example-publisher",
		Body:         p.body(id, seq, now),
	}
	if p.o.cloudevents {
		msg.Headers = cloudEvent(id, p.o.key, now)
	}
	conf, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, p.o.exchange, p.o.key, true /* mandatory */, false, msg)
	if err != nil {
		return nil, fmt.Errorf("publishing event %d: %w", seq, err)
	}
	p.published.Add(1)
	return conf, nil
}

// cloudEvent is the headers of a CloudEvent in binary mode under the AMQP
// binding: its attributes prefixed with "cloudEvents:"; the content type
// is the message's own.
func cloudEvent(id, key string, at time.Time) amqp.Table {
	return amqp.Table{
		"cloudEvents:specversion": "1.0",
		"cloudEvents:id":          id,
		"cloudEvents:source":      "/krakend-amqp/examples/publisher",
		"cloudEvents:type":        "com.example." + key,
		"cloudEvents:time":        at.UTC(),
	}
}

// body is the event's JSON, padded to o.size bytes.
func (p *publisher) body(id string, seq int, now time.Time) []byte {
	event := map[string]interface{}{
		"id": id, "seq": seq, "routing_key": p.o.key, "published_at_unix_nano": now.UnixNano(),
	}
	b, _ := json.Marshal(event)
	if pad := p.o.size - len(b) - len(`,"pad":""`); pad > 0 {
		event["pad"] = strings.Repeat("x", pad)
		b, _ = json.Marshal(event)
	}
	return b
}

// await waits for one confirm; the broker answers every publish, so this
// ends unless the channel closes.
func (p *publisher) await(conf *amqp.DeferredConfirmation) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ok, err := conf.WaitContext(ctx)
	if err != nil {
		return fmt.Errorf("waiting for a confirm: %w", err)
	}
	if ok {
		p.confirmed.Add(1)
	} else {
		p.nacked.Add(1)
	}
	return nil
}

// close stops the progress bar and closes the channel, which ends the
// returns.
func (p *publisher) close() {
	if p.progress != nil {
		p.progress.stop()
	}
	_ = p.ch.Close()
}

func (p *publisher) summary(elapsed time.Duration) string {
	n := p.published.Load()
	r := p.unroutable()
	noun := "events"
	if n == 1 {
		noun = "event"
	}
	return fmt.Sprintf("published %d %s to exchange %q with key %q in %s (%.0f events/s): %d confirmed, %d nacked, %d unroutable",
		n, noun, p.o.exchange, p.o.key, elapsed.Round(100*time.Microsecond), float64(n)/elapsed.Seconds(), p.confirmed.Load(), p.nacked.Load(), r)
}

// verdict says what went wrong, if anything did.
func (p *publisher) verdict() error {
	var errs []error
	if n := p.nacked.Load(); n > 0 {
		errs = append(errs, fmt.Errorf("the broker refused %d events", n))
	}
	if r := p.unroutable(); r > 0 {
		errs = append(errs, fmt.Errorf("%d events were unroutable: no queue is bound to exchange %q with a pattern matching %q (start the gateway first: it declares and binds its queues)", r, p.o.exchange, p.o.key))
	}
	return errors.Join(errs...)
}

// unroutable is the number of events returned; it blocks until the
// channel is closed, once, and remembers the count.
func (p *publisher) unroutable() int {
	n := <-p.returned
	p.returned <- n
	return n
}

// pace sleeps until the time of the next event; false if ctx ended.
func pace(ctx context.Context, at time.Time) bool {
	if ctx.Err() != nil {
		return false
	}
	d := time.Until(at)
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// progress redraws a one-line bar every 100ms until stopped.
type progress struct {
	done chan struct{}
	over chan struct{}
}

func startProgress(w io.Writer, total int, count *atomic.Int64) *progress {
	p := &progress{done: make(chan struct{}), over: make(chan struct{})}
	go func() {
		defer close(p.over)
		ticker := time.NewTicker(100 * time.Millisecond)
		defer ticker.Stop()
		for {
			select {
			case <-ticker.C:
				drawBar(w, int(count.Load()), total)
			case <-p.done:
				drawBar(w, int(count.Load()), total)
				fmt.Fprintln(w)
				return
			}
		}
	}()
	return p
}

func (p *progress) stop() {
	close(p.done)
	<-p.over
}

func drawBar(w io.Writer, n, total int) {
	const width = 40
	filled := width
	percent := 100
	if total > 0 {
		filled = width * n / total
		percent = 100 * n / total
	}
	fmt.Fprintf(w, "\r[%s%s] %d/%d confirmed %3d%%", strings.Repeat("#", filled), strings.Repeat(".", width-filled), n, total, percent)
}
