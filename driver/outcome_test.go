package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	"github.com/luraproject/lura/v2/transport/http/client"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/consumer"
)

func TestJudge(t *testing.T) {
	boom := errors.New("dial tcp 127.0.0.1:1: connection refused")
	for _, tc := range []struct {
		name       string
		resp       *proxy.Response
		err        error
		wantOK     bool
		wantReason []string
	}{
		{name: "error", err: boom, wantReason: []string{boom.Error()}},
		{name: "error with a complete response", resp: &proxy.Response{IsComplete: true}, err: boom, wantReason: []string{boom.Error()}},
		{name: "context deadline", err: context.DeadlineExceeded, wantReason: []string{"deadline"}},
		{name: "nil response", wantReason: []string{"no response"}},
		{name: "incomplete", resp: &proxy.Response{}, wantReason: []string{"incomplete"}},
		{name: "incomplete with status 200", resp: &proxy.Response{Metadata: proxy.Metadata{StatusCode: 200}}, wantReason: []string{"incomplete"}},
		{name: "complete, status unknown (0)", resp: &proxy.Response{IsComplete: true}, wantOK: true},
		{name: "200", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, wantOK: true},
		{name: "201", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 201}}, wantOK: true},
		{name: "204", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 204}}, wantOK: true},
		{name: "299", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 299}}, wantOK: true},
		{name: "500", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 500}}, wantReason: []string{"500"}},
		{name: "503", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 503}}, wantReason: []string{"503"}},
		{name: "404", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 404}}, wantReason: []string{"404"}},
		{name: "400", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 400}}, wantReason: []string{"400"}},
		{name: "302", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 302}}, wantReason: []string{"302"}},
		{name: "300", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 300}}, wantReason: []string{"300"}},
		{name: "199", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 199}}, wantReason: []string{"199"}},
		{name: "negative", resp: &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: -1}}, wantReason: []string{"-1"}},
		// Lura's default status handler refuses 2xx statuses other than
		// 200 and 201: the backend took the message all the same.
		{name: "204 as a pipeline error", err: client.NewErrInvalidStatusCode(&http.Response{StatusCode: 204}, "x"), wantOK: true},
		{name: "202 as a wrapped pipeline error", err: fmt.Errorf("b: %w", client.NewErrInvalidStatusCode(&http.Response{StatusCode: 202}, "x")), wantOK: true},
		{name: "500 as a pipeline error", err: client.NewErrInvalidStatusCode(&http.Response{StatusCode: 500}, "x"), wantReason: []string{"500"}},
		{name: "300 as a pipeline error", err: client.HTTPResponseError{Code: 300}, wantReason: []string{"300"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := judge(tc.resp, tc.err)
			if r.ok != tc.wantOK {
				t.Fatalf("judge ok = %t (%q), want %t", r.ok, r.reason, tc.wantOK)
			}
			if tc.wantOK && r.reason != "" {
				t.Errorf("an ok result has a reason: %q", r.reason)
			}
			if !tc.wantOK && r.reason == "" {
				t.Error("a failure has no reason")
			}
			for _, s := range tc.wantReason {
				if !strings.Contains(r.reason, s) {
					t.Errorf("reason %q does not contain %q", r.reason, s)
				}
			}
		})
	}
}

// settleCall is one call on a fake acknowledger.
type settleCall struct {
	op       string // "ack", "nack" or "reject"
	tag      uint64
	multiple bool
	requeue  bool
}

func (c settleCall) String() string {
	return fmt.Sprintf("%s(tag %d, multiple %t, requeue %t)", c.op, c.tag, c.multiple, c.requeue)
}

// recorder fakes the driver's Acknowledger.
type recorder struct {
	calls []settleCall
	err   error
}

func (r *recorder) Ack(multiple bool) error {
	r.calls = append(r.calls, settleCall{op: "ack", multiple: multiple})
	return r.err
}

func (r *recorder) Nack(multiple, requeue bool) error {
	r.calls = append(r.calls, settleCall{op: "nack", multiple: multiple, requeue: requeue})
	return r.err
}

// fakeAcker fakes amqp091's Acknowledger, the one an amqp.Delivery holds;
// it is safe for concurrent use.
type fakeAcker struct {
	mu    sync.Mutex
	calls []settleCall
	err   error
}

