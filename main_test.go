package asyncamqp_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the tests when a goroutine outlives them: an agent's
// workers, settler or session that Run left behind. Idle keep-alive
// connections of net/http's shared transport, which Lura's backend client
// uses, are the process's, not an agent's.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
	)
}
