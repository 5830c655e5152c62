package driver

import (
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/krakend-contrib/async-amqp/config"
)

// stats counts, between two reports, what the log summarises.
type stats struct {
	failed         atomic.Int64 // failed dispatches
	lastReason     atomic.Value // string
	unsettled      atomic.Int64 // acks/nacks refused by a closed channel
	leftovers      atomic.Int64 // redeliveries handled before a cut, not dispatched again
	deadLettered   atomic.Int64
	lastDeadLetter atomic.Value // string
	exhausted      atomic.Int64 // out of attempts with no dead-letter set
	copyFailed     atomic.Int64 // retry or dead-letter copies not confirmed
	lastCopyError  atomic.Value // string
	unreplied      atomic.Int64 // replies that did not reach their caller
	lastUnreplied  atomic.Value // string
}

// report logs, at most once per health interval, how many dispatches
// failed, instead of one line per message.
func (a *Agent) report() {
	if n := a.stats.failed.Swap(0); n > 0 {
		reason, _ := a.stats.lastReason.Load().(string)
		action := "requeued"
		if a.ownsRetries() {
			action = "scheduled for a retry or dead-lettered"
		}
		if a.opts.NackDiscard {
			action = "discarded (nack_discard)"
		}
		if a.opts.Session.AutoAck {
			action = "not requeued (auto_ack)"
		}
		a.log.Warning(fmt.Sprintf("%d messages failed and were %s; last failure: %s", n, action, reason))
	}
	if n := a.stats.deadLettered.Swap(0); n > 0 {
		reason, _ := a.stats.lastDeadLetter.Load().(string)
		a.log.Warning(fmt.Sprintf("%d messages dead-lettered to %s; last reason: %s", n, a.deadLetterName(), reason))
	}
	if n := a.stats.exhausted.Swap(0); n > 0 {
		a.log.Error(fmt.Sprintf("%d messages used their %d attempts and no dead_letter is configured: they are kept and retried every %s",
			n, a.opts.Retry.MaxAttempts, a.opts.Retry.MaxDelay))
	}
	if n := a.stats.copyFailed.Swap(0); n > 0 {
		reason, _ := a.stats.lastCopyError.Load().(string)
		a.log.Error(fmt.Sprintf("%d copies to a retry or dead-letter queue could not be made; %d messages are held unacknowledged, "+
			"not dispatched again, until their copy is made; last error: %s", n, a.metrics.heldNow(), reason))
	}
	if n := a.stats.unreplied.Swap(0); n > 0 {
		last, _ := a.stats.lastUnreplied.Load().(string)
		a.log.Warning(fmt.Sprintf("%d replies did not reach their caller; last: %s", n, last))
	}
	if p := a.pressure; p != nil {
		// Stray push-backs that do not slow the agent down are no cause
		// for a warning.
		switch n, s := p.swapPushedBack(), p.state(); {
		case s.limit < a.opts.Workers || s.pace > 0:
			a.log.Warning(fmt.Sprintf("back-pressure: %d answers pushed back (429, 503, timeout); %s", n, a.holdingBack(s)))
		case n > 0:
			a.log.Debug(fmt.Sprintf("%d answers pushed back (429, 503, timeout), too few to hold back for", n))
		}
	}
	if n := a.stats.unsettled.Swap(0); n > 0 {
		a.log.Warning(n, "acks/nacks were refused on a closed channel; the broker redelivers those messages")
	}
	if n := a.stats.leftovers.Swap(0); n > 0 {
		a.log.Info(fmt.Sprintf("%d messages were settled without a dispatch: handled before a connection cut lost their ack, "+
			"or the same as a message handled since a cut lost the confirm of its retry copy", n))
	}
}

func (a *Agent) deadLetterName() string {
	switch d := a.opts.DeadLetter; {
	case d.Queue != "":
		return fmt.Sprintf("queue %q", d.Queue)
	case d.Exchange != "":
		return fmt.Sprintf("exchange %q", d.Exchange)
	}
	return "the queue's own dead-letter exchange"
}

// onBlocked hears the broker block and unblock the publishing
// connection (a memory or disk alarm): copies wait meanwhile, consuming
// and acks go on.
func (a *Agent) onBlocked(blocked bool, reason string) {
	a.metrics.onBlocked(blocked)
	if blocked {
		a.log.Warning(fmt.Sprintf("the broker blocks publishing (%s): retry and dead-letter copies wait until it lifts the alarm", reason))
		return
	}
	a.log.Info("the broker unblocked publishing")
}

// onPressure hears the agent start and stop holding back.
func (a *Agent) onPressure(s pressureState, r result) {
	if s.limit < a.opts.Workers || s.pace > 0 {
		a.log.Warning(fmt.Sprintf("the backend pushes back (%s): %s until it keeps up", pushBackReason(r), a.holdingBack(s)))
		return
	}
	a.log.Info(fmt.Sprintf("the backend keeps up again: %d dispatches may run at once, not paced", s.limit))
}

// holdingBack says how the agent holds back.
func (a *Agent) holdingBack(s pressureState) string {
	line := fmt.Sprintf("%d of %d dispatches may run at once", s.limit, a.opts.Workers)
	if s.pace > 0 {
		line += fmt.Sprintf(", at most %.1f a second", s.pace)
	}
	return line
}

func pushBackReason(r result) string {
	if r.status != 0 {
		return fmt.Sprintf("status %d", r.status)
	}
	return "timeout"
}

// pressureState is the back-pressure state, for the metrics.
func (a *Agent) pressureState() pressureState {
	if a.pressure == nil {
		return pressureState{limit: a.opts.Workers}
	}
	return a.pressure.state()
}

// ping tells the gateway the agent is alive. It never blocks: a missed
// ping is followed by the next one.
func (a *Agent) ping() {
	if a.opts.Ping == nil {
		return
	}
	select {
	case a.opts.Ping <- a.opts.Name:
	default:
	}
}

// topologyLine says what the session declared or checked.
func (a *Agent) topologyLine() string {
	t := a.opts.Session.Topology
	var line string
	switch t.Mode {
	case config.TopologyPassive:
		line = fmt.Sprintf("topology checked: exchange %q and queue %q exist", t.Exchange, t.Queue)
	case config.TopologyNone:
		line = fmt.Sprintf("topology not declared: using the existing queue %q", t.Queue)
	default:
		line = fmt.Sprintf("topology declared: %s exchange %q, queue %q, %d binding(s)", t.ExchangeType, t.Exchange, t.Queue, len(t.RoutingKeys))
	}
	if n := len(a.opts.Session.RetryDelays); n > 0 {
		line += fmt.Sprintf(", %d retry queue(s)", n)
	}
	if d := a.opts.Session.DeadLetterQueue; d != "" {
		line += fmt.Sprintf(", dead-letter queue %q", d)
	}
	return line
}

// OneLine keeps a joined error (one line per problem or broker URL) on
// one log line, its parts separated by "; ".
func OneLine(v interface{}) string { return strings.ReplaceAll(fmt.Sprint(v), "\n", "; ") }
