package driver

import (
	"context"
	"math"
	"sync"
	"time"
)

// Back-pressure: when the backend answers 429 or 503, or times out (a
// push-back), the whole agent slows down, by two means.
//
//   - An AIMD limit on dispatches in flight, between 1 and the workers:
//     halved on a push-back (at most once per pressureCooldown) and grown
//     by 1/limit on every other answer, as TCP grows its window. It
//     protects a backend that slows down under load.
//   - A pace, from the second cut of an episode: no more dispatches a
//     second than paceCut times what the backend took over the last
//     second (at least minPace), raised by a fiftieth (at least a tenth of
//     minPace) every 100 ms while the backend keeps up, and lifted after
//     releaseAfter without a push-back that counts. It protects a
//     backend that rejects fast (a rate limit), which the limit alone
//     cannot: one dispatch in flight may still be thousands a second.
//
// Push-backs count only while they are at least minPushedShare of the
// answers of the last second: a few stray 503s are no overload. To start
// holding back, they must be above that share by strayMargin standard
// deviations: over the few answers after a reconnect, chance alone often
// makes stray 503s a tenth. The rate the backend took is measured since
// the session's first answer when that is less than a second ago: the
// time without a connection is no measure of the backend. A healthy
// backend meets neither means: the limit stays at the workers and
// nothing is paced.
const (
	pressureCooldown = 200 * time.Millisecond
	minPushedShare   = 0.1
	strayMargin      = 4.0
	paceCut          = 0.9
	minPace          = 1.0 // dispatches a second
	releaseAfter     = 5 * time.Second
	windowBuckets    = 10
	bucketWidth      = 100 * time.Millisecond
	window           = windowBuckets * bucketWidth
)

// pressure holds the agent-wide back-pressure state.
type pressure struct {
	mu       sync.Mutex
	max      int
	limit    float64 // dispatches in flight
	inFlight int
	pace     float64 // dispatches a second; 0 when not paced
	next     time.Time
	// cut, pushed and raised are the last decrease, counted push-back
	// and pace increase; started is the session's first answer.
	cut, pushed, raised, started time.Time
	window                       [windowBuckets]bucket
	waiting                      int
	wake                         chan struct{}
	// pushedBack counts push-backs since the last report.
	pushedBack int64
	// onChange hears the agent start and stop holding back.
	onChange func(s pressureState, r result)
}

// bucket counts the answers of one bucketWidth: those the backend took
// and the push-backs.
type bucket struct {
	slot          int64 // the bucket's start, in bucketWidths since the epoch
	taken, pushed int
}

// pressureState is what the logs and metrics show.
type pressureState struct {
	limit int
	pace  float64
}

func newPressure(workers int, onChange func(pressureState, result)) *pressure {
	return &pressure{max: workers, limit: float64(workers), wake: make(chan struct{}), onChange: onChange}
}

// enter waits until a dispatch may start, or ctx ends; held, when set,
// is called once before the first wait.
func (p *pressure) enter(ctx context.Context, held func()) error {
	for {
		p.mu.Lock()
		now := time.Now()
		wait := p.admit(now)
		if wait == 0 {
			p.mu.Unlock()
			return nil
		}
		p.waiting++
		wake := p.wake
		p.mu.Unlock()
		if held != nil {
			held()
			held = nil
		}
		err := sleepOrWake(ctx, wake, wait)
		p.mu.Lock()
		p.waiting--
		p.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// admit starts a dispatch if the limit and the pace let it, and returns
// 0; else it returns how long to wait at most before trying again. p.mu
// is held.
func (p *pressure) admit(now time.Time) time.Duration {
	if p.inFlight >= int(p.limit) {
		return bucketWidth // until a dispatch ends, which wakes the waiters
	}
	if p.pace > 0 && now.Before(p.next) {
		return p.next.Sub(now)
	}
	p.inFlight++
	if p.pace > 0 {
		p.next = later(p.next, now).Add(time.Duration(float64(time.Second) / p.pace))
	}
	return 0
}

// sleepOrWake waits d, or until wake closes (a nil wake never does); it
// returns ctx's error if ctx ends first.
func sleepOrWake(ctx context.Context, wake <-chan struct{}, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-wake:
	case <-t.C:
	}
	return nil
}

// abandon ends a dispatch that enter let start but that did not run: no
// answer is counted.
func (p *pressure) abandon() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inFlight--
	p.wakeWaiters()
}

