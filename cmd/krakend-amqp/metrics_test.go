package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	luraconfig "github.com/luraproject/lura/v2/config"
	"go.opentelemetry.io/otel"
)

// listenFree holds a listener on a free 127.0.0.1 port until the test
// ends.
func listenFree(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l := listenFree(t)
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// httpPort is a free port for the gateway's router.
func httpPort(t *testing.T) int {
	t.Helper()
	_, port, _ := net.SplitHostPort(freeAddr(t))
	n, _ := strconv.Atoi(port)
	return n
}

// noAgents is a krakend.json with neither agents nor endpoints on a free
// port, plus the given service extra_config.
func noAgents(t *testing.T, extra map[string]interface{}) string {
	t.Helper()
	doc := map[string]interface{}{"version": 3, "port": httpPort(t)}
	if extra != nil {
		doc["extra_config"] = extra
	}
	return writeConfig(t, doc)
}

func TestMetricsFlagErrors(t *testing.T) {
	inUse := listenFree(t).Addr().String()
	file := noAgents(t, nil)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"usage names the flag", []string{"run", "-h"}, exitOK, "-metrics address"},
		{"not host:port", []string{"run", "-c", file, "-metrics", "9091"}, exitUsage, `-metrics "9091": not host:port`},
		{"address in use", []string{"run", "-c", file, "-metrics", inUse}, exitFailure, "metrics: cannot listen on " + inUse},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, tc.args...)
			if code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Errorf("exit %d (want %d); stderr %q lacks %q", code, tc.code, stderr, tc.want)
			}
		})
	}
	if !strings.Contains(usageText, "-metrics") {
		t.Errorf("the usage text does not mention -metrics:\n%s", usageText)
	}
}

func TestMetricsAddressBlock(t *testing.T) {
	block := func(v interface{}) luraconfig.ExtraConfig { return luraconfig.ExtraConfig{metricsNamespace: v} }
	for _, tc := range []struct {
		name  string
		extra luraconfig.ExtraConfig
		want  string
		err   string
	}{
		{"absent", nil, "", ""},
		{"all interfaces", block(map[string]interface{}{"listen_address": ":9091"}), ":9091", ""},
		{"loopback", block(map[string]interface{}{"listen_address": "127.0.0.1:9091"}), "127.0.0.1:9091", ""},
		{"not an object", block(":9091"), "", "extra_config.async/amqp/metrics: must be an object"},
		{"not an address", block(map[string]interface{}{"listen_address": "9091"}), "", "extra_config.async/amqp/metrics.listen_address: \"9091\" is not host:port"},
		{"a number", block(map[string]interface{}{"listen_address": 9091}), "", "extra_config.async/amqp/metrics.listen_address: must be an address"},
		{"unknown field", block(map[string]interface{}{"listen_address": ":9091", "path": "/m"}), "", "extra_config.async/amqp/metrics.path: unknown field"},
	} {
		got, err := metricsAddress(tc.extra)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.err)
		case got != tc.want:
			t.Errorf("%s: address %q, want %q", tc.name, got, tc.want)
		}
	}
	file := noAgents(t, map[string]interface{}{metricsNamespace: map[string]interface{}{"listen_address": "nowhere"}})
	code, _, stderr := runCLI(t, "check", "-c", file)
	if code != exitFailure || !strings.Contains(stderr, file+": extra_config.async/amqp/metrics.listen_address:") {
		t.Errorf("check of a bad metrics block: exit %d; stderr %q", code, stderr)
	}
}

// TestMetricsEndpoint runs the gateway in-process with the endpoint on,
// from the flag and from the file: GET /metrics answers in Prometheus's
// text format with what the global MeterProvider records, and the
// endpoint is gone once the gateway has stopped.
func TestMetricsEndpoint(t *testing.T) {
	for _, from := range []string{"flag", "file"} {
		t.Run(from, func(t *testing.T) {
			addr := freeAddr(t)
			args := []string{"run", "-metrics", addr, "-c", noAgents(t, nil)}
			if from == "file" {
				args = []string{"run", "-c", noAgents(t, map[string]interface{}{metricsNamespace: map[string]interface{}{"listen_address": addr}})}
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			exit := make(chan int, 1)
			go func() { exit <- cli(ctx, args, io.Discard, io.Discard) }()

			// Lura replaces http.DefaultTransport when the gateway starts:
			// the test has a client of its own.
			client := &http.Client{Transport: &http.Transport{}, Timeout: 5 * time.Second}
			url := "http://" + addr + metricsPath
			var resp *http.Response
			deadline := time.Now().Add(10 * time.Second)
			for {
				var err error
				if resp, err = client.Get(url); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("GET %s: %v", url, err)
				}
				time.Sleep(20 * time.Millisecond)
			}
			resp.Body.Close()
			// The driver records through the global provider: so does this.
			counter, err := otel.GetMeterProvider().Meter("flag-test").Int64Counter("krakend.test." + from)
			if err != nil {
				t.Fatal(err)
			}
			counter.Add(context.Background(), 3)
			resp, err = client.Get(url)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
				t.Errorf("GET %s: %d %s", url, resp.StatusCode, resp.Header.Get("Content-Type"))
			}
			for _, want := range []string{fmt.Sprintf("krakend_test_%s_total{", from), "go_goroutines ", `service_name="krakend-amqp"`} {
				if !strings.Contains(string(body), want) {
					t.Errorf("/metrics lacks %q:\n%s", want, body)
				}
			}
			if resp, err := client.Post(url, "text/plain", nil); err == nil {
				if resp.StatusCode != http.StatusMethodNotAllowed {
					t.Errorf("POST %s: %d, want 405", url, resp.StatusCode)
				}
				resp.Body.Close()
			}

			cancel()
			select {
			case code := <-exit:
				if code != exitOK {
					t.Fatalf("exit %d after the context ended", code)
				}
			case <-time.After(15 * time.Second):
				t.Fatal("the gateway did not stop")
			}
			l, err := net.Listen("tcp", addr)
			if err != nil {
				t.Fatalf("the metrics address is still taken after the stop: %v", err)
			}
			l.Close()
		})
	}
}
