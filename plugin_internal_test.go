package asyncamqp

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/luraproject/lura/v2/logging"
)

func TestWarnIdleConns(t *testing.T) {
	saved := http.DefaultTransport
	defer func() { http.DefaultTransport = saved }()
	for _, tc := range []struct {
		idle, workers int
		warn          bool
	}{
		{0, 2, false}, {0, 3, true}, {250, 64, false}, {10, 16, true},
	} {
		http.DefaultTransport = &http.Transport{MaxIdleConnsPerHost: tc.idle}
		buf := &bytes.Buffer{}
		logger, _ := logging.NewLogger("WARNING", buf, "")
		warnIdleConns(logger, "[x]", tc.workers)
		if got := strings.Contains(buf.String(), "fewer than consumer.workers"); got != tc.warn {
			t.Errorf("idle %d, workers %d: warned %t, want %t: %q", tc.idle, tc.workers, got, tc.warn, buf.String())
		}
	}
}

func TestJitterStrategiesAreRebuiltSafely(t *testing.T) {
	for _, name := range []string{"linear-jitter", "Exponential-Jitter"} {
		f := backoffFor(name, nil)
		if f == nil {
			t.Fatalf("%s: no strategy", name)
		}
		done := make(chan struct{})
		for range 4 { // concurrent agents backing off: -race must stay quiet
			go func() {
				defer func() { done <- struct{}{} }()
				for i := 1; i < 200; i++ {
					_ = f(i % 20)
				}
			}()
		}
		for range 4 {
			<-done
		}
		for i := 1; i <= 5; i++ {
			base := map[string]time.Duration{"linear-jitter": time.Duration(i) * time.Second, "Exponential-Jitter": time.Duration(1<<i) * time.Second}[name]
			got := f(i)
			if got < base*2/3-time.Millisecond || got > base*4/3+time.Millisecond {
				t.Errorf("%s(%d) = %s, want within a third of %s", name, i, got, base)
			}
		}
	}
	if backoffFor("linear", nil) != nil {
		t.Error("a plain strategy must stay Lura's")
	}
}
