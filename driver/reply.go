package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/luraproject/lura/v2/proxy"
	"github.com/luraproject/lura/v2/transport/http/client"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// A reply is the driver's own message, like a copy: it goes to the
// message's reply_to through the default exchange, with the gateway's
// credentials, so it is built from an allow-list. It carries the
// backend's status, the body and content type of its answer, the answer
// headers the operator listed, and the message's correlation id: nothing
// the publisher or the backend sets can route it elsewhere or make the
// broker act on it. The publisher chooses reply_to, so only the names
// reply.to allows are answered.

// Headers of a reply.
const (
	// HeaderStatus is the backend's HTTP status; on an error reply, the
	// status of the failure (502 when the backend gave none, 504 for a
	// timeout).
	HeaderStatus = "x-krakend-status"
	// HeaderError says, on an error reply, why the message was given up.
	HeaderError = "x-krakend-error"
)

// Outcomes of a reply, the values of the replies counter's outcome.
const (
	ReplySent       = "sent"       // the answer to a handled message, confirmed
	ReplyErrorSent  = "error_sent" // an error reply to a message given up on, confirmed
	ReplyUnroutable = "unroutable" // no queue took it: the caller is gone
	ReplyRefused    = "refused"    // reply_to is not one reply.to allows
	ReplyLost       = "lost"       // the broker refused it or did not confirm it
)

var replyOutcomes = []string{ReplySent, ReplyErrorSent, ReplyUnroutable, ReplyRefused, ReplyLost}

// answer is what a reply carries of the backend's answer.
type answer struct {
	status          int
	contentType     string
	contentEncoding string
	headers         amqp.Table
	body            []byte
	// size is non-zero when the body is over reply.max_body_bytes: it
	// is not sent.
	size int
}

// replyTo is where a message's reply goes, "" when it gets none: replies
// off, no reply_to, or one reply.to does not allow.
func (a *Agent) replyTo(m *message) string {
	if a.opts.Reply.Answers(m.d.ReplyTo) {
		return m.d.ReplyTo
	}
	return ""
}

// capture keeps what a reply needs of a pipeline answer, before its body
// is drained.
func (a *Agent) capture(resp *proxy.Response, err error, r result) *answer {
	ans := &answer{status: replyStatus(r)}
	if resp != nil && resp.Metadata.StatusCode != 0 {
		ans.status = resp.Metadata.StatusCode
	}
	switch {
	case resp != nil && resp.Io != nil: // encoding no-op: the answer as is
		// One byte past the bound tells a body over it (dropped below);
		// discardBody drains the rest.
		ans.body, _ = io.ReadAll(io.LimitReader(resp.Io, int64(a.opts.Reply.MaxBodyBytes)+1))
		ans.contentType = http.Header(resp.Metadata.Headers).Get("Content-Type")
		ans.contentEncoding = http.Header(resp.Metadata.Headers).Get("Content-Encoding")
		ans.headers = a.answerHeaders(resp.Metadata.Headers)
		if a.opts.CloudEvents {
			for k, v := range replyEvent(resp.Metadata.Headers) {
				ans.headers[k] = v
			}
		}
	case resp != nil && resp.Data != nil: // decoded by Lura: sent as JSON
		body, merr := json.Marshal(resp.Data)
		if merr == nil {
			ans.body, ans.contentType = body, "application/json"
		}
	default:
		var withBody client.HTTPResponseError // return_error_code
		if errors.As(err, &withBody) {
			ans.body, ans.contentType = []byte(withBody.Msg), withBody.Enc
		}
	}
	if n := len(ans.body); n > a.opts.Reply.MaxBodyBytes {
		ans.body, ans.size = nil, n
	}
	return ans
}

