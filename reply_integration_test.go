//go:build integration

package asyncamqp_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// rpcClient is a caller of RabbitMQ's request and reply pattern: it
// consumes RabbitMQ's direct reply-to pseudo-queue and publishes its
// requests on the same channel with reply_to set to it.
type rpcClient struct {
	ch      *amqp.Channel
	mu      sync.Mutex
	replies map[string][]amqp.Delivery // by correlation id
	all     int
}

func newRPCClient(t *testing.T) *rpcClient {
	t.Helper()
	conn := brokertest.Dial(t)
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume("amq.rabbitmq.reply-to", "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &rpcClient{ch: ch, replies: map[string][]amqp.Delivery{}}
	go func() {
		for d := range deliveries {
			c.mu.Lock()
			c.replies[d.CorrelationId] = append(c.replies[d.CorrelationId], d)
			c.all++
			c.mu.Unlock()
		}
	}()
	return c
}

// call publishes one request; its correlation id is id.
func (c *rpcClient) call(t *testing.T, exchange, key, id string, body []byte) {
	t.Helper()
	err := c.ch.Publish(exchange, key, false, false, amqp.Publishing{
		ReplyTo: "amq.rabbitmq.reply-to", CorrelationId: id, MessageId: id, ContentType: "application/json", Body: body,
	})
	if err != nil {
		t.Fatal(err)
	}
}

func (c *rpcClient) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.all
}

func (c *rpcClient) get(id string) []amqp.Delivery {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]amqp.Delivery(nil), c.replies[id]...)
}

// echoBackend answers 201 with the request's message id in its body and
// a Location header, and a header a reply must not carry unless listed.
func echoBackend(t *testing.T, status func(id string) int) *echo {
	e := &echo{}
	e.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.n.Add(1)
		time.Sleep(e.delay)
		_, _ = io.Copy(io.Discard, r.Body)
		id := r.Header.Get("X-Amqp-Message-Id")
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", "/orders/"+id)
		w.Header().Set("Cc", "victim-queue")
		w.Header().Set("X-Internal", "secret")
		w.WriteHeader(status(id))
		fmt.Fprintf(w, `{"id":%q,"done":true}`, id)
	}))
	t.Cleanup(e.Close)
	return e
}

type echo struct {
	*httptest.Server
	n     atomic.Int64
	delay time.Duration
}

func (e *echo) requests() int64 { return e.n.Load() }

func created(string) int { return http.StatusCreated }

func replyHeader(d amqp.Delivery, name string) interface{} { return d.Headers[name] }

// TestRepliesToEveryRequest: 1,000 requests with reply_to set to direct
// reply-to get 1,000 replies, one each, with the matching correlation
// id, the backend's status and body, and the listed answer header only.
func TestRepliesToEveryRequest(t *testing.T) {
	f := newFixture(t)
	be := echoBackend(t, created)
	gw := startAgents(t, agentSpec{Name: "rpc", Topic: "rpc", Workers: 8, Backend: be.URL, Encoding: "no-op",
		Block: block(f.queue, f.exchange, map[string]interface{}{"reply": map[string]interface{}{"headers": []interface{}{"Location"}}})})
	gw.waitPing(t, "rpc")
	client := newRPCClient(t)

	const n = 1000
	for i := 0; i < n; i++ {
		client.call(t, f.exchange, "rpc", fmt.Sprintf("req-%d", i), []byte(`{}`))
	}
	brokertest.Eventually(t, 60*time.Second, "1,000 replies", func() bool { return client.count() >= n })
	f.waitEmpty(t)
	time.Sleep(200 * time.Millisecond) // a duplicate would show by now
	if got := client.count(); got != n {
		t.Errorf("%d replies to %d requests", got, n)
	}
	if logs := gw.logs.String(); strings.Contains(logs, "did not reach") {
		t.Errorf("delivered replies reported undelivered:\n%s", logs)
	}
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("req-%d", i)
		replies := client.get(id)
		if len(replies) != 1 {
			t.Errorf("%s: %d replies", id, len(replies))
			continue
		}
		d := replies[0]
		if s := replyHeader(d, "x-krakend-status"); s != int64(201) {
			t.Errorf("%s: x-krakend-status %v (%T), want 201", id, s, s)
		}
		if want := fmt.Sprintf(`{"id":%q,"done":true}`, id); string(d.Body) != want || d.ContentType != "application/json" {
			t.Errorf("%s: body %q (%s), want %q", id, d.Body, d.ContentType, want)
		}
		if loc := replyHeader(d, "Location"); loc != "/orders/"+id {
			t.Errorf("%s: Location %v", id, loc)
		}
		for _, h := range []string{"Cc", "CC", "X-Internal", "x-krakend-error"} {
			if v, ok := d.Headers[h]; ok {
				t.Errorf("%s: the reply carries %s=%v", id, h, v)
			}
		}
		if d.ReplyTo != "" || d.Expiration != "" || d.UserId != "" {
			t.Errorf("%s: the reply carries reply_to %q, expiration %q, user_id %q", id, d.ReplyTo, d.Expiration, d.UserId)
		}
	}
}

