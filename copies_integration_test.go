//go:build integration

package asyncamqp_test

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// A retry or dead-letter copy is published with the gateway's
// credentials: what a publisher sets for the broker to act on (CC and
// BCC, x-death, expiration, user_id, a routing key nothing is bound for)
// must not make the broker flood, lose, hurry or refuse it. Each test
// below plays one such publisher against the real broker.

// failingOnce fails each message's first dispatch and records them all.
func failingOnce(t *testing.T, log *dispatchLog) *backend {
	var mu sync.Mutex
	seen := map[string]bool{}
	return newBackend(t, func(_ int, r received) int {
		log.add(r)
		mu.Lock()
		defer mu.Unlock()
		id := r.Header.Get("X-Amqp-Message-Id")
		if strings.HasPrefix(id, "always-") || !seen[id] {
			seen[id] = true
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
}

// checkTwice checks that each message was dispatched exactly twice,
// attempts 1 and 2.
func checkTwice(t *testing.T, log *dispatchLog, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if got := attemptsOf(log.of(id)); !slices.Equal(got, []string{"1", "2"}) {
			t.Errorf("message %q: dispatched with X-Amqp-Attempt %v, want [1 2]", id, got)
		}
	}
}

// CC names more routing keys for the exchange a message is published to:
// on the default exchange, more queues. A copy that kept it would put an
// untrusted message back into the work queue at attempt 1 with every
// failure, or into any queue of the vhost.
func TestCopyCannotBeFannedOutWithCC(t *testing.T) {
	f := newFixture(t)
	victim, dlq := brokertest.Name(t, "victim"), brokertest.Name(t, "dlq")
	brokertest.Cleanup(t, f.conn, victim, "")
	brokertest.Cleanup(t, f.conn, dlq, "")
	declareQueue(t, f.conn, victim)
	var log dispatchLog
	be := failingOnce(t, &log)
	const agent = "cc"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry":       fastRetry(2),
			"dead_letter": map[string]interface{}{"queue": dlq},
		})})
	gw.waitPing(t, agent)
	cc := []interface{}{f.queue, victim, f.queue + ".retry.50ms"}
	f.pub.Publish(f.exchange, "k.cc", amqp.Publishing{MessageId: "cc", Body: []byte(`{}`), Headers: amqp.Table{"CC": cc}})
	f.pub.Publish(f.exchange, "k.bcc", amqp.Publishing{MessageId: "always-bcc", Body: []byte(`{}`), Headers: amqp.Table{"BCC": cc}})
	f.pub.Publish(f.exchange, "k.after", amqp.Publishing{MessageId: "after", Body: []byte(`{}`)})
	brokertest.Eventually(t, 30*time.Second, "the always-failing message dead-lettered", func() bool { return ready(t, dlq) >= 1 })
	f.waitEmpty(t)
	time.Sleep(300 * time.Millisecond) // a fanned-out copy would be back by now

	checkTwice(t, &log, "cc", "after", "always-bcc")
	if n := ready(t, victim); n != 0 {
		t.Errorf("queue %q named in CC holds %d messages, want 0", victim, n)
	}
	if dead := takeAll(t, f.conn, dlq); len(dead) != 1 {
		t.Errorf("dead letters %v, want only always-bcc", deadIDs(dead))
	}
	for _, r := range be.requests() {
		if key := r.Header.Get("X-Amqp-Routing-Key"); !strings.HasPrefix(key, "k.") {
			t.Errorf("the backend saw routing key %q", key)
		}
		if r.Header.Get("X-Amqp-Message-Id") == "cc" && r.Header.Get("X-Amqp-Header-Cc") == "" {
			t.Errorf("attempt %s of message cc: the backend does not see the publisher's CC header", r.Header.Get("X-Amqp-Attempt"))
		}
	}
}

