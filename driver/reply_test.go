package driver

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/luraproject/lura/v2/proxy"
	"github.com/luraproject/lura/v2/transport/http/client"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
)

func replyAgent(r config.Reply) *Agent {
	r.Enabled = true
	if r.MaxBodyBytes == 0 {
		r.MaxBodyBytes = config.DefaultReplyMaxBodyBytes
	}
	return &Agent{opts: Options{Reply: r}}
}

func TestCheckReply(t *testing.T) {
	if err := CheckReply(config.Reply{Headers: []string{"Location", "X-Request-Id", "Content-Language"}}); err != nil {
		t.Errorf("ordinary headers refused: %v", err)
	}
	err := CheckReply(config.Reply{Headers: []string{"Location", "CC", "x-death", "X-First-Death-Queue", "X-Krakend-Status", "bcc"}})
	for _, want := range []string{"reply.headers[1]", "reply.headers[2]", "reply.headers[3]", "reply.headers[4]", "reply.headers[5]"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not name %s", err, want)
		}
	}
	if strings.Contains(err.Error(), "reply.headers[0]") {
		t.Errorf("Location refused: %v", err)
	}
}

// capture keeps, under no-op, the backend's status, its body within the
// bound, its content type and only the listed headers.
func TestCaptureNoOp(t *testing.T) {
	a := replyAgent(config.Reply{Headers: []string{"Location"}, MaxBodyBytes: 8})
	resp := &proxy.Response{IsComplete: true, Io: io.NopCloser(strings.NewReader(`{"ok":1}`)), Metadata: proxy.Metadata{
		StatusCode: 202, Headers: map[string][]string{"Content-Type": {"application/json"}, "Location": {"/x/1"}, "Cc": {"q"}, "X-Secret": {"s"}}}}
	ans := a.capture(resp, nil, judge(resp, nil))
	if ans.status != 202 || string(ans.body) != `{"ok":1}` || ans.contentType != "application/json" || ans.size != 0 {
		t.Errorf("answer %+v", ans)
	}
	if len(ans.headers) != 1 || ans.headers["Location"] != "/x/1" {
		t.Errorf("headers %v, want Location only", ans.headers)
	}

	resp.Io = io.NopCloser(strings.NewReader(`{"ok":12}`))
	ans = a.capture(resp, nil, judge(resp, nil))
	if ans.body != nil || ans.size != 9 {
		t.Errorf("over the bound: body %q, size %d", ans.body, ans.size)
	}
}

func TestCaptureDecodedAndErrors(t *testing.T) {
	a := replyAgent(config.Reply{})
	resp := &proxy.Response{IsComplete: true, Data: map[string]interface{}{"id": "7"}}
	if ans := a.capture(resp, nil, judge(resp, nil)); ans.status != 200 || string(ans.body) != `{"id":"7"}` || ans.contentType != "application/json" {
		t.Errorf("json answer %+v", ans)
	}
	err := client.HTTPResponseError{Code: 422, Msg: `{"error":"bad"}`, Enc: "application/json"}
	if ans := a.capture(nil, err, judge(nil, err)); ans.status != 422 || string(ans.body) != `{"error":"bad"}` {
		t.Errorf("return_error_code answer %+v", ans)
	}
	timeout := judge(nil, errors.New("context deadline exceeded"))
	timeout.kind = "timeout"
	if ans := a.capture(nil, errors.New("x"), timeout); ans.status != http.StatusGatewayTimeout || ans.body != nil {
		t.Errorf("timeout answer %+v", ans)
	}
	if ans := a.capture(nil, errors.New("dial tcp: refused"), judge(nil, errors.New("dial tcp: refused"))); ans.status != http.StatusBadGateway {
		t.Errorf("no status: %+v", ans)
	}
}

// A reply holds the answer, the status and the correlation id, and none
// of what the publisher set for the broker.
func TestReplyOf(t *testing.T) {
	a := replyAgent(config.Reply{MaxBodyBytes: 4})
	m := &message{d: &amqp.Delivery{
		MessageId: "m1", ReplyTo: "amq.gen-1", UserId: "guest", Expiration: "1", DeliveryMode: amqp.Persistent,
		Headers: amqp.Table{"CC": []interface{}{"victim"}, "x-death": "forged"},
	}}
	msg := a.replyOf(m, &answer{status: 201, body: []byte("ok"), contentType: "text/plain", headers: amqp.Table{"Location": "/1"}}, "")
	if msg.CorrelationId != "m1" || msg.ReplyTo != "" || msg.UserId != "" || msg.Expiration != "" || msg.MessageId != "" {
		t.Errorf("properties %+v", msg)
	}
	if len(msg.Headers) != 2 || msg.Headers[HeaderStatus] != int64(201) || msg.Headers["Location"] != "/1" {
		t.Errorf("headers %v", msg.Headers)
	}
	if string(msg.Body) != "ok" || msg.ContentType != "text/plain" || msg.DeliveryMode != amqp.Persistent {
		t.Errorf("body %q, content type %q, delivery mode %d", msg.Body, msg.ContentType, msg.DeliveryMode)
	}
	m.d.CorrelationId = "c1"
	msg = a.replyOf(m, &answer{status: 200, size: 10}, "")
	if msg.CorrelationId != "c1" || msg.Body != nil || !strings.Contains(msg.Headers[HeaderError].(string), "larger than reply.max_body_bytes (4)") {
		t.Errorf("over the bound: %+v", msg)
	}
}

