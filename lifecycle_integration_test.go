//go:build integration

package asyncamqp_test

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

func TestInvalidAgentIsNotStartedAndSiblingsRun(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	bad := agentSpec{Name: "broken", Topic: "k", Workers: 1, Backend: be.URL,
		Block: map[string]interface{}{"host": "http://localhost/", "name": "q", "exchange": "x", "prefetch_count": "ten"}}
	good := agentSpec{Name: "healthy", Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, nil)}
	gw := startAgents(t, bad, good)
	gw.waitPing(t, "healthy")
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "1", Body: []byte(`{}`)})
	brokertest.Eventually(t, 10*time.Second, "the healthy agent's delivery", func() bool { return be.count() == 1 })

	logs := gw.logs.String()
	gw.expectLogs(t, "ERROR: [SERVICE: AsyncAgent][AMQP][broken] not started", "host: must start with amqp://", "prefetch_count: must be a whole number",
		"fix the block and restart the gateway")
	if strings.Count(logs, "[AMQP][broken]") != 1 {
		t.Errorf("want exactly one log line for the broken agent:\n%s", logs)
	}
}

func TestAgentThatGivesUpLeavesSiblingsRunning(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	const secret = "S3cretPassw0rd"
	lost := agentSpec{Name: "lost", Topic: "k", Workers: 1, Backend: be.URL,
		Block: map[string]interface{}{"host": "amqp://guest:" + secret + "@127.0.0.1:1/", "name": "q", "exchange": "x"}}
	good := agentSpec{Name: "steady", Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, nil)}
	gw := startAgents(t, lost, good)
	gw.waitPing(t, "steady")
	// max_retries 3 with linear backoff: 1s + 2s + 3s of waiting.
	brokertest.Eventually(t, 30*time.Second, "the lost agent to give up", func() bool {
		return strings.Contains(gw.logs.String(), "[AMQP][lost] giving up")
	})
	select {
	case err := <-gw.done:
		t.Fatalf("the agents' errgroup returned (%v) when one agent gave up", err)
	default:
	}
	f.pub.Publish(f.exchange, "k", amqp.Publishing{MessageId: "after", Body: []byte(`{}`)})
	brokertest.Eventually(t, 10*time.Second, "the steady agent's delivery", func() bool { return be.count() == 1 })

	logs := gw.logs.String()
	if strings.Contains(logs, secret) {
		t.Errorf("the password appears in the logs:\n%s", logs)
	}
	gw.expectLogs(t, "connect to amqp://guest:xxxxx@127.0.0.1:1/", "retry 1 in", "retry 3 in")
}

func TestWrongCredentialsAreReportedWithoutThePassword(t *testing.T) {
	be := newBackend(t, nil)
	const secret = "NotTheRightOne42"
	gw := startAgents(t, agentSpec{Name: "creds", Topic: "k", Workers: 1, Backend: be.URL,
		Block: map[string]interface{}{"host": "amqp://guest:" + secret + "@127.0.0.1:5672/", "name": "q", "exchange": "x"}})
	brokertest.Eventually(t, 15*time.Second, "the refusal in the log", func() bool {
		return strings.Contains(gw.logs.String(), "username or password not allowed")
	})
	if strings.Contains(gw.logs.String(), secret) {
		t.Errorf("the password appears in the logs:\n%s", gw.logs.String())
	}
}

// At shutdown, dispatches already running get shutdown_timeout (here
// consumer.timeout, 1s) plus one second: the agents return within that
// bound, with a margin for a busy machine, but not before the hung
// dispatches were cut (the agent returns only once every worker has
// ended; here each is cut by its own 1s timeout, or by the bound).
func TestStopReturnsWithinTheDispatchBound(t *testing.T) {
	const (
		timeout = time.Second
		bound   = timeout + time.Second // shutdown_timeout (default consumer.timeout) + 1s
		margin  = 3 * time.Second
	)
	f := newFixture(t)
	release := make(chan struct{})
	defer close(release)
	be := newBackend(t, nil)
	var mu sync.Mutex
	var arrived []time.Time
	// Every dispatch hangs until the agent cancels it.
	be.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		be.inFlight.Add(1)
		defer be.inFlight.Add(-1)
		_, _ = io.Copy(io.Discard, r.Body) // then the server sees the client go
		mu.Lock()
		arrived = append(arrived, time.Now())
		mu.Unlock()
		select {
		case <-r.Context().Done():
		case <-release:
		}
	})
	gw := startAgents(t, agentSpec{Name: "hang", Topic: "k", Workers: 2, Timeout: timeout.String(), Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "hang")
	f.pub.PublishN(f.exchange, "k", 10, jsonBody)
	brokertest.Eventually(t, 10*time.Second, "two hung dispatches", func() bool { return be.inFlight.Load() == 2 })
	start := time.Now()
	gw.stop(t) // fails the test if the agents do not return within 30s
	returned := time.Now()
	if took := returned.Sub(start); took > bound+margin {
		t.Errorf("the agents returned %s after the stop, want within the bound of %s (+%s margin)", took.Round(time.Millisecond), bound, margin)
	}
	t.Logf("the agents returned %s after the stop", returned.Sub(start).Round(time.Millisecond))
	mu.Lock()
	last := arrived[len(arrived)-1]
	mu.Unlock()
	// A dispatch ends at its timeout at the earliest: the client started
	// it a little before the backend saw it.
	if cutAt := last.Add(timeout - 100*time.Millisecond); returned.Before(cutAt) {
		t.Errorf("the agents returned %s after the last dispatch began, before its %s timeout cut it",
			returned.Sub(last).Round(time.Millisecond), timeout)
	}
	brokertest.Eventually(t, 5*time.Second, "the backend to see both dispatches cancelled", func() bool { return be.inFlight.Load() == 0 })
	// The hung dispatches timed out and were nacked: all 10 are back.
	brokertest.Eventually(t, 10*time.Second, "all messages back in the queue", func() bool {
		ready, unacked := brokertest.Counts(t, f.queue)
		return ready == 10 && unacked == 0
	})
}

func TestReconnectsWhenTheBrokerClosesTheConnection(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	be.delay = 20 * time.Millisecond
	gw := startAgents(t, agentSpec{Name: "reconnect", Topic: "k", Workers: 4, Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
	gw.waitPing(t, "reconnect")
	const n = 1500
	f.pub.PublishN(f.exchange, "k", n, jsonBody)
	brokertest.Eventually(t, 20*time.Second, "processing under way", func() bool { return be.count() >= 50 })
	if n := brokertest.CloseConnections(t, "krakend-amqp reconnect@"); n != 2 {
		t.Fatalf("closed %d connections, want the agent's two (consuming, copies)", n)
	}
	brokertest.Eventually(t, 60*time.Second, "every message at the backend", func() bool {
		seen := map[string]bool{}
		for _, id := range ids(be.requests()) {
			seen[id] = true
		}
		return len(seen) == n
	})
	f.waitEmpty(t)
	logs := gw.logs.String()
	gw.expectLogs(t, "session lost", "CONNECTION_FORCED", "retry 1 in")
	if strings.Count(logs, "consuming queue") != 2 {
		t.Errorf("want two 'consuming queue' lines (start and reconnect):\n%s", logs)
	}
	t.Logf("%d requests for %d messages (%d duplicates from the cut)", be.count(), n, be.count()-n)
}