// RabbitMQ rewrites x-death when it dead-letters a copy back from a retry
// queue; a malformed one set by the publisher made that fail, losing the
// copy (and others behind it). Transient and persistent messages.
func TestCopyDropsThePublishersXDeath(t *testing.T) {
	f := newFixture(t)
	var log dispatchLog
	be := failingOnce(t, &log)
	const agent = "xdeath"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(3)})})
	gw.waitPing(t, agent)
	malformed := map[string]interface{}{
		"string":       "not a list",
		"list-of-text": []interface{}{"not a table"},
		"wrong-types":  []interface{}{amqp.Table{"count": "one", "queue": int64(7), "reason": int32(1), "time": "now"}},
		"empty-table":  []interface{}{amqp.Table{}},
	}
	var ids []string
	for name, death := range malformed {
		for _, mode := range []uint8{amqp.Transient, amqp.Persistent} {
			id := fmt.Sprintf("%s-%d", name, mode)
			ids = append(ids, id)
			f.pub.Publish(f.exchange, "k."+name, amqp.Publishing{MessageId: id, DeliveryMode: mode, Body: []byte(`{}`),
				Headers: amqp.Table{"x-death": death, "x-first-death-queue": int32(3), "x-last-death-reason": amqp.Table{}}})
		}
	}
	for i := range 5 {
		id := fmt.Sprintf("healthy-%d", i)
		ids = append(ids, id)
		f.pub.Publish(f.exchange, "k.healthy", amqp.Publishing{MessageId: id, Body: []byte(`{}`)})
	}
	brokertest.Eventually(t, 30*time.Second, "every message dispatched twice", func() bool {
		for _, id := range ids {
			if len(log.of(id)) < 2 {
				return false
			}
		}
		return true
	})
	f.waitEmpty(t)
	checkTwice(t, &log, ids...)
}

// The broker expires a message at the shorter of its queue's TTL and its
// own: a copy that kept the publisher's expiration let the publisher pick
// the retry delay.
func TestPublisherCannotPickTheRetryDelay(t *testing.T) {
	f := newFixture(t)
	var log dispatchLog
	be := failingOnce(t, &log)
	const agent = "expiry"
	const delay = 2 * time.Second
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"retry": map[string]interface{}{"max_attempts": 3, "delay": "2s", "max_delay": "2s"},
		})})
	gw.waitPing(t, agent)
	// Long enough to be delivered from the work queue, much shorter than
	// the retry delay.
	f.pub.Publish(f.exchange, "k.x", amqp.Publishing{MessageId: "hurry", Expiration: "500", Body: []byte(`{}`)})
	f.pub.Publish(f.exchange, "k.x", amqp.Publishing{MessageId: "short", Expiration: "500", Body: []byte(`{}`),
		Headers: amqp.Table{"x-delay": int32(1)}})
	brokertest.Eventually(t, 30*time.Second, "both retried", func() bool {
		return len(log.of("hurry")) >= 2 && len(log.of("short")) >= 2
	})
	f.waitEmpty(t)
	checkTwice(t, &log, "hurry", "short")
	checkGaps(t, log.of("hurry"), delay)
	checkGaps(t, log.of("short"), delay)
}

// RabbitMQ refuses a user_id other than the publishing connection's user
// (406): a copy that kept the publisher's could never be made, and the
// message was held forever. The backend still sees the user id.
func TestPublishersUserIDDoesNotHoldItsMessage(t *testing.T) {
	f := newFixture(t)
	user := brokertest.Name(t, "user")
	brokertest.Rabbitmqctl(t, "add_user", user, "secret")
	t.Cleanup(func() { brokertest.Rabbitmqctl(t, "delete_user", user) })
	brokertest.Rabbitmqctl(t, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
	other, err := amqp.Dial(strings.Replace(brokertest.URL(), "guest:guest@", user+":secret@", 1))
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	defer other.Close()
	pub := brokertest.NewPublisher(t, other)

	var log dispatchLog
	be := failingOnce(t, &log)
	const agent = "userid"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(3), "prefetch_count": 1})})
	gw.waitPing(t, agent)
	pub.Publish(f.exchange, "k.x", amqp.Publishing{MessageId: "mine", UserId: user, ReplyTo: "replies", Body: []byte(`{}`)})
	pub.Publish(f.exchange, "k.x", amqp.Publishing{MessageId: "after", Body: []byte(`{}`)})
	brokertest.Eventually(t, 30*time.Second, "both retried", func() bool {
		return len(log.of("mine")) >= 2 && len(log.of("after")) >= 2
	})
	f.waitEmpty(t)
	checkTwice(t, &log, "mine", "after")
	for _, r := range be.requests() {
		if r.Header.Get("X-Amqp-Message-Id") != "mine" {
			continue
		}
		if got := r.Header.Get("X-Amqp-User-Id"); got != user {
			t.Errorf("attempt %s: X-Amqp-User-Id %q, want %q", r.Header.Get("X-Amqp-Attempt"), got, user)
		}
		if got := r.Header.Get("X-Amqp-Reply-To"); got != "replies" {
			t.Errorf("attempt %s: X-Amqp-Reply-To %q, want replies", r.Header.Get("X-Amqp-Attempt"), got)
		}
	}
}