// TestReplyUnderJSONEncoding: under Lura's default encoding the reply
// holds the answer as Lura decoded it, re-encoded as JSON.
func TestReplyUnderJSONEncoding(t *testing.T) {
	f := newFixture(t)
	be := echoBackend(t, func(string) int { return http.StatusOK })
	gw := startAgents(t, agentSpec{Name: "rpcjson", Topic: "rpc", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"reply": map[string]interface{}{}})})
	gw.waitPing(t, "rpcjson")
	client := newRPCClient(t)
	client.call(t, f.exchange, "rpc", "j1", []byte(`{}`))
	brokertest.Eventually(t, 20*time.Second, "a reply", func() bool { return client.count() >= 1 })
	d := client.get("j1")[0]
	var got map[string]interface{}
	if err := json.Unmarshal(d.Body, &got); err != nil || got["id"] != "j1" || got["done"] != true {
		t.Errorf("body %q (%v), want the answer's fields", d.Body, err)
	}
	if d.ContentType != "application/json" || replyHeader(d, "x-krakend-status") != int64(200) {
		t.Errorf("content type %q, status %v", d.ContentType, replyHeader(d, "x-krakend-status"))
	}
}

// TestNoSuccessReplyWhileTheBackendIsDown: a caller gets no success reply
// for a message the backend never handled, nothing is lost (every
// request ends in the dead letter), and each caller gets one error reply
// once its message is given up, not one per attempt.
func TestNoSuccessReplyWhileTheBackendIsDown(t *testing.T) {
	f := newFixture(t)
	dead := brokertest.Name(t, "dead")
	brokertest.Cleanup(t, f.conn, dead, "")
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close() // connection refused from now on
	gw := startAgents(t, agentSpec{Name: "rpcdown", Topic: "rpc", Workers: 4, Backend: downURL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"reply":       map[string]interface{}{},
			"retry":       map[string]interface{}{"max_attempts": 3, "delay": "50ms", "max_delay": "100ms"},
			"dead_letter": map[string]interface{}{"queue": dead},
		})})
	gw.waitPing(t, "rpcdown")
	client := newRPCClient(t)
	const n = 50
	for i := 0; i < n; i++ {
		client.call(t, f.exchange, "rpc", fmt.Sprintf("down-%d", i), []byte(`{}`))
	}
	brokertest.Eventually(t, 30*time.Second, "50 dead letters", func() bool {
		info, _ := brokertest.Queue(t, dead)
		return info.Ready >= n
	})
	brokertest.Eventually(t, 10*time.Second, "50 error replies", func() bool { return client.count() >= n })
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("down-%d", i)
		replies := client.get(id)
		if len(replies) != 1 {
			t.Errorf("%s: %d replies, want one error reply", id, len(replies))
			continue
		}
		d := replies[0]
		status, _ := replyHeader(d, "x-krakend-status").(int64)
		reason, _ := replyHeader(d, "x-krakend-error").(string)
		if status != http.StatusBadGateway || reason != "the backend pipeline failed" {
			t.Errorf("%s: status %v, error %q: want 502 and the failure's class", id, status, reason)
		}
		if strings.Contains(reason, "127.0.0.1") || len(d.Body) != 0 {
			t.Errorf("%s: the error reply exposes the backend: %q, body %q", id, reason, d.Body)
		}
	}
	if left := brokertest.Drain(t, f.conn, dead); len(left) != n {
		t.Errorf("%d of %d requests in the dead letter", len(left), n)
	}
}

// TestReplyOnlyAfterTheLastAttempt: a message that fails once and then
// succeeds gets one reply, the success.
func TestReplyOnlyAfterTheLastAttempt(t *testing.T) {
	f := newFixture(t)
	var mu sync.Mutex
	seen := map[string]int{}
	be := echoBackend(t, func(id string) int {
		mu.Lock()
		defer mu.Unlock()
		seen[id]++
		if seen[id] == 1 {
			return http.StatusInternalServerError
		}
		return http.StatusCreated
	})
	gw := startAgents(t, agentSpec{Name: "rpcretry", Topic: "rpc", Workers: 2, Backend: be.URL, Encoding: "no-op",
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"reply": map[string]interface{}{},
			"retry": map[string]interface{}{"max_attempts": 3, "delay": "50ms", "max_delay": "100ms"},
		})})
	gw.waitPing(t, "rpcretry")
	client := newRPCClient(t)
	for i := 0; i < 10; i++ {
		client.call(t, f.exchange, "rpc", fmt.Sprintf("r-%d", i), []byte(`{}`))
	}
	brokertest.Eventually(t, 20*time.Second, "10 replies", func() bool { return client.count() >= 10 })
	f.waitEmpty(t)
	time.Sleep(200 * time.Millisecond)
	for i := 0; i < 10; i++ {
		replies := client.get(fmt.Sprintf("r-%d", i))
		if len(replies) != 1 || replyHeader(replies[0], "x-krakend-status") != int64(201) {
			t.Errorf("r-%d: %d replies, want one 201", i, len(replies))
		}
	}
}