func (f *fakeAcker) record(c settleCall) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, c)
	return f.err
}

func (f *fakeAcker) Ack(tag uint64, multiple bool) error {
	return f.record(settleCall{op: "ack", tag: tag, multiple: multiple})
}

func (f *fakeAcker) Nack(tag uint64, multiple, requeue bool) error {
	return f.record(settleCall{op: "nack", tag: tag, multiple: multiple, requeue: requeue})
}

func (f *fakeAcker) Reject(tag uint64, requeue bool) error {
	return f.record(settleCall{op: "reject", tag: tag, requeue: requeue})
}

// byTag returns the calls per delivery tag.
func (f *fakeAcker) byTag() map[uint64][]settleCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := map[uint64][]settleCall{}
	for _, c := range f.calls {
		m[c.tag] = append(m[c.tag], c)
	}
	return m
}

func (f *fakeAcker) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

var (
	ack          = settleCall{op: "ack"}
	nackRequeue  = settleCall{op: "nack", requeue: true}
	nackDiscard  = settleCall{op: "nack", requeue: false}
	errChanClose = amqp.ErrClosed
)

// Retry-After is read in seconds or as an HTTP date, bounded; anything
// else reads as no wait.
func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 1, 20, 0, 0, 0, time.UTC)
	for value, want := range map[string]time.Duration{
		"3":                             3 * time.Second,
		" 120 ":                         2 * time.Minute,
		"0":                             0,
		"-5":                            0,
		"1.5":                           0,
		"soon":                          0,
		"":                              0,
		"99999999999999999999":          0, // past uint64: not a number
		"9999999999":                    maxRetryAfter,
		"Tue, 01 Dec 2026 20:00:10 GMT": 10 * time.Second,
		"Tue, 01 Dec 2026 19:59:00 GMT": 0, // in the past
		"Wed, 01 Dec 2027 20:00:00 GMT": maxRetryAfter,
	} {
		if got := retryAfter(map[string][]string{"Retry-After": {value}}, now); got != want {
			t.Errorf("Retry-After %q = %s, want %s", value, got, want)
		}
	}
	if got := retryAfter(nil, now); got != 0 {
		t.Errorf("no header: %s", got)
	}
	// judge reads it from a failed no-op answer only.
	resp := &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 429, Headers: map[string][]string{"Retry-After": {"3"}}}}
	if r := judge(resp, nil); r.retryAfter != 3*time.Second || !r.throttled() || !r.pushedBack() {
		t.Errorf("429 with Retry-After 3: %+v", r)
	}
	resp.Metadata.StatusCode = 200
	if r := judge(resp, nil); r.retryAfter != 0 || !r.ok || r.pushedBack() {
		t.Errorf("200 with Retry-After: %+v", r)
	}
	if r := judge(nil, context.DeadlineExceeded); !r.pushedBack() || r.throttled() {
		t.Errorf("a timeout: %+v, want pushed back, not throttled", r)
	}
	if r := judge(nil, client.NewErrInvalidStatusCode(&http.Response{StatusCode: 500}, "")); r.pushedBack() {
		t.Errorf("a 500: %+v, want not pushed back", r)
	}
}

func TestSettle(t *testing.T) {
	for _, tc := range []struct {
		name    string
		r       result
		discard bool
		ackErr  error
		want    settleCall
	}{
		{name: "ok acks", r: result{ok: true}, want: ack},
		{name: "ok acks even with discard", r: result{ok: true}, discard: true, want: ack},
		{name: "failure nacks with requeue", r: result{reason: "500"}, want: nackRequeue},
		{name: "failure with discard nacks without requeue", r: result{reason: "500"}, discard: true, want: nackDiscard},
		{name: "ack error is returned", r: result{ok: true}, ackErr: errChanClose, want: ack},
		{name: "nack error is returned", r: result{reason: "x"}, ackErr: errChanClose, want: nackRequeue},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Run("driver Acknowledger", func(t *testing.T) {
				rec := &recorder{err: tc.ackErr}
				err := settle(rec, tc.r, tc.discard)
				if !errors.Is(err, tc.ackErr) || (tc.ackErr == nil && err != nil) {
					t.Errorf("settle error = %v, want %v", err, tc.ackErr)
				}
				if len(rec.calls) != 1 || rec.calls[0] != tc.want {
					t.Errorf("calls = %v, want exactly [%v]", rec.calls, tc.want)
				}
			})
			t.Run("amqp.Delivery", func(t *testing.T) {
				f := &fakeAcker{err: tc.ackErr}
				d := &amqp.Delivery{Acknowledger: f, DeliveryTag: 42}
				err := settle(d, tc.r, tc.discard)
				if !errors.Is(err, tc.ackErr) || (tc.ackErr == nil && err != nil) {
					t.Errorf("settle error = %v, want %v", err, tc.ackErr)
				}
				want := tc.want
				want.tag = 42
				if len(f.calls) != 1 || f.calls[0] != want {
					t.Errorf("calls = %v, want exactly [%v]", f.calls, want)
				}
			})
		})
	}

	t.Run("a delivery with no acknowledger gives an error, not a panic", func(t *testing.T) {
		if err := settle(&amqp.Delivery{}, result{ok: true}, false); err == nil {
			t.Error("settle on an uninitialised delivery: no error")
		}
	})
}

