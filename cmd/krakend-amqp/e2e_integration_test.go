//go:build integration

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

const exampleFile = "../../examples/krakend.json"

// TestCheckRejectsInvalidFixtures runs `check` on every invalid fixture:
// exit 1, and every problem the driver finds is printed on its own line,
// naming the agent and the field.
func TestCheckRejectsInvalidFixtures(t *testing.T) {
	bin := buildGateway(t)
	files := invalidFixtures(t)
	problemLine := regexp.MustCompile(`^(agent "[^"]+": [\w./\[\]-]+|extra_config\.[\w./-]+): `)
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			res := runGateway(t, bin, "check", "-c", file)
			if res.code != exitFailure {
				t.Fatalf("exit %d, want %d; output:\n%s", res.code, exitFailure, res.all())
			}
			if res.stdout != "" {
				t.Errorf("a failed check printed on stdout: %q", res.stdout)
			}
			if strings.Contains(res.all(), "guest:guest") {
				t.Errorf("output leaks the broker password:\n%s", res.all())
			}
			cfg, err := loadConfig(file)
			if err != nil { // a fixture Lura itself rejects
				if !strings.Contains(res.stderr, file) {
					t.Errorf("parse error does not name the file %s:\n%s", file, res.stderr)
				}
				return
			}
			problems := inspect(&cfg).problems
			if len(problems) == 0 {
				t.Fatalf("the driver finds nothing wrong with %s", file)
			}
			for _, p := range problems {
				if !problemLine.MatchString(p) {
					t.Errorf("problem does not name an agent and a field: %q", p)
				}
				if !hasLine(res.stderr, file+": "+p) {
					t.Errorf("output lacks the line %q:\n%s", file+": "+p, res.stderr)
				}
			}
		})
	}
}

// TestCheckAcceptsValidFiles runs `check` on the valid fixtures and the
// example: exit 0, a one-line summary, and no warning but the one a
// fixture is there to show: minimal.json keeps the defaults, durable and
// exclusive false, which RabbitMQ 4.3 refuses.
func TestCheckAcceptsValidFiles(t *testing.T) {
	bin := buildGateway(t)
	files, _ := filepath.Glob("../../testdata/valid/*.json")
	files = append(files, exampleFile)
	summary := regexp.MustCompile(`^.+: OK \(\d+ endpoints?, \d+ async agents?\)\n$`)
	warns := map[string]string{"minimal.json": `warning: agent "minimal": durable false and exclusive false`}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			res := runGateway(t, bin, "check", "-c", file)
			want := warns[filepath.Base(file)]
			warned := res.stderr == "" && want == "" ||
				want != "" && strings.Count(res.stderr, "\n") == 1 && strings.HasPrefix(res.stderr, file+": "+want)
			if res.code != exitOK || !summary.MatchString(res.stdout) || !warned {
				t.Fatalf("exit %d; stdout %q; stderr %q", res.code, res.stdout, res.stderr)
			}
		})
	}
	res := runGateway(t, bin, "check", "-c", exampleFile)
	if want := exampleFile + ": OK (1 endpoint, 2 async agents)\n"; res.stdout != want {
		t.Errorf("example summary %q, want %q", res.stdout, want)
	}
}

// TestRunRefusesBadFiles: `run` exits 1, naming the file or the field,
// before it starts anything.
func TestRunRefusesBadFiles(t *testing.T) {
	bin := buildGateway(t)
	dir := t.TempDir()
	broken := filepath.Join(dir, "broken.json")
	writeFile(t, broken, []byte(`{"version": 3, "endpoints": [`))
	badAgent := writeDoc(t, dir, "bad-agent.json", agentDoc("bad-scheme", "http://guest:guest@localhost:5672/"))
	for _, tc := range []struct {
		name, file string
		wants      []string
	}{
		{"missing file", filepath.Join(dir, "absent.json"), []string{"absent.json", "no such file"}},
		{"syntax error", broken, []string{"broken.json", "row"}},
		{"invalid agent", badAgent, []string{`agent "bad-scheme": extra_config.async/amqp.host:`, "not started"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := runGateway(t, bin, "run", "-c", tc.file)
			if res.code != exitFailure {
				t.Fatalf("exit %d, want %d; output:\n%s", res.code, exitFailure, res.all())
			}
			for _, want := range tc.wants {
				if !strings.Contains(res.stderr, want) {
					t.Errorf("stderr lacks %q:\n%s", want, res.stderr)
				}
			}
			if strings.Contains(res.all(), "guest:guest") {
				t.Errorf("output leaks the broker password:\n%s", res.all())
			}
		})
	}
}