// TestRepliesThatCannotBeDelivered: a reply_to that reply.to does not
// allow (here the agent's own queue: a publisher's attempt to inject) gets
// no reply, and one whose queue or caller is gone cannot be delivered;
// each message is handled once and acked, and the log says so.
func TestRepliesThatCannotBeDelivered(t *testing.T) {
	f := newFixture(t)
	be := echoBackend(t, created)
	be.delay = 100 * time.Millisecond
	gw := startAgents(t, agentSpec{Name: "rpcgone", Topic: "rpc", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"reply": map[string]interface{}{}})})
	gw.waitPing(t, "rpcgone")
	for _, to := range []string{f.queue, "amq.gen-no-such-queue"} {
		f.pub.Publish(f.exchange, "rpc", amqp.Publishing{ReplyTo: to, CorrelationId: to, MessageId: to, Body: []byte(`{}`)})
	}
	// A caller that leaves before its answer: its direct reply-to name
	// is gone when the reply is published.
	client := newRPCClient(t)
	client.call(t, f.exchange, "rpc", "left", []byte(`{}`))
	_ = client.ch.Close()
	f.waitEmpty(t)
	time.Sleep(500 * time.Millisecond)
	if n := be.requests(); n != 3 {
		t.Errorf("the backend got %d requests for 3 messages: an undeliverable reply must not bring a message back", n)
	}
	brokertest.Eventually(t, 10*time.Second, "the report of the undelivered replies", func() bool {
		return strings.Contains(gw.logs.String(), "replies did not reach their caller")
	})
	if be := brokertest.Drain(t, f.conn, f.queue); len(be) != 0 {
		t.Errorf("the agent's own queue got %d messages: a reply went where the publisher pointed", len(be))
	}
}

// TestReplyOverTheBound: an answer over reply.max_body_bytes is replied
// to with its status, no body, and an error saying why.
func TestReplyOverTheBound(t *testing.T) {
	f := newFixture(t)
	be := echoBackend(t, created)
	gw := startAgents(t, agentSpec{Name: "rpcbig", Topic: "rpc", Workers: 1, Backend: be.URL, Encoding: "no-op",
		Block: block(f.queue, f.exchange, map[string]interface{}{"reply": map[string]interface{}{"max_body_bytes": 10}})})
	gw.waitPing(t, "rpcbig")
	client := newRPCClient(t)
	client.call(t, f.exchange, "rpc", "big", []byte(`{}`))
	brokertest.Eventually(t, 20*time.Second, "a reply", func() bool { return client.count() >= 1 })
	d := client.get("big")[0]
	reason, _ := replyHeader(d, "x-krakend-error").(string)
	if len(d.Body) != 0 || replyHeader(d, "x-krakend-status") != int64(201) || !strings.Contains(reason, "larger than reply.max_body_bytes (10)") {
		t.Errorf("body %q, status %v, error %q", d.Body, replyHeader(d, "x-krakend-status"), reason)
	}
}

// TestCloudEventReply: with cloudevents on, a backend that answers a
// CloudEvent in the HTTP binding's binary mode gets its event back to the
// caller in the AMQP binding's binary mode.
func TestCloudEventReply(t *testing.T) {
	f := newFixture(t)
	be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Ce-Specversion", "1.0")
		w.Header().Set("Ce-Id", "reply-to-"+r.Header.Get("Ce-Id"))
		w.Header().Set("Ce-Source", "/quotes")
		w.Header().Set("Ce-Type", "com.example.quote.given")
		w.Header().Set("Ce-Subject", "ACME%20Corp")
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"price":42}`))
	}))
	t.Cleanup(be.Close)
	gw := startAgents(t, agentSpec{Name: "rpcce", Topic: "rpc", Workers: 1, Backend: be.URL, Encoding: "no-op",
		Block: block(f.queue, f.exchange, map[string]interface{}{"reply": map[string]interface{}{}, "cloudevents": true})})
	gw.waitPing(t, "rpcce")
	client := newRPCClient(t)
	err := client.ch.Publish(f.exchange, "rpc", false, false, amqp.Publishing{
		ReplyTo: "amq.rabbitmq.reply-to", CorrelationId: "ce1", ContentType: "application/json", Body: []byte(`{"symbol":"ACME"}`),
		Headers: amqp.Table{"cloudEvents:specversion": "1.0", "cloudEvents:id": "q-1", "cloudEvents:source": "/callers/1",
			"cloudEvents:type": "com.example.quote.asked"},
	})
	if err != nil {
		t.Fatal(err)
	}
	brokertest.Eventually(t, 20*time.Second, "a reply", func() bool { return client.count() >= 1 })
	d := client.get("ce1")[0]
	want := map[string]string{"cloudEvents:specversion": "1.0", "cloudEvents:id": "reply-to-q-1", "cloudEvents:source": "/quotes",
		"cloudEvents:type": "com.example.quote.given", "cloudEvents:subject": "ACME Corp"}
	for k, v := range want {
		if d.Headers[k] != v {
			t.Errorf("%s = %v, want %q", k, d.Headers[k], v)
		}
	}
	if d.ContentType != "application/json" || string(d.Body) != `{"price":42}` {
		t.Errorf("content type %q, body %q", d.ContentType, d.Body)
	}
}