// body is a response body that records how it was used.
type body struct {
	r      io.Reader
	read   int
	closed int
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.read += n
	return n, err
}

func (b *body) Close() error {
	b.closed++
	return nil
}

func TestDiscardBody(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     int
		wantRead int
	}{
		{"empty", 0, 0},
		{"small", 100, 100},
		{"1 MiB", 1 << 20, 1 << 20},
		{"larger than the drain bound", 3 << 20, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &body{r: bytes.NewReader(make([]byte, tc.size))}
			discardBody(&proxy.Response{Io: b})
			if b.read != tc.wantRead {
				t.Errorf("read %d bytes, want %d", b.read, tc.wantRead)
			}
			if b.closed != 1 {
				t.Errorf("closed %d times, want 1", b.closed)
			}
		})
	}
	t.Run("nil response", func(t *testing.T) { discardBody(nil) })
	t.Run("no body", func(t *testing.T) { discardBody(&proxy.Response{}) })
	t.Run("a body that is not a Closer is drained", func(t *testing.T) {
		r := strings.NewReader("abc")
		discardBody(&proxy.Response{Io: r})
		if r.Len() != 0 {
			t.Errorf("%d bytes left unread", r.Len())
		}
	})
}

// outcomeProxy answers by the message body: "ok", "500", "404", "err",
// "incomplete", "panic", "body" (a complete answer with a body to drain).
type outcomeProxy struct {
	mu     sync.Mutex
	calls  int
	bodies []*body
	// ctxErrs holds, per call, the dispatch context's error and whether
	// it had a deadline.
	ctxErrs   []error
	deadlines []bool
}

func (p *outcomeProxy) proxy(ctx context.Context, r *proxy.Request) (*proxy.Response, error) {
	b, _ := io.ReadAll(r.Body)
	_, hasDeadline := ctx.Deadline()
	p.mu.Lock()
	p.calls++
	p.ctxErrs = append(p.ctxErrs, ctx.Err())
	p.deadlines = append(p.deadlines, hasDeadline)
	p.mu.Unlock()
	switch string(b) {
	case "ok":
		return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 200}}, nil
	case "body":
		rb := &body{r: strings.NewReader("response")}
		p.mu.Lock()
		p.bodies = append(p.bodies, rb)
		p.mu.Unlock()
		return &proxy.Response{IsComplete: true, Io: rb, Metadata: proxy.Metadata{StatusCode: 204}}, nil
	case "500":
		return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 500}}, nil
	case "404":
		return &proxy.Response{IsComplete: true, Metadata: proxy.Metadata{StatusCode: 404}}, nil
	case "incomplete":
		return &proxy.Response{IsComplete: false}, nil
	case "panic":
		panic("backend exploded")
	default:
		return nil, errors.New("connection refused")
	}
}

func (p *outcomeProxy) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls
}

// fakeSession hands out deliveries and records the copies published.
type fakeSession struct {
	ch        <-chan amqp.Delivery
	mu        sync.Mutex
	published []string // "exchange/key"
	err       error
}

func (f *fakeSession) Deliveries() <-chan amqp.Delivery { return f.ch }

func (*fakeSession) Done() <-chan struct{} { return nil }