// With no dead_letter.routing_key, a dead letter goes out with the
// message's own routing key: a publisher picks one nothing is bound for.
// Such messages are not held without bound: each is parked in the
// longest retry queue, the rest of the queue flows although they are
// more than the prefetch window, and their dead letter lands once a
// queue is bound.
func TestUnroutableDeadLettersDoNotStopTheAgent(t *testing.T) {
	f := newFixture(t)
	dlx, dlxq := brokertest.Name(t, "dlx"), brokertest.Name(t, "dlxq")
	brokertest.Cleanup(t, f.conn, dlxq, dlx)
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.ExchangeDeclare(dlx, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	var log dispatchLog
	be := newBackend(t, func(_ int, r received) int {
		log.add(r)
		if strings.HasPrefix(r.Header.Get("X-Amqp-Message-Id"), "poison") {
			return http.StatusUnprocessableEntity
		}
		return http.StatusOK
	})
	const agent = "parker"
	const prefetch = 4
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 2, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{
			"prefetch_count": prefetch,
			"retry":          map[string]interface{}{"max_attempts": 3, "delay": "50ms", "max_delay": "1s"},
			"dead_letter":    map[string]interface{}{"exchange": dlx, "statuses": []int{422}},
		})})
	gw.waitPing(t, agent)
	for i := range 2 * prefetch {
		f.pub.Publish(f.exchange, "k.nobody", amqp.Publishing{MessageId: fmt.Sprint("poison-", i), Body: []byte(`{}`)})
	}
	for i := range 20 {
		f.pub.Publish(f.exchange, "k.ok", amqp.Publishing{MessageId: fmt.Sprint("ok-", i), Body: []byte(`{}`)})
	}
	brokertest.Eventually(t, 30*time.Second, "every healthy message acked", func() bool {
		for i := range 20 {
			if len(log.of(fmt.Sprint("ok-", i))) == 0 {
				return false
			}
		}
		return true
	})
	gw.expectLogs(t, "ERROR", "parked in "+f.queue+".retry.1s", "could not route")
	if _, err := ch.QueueDeclare(dlxq, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(dlxq, "#", dlx, false, nil); err != nil {
		t.Fatal(err)
	}
	brokertest.Eventually(t, 30*time.Second, "every poison message dead-lettered", func() bool { return ready(t, dlxq) >= 2*prefetch })
	f.waitEmpty(t)
	for i := range 2 * prefetch {
		if got := attemptsOf(log.of(fmt.Sprint("poison-", i))); !slices.Equal(got, []string{"1"}) {
			t.Errorf("poison-%d dispatched with attempts %v, want [1]: a parked message is not dispatched again", i, got)
		}
	}
	dead := takeAll(t, f.conn, dlxq)
	if len(dead) != 2*prefetch {
		t.Fatalf("dead letters %v, want %d", deadIDs(dead), 2*prefetch)
	}
	for _, d := range dead {
		checkDeadLetter(t, d, 1, agent, "422", "k.nobody")
		if _, ok := d.Headers["x-krakend-parked"]; ok {
			t.Errorf("dead letter %q carries x-krakend-parked", d.MessageId)
		}
	}
}

