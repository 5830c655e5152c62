package asyncamqp

import (
	"bytes"
	"net/http"
	"strings"
	"testing"

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
