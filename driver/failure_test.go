package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/transport/http/client"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

func TestStatusOf(t *testing.T) {
	invalid := client.NewErrInvalidStatusCode(&http.Response{StatusCode: 422}, "x")
	for _, tc := range []struct {
		name string
		err  error
		want int
	}{
		{"Lura's *ErrInvalidStatus", invalid, 422},
		{"a wrapped *ErrInvalidStatus", fmt.Errorf("backend: %w", invalid), 422},
		{"joined with another error", errors.Join(errors.New("other"), invalid), 422},
		{"*ErrInvalidStatus with a request path", client.NewErrInvalidStatusCode(
			&http.Response{StatusCode: 503, Request: &http.Request{Method: "POST"}}, "[POST /x]:"), 503},
		{"HTTPResponseError (return_error_code)", client.HTTPResponseError{Code: 400, Msg: "bad"}, 400},
		{"NamedHTTPResponseError (return_error_details)", client.NamedHTTPResponseError{HTTPResponseError: client.HTTPResponseError{Code: 409}}, 409},
		{"a wrapped HTTPResponseError", fmt.Errorf("x: %w", client.HTTPResponseError{Code: 451}), 451},
		{"any error with StatusCode()", codeErr(418), 418},
		{"plain error", errors.New("connection refused"), 0},
		{"text that looks like a status", errors.New("invalid status code 500"), 0},
		{"Lura's bare ErrInvalidStatusCode", client.ErrInvalidStatusCode, 0},
		{"deadline", context.DeadlineExceeded, 0},
		{"nil", nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := statusOf(tc.err); got != tc.want {
				t.Errorf("statusOf(%v) = %d, want %d", tc.err, got, tc.want)
			}
		})
	}
}

type codeErr int

func (c codeErr) Error() string   { return fmt.Sprintf("status %d", int(c)) }
func (c codeErr) StatusCode() int { return int(c) }