// replyStatus is the status a reply reports for a dispatch result.
func replyStatus(r result) int {
	switch {
	case r.status != 0:
		return r.status
	case r.ok:
		return http.StatusOK
	case r.kind == "timeout":
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

// answerHeaders copies the answer headers reply.headers lists, under the
// names written there; values are cleaned as request headers are.
func (a *Agent) answerHeaders(h map[string][]string) amqp.Table {
	names := a.opts.Reply.Headers
	t := amqp.Table{}
	for _, name := range names {
		if v := http.Header(h).Values(name); len(v) > 0 {
			t[name] = truncate(cleanValue(strings.Join(v, ", ")), 4096)
		}
	}
	return t
}

// reply publishes the answer to a handled message, or an error reply
// (failure set) to one given up on, and waits for the broker's confirm.
// It counts and returns the outcome; lost is a reply the broker did not
// confirm for a reason that may pass (a closed channel, a timeout).
func (a *Agent) reply(ctx context.Context, pub publisher, m *message, ans *answer, failure string) (outcome string, err error) {
	to := m.d.ReplyTo
	if !a.opts.Reply.Enabled || to == "" {
		return "", nil
	}
	if !a.opts.Reply.Answers(to) {
		a.noteUnreplied(m, fmt.Sprintf("reply_to %q is not one reply.to allows", truncate(to, 255)))
		a.metrics.onReplied(ReplyRefused)
		return ReplyRefused, nil
	}
	msg := a.replyOf(m, ans, failure)
	pctx, cancel := copyContext(ctx, m)
	defer cancel()
	err = pub.Publish(pctx, "", to, fit(pub, msg))
	switch {
	case err == nil && failure == "":
		outcome = ReplySent
	case err == nil:
		outcome = ReplyErrorSent
	case errors.Is(err, consumer.ErrUnroutable):
		outcome = ReplyUnroutable
		a.noteUnreplied(m, fmt.Sprintf("no queue %q: the caller is gone", truncate(to, 255)))
	default:
		outcome = ReplyLost
		a.noteUnreplied(m, fmt.Sprintf("the broker did not take the reply to %q: %s", truncate(to, 255), OneLine(err)))
	}
	a.metrics.onReplied(outcome)
	return outcome, err
}

// kindReplyLost is a handled message whose reply the broker did not
// confirm: it is retried like a failed dispatch, so that its caller gets
// an answer (the backend sees it again).
const kindReplyLost = "reply_lost"

// replySuccess replies to a handled message before it is acked. A reply
// lost for a reason that may pass turns the result into a failure, so
// the message is retried rather than acked unanswered; an unroutable or
// refused one does not: its caller is gone, or was never to be answered.
func (a *Agent) replySuccess(ctx context.Context, pub publisher, m *message, r result) result {
	if !a.opts.Reply.Enabled || m.d.ReplyTo == "" {
		return r
	}
	ans := r.answer
	if ans == nil {
		ans = &answer{status: replyStatus(r)}
	}
	outcome, err := a.reply(ctx, pub, m, ans, "")
	if outcome != ReplyLost || permanent(err) || a.opts.Session.AutoAck {
		return r
	}
	return result{reason: "its reply was not confirmed: " + OneLine(err), kind: kindReplyLost}
}

// replyFailure sends an error reply to a message given up on, when
// reply.errors is on. It never holds the message back: a reply that
// fails is counted and logged, and the message is settled all the same.
func (a *Agent) replyFailure(m *message, pub publisher) {
	if !a.opts.Reply.Errors || m.d.ReplyTo == "" {
		return
	}
	ans := m.last.answer
	if ans == nil {
		ans = &answer{status: replyStatus(m.last)}
	}
	_, _ = a.reply(context.Background(), pub, m, ans, publicReason(m.last))
}

// replyOf builds a reply from the allow-list: the answer, the status, the
// correlation id, and nothing else of the message.
func (a *Agent) replyOf(m *message, ans *answer, failure string) amqp.Publishing {
	h := amqp.Table{}
	for k, v := range ans.headers {
		h[k] = v
	}
	h[HeaderStatus] = int64(ans.status)
	body := ans.body
	if ans.size > 0 {
		failure = fmt.Sprintf("the answer is larger than reply.max_body_bytes (%d): no body sent", a.opts.Reply.MaxBodyBytes)
	}
	if failure != "" {
		h[HeaderError] = truncate(failure, 1024)
	}
	id := m.d.CorrelationId
	if id == "" {
		id = m.d.MessageId
	}
	return amqp.Publishing{
		Headers: h, ContentType: ans.contentType, ContentEncoding: ans.contentEncoding,
		CorrelationId: id, DeliveryMode: m.d.DeliveryMode, Timestamp: time.Now().UTC().Truncate(time.Second), Body: body,
	}
}

// noteUnreplied records a reply that did not reach its caller, for the
// periodic report: one line per health interval, not one per message.
func (a *Agent) noteUnreplied(m *message, why string) {
	a.stats.unreplied.Add(1)
	a.stats.lastUnreplied.Store(fmt.Sprintf("message %q: %s", shortID(m.d), why))
}

// publicReason says why a message was given up in words fit for its
// caller, who may be anyone able to publish: the class of the failure,
// never the pipeline's own error text (it names backend hosts and paths).
func publicReason(r result) string {
	switch r.kind {
	case "http_status":
		return fmt.Sprintf("the backend answered %d", r.status)
	case "timeout":
		return "the backend did not answer in time"
	case "incomplete":
		return "a backend of several failed"
	case kindTooLarge, kindUnreadable:
		return "the message cannot be sent to the backend: " + r.reason
	case kindRefused, kindParked:
		return "the message could not be retried"
	}
	return "the backend pipeline failed"
}

// CheckReply refuses reply headers a reply must not carry: one RabbitMQ
// or a plugin acts on (CC, BCC, x-death...), or one of the driver's own.
func CheckReply(r config.Reply) error {
	var errs []error
	for i, name := range r.Headers {
		if interpreted(name) || driverHeader(name) {
			errs = append(errs, &config.FieldError{Field: fmt.Sprintf("reply.headers[%d]", i), Reason: fmt.Sprintf(
				"%q is a header RabbitMQ acts on or one of the driver's own (x-krakend-*): a reply never carries it", name)})
		}
	}
	return errors.Join(errs...)
}
