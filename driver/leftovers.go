package driver

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"io"
	"math"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// A connection cut leaves messages behind whose handling was done (the
// backend answered 2xx, the retry or dead-letter copy was confirmed, or
// the message was given up) but whose ack or nack the closed channel
// refused. The broker delivers each of them again to the next session,
// which would dispatch it a second time. The agent remembers them by a
// fingerprint of the delivery and, when one comes back redelivered,
// settles it as it was settled before the cut, without a dispatch.
//
// Why this is exact: the fingerprint covers everything a redelivery keeps
// (body, properties, headers, exchange and key), so two deliveries with
// the same fingerprint are the same message to the backend. Each
// registered fingerprint is taken once, by one redelivery: a message
// never dispatched by the dead session was never registered, and of two
// identical redeliveries for one handled message, one is settled and the
// other dispatched, so the backend sees that content as often as it was
// published. Only a redelivery is looked at (a publisher cannot set the
// flag), and only while something is registered. Forgetting an entry
// (past leftoverTTL, or over the bound) can only cost a duplicate.

// leftoverTTL is how long a message left behind by a cut is remembered:
// its redelivery comes with the next session, within seconds.
const leftoverTTL = 5 * time.Minute

// minLeftovers is the least number of messages remembered.
const minLeftovers = 1024

// fate is how a message left behind was settled, and is settled again.
type fate struct {
	ack     bool   // ack; else nack without requeue
	outcome string // what it counts as
}

// leftovers is the agent's multiset of messages left behind by cuts:
// fingerprint to fates, oldest first. It is safe for concurrent use.
type leftovers struct {
	most  int
	now   func() time.Time
	size  atomic.Int64 // entries not taken: read without the lock
	mu    sync.Mutex
	order []*leftover // oldest first, taken ones until trimmed
	byKey map[[32]byte][]*leftover
}

type leftover struct {
	key     [32]byte
	fate    fate
	at      time.Time
	session uint64 // the number of the session that left it
	taken   bool
}

// newLeftovers remembers up to four prefetch windows, at least
// minLeftovers: each cut leaves at most a window and the workers' messages.
func newLeftovers(prefetch int) *leftovers {
	return &leftovers{most: max(4*prefetch, minLeftovers), now: time.Now, byKey: map[[32]byte][]*leftover{}}
}

// empty tells whether nothing is remembered; it takes no lock.
func (l *leftovers) empty() bool { return l.size.Load() == 0 }

// add remembers one message left behind.
func (l *leftovers) add(key [32]byte, f fate, session uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := &leftover{key: key, fate: f, at: l.now(), session: session}
	l.order = append(l.order, e)
	l.byKey[key] = append(l.byKey[key], e)
	l.size.Add(1)
	l.trim()
}

// forget drops the messages left by the sessions before this one. They
// come first in order, and first in their key's list.
func (l *leftovers) forget(session uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.order {
		if e.session >= session {
			break
		}
		if !e.taken {
			l.drop(e)
		}
	}
	l.trim()
}

// take finds and forgets the oldest message left behind with this key.
func (l *leftovers) take(key [32]byte) (fate, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.trim()
	list := l.byKey[key]
	if len(list) == 0 {
		return fate{}, false
	}
	e := list[0]
	l.drop(e)
	return e.fate, true
}

// trim forgets the expired entries and the oldest ones over the bound.
func (l *leftovers) trim() {
	cutoff := l.now().Add(-leftoverTTL)
	for len(l.order) > 0 {
		e := l.order[0]
		if !e.taken && e.at.After(cutoff) && l.size.Load() <= int64(l.most) {
			break
		}
		if !e.taken {
			l.drop(e)
		}
		l.order[0] = nil
		l.order = l.order[1:]
	}
	if len(l.order) > 2*l.most {
		l.compact()
	}
}

// drop forgets an entry: it is the oldest of its key, as both lists are
// in the order of arrival.
func (l *leftovers) drop(e *leftover) {
	e.taken = true
	l.size.Add(-1)
	if list := l.byKey[e.key][1:]; len(list) > 0 {
		l.byKey[e.key] = list
	} else {
		delete(l.byKey, e.key)
	}
}

// compact clears the taken entries out of order, which takes only the
// oldest ones away.
func (l *leftovers) compact() {
	kept := make([]*leftover, 0, l.size.Load())
	for _, e := range l.order {
		if !e.taken {
			kept = append(kept, e)
		}
	}
	l.order = kept
}

// leftBehind remembers a message whose settlement the channel refused
// after its handling was done.
func (a *Agent) leftBehind(m *message, f fate) {
	if a.leftovers == nil || m == nil || m.raw == nil {
		return
	}
	a.leftovers.add(m.fingerprint(), f, m.session)
}

// settledBefore settles, without a dispatch, a redelivery of a message
// whose handling a cut left behind, as it was settled then; it tells
// whether it did.
func (a *Agent) settledBefore(f *flow, m *message) bool {
	l := a.leftovers
	if l == nil || m.raw == nil || l.empty() {
		return false
	}
	if !m.raw.Redelivered {
		// A queue hands back what a dead consumer left ahead of what it
		// never delivered: once a later session gets a first delivery,
		// the cut's redeliveries to this agent have come, or went to
		// another consumer. Forgetting them then keeps one that never
		// comes back from standing in for a later message of the same
		// content. (The dead session's own buffered deliveries, handed
		// out after its cut, forget nothing.)
		l.forget(m.session)
		return false
	}
	earlier, ok := l.take(m.fingerprint())
	if !ok {
		return false
	}
	a.stats.leftovers.Add(1)
	a.log.Debug(fmt.Sprintf("message %q: redelivered, but its handling was done before the connection cut (%s) and its ack "+
		"was lost with the connection: settled as then, not dispatched again", shortID(m.raw), earlier.outcome))
	m.outcome = earlier.outcome
	f.settler.settle(m, earlier.ack, false, earlier.outcome)
	return true
}

