// Command bench measures how fast async agents move a pre-loaded RabbitMQ
// queue to an HTTP backend, and what CPU they burn doing so, against the
// ceilings set by the broker, net/http and Lura's own pipeline.
//
// For each W/prefetch point (consumer workers / basic.qos count) and each
// scenario, a fresh durable queue is pre-loaded with -messages persistent
// JSON messages of -size bytes, then a consumer is started and timed until
// every message was acked (or, for the driver, until the backend saw them
// all and the queue is empty). The CPU time of this process (getrusage)
// over that phase is the CPU cost; the backend runs in a child process (this
// binary re-executed) and is not counted. Figures are medians of -runs.
//
//	(d) broker   amqp091 consumer, W goroutines, each acks at once
//	(c) http     same, each POSTs the body with net/http first
//	(b) floor    same, each calls a Lura proxy (default factory, no-op
//	             encoding; floor-json: Lura's default json encoding)
//	(a) ours     this driver, started as KrakenD starts agents
//	             (async.AgentStarter, Lura's default proxy factory, the
//	             gateway's HTTP transport), no tracer (OpenTelemetry's
//	             global no-op); on request ours-json, and ours-traced:
//	             given an SDK tracer provider that samples every message
//	             (batch processor, spans discarded) and the W3C propagator;
//	             -traceparent makes the messages carry a traceparent;
//	             ours-nobp: back_pressure off; ours-ordered: ordering_key
//	             on the messages' "order" header (50 keys, in turn)
//
// It also measures the end-to-end latency of (a) at a fixed publish rate,
// the round trip of a request to its reply (replies on, RabbitMQ's direct
// reply-to, 100 requests a second for -latency-seconds) against a plain
// amqp091 RPC server calling the same Lura proxy, and, with -rss, the resident memory of (a) after 10,000 and 100,000
// messages. RabbitMQ must answer at -amqp (AMQP_URL by default); the
// benchmark uses queues named bench-<random>-… and deletes them.
//
//	go run ./bench -out bench-results.txt
//	go run ./bench -points 16/100 -only ours -runs 1 -cpuprofile cpu.prof -memprofile mem.prof
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/luraproject/lura/v2/logging"
)

