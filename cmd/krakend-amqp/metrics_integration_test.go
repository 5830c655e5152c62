//go:build integration

package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// The Prometheus names the exporter gives the driver's OpenTelemetry
// instruments (dots become underscores, counters get _total, the unit
// "s" becomes _seconds, {annotation} units are dropped).
const (
	promConsumed   = "messaging_client_consumed_messages_total"
	promSettled    = "krakend_amqp_messages_settled_total"
	promDuration   = "messaging_process_duration_seconds"
	promInFlight   = "krakend_amqp_dispatches_in_flight"
	promReconnects = "krakend_amqp_reconnects_total"
	promState      = "krakend_amqp_connection_state"
)

// TestMetricsEndpointCountsARun runs the gateway with -metrics, sends a
// known load whose backend fails some messages once, and checks the
// scraped counters against what happened: every consumed message has
// exactly one settled outcome, acked = messages, retried = first-time
// failures, one dispatch per consumed message, nothing in flight, the
// connection up; then a reconnect is counted. Labels name the agent and
// the queue, never the broker's credentials.
func TestMetricsEndpointCountsARun(t *testing.T) {
	bin := buildGateway(t)
	conn := brokertest.Dial(t)
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	brokertest.Cleanup(t, conn, queue, exchange)
	agent := brokertest.Name(t, "agent")
	be := newFailOnce(t, func(id string) bool { return strings.HasSuffix(id, "7") })

	port, metricsAddr := freePort(t), fmt.Sprintf("127.0.0.1:%d", freePort(t))
	file := writeDoc(t, t.TempDir(), "krakend.json", map[string]interface{}{
		"version": 3,
		"port":    port,
		"async_agent": []interface{}{map[string]interface{}{
			"name":       agent,
			"connection": map[string]interface{}{"max_retries": 10, "backoff_strategy": "linear", "health_interval": "1s"},
			"consumer":   map[string]interface{}{"topic": "k", "workers": 4, "timeout": "2s"},
			"backend":    []interface{}{map[string]interface{}{"host": []string{be.URL}, "url_pattern": "/events", "method": "POST"}},
			"extra_config": map[string]interface{}{
				asyncamqp.Namespace: map[string]interface{}{
					"host": brokertest.URL(), "name": queue, "exchange": exchange, "durable": true,
				},
				asyncamqp.ExtensionNamespace: map[string]interface{}{
					"retry": map[string]interface{}{"max_attempts": 5, "delay": "50ms", "max_delay": "200ms", "multiplier": 2},
				},
			},
		}},
	})
	gw := startGateway(t, bin, "run", "-c", file, "-metrics", metricsAddr)
	gw.waitHealth(t, port, agent)
	gw.expectLogs(t, "metrics for Prometheus on http://"+metricsAddr+"/metrics")
	labels := map[string]string{"krakend_async_agent": agent}

	const n = 100
	failures := n / 10 // ids 7, 17, ..., 97
	pub := brokertest.NewPublisher(t, conn)
	pub.PublishN(exchange, "k", n, func(i int) []byte { return []byte(fmt.Sprintf(`{"n":%d}`, i)) })
	var m scrape
	brokertest.Eventually(t, 60*time.Second, "every message settled in the metrics", func() bool {
		m = scrapeMetrics(t, metricsAddr)
		return m.sum(promSettled, labels) >= float64(n+failures) && brokertest.Pending(t, queue) == 0
	})
	t.Logf("scraped:\n%s", m.ours(agent))

	consumed := m.sum(promConsumed, labels)
	if settled := m.sum(promSettled, labels); consumed != settled || consumed != float64(n+failures) {
		t.Errorf("consumed %v, settled %v over all outcomes; want both %d", consumed, settled, n+failures)
	}
	outcome := func(o string) float64 { return m.sum(promSettled, with(labels, "outcome", o)) }
	if got := outcome("acked"); got != n {
		t.Errorf("acked %v, want %d", got, n)
	}
	if got := outcome("retried"); got != float64(failures) {
		t.Errorf("retried %v, want %d", got, failures)
	}
	for _, o := range []string{"requeued", "dead_lettered", "discarded", "auto_acked", "unsettled"} {
		if got := outcome(o); got != 0 {
			t.Errorf("%s %v, want 0", o, got)
		}
	}
	if got := m.histogramCount(promDuration, labels); got != uint64(consumed) {
		t.Errorf("%s count %d, want one dispatch per consumed message (%v)", promDuration, got, consumed)
	}
	if got := m.histogramCount(promDuration, with(labels, "error_type", "http_status")); got != uint64(failures) {
		t.Errorf("%s{error_type=http_status} count %d, want %d", promDuration, got, failures)
	}
	if got, ok := m.value(promInFlight, labels); !ok || got != 0 {
		t.Errorf("%s = %v (present %t), want 0", promInFlight, got, ok)
	}
	if got, ok := m.value(promState, labels); !ok || got != 1 {
		t.Errorf("%s = %v (present %t), want 1 while consuming", promState, got, ok)
	}
	if got := m.sum(promReconnects, labels); got != 0 {
		t.Errorf("%s = %v before any reconnect", promReconnects, got)
	}
	m.checkLabels(t, agent, queue)

	// A reconnect is counted, and the state is back to 1 once consuming.
	if closed := brokertest.CloseConnections(t, "krakend-amqp "+agent+"@"); closed != 2 {
		t.Fatalf("closed %d connections of the agent, want 2 (consuming, copies)", closed)
	}
	brokertest.Eventually(t, 30*time.Second, "the reconnect in the metrics", func() bool {
		m = scrapeMetrics(t, metricsAddr)
		state, _ := m.value(promState, labels)
		return m.sum(promReconnects, labels) == 1 && state == 1
	})
	body := m.raw
	for _, secret := range []string{"guest", "amqp://", "xxxxx"} {
		if strings.Contains(body, secret) {
			t.Errorf("/metrics holds %q", secret)
		}
	}

	if code := gw.terminate(t); code != exitOK {
		t.Fatalf("exit %d after SIGTERM; output:\n%s", code, gw.out.String())
	}
	if c, err := net.DialTimeout("tcp", metricsAddr, time.Second); err == nil {
		c.Close()
		t.Error("the metrics endpoint still answers after the gateway exited")
	}
}

