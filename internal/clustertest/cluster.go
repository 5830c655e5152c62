// Package clustertest runs a throwaway RabbitMQ cluster for the cluster
// tests: three nodes of its own on free loopback ports, beside the
// machine's broker (which it never touches), each behind a TCP proxy
// that a test can cut. It kills, stops and restarts nodes,
// tells which node leads a quorum queue, and publishes through node loss.
// Every node it starts is killed and its data removed when the test ends,
// and leftovers of an earlier run that died are swept at the next start.
//
// It needs rabbitmq-server and rabbitmqctl, and, when run as root, a
// rabbitmq user to run the nodes as. It fails, never skips, when the
// nodes cannot start.
package clustertest

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Prefix starts the names of the nodes and of their data directories, so
// that a later run can find what an earlier one left behind.
const Prefix = "rctest-"

// Cluster is a running cluster of nodes started by Start.
type Cluster struct {
	t     testing.TB
	run   string // random id of this run, in every node's name
	dir   string // the run's directory, one sub-directory per node
	Nodes []*Node
	ports ports
}

// Start starts n nodes, clusters them and waits until every node runs in
// the cluster. The first node forms the cluster; the others join it as
// they boot (classic config peer discovery), which costs no CLI calls.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	ensureCookie(t)
	sweep()
	c := &Cluster{t: t, run: randomID()}
	c.makeDir()
	t.Cleanup(c.destroy)
	for i := range n {
		c.Nodes = append(c.Nodes, c.newNode(i+1))
	}
	started := time.Now()
	c.Nodes[0].Start(t)
	for _, node := range c.Nodes[1:] {
		node.start(t) // -detached returns at once: they boot side by side
	}
	for _, node := range c.Nodes[1:] {
		node.awaitUp(t)
	}
	c.awaitClustered(n)
	t.Logf("cluster of %d nodes up in %s: %s", n, time.Since(started).Round(100*time.Millisecond), c.names())
	return c
}

func randomID() string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// makeDir creates the run's directory, owned by the user the nodes run
// as, with a file naming this process: sweep leaves a run alone while
// its process lives.
func (c *Cluster) makeDir() {
	dir, err := os.MkdirTemp("", Prefix+c.run+"-")
	if err != nil {
		c.t.Fatalf("cluster: %v", err)
	}
	c.dir = dir
	writeFile(c.t, filepath.Join(dir, "owner"), strconv.Itoa(os.Getpid()))
	chownToNodeUser(c.t, dir)
}

func (c *Cluster) names() []string {
	var names []string
	for _, n := range c.Nodes {
		names = append(names, n.Name)
	}
	return names
}

// awaitClustered waits until the first node sees n running nodes.
func (c *Cluster) awaitClustered(n int) {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		running, err := c.runningNodes()
		if err == nil && running == n {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("cluster: %d of %d nodes running after 2 minutes (%v)", running, n, err)
		}
		time.Sleep(time.Second)
	}
}

func (c *Cluster) runningNodes() (int, error) {
	out, err := c.Nodes[0].ctl("cluster_status", "--formatter", "json")
	if err != nil {
		return 0, err
	}
	var status struct {
		Running []string `json:"running_nodes"`
	}
	if err := json.Unmarshal(out, &status); err != nil {
		return 0, fmt.Errorf("cluster_status: %w", err)
	}
	return len(status.Running), nil
}

// destroy kills every node of the run and removes its data; after a
// failure it first shows the end of each node's log, which goes with it.
func (c *Cluster) destroy() {
	for _, n := range c.Nodes {
		n.Proxy.Close()
		if c.t.Failed() {
			c.t.Logf("cluster: the end of %s's log:\n%s", n.Name, n.logTail(40))
		}
	}
	for _, n := range c.Nodes {
		if pid := n.pid(); pid != 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if left := killRuns(func(run string) bool { return run == c.run }); len(left) > 0 {
		c.t.Errorf("cluster: processes %v of %s outlived SIGKILL", left, c.run)
	}
	if err := os.RemoveAll(c.dir); err != nil {
		c.t.Errorf("cluster: remove %s: %v", c.dir, err)
	}
}

// Heal starts every node that is down and lets every proxy through, so
// that a scenario begins on a whole cluster even after one before it
// failed half-way.
func (c *Cluster) Heal(t testing.TB) {
	t.Helper()
	for _, n := range c.Nodes {
		n.Proxy.Resume()
		if !n.Running() {
			t.Logf("cluster: %s is down: starting it", n.Name)
			n.Start(t)
		}
	}
}

// Up returns the nodes that run now, in order.
func (c *Cluster) Up() []*Node {
	var up []*Node
	for _, n := range c.Nodes {
		if n.Running() {
			up = append(up, n)
		}
	}
	return up
}

// Dial connects straight to the first node that answers, not through
// its proxy, for the test's own publishing and inspection.
func (c *Cluster) Dial(t testing.TB) *amqp.Connection {
	t.Helper()
	var errs []error
	for _, n := range c.Up() {
		conn, err := amqp.Dial(n.URL())
		if err == nil {
			return conn
		}
		errs = append(errs, err)
	}
	t.Fatalf("cluster: no node answers: %v", errs)
	return nil
}

// ProxyURLs are the client URLs of the nodes through their proxies,
// starting with node first (1-based) and wrapping around: a gateway
// given them connects to node first while it answers.
func (c *Cluster) ProxyURLs(first int) []string {
	var urls []string
	for i := range c.Nodes {
		urls = append(urls, c.Nodes[(first-1+i)%len(c.Nodes)].ProxyURL())
	}
	return urls
}
