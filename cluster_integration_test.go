//go:build integration && cluster

package asyncamqp_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
	"github.com/krakend-contrib/async-amqp/internal/clustertest"
)

// The cluster tests run three gateways (three agents, each started by its
// own AgentStarter on its own connections) against a three-node cluster
// of their own, on a quorum queue of durable, persistent messages, with
// every node in hosts. `make cluster-test` runs them. Speed is reported,
// never asserted.

const gateways = 3

// TestCluster starts one cluster and runs every scenario on it in turn,
// each on queues of its own: a cluster takes half a minute to start.
func TestCluster(t *testing.T) {
	c := clustertest.Start(t, 3)
	t.Run("LeaderNodeKilled", func(t *testing.T) { leaderNodeKilled(t, c) })
	t.Run("RollingRestart", func(t *testing.T) { rollingRestart(t, c, false) })
	t.Run("RollingRestartDrained", func(t *testing.T) { rollingRestart(t, c, true) })
	t.Run("NodeCutOff", func(t *testing.T) { nodeCutOff(t, c) })
	t.Run("BrokerCancelsConsumers", func(t *testing.T) { brokerCancelsConsumers(t, c) })
	t.Run("FailureQueuesAreQuorum", func(t *testing.T) { failureQueuesAreQuorum(t, c) })
	t.Run("Throughput", func(t *testing.T) { throughput(t, c) })
}

// leaderNodeKilled: the node that leads the queue is killed while 20,000
// messages flow, and started again a little later.
func leaderNodeKilled(t *testing.T, c *clustertest.Cluster) {
	run := newClusterFlow(t, c, gateways)
	leader := run.leader()
	run.publishInBackground(20000, 2000)
	run.untilDelivered(4000)
	run.fault(fmt.Sprintf("kill %s, the queue's leader", leader.Name))
	leader.Kill(t)
	t.Logf("new leader: %s", run.leader().Name)
	run.untilDelivered(12000)
	t.Logf("starting %s again", leader.Name)
	leader.Start(t)
	run.finish()
}

// rollingRestart: each node is stopped and started in turn, as for an
// upgrade, while messages flow; the next node goes down only once the
// one before is back. With drain, each node is first put in maintenance
// mode (rabbitmq-upgrade drain), as RabbitMQ's upgrade guide says.
func rollingRestart(t *testing.T, c *clustertest.Cluster, drain bool) {
	run := newClusterFlow(t, c, gateways)
	run.publishInBackground(20000, 400) // 50 s of flow: longer than the three restarts
	run.untilDelivered(2000)
	what := "rolling restart"
	if drain {
		what = "rolling restart with drain"
	}
	run.fault(what)
	for _, n := range c.Nodes {
		from, led := time.Now(), run.leader() == n
		if drain {
			n.Drain(t)
		}
		n.Stop(t)
		n.Start(t)
		if drain {
			n.Revive(t)
		}
		t.Logf("%s restarted (it led the queue: %t); longest pause in deliveries meanwhile %s; %d confirmed, %d delivered so far",
			n.Name, led, run.rec.longestGap(from, time.Now()), run.pub.Confirmed.Load(), run.rec.unique())
	}
	run.finish()
}

// nodeCutOff: the node gateway 1 is connected to loses its client
// connections (reset) and refuses new ones for 10 s.
func nodeCutOff(t *testing.T, c *clustertest.Cluster) {
	run := newClusterFlow(t, c, gateways)
	run.publishInBackground(20000, 1500)
	run.untilDelivered(4000)
	n := c.Nodes[0]
	n.Proxy.Pause()
	run.fault(fmt.Sprintf("cut %s's client connections for 10s", n.Name))
	cut := n.Proxy.Cut()
	time.Sleep(10 * time.Second) // the outage itself, not a wait for a result
	n.Proxy.Resume()
	t.Logf("%s reachable again (%d connections had been cut)", n.Name, cut)
	run.finish()
}

