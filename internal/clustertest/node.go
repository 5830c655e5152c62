package clustertest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// Node is one RabbitMQ node of a Cluster. Clients reach it through Proxy,
// which a test can cut and pause; the test itself uses URL.
type Node struct {
	c        *Cluster
	Index    int // 1-based
	Name     string
	Port     int // AMQP, on 127.0.0.1
	DistPort int // Erlang distribution
	dir      string
	Proxy    *brokertest.Proxy
}

func (c *Cluster) newNode(i int) *Node {
	n := &Node{c: c, Index: i, Name: fmt.Sprintf("%s%s-%d@localhost", Prefix, c.run, i)}
	n.Port, n.DistPort = c.ports.pair(c.t)
	n.dir = filepath.Join(c.dir, strconv.Itoa(i))
	if err := os.Mkdir(n.dir, 0o755); err != nil {
		c.t.Fatalf("cluster: %v", err)
	}
	writeFile(c.t, filepath.Join(n.dir, "rabbitmq.conf"), n.config())
	writeFile(c.t, filepath.Join(n.dir, "enabled_plugins"), "")
	writeFile(c.t, filepath.Join(n.dir, "rabbitmq-env.conf"), "")
	chownToNodeUser(c.t, n.dir)
	n.Proxy = brokertest.NewProxy(c.t, n.addr())
	return n
}

// config is the node's rabbitmq.conf, in place of the machine's (which
// names port 5672): its own listener, and the first node as the peer to
// join at first boot.
func (n *Node) config() string {
	first := fmt.Sprintf("%s%s-1@localhost", Prefix, n.c.run)
	return fmt.Sprintf("listeners.tcp.1 = %s\n"+
		"cluster_formation.peer_discovery_backend = classic_config\n"+
		"cluster_formation.classic_config.nodes.1 = %s\n", n.addr(), first)
}

func (n *Node) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(n.Port)) }

// URL reaches the node directly.
func (n *Node) URL() string { return "amqp://guest:guest@" + n.addr() + "/" }

// ProxyURL reaches the node through its proxy.
func (n *Node) ProxyURL() string { return "amqp://guest:guest@" + n.Proxy.Addr() + "/" }

// env is what makes the node one of its own: name, ports, data, logs,
// no plugins and no settings from the machine's broker.
func (n *Node) env() []string {
	return []string{
		"HOME=" + nodeUserHome(),
		"RABBITMQ_NODENAME=" + n.Name,
		"RABBITMQ_DIST_PORT=" + strconv.Itoa(n.DistPort),
		"RABBITMQ_MNESIA_BASE=" + filepath.Join(n.dir, "mnesia"),
		"RABBITMQ_LOG_BASE=" + filepath.Join(n.dir, "log"),
		"RABBITMQ_PID_FILE=" + n.pidFile(),
		"RABBITMQ_CONFIG_FILE=" + filepath.Join(n.dir, "rabbitmq.conf"),
		"RABBITMQ_CONF_ENV_FILE=" + filepath.Join(n.dir, "rabbitmq-env.conf"),
		"RABBITMQ_ENABLED_PLUGINS_FILE=" + filepath.Join(n.dir, "enabled_plugins"),
		"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}",
	}
}

func (n *Node) pidFile() string { return filepath.Join(n.dir, "pid") }

// Start starts the node (again) and waits until it accepts AMQP
// connections, which it does once it has booted and joined the cluster.
// t is the test that asks (the methods of a node fail it, not the test
// that started the cluster).
func (n *Node) Start(t testing.TB) {
	t.Helper()
	n.start(t)
	n.awaitUp(t)
}

func (n *Node) start(t testing.TB) {
	_ = os.Remove(n.pidFile())
	cmd := asNodeUser(serverPath(), n.env(), "-detached")
	cmd.Dir = n.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cluster: start %s (rabbitmq-server -detached): %v: %s", n.Name, err, out)
	}
}

// awaitUp waits for the node's AMQP listener, which opens last in boot.
func (n *Node) awaitUp(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		conn, err := amqp.DialConfig(n.URL(), amqp.Config{Dial: amqp.DefaultDial(2 * time.Second)})
		if err == nil {
			_ = conn.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("cluster: %s did not answer within 2 minutes: %v", n.Name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Kill ends the node at once (SIGKILL), as a crash or a lost machine
// would: its clients' connections are reset, nothing is handed over.
func (n *Node) Kill(t testing.TB) { n.signal(t, syscall.SIGKILL) }

// Stop stops the node gracefully (SIGTERM, as a service manager does for
// a restart): it closes its client connections and leaves the cluster's
// quorum queues in order.
func (n *Node) Stop(t testing.TB) { n.signal(t, syscall.SIGTERM) }

func (n *Node) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	pid := n.pid()
	if pid == 0 {
		t.Fatalf("cluster: %s is not running", n.Name)
	}
	if err := syscall.Kill(pid, sig); err != nil {
		t.Fatalf("cluster: signal %s: %v", n.Name, err)
	}
	deadline := time.Now().Add(time.Minute)
	for alive(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("cluster: %s did not stop within a minute of %v", n.Name, sig)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pid is the node's OS process, from its pid file, or 0.
func (n *Node) pid() int {
	b, err := os.ReadFile(n.pidFile())
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// Running tells whether the node's process lives.
func (n *Node) Running() bool {
	pid := n.pid()
	return pid != 0 && alive(pid)
}

// CPU is the processor time the node's process has used so far.
func (n *Node) CPU() time.Duration { return processCPU(n.pid()) }

// logTail is the last lines of the node's log.
func (n *Node) logTail(lines int) string {
	b, err := os.ReadFile(filepath.Join(n.dir, "log", n.Name+".log"))
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(all[max(0, len(all)-lines):], "\n")
}

// Drain puts the node in maintenance mode before a planned stop, as
// `rabbitmq-upgrade drain` does for an upgrade: it hands the leadership
// of its quorum queues to other nodes and closes its client connections.
// A drain that fails (it did, now and then, with many queues to hand
// over on a busy machine) is tried again, twice.
func (n *Node) Drain(t testing.TB) {
	t.Helper()
	var err error
	for range 3 {
		if _, err = n.cli("rabbitmq-upgrade", "drain"); err == nil {
			return
		}
		t.Logf("cluster: %v; trying again", err)
	}
	t.Fatalf("cluster: %v", err)
}

// Revive takes the node out of maintenance mode.
func (n *Node) Revive(t testing.TB) {
	t.Helper()
	if _, err := n.cli("rabbitmq-upgrade", "revive"); err != nil {
		t.Fatalf("cluster: %v", err)
	}
}

// ctl runs rabbitmqctl against the node, within a minute.
func (n *Node) ctl(args ...string) ([]byte, error) { return n.cli("rabbitmqctl", args...) }

// cli runs one of RabbitMQ's CLI tools against the node, within a minute.
func (n *Node) cli(tool string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, tool, append([]string{"-q", "-n", n.Name}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s -n %s %s: %w: %s %s", tool, n.Name, strings.Join(args, " "), err,
			strings.TrimSpace(string(out)), stderr(err))
	}
	return out, nil
}

func stderr(err error) string {
	if e, ok := err.(*exec.ExitError); ok {
		return strings.TrimSpace(string(e.Stderr))
	}
	return ""
}

// Rows runs rabbitmqctl against the node and splits its output into
// tab-separated rows.
func (n *Node) Rows(args ...string) ([][]string, error) {
	out, err := n.ctl(args...)
	if err != nil {
		return nil, err
	}
	return brokertest.Rows(out), nil
}
