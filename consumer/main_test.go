package consumer

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when a goroutine of a session (the
// return watcher, amqp091's readers) outlives them.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