// brokerCancelsConsumers: the broker cancels every consumer of the queue
// (it is deleted under them); each agent consumes again on a fresh
// session, from the queue it declares anew, instead of sitting idle.
func brokerCancelsConsumers(t *testing.T, c *clustertest.Cluster) {
	run := newClusterFlow(t, c, gateways)
	run.publish(0, 300)
	run.untilDelivered(300)
	conn := c.Dial(t)
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDelete(run.queue, false, false, false); err != nil {
		t.Fatal(err)
	}
	run.fault("queue deleted: the broker cancels every consumer")
	run.awaitConsuming(2)
	t.Logf("every gateway consumes again %s after the cancel", time.Since(run.faultAt).Round(time.Millisecond))
	run.awaitConsumers(gateways)
	t.Logf("the broker lists %d consumers again %s after the cancel; publishing the second half (the first delivery "+
		"after the fault below includes this wait)", gateways, time.Since(run.faultAt).Round(time.Millisecond))
	run.publish(300, 600)
	run.untilDelivered(600)
	for _, g := range run.gws {
		g.expectLogs(t, "the broker cancelled the consumer")
	}
	run.report()
}

// failureQueuesAreQuorum: with a quorum work queue, the retry queue and
// the dead-letter queue are quorum queues, and a failing message goes
// through them to the dead-letter queue.
func failureQueuesAreQuorum(t *testing.T, c *clustertest.Cluster) {
	c.Heal(t)
	queue := brokertest.Name(t, "q")
	dead := queue + ".dead"
	rec := newRecorder(t, func(int) int { return http.StatusInternalServerError })
	blk := clusterBlock(c.ProxyURLs(1), queue, map[string]interface{}{
		"retry":       map[string]interface{}{"max_attempts": 2, "delay": "1s"},
		"dead_letter": map[string]interface{}{"queue": dead},
	})
	g := startRaw(t, clusterAgent("g1", rec.URL, 1, queue, blk))
	g.waitPing(t, "g1")
	pub := c.NewPublisher(queue)
	if err := pub.Run(context.Background(), 0, 1, 0); err != nil {
		t.Fatal(err)
	}
	var rows map[string]clustertest.QueueRow
	brokertest.Eventually(t, time.Minute, "the message in the dead-letter queue", func() bool {
		rows, _ = c.Queues(queue)
		return rows[dead].Ready == 1
	})
	for _, name := range []string{queue, queue + ".retry.1s", dead} {
		if got := rows[name].Type; got != "quorum" {
			t.Errorf("queue %s is %q, want quorum", name, got)
		}
	}
	t.Logf("backend called %d times; queue types: %s", rec.total(), queueTypes(rows))
}