func (f *fakeSession) Publish(_ context.Context, exchange, key string, _ amqp.Publishing) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.published = append(f.published, exchange+"/"+key)
	return f.err
}

func (f *fakeSession) publishes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.published)
}

// deliveries returns a session whose closed channel holds one delivery
// per body, with tags 1..n.
func deliveries(acker amqp.Acknowledger, bodies ...string) *fakeSession {
	ch := make(chan amqp.Delivery, len(bodies))
	for i, b := range bodies {
		ch <- amqp.Delivery{Acknowledger: acker, DeliveryTag: uint64(i + 1), Body: []byte(b), RoutingKey: "k"}
	}
	close(ch)
	return &fakeSession{ch: ch}
}

func TestAgentWork(t *testing.T) {
	mixed := []string{"ok", "500", "err", "body", "incomplete", "404", "panic", "ok"}
	settled := func(discard bool) []settleCall {
		fail := ack // copied to a retry queue, then acked
		if discard {
			fail = nackDiscard
		}
		return []settleCall{ack, fail, fail, ack, fail, fail, fail, ack}
	}
	allNackRequeue := func(n int) []settleCall {
		out := make([]settleCall, n)
		for i := range out {
			out[i] = nackRequeue
		}
		return out
	}
	for _, tc := range []struct {
		name      string
		bodies    []string
		autoAck   bool
		discard   bool
		maxRate   float64
		cancelled bool
		workers   int
		// want is the single settle call expected per delivery, in tag
		// order; nil means no call at all.
		want       []settleCall
		wantCalls  int
		wantCopies int
	}{
		{name: "failures are copied to a retry queue, then acked", bodies: mixed, want: settled(false), wantCalls: len(mixed), wantCopies: 5},
		{name: "nack_discard nacks without requeue", bodies: mixed, discard: true, want: settled(true), wantCalls: len(mixed)},
		{name: "several workers settle each delivery once", bodies: mixed, workers: 4, want: settled(false), wantCalls: len(mixed), wantCopies: 5},
		{name: "max_rate still dispatches", bodies: mixed, maxRate: 1e9, want: settled(false), wantCalls: len(mixed), wantCopies: 5},
		{name: "auto_ack: no ack or nack", bodies: mixed, autoAck: true, wantCalls: len(mixed)},
		{name: "auto_ack with nack_discard: no ack or nack", bodies: mixed, autoAck: true, discard: true, wantCalls: len(mixed)},
		{name: "stopping: nacked with requeue, not dispatched", bodies: mixed, cancelled: true, want: allNackRequeue(len(mixed))},
		{name: "stopping with nack_discard still requeues", bodies: mixed, cancelled: true, discard: true, want: allNackRequeue(len(mixed))},
		{name: "stopping with max_rate: requeued, not dispatched", bodies: mixed, cancelled: true, maxRate: 10, want: allNackRequeue(len(mixed))},
		{name: "stopping with several workers", bodies: mixed, cancelled: true, workers: 3, want: allNackRequeue(len(mixed))},
		{name: "stopping with auto_ack: dispatched, the broker already forgot them", bodies: mixed, cancelled: true, autoAck: true, wantCalls: len(mixed)},
		{name: "no deliveries", bodies: nil, wantCalls: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			acker := &fakeAcker{}
			p := &outcomeProxy{}
			a := mustNew(Options{
				Name:        "test",
				Session:     consumer.Settings{AutoAck: tc.autoAck},
				Workers:     max(tc.workers, 1),
				Timeout:     time.Minute,
				MaxRate:     tc.maxRate,
				NackDiscard: tc.discard,
				Proxy:       p.proxy,
				Logger:      logging.NoOp,
			})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.cancelled {
				cancel()
			}
			ch := deliveries(acker, tc.bodies...)
			var wg sync.WaitGroup
			for range a.opts.Workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					a.work(ctx, context.WithoutCancel(ctx), a.flowOf(ch))
				}()
			}
			wg.Wait()

			if got := p.count(); got != tc.wantCalls {
				t.Errorf("proxy called %d times, want %d", got, tc.wantCalls)
			}
			if got := ch.publishes(); got != tc.wantCopies {
				t.Errorf("%d copies published, want %d", got, tc.wantCopies)
			}
			got := acker.byTag()
			if tc.want == nil {
				if n := acker.count(); n != 0 {
					t.Errorf("%d ack/nack calls, want none: %v", n, got)
				}
				return
			}
			for i, want := range tc.want {
				tag := uint64(i + 1)
				want.tag = tag
				if calls := got[tag]; len(calls) != 1 || calls[0] != want {
					t.Errorf("delivery %d (%q): calls %v, want exactly [%v]", tag, tc.bodies[i], calls, want)
				}
			}
			if n := acker.count(); n != len(tc.want) {
				t.Errorf("%d ack/nack calls, want %d", n, len(tc.want))
			}
		})
	}
}

