package driver

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/textproto"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/luraproject/lura/v2/proxy"
	amqp "github.com/rabbitmq/amqp091-go"
)

// Request header names carrying the AMQP metadata to the backend.
const (
	HeaderRoutingKey    = "X-Amqp-Routing-Key"
	HeaderExchange      = "X-Amqp-Exchange"
	HeaderRedelivered   = "X-Amqp-Redelivered"
	HeaderMessageID     = "X-Amqp-Message-Id"
	HeaderCorrelationID = "X-Amqp-Correlation-Id"
	HeaderReplyTo       = "X-Amqp-Reply-To"
	HeaderType          = "X-Amqp-Type"
	HeaderAppID         = "X-Amqp-App-Id"
	HeaderUserID        = "X-Amqp-User-Id"
	HeaderTimestamp     = "X-Amqp-Timestamp"
	// HeaderAttempt is the number of this dispatch of the message: 1
	// the first time, 2 after one failure, and so on.
	HeaderAttempt = "X-Amqp-Attempt"
	// HeaderDeliveryCount is a quorum queue's count of the earlier
	// deliveries of this copy of the message (x-delivery-count), sent
	// on a redelivery only.
	HeaderDeliveryCount = "X-Amqp-Delivery-Count"
	// HeaderPrefix precedes the name of every AMQP message header.
	HeaderPrefix = "X-Amqp-Header-"
)

// placeholders are the names a backend url_pattern may use, e.g.
// "/events/{routing_key}". Lura title-cases the first letter of a param
// name, and so do we.
var placeholders = []string{"routing_key", "exchange", "message_id", "correlation_id", "redelivered"}

// Placeholders lists the names a backend url_pattern may use, each
// between braces: {routing_key}, {exchange}, {message_id},
// {correlation_id}, {redelivered}.
func Placeholders() []string { return slices.Clone(placeholders) }

// newRequest turns a delivery into the request the backend pipeline sees.
// The body is the message body untouched. Params are filled only when a
// url_pattern uses them: with none, Lura's path builder has nothing to
// replace.
func newRequest(m *message, params bool) *proxy.Request {
	d := m.d
	h := make(map[string][]string, 8+len(d.Headers))
	h["Content-Length"] = []string{strconv.Itoa(len(d.Body))}
	set := func(name, value string) {
		if value != "" {
			h[name] = []string{cleanValue(value)}
		}
	}
	exchange, key := m.exchange, m.key
	set("Content-Type", d.ContentType)
	set("Content-Encoding", d.ContentEncoding)
	set(HeaderRoutingKey, key)
	set(HeaderExchange, exchange)
	set(HeaderAttempt, strconv.Itoa(m.attempt()))
	set(HeaderRedelivered, strconv.FormatBool(d.Redelivered))
	if m.deliveries > 0 {
		set(HeaderDeliveryCount, strconv.FormatInt(m.deliveries, 10))
	}
	set(HeaderMessageID, d.MessageId)
	set(HeaderCorrelationID, d.CorrelationId)
	set(HeaderReplyTo, d.ReplyTo)
	set(HeaderType, d.Type)
	set(HeaderAppID, d.AppId)
	set(HeaderUserID, d.UserId)
	if !d.Timestamp.IsZero() {
		set(HeaderTimestamp, d.Timestamp.UTC().Format(time.RFC3339))
	}
	for k, v := range d.Headers {
		if strings.HasPrefix(k, internalPrefix) || m.event.carries(k) {
			continue
		}
		// Two keys may clean to one name: keep both values.
		if value := formatValue(v); value != "" {
			name := HeaderPrefix + cleanName(k)
			h[name] = append(h[name], cleanValue(value))
		}
	}
	if e := m.event; e != nil && !e.structured {
		e.ceHeaders(h)
	}
	req := &proxy.Request{Method: "POST", Body: io.NopCloser(bytes.NewReader(d.Body)), Headers: h}
	if params {
		req.Params = map[string]string{
			"Routing_key":    pathParam(key),
			"Exchange":       pathParam(exchange),
			"Message_id":     pathParam(d.MessageId),
			"Correlation_id": pathParam(d.CorrelationId),
			"Redelivered":    strconv.FormatBool(d.Redelivered),
		}
	}
	return req
}

