//go:build cluster

package clustertest

import (
	"os"
	"path/filepath"
	"testing"
)

// TestNodesEndWithTheTest: when the test that started a cluster ends,
// none of its processes is left and its data is gone.
func TestNodesEndWithTheTest(t *testing.T) {
	var c *Cluster
	t.Run("start", func(t *testing.T) {
		c = Start(t, 1)
		if !c.Nodes[0].Running() {
			t.Fatal("the node does not run")
		}
	})
	if left := processes(func(run string) bool { return run == c.run }); len(left) > 0 {
		t.Errorf("processes %v of run %s outlived its test", left, c.run)
	}
	if _, err := os.Stat(c.dir); !os.IsNotExist(err) {
		t.Errorf("%s is still there (%v)", c.dir, err)
	}
}

// TestSweepEndsOrphanedRuns: the nodes of a run whose test process is
// gone are killed, and their data removed, by the next start's sweep.
func TestSweepEndsOrphanedRuns(t *testing.T) {
	c := Start(t, 1)
	writeFile(t, filepath.Join(c.dir, "owner"), "0") // as if its process were gone
	sweep()
	if left := processes(func(run string) bool { return run == c.run }); len(left) > 0 {
		t.Errorf("processes %v of the orphaned run %s survived the sweep", left, c.run)
	}
	if _, err := os.Stat(c.dir); !os.IsNotExist(err) {
		t.Errorf("%s is still there (%v)", c.dir, err)
	}
}