func TestAgentDispatch(t *testing.T) {
	t.Run("the dispatch deadline does not follow the agent's context", func(t *testing.T) {
		p := &outcomeProxy{}
		a := mustNew(Options{Name: "test", Session: consumer.Settings{AutoAck: true}, Timeout: time.Minute, Proxy: p.proxy, Logger: logging.NoOp})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		a.work(ctx, context.WithoutCancel(ctx), a.flowOf(deliveries(&fakeAcker{}, "ok", "ok")))
		if len(p.ctxErrs) != 2 {
			t.Fatalf("%d dispatches, want 2", len(p.ctxErrs))
		}
		for i := range p.ctxErrs {
			if p.ctxErrs[i] != nil {
				t.Errorf("dispatch %d: context already done (%v) although the agent may finish in-flight work", i, p.ctxErrs[i])
			}
			if !p.deadlines[i] {
				t.Errorf("dispatch %d: no deadline; consumer.timeout is not applied", i)
			}
		}
	})

	t.Run("the response body is drained and closed", func(t *testing.T) {
		p := &outcomeProxy{}
		acker := &fakeAcker{}
		a := mustNew(Options{Name: "test", Timeout: time.Minute, Proxy: p.proxy, Logger: logging.NoOp})
		a.work(context.Background(), context.Background(), a.flowOf(deliveries(acker, "body", "body")))
		if len(p.bodies) != 2 {
			t.Fatalf("%d bodies, want 2", len(p.bodies))
		}
		for i, b := range p.bodies {
			if b.closed != 1 || b.read != len("response") {
				t.Errorf("body %d: read %d bytes, closed %d times; want all read, closed once", i, b.read, b.closed)
			}
		}
	})

	t.Run("a panicking pipeline is a failure with a reason", func(t *testing.T) {
		p := &outcomeProxy{}
		a := mustNew(Options{Name: "test", Timeout: time.Minute, Proxy: p.proxy, Logger: logging.NoOp})
		r := a.dispatch(context.Background(), plain(&amqp.Delivery{Body: []byte("panic")}))
		if r.ok || !strings.Contains(r.reason, "panicked") || !strings.Contains(r.reason, "backend exploded") {
			t.Errorf("dispatch = %+v, want a failure naming the panic", r)
		}
	})

	t.Run("the pipeline sees the message", func(t *testing.T) {
		got := make(chan *proxy.Request, 1)
		a := mustNew(Options{Name: "test", Timeout: time.Minute, Logger: logging.NoOp, URLParams: true, Proxy: func(_ context.Context, r *proxy.Request) (*proxy.Response, error) {
			got <- r
			return &proxy.Response{IsComplete: true}, nil
		}})
		if r := a.dispatch(context.Background(), plain(&amqp.Delivery{Body: []byte("hello"), RoutingKey: "a.b"})); !r.ok {
			t.Fatalf("dispatch: %s", r.reason)
		}
		r := <-got
		if b, _ := io.ReadAll(r.Body); string(b) != "hello" {
			t.Errorf("body = %q", b)
		}
		if r.Params["Routing_key"] != "a.b" {
			t.Errorf("Params = %v", r.Params)
		}
	})
}

