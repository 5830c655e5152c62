// Package brokertest helps integration tests use the real RabbitMQ at
// AMQP_URL: unique names, publishing, the broker's view of a queue, and
// cleanup. It fails, never skips, when no broker answers.
package brokertest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// URL is the broker the integration tests use.
func URL() string {
	if u := os.Getenv("AMQP_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@localhost:5672/"
}

// Dial connects to the test broker or fails the test with a hint.
func Dial(t testing.TB) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(URL())
	if err != nil {
		t.Fatalf("no RabbitMQ answers at AMQP_URL (%v): start one with `rabbitmq-server -detached` or set AMQP_URL", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

var unsafe = regexp.MustCompile(`[^a-zA-Z0-9]+`)

// Name returns a name unique to this test and run.
func Name(t testing.TB, what string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	base := strings.Trim(unsafe.ReplaceAllString(t.Name(), "-"), "-")
	if len(base) > 60 {
		base = base[len(base)-60:]
	}
	return fmt.Sprintf("t-%s-%s-%s", base, what, hex.EncodeToString(b[:]))
}

// Cleanup deletes the queue, the queues named after it (its retry
// queues, <queue>.retry.<delay>) and the exchange when the test ends.
func Cleanup(t testing.TB, conn *amqp.Connection, queue, exchange string) {
	t.Cleanup(func() {
		ch, err := conn.Channel()
		if err != nil {
			return
		}
		defer ch.Close()
		if queue != "" {
			_, _ = ch.QueueDelete(queue, false, false, false)
			for _, row := range Rabbitmqctl(t, "list_queues", "--no-table-headers", "name") {
				if strings.HasPrefix(row[0], queue+".") {
					_, _ = ch.QueueDelete(row[0], false, false, false)
				}
			}
		}
		if exchange != "" {
			_ = ch.ExchangeDelete(exchange, false, false)
		}
	})
}

// Publisher publishes with confirms, so that a test knows the broker has
// every message before it looks for it.
type Publisher struct {
	t  testing.TB
	ch *amqp.Channel
}

// NewPublisher opens a confirming channel on conn.
func NewPublisher(t testing.TB, conn *amqp.Connection) *Publisher {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Close() })
	return &Publisher{t: t, ch: ch}
}

// Publish sends one message and waits for the broker's confirm.
func (p *Publisher) Publish(exchange, key string, msg amqp.Publishing) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conf, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, false, false, msg)
	if err != nil {
		p.t.Fatal(err)
	}
	if ok, err := conf.WaitContext(ctx); err != nil || !ok {
		p.t.Fatalf("publish to %q with %q not confirmed: %v", exchange, key, err)
	}
}

// PublishN sends n messages, confirmed as a batch. body(i) gives each
// message; its MessageId is set to the index.
func (p *Publisher) PublishN(exchange, key string, n int, body func(i int) []byte) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	confs := make([]*amqp.DeferredConfirmation, 0, n)
	for i := range n {
		conf, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, false, false, amqp.Publishing{
			ContentType: "application/json", MessageId: strconv.Itoa(i), Body: body(i), DeliveryMode: amqp.Persistent,
		})
		if err != nil {
			p.t.Fatal(err)
		}
		confs = append(confs, conf)
	}
	for _, c := range confs {
		if ok, err := c.WaitContext(ctx); err != nil || !ok {
			p.t.Fatalf("publish not confirmed: %v", err)
		}
	}
}

// QueueInfo is the broker's view of a queue, from rabbitmqctl.
type QueueInfo struct {
	Durable, AutoDelete, Exclusive bool
	Ready, Unacked                 int
	Consumers                      int
}