// TestRunEndToEnd runs the gateway as a real process on a copy of the
// example, publishes to both agents, and checks that the backend got
// every event with its metadata, that the plain endpoint works, and that
// SIGTERM stops the gateway cleanly with nothing left in the queues.
func TestRunEndToEnd(t *testing.T) {
	bin := buildGateway(t)
	conn := brokertest.Dial(t)
	backend := newRecorder(t)
	ex := example{
		port:     freePort(t),
		backend:  backend.URL,
		exchange: brokertest.Name(t, "events"),
		queues:   map[string]string{"orders": brokertest.Name(t, "orders"), "payments": brokertest.Name(t, "payments")},
	}
	for _, q := range ex.queues {
		brokertest.Cleanup(t, conn, q, "")
	}
	brokertest.Cleanup(t, conn, "", ex.exchange)
	file := ex.write(t)
	if res := runGateway(t, bin, "check", "-c", file); res.code != exitOK {
		t.Fatalf("check of the test copy: exit %d:\n%s", res.code, res.all())
	}

	gw := startGateway(t, bin, "run", "-c", file)
	gw.waitHealth(t, ex.port, "orders", "payments")

	pub := brokertest.NewPublisher(t, conn)
	events := map[string]int{"orders.created": 200, "payments.card.eu": 100}
	for key, n := range events {
		pub.PublishN(ex.exchange, key, n, func(i int) []byte { return eventBody(key, i) })
	}
	brokertest.Eventually(t, 60*time.Second, "300 events at the backend", func() bool { return backend.count() >= 300 })
	checkDelivered(t, backend.requests(), events)
	checkStatusEndpoint(t, ex.port)

	if code := gw.terminate(t); code != exitOK {
		t.Fatalf("after SIGTERM the gateway exited %d; output:\n%s", code, gw.out.String())
	}
	for agent, q := range ex.queues {
		if ready, unacked := brokertest.Counts(t, q); ready != 0 || unacked != 0 {
			t.Errorf("agent %s: queue %s holds %d ready and %d unacked messages after the stop", agent, q, ready, unacked)
		}
	}
	if extra := backend.count() - 300; extra != 0 {
		t.Errorf("the backend got %d requests more than the 300 events", extra)
	}
	gw.expectLogs(t, `[AMQP][orders] stopped`, `[AMQP][payments] stopped`, `[SERVICE: krakend-amqp] stopped`)
	if strings.Contains(gw.out.String(), "guest:guest") {
		t.Errorf("the gateway logged the broker password:\n%s", gw.out.String())
	}
}

func eventBody(key string, i int) []byte {
	return []byte(fmt.Sprintf(`{"key":%q,"seq":%d}`, key, i))
}

// checkDelivered asserts each published event reached the backend once,
// as a POST to the agent's url_pattern, with its body and AMQP metadata.
func checkDelivered(t *testing.T, got []request, published map[string]int) {
	t.Helper()
	seen := map[string]int{}
	for _, r := range got {
		key, id := r.Header.Get("X-Amqp-Routing-Key"), r.Header.Get("X-Amqp-Message-Id")
		seen[key+"/"+id]++
		n, ok := published[key]
		if !ok {
			t.Errorf("request with routing key %q, published none", key)
			continue
		}
		seq, err := strconv.Atoi(id)
		if err != nil || seq < 0 || seq >= n {
			t.Errorf("%s: message id %q was not published", key, id)
			continue
		}
		if want := eventBody(key, seq); !bytes.Equal(r.Body, want) {
			t.Errorf("%s/%s: body %q, want %q", key, id, r.Body, want)
		}
		wantPath := "/" + strings.SplitN(key, ".", 2)[0] + "/" + key // url_pattern "/orders/{routing_key}"
		if r.Method != http.MethodPost || r.Path != wantPath {
			t.Errorf("%s/%s: %s %s, want POST %s", key, id, r.Method, r.Path, wantPath)
		}
		if ct := r.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s/%s: Content-Type %q", key, id, ct)
		}
	}
	for key, n := range published {
		for i := range n {
			if c := seen[fmt.Sprintf("%s/%d", key, i)]; c != 1 {
				t.Errorf("%s/%d reached the backend %d times, want once", key, i, c)
			}
		}
	}
}

func checkStatusEndpoint(t *testing.T, port int) {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/status", port))
	if err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != `{"status":"ok"}` {
		t.Errorf("GET /status: %d %s", resp.StatusCode, body)
	}
}

// example is the test's copy of examples/krakend.json: its own port,
// backend, exchange and queues, and the test broker.
type example struct {
	port     int
	backend  string
	exchange string
	queues   map[string]string // by agent name
}

