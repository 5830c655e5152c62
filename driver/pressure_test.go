package driver

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"
)

// tryEnter starts a dispatch at now if the limit and the ratio let it.
func (p *pressure) tryEnter(now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.opens(now) {
		return false
	}
	p.inFlight++
	return true
}

var (
	answered  = result{ok: true}
	tooMany   = result{reason: "429", status: http.StatusTooManyRequests, kind: "http_status"}
	timedOut  = result{reason: "deadline", kind: "timeout"}
	refused   = result{reason: "500", status: http.StatusInternalServerError, kind: "http_status"}
	epochTime = time.Unix(1_800_000_000, 0)
)

func TestPressureHealthyBackendIsNeverHeld(t *testing.T) {
	p := newPressure(4, nil)
	now := epochTime
	for i := range 1000 {
		for range 4 {
			if !p.tryEnter(now) {
				t.Fatalf("round %d: a dispatch was held with a healthy backend", i)
			}
		}
		if p.tryEnter(now) {
			t.Fatal("a fifth dispatch started with 4 workers")
		}
		for range 4 {
			r := answered
			if i%3 == 0 {
				r = refused // a 500 is an answer, not a push-back
			}
			p.leaveAt(r, now)
		}
		now = now.Add(time.Millisecond)
	}
	if got := p.current(); got != 4 {
		t.Errorf("limit %d, want 4", got)
	}
}

func TestPressureHalvesOncePerCooldownAndGrowsBack(t *testing.T) {
	var changes []int
	p := newPressure(16, func(limit int, _ result) { changes = append(changes, limit) })
	now := epochTime
	// A burst of push-backs within one cooldown halves the limit once.
	for range 16 {
		p.tryEnter(now)
	}
	for range 16 {
		p.leaveAt(timedOut, now)
	}
	if got := p.current(); got != 8 {
		t.Fatalf("limit %d after one burst, want 8", got)
	}
	for i := range 6 {
		now = now.Add(pressureCooldown)
		p.tryEnter(now)
		p.leaveAt(tooMany, now)
		if i == 5 && p.current() != 1 {
			t.Fatalf("limit %d, want the floor of 1", p.current())
		}
	}
	// Answers grow it back, by about one per limit's worth of answers.
	now = now.Add(2 * time.Second) // the push-backs leave the window
	for n := 1; p.current() < 16; n++ {
		if !p.tryEnter(now) {
			t.Fatalf("answer %d: held at limit %d with nothing in flight", n, p.current())
		}
		p.leaveAt(answered, now)
		if n > 16*16 {
			t.Fatalf("limit %d after %d answers", p.current(), n)
		}
	}
	if len(changes) != 2 || changes[0] != 8 || changes[1] != 16 {
		t.Errorf("state changes %v, want [8 16]: leaving the workers, and coming back", changes)
	}
}

// While the backend takes nothing, nothing is sent until its push-backs
// are a second old; ctx ends a wait.
func TestPressureProbesADeadBackend(t *testing.T) {
	p := newPressure(8, nil)
	now := epochTime
	for range 8 {
		p.tryEnter(now)
	}
	for range 8 {
		p.leaveAt(tooMany, now)
	}
	if p.tryEnter(now.Add(500 * time.Millisecond)) {
		t.Error("a dispatch started while every answer of the last second was a push-back")
	}
	// Once they have left it, the limit (halved once) lets dispatches
	// through again.
	later := now.Add(windowBuckets * bucketWidth)
	for i := range 4 {
		if !p.tryEnter(later) {
			t.Fatalf("dispatch %d held once the push-backs left the window", i+1)
		}
	}
	if p.tryEnter(later) {
		t.Error("a fifth dispatch beside the limit of 4")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := p.enter(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("enter = %v, want the context's error", err)
	}
}

// A backend that takes n requests a second and answers 429 to the rest,
// fast: once the agent has adapted, attempts stay within 1.2 n a second
// and the backend stays busy. Simulated time: the figures do not depend
// on the machine.
func TestPressureKeepsAttemptsNearARateLimit(t *testing.T) {
	const (
		workers = 16
		rate    = 200 // the backend's admitted requests per second
		seconds = 20
		step    = 100 * time.Microsecond
	)
	p := newPressure(workers, nil)
	type call struct {
		end time.Time
		r   result
	}
	var calls []call
	tokens, refilled := float64(rate)/10, epochTime
	attempts, taken := make([]int, seconds), make([]int, seconds)
	for now := epochTime; now.Before(epochTime.Add(seconds * time.Second)); now = now.Add(step) {
		kept := calls[:0]
		for _, c := range calls {
			if c.end.After(now) {
				kept = append(kept, c)
				continue
			}
			p.leaveAt(c.r, now)
		}
		calls = kept
		tokens = min(float64(rate)/10, tokens+now.Sub(refilled).Seconds()*rate)
		refilled = now
		for len(calls) < workers && p.tryEnter(now) {
			sec := int(now.Sub(epochTime) / time.Second)
			attempts[sec]++
			if tokens >= 1 {
				tokens--
				taken[sec]++
				calls = append(calls, call{now.Add(5 * time.Millisecond), answered})
			} else {
				calls = append(calls, call{now.Add(step), tooMany})
			}
		}
	}
	for sec := 5; sec < seconds; sec++ {
		if attempts[sec] > rate*12/10 {
			t.Errorf("second %d: %d attempts, want at most %d (1.2 × %d)", sec, attempts[sec], rate*12/10, rate)
		}
		if taken[sec] < rate*8/10 {
			t.Errorf("second %d: the backend took %d, want at least %d of its %d", sec, taken[sec], rate*8/10, rate)
		}
	}
	t.Logf("attempts per second: %v", attempts)
	t.Logf("taken per second:    %v", taken)
}