// Queue reads a queue's flags and counters with rabbitmqctl list_queues.
func Queue(t testing.TB, name string) (QueueInfo, bool) {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", "-q", "list_queues", "--no-table-headers",
		"name", "durable", "auto_delete", "exclusive", "messages_ready", "messages_unacknowledged", "consumers").CombinedOutput()
	if err != nil {
		t.Fatalf("rabbitmqctl list_queues: %v: %s", err, out)
	}
	for _, line := range bytes.Split(out, []byte("\n")) {
		// Tab-separated: a quorum queue's exclusive column is empty.
		f := strings.Split(string(line), "\t")
		if len(f) != 7 || f[0] != name {
			continue
		}
		atoi := func(s string) int { n, _ := strconv.Atoi(s); return n }
		return QueueInfo{
			Durable: f[1] == "true", AutoDelete: f[2] == "true", Exclusive: f[3] == "true",
			Ready: atoi(f[4]), Unacked: atoi(f[5]), Consumers: atoi(f[6]),
		}, true
	}
	return QueueInfo{}, false
}

// Pending counts the messages, ready or unacked, in a queue and in the
// queues named after it (its retry queues).
func Pending(t testing.TB, queue string) int {
	t.Helper()
	n := 0
	for _, f := range Rabbitmqctl(t, "list_queues", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged") {
		if len(f) == 3 && (f[0] == queue || strings.HasPrefix(f[0], queue+".retry.")) {
			ready, _ := strconv.Atoi(f[1])
			unacked, _ := strconv.Atoi(f[2])
			n += ready + unacked
		}
	}
	return n
}

// Counts reads ready and unacked counts of a queue over AMQP (a passive
// declare gives ready only), falling back to rabbitmqctl for unacked.
func Counts(t testing.TB, name string) (ready, unacked int) {
	q, ok := Queue(t, name)
	if !ok {
		t.Fatalf("queue %q does not exist", name)
	}
	return q.Ready, q.Unacked
}

// Eventually polls cond every 50ms until it holds or the deadline passes.
func Eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Rabbitmqctl runs rabbitmqctl -q with the arguments and returns its rows
// split into fields.
func Rabbitmqctl(t testing.TB, args ...string) [][]string {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", append([]string{"-q"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("rabbitmqctl %v: %v: %s", args, err, out)
	}
	// A listing that meets a queue whose process died prints the error
	// as a row and exits 0: say so rather than find no row.
	if strings.Contains(string(out), "{:badrpc,") {
		t.Fatalf("rabbitmqctl %v failed on the broker's side (a queue of the vhost whose process died? "+
			"rabbitmqctl delete_queue removes it): %s", args, out)
	}
	return Rows(out)
}

// Rows splits the output of a rabbitmqctl listing into rows of
// tab-separated fields, skipping blank lines.
func Rows(out []byte) [][]string {
	var rows [][]string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.TrimSpace(line) != "" {
			rows = append(rows, strings.Split(line, "\t"))
		}
	}
	return rows
}

// Exchange reads an exchange's type and flags with rabbitmqctl.
func Exchange(t testing.TB, name string) (kind string, durable, autoDelete, internal, found bool) {
	t.Helper()
	for _, f := range Rabbitmqctl(t, "list_exchanges", "--no-table-headers", "name", "type", "durable", "auto_delete", "internal") {
		if len(f) == 5 && f[0] == name {
			return f[1], f[2] == "true", f[3] == "true", f[4] == "true", true
		}
	}
	return "", false, false, false, false
}

// Drain takes every ready message off a queue with basic.get and acks
// it, returning the message ids.
func Drain(t testing.TB, conn *amqp.Connection, queue string) []string {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	var ids []string
	for {
		d, ok, err := ch.Get(queue, false)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return ids
		}
		ids = append(ids, d.MessageId)
		_ = d.Ack(false)
	}
}

// CloseConnections makes the broker close every connection whose client
// properties contain marker (a connection name), as an operator would
// with rabbitmqctl close_connection. It returns how many it closed.
func CloseConnections(t testing.TB, marker string) int {
	t.Helper()
	n := 0
	for _, row := range Rabbitmqctl(t, "list_connections", "--no-table-headers", "pid", "client_properties") {
		if len(row) == 2 && strings.Contains(row[1], marker) {
			Rabbitmqctl(t, "close_connection", row[0], "closed by a test")
			n++
		}
	}
	return n
}