func queueTypes(rows map[string]clustertest.QueueRow) string {
	var out []string
	for name, r := range rows {
		out = append(out, name[strings.LastIndex(name, "-")+1:]+"="+r.Type)
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

// throughput drains a preloaded quorum queue with 1, 2 and 3 gateways and
// reports messages per second and where the processor time went.
func throughput(t *testing.T, c *clustertest.Cluster) {
	const n = 20000
	for k := 1; k <= gateways; k++ {
		t.Run(fmt.Sprintf("%dgateways", k), func(t *testing.T) {
			run := newClusterFlow(t, c, 0)
			run.publish(0, n)
			leader := run.leader()
			cpu := startCPU(c)
			start := time.Now()
			run.startGateways(k)
			run.untilDelivered(n)
			first, last := run.rec.span()
			used := cpu.since(time.Since(start))
			t.Logf("THROUGHPUT %d gateway(s): %d messages in %s = %.0f msg/s (first to last delivery); %s; leader %s; split %s; load average %s",
				k, n, last.Sub(first).Round(time.Millisecond), float64(n)/last.Sub(first).Seconds(), used,
				leader.Name, run.rec.split(k), loadAverage())
		})
	}
	t.Run("amqp091", func(t *testing.T) { rawCeiling(t, c, n) })
}

// rawCeiling drains the same preloaded quorum queue with one plain
// amqp091 consumer (prefetch 60, an ack per message, no HTTP): what the
// cluster gives a consumer that does nothing, beside the gateways.
func rawCeiling(t *testing.T, c *clustertest.Cluster, n int) {
	run := newClusterFlow(t, c, 0)
	run.publish(0, n)
	leader := run.leader()
	conn, err := amqp.Dial(c.Nodes[1].URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err == nil {
		err = ch.Qos(60, 0, false)
	}
	var deliveries <-chan amqp.Delivery
	if err == nil {
		deliveries, err = ch.Consume(run.queue, "", false, false, false, false, nil)
	}
	if err != nil {
		t.Fatal(err)
	}
	cpu := startCPU(c)
	start := time.Now()
	var first time.Time
	timeout := time.After(3 * time.Minute)
	for i := range n {
		var d amqp.Delivery
		select {
		case d = <-deliveries:
		case <-timeout:
			t.Fatalf("%d of %d messages after 3 minutes", i, n)
		}
		if i == 0 {
			first = time.Now()
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(first)
	t.Logf("THROUGHPUT plain amqp091 consumer: %d messages in %s = %.0f msg/s; %s; leader %s; load average %s",
		n, took.Round(time.Millisecond), float64(n)/took.Seconds(), cpu.since(time.Since(start)), leader.Name, loadAverage())
}

// loadAverage is the machine's load over the last minute: other work
// shares the cores with the cluster.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Fields(string(b))[0]
}

// ---------------------------------------------------------------- a scenario

// clusterFlow is one scenario: a quorum queue, three gateways consuming it
// through the nodes' proxies (gateway k tries node k first), a backend
// recording what each gateway delivered, and a publisher.
type clusterFlow struct {
	t       *testing.T
	c       *clustertest.Cluster
	queue   string
	rec     *recorder
	gws     []*gateway
	pubDone chan error
	total   int
	faultAt time.Time
	what    string
	pub     *clustertest.Publisher
}

// newClusterFlow declares the queue and starts k gateways, on a whole
// cluster.
func newClusterFlow(t *testing.T, c *clustertest.Cluster, k int) *clusterFlow {
	c.Heal(t)
	f := &clusterFlow{t: t, c: c, queue: brokertest.Name(t, "q")}
	f.rec = newRecorder(t, nil)
	f.declare()
	f.pub = c.NewPublisher(f.queue)
	f.startGateways(k)
	return f
}

// publishInBackground publishes n messages at rate a second while the
// test goes on; finish waits for it.
func (f *clusterFlow) publishInBackground(n int, rate float64) {
	f.total = n
	f.pubDone = make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	f.t.Cleanup(cancel)
	go func() { f.pubDone <- f.pub.Run(ctx, 0, n, rate) }()
}

func (f *clusterFlow) declare() {
	conn := f.c.Dial(f.t)
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		f.t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(f.queue, true, false, false, false, amqp.Table(clustertest.Quorum)); err != nil {
		f.t.Fatal(err)
	}
}

func (f *clusterFlow) startGateways(k int) {
	for i := 1; i <= k; i++ {
		name := fmt.Sprintf("g%d", i)
		g := startRaw(f.t, clusterAgent(name, f.rec.URL, i, f.queue, clusterBlock(f.c.ProxyURLs(i), f.queue, nil)))
		f.gws = append(f.gws, g)
		g.waitPing(f.t, name)
	}
}

// publish publishes the messages from to to-1 and waits for the confirms.
func (f *clusterFlow) publish(from, to int) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := f.pub.Run(ctx, from, to, 0); err != nil {
		f.t.Fatal(err)
	}
	f.total = max(f.total, to)
}

// sessions counts the sessions each gateway opened (one more per
// reconnection).
func (f *clusterFlow) sessions() string {
	var out []string
	for i, g := range f.gws {
		out = append(out, fmt.Sprintf("g%d %d", i+1, strings.Count(g.logs.String(), "] consuming queue ")))
	}
	return strings.Join(out, ", ")
}

func (f *clusterFlow) leader() *clustertest.Node {
	var n *clustertest.Node
	brokertest.Eventually(f.t, time.Minute, "the queue's leader", func() bool {
		n, _ = f.c.Leader(f.queue)
		return n != nil
	})
	return n
}

// fault marks the moment of a fault: recovery is measured from it.
func (f *clusterFlow) fault(what string) {
	f.faultAt, f.what = time.Now(), what
	f.t.Logf("FAULT %s at %d delivered", what, f.rec.unique())
}

func (f *clusterFlow) untilDelivered(n int) {
	f.t.Helper()
	brokertest.Eventually(f.t, 4*time.Minute, fmt.Sprintf("%d messages delivered", n), func() bool {
		return f.rec.unique() >= n
	})
}

// awaitConsuming waits until each gateway has logged that it consumes
// for the nth time, i.e. on its nth session.
func (f *clusterFlow) awaitConsuming(n int) {
	f.t.Helper()
	brokertest.Eventually(f.t, time.Minute, fmt.Sprintf("session %d of every gateway", n), func() bool {
		for _, g := range f.gws {
			if strings.Count(g.logs.String(), "] consuming queue ") < n {
				return false
			}
		}
		return true
	})
}

func (f *clusterFlow) awaitConsumers(n int) {
	f.t.Helper()
	brokertest.Eventually(f.t, time.Minute, fmt.Sprintf("%d consumers on the queue", n), func() bool {
		rows, _ := f.c.Queues(f.queue)
		return rows[f.queue].Consumers == n
	})
}

// finish waits for the publisher and for every message, then for the
// queue to be empty, and reports.
func (f *clusterFlow) finish() {
	f.t.Helper()
	if err := <-f.pubDone; err != nil {
		f.t.Errorf("publisher: %v", err)
	}
	deadline := time.Now().Add(4 * time.Minute)
	for f.rec.unique() < f.total && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	brokertest.Eventually(f.t, 2*time.Minute, "an empty queue", func() bool {
		rows, err := f.c.Queues(f.queue)
		q, ok := rows[f.queue]
		return err == nil && ok && q.Ready+q.Unacked == 0
	})
	f.report()
}

// report logs the figures of the scenario and fails it if a message was
// lost or a declaration was refused.
func (f *clusterFlow) report() {
	f.t.Helper()
	r := f.rec
	lost := r.missing(f.total)
	dups, redelivered := r.duplicates()
	f.t.Logf("RESULT %s: published %d (publisher re-sent %d after unconfirmed batches), delivered %d, unique %d, lost %d, "+
		"duplicates %d (%d redelivered by the broker after a lost ack, %d extra copies from the publisher's re-sends)",
		f.what, f.total, f.pub.Resent.Load(), r.total(), r.unique(), len(lost), dups, redelivered, dups-redelivered)
	f.t.Logf("RECOVERY %s: first delivery after the fault %s later; per gateway, first delivery after the fault "+
		"and longest pause after it: %s; sessions per gateway: %s; split %s",
		f.what, r.firstAfter(f.faultAt, 0), r.perGatewayAfter(f.faultAt, len(f.gws)), f.sessions(), r.split(len(f.gws)))
	if len(lost) > 0 {
		f.t.Errorf("%d messages lost, e.g. %v", len(lost), lost[:min(10, len(lost))])
	}
	for _, g := range f.gws {
		logs := g.logs.String()
		for _, bad := range []string{"already exists with other settings", "giving up", "PRECONDITION_FAILED"} {
			if strings.Contains(logs, bad) {
				f.t.Errorf("a gateway logged %q:\n%s", bad, logs)
			}
		}
	}
}

// ---------------------------------------------------------------- config

// clusterAgent is gateway gw's agent: unlimited connection retries, a
// constant 1 s backoff, 8 workers, the backend's /g/<gw>.
func clusterAgent(name, backend string, gw int, queue string, blk map[string]interface{}) map[string]interface{} {
	return map[string]interface{}{
		"name":       name,
		"connection": map[string]interface{}{"max_retries": 0, "backoff_strategy": "fallback", "health_interval": "1s"},
		"consumer":   map[string]interface{}{"topic": queue, "workers": 8, "timeout": "5s"},
		"backend": []interface{}{map[string]interface{}{
			"host": []string{backend}, "url_pattern": fmt.Sprintf("/g/%d", gw),
			"method": "POST", "encoding": "no-op",
		}},
		"extra_config": blocks(blk),
	}
}

// clusterBlock lists every node, the first URL first, and declares a
// durable quorum queue.
func clusterBlock(urls []string, queue string, over map[string]interface{}) map[string]interface{} {
	b := map[string]interface{}{
		"host": urls[0], "hosts": urls[1:], "name": queue, "exchange": queue + ".x", "durable": true,
		"queue_args": clustertest.Quorum, "prefetch_count": 20,
	}
	for k, v := range over {
		b[k] = v
	}
	return b
}

// ---------------------------------------------------------------- backend

// recorder is the backend of every gateway: gateway k calls /g/k with
// the message number as the body. It records each delivery.
type recorder struct {
	*httptest.Server
	status func(n int) int
	mu     sync.Mutex
	seen   map[int]int
	redel  map[int]bool // the broker marked one of its deliveries redelivered
	log    []delivery
}

type delivery struct {
	gateway int
	at      time.Time
}

func newRecorder(t *testing.T, status func(n int) int) *recorder {
	r := &recorder{status: status, seen: map[int]int{}, redel: map[int]bool{}}
	r.Server = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.Close)
	return r
}

func (r *recorder) serve(w http.ResponseWriter, req *http.Request) {
	gw, _ := strconv.Atoi(strings.TrimPrefix(req.URL.Path, "/g/"))
	body, _ := io.ReadAll(io.LimitReader(req.Body, 64))
	id, err := strconv.Atoi(string(body))
	if err != nil {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	r.seen[id]++
	if req.Header.Get("X-Amqp-Redelivered") == "true" {
		r.redel[id] = true
	}
	r.log = append(r.log, delivery{gw, time.Now()})
	calls := len(r.log)
	r.mu.Unlock()
	if r.status != nil {
		w.WriteHeader(r.status(calls))
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (r *recorder) unique() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

func (r *recorder) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.log)
}

// duplicates counts deliveries beyond the first of each message, and how
// many of those are of messages the broker delivered again (one of their
// deliveries is marked redelivered; the others are copies the publisher
// sent twice). The flag is read per message, not per delivery: a
// redelivery can reach the backend before the dispatch it repeats.
func (r *recorder) duplicates() (dups, redelivered int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, n := range r.seen {
		dups += n - 1
		if r.redel[id] {
			redelivered += n - 1
		}
	}
	return dups, redelivered
}

func (r *recorder) missing(n int) []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	var lost []int
	for i := range n {
		if r.seen[i] == 0 {
			lost = append(lost, i)
		}
	}
	return lost
}

// firstAfter is the time from at to the first delivery after it, by
// gateway gw (0: any).
func (r *recorder) firstAfter(at time.Time, gw int) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range r.log {
		if d.at.After(at) && (gw == 0 || d.gateway == gw) {
			return d.at.Sub(at).Round(time.Millisecond).String()
		}
	}
	return "never"
}

func (r *recorder) perGatewayAfter(at time.Time, k int) string {
	var out []string
	for gw := 1; gw <= k; gw++ {
		out = append(out, fmt.Sprintf("g%d %s/%s", gw, r.firstAfter(at, gw), r.longestPause(at, gw)))
	}
	return strings.Join(out, ", ")
}

// longestPause is the longest time gateway gw went without a delivery
// from at until its last delivery: how long a reconnection stalled it.
func (r *recorder) longestPause(at time.Time, gw int) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	var longest time.Duration
	prev := at
	for _, d := range r.log {
		if d.gateway != gw || d.at.Before(at) {
			continue
		}
		longest = max(longest, d.at.Sub(prev))
		prev = d.at
	}
	return longest.Round(time.Millisecond)
}