func TestReadBelievesOnlyTheAgentsRetryQueues(t *testing.T) {
	a := failAgent(config.Retry{MaxAttempts: 6, Delay: time.Second, MaxDelay: 4 * time.Second, Multiplier: 2}, config.DeadLetter{Queue: "dead"})
	forged := amqp.Table{HeaderAttempts: int64(3), HeaderOriginalRoutingKey: "admin.purge", HeaderOriginalExchange: "admin"}
	death := func(queue, reason string) []interface{} {
		return []interface{}{amqp.Table{"queue": queue, "reason": reason, "count": int64(1)}}
	}
	with := func(h amqp.Table, k string, v interface{}) amqp.Table {
		out := amqp.Table{}
		for key, val := range h {
			out[key] = val
		}
		out[k] = v
		return out
	}
	back := func(h amqp.Table) *amqp.Delivery {
		return expiredFrom(&amqp.Delivery{Headers: h}, "work.retry.2s")
	}
	for _, tc := range []struct {
		name          string
		d             *amqp.Delivery
		failed        int
		exchange, key string
	}{
		{"a publisher's message: the driver's headers are ignored",
			&amqp.Delivery{Exchange: "orders", RoutingKey: "orders.created", Headers: forged}, 0, "orders", "orders.created"},
		{"x-death forged on a message through the agent's exchange",
			&amqp.Delivery{Exchange: "orders", RoutingKey: "work", Headers: with(forged, "x-death", death("work.retry.1s", "expired"))}, 0, "orders", "work"},
		{"through the default exchange, x-death of another queue",
			&amqp.Delivery{RoutingKey: "work", Headers: with(forged, "x-death", death("other.retry.1s", "expired"))}, 0, "", "work"},
		{"through the default exchange, x-death not expired",
			&amqp.Delivery{RoutingKey: "work", Headers: with(forged, "x-death", death("work.retry.1s", "rejected"))}, 0, "", "work"},
		{"x-death not an array", &amqp.Delivery{RoutingKey: "work", Headers: with(forged, "x-death", "work.retry.1s")}, 0, "", "work"},
		{"x-death empty", &amqp.Delivery{RoutingKey: "work", Headers: with(forged, "x-death", []interface{}{})}, 0, "", "work"},
		{"x-death of strings", &amqp.Delivery{RoutingKey: "work", Headers: with(forged, "x-death", []interface{}{"x"})}, 0, "", "work"},
		{"back from a retry queue", back(forged), 3, "admin", "admin.purge"},
		{"int32", back(with(forged, HeaderAttempts, int32(4))), 4, "admin", "admin.purge"},
		{"int", back(with(forged, HeaderAttempts, 2)), 2, "admin", "admin.purge"},
		{"uint8", back(with(forged, HeaderAttempts, uint8(1))), 1, "admin", "admin.purge"},
		{"negative: clamped to 0", back(with(forged, HeaderAttempts, int64(-1))), 0, "admin", "admin.purge"},
		{"huge: clamped to max_attempts-1", back(with(forged, HeaderAttempts, int64(9223372036854775807))), 5, "admin", "admin.purge"},
		{"uint64 past int64", back(with(forged, HeaderAttempts, uint64(1<<63))), 0, "admin", "admin.purge"},
		{"a string", back(with(forged, HeaderAttempts, "7")), 0, "admin", "admin.purge"},
		{"a float", back(with(forged, HeaderAttempts, 2.5)), 0, "admin", "admin.purge"},
		{"a table", back(with(forged, HeaderAttempts, amqp.Table{"n": int64(1)})), 0, "admin", "admin.purge"},
		{"null", back(with(forged, HeaderAttempts, nil)), 0, "admin", "admin.purge"},
		{"origin not text", back(with(forged, HeaderOriginalRoutingKey, int64(1))), 3, "", "work"},
		{"origin too long", back(with(forged, HeaderOriginalRoutingKey, strings.Repeat("k", 256))), 3, "", "work"},
		{"origin not UTF-8", back(with(forged, HeaderOriginalExchange, "\xff")), 3, "", "work"},
		{"no headers", &amqp.Delivery{RoutingKey: "k"}, 0, "", "k"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := a.msg(tc.d)
			if m.failed != tc.failed || m.exchange != tc.exchange || m.key != tc.key {
				t.Errorf("read: failed %d, origin %q/%q; want %d, %q/%q", m.failed, m.exchange, m.key, tc.failed, tc.exchange, tc.key)
			}
			if m.attempt() < 1 || m.attempt() > 6 {
				t.Errorf("attempt %d out of 1..6", m.attempt())
			}
		})
	}
}

// The throttle count is read as the attempt count is: clamped, an
// ill-typed value read as 0, both logged at DEBUG; its absence is normal.
func TestReadThrottleCount(t *testing.T) {
	logs := &bytes.Buffer{}
	a := panicAgent(t, logs, Options{})
	retryQueue := consumer.RetryQueue("work", a.opts.Session.RetryDelays[0])
	for _, tc := range []struct {
		value interface{}
		want  int
		log   string
	}{
		{int32(7), 7, ""},
		{int64(-3), 0, "x-krakend-throttles -3 clamped to 0"},
		{int64(5_000_000), maxThrottles, "x-krakend-throttles 5000000 clamped to 1000000"},
		{"9", 0, "x-krakend-throttles is missing or not an integer"},
		{nil, 0, "x-krakend-throttles is missing or not an integer"},
	} {
		logs.Reset()
		h := amqp.Table{HeaderAttempts: int64(1), HeaderThrottles: tc.value}
		m := a.msg(expiredFrom(&amqp.Delivery{MessageId: "m", Headers: h}, retryQueue))
		if m.throttles != tc.want {
			t.Errorf("%#v: throttles %d, want %d", tc.value, m.throttles, tc.want)
		}
		if got := logs.String(); tc.log == "" && strings.Contains(got, HeaderThrottles) || !strings.Contains(got, tc.log) {
			t.Errorf("%#v: log %q, want %q", tc.value, got, tc.log)
		}
	}
	logs.Reset()
	a.msg(expiredFrom(&amqp.Delivery{Headers: amqp.Table{HeaderAttempts: int64(1)}}, retryQueue))
	if strings.Contains(logs.String(), HeaderThrottles) {
		t.Errorf("no throttle count logged %q: its absence is normal", logs.String())
	}
}

