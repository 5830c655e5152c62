package clustertest

import (
	"fmt"
	"strconv"
	"strings"
)

// Quorum are the arguments of a quorum queue.
var Quorum = map[string]interface{}{"x-queue-type": "quorum"}

// QueueRow is what list_queues shows of one queue.
type QueueRow struct {
	Type, Leader   string
	Ready, Unacked int
	Consumers      int
}

// Queues lists the queues whose name starts with prefix, asking the
// first running node. A quorum queue's counters come from its leader's
// Raft state and lag the deliveries: poll them, never read them once.
func (c *Cluster) Queues(prefix string) (map[string]QueueRow, error) {
	var errs []error
	for _, n := range c.Up() {
		rows, err := n.Rows("list_queues", "--no-table-headers",
			"name", "type", "leader", "messages_ready", "messages_unacknowledged", "consumers")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out := map[string]QueueRow{}
		for _, f := range rows {
			if len(f) != 6 || !strings.HasPrefix(f[0], prefix) {
				continue
			}
			out[f[0]] = QueueRow{Type: f[1], Leader: f[2], Ready: atoi(f[3]), Unacked: atoi(f[4]), Consumers: atoi(f[5])}
		}
		return out, nil
	}
	return nil, fmt.Errorf("no running node listed the queues: %v", errs)
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

// Leader is the node that leads the quorum queue, or nil when no node
// does (an election is under way).
func (c *Cluster) Leader(queue string) (*Node, error) {
	queues, err := c.Queues(queue)
	if err != nil {
		return nil, err
	}
	q, ok := queues[queue]
	if !ok {
		return nil, fmt.Errorf("queue %q not found", queue)
	}
	for _, n := range c.Nodes {
		if n.Name == q.Leader {
			return n, nil
		}
	}
	return nil, nil
}