func TestAgentReport(t *testing.T) {
	for _, tc := range []struct {
		name    string
		autoAck bool
		discard bool
		ackErr  error
		bodies  []string
		want    []string
		notWant []string
	}{
		{
			name:   "failures are counted once, with the last reason",
			bodies: []string{"ok", "500", "500", "ok"},
			want:   []string{"WARNING:", "[AMQP][reporter]", "2 messages failed and were scheduled for a retry or dead-lettered", "status 500"},
		},
		{
			name:    "nack_discard",
			discard: true,
			bodies:  []string{"err"},
			want:    []string{"1 messages failed and were discarded (nack_discard)", "connection refused"},
		},
		{
			name:    "auto_ack",
			autoAck: true,
			bodies:  []string{"500"},
			want:    []string{"1 messages failed and were not requeued (auto_ack)"},
		},
		{
			name:   "refused acks are counted",
			ackErr: errChanClose,
			bodies: []string{"ok", "500", "ok"},
			want:   []string{"3 acks/nacks were refused"},
		},
		{
			name:    "nothing to report",
			bodies:  []string{"ok", "ok"},
			notWant: []string{"failed", "refused"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf := &bytes.Buffer{}
			l, err := logging.NewLogger("INFO", buf, "")
			if err != nil {
				t.Fatal(err)
			}
			p := &outcomeProxy{}
			a := mustNew(Options{
				Name:        "reporter",
				Workers:     1,
				Session:     consumer.Settings{AutoAck: tc.autoAck},
				Timeout:     time.Minute,
				NackDiscard: tc.discard,
				Proxy:       p.proxy,
				Logger:      l,
			})
			a.work(context.Background(), context.Background(), a.flowOf(deliveries(&fakeAcker{err: tc.ackErr}, tc.bodies...)))
			if buf.Len() != 0 {
				t.Errorf("logged per message at INFO: %q", buf.String())
			}
			a.report()
			out := buf.String()
			for _, s := range tc.want {
				if !strings.Contains(out, s) {
					t.Errorf("log %q does not contain %q", out, s)
				}
			}
			for _, s := range tc.notWant {
				if strings.Contains(out, s) {
					t.Errorf("log %q contains %q", out, s)
				}
			}
			buf.Reset()
			a.report()
			if buf.Len() != 0 {
				t.Errorf("a second report with nothing new logged %q", buf.String())
			}
		})
	}
}

func TestNewDefaults(t *testing.T) {
	for _, tc := range []struct {
		name        string
		opts        Options
		wantWorkers int
		wantTimeout time.Duration
		wantHealth  time.Duration
		wantLimiter bool
		wantLog     []string
	}{
		{
			name:        "zero options",
			opts:        Options{Name: "a"},
			wantWorkers: 1, wantTimeout: DefaultTimeout, wantHealth: DefaultHealthInterval,
			wantLog: []string{"consumer.workers", "consumer.timeout"},
		},
		{
			name:        "negative workers",
			opts:        Options{Name: "a", Workers: -3, Timeout: time.Second},
			wantWorkers: 1, wantTimeout: time.Second, wantHealth: DefaultHealthInterval,
			wantLog: []string{"consumer.workers is -3"},
		},
		{
			name:        "given values are kept",
			opts:        Options{Name: "a", Workers: 8, Timeout: 3 * time.Second, HealthInterval: 10 * time.Second, MaxRate: 5},
			wantWorkers: 8, wantTimeout: 3 * time.Second, wantHealth: 10 * time.Second, wantLimiter: true,
		},
		{
			name:        "no_local warns",
			opts:        Options{Name: "a", Workers: 1, Timeout: time.Second, Session: consumer.Settings{NoLocal: true}},
			wantWorkers: 1, wantTimeout: time.Second, wantHealth: DefaultHealthInterval,
			wantLog: []string{"no_local", "RabbitMQ ignores it"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf := &bytes.Buffer{}
			l, err := logging.NewLogger("DEBUG", buf, "")
			if err != nil {
				t.Fatal(err)
			}
			tc.opts.Logger = l
			a := mustNew(tc.opts)
			if a.opts.Workers != tc.wantWorkers {
				t.Errorf("Workers = %d, want %d", a.opts.Workers, tc.wantWorkers)
			}
			if a.opts.Timeout != tc.wantTimeout {
				t.Errorf("Timeout = %s, want %s", a.opts.Timeout, tc.wantTimeout)
			}
			if a.opts.HealthInterval != tc.wantHealth {
				t.Errorf("HealthInterval = %s, want %s", a.opts.HealthInterval, tc.wantHealth)
			}
			if (a.limiter != nil) != tc.wantLimiter {
				t.Errorf("limiter set %t, want %t", a.limiter != nil, tc.wantLimiter)
			}
			if a.opts.ShouldContinue == nil || a.opts.Backoff == nil {
				t.Error("ShouldContinue or Backoff left nil")
			}
			for _, s := range tc.wantLog {
				if !strings.Contains(buf.String(), s) {
					t.Errorf("log %q does not contain %q", buf.String(), s)
				}
			}
			if len(tc.wantLog) == 0 && buf.Len() != 0 {
				t.Errorf("unexpected log: %q", buf.String())
			}
			if buf.Len() != 0 && !strings.Contains(buf.String(), "[SERVICE: AsyncAgent][AMQP][a]") {
				t.Errorf("log lines do not name the agent: %q", buf.String())
			}
		})
	}
	t.Run("nil logger", func(t *testing.T) {
		a := mustNew(Options{Name: "a"})
		a.log.Info("does not panic")
	})
}