func with(labels map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for lk, lv := range labels {
		out[lk] = lv
	}
	return out
}

// scrape is one parsed GET /metrics.
type scrape struct {
	families map[string]*dto.MetricFamily
	raw      string
}

func scrapeMetrics(t *testing.T, addr string) scrape {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", resp.StatusCode, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("/metrics is not Prometheus text: %v\n%s", err, body)
	}
	return scrape{families: families, raw: string(body)}
}

// matching lists the series of a family whose labels include want.
func (s scrape) matching(name string, want map[string]string) []*dto.Metric {
	f := s.families[name]
	if f == nil {
		return nil
	}
	var out []*dto.Metric
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		ok := true
		for k, v := range want {
			if have[k] != v {
				ok = false
			}
		}
		if ok {
			out = append(out, m)
		}
	}
	return out
}

// sum adds the counter or gauge values of the matching series.
func (s scrape) sum(name string, labels map[string]string) float64 {
	var total float64
	for _, m := range s.matching(name, labels) {
		v, _ := value(m)
		total += v
	}
	return total
}

// value is the one matching series' value.
func (s scrape) value(name string, labels map[string]string) (float64, bool) {
	ms := s.matching(name, labels)
	if len(ms) != 1 {
		return 0, false
	}
	return value(ms[0])
}

func value(m *dto.Metric) (float64, bool) {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue(), true
	case m.Gauge != nil:
		return m.Gauge.GetValue(), true
	case m.Untyped != nil:
		return m.Untyped.GetValue(), true
	}
	return 0, false
}

func (s scrape) histogramCount(name string, labels map[string]string) uint64 {
	var n uint64
	for _, m := range s.matching(name, labels) {
		n += m.GetHistogram().GetSampleCount()
	}
	return n
}

// checkLabels: every series of the driver's metrics carries the agent,
// the queue and the messaging system.
func (s scrape) checkLabels(t *testing.T, agent, queue string) {
	t.Helper()
	for _, name := range []string{promConsumed, promSettled, promDuration, promInFlight, promState} {
		f := s.families[name]
		if f == nil {
			t.Errorf("/metrics has no %s", name)
			continue
		}
		for _, m := range s.matching(name, map[string]string{"krakend_async_agent": agent}) {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			if got["messaging_destination_name"] != queue || got["messaging_system"] != "rabbitmq" {
				t.Errorf("%s: labels %v, want messaging_destination_name=%q and messaging_system=rabbitmq", name, got, queue)
			}
		}
	}
}

// ours renders the lines of the driver's metrics for the agent, for the
// test log.
func (s scrape) ours(agent string) string {
	var lines []string
	for _, l := range strings.Split(s.raw, "\n") {
		if strings.Contains(l, agent) || strings.HasPrefix(l, "# TYPE messaging") || strings.HasPrefix(l, "# TYPE krakend") {
			lines = append(lines, l)
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// failOnce is a backend that answers 500 the first time it sees a
// message id for which fail is true, and 200 otherwise.
type failOnce struct {
	*httptest.Server
	mu   sync.Mutex
	seen map[string]int
}

func newFailOnce(t *testing.T, fail func(id string) bool) *failOnce {
	b := &failOnce{seen: map[string]int{}}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		id := r.Header.Get("X-Amqp-Message-Id")
		b.mu.Lock()
		b.seen[id]++
		first := b.seen[id] == 1
		b.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if first && fail(id) {
			w.WriteHeader(http.StatusInternalServerError)
		}
		_, _ = io.WriteString(w, `{}`)
	}))
	t.Cleanup(b.Close)
	return b
}