// fullDelivery sets every property amqp091 carries.
func fullDelivery() *amqp.Delivery {
	return &amqp.Delivery{
		Headers:         amqp.Table{"tenant": "acme", "n": int32(7), consumer.PublishIDHeader: "old-publish-id"},
		ContentType:     "application/json",
		ContentEncoding: "gzip",
		DeliveryMode:    amqp.Persistent,
		Priority:        5,
		CorrelationId:   "corr-1",
		ReplyTo:         "replies",
		Expiration:      "60000",
		MessageId:       "msg-1",
		Timestamp:       time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		Type:            "order.created",
		UserId:          "guest",
		AppId:           "shop",
		Exchange:        "orders",
		RoutingKey:      "orders.created",
		Body:            []byte("\x00\x01body\xff"),
	}
}

func TestCopyOf(t *testing.T) {
	a := mustNew(Options{Name: "copier", Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}}, Logger: logging.NoOp})
	retryQueue := consumer.RetryQueue("work", a.opts.Session.RetryDelays[0])
	d := fullDelivery()
	// A publisher's own x-krakend-* headers are dropped, not copied.
	d.Headers[HeaderOriginalRoutingKey], d.Headers[HeaderLastError] = "admin.purge", "forged"
	c := a.copyOf(a.msg(d), 1, 0, "backend answered status 500")

	// user_id, reply_to and expiration are the broker's to act on: the
	// copy carries none of them as a property.
	want := amqp.Publishing{
		ContentType: d.ContentType, ContentEncoding: d.ContentEncoding, DeliveryMode: d.DeliveryMode,
		Priority: d.Priority, CorrelationId: d.CorrelationId,
		MessageId: d.MessageId, Timestamp: d.Timestamp, Type: d.Type, AppId: d.AppId,
	}
	got := c
	got.Headers, got.Body = nil, nil
	if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
		t.Errorf("properties:\n got %+v\nwant %+v", got, want)
	}
	if string(c.Body) != string(d.Body) {
		t.Errorf("body %q, want %q", c.Body, d.Body)
	}
	wantHeaders := map[string]interface{}{
		"tenant":                 "acme",
		"n":                      int32(7),
		HeaderAttempts:           int64(1),
		HeaderLastError:          "backend answered status 500",
		HeaderOriginalRoutingKey: "orders.created",
		HeaderOriginalExchange:   "orders",
		HeaderOriginalUserID:     "guest",
		HeaderOriginalReplyTo:    "replies",
	}
	for k, v := range wantHeaders {
		if c.Headers[k] != v {
			t.Errorf("header %s = %#v, want %#v", k, c.Headers[k], v)
		}
	}
	if _, ok := c.Headers[consumer.PublishIDHeader]; ok {
		t.Errorf("the copy keeps %s from the delivery", consumer.PublishIDHeader)
	}
	if len(c.Headers) != len(wantHeaders) {
		t.Errorf("headers %v, want exactly %v", c.Headers, wantHeaders)
	}
	if d.Headers[consumer.PublishIDHeader] != "old-publish-id" || len(d.Headers) != 5 {
		t.Errorf("copyOf changed the delivery's headers: %v", d.Headers)
	}
	if err := c.Headers.Validate(); err != nil {
		t.Errorf("the copy's headers cannot be published: %v", err)
	}

	t.Run("repeated copies keep the first origin and count up", func(t *testing.T) {
		first := a.copyOf(a.msg(fullDelivery()), 1, 0, "first")
		// The copy comes back from its retry queue through the default
		// exchange, routed by the work queue's name.
		again := expiredFrom(&amqp.Delivery{Headers: first.Headers, Body: first.Body, MessageId: first.MessageId}, retryQueue)
		second := a.copyOf(a.msg(again), 2, 0, "second")
		back := expiredFrom(&amqp.Delivery{Headers: second.Headers, Body: second.Body}, retryQueue)
		third := a.copyOf(a.msg(back), 3, 0, "third")
		for i, c := range []amqp.Publishing{second, third} {
			if c.Headers[HeaderOriginalRoutingKey] != "orders.created" || c.Headers[HeaderOriginalExchange] != "orders" {
				t.Errorf("copy %d: origin %v/%v, want orders/orders.created", i+2,
					c.Headers[HeaderOriginalExchange], c.Headers[HeaderOriginalRoutingKey])
			}
		}
		if third.Headers[HeaderAttempts] != int64(3) || third.Headers[HeaderLastError] != "third" {
			t.Errorf("third copy: attempts %v, last error %v", third.Headers[HeaderAttempts], third.Headers[HeaderLastError])
		}
		if n := a.msg(expiredFrom(&amqp.Delivery{Headers: third.Headers}, retryQueue)).failed; n != 3 {
			t.Errorf("failed attempts read back from the third copy = %d, want 3", n)
		}
	})

	t.Run("a delivery with no headers", func(t *testing.T) {
		c := a.copyOf(a.msg(&amqp.Delivery{RoutingKey: "k", Exchange: "x"}), 1, 0, "r")
		if c.Headers[HeaderOriginalRoutingKey] != "k" || c.Headers[HeaderAttempts] != int64(1) {
			t.Errorf("headers %v", c.Headers)
		}
	})

	t.Run("a long reason is truncated to valid UTF-8", func(t *testing.T) {
		reason := strings.Repeat("é", 2000)
		c := a.copyOf(a.msg(&amqp.Delivery{}), 1, 0, reason)
		got, _ := c.Headers[HeaderLastError].(string)
		if len(got) > 1024 || len(got) < 1000 || !utf8.ValidString(got) {
			t.Errorf("last error: %d bytes, valid UTF-8 %t", len(got), utf8.ValidString(got))
		}
	})
}

