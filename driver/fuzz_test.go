package driver

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
	amqp "github.com/rabbitmq/amqp091-go"
	"golang.org/x/net/http/httpguts"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// fuzzInput hands out fuzz bytes as AMQP values, so that a fuzz target
// can build tables and properties of any shape; an exhausted input gives
// zeros.
type fuzzInput struct{ b []byte }

func (in *fuzzInput) next(n int) []byte {
	out := make([]byte, n)
	copy(out, in.b)
	in.b = in.b[min(n, len(in.b)):]
	return out
}

func (in *fuzzInput) byte() byte { return in.next(1)[0] }

func (in *fuzzInput) text() string { return string(in.next(int(in.byte()))) }

// keys the driver reads, so that the fuzzer reaches them often.
var fuzzKeys = []string{"x-death", HeaderAttempts, HeaderOriginalRoutingKey, HeaderOriginalExchange, "traceparent", "tracestate", "baggage", HeaderThrottles,
	"CC", "BCC", "x-delay", "x-first-death-queue", HeaderParked, HeaderLastError, keptPrefix + "CC", HeaderOriginalUserID, HeaderOriginalReplyTo}

func (in *fuzzInput) key() string {
	if k := in.byte(); int(k) < len(fuzzKeys) {
		return fuzzKeys[k]
	}
	return in.text()
}

func (in *fuzzInput) table(depth int) amqp.Table {
	t := amqp.Table{}
	for n := in.byte() % 8; n > 0 && len(in.b) > 0; n-- {
		t[in.key()] = in.value(depth)
	}
	return t
}

func (in *fuzzInput) value(depth int) interface{} {
	u64 := func(n int) uint64 {
		var b [8]byte
		copy(b[:], in.next(n))
		return binary.LittleEndian.Uint64(b[:])
	}
	switch in.byte() % 17 {
	case 1:
		return in.text()
	case 2:
		return []byte(in.text())
	case 3:
		return in.byte()%2 == 0
	case 4:
		return int8(in.byte())
	case 5:
		return in.byte()
	case 6:
		return int16(u64(2))
	case 7:
		return uint16(u64(2))
	case 8:
		return int32(u64(4))
	case 9:
		return uint32(u64(4))
	case 10:
		return int64(u64(8))
	case 11:
		return math.Float32frombits(uint32(u64(4)))
	case 12:
		return math.Float64frombits(u64(8))
	case 13:
		return amqp.Decimal{Scale: in.byte(), Value: int32(u64(4))}
	case 14:
		return time.Unix(int64(u64(8))%(1<<40), 0)
	case 15:
		if depth < 3 {
			return in.table(depth + 1)
		}
	case 16:
		if depth < 3 {
			var a []interface{}
			for n := in.byte() % 4; n > 0; n-- {
				a = append(a, in.value(depth+1))
			}
			return a
		}
	}
	return nil
}

// delivery builds a delivery from fuzz input; with back set, it comes
// back from the agent's retry queue as the broker delivers it (the
// driver's headers are then believed, whatever they hold).
func (in *fuzzInput) delivery(back bool, retryQueue string) *amqp.Delivery {
	d := &amqp.Delivery{
		Exchange: in.text(), RoutingKey: in.text(), MessageId: in.text(), CorrelationId: in.text(),
		ContentType: in.text(), ContentEncoding: in.text(), ReplyTo: in.text(), Type: in.text(),
		AppId: in.text(), UserId: in.text(), Expiration: in.text(), Priority: in.byte(), DeliveryMode: in.byte() % 3,
		Redelivered: in.byte()%2 == 0, DeliveryTag: 1,
		Headers: in.table(0), Body: in.next(int(in.byte())),
	}
	if back {
		h := d.Headers
		d = expiredFrom(d, retryQueue)
		for k, v := range h { // a forged x-death of the input's own
			if k == "x-death" && in.byte()%2 == 0 {
				d.Headers[k] = v
			}
		}
	}
	return d
}

func fuzzAgent(maxAttempts int, dead config.DeadLetter) *Agent {
	return mustNew(Options{
		Name: "fuzz", Session: consumer.Settings{Topology: consumer.Topology{Exchange: "x", Queue: "work"}},
		Workers: 1, Timeout: time.Second, Logger: logging.NoOp, URLParams: true,
		Retry:      config.Retry{MaxAttempts: maxAttempts, Delay: 50 * time.Millisecond, MaxDelay: 400 * time.Millisecond, Multiplier: 2},
		DeadLetter: dead,
	})
}

