package driver

import (
	"context"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when any goroutine the driver started
// (workers, settlers, timers) outlives them. Idle keep-alive connections
// of net/http's shared transport, which Lura's backend client uses, are
// the process's.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
	)
}

// testContext ends with the test. Lura's pipeline watches the context of
// a call until it ends, as the driver's dispatch context always does.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return ctx
}