func TestTruncate(t *testing.T) {
	for _, tc := range []struct {
		s    string
		n    int
		want string
	}{
		{"short", 10, "short"},
		{"exact", 5, "exact"},
		{"abcdef", 3, "abc"},
		{"ééé", 3, "é"}, // the second é is split after its first byte
		{"ééé", 4, "éé"},
		{"a€b", 2, "a"}, // € is 3 bytes
		{"a€b", 3, "a"},
		{"a€b", 4, "a€"},
		{"😀😀", 5, "😀"}, // 4-byte rune
		{"😀😀", 7, "😀"},
		{"", 0, ""},
		{"x", 0, ""},
	} {
		got := truncate(tc.s, tc.n)
		if got != tc.want || !utf8.ValidString(got) || len(got) > tc.n {
			t.Errorf("truncate(%q, %d) = %q, want %q", tc.s, tc.n, got, tc.want)
		}
	}
	// Every cut of a string of mixed widths.
	s := strings.Repeat("aé€😀", 20)
	for n := 0; n <= len(s); n++ {
		got := truncate(s, n)
		if !utf8.ValidString(got) || len(got) > n || !strings.HasPrefix(s, got) || n-len(got) > 3 {
			t.Fatalf("truncate(s, %d) = %q (%d bytes): not the longest valid prefix", n, got, len(got))
		}
	}
}

// copyRecorder is a publisher that records every copy.
type copyRecorder struct {
	mu     sync.Mutex
	copies []published
	err    error
}

type published struct {
	exchange, key string
	msg           amqp.Publishing
}

func (c *copyRecorder) Publish(_ context.Context, exchange, key string, msg amqp.Publishing) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.copies = append(c.copies, published{exchange, key, msg})
	return c.err
}

func failAgent(retry config.Retry, dead config.DeadLetter) *Agent {
	return mustNew(Options{
		Name:       "failer",
		Session:    consumer.Settings{Topology: consumer.Topology{Queue: "work"}},
		Workers:    1,
		Timeout:    time.Second,
		Retry:      retry,
		DeadLetter: dead,
		Logger:     logging.NoOp,
	})
}