// options are the command-line flags.
type options struct {
	messages, runs, size   int
	points                 []point
	only                   map[string]bool // empty: every default scenario and the latency run
	cpuProfile, memProfile string
	latencyRate            int
	latencySeconds         float64
	rss                    bool
	traceparent            bool
	out, amqpURL           string
	logLevel               string
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == backendFlag {
		os.Exit(serveBackend(os.Args[2]))
	}
	opts, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if err := run(opts); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.IntVar(&o.messages, "messages", 20000, "messages pre-loaded per run")
	fs.IntVar(&o.runs, "runs", 3, "runs per scenario and point; the median is reported")
	fs.IntVar(&o.size, "size", 512, "message body size in bytes (JSON)")
	points := fs.String("points", "1/10,16/100,64/200", "W/prefetch points: consumer workers / prefetch_count")
	only := fs.String("only", "", "comma list of "+strings.Join(scenarioNames(), ", ")+", latency, reply (default: all but the optional ones)")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the first run of (a) at each point to `file`")
	fs.StringVar(&o.memProfile, "memprofile", "", "write allocation profiles `file`.base and file around the first run of (a) at each point;\n"+
		"read with go tool pprof -sample_index=alloc_space -base file.base file")
	fs.IntVar(&o.latencyRate, "latency-rate", 1000, "publish rate of the latency run, messages per second")
	fs.Float64Var(&o.latencySeconds, "latency-seconds", 10, "length of the latency run (0: skip it)")
	fs.BoolVar(&o.rss, "rss", false, "also measure resident memory of (a) after 10,000 and 100,000 messages")
	fs.BoolVar(&o.traceparent, "traceparent", false, "publish every message with a W3C traceparent header, as a traced publisher does")
	fs.StringVar(&o.out, "out", "", "append the results to `file` too")
	fs.StringVar(&o.amqpURL, "amqp", "", "RabbitMQ `URL` (default $AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/)")
	fs.StringVar(&o.logLevel, "log", "WARNING", "Lura log level of the agents and proxies (to stderr)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if o.amqpURL == "" {
		o.amqpURL = envOr("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
	}
	var err error
	if o.points, err = parsePoints(*points); err != nil {
		return o, err
	}
	if o.only, err = parseOnly(*only); err != nil {
		return o, err
	}
	if o.messages < 1 || o.runs < 1 || o.size < 1 || o.latencyRate < 1 {
		return o, errors.New("-messages, -runs, -size and -latency-rate must be positive")
	}
	return o, nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// parsePoints reads "1/10,16/100".
func parsePoints(s string) ([]point, error) {
	var ps []point
	for _, f := range strings.Split(s, ",") {
		w, p, ok := strings.Cut(strings.TrimSpace(f), "/")
		workers, err1 := strconv.Atoi(w)
		prefetch, err2 := strconv.Atoi(p)
		if !ok || err1 != nil || err2 != nil || workers < 1 || prefetch < 1 {
			return nil, fmt.Errorf("-points: %q is not W/prefetch, e.g. 16/100", f)
		}
		ps = append(ps, point{workers: workers, prefetch: prefetch})
	}
	return ps, nil
}

func scenarioNames() []string {
	var names []string
	for _, s := range scenarios {
		names = append(names, s.name)
	}
	return names
}

// parseOnly reads the -only list.
func parseOnly(s string) (map[string]bool, error) {
	only := map[string]bool{}
	if strings.TrimSpace(s) == "" {
		return only, nil
	}
	known := append(scenarioNames(), "latency", "reply")
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		if !slices.Contains(known, name) {
			return nil, fmt.Errorf("-only: unknown %q; known: %s", name, strings.Join(known, ", "))
		}
		only[name] = true
	}
	return only, nil
}

// selected tells whether -only selects a scenario (or "latency", "reply").
func (o options) selected(name string, optional bool) bool {
	if len(o.only) == 0 {
		return !optional
	}
	return o.only[name]
}

func run(o options) error {
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	w := io.Writer(os.Stdout)
	if o.out != "" {
		f, err := os.OpenFile(o.out, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		w = io.MultiWriter(os.Stdout, f)
	}
	b, err := dialBroker(o.amqpURL, o.size)
	if err != nil {
		return err
	}
	defer b.close()
	b.traceparent = o.traceparent
	be, err := startBackend()
	if err != nil {
		return err
	}
	defer be.stop()
	logger, err := logging.NewLogger(o.logLevel, os.Stderr, "")
	if err != nil {
		return err
	}
	maxW := 0
	for _, p := range o.points {
		maxW = max(maxW, p.workers)
	}
	e := &env{
		broker: b, backend: be, logger: logger,
		client:     &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: maxW, IdleConnTimeout: 90 * time.Second}},
		cpuProfile: o.cpuProfile, memProfile: o.memProfile, multiPoint: len(o.points) > 1, profiled: map[point]bool{},
	}
	writeHeader(w, o, b)

	for _, p := range o.points {
		rows, err := e.point(ctx, o, p)
		if err != nil {
			return err
		}
		if len(rows) == 0 {
			continue
		}
		fmt.Fprintln(w)
		formatTable(w, fmt.Sprintf("W=%d prefetch=%d: %d messages of %d B, median of %d runs (load average %s)",
			p.workers, p.prefetch, o.messages, o.size, o.runs, loadavg()), rows)
	}
	if o.latencySeconds > 0 && o.selected("latency", false) {
		d := time.Duration(o.latencySeconds * float64(time.Second))
		progress("latency: (a) at %s, %d msg/s for %s", latencyPoint, o.latencyRate, d)
		r, sent, err := e.latency(ctx, o.latencyRate, d)
		if err != nil {
			return fmt.Errorf("latency: %w", err)
		}
		fmt.Fprintf(w, "\nlatency of (a) at W/prefetch %s, %d msg/s for %s (%d published, %d received): "+
			"p50 %s  p90 %s  p99 %s  max %s\n", latencyPoint, o.latencyRate, d, sent, r.Count,
			ms(r.P50), ms(r.P90), ms(r.P99), ms(r.Max))
	}
	if o.latencySeconds > 0 && o.selected("reply", false) {
		if err := e.replyRun(ctx, w, time.Duration(o.latencySeconds*float64(time.Second))); err != nil {
			return fmt.Errorf("reply: %w", err)
		}
	}
	if o.rss {
		progress("rss: (a) at %s, 100000 messages", latencyPoint)
		m, err := e.memory(ctx)
		if err != nil {
			return fmt.Errorf("rss: %w", err)
		}
		fmt.Fprintf(w, "\nresident memory of this process with (a) at W/prefetch %s: before start %.1f MiB, "+
			"after 10,000 messages %.1f MiB, after 100,000 %.1f MiB (100k/10k = %.2f)\n",
			latencyPoint, mib(m.before), mib(m.at10k), mib(m.at100k), float64(m.at100k)/float64(m.at10k))
	}
	fmt.Fprintf(w, "\nload average at the end: %s\n", loadavg())
	return nil
}