// An error reply says what class of failure it was, never the pipeline's
// error text, which names backend hosts.
func TestPublicReason(t *testing.T) {
	for _, r := range []result{
		{reason: `Post "http://10.0.0.7:8080/orders": dial tcp: connection refused`, kind: "error"},
		{reason: `invalid status code 500 [POST /orders]: http://10.0.0.7:8080/orders`, status: 500, kind: "http_status"},
		{reason: "the backend pipeline panicked: http://10.0.0.7", kind: "panic"},
		{reason: "Post http://10.0.0.7: context deadline exceeded", kind: "timeout"},
	} {
		if got := publicReason(r); strings.Contains(got, "10.0.0.7") || got == "" {
			t.Errorf("publicReason(%q) = %q", r.reason, got)
		}
	}
	if got := publicReason(result{status: 503, kind: "http_status"}); got != "the backend answered 503" {
		t.Errorf("status reason %q", got)
	}
}

// An answer that is a CloudEvent in the HTTP binding's binary mode makes
// a reply that is the same event in the AMQP binding's: with cloudevents
// on, its ce- headers become cloudEvents: headers, percent-decoded.
func TestReplyEvent(t *testing.T) {
	a := replyAgent(config.Reply{})
	a.opts.CloudEvents = true
	h := map[string][]string{
		"Content-Type": {"application/json"}, "Ce-Specversion": {"1.0"}, "Ce-Id": {"r-1"},
		"Ce-Source": {"/quotes"}, "Ce-Type": {"com.example.quote"}, "Ce-Subject": {"ACME%20Corp"}, "Ce-Tenant": {"t1"},
		"X-Other": {"x"},
	}
	resp := &proxy.Response{IsComplete: true, Io: io.NopCloser(strings.NewReader(`{}`)), Metadata: proxy.Metadata{StatusCode: 200, Headers: h}}
	ans := a.capture(resp, nil, judge(resp, nil))
	want := amqp.Table{"cloudEvents:specversion": "1.0", "cloudEvents:id": "r-1", "cloudEvents:source": "/quotes",
		"cloudEvents:type": "com.example.quote", "cloudEvents:subject": "ACME Corp", "cloudEvents:tenant": "t1"}
	if len(ans.headers) != len(want) {
		t.Fatalf("headers %v, want %v", ans.headers, want)
	}
	for k, v := range want {
		if ans.headers[k] != v {
			t.Errorf("%s = %v, want %v", k, ans.headers[k], v)
		}
	}
	for name, bad := range map[string]map[string][]string{
		"no id":          {"Ce-Specversion": {"1.0"}, "Ce-Source": {"/q"}, "Ce-Type": {"t"}},
		"bad name":       {"Ce-Specversion": {"1.0"}, "Ce-Id": {"1"}, "Ce-Source": {"/q"}, "Ce-Type": {"t"}, "Ce-Bad_Name": {"x"}},
		"bad escape":     {"Ce-Specversion": {"1.0"}, "Ce-Id": {"%zz"}, "Ce-Source": {"/q"}, "Ce-Type": {"t"}},
		"control char":   {"Ce-Specversion": {"1.0"}, "Ce-Id": {"a%0Ab"}, "Ce-Source": {"/q"}, "Ce-Type": {"t"}},
		"other version":  {"Ce-Specversion": {"0.3"}, "Ce-Id": {"1"}, "Ce-Source": {"/q"}, "Ce-Type": {"t"}},
		"no ce- headers": {"Content-Type": {"text/plain"}},
	} {
		if got := replyEvent(bad); got != nil {
			t.Errorf("%s: reply event %v, want none", name, got)
		}
	}
	a.opts.CloudEvents = false
	if ans := a.capture(resp, nil, judge(resp, nil)); len(ans.headers) != 0 {
		t.Errorf("cloudevents off: headers %v", ans.headers)
	}
}
