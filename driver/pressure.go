package driver

import (
	"context"
	"sync"
	"time"
)

// Back-pressure: when the backend answers 429 or 503, or times out, the
// whole agent slows down, by two means.
//
//   - An AIMD limit on dispatches in flight, between 1 and the workers:
//     halved on a push-back (at most once per pressureCooldown), grown by
//     1/limit on every other answer, as TCP grows its window. It protects
//     a backend that slows down under load.
//   - An admission ratio, as in the adaptive throttling of Google's SRE
//     book: while the last second holds a push-back, a dispatch starts
//     only if the attempts of that second, those in flight included,
//     stay under admitRatio times the answers the backend took, plus one.
//     It protects a backend that rejects fast (a rate limit), which the
//     limit alone cannot: one dispatch in flight may still be thousands
//     per second.
//
// A healthy backend sees neither: the limit stays at the workers and the
// ratio is not applied.
const (
	pressureCooldown = 200 * time.Millisecond
	admitRatio       = 1.1
	windowBuckets    = 10
	bucketWidth      = 100 * time.Millisecond
)

// pressure holds the agent-wide back-pressure state.
type pressure struct {
	mu       sync.Mutex
	max      int
	limit    float64
	inFlight int
	cut      time.Time
	window   [windowBuckets]bucket
	waiting  int
	wake     chan struct{}
	// pushedBack counts push-backs since the last report.
	pushedBack int64
	// onChange hears the limit leave or come back to max.
	onChange func(limit int, r result)
}

// bucket counts the answers of one bucketWidth of time.
type bucket struct {
	slot                    int64 // the bucket's start, in bucketWidths since the epoch
	answers, taken, refused int
}

func newPressure(workers int, onChange func(int, result)) *pressure {
	return &pressure{max: workers, limit: float64(workers), wake: make(chan struct{}), onChange: onChange}
}

// enter waits until a dispatch may start, or ctx ends.
func (p *pressure) enter(ctx context.Context) error {
	for {
		p.mu.Lock()
		if p.opens(time.Now()) {
			p.inFlight++
			p.mu.Unlock()
			return nil
		}
		p.waiting++
		wake := p.wake
		p.mu.Unlock()
		err := p.sleep(ctx, wake)
		p.mu.Lock()
		p.waiting--
		p.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// opens tells whether a dispatch may start now; p.mu is held.
func (p *pressure) opens(now time.Time) bool { return p.inFlight < int(p.limit) && p.admits(now) }

// sleep waits for a dispatch to end or the window to move on.
func (p *pressure) sleep(ctx context.Context, wake <-chan struct{}) error {
	t := time.NewTimer(bucketWidth)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-wake:
	case <-t.C:
	}
	return nil
}

// leave ends a dispatch with its answer, adjusting the limit.
func (p *pressure) leave(r result) { p.leaveAt(r, time.Now()) }

func (p *pressure) leaveAt(r result, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inFlight--
	b := p.bucket(now)
	b.answers++
	before := int(p.limit)
	if r.pushedBack() {
		b.refused++
		p.pushedBack++
		if now.Sub(p.cut) >= pressureCooldown {
			p.limit, p.cut = max(1, p.limit/2), now
		}
	} else {
		b.taken++
		p.limit = min(float64(p.max), p.limit+1/p.limit)
	}
	if after := int(p.limit); after != before && (before == p.max || after == p.max) && p.onChange != nil {
		p.onChange(after, r)
	}
	if p.waiting > 0 {
		close(p.wake)
		p.wake = make(chan struct{})
	}
}

// admits applies the admission ratio; p.mu is held.
func (p *pressure) admits(now time.Time) bool {
	var answers, taken, refused int
	oldest := now.UnixNano()/int64(bucketWidth) - windowBuckets + 1
	for _, b := range p.window {
		if b.slot >= oldest {
			answers, taken, refused = answers+b.answers, taken+b.taken, refused+b.refused
		}
	}
	return refused == 0 || float64(answers+p.inFlight) < admitRatio*float64(taken)+1
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

// current reads the limit.
func (p *pressure) current() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return int(p.limit)
}

// swapPushedBack reads the push-backs since the last call.
func (p *pressure) swapPushedBack() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.pushedBack
	p.pushedBack = 0
	return n
}
