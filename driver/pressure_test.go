package driver

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
)

// tryEnter starts a dispatch at now if the limit and the pace let it.
func (p *pressure) tryEnter(now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.admit(now) == 0
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
	if s := p.state(); s.limit != 4 || s.pace != 0 {
		t.Errorf("state %+v, want a limit of 4 and no pace", s)
	}
}

// A few stray 503s among many answers are no overload: the agent does not
// slow down for them.
func TestPressureIgnoresStrayPushBacks(t *testing.T) {
	p := newPressure(8, nil)
	now := epochTime
	for i := range 20_000 {
		p.tryEnter(now)
		r := answered
		if i%20 == 0 { // 5% of the answers
			r = result{reason: "503", status: http.StatusServiceUnavailable, kind: "http_status"}
		}
		p.leaveAt(r, now)
		now = now.Add(time.Millisecond)
	}
	if s := p.state(); s.limit != 8 || s.pace != 0 {
		t.Errorf("state %+v after 5%% stray 503s, want the full limit and no pace", s)
	}
}

func TestPressureHalvesOncePerCooldownAndGrowsBack(t *testing.T) {
	var changes []pressureState
	p := newPressure(16, func(s pressureState, _ result) { changes = append(changes, s) })
	now := epochTime
	// A burst of push-backs within one cooldown halves the limit once.
	for range 16 {
		p.tryEnter(now)
	}
	for range 16 {
		p.leaveAt(timedOut, now)
	}
	if s := p.state(); s.limit != 8 || s.pace != 0 {
		t.Fatalf("state %+v after one burst, want a limit of 8 and no pace yet", s)
	}
	for range 5 {
		now = now.Add(pressureCooldown)
		p.leaveAt(tooMany, now)
	}
	if s := p.state(); s.limit != 1 || s.pace != minPace {
		t.Fatalf("state %+v, want the floor of 1 and, with nothing taken, the least pace", s)
	}
	// Answers grow it back, and the pace is lifted once no push-back
	// came for releaseAfter.
	for n := 1; p.state().limit < 16 || p.state().pace > 0; n++ {
		now = now.Add(10 * time.Millisecond)
		p.inFlight++
		p.leaveAt(answered, now)
		if n > 10_000 {
			t.Fatalf("state %+v after %d answers", p.state(), n)
		}
	}
	if now.Sub(epochTime) < releaseAfter {
		t.Errorf("the pace was lifted %s after the last push-back, sooner than %s", now.Sub(epochTime), releaseAfter)
	}
	if len(changes) != 2 || changes[0].limit != 8 || changes[1].limit != 16 || changes[1].pace != 0 {
		t.Errorf("state changes %+v, want two: holding back at 8, then free at 16", changes)
	}
}