func fuzzSeeds(f *testing.F) {
	f.Add([]byte{}, false)
	f.Add([]byte("\x05\x07orders.\x0ammessage-id"), true)
	// x-krakend-attempts as int64 -1, then as a huge uint64.
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, true)
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 2, 1, 10, 'a', 'd', 'm', 'i', 'n', '.', 'p', 'u', 'r', 'g', 1, 10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, true)
	f.Add([]byte("\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x04\x04\x01\x037\r\n\x05\x0f\x03\x02\x10\x02\x01\x05hello\x08\x01\x02\x03\x04"), false)
}

// FuzzRequest: whatever a message holds, its request is valid for
// net/http (header names are tokens, values have no control characters,
// path params cannot leave their segment) and its attempt is within
// 1..max_attempts.
func FuzzRequest(f *testing.F) {
	fuzzSeeds(f)
	a := fuzzAgent(5, config.DeadLetter{Queue: "dead"})
	retryQueue := consumer.RetryQueue("work", a.opts.Session.RetryDelays[0])
	f.Fuzz(func(t *testing.T, data []byte, back bool) {
		in := &fuzzInput{b: data}
		m := a.msg(in.delivery(back, retryQueue))
		if m.attempt() < 1 || m.attempt() > 5 {
			t.Fatalf("attempt %d out of 1..5", m.attempt())
		}
		if len(m.key) > maxNameLength || len(m.exchange) > maxNameLength {
			t.Fatalf("origin %q/%q longer than an AMQP short string", m.exchange, m.key)
		}
		req := newRequest(m, true)
		for name, values := range req.Headers {
			if !httpguts.ValidHeaderFieldName(name) {
				t.Fatalf("header name %q is not an HTTP token", name)
			}
			for _, v := range values {
				if !httpguts.ValidHeaderFieldValue(v) {
					t.Fatalf("header %s value %q is not valid in HTTP", name, v)
				}
			}
		}
		for name, v := range req.Params {
			if strings.ContainsAny(v, "/?#") || v == "." || v == ".." {
				t.Fatalf("param %s = %q can leave its path segment", name, v)
			}
		}
		if _, err := http.NewRequest(http.MethodPost, "http://backend/e/"+req.Params["Routing_key"], req.Body); err != nil {
			t.Fatalf("net/http refuses the request: %v", err)
		}
	})
}

// FuzzFailure: whatever a failed message holds, the decision counts an
// attempt within 1..max_attempts, retries through a declared retry queue
// or dead-letters where the configuration says, and the copy can be
// published.
func FuzzFailure(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte, back bool) {
		in := &fuzzInput{b: data}
		maxAttempts := int(in.byte()%10) + 1
		status := int(binary.LittleEndian.Uint16(in.next(2)) % 700)
		deads := []config.DeadLetter{{}, {Queue: "dead", Statuses: []int{422}}, {Exchange: "dlx"}, {Exchange: "dlx", RoutingKey: "failed"}, {Broker: true}}
		dead := deads[int(in.byte())%len(deads)]
		a := fuzzAgent(maxAttempts, dead)
		retryQueue := consumer.RetryQueue("work", a.opts.Session.RetryDelays[int(in.byte())%len(a.opts.Session.RetryDelays)])
		m := a.msg(in.delivery(back, retryQueue))
		r := result{reason: "fuzz", status: status, retryAfter: time.Duration(binary.LittleEndian.Uint32(in.next(4))) * time.Millisecond}
		dec := a.decide(m, r)
		lowest := 1
		if r.throttled() { // a throttle may use up no attempt
			lowest = 0
		}
		if dec.attempt < lowest || dec.attempt > maxAttempts {
			t.Fatalf("attempt %d out of %d..%d", dec.attempt, lowest, maxAttempts)
		}
		if dec.throttles < 0 || dec.throttles > maxThrottles || r.throttled() && dec.throttles < 1 {
			t.Fatalf("throttles %d out of range for status %d", dec.throttles, status)
		}
		switch {
		case dec.outcome == OutcomeRetried:
			if !slices.Contains(a.opts.Session.RetryDelays, dec.delay) {
				t.Fatalf("retry delay %s is none of the declared %v", dec.delay, a.opts.Session.RetryDelays)
			}
			if dead.Enabled() && dec.attempt >= maxAttempts && dec.park == "" {
				t.Fatalf("retried after the last attempt although %+v is configured", dead)
			}
		case dec.broker:
			if !dead.Broker {
				t.Fatal("left to the broker's dead-lettering, which is not configured")
			}
		case dec.outcome == OutcomeDeadLettered:
			want := dead.Queue
			if dead.Exchange != "" {
				want = dead.RoutingKey
				if want == "" {
					want = m.key
				}
			}
			if dec.exchange != dead.Exchange || dec.key != want {
				t.Fatalf("dead letter to %q/%q, want %q/%q", dec.exchange, dec.key, dead.Exchange, want)
			}
		default:
			t.Fatalf("outcome %q", dec.outcome)
		}
		c := a.copyOf(m, dec.attempt, dec.throttles, "fuzz")
		if c.Headers[HeaderAttempts] != int64(dec.attempt) {
			t.Fatalf("copy counts %v attempts, want %d", c.Headers[HeaderAttempts], dec.attempt)
		}
		checkCopy(t, m, c)
	})
}

