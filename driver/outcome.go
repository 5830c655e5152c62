package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/luraproject/lura/v2/proxy"
)

// Acknowledger is the part of an amqp091 delivery that settles it; the
// seam that lets tests assert acks and nacks without a broker.
type Acknowledger interface {
	Ack(multiple bool) error
	Nack(multiple, requeue bool) error
}

// result is what the backend pipeline made of one message.
type result struct {
	ok     bool
	reason string
	// status is the backend's HTTP status when Lura exposes it, else 0.
	status int
	// kind classes a failure for metrics (OpenTelemetry's error.type):
	// timeout, http_status, incomplete, no_response, panic, too_large or
	// error.
	kind string
	// retryAfter is the wait the backend asked for with Retry-After; 0
	// when it asked none or Lura did not pass its headers on.
	retryAfter time.Duration
	// answer is what a reply carries of the backend's answer; nil when
	// the message gets no reply.
	answer *answer
}

// throttled tells whether the backend shed the message for lack of
// capacity (429 or 503) rather than refusing it.
func (r result) throttled() bool {
	return r.status == http.StatusTooManyRequests || r.status == http.StatusServiceUnavailable
}

// pushedBack tells whether the answer asks the agent to slow down: a
// 429, a 503 or a timeout.
func (r result) pushedBack() bool { return !r.ok && (r.throttled() || r.kind == "timeout") }

// Failures that dead-letter at once, never retried:
const (
	// kindTooLarge: a message over max_body_bytes.
	kindTooLarge = "too_large"
	// kindParked: a parked message back from its retry queue; its dead
	// letter is tried again.
	kindParked = "parked"
	// kindRefused: a message whose retry copy the broker keeps refusing.
	kindRefused = "copy_refused"
	// kindUnreadable: a message whose headers the client could not read.
	kindUnreadable = "unreadable"
)

// final tells whether a failure dead-letters at once.
func final(kind string) bool {
	return kind == kindTooLarge || kind == kindParked || kind == kindRefused || kind == kindUnreadable
}

// judge decides whether a pipeline answer means the message was handled.
// Only a 2xx counts: a complete answer with no error and, when Lura
// exposes the status (no-op encoding, error details), a 2xx one; or an
// error that carries a 2xx status. Acking anything else would lose the
// message. The statuses of several merged backends are not exposed, so a
// merge with an error is a failure.
func judge(resp *proxy.Response, err error) result {
	r := judged(resp, err)
	if !r.ok && resp != nil {
		r.retryAfter = retryAfter(resp.Metadata.Headers, time.Now())
	}
	return r
}

func judged(resp *proxy.Response, err error) result {
	switch {
	case err != nil:
		r := result{reason: err.Error(), status: statusOf(err), kind: "error"}
		if r.status >= 200 && r.status <= 299 {
			// A 2xx that Lura's status handler refuses (202, 204 under
			// an encoding other than no-op): the backend took it.
			return result{ok: true, status: r.status}
		}
		if r.reason == "" && r.status != 0 {
			r.reason = fmt.Sprintf("backend answered status %d", r.status)
		} else if r.reason == "" {
			r.reason = "the backend pipeline failed with no message"
		}
		if r.status != 0 {
			r.kind = "http_status"
		} else if errors.Is(err, context.DeadlineExceeded) {
			r.kind = "timeout"
		}
		return r
	case resp == nil:
		return result{reason: "the backend pipeline returned no response", kind: "no_response"}
	case !resp.IsComplete:
		return result{reason: "incomplete response: at least one backend failed", kind: "incomplete"}
	}
	if s := resp.Metadata.StatusCode; s != 0 && (s < 200 || s > 299) {
		return result{reason: fmt.Sprintf("backend answered status %d", s), status: s, kind: "http_status"}
	}
	return result{ok: true}
}

// maxRetryAfter bounds the Retry-After the driver reads: past it, the
// retry is capped by max_delay anyway.
const maxRetryAfter = 24 * time.Hour

// retryAfter reads a Retry-After header, in seconds or as an HTTP date,
// within [0, maxRetryAfter]. A value that is neither reads as 0: the
// backend is a trusted peer, but a garbled header is no reason to fail.
func retryAfter(headers map[string][]string, now time.Time) time.Duration {
	values := headers["Retry-After"]
	if len(values) == 0 {
		return 0
	}
	v := strings.TrimSpace(values[0])
	if secs, err := strconv.ParseUint(v, 10, 64); err == nil {
		return time.Duration(min(secs, uint64(maxRetryAfter/time.Second))) * time.Second
	}
	if at, err := http.ParseTime(v); err == nil {
		return min(max(at.Sub(now), 0), maxRetryAfter)
	}
	return 0
}

// discardBody drains and closes a no-op response body so that its HTTP
// connection goes back to the pool.
func discardBody(resp *proxy.Response) {
	if resp == nil || resp.Io == nil {
		return
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Io, 1<<20))
	if c, ok := resp.Io.(io.Closer); ok {
		_ = c.Close()
	}
}

// settle acks a handled message and nacks the others, requeueing them
// unless discard is set. It returns the broker-side error, if any: the
// channel may be gone, in which case the broker redelivers the message.
func settle(d Acknowledger, r result, discard bool) error {
	if r.ok {
		return d.Ack(false)
	}
	return d.Nack(false, !discard)
}