// declareQueue declares a durable classic queue for a test.
func declareQueue(t *testing.T, conn *amqp.Connection, name string) {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if _, err := ch.QueueDeclare(name, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
}

// amqp091 refuses a header table or array of more than 8,192 entries and
// used to close the connection on such a delivery: the message stayed at
// the head of the queue, every session died before its first delivery,
// and the agent gave up. It is now dead-lettered at once, without its
// headers and without reaching the backend, and the messages behind it
// flow; on a classic and on a quorum queue.
func TestUnreadableHeadersDoNotStopTheAgent(t *testing.T) {
	for _, kind := range []string{"classic", "quorum"} {
		t.Run(kind, func(t *testing.T) {
			f := newFixture(t)
			dlq := brokertest.Name(t, "dlq")
			brokertest.Cleanup(t, f.conn, dlq, "")
			var log dispatchLog
			be := newBackend(t, func(_ int, r received) int {
				log.add(r)
				return http.StatusOK
			})
			extra := map[string]interface{}{"retry": fastRetry(3), "dead_letter": map[string]interface{}{"queue": dlq}, "durable": true}
			if kind == "quorum" {
				extra["queue_args"] = map[string]interface{}{"x-queue-type": "quorum"}
			}
			const agent = "unreadable"
			gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 2, Backend: be.URL,
				Block: block(f.queue, f.exchange, extra)})
			gw.waitPing(t, agent)
			big := make([]interface{}, 8193)
			for i := range big {
				big[i] = int32(i)
			}
			f.pub.Publish(f.exchange, "k.big", amqp.Publishing{MessageId: "big", Body: []byte(`{}`),
				Headers: amqp.Table{"big": big, "tenant": "acme"}})
			for i := range 5 {
				f.pub.Publish(f.exchange, "k.ok", amqp.Publishing{MessageId: fmt.Sprint("ok-", i), Body: []byte(`{}`)})
			}
			brokertest.Eventually(t, 30*time.Second, "the unreadable message dead-lettered", func() bool { return ready(t, dlq) >= 1 })
			brokertest.Eventually(t, 30*time.Second, "the messages behind it dispatched", func() bool {
				for i := range 5 {
					if len(log.of(fmt.Sprint("ok-", i))) == 0 {
						return false
					}
				}
				return true
			})
			f.waitEmpty(t)
			if n := len(log.of("big")); n != 0 {
				t.Errorf("the unreadable message was dispatched %d times", n)
			}
			dead := takeAll(t, f.conn, dlq)
			if len(dead) != 1 || dead[0].MessageId != "big" {
				t.Fatalf("dead letters %v, want the unreadable message", deadIDs(dead))
			}
			checkDeadLetter(t, dead[0], 1, agent, `header "big"`, "k.big")
			if why, _ := dead[0].Headers["x-krakend-last-error"].(string); !strings.Contains(why, "8192") {
				t.Errorf("dead letter reason %q does not say what was refused", why)
			}
			if _, ok := dead[0].Headers["big"]; ok {
				t.Error("the dead letter carries the unreadable header")
			}
			if strings.Contains(gw.logs.String(), "giving up") || strings.Contains(gw.logs.String(), "session lost") {
				t.Errorf("the agent lost its session:\n%s", gw.logs.String())
			}
		})
	}
}

// The broker closes a connection that sends a frame over its frame_max,
// and a copy's properties travel in one frame: a publisher whose
// properties are just under the limit must not make the driver's copy
// go over it and take the session down with it.
func TestCopyOfPropertiesAtTheFrameSizeIsMade(t *testing.T) {
	f := newFixture(t)
	var log dispatchLog
	be := failingOnce(t, &log)
	const agent = "framesize"
	gw := startAgents(t, agentSpec{Name: agent, Topic: "k.#", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"retry": fastRetry(3)})})
	gw.waitPing(t, agent)
	// RabbitMQ's and amqp091's frame_max: 131,072 bytes, 8 of them the
	// frame's header and end, 14 the content header's fixed part.
	filler := strings.Repeat("x", 131072-8-14-200)
	f.pub.Publish(f.exchange, "k.big", amqp.Publishing{MessageId: "big", Body: []byte(`{}`),
		Headers: amqp.Table{"filler": filler}})
	f.pub.Publish(f.exchange, "k.after", amqp.Publishing{MessageId: "after", Body: []byte(`{}`)})
	brokertest.Eventually(t, 30*time.Second, "both retried", func() bool {
		return len(log.of("big")) >= 2 && len(log.of("after")) >= 2
	})
	f.waitEmpty(t)
	checkTwice(t, &log, "big", "after")
	if strings.Contains(gw.logs.String(), "session lost") {
		t.Errorf("the agent lost its session:\n%s", gw.logs.String())
	}
}