// checkCopy checks that a copy carries nothing a broker acts on, can be
// published, and comes back from a retry queue as its message was.
func checkCopy(t *testing.T, m *message, c amqp.Publishing) {
	t.Helper()
	if err := c.Headers.Validate(); err != nil {
		t.Fatalf("the copy cannot be published: %v", err)
	}
	if c.UserId != "" || c.Expiration != "" || c.ReplyTo != "" {
		t.Fatalf("the copy carries user_id %q, expiration %q, reply_to %q", c.UserId, c.Expiration, c.ReplyTo)
	}
	for k := range c.Headers {
		if interpreted(k) || len(k) > maxNameLength {
			t.Fatalf("the copy carries header %q", k)
		}
		if driverHeader(k) && !strings.HasPrefix(k, keptPrefix) && !slices.Contains(driverHeaders, k) {
			t.Fatalf("the copy carries %q, which the driver does not write", k)
		}
		if k == HeaderParked {
			t.Fatalf("a copy made by copyOf carries %s", HeaderParked)
		}
	}
	back := restored(&amqp.Delivery{Headers: c.Headers})
	for k, v := range m.d.Headers {
		if driverHeader(k) || len(keptPrefix)+len(k) > maxNameLength && interpreted(k) {
			continue
		}
		if fmt.Sprint(back.Headers[k]) != fmt.Sprint(v) {
			t.Fatalf("header %q comes back as %v, want %v", k, back.Headers[k], v)
		}
	}
	if back.UserId != m.d.UserId && len(m.d.UserId) <= maxNameLength || back.ReplyTo != m.d.ReplyTo && len(m.d.ReplyTo) <= maxNameLength {
		t.Fatalf("user_id %q and reply_to %q come back as %q and %q", m.d.UserId, m.d.ReplyTo, back.UserId, back.ReplyTo)
	}
}

// driverHeaders are the headers copyOf writes.
var driverHeaders = []string{HeaderAttempts, HeaderThrottles, HeaderLastError, HeaderOriginalExchange, HeaderOriginalRoutingKey,
	HeaderOriginalUserID, HeaderOriginalReplyTo}

// ceKeys are attribute headers, so that the fuzzer builds events often.
var ceKeys = []string{"cloudEvents:specversion", "cloudEvents:id", "cloudEvents:source", "cloudEvents:type",
	"cloudEvents:time", "cloudEvents:subject", "cloudEvents:dataschema", "cloudEvents:datacontenttype", "cloudEvents:ext",
	"cloudEvents_specversion", "cloudEvents_id", "cloudEvents_source", "cloudEvents_type", "cloudEvents_ext", "cloudEvents:Ext"}

var ceContentTypes = []string{"", "application/json", "application/cloudevents+json", "Application/CloudEvents+JSON; charset=utf-8",
	"application/cloudevents-batch+json", "text/plain\r\n"}

// ceDelivery builds a delivery that is often close to a CloudEvent.
func (in *fuzzInput) ceDelivery() *amqp.Delivery {
	d := &amqp.Delivery{Exchange: "x", RoutingKey: in.text(), MessageId: in.text(), ContentType: in.text(), Headers: amqp.Table{}}
	if k := int(in.byte()); k < len(ceContentTypes) {
		d.ContentType = ceContentTypes[k]
	}
	if in.byte()%2 == 0 {
		d.Headers["cloudEvents:specversion"], d.Headers["cloudEvents:id"] = "1.0", in.text()
		d.Headers["cloudEvents:source"], d.Headers["cloudEvents:type"] = in.text(), "t"
	}
	for n := in.byte() % 8; n > 0 && len(in.b) > 0; n-- {
		k := in.text()
		if i := int(in.byte()); i < len(ceKeys) {
			k = ceKeys[i]
		}
		d.Headers[k] = in.value(0)
	}
	d.Body = in.next(int(in.byte()))
	return d
}