func (e example) write(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile(exampleFile)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]interface{}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("%s: %v", exampleFile, err)
	}
	doc["port"] = e.port
	for _, ep := range list(doc["endpoints"]) {
		e.pointBackends(ep)
	}
	for _, a := range list(doc["async_agent"]) {
		e.pointBackends(a)
		name, _ := a["name"].(string)
		block, _ := a["extra_config"].(map[string]interface{})[asyncamqp.Namespace].(map[string]interface{})
		if block == nil || e.queues[name] == "" {
			t.Fatalf("%s: agent %q has no %s block or is unknown to the test", exampleFile, name, asyncamqp.Namespace)
		}
		block["host"], block["exchange"], block["name"] = brokertest.URL(), e.exchange, e.queues[name]
	}
	return writeDoc(t, t.TempDir(), "krakend.json", doc)
}

func (e example) pointBackends(entry map[string]interface{}) {
	for _, b := range list(entry["backend"]) {
		b["host"] = []string{e.backend}
	}
}

func list(v interface{}) []map[string]interface{} {
	var out []map[string]interface{}
	items, _ := v.([]interface{})
	for _, item := range items {
		if m, ok := item.(map[string]interface{}); ok {
			out = append(out, m)
		}
	}
	return out
}

// agentDoc is a krakend.json with one agent on the given AMQP host.
func agentDoc(name, host string) map[string]interface{} {
	return map[string]interface{}{
		"version": 3,
		"async_agent": []interface{}{map[string]interface{}{
			"name":     name,
			"consumer": map[string]interface{}{"topic": "#"},
			"backend":  []interface{}{map[string]interface{}{"host": []string{"http://127.0.0.1:8080"}, "url_pattern": "/events", "method": "POST"}},
			"extra_config": map[string]interface{}{asyncamqp.Namespace: map[string]interface{}{
				"host": host, "name": "q", "exchange": "x",
			}},
		}},
	}
}

func writeDoc(t *testing.T, dir, name string, doc map[string]interface{}) string {
	t.Helper()
	raw, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	writeFile(t, path, raw)
	return path
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// invalidFixtures lists the shared invalid fixtures, or this command's
// own when there are none.
func invalidFixtures(t *testing.T) []string {
	t.Helper()
	var files []string
	for _, pattern := range []string{"../../testdata/invalid/*.json", "testdata/invalid/*.json"} {
		found, _ := filepath.Glob(pattern)
		files = append(files, found...)
	}
	if len(files) == 0 {
		t.Fatal("no invalid fixtures in ../../testdata/invalid or testdata/invalid")
	}
	return files
}

func hasLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

// buildGateway builds the command into a temporary directory, with the
// race detector when the tests run with it.
func buildGateway(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "krakend-amqp")
	args := []string{"build", "-o", bin}
	if raceEnabled() {
		args = append(args, "-race")
	}
	out, err := exec.Command("go", append(args, ".")...).CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func raceEnabled() bool {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range info.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// result is a finished command.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) all() string { return r.stdout + r.stderr }

// runGateway runs the binary to completion.
func runGateway(t *testing.T, bin string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%s %v: %v", bin, args, err)
	}
	return result{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), stderr: stderr.String()}
}

// gateway is a running `krakend-amqp run` process.
type gateway struct {
	cmd  *exec.Cmd
	out  *brokertest.Buffer
	done chan struct{}
}

func startGateway(t *testing.T, bin string, args ...string) *gateway {
	t.Helper()
	return startGatewayWith(t, nil, bin, args...)
}

// startGatewayWith starts the gateway with variables added to the
// environment.
func startGatewayWith(t *testing.T, env []string, bin string, args ...string) *gateway {
	t.Helper()
	g := &gateway{cmd: exec.Command(bin, args...), out: &brokertest.Buffer{}, done: make(chan struct{})}
	g.cmd.Stdout, g.cmd.Stderr = g.out, g.out
	if env != nil {
		g.cmd.Env = append(os.Environ(), env...)
	}
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = g.cmd.Wait()
		close(g.done)
	}()
	t.Cleanup(func() {
		select {
		case <-g.done:
		default:
			_ = g.cmd.Process.Kill()
			<-g.done
		}
		if t.Failed() {
			t.Logf("gateway output:\n%s", g.out.String())
		}
	})
	return g
}