// UsesParams tells whether a url_pattern, as rewritten by URLPattern,
// has placeholders to fill.
func UsesParams(pattern string) bool { return strings.Contains(pattern, "{{.") }

// pathParam escapes a value for one path segment. "." and ".." are
// escaped too, so that a publisher cannot steer the backend path.
func pathParam(v string) string {
	switch v {
	case ".":
		return "%2E"
	case "..":
		return "%2E%2E"
	}
	return url.PathEscape(v)
}

// formatValue renders an AMQP table value as header text. Nested tables
// and arrays become JSON.
func formatValue(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	case []byte:
		return string(x)
	case time.Time:
		return x.UTC().Format(time.RFC3339)
	case amqp.Decimal:
		return decimalString(x)
	case amqp.Table, []interface{}:
		b, err := json.Marshal(x)
		if err != nil {
			return fmt.Sprint(x)
		}
		return string(b)
	}
	return fmt.Sprint(v)
}

func decimalString(d amqp.Decimal) string {
	s := strconv.FormatInt(int64(d.Value), 10)
	if d.Scale == 0 {
		return s
	}
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	for len(s) <= int(d.Scale) {
		s = "0" + s
	}
	s = s[:len(s)-int(d.Scale)] + "." + s[len(s)-int(d.Scale):]
	if neg {
		s = "-" + s
	}
	return s
}

// cleanName keeps an AMQP header key a valid HTTP token: any other byte
// becomes '-'. The result is in canonical MIME form.
func cleanName(k string) string {
	b := []byte(k)
	for i, c := range b {
		if !isTokenByte(c) {
			b[i] = '-'
		}
	}
	return textproto.CanonicalMIMEHeaderKey(string(b))
}

func isTokenByte(c byte) bool {
	return c < 0x80 && (c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0)
}

// cleanValue replaces control characters, which net/http refuses in a
// header value and which would otherwise fail the dispatch forever.
func cleanValue(v string) string {
	clean := true
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			clean = false
			break
		}
	}
	if clean {
		return v
	}
	b := []byte(v)
	for i, c := range b {
		if (c < 0x20 && c != '\t') || c == 0x7f {
			b[i] = ' '
		}
	}
	return string(b)
}

var placeholder = regexp.MustCompile(`\{\{\.([^{}]*)\}\}|\{([^{}]*)\}`)

// URLPattern rewrites the placeholders of a backend url_pattern, written
// as {routing_key}, into the form Lura's request builder fills in
// ({{.Routing_key}}). Unknown placeholders are an error that lists the
// known ones.
func URLPattern(pattern string) (string, error) {
	known := map[string]bool{}
	for _, p := range placeholders {
		known[p] = true
	}
	var unknown []string
	out := placeholder.ReplaceAllStringFunc(pattern, func(m string) string {
		sub := placeholder.FindStringSubmatch(m)
		name := sub[2]
		if sub[1] != "" {
			name = strings.ToLower(sub[1][:1]) + sub[1][1:]
		}
		if !known[name] {
			unknown = append(unknown, m)
			return m
		}
		return "{{." + strings.ToUpper(name[:1]) + name[1:] + "}}"
	})
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return pattern, fmt.Errorf("unknown placeholder %s in %q; an async agent offers {%s}",
			strings.Join(unknown, ", "), pattern, strings.Join(placeholders, "}, {"))
	}
	return out, nil
}

// idempotencyKey is a key stable across the redeliveries and retries of
// one message, for a backend to drop the duplicates that at-least-once
// delivery brings: the message_id when the publisher set one, else a
// digest of where the message was first published and of its body (the
// driver restores that origin on its retry copies). A CloudEvent has its
// own key, its source and id.
func idempotencyKey(m *message) string {
	if m.event != nil {
		return m.event.idempotencyKey()
	}
	if m.d.MessageId != "" {
		return cleanValue(m.d.MessageId)
	}
	h := sha256.New()
	for _, part := range [][]byte{[]byte(m.exchange), []byte(m.key), m.d.Body} {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(part)))
		h.Write(n[:])
		h.Write(part)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