// point runs every selected scenario -runs times at p, interleaved (run 1
// of each, then run 2...) so that a change of load on a shared machine
// spreads over all of them, and returns their medians.
func (e *env) point(ctx context.Context, o options, p point) ([]row, error) {
	var selected []scenario
	for _, s := range scenarios {
		if o.selected(s.name, s.optional) {
			selected = append(selected, s)
		}
	}
	outs := make([][]outcome, len(selected))
	for run := 1; run <= o.runs; run++ {
		for i, s := range selected {
			out, err := e.measure(ctx, s, p, run, o.messages)
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if err != nil {
				progress("%s %s run %d: FAILED: %v", p, s.label, run, err)
				continue
			}
			progress("%s %s run %d: %.0f msg/s, %.3f CPU-s/10k, started in %s, dups %d, left %d",
				p, s.label, run, out.rate(o.messages), out.cpuPer10k(o.messages), ms(out.startup), out.dups, out.left)
			outs[i] = append(outs[i], out)
		}
	}
	rows := make([]row, len(selected))
	for i, s := range selected {
		rows[i] = summarize(s, outs[i], o.messages)
	}
	return rows, nil
}

// row is one line of a point's table.
type row struct {
	name, label, floor string
	runs               int     // successful runs
	rate, cpu          float64 // medians: msgs/s, CPU-s per 10,000
	lo, hi             float64 // slowest and fastest run, msgs/s
	dups, left         int     // the largest over the runs
}

func summarize(s scenario, outs []outcome, n int) row {
	r := row{name: s.name, label: s.label, floor: s.floor, runs: len(outs)}
	var rates, cpus []float64
	for _, o := range outs {
		rates = append(rates, o.rate(n))
		cpus = append(cpus, o.cpuPer10k(n))
		r.dups = max(r.dups, o.dups)
		r.left = max(r.left, o.left)
	}
	if len(outs) > 0 {
		r.rate, r.cpu = median(rates), median(cpus)
		r.lo, r.hi = slices.Min(rates), slices.Max(rates)
	}
	return r
}

// formatTable prints a point's rows; a row of ours also gets its ratios
// to its floor (b) and to net/http (c).
func formatTable(w io.Writer, title string, rows []row) {
	find := func(name string) *row {
		for i := range rows {
			if rows[i].name == name && rows[i].runs > 0 {
				return &rows[i]
			}
		}
		return nil
	}
	ratio := func(a, b float64, ok bool) string {
		if !ok || b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2fx", a/b)
	}
	fmt.Fprintln(w, title)
	fmt.Fprintf(w, "%-26s %8s %15s %10s %5s %5s %8s %8s %8s\n",
		"scenario", "msgs/s", "(min-max)", "CPU-s/10k", "dups", "left", "a/b thr", "a/c thr", "a/b CPU")
	for _, r := range rows {
		if r.runs == 0 {
			fmt.Fprintf(w, "%-26s %8s\n", r.label, "FAILED")
			continue
		}
		ratios := ""
		if r.floor != "" {
			b, c := find(r.floor), find("http")
			ratios = fmt.Sprintf(" %8s %8s %8s",
				ratio(r.rate, rateOf(b), b != nil), ratio(r.rate, rateOf(c), c != nil), ratio(r.cpu, cpuOf(b), b != nil))
		}
		fmt.Fprintf(w, "%-26s %8.0f %15s %10.3f %5d %5d%s\n", r.label, r.rate,
			fmt.Sprintf("(%.0f-%.0f)", r.lo, r.hi), r.cpu, r.dups, r.left, ratios)
	}
}

func rateOf(r *row) float64 {
	if r == nil {
		return 0
	}
	return r.rate
}

func cpuOf(r *row) float64 {
	if r == nil {
		return 0
	}
	return r.cpu
}

func writeHeader(w io.Writer, o options, b *broker) {
	host, _ := os.Hostname()
	fmt.Fprintf(w, "\n==== async-amqp bench %s on %s\n", time.Now().UTC().Format(time.RFC3339), host)
	fmt.Fprintf(w, "%s %s/%s, nproc %d, GOMAXPROCS %d, %s at %s, load average %s\n",
		runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.GOMAXPROCS(0),
		b.version(), redact(o.amqpURL), loadavg())
	fmt.Fprintf(w, "flags: -messages %d -runs %d -size %d -points %s -only %q -latency-rate %d -latency-seconds %g -rss=%t -traceparent=%t",
		o.messages, o.runs, o.size, pointsString(o.points), onlyString(o.only), o.latencyRate, o.latencySeconds, o.rss, o.traceparent)
	if o.cpuProfile != "" || o.memProfile != "" {
		fmt.Fprintf(w, " -cpuprofile %q -memprofile %q (the first run of (a) is profiled)", o.cpuProfile, o.memProfile)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "msgs/s: messages acked per second from consumer start; CPU-s/10k: CPU seconds of the consuming process per 10,000 messages (backend in another process);")
	fmt.Fprintln(w, "dups: backend requests beyond the messages published; left: messages still queued after the consumer stopped (both must be 0)")
}

func pointsString(ps []point) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, ",")
}

func onlyString(only map[string]bool) string {
	var s []string
	for name := range only {
		s = append(s, name)
	}
	slices.Sort(s)
	return strings.Join(s, ",")
}

// progress reports on stderr, keeping stdout for the results.
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }

func mib(b int64) float64 { return float64(b) / (1 << 20) }