// waitHealth waits until /__health lists every agent.
func (g *gateway) waitHealth(t *testing.T, port int, agents ...string) {
	t.Helper()
	url := fmt.Sprintf("http://127.0.0.1:%d/__health", port)
	var last string
	brokertest.Eventually(t, 30*time.Second, "/__health to list "+strings.Join(agents, ", "), func() bool {
		select {
		case <-g.done:
			t.Fatalf("the gateway exited early; output:\n%s", g.out.String())
		default:
		}
		var health struct {
			Status string            `json:"status"`
			Agents map[string]string `json:"agents"`
		}
		resp, err := http.Get(url)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		last = string(body)
		if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &health) != nil || health.Status != "ok" {
			return false
		}
		for _, a := range agents {
			if health.Agents[a] == "" {
				return false
			}
		}
		return true
	})
	t.Logf("/__health: %s", last)
}

// terminate sends SIGTERM and returns the exit code.
func (g *gateway) terminate(t *testing.T) int {
	t.Helper()
	if err := g.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the gateway did not exit within 30s of SIGTERM; output:\n%s", g.out.String())
	}
	return g.cmd.ProcessState.ExitCode()
}

func (g *gateway) expectLogs(t *testing.T, wants ...string) {
	t.Helper()
	logs := g.out.String()
	for _, want := range wants {
		if !strings.Contains(logs, want) {
			t.Errorf("gateway log lacks %q:\n%s", want, logs)
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// request is one request as the recording backend saw it.
type request struct {
	Method, Path string
	Header       http.Header
	Body         []byte
}

// recorder is a backend that answers GET /status like the sample backend
// and records every other request.
type recorder struct {
	*httptest.Server
	mu  sync.Mutex
	got []request
}

func newRecorder(t *testing.T) *recorder {
	r := &recorder{}
	r.Server = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.Close)
	return r
}

func (r *recorder) serve(w http.ResponseWriter, req *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if req.Method == http.MethodGet && req.URL.Path == "/status" {
		_, _ = io.WriteString(w, `{"status":"ok"}`)
		return
	}
	body, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	r.got = append(r.got, request{Method: req.Method, Path: req.URL.EscapedPath(), Header: req.Header.Clone(), Body: body})
	r.mu.Unlock()
	_, _ = io.WriteString(w, `{"ok":true}`)
}

func (r *recorder) requests() []request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]request(nil), r.got...)
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.got)
}

// TestRPCExampleEndToEnd runs the gateway on a copy of
// examples/krakend.rpc.json and the example client against it, as its
// package comment says: every request gets its reply, and the replies
// are counted.
func TestRPCExampleEndToEnd(t *testing.T) {
	bin := buildGateway(t)
	conn := brokertest.Dial(t)
	backend := newRecorder(t)
	queue, dead, exchange := brokertest.Name(t, "quotes"), brokertest.Name(t, "quotes-dead"), brokertest.Name(t, "rpc")
	brokertest.Cleanup(t, conn, queue, exchange)
	brokertest.Cleanup(t, conn, dead, "")
	raw, err := os.ReadFile(rpcExampleJSON)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]interface{}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	doc["port"] = port
	agent := list(doc["async_agent"])[0]
	agent["backend"].([]interface{})[0].(map[string]interface{})["host"] = []string{backend.URL}
	extra := agent["extra_config"].(map[string]interface{})
	block := extra[asyncamqp.Namespace].(map[string]interface{})
	block["host"], block["name"], block["exchange"] = brokertest.URL(), queue, exchange
	extra[asyncamqp.ExtensionNamespace].(map[string]interface{})["dead_letter"] = map[string]interface{}{"queue": dead}
	file := writeDoc(t, t.TempDir(), "krakend.json", doc)

	metricsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	gw := startGateway(t, bin, "run", "-c", file, "-metrics", metricsAddr)
	gw.waitHealth(t, port, "quotes")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	client := exec.CommandContext(ctx, "go", "run", "../../examples/rpcclient",
		"-url", brokertest.URL(), "-exchange", exchange, "-key", "quotes.get", "-n", "200")
	out, err := client.CombinedOutput()
	if err != nil {
		t.Fatalf("the example client failed: %v\n%s\ngateway:\n%s", err, out, gw.out.String())
	}
	if !strings.Contains(string(out), "200 replies to 200 requests (status 200×200)") {
		t.Errorf("client output: %s", out)
	}
	if n := backend.count(); n != 200 {
		t.Errorf("the backend got %d requests for 200", n)
	}
	sent := scrapeMetrics(t, metricsAddr).sum("krakend_amqp_replies_total", map[string]string{"outcome": "sent"})
	if sent != 200 {
		t.Errorf("krakend_amqp_replies_total{outcome=\"sent\"} = %v, want 200", sent)
	}
	if code := gw.terminate(t); code != exitOK {
		t.Errorf("after SIGTERM the gateway exited %d", code)
	}
}