// redeliver turns a copy into the delivery the agent gets back from the
// retry queue, as the broker dead-letters it: through the default
// exchange, routed by the work queue's name, with an x-death entry.
func redeliver(acker amqp.Acknowledger, p published, tag uint64) *amqp.Delivery {
	d := &amqp.Delivery{Acknowledger: acker, DeliveryTag: tag, Headers: p.msg.Headers, Body: p.msg.Body, MessageId: p.msg.MessageId}
	return expiredFrom(d, p.key)
}

// expiredFrom makes d a delivery dead-lettered back to the work queue
// "work" from retryQueue.
func expiredFrom(d *amqp.Delivery, retryQueue string) *amqp.Delivery {
	h := amqp.Table{}
	for k, v := range d.Headers {
		h[k] = v
	}
	h["x-death"] = []interface{}{amqp.Table{"queue": retryQueue, "reason": "expired", "count": int64(1),
		"exchange": "", "routing-keys": []interface{}{retryQueue}}}
	d.Headers, d.Exchange, d.RoutingKey = h, "", "work"
	return d
}

// msg reads a delivery as a worker does.
func (a *Agent) msg(d *amqp.Delivery) *message {
	m := &message{d: d, bound: context.Background()}
	a.read(m)
	return m
}

// failDelivery runs the failure path of a delivery, settled on the spot.
func (a *Agent) failDelivery(ctx context.Context, pub publisher, d *amqp.Delivery, r result) string {
	return a.fail(ctx, a.flowOf(publishOnly{pub}), a.msg(d), r)
}

// flowOf is a session's flow that settles on the spot, with no holder.
func (a *Agent) flowOf(s session) *flow { return &flow{session: s, settler: directSettler{a}} }

// publishOnly is a session that delivers nothing.
type publishOnly struct{ publisher }

func (publishOnly) Deliveries() <-chan amqp.Delivery { return nil }

func (publishOnly) Done() <-chan struct{} { return nil }