// While the backend takes nothing, the agent probes it at minPace; ctx
// ends a wait.
func TestPressureProbesADeadBackend(t *testing.T) {
	p := newPressure(8, nil)
	now := epochTime
	for range 8 {
		p.tryEnter(now)
	}
	for range 8 {
		p.leaveAt(tooMany, now)
	}
	now = now.Add(pressureCooldown)
	if !p.tryEnter(now) {
		t.Fatal("no dispatch after the first cut")
	}
	p.leaveAt(tooMany, now)
	if !p.tryEnter(now) {
		t.Fatal("no probe at all")
	}
	p.leaveAt(tooMany, now)
	if p.tryEnter(now.Add(900 * time.Millisecond)) {
		t.Error("a second probe within a second")
	}
	if !p.tryEnter(now.Add(time.Second)) {
		t.Error("no probe a second later")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := p.enter(ctx, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("enter = %v, want the context's error", err)
	}
}

// A backend that takes `rate` requests a second and answers 429 to the
// rest, fast: after the first 5 s, attempts stay within 1.2 times the
// rate every second and the backend is kept busy. Simulated time: the figures do
// not depend on the machine.
func TestPressureKeepsAttemptsNearARateLimit(t *testing.T) {
	for _, rate := range []int{5, 50, 200, 2000} {
		attempts, taken := simulateRateLimit(rate, 16, 30)
		took := 0
		for sec := 5; sec < len(attempts); sec++ {
			if attempts[sec] > rate*12/10+1 {
				t.Errorf("rate %d, second %d: %d attempts, want at most 1.2 × %d", rate, sec, attempts[sec], rate)
			}
			took += taken[sec]
		}
		if want := rate * (len(taken) - 5) * 8 / 10; took < want {
			t.Errorf("rate %d: the backend took %d after the first 5 s, want at least 0.8 of its rate, %d", rate, took, want)
		}
		t.Logf("rate %d: attempts per second %v", rate, attempts)
		t.Logf("rate %d: taken per second    %v", rate, taken)
	}
}

// simulateRateLimit runs an agent of workers against a token bucket of
// rate a second (burst rate/10) answering 429 in 0.1 ms and 200 in 5 ms.
func simulateRateLimit(rate, workers, seconds int) (attempts, taken []int) {
	const step = 100 * time.Microsecond
	p := newPressure(workers, nil)
	type call struct {
		end time.Time
		r   result
	}
	var calls []call
	burst := max(float64(rate)/10, 1)
	tokens, refilled := burst, epochTime
	attempts, taken = make([]int, seconds), make([]int, seconds)
	for now := epochTime; now.Before(epochTime.Add(time.Duration(seconds) * time.Second)); now = now.Add(step) {
		kept := calls[:0]
		for _, c := range calls {
			if c.end.After(now) {
				kept = append(kept, c)
				continue
			}
			p.leaveAt(c.r, now)
		}
		calls = kept
		tokens = min(burst, tokens+now.Sub(refilled).Seconds()*float64(rate))
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
	return attempts, taken
}

// Stray 503s, 5% of the answers, right after reconnects: over the few
// answers of a new session they are often a tenth by chance, but the
// agent keeps its full speed.
func TestPressureIgnoresStrayPushBacksAfterReconnects(t *testing.T) {
	p := newPressure(16, nil)
	rnd := rand.New(rand.NewSource(1))
	now := epochTime
	for session := range 100 {
		p.restart()
		for i := range 300 {
			p.tryEnter(now)
			r := answered
			if rnd.Float64() < 0.05 {
				r = result{reason: "503", status: http.StatusServiceUnavailable, kind: "http_status"}
			}
			p.leaveAt(r, now)
			if s := p.state(); s.limit != 16 || s.pace != 0 {
				t.Fatalf("session %d, answer %d: state %+v, want the full limit and no pace", session, i, s)
			}
			now = now.Add(time.Millisecond)
		}
		now = now.Add(time.Second) // the reconnect
	}
}

// A real overload that outlasts a reconnect: the pace is what the
// backend took since the new session began, not that spread over a
// second that was mostly without a connection.
func TestPressurePacesFromWhatTheNewSessionTook(t *testing.T) {
	p := newPressure(16, nil)
	now := epochTime
	for range 16 {
		p.tryEnter(now)
		p.leaveAt(tooMany, now)
	}
	now = now.Add(time.Second)
	p.restart()
	// The backend takes 100 a second and refuses nine in ten.
	for i := 1; p.state().pace == 0; i++ {
		now = now.Add(time.Millisecond)
		r := tooMany
		if i%10 == 0 {
			r = answered
		}
		p.inFlight++
		p.leaveAt(r, now)
		if i > 1000 {
			t.Fatal("no pace after a second of overload")
		}
	}
	if pace := p.state().pace; pace < 50 || pace > 100 {
		t.Errorf("pace %.1f a second, want about 0.9 × the 100 the backend takes", pace)
	}
}

// The report warns about back-pressure only while the agent holds back:
// stray push-backs that do not slow it down are logged at DEBUG.
func TestPressureReportWarnsOnlyWhileHoldingBack(t *testing.T) {
	logs := &bytes.Buffer{}
	logger, _ := logging.NewLogger("DEBUG", logs, "")
	a := mustNew(Options{Name: "report", Workers: 16, Timeout: time.Second, Logger: logger, BackPressure: true})
	a.pressure.inFlight++
	a.pressure.leave(result{reason: "503", status: http.StatusServiceUnavailable, kind: "http_status"})
	a.report()
	if strings.Contains(logs.String(), "WARNING") || !strings.Contains(logs.String(), "1 answers pushed back") {
		t.Errorf("one stray 503: logs %q, want a DEBUG line and no warning", logs.String())
	}
	logs.Reset()
	a.pressure.limit = 8
	a.report()
	if !strings.Contains(logs.String(), "WARNING") || !strings.Contains(logs.String(), "8 of 16 dispatches") {
		t.Errorf("holding back: logs %q, want a warning", logs.String())
	}
}
