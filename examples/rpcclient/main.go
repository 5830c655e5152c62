// Command rpcclient calls a backend through the gateway over RabbitMQ, as
// a client of RabbitMQ's request and reply pattern does: it publishes each
// request to an exchange with reply_to set to RabbitMQ's direct reply-to
// and a correlation id, and waits for the reply the gateway publishes
// there (an agent with a "reply" object in its driver block, see
// examples/krakend.rpc.json and docs/replies.md).
//
// With -n 1 it prints the reply: its status (x-krakend-status), the error
// of an error reply (x-krakend-error), its headers and its body. With more
// it prints one summary line: replies, their statuses, and the round trip
// p50, p99 and max. The exit status is 1 when a request got no reply
// within -timeout, or an error reply.
//
//	go run ./examples/rpcclient -exchange rpc -key quotes.get -body '{"symbol":"ACME"}'
//	go run ./examples/rpcclient -exchange rpc -key quotes.get -n 1000
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// directReplyTo is RabbitMQ's pseudo-queue for replies: a channel that
// consumes it (with no acks) gets the replies to requests it published
// with this reply_to.
const directReplyTo = "amq.rabbitmq.reply-to"

type options struct {
	url, exchange, key, body, contentType string
	n                                     int
	timeout                               time.Duration
}

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if err != nil {
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "rpcclient:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("rpcclient", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.url, "url", "amqp://guest:guest@localhost:5672/", "RabbitMQ `URL`")
	fs.StringVar(&o.exchange, "exchange", "rpc", "the `exchange` the agent's queue is bound to")
	fs.StringVar(&o.key, "key", "quotes.get", "routing `key` of the requests")
	fs.StringVar(&o.body, "body", `{}`, "request `body`")
	fs.StringVar(&o.contentType, "content-type", "application/json", "content type of the body")
	fs.IntVar(&o.n, "n", 1, "how many requests")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "how long to wait for the replies")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if o.n < 1 || o.timeout <= 0 {
		err := errors.New("-n and -timeout must be positive")
		fmt.Fprintln(stderr, err)
		return o, err
	}
	return o, nil
}

// call is one request: when it was sent and its reply.
type call struct {
	sent  time.Time
	took  time.Duration
	reply *amqp.Delivery
}

func run(ctx context.Context, o options, out io.Writer) error {
	conn, err := amqp.Dial(o.url)
	if err != nil {
		return err
	}
	defer conn.Close()
	// Requests go out on the channel that consumes the replies: the
	// broker ties the direct reply-to name to it.
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	replies, err := ch.Consume(directReplyTo, "", true, false, false, false, nil)
	if err != nil {
		return err
	}
	calls := make([]call, o.n)
	for i := range calls {
		calls[i].sent = time.Now()
		err := ch.PublishWithContext(ctx, o.exchange, o.key, false, false, amqp.Publishing{
			ReplyTo: directReplyTo, CorrelationId: strconv.Itoa(i), MessageId: strconv.Itoa(i),
			ContentType: o.contentType, Body: []byte(o.body), Timestamp: time.Now(),
		})
		if err != nil {
			return fmt.Errorf("publish request %d: %w", i, err)
		}
	}
	got := collect(ctx, replies, calls, o.timeout)
	if o.n == 1 {
		printReply(out, calls[0])
	} else {
		fmt.Fprintln(out, summary(calls))
	}
	return verdict(calls, got)
}

// collect files each reply under its call until every call has one or
// the wait is over; it returns how many calls got a reply.
func collect(ctx context.Context, replies <-chan amqp.Delivery, calls []call, wait time.Duration) int {
	deadline := time.After(wait)
	got := 0
	for got < len(calls) {
		select {
		case d, ok := <-replies:
			if !ok {
				return got
			}
			i, err := strconv.Atoi(d.CorrelationId)
			if err != nil || i < 0 || i >= len(calls) || calls[i].reply != nil {
				continue // not ours, or a second reply to one request
			}
			calls[i].reply, calls[i].took = &d, time.Since(calls[i].sent)
			got++
		case <-deadline:
			return got
		case <-ctx.Done():
			return got
		}
	}
	return got
}

func status(d *amqp.Delivery) int64 {
	s, _ := d.Headers["x-krakend-status"].(int64)
	return s
}

func printReply(w io.Writer, c call) {
	if c.reply == nil {
		fmt.Fprintln(w, "no reply")
		return
	}
	d := c.reply
	fmt.Fprintf(w, "status %d in %s\n", status(d), c.took.Round(time.Microsecond))
	if e, ok := d.Headers["x-krakend-error"].(string); ok {
		fmt.Fprintln(w, "error:", e)
	}
	names := make([]string, 0, len(d.Headers))
	for k := range d.Headers {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(w, "%s: %v\n", k, d.Headers[k])
	}
	if d.ContentType != "" {
		fmt.Fprintln(w, "content-type:", d.ContentType)
	}
	fmt.Fprintf(w, "\n%s\n", d.Body)
}

// summary is one line: how many replies, by status, and the round trip.
func summary(calls []call) string {
	statuses := map[int64]int{}
	var took []time.Duration
	for _, c := range calls {
		if c.reply == nil {
			continue
		}
		statuses[status(c.reply)]++
		took = append(took, c.took)
	}
	if len(took) == 0 {
		return fmt.Sprintf("0 replies to %d requests", len(calls))
	}
	slices.Sort(took)
	codes := make([]string, 0, len(statuses))
	for s, n := range statuses {
		codes = append(codes, fmt.Sprintf("%d×%d", n, s))
	}
	sort.Strings(codes)
	at := func(p float64) time.Duration { return took[min(len(took)-1, int(p*float64(len(took))))] }
	return fmt.Sprintf("%d replies to %d requests (status %s); round trip p50 %s p99 %s max %s",
		len(took), len(calls), strings.Join(codes, ", "), at(0.50).Round(time.Microsecond),
		at(0.99).Round(time.Microsecond), took[len(took)-1].Round(time.Microsecond))
}

// verdict fails a run in which a request got no reply or an error reply.
func verdict(calls []call, got int) error {
	if got < len(calls) {
		return fmt.Errorf("%d of %d requests got no reply", len(calls)-got, len(calls))
	}
	for i, c := range calls {
		if _, failed := c.reply.Headers["x-krakend-error"]; failed {
			return fmt.Errorf("request %d got an error reply: %v", i, c.reply.Headers["x-krakend-error"])
		}
	}
	return nil
}