func TestAgentFail(t *testing.T) {
	retry := config.Retry{MaxAttempts: 6, Delay: time.Second, MaxDelay: 4 * time.Second, Multiplier: 2}
	failure := result{reason: "backend answered status 500", status: 500}

	t.Run("retries with growing delays, then dead-letters at the bound", func(t *testing.T) {
		a := failAgent(retry, config.DeadLetter{Queue: "dead"})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		d := &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, RoutingKey: "orders.created", Exchange: "orders", MessageId: "m", Body: []byte("b")}
		for tag := uint64(1); tag <= 6; tag++ {
			a.failDelivery(context.Background(), pub, d, failure)
			d = redeliver(acker, pub.copies[len(pub.copies)-1], tag+1)
		}
		want := []string{"/work.retry.1s", "/work.retry.2s", "/work.retry.4s", "/work.retry.4s", "/work.retry.4s", "/dead"}
		if got := routes(pub.copies); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("copies went to %v, want %v", got, want)
		}
		for i, c := range pub.copies {
			if n := c.msg.Headers[HeaderAttempts]; n != int64(i+1) {
				t.Errorf("copy %d: %s = %v, want %d", i+1, HeaderAttempts, n, i+1)
			}
			if c.msg.Headers[HeaderOriginalRoutingKey] != "orders.created" {
				t.Errorf("copy %d: original routing key %v", i+1, c.msg.Headers[HeaderOriginalRoutingKey])
			}
		}
		last := pub.copies[len(pub.copies)-1].msg
		if last.Headers[HeaderAgent] != "failer" || !strings.Contains(last.Headers[HeaderLastError].(string), "500") {
			t.Errorf("dead letter headers: %v", last.Headers)
		}
		if _, ok := pub.copies[0].msg.Headers[HeaderAgent]; ok {
			t.Error("a retry copy carries the dead-letter agent header")
		}
		wantSettled(t, acker, 6, ack)
	})

	t.Run("a status in statuses dead-letters at once", func(t *testing.T) {
		a := failAgent(retry, config.DeadLetter{Queue: "dead", Statuses: []int{400, 422}})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, RoutingKey: "k"},
			result{reason: "invalid status code 422", status: 422})
		if got := routes(pub.copies); len(got) != 1 || got[0] != "/dead" {
			t.Fatalf("copies %v, want one to /dead", got)
		}
		if n := pub.copies[0].msg.Headers[HeaderAttempts]; n != int64(1) {
			t.Errorf("%s = %v, want 1", HeaderAttempts, n)
		}
		wantSettled(t, acker, 1, ack)
	})

	t.Run("a status not in statuses is retried", func(t *testing.T) {
		a := failAgent(retry, config.DeadLetter{Queue: "dead", Statuses: []int{422}})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1}, failure)
		a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 2}, result{reason: "timeout"})
		if got := routes(pub.copies); strings.Join(got, " ") != "/work.retry.1s /work.retry.1s" {
			t.Errorf("copies %v, want two to the first retry queue", got)
		}
		wantSettled(t, acker, 2, ack)
	})

	t.Run("a dead-letter exchange gets the original routing key, or the configured one", func(t *testing.T) {
		for _, tc := range []struct {
			key, want string
		}{{"", "dlx/orders.created"}, {"failed", "dlx/failed"}} {
			a := failAgent(config.Retry{MaxAttempts: 1, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2},
				config.DeadLetter{Exchange: "dlx", RoutingKey: tc.key})
			pub, acker := &copyRecorder{}, &fakeAcker{}
			// A message that has been through a retry queue already.
			d := expiredFrom(&amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Headers: amqp.Table{
				HeaderOriginalRoutingKey: "orders.created", HeaderOriginalExchange: "orders"}}, "work.retry.1s")
			a.failDelivery(context.Background(), pub, d, failure)
			if got := routes(pub.copies); len(got) != 1 || got[0] != tc.want {
				t.Errorf("routing_key %q: copies %v, want [%s]", tc.key, got, tc.want)
			}
			wantSettled(t, acker, 1, ack)
		}
	})

	t.Run("broker: nack without requeue at the bound, nothing published", func(t *testing.T) {
		a := failAgent(config.Retry{MaxAttempts: 2, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2},
			config.DeadLetter{Broker: true, Statuses: []int{422}})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		a.failDelivery(context.Background(), pub, expiredFrom(&amqp.Delivery{Acknowledger: acker, DeliveryTag: 1,
			Headers: amqp.Table{HeaderAttempts: int64(1)}}, "work.retry.1s"), failure)
		a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 2},
			result{reason: "422", status: 422})
		if len(pub.copies) != 0 {
			t.Errorf("published %v, want nothing", routes(pub.copies))
		}
		wantSettled(t, acker, 2, nackDiscard)
	})

	t.Run("broker: retried through the retry queues before the bound", func(t *testing.T) {
		a := failAgent(config.Retry{MaxAttempts: 2, Delay: time.Second, MaxDelay: time.Second, Multiplier: 2},
			config.DeadLetter{Broker: true})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1}, failure)
		if got := routes(pub.copies); len(got) != 1 || got[0] != "/work.retry.1s" {
			t.Errorf("copies %v, want [/work.retry.1s]", got)
		}
		wantSettled(t, acker, 1, ack)
	})

	t.Run("no dead letter: kept and retried at the longest delay, counted", func(t *testing.T) {
		a := failAgent(config.Retry{MaxAttempts: 2, Delay: 50 * time.Millisecond, MaxDelay: 300 * time.Millisecond, Multiplier: 2},
			config.DeadLetter{})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		for n := int64(0); n < 4; n++ {
			a.failDelivery(context.Background(), pub, expiredFrom(&amqp.Delivery{Acknowledger: acker, DeliveryTag: uint64(n + 1),
				Headers: amqp.Table{HeaderAttempts: n}}, "work.retry.50ms"), failure)
		}
		want := "/work.retry.50ms /work.retry.300ms /work.retry.300ms /work.retry.300ms"
		if got := routes(pub.copies); strings.Join(got, " ") != want {
			t.Errorf("copies %v, want %s", got, want)
		}
		if n := a.stats.exhausted.Load(); n != 3 {
			t.Errorf("exhausted = %d, want 3", n)
		}
		wantSettled(t, acker, 4, ack)
	})

	t.Run("no dead letter, a max_delay off the millisecond: the retry queue is one that was declared", func(t *testing.T) {
		r := config.Retry{MaxAttempts: 1, Delay: time.Millisecond, MaxDelay: 2500*time.Millisecond + 600*time.Microsecond, Multiplier: 2}
		a := failAgent(r, config.DeadLetter{})
		declared := map[string]bool{}
		for _, d := range a.opts.Session.RetryDelays {
			declared["/"+consumer.RetryQueue("work", d)] = true
		}
		pub, acker := &copyRecorder{}, &fakeAcker{}
		a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1}, failure)
		if got := routes(pub.copies); len(got) != 1 || !declared[got[0]] {
			t.Errorf("copy went to %v, which is not among the declared retry queues %v", got, declared)
		}
	})

	t.Run("a copy that fails is nacked with requeue after a pause, never acked", func(t *testing.T) {
		delay := 30 * time.Millisecond
		for _, dead := range []config.DeadLetter{{}, {Queue: "dead"}, {Exchange: "dlx"}} {
			a := failAgent(config.Retry{MaxAttempts: 1, Delay: delay, MaxDelay: delay, Multiplier: 2}, dead)
			pub, acker := &copyRecorder{err: consumer.ErrUnroutable}, &fakeAcker{}
			start := time.Now()
			a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1}, failure)
			if took := time.Since(start); took < delay {
				t.Errorf("dead letter %+v: requeued after %s, want a pause of at least %s", dead, took, delay)
			}
			if len(pub.copies) != 1 {
				t.Errorf("dead letter %+v: %d publishes, want 1", dead, len(pub.copies))
			}
			wantSettled(t, acker, 1, nackRequeue)
			if n := a.stats.copyFailed.Load(); n != 1 {
				t.Errorf("copyFailed = %d, want 1", n)
			}
			if e, _ := a.stats.lastCopyError.Load().(string); !strings.Contains(e, "route") {
				t.Errorf("last copy error %q does not give the reason", e)
			}
			if n := a.stats.deadLettered.Load(); n != 0 {
				t.Errorf("deadLettered = %d although the copy failed", n)
			}
		}
	})

	t.Run("a failed copy during shutdown is requeued at once", func(t *testing.T) {
		a := failAgent(config.Retry{MaxAttempts: 3, Delay: time.Hour, MaxDelay: time.Hour, Multiplier: 2}, config.DeadLetter{})
		pub, acker := &copyRecorder{err: errors.New("channel closed")}, &fakeAcker{}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		a.failDelivery(ctx, pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1}, failure)
		wantSettled(t, acker, 1, nackRequeue)
	})
}