// longestGap is the longest time between two deliveries, by any
// gateway, from from to to (the first counted from from).
func (r *recorder) longestGap(from, to time.Time) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	var longest time.Duration
	prev := from
	for _, d := range r.log {
		if d.at.Before(from) || d.at.After(to) {
			continue
		}
		longest = max(longest, d.at.Sub(prev))
		prev = d.at
	}
	return longest.Round(time.Millisecond)
}

// split is each gateway's share of the deliveries.
func (r *recorder) split(k int) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	counts := make([]int, k+1)
	for _, d := range r.log {
		if d.gateway <= k {
			counts[d.gateway]++
		}
	}
	var out []string
	for gw := 1; gw <= k; gw++ {
		out = append(out, fmt.Sprintf("g%d %d (%.0f%%)", gw, counts[gw], 100*float64(counts[gw])/float64(max(1, len(r.log)))))
	}
	return strings.Join(out, ", ")
}

func (r *recorder) span() (first, last time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.log[0].at, r.log[len(r.log)-1].at
}

// ---------------------------------------------------------------- CPU

// cpuMark holds the processor time used so far by the nodes and by this
// process (the gateways, the backend, the test).
type cpuMark struct {
	c     *clustertest.Cluster
	nodes []time.Duration
	self  time.Duration
}

func startCPU(c *clustertest.Cluster) cpuMark {
	m := cpuMark{c: c, self: clustertest.SelfCPU()}
	for _, n := range c.Nodes {
		m.nodes = append(m.nodes, n.CPU())
	}
	return m
}

// since says how many of the machine's cores each node and this process
// used on average over wall.
func (m cpuMark) since(wall time.Duration) string {
	cores := func(d time.Duration) float64 { return d.Seconds() / wall.Seconds() }
	var sum time.Duration
	var each []string
	for i, n := range m.c.Nodes {
		d := n.CPU() - m.nodes[i]
		sum += d
		each = append(each, fmt.Sprintf("%.2f", cores(d)))
	}
	return fmt.Sprintf("CPU over %s in cores: nodes %.2f (%s), gateways+backend+test %.2f",
		wall.Round(time.Millisecond), cores(sum), strings.Join(each, "+"), cores(clustertest.SelfCPU()-m.self))
}
