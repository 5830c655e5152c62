package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// backendFlag re-executes this binary as the backend. The backend runs in
// its own process so that its CPU is not counted as the consumer's.
const backendFlag = "-backend-addr"

// backendServer answers 200 {"ok":true} to every request at once and
// counts them. Control paths:
//
//	GET  /__count             the count
//	GET  /__wait?n=N&ms=T     waits until the count reaches N (or T ms pass), then the count
//	GET  /__latency           percentiles of receive time minus the body's "ts" stamp
//	POST /__reset             count and latencies back to zero
type backendServer struct {
	count     atomic.Int64
	mu        sync.Mutex
	latencies []time.Duration
}

// serveBackend runs the backend on addr, prints its address on stdout and
// serves until its stdin closes (the parent exited or is done with it).
func serveBackend(addr string) int {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	fmt.Println(ln.Addr().String())
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	b := &backendServer{}
	if err := http.Serve(ln, b); err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	return 0
}

func (b *backendServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.URL.Path, "/__") {
		body, _ := io.ReadAll(r.Body)
		if ts := stamp(body); ts > 0 {
			lat := time.Duration(time.Now().UnixNano() - ts)
			b.mu.Lock()
			b.latencies = append(b.latencies, lat)
			b.mu.Unlock()
		}
		b.count.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"ok":true}`))
		return
	}
	switch r.URL.Path {
	case "/__count":
		fmt.Fprint(w, b.count.Load())
	case "/__wait":
		n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		deadline := time.Now().Add(time.Duration(ms) * time.Millisecond)
		// Polling here costs the backend's CPU, not the consumer's.
		for b.count.Load() < n && time.Now().Before(deadline) && r.Context().Err() == nil {
			time.Sleep(200 * time.Microsecond)
		}
		fmt.Fprint(w, b.count.Load())
	case "/__latency":
		b.mu.Lock()
		s := slices.Clone(b.latencies)
		b.mu.Unlock()
		slices.Sort(s)
		_ = json.NewEncoder(w).Encode(latencyReport{
			Count: len(s), P50: percentile(s, 50), P90: percentile(s, 90), P99: percentile(s, 99), Max: percentile(s, 100),
		})
	case "/__reset":
		b.count.Store(0)
		b.mu.Lock()
		b.latencies = nil
		b.mu.Unlock()
	default:
		http.NotFound(w, r)
	}
}

// latencyReport is the answer of GET /__latency.
type latencyReport struct {
	Count              int
	P50, P90, P99, Max time.Duration
}

// stamp reads the "ts" field (Unix nanoseconds) of a message body made by
// messageBody, or returns 0.
func stamp(body []byte) int64 {
	i := bytes.Index(body, []byte(`"ts":`))
	if i < 0 {
		return 0
	}
	var ts int64
	for _, c := range body[i+5:] {
		if c < '0' || c > '9' {
			break
		}
		ts = ts*10 + int64(c-'0')
	}
	return ts
}

// backend is the parent's handle on the backend process.
type backend struct {
	url    string // http://127.0.0.1:port
	cmd    *exec.Cmd
	stdin  io.Closer
	client *http.Client
}

// startBackend re-executes this binary as the backend and reads its
// address.
func startBackend() (*backend, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, backendFlag, "127.0.0.1:0")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the backend: %w", err)
	}
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("read the backend's address: %w", err)
	}
	return &backend{
		url: "http://" + strings.TrimSpace(addr), cmd: cmd, stdin: stdin,
		// Its own transport: http.DefaultTransport is Lura's once the
		// gateway transport is initialised.
		client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2}},
	}, nil
}

// stop ends the backend process.
func (b *backend) stop() {
	_ = b.stdin.Close()
	done := make(chan struct{})
	go func() { _ = b.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = b.cmd.Process.Kill()
		<-done
	}
}

func (b *backend) call(ctx context.Context, method, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, b.url+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := b.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("backend %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("backend %s: status %d", path, resp.StatusCode)
	}
	return body, err
}

func (b *backend) reset(ctx context.Context) error {
	_, err := b.call(ctx, http.MethodPost, "/__reset")
	return err
}

func (b *backend) count(ctx context.Context) (int, error) {
	body, err := b.call(ctx, http.MethodGet, "/__count")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(string(body))
}

// wait blocks until the backend has seen n requests, or ctx ends, and
// returns the count. One long-polling request: no polling in this
// process.
func (b *backend) wait(ctx context.Context, n int) (int, error) {
	for {
		body, err := b.call(ctx, http.MethodGet, fmt.Sprintf("/__wait?n=%d&ms=30000", n))
		if err != nil {
			return 0, err
		}
		got, err := strconv.Atoi(string(body))
		if err != nil || got >= n {
			return got, err
		}
	}
}

func (b *backend) latency(ctx context.Context) (latencyReport, error) {
	var r latencyReport
	body, err := b.call(ctx, http.MethodGet, "/__latency")
	if err == nil {
		err = json.Unmarshal(body, &r)
	}
	return r, err
}