// A 429 or 503 uses up an attempt only every throttlesPerAttempt: a long
// overload backs off without dead-lettering. Retry-After picks the retry
// queue.
func TestAgentFailThrottled(t *testing.T) {
	retry := config.Retry{MaxAttempts: 2, Delay: 100 * time.Millisecond, MaxDelay: 800 * time.Millisecond, Multiplier: 2}

	t.Run("throttles back off and use up an attempt every tenth", func(t *testing.T) {
		a := failAgent(retry, config.DeadLetter{Queue: "dead"})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		d := &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, RoutingKey: "k"}
		for tag := uint64(1); tag <= 2*throttlesPerAttempt; tag++ {
			status := http.StatusTooManyRequests
			if tag%2 == 0 {
				status = http.StatusServiceUnavailable
			}
			a.failDelivery(context.Background(), pub, d, result{reason: "busy", status: status, kind: "http_status"})
			d = redeliver(acker, pub.copies[len(pub.copies)-1], tag+1)
		}
		got := routes(pub.copies)
		want := []string{"/work.retry.100ms", "/work.retry.200ms", "/work.retry.400ms"}
		for len(want) < 2*throttlesPerAttempt-1 {
			want = append(want, "/work.retry.800ms")
		}
		want = append(want, "/dead")
		if strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("copies went to\n%v, want\n%v", got, want)
		}
		for i, c := range pub.copies {
			n := i + 1
			if c.msg.Headers[HeaderThrottles] != int64(n) {
				t.Errorf("copy %d: %s = %v, want %d", n, HeaderThrottles, c.msg.Headers[HeaderThrottles], n)
			}
			if want := int64(n / throttlesPerAttempt); c.msg.Headers[HeaderAttempts] != want && n < 2*throttlesPerAttempt {
				t.Errorf("copy %d: %s = %v, want %d", n, HeaderAttempts, c.msg.Headers[HeaderAttempts], want)
			}
		}
		wantSettled(t, acker, 2*throttlesPerAttempt, ack)
	})

	t.Run("a 500 after throttles uses up its attempt", func(t *testing.T) {
		a := failAgent(retry, config.DeadLetter{Queue: "dead"})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		d := expiredFrom(&amqp.Delivery{Acknowledger: acker, DeliveryTag: 1,
			Headers: amqp.Table{HeaderAttempts: int64(1), HeaderThrottles: int64(5)}}, "work.retry.100ms")
		a.failDelivery(context.Background(), pub, d, result{reason: "boom", status: 500, kind: "http_status"})
		if got := routes(pub.copies); len(got) != 1 || got[0] != "/dead" {
			t.Errorf("copies %v, want one to /dead", got)
		}
	})

	t.Run("Retry-After picks the shortest retry queue at least that long", func(t *testing.T) {
		for after, want := range map[time.Duration]string{
			150 * time.Millisecond: "/work.retry.200ms", 400 * time.Millisecond: "/work.retry.400ms",
			3 * time.Second: "/work.retry.800ms", time.Millisecond: "/work.retry.100ms",
		} {
			a := failAgent(retry, config.DeadLetter{Queue: "dead"})
			pub, acker := &copyRecorder{}, &fakeAcker{}
			a.failDelivery(context.Background(), pub, &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1},
				result{reason: "busy", status: 429, kind: "http_status", retryAfter: after})
			if got := routes(pub.copies); len(got) != 1 || got[0] != want {
				t.Errorf("Retry-After %s: copies %v, want [%s]", after, got, want)
			}
		}
	})

	t.Run("a forged throttle count on a first delivery is ignored", func(t *testing.T) {
		a := failAgent(retry, config.DeadLetter{Queue: "dead"})
		pub, acker := &copyRecorder{}, &fakeAcker{}
		d := &amqp.Delivery{Acknowledger: acker, DeliveryTag: 1, Headers: amqp.Table{HeaderThrottles: int64(9)}}
		a.failDelivery(context.Background(), pub, d, result{reason: "busy", status: 429, kind: "http_status"})
		if got := routes(pub.copies); len(got) != 1 || got[0] != "/work.retry.100ms" ||
			pub.copies[0].msg.Headers[HeaderThrottles] != int64(1) {
			t.Errorf("copies %v with headers %v, want one to the first retry queue, 1 throttle", got, pub.copies[0].msg.Headers)
		}
	})
}

func routes(copies []published) []string {
	out := make([]string, len(copies))
	for i, c := range copies {
		out[i] = c.exchange + "/" + c.key
	}
	return out
}

// wantSettled checks that each of n deliveries (tags 1..n) was settled
// exactly once, as want.
func wantSettled(t *testing.T, acker *fakeAcker, n int, want settleCall) {
	t.Helper()
	by := acker.byTag()
	for tag := uint64(1); tag <= uint64(n); tag++ {
		w := want
		w.tag = tag
		if calls := by[tag]; len(calls) != 1 || calls[0] != w {
			t.Errorf("delivery %d: settled %v, want exactly [%v]", tag, calls, w)
		}
	}
	if got := acker.count(); got != n {
		t.Errorf("%d settle calls, want %d", got, n)
	}
}