// FuzzCloudEvents: whatever a message holds, reading it as a CloudEvent
// never panics, the request is valid for net/http, and an event reaches
// the backend whole: every attribute in a ce- header that decodes back
// to it, none sent twice, the body untouched.
func FuzzCloudEvents(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("\x00\x00\x00\x00\x041234\x04/src\x02\x01\x01\x03abc"))
	f.Add([]byte("\x00\x00\x00\x02\x01\x00\x01\x05\x20\x00\x00\x00\x00{}"))
	// A structured event.
	f.Add([]byte("\x00\x00\x00\x02\x01\x00\x3f" + `{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":5}`))
	a := mustNew(Options{Name: "fuzz", Session: consumer.Settings{Topology: consumer.Topology{Queue: "work"}},
		Workers: 1, Timeout: time.Second, Logger: logging.NoOp, CloudEvents: true, IdempotencyHeader: "Idempotency-Key"})
	f.Fuzz(func(t *testing.T, data []byte) {
		in := &fuzzInput{b: data}
		d := in.ceDelivery()
		m := a.msg(d)
		req := newRequest(m, false)
		req.Headers[a.opts.IdempotencyHeader] = []string{idempotencyKey(m)}
		checkHeaders(t, req.Headers)
		if got := readBody(t, req); !bytes.Equal(got, d.Body) {
			t.Fatalf("body %q, want %q as published", got, d.Body)
		}
		if m.event == nil || m.event.structured {
			return
		}
		checkEvent(t, m.event, req.Headers)
	})
}

func checkHeaders(t *testing.T, h map[string][]string) {
	t.Helper()
	for name, values := range h {
		if !httpguts.ValidHeaderFieldName(name) {
			t.Fatalf("header name %q is not an HTTP token", name)
		}
		for _, v := range values {
			if !httpguts.ValidHeaderFieldValue(v) {
				t.Fatalf("header %s value %q is not valid in HTTP", name, v)
			}
		}
	}
}

// checkEvent: each attribute is in its ce- header, percent-encoded, and
// the attribute headers are not sent again.
func checkEvent(t *testing.T, e *event, h map[string][]string) {
	t.Helper()
	for _, name := range []string{"specversion", "id", "source", "type"} {
		if e.attributes[name] == "" {
			t.Fatalf("an event without %s", name)
		}
	}
	for name, value := range e.attributes {
		if name == ceDataContentType {
			continue
		}
		got := h["Ce-"+strings.ToUpper(name[:1])+name[1:]]
		if len(got) != 1 || strings.ContainsAny(got[0], " \"") {
			t.Fatalf("attribute %s = %q sent as %q", name, value, got)
		}
		if back, err := url.PathUnescape(got[0]); err != nil || back != value {
			t.Fatalf("attribute %s = %q sent as %q, which decodes to %q (%v)", name, value, got[0], back, err)
		}
	}
	for name := range h {
		if strings.HasPrefix(name, HeaderPrefix+"Cloudevents") {
			t.Fatalf("attribute header %s sent twice", name)
		}
	}
}

// FuzzFingerprint: whatever a delivery holds, its fingerprint never
// panics, and its redelivery (flag, tags, a quorum queue's delivery
// counts) has the same one; another body has another. A retry copy back
// from its queue has the content key of its message.
func FuzzFingerprint(f *testing.F) {
	fuzzSeeds(f)
	a := fuzzAgent(5, config.DeadLetter{Queue: "dead"})
	retryQueue := consumer.RetryQueue("work", a.opts.Session.RetryDelays[0])
	f.Fuzz(func(t *testing.T, data []byte, back bool) {
		in := &fuzzInput{b: data}
		d := in.delivery(back, retryQueue)
		key := fingerprint(d)
		again := *d
		again.Redelivered, again.DeliveryTag, again.ConsumerTag = !d.Redelivered, d.DeliveryTag+1, "other"
		again.Headers = amqp.Table{"x-delivery-count": int64(in.byte()), "X-Acquired-Count": int32(in.byte())}
		for k, v := range d.Headers {
			if !skipped(k, redeliveryHeaders) {
				again.Headers[k] = v
			}
		}
		if fingerprint(&again) != key {
			t.Fatal("a redelivery has another fingerprint")
		}
		other := *d
		other.Body = append(append([]byte(nil), d.Body...), 'x')
		if fingerprint(&other) == key {
			t.Fatal("another body has the same fingerprint")
		}
		m := a.msg(d)
		_, okExchange := name(m.exchange)
		_, okKey := name(m.key)
		if !okExchange || !okKey {
			return // its copy comes back with the retry queue's origin
		}
		for k := range m.d.Headers {
			if interpreted(k) && len(keptPrefix)+len(k) > maxNameLength {
				return // dropped from the copy: not the same content
			}
		}
		c := a.copyOf(m, 1, 0, "fuzz")
		copied := &amqp.Delivery{Headers: c.Headers, ContentType: c.ContentType, ContentEncoding: c.ContentEncoding,
			DeliveryMode: c.DeliveryMode, Priority: c.Priority, CorrelationId: c.CorrelationId, MessageId: c.MessageId,
			Timestamp: c.Timestamp, Type: c.Type, AppId: c.AppId, Body: c.Body, DeliveryTag: 1}
		if contentKey(a.msg(expiredFrom(copied, retryQueue))) != contentKey(m) {
			t.Fatal("a retry copy back from its queue has another content key than its message")
		}
	})
}
