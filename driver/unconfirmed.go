package driver

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// A retry copy whose publish failed without a certain answer (the
// connection was cut before the broker's confirm) may or may not be in
// its retry queue. Its message goes back to the work queue, so the broker
// may now hold two messages with the same content: the message and the
// copy, each of which the backend would get. The agent takes them as one
// group: each retry copy carries an id of its own (HeaderCopyID), and
// once a failed copy's message goes back to the queue, the copy's id and
// the message's fingerprint name the group.
//
// The first member of a group the agent receives is handled as any
// message; every member received after it is acked without a dispatch.
// That loses nothing: the first member is not acked before its handling
// is done (2xx, or a confirmed copy of its own, or a dead letter), and
// if it goes back to the queue it is still in the group. A copy is
// matched by its id alone, which nothing else carries, and only on a
// copy back from the agent's own retry queue; a message by its
// fingerprint, only when redelivered: two such messages are the same
// message to the backend.

// HeaderCopyID names one retry copy, for the group of its message.
const HeaderCopyID = "x-krakend-copy-id"

// maxUnconfirmed bounds the unconfirmed copies remembered of one message
// (a held message makes one per try).
const maxUnconfirmed = 16

// lostCopy is a retry copy whose confirm was lost: its id, and the
// content it carries (contentKey).
type lostCopy struct {
	id      string
	content [32]byte
}

// member of a group by its copy id.
type copyMember struct {
	g       *group
	content [32]byte
}

// group is a message and its copies whose confirm was lost.
type group struct {
	claimed bool // a member is being handled
	done    bool // a member was handled
	at      time.Time
}

// unconfirmed is the agent's groups, by copy id and by the fingerprint
// of a member that went back to the queue. It is safe for concurrent use.
type unconfirmed struct {
	prefix string // makes the agent's copy ids unique
	serial atomic.Uint64
	ttl    time.Duration
	most   int
	now    func() time.Time
	size   atomic.Int64 // entries of both maps: read without the lock
	mu     sync.Mutex
	byCopy map[string]copyMember
	byKey  map[[32]byte][]*group
}

// newUnconfirmed keeps a group for leftoverTTL past the longest retry
// delay, the latest its copy comes back.
func newUnconfirmed(prefetch int, longest time.Duration) *unconfirmed {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &unconfirmed{prefix: hex.EncodeToString(b[:]), ttl: leftoverTTL + longest, most: max(4*prefetch, minLeftovers),
		now: time.Now, byCopy: map[string]copyMember{}, byKey: map[[32]byte][]*group{}}
}

// newID names a copy.
func (u *unconfirmed) newID() string {
	return u.prefix + "-" + strconv.FormatUint(u.serial.Add(1), 10)
}

// copyLost records a copy of m whose publish failed: unless the broker
// refused it, it may exist.
func (m *message) copyLost(id string, err error) {
	if id == "" || permanent(err) {
		return // refused by the broker: it does not exist
	}
	if len(m.unconfirmed) == maxUnconfirmed {
		m.unconfirmed = m.unconfirmed[1:]
	}
	m.unconfirmed = append(m.unconfirmed, lostCopy{id: id, content: contentKey(m)})
}

// contentKey is the fingerprint of a message as its publisher sent it,
// the same for a message and for its retry copies once back: where it
// was first published, its body, its properties but the expiration (a
// copy carries none) and its headers but the driver's. A copy whose
// headers were dropped to fit a frame differs: it is then dispatched.
func contentKey(m *message) [32]byte {
	v := *m.d
	v.Exchange, v.RoutingKey, v.Expiration = m.exchange, m.key, ""
	v.Headers = make(amqp.Table, len(m.d.Headers))
	for k, val := range m.d.Headers {
		if !driverHeader(k) {
			v.Headers[k] = val
		}
	}
	return fingerprint(&v)
}