// fingerprint is the fingerprint of the delivery as received, worked
// out once: a redelivery may be looked up among what a cut left and
// among the groups, then remembered again.
func (m *message) fingerprint() [32]byte {
	if m.fp == nil {
		key := fingerprint(m.raw)
		m.fp = &key
	}
	return *m.fp
}

// Headers a broker adds or changes when it delivers a message again.
var redeliveryHeaders = []string{"x-delivery-count", "x-acquired-count"}

// fingerprint is a delivery's key: a SHA-256 over everything a
// redelivery keeps. Not the delivery tag, the consumer tag, the
// redelivered flag nor the delivery counts of quorum queues.
func fingerprint(d *amqp.Delivery) [32]byte {
	w := keyWriter{h: sha256.New()}
	for _, s := range []string{d.Exchange, d.RoutingKey, d.ContentType, d.ContentEncoding, d.CorrelationId,
		d.ReplyTo, d.Expiration, d.MessageId, d.Type, d.UserId, d.AppId} {
		w.text(s)
	}
	w.h.Write([]byte{d.DeliveryMode, d.Priority})
	w.when(d.Timestamp)
	w.table(d.Headers, 0, redeliveryHeaders)
	w.bytes(d.Body)
	var key [32]byte
	w.h.Sum(key[:0])
	return key
}

// keyWriter writes values unambiguously: lengths before contents, a
// type tag (AMQP's field type) before each header value.
type keyWriter struct {
	h   hash.Hash
	buf [8]byte
}

// maxKeyDepth bounds the nesting followed (the client refuses more than
// 32 levels): deeper values are written as one tag.
const maxKeyDepth = 64

func (w *keyWriter) number(n uint64) {
	binary.BigEndian.PutUint64(w.buf[:], n)
	w.h.Write(w.buf[:])
}

func (w *keyWriter) text(s string) {
	w.number(uint64(len(s)))
	_, _ = io.WriteString(w.h, s)
}

func (w *keyWriter) bytes(b []byte) {
	w.number(uint64(len(b)))
	w.h.Write(b)
}

func (w *keyWriter) when(t time.Time) {
	if t.IsZero() {
		w.h.Write([]byte{0})
		return
	}
	w.h.Write([]byte{1})
	w.number(uint64(t.Unix()))
	w.number(uint64(t.Nanosecond()))
}

// table writes a header table in sorted key order, leaving out the keys
// named in skip (in any case).
func (w *keyWriter) table(t amqp.Table, depth int, skip []string) {
	keys := make([]string, 0, len(t))
	for k := range t {
		if !skipped(k, skip) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	w.number(uint64(len(keys)))
	for _, k := range keys {
		w.text(k)
		w.value(t[k], depth+1)
	}
}

func skipped(k string, skip []string) bool {
	for _, s := range skip {
		if strings.EqualFold(k, s) {
			return true
		}
	}
	return false
}

// value writes one header value with its type tag.
func (w *keyWriter) value(v interface{}, depth int) {
	if depth > maxKeyDepth {
		w.h.Write([]byte{'!'})
		return
	}
	switch v := v.(type) {
	case nil:
		w.h.Write([]byte{'V'})
	case bool:
		b := byte(0)
		if v {
			b = 1
		}
		w.h.Write([]byte{'t', b})
	case string:
		w.h.Write([]byte{'S'})
		w.text(v)
	case []byte:
		w.h.Write([]byte{'x'})
		w.bytes(v)
	case time.Time:
		w.h.Write([]byte{'T'})
		w.when(v)
	case amqp.Decimal:
		w.h.Write([]byte{'D', v.Scale})
		w.number(uint64(v.Value))
	case amqp.Table:
		w.h.Write([]byte{'F'})
		w.table(v, depth, nil)
	case map[string]interface{}:
		w.h.Write([]byte{'F'})
		w.table(v, depth, nil)
	case []interface{}:
		w.h.Write([]byte{'A'})
		w.number(uint64(len(v)))
		for _, e := range v {
			w.value(e, depth+1)
		}
	default:
		w.scalar(v)
	}
}

// scalar writes a number with its type tag; a type the client never
// decodes is written by its Go type and printed value.
func (w *keyWriter) scalar(v interface{}) {
	var tag byte
	var n uint64
	switch v := v.(type) {
	case int8:
		tag, n = 'b', uint64(v)
	case uint8:
		tag, n = 'B', uint64(v)
	case int16:
		tag, n = 's', uint64(v)
	case uint16:
		tag, n = 'u', uint64(v)
	case int32:
		tag, n = 'I', uint64(v)
	case uint32:
		tag, n = 'i', uint64(v)
	case int64:
		tag, n = 'l', uint64(v)
	case int:
		tag, n = 'L', uint64(v)
	case uint64:
		tag, n = 'U', v
	case float32:
		tag, n = 'f', uint64(math.Float32bits(v))
	case float64:
		tag, n = 'd', math.Float64bits(v)
	default:
		w.h.Write([]byte{'?'})
		w.text(fmt.Sprintf("%T", v))
		w.text(fmt.Sprintf("%v", v))
		return
	}
	w.h.Write([]byte{tag})
	w.number(n)
}