func TestPing(t *testing.T) {
	t.Run("sends the agent name", func(t *testing.T) {
		ch := make(chan string, 1)
		a := mustNew(Options{Name: "pinger", Workers: 1, Timeout: time.Second, Ping: ch})
		a.ping()
		if got := <-ch; got != "pinger" {
			t.Errorf("ping = %q, want pinger", got)
		}
	})
	t.Run("never blocks", func(t *testing.T) {
		ch := make(chan string) // nobody reads
		a := mustNew(Options{Name: "pinger", Workers: 1, Timeout: time.Second, Ping: ch})
		a.ping()
	})
	t.Run("no channel", func(t *testing.T) {
		a := mustNew(Options{Name: "pinger", Workers: 1, Timeout: time.Second})
		a.ping()
	})
}

func TestSleepStopsOnCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if sleep(ctx, time.Hour) {
		t.Error("sleep returned true on a cancelled context")
	}
}

// Through Lura's real pipeline: with the no-op encoding Lura hands back a
// backend's 500 with no error; the driver must still not ack it.
func TestOutcomeThroughLuraPipeline(t *testing.T) {
	for _, tc := range []struct {
		name     string
		encoding string
		status   []int // per backend
		wantOK   bool
	}{
		{"json 200", "json", []int{200}, true},
		{"json 500", "json", []int{500}, false},
		{"json 404", "json", []int{404}, false},
		{"no-op 200", "no-op", []int{200}, true},
		{"no-op 204", "no-op", []int{204}, true},
		{"no-op 500", "no-op", []int{500}, false},
		{"no-op 503", "no-op", []int{503}, false},
		{"no-op 404", "no-op", []int{404}, false},
		{"no-op 400", "no-op", []int{400}, false},
		{"two backends both 200", "json", []int{200, 200}, true},
		{"two backends, one 500", "json", []int{200, 500}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var backends []*config.Backend
			for _, status := range tc.status {
				srv, _ := testBackend(t, func(int) int { return status })
				backends = append(backends, &config.Backend{
					Host:       []string{srv.URL},
					URLPattern: "/events/{routing_key}",
					Method:     http.MethodPost,
				})
			}
			p := luraPipeline(t, tc.encoding, backends...)
			resp, err := p(testContext(t), newRequest(plain(&amqp.Delivery{Body: []byte(`{}`), RoutingKey: "k"}), true))
			discardBody(resp)
			r := judge(resp, err)
			if r.ok != tc.wantOK {
				t.Fatalf("judge ok = %t (%q), want %t", r.ok, r.reason, tc.wantOK)
			}
			if !r.ok && len(tc.status) == 1 && tc.encoding == "no-op" && !strings.Contains(r.reason, strconv.Itoa(tc.status[0])) {
				t.Errorf("reason %q does not name the status %d", r.reason, tc.status[0])
			}
		})
	}

	t.Run("backend down", func(t *testing.T) {
		srv, _ := testBackend(t, func(int) int { return 200 })
		url := srv.URL
		srv.Close()
		p := luraPipeline(t, "no-op", &config.Backend{Host: []string{url}, URLPattern: "/", Method: http.MethodPost})
		resp, err := p(testContext(t), newRequest(plain(&amqp.Delivery{Body: []byte(`{}`)}), true))
		discardBody(resp)
		if r := judge(resp, err); r.ok {
			t.Error("judge ok for a backend that is down")
		}
	})
}