// wakeWaiters lets the waiting dispatches try again; p.mu is held.
func (p *pressure) wakeWaiters() {
	if p.waiting > 0 {
		close(p.wake)
		p.wake = make(chan struct{})
	}
}

// leave ends a dispatch with its answer, adjusting the limit and pace.
func (p *pressure) leave(r result) { p.leaveAt(r, time.Now()) }

func (p *pressure) leaveAt(r result, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inFlight--
	if p.started.IsZero() {
		p.started = now
	}
	wasHolding := p.holding()
	if r.pushedBack() {
		p.pushBack(now)
	} else {
		p.keepUp(now)
	}
	if holding := p.holding(); holding != wasHolding && p.onChange != nil {
		p.onChange(p.stateLocked(), r)
	}
	p.wakeWaiters()
}

// pushBack halves the limit and paces the agent below what the backend
// took, at most once per cooldown. The first cut of an episode only
// halves the limit: the backend's refusals may be faster than its
// answers, so what it took cannot be told yet.
func (p *pressure) pushBack(now time.Time) {
	p.pushedBack++
	p.bucket(now).pushed++
	taken, pushed := p.counts(now)
	if !p.overloaded(taken, pushed) {
		return
	}
	p.pushed = now
	if now.Sub(p.cut) < pressureCooldown {
		return
	}
	episode := !p.cut.IsZero() && now.Sub(p.cut) < releaseAfter
	p.cut = now
	p.limit = max(1, p.limit/2)
	if !episode {
		return
	}
	taken = p.rate(taken, now)
	if p.pace > 0 {
		taken = min(taken, p.pace)
	}
	p.pace = max(minPace, paceCut*taken)
}

// keepUp counts an answer the backend took and grows the limit and pace.
func (p *pressure) keepUp(now time.Time) {
	p.bucket(now).taken++
	p.limit = min(float64(p.max), p.limit+1/p.limit)
	switch {
	case p.pace == 0:
	case now.Sub(p.pushed) >= releaseAfter:
		p.pace = 0
	case now.Sub(p.raised) >= bucketWidth:
		p.raised = now
		p.pace += max(p.pace/50, minPace/10)
	}
}

// overloaded tells whether the push-backs are share enough of the
// answers to count: a tenth while the agent holds back; for it to start,
// at least three and clearly more than a tenth, so that stray push-backs
// among few answers do not slow it down.
func (p *pressure) overloaded(taken, pushed float64) bool {
	n := taken + pushed
	if p.holding() {
		return pushed >= minPushedShare*n
	}
	return pushed >= 3 && pushed > minPushedShare*n+strayMargin*math.Sqrt(minPushedShare*(1-minPushedShare)*n)
}

// holding tells whether the agent holds back; p.mu is held.
func (p *pressure) holding() bool { return int(p.limit) < p.max || p.pace > 0 }

// counts are the answers the backend took, and the push-backs, over the
// window.
func (p *pressure) counts(now time.Time) (taken, pushed float64) {
	oldest := now.UnixNano()/int64(bucketWidth) - windowBuckets + 1
	for _, b := range p.window {
		if b.slot >= oldest {
			taken, pushed = taken+float64(b.taken), pushed+float64(b.pushed)
		}
	}
	return taken, pushed
}

// restart begins a session: the answers of the last one, and the time
// without a connection, are no measure of what the backend takes now, so
// rates are measured from the session's first answer, and its first cut
// only halves the limit, as an episode's first does. The limit and the
// pace are kept: an overload outlasts a reconnect.
func (p *pressure) restart() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.started = time.Time{}
	p.window = [windowBuckets]bucket{}
	p.cut = time.Time{}
}

// rate turns a count over the window into a rate a second; since the
// session's first answer when that is more recent.
func (p *pressure) rate(count float64, now time.Time) float64 {
	return count / min(window, max(now.Sub(p.started), bucketWidth)).Seconds()
}

// bucket returns the bucket of now, emptied if it held an older slot.
func (p *pressure) bucket(now time.Time) *bucket {
	slot := now.UnixNano() / int64(bucketWidth)
	b := &p.window[slot%windowBuckets]
	if b.slot != slot {
		*b = bucket{slot: slot}
	}
	return b
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// state reads the limit and the pace.
func (p *pressure) state() pressureState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stateLocked()
}

func (p *pressure) stateLocked() pressureState {
	return pressureState{limit: int(p.limit), pace: p.pace}
}

// swapPushedBack reads the push-backs since the last call.
func (p *pressure) swapPushedBack() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.pushedBack
	p.pushedBack = 0
	return n
}