// member tells whether a delivery is a member of a group that another
// member claimed or finished; when it is the first, it claims the group.
// A copy is found by its id and its content, so that a forged copy id
// can only name a copy of the same message; a member that went back to
// the queue, by its fingerprint once redelivered.
func (u *unconfirmed) member(m *message) (skip bool) {
	if u.size.Load() == 0 {
		return false
	}
	id := ""
	if m.retried {
		id, _ = m.raw.Headers[HeaderCopyID].(string)
	}
	if id == "" && !m.raw.Redelivered {
		return false
	}
	var content, key [32]byte
	if id != "" {
		content = contentKey(m)
	}
	if m.raw.Redelivered {
		key = m.fingerprint()
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	var g *group
	if c, ok := u.byCopy[id]; ok && id != "" && c.content == content {
		g = c.g
		delete(u.byCopy, id)
		u.size.Add(-1)
	} else if m.raw.Redelivered {
		g = u.takeKey(key)
	}
	if g == nil || !g.at.After(u.now().Add(-u.ttl)) {
		return false
	}
	if g.claimed || g.done {
		return true
	}
	g.claimed = true
	m.group = g
	return false
}

// takeKey finds and forgets the oldest group of a fingerprint.
func (u *unconfirmed) takeKey(key [32]byte) *group {
	list := u.byKey[key]
	if len(list) == 0 {
		return nil
	}
	if len(list) == 1 {
		delete(u.byKey, key)
	} else {
		u.byKey[key] = list[1:]
	}
	u.size.Add(-1)
	return list[0]
}

// settled records the fate of a message that is a member of a group or
// left copies that may exist: handled, its group is done; back to the
// queue, it is a member that may come again.
func (u *unconfirmed) settled(m *message, handled bool) {
	if m.group == nil && len(m.unconfirmed) == 0 {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	g := m.group
	if g == nil {
		g = &group{}
	}
	g.claimed, g.done, g.at = false, g.done || handled, u.now()
	for _, c := range m.unconfirmed {
		u.byCopy[c.id] = copyMember{g: g, content: c.content}
		u.size.Add(1)
	}
	if !handled && m.raw != nil {
		key := m.fingerprint()
		u.byKey[key] = append(u.byKey[key], g)
		u.size.Add(1)
	}
	m.group, m.unconfirmed = nil, nil
	u.trim()
}

// trim forgets the groups past their time, then all of them if still
// over the bound: forgetting can only cost a duplicate.
func (u *unconfirmed) trim() {
	if u.size.Load() <= int64(u.most) {
		return
	}
	cutoff := u.now().Add(-u.ttl)
	for id, c := range u.byCopy {
		if !c.g.at.After(cutoff) {
			delete(u.byCopy, id)
			u.size.Add(-1)
		}
	}
	for key, list := range u.byKey {
		kept := list[:0]
		for _, g := range list {
			if g.at.After(cutoff) {
				kept = append(kept, g)
			}
		}
		u.size.Add(int64(len(kept) - len(list)))
		if len(kept) == 0 {
			delete(u.byKey, key)
		} else {
			u.byKey[key] = kept
		}
	}
	if u.size.Load() > int64(u.most) {
		clear(u.byCopy)
		clear(u.byKey)
		u.size.Store(0)
	}
}

// settledInGroup acks, without a dispatch, a message whose group another
// member handles or handled; it tells whether it did.
func (a *Agent) settledInGroup(f *flow, m *message) bool {
	if a.unconfirmed == nil || m.raw == nil || !a.unconfirmed.member(m) {
		return false
	}
	a.stats.leftovers.Add(1)
	a.log.Debug(fmt.Sprintf("message %q: the same message as one handled since a cut lost the confirm of its retry copy: "+
		"acked, not dispatched again", shortID(m.raw)))
	m.outcome = OutcomeAcked
	f.settler.settle(m, true, false, OutcomeAcked)
	return true
}

// grouped records the fate of a message for its group, if any.
func (a *Agent) grouped(m *message, handled bool) {
	if a.unconfirmed != nil {
		a.unconfirmed.settled(m, handled)
	}
}
