package driver

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"mime"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"
)

// With the cloudevents option, a message that is a valid CloudEvent under
// the CloudEvents AMQP protocol binding reaches the backend as the same
// event under the HTTP protocol binding: in binary mode its attributes
// become ce-* headers, in structured mode the JSON body goes as it is.
// Anything else, including an event that breaks a rule of the spec, is a
// plain message, sent as it would be without the option. Every value is
// publisher input: what is read is bounded, and what is written is valid
// HTTP.

const (
	// ceStructured is the media type of the JSON event format, the one
	// structured format the driver reads.
	ceStructured = "application/cloudevents+json"
	// ceMediaPrefix starts every CloudEvents media type: another format,
	// or a batch, is passed on as it is.
	ceMediaPrefix = "application/cloudevents"
	// ceHeaderPrefix precedes an attribute's name in the request headers.
	ceHeaderPrefix = "ce-"
	// The AMQP binding's two prefixes of an attribute in the application
	// properties (the AMQP headers table).
	cePrefixColon      = "cloudEvents:"
	cePrefixUnderscore = "cloudEvents_"
	// Bounds on what is read of one event; past them it is a plain
	// message. An attribute's canonical string stays under the 8 KiB a
	// header line may take in common servers, even percent-encoded.
	maxEventAttributes = 64
	maxAttributeBytes  = 2048
	maxEventBytes      = 16 << 10
	maxStructuredBytes = 1 << 20
	// ceDataContentType is carried by Content-Type, never as a ce-
	// header.
	ceDataContentType = "datacontenttype"
)

// textAttributes are the core attributes whose value must arrive as
// text; time may also arrive as an AMQP timestamp.
var textAttributes = map[string]bool{
	"specversion": true, "id": true, "source": true, "type": true,
	"subject": true, "dataschema": true, "time": true, ceDataContentType: true,
}

// event is a message read as a valid CloudEvent.
type event struct {
	// structured: the body is the JSON event, passed as it is.
	structured bool
	// prefix is the one every attribute header of a binary event has.
	prefix string
	// attributes are the canonical strings of the attributes that are
	// set, datacontenttype included.
	attributes map[string]string
	// size sums the attributes' lengths.
	size int
}

// readEvent reads a delivery as a CloudEvent. It returns nil and no
// error for a message that does not claim to be one (no attribute
// header, no structured content type), and an error saying why for one
// that claims to be but is not valid.
func readEvent(d *amqp.Delivery) (*event, error) {
	media := mediaType(d.ContentType)
	switch {
	case media == ceStructured:
		return readStructured(d.Body)
	case strings.HasPrefix(media, ceMediaPrefix):
		return nil, nil
	}
	return readBinary(d)
}

// mediaType is a content type without its parameters, in lower case.
func mediaType(contentType string) string {
	media, _, _ := strings.Cut(contentType, ";")
	return strings.ToLower(strings.TrimSpace(media))
}

// readBinary reads an event in binary mode: attributes in headers named
// with one of the binding's prefixes, datacontenttype in content_type.
func readBinary(d *amqp.Delivery) (*event, error) {
	e := &event{attributes: map[string]string{}}
	for k, v := range d.Headers {
		prefix, name, ok := attributeHeader(k)
		if !ok {
			continue
		}
		if e.prefix != "" && e.prefix != prefix {
			return nil, errors.New("its headers mix the cloudEvents: and cloudEvents_ prefixes")
		}
		e.prefix = prefix
		if err := e.add(name, func() (string, bool, error) { return amqpAttribute(name, v) }); err != nil {
			return nil, fmt.Errorf("header %q: %w", truncate(k, 64), err)
		}
	}
	if e.prefix == "" {
		return nil, nil
	}
	if err := e.takeContentType(d.ContentType); err != nil {
		return nil, err
	}
	return e.valid()
}

// carries tells whether an AMQP header is one of a binary event's
// attributes, sent as a ce- header (or the Content-Type) and so not
// again as an X-Amqp-Header-*; a nil event carries none.
func (e *event) carries(k string) bool {
	return e != nil && !e.structured && strings.HasPrefix(k, e.prefix)
}

// attributeHeader splits an AMQP header key into a binding prefix and
// an attribute name.
func attributeHeader(k string) (prefix, name string, ok bool) {
	for _, p := range []string{cePrefixColon, cePrefixUnderscore} {
		if strings.HasPrefix(k, p) {
			return p, k[len(p):], true
		}
	}
	return "", "", false
}

// takeContentType makes the message's content_type the datacontenttype,
// as the binding says. A datacontenttype header is read only when
// content_type is unset, and must agree with it otherwise.
func (e *event) takeContentType(contentType string) error {
	header, inHeader := e.attributes[ceDataContentType]
	switch {
	case contentType == "":
		return nil
	case inHeader && header != contentType:
		return errors.New("its content_type and its datacontenttype header differ")
	case !inHeader:
		if err := checkString(contentType); err != nil {
			return fmt.Errorf("content_type: %w", err)
		}
		return e.set(ceDataContentType, contentType)
	}
	return nil
}

// add reads one attribute, its name checked first; an unset one
// (void, null) is left out.
func (e *event) add(name string, read func() (string, bool, error)) error {
	if !validAttributeName(name) {
		return errors.New("not a CloudEvents attribute name (lower-case letters and digits, not \"data\")")
	}
	s, set, err := read()
	if err != nil || !set {
		return err
	}
	return e.set(name, s)
}

// set records an attribute's canonical string, within the bounds.
func (e *event) set(name, s string) error {
	switch {
	case len(e.attributes) >= maxEventAttributes:
		return fmt.Errorf("more than %d attributes", maxEventAttributes)
	case len(s) > maxAttributeBytes:
		return fmt.Errorf("a value of %d bytes, over %d", len(s), maxAttributeBytes)
	case e.size+len(s) > maxEventBytes:
		return fmt.Errorf("attributes of more than %d bytes in all", maxEventBytes)
	}
	if _, twice := e.attributes[name]; twice {
		return errors.New("the attribute is set twice")
	}
	e.attributes[name] = s
	e.size += len(s)
	return nil
}

// validAttributeName: lower-case ASCII letters and digits, at least one,
// and not "data", which the event formats reserve.
func validAttributeName(name string) bool {
	if name == "" || name == "data" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// amqpAttribute is the canonical string of an attribute that arrived as
// an AMQP table value; set is false for a void value (unset).
func amqpAttribute(name string, v interface{}) (s string, set bool, err error) {
	_, isText := v.(string)
	_, isTime := v.(time.Time)
	if textAttributes[name] && v != nil && !isText && !(name == "time" && isTime) {
		return "", false, fmt.Errorf("a %s, where CloudEvents wants text", amqpType(v))
	}
	switch x := v.(type) {
	case nil:
		return "", false, nil
	case string:
		return x, true, checkString(x)
	case bool:
		return strconv.FormatBool(x), true, nil
	case time.Time:
		return x.UTC().Format(time.RFC3339), true, nil
	case []byte:
		if len(x) > maxAttributeBytes {
			return "", false, fmt.Errorf("binary of %d bytes, over %d", len(x), maxAttributeBytes)
		}
		return base64.StdEncoding.EncodeToString(x), true, nil
	case amqp.Decimal:
		return decimalString(x), true, nil
	case float32:
		return floatString(float64(x), 32)
	case float64:
		return floatString(x, 64)
	}
	if n, ok := integer(v); ok {
		return strconv.FormatInt(n, 10), true, nil
	}
	return "", false, fmt.Errorf("a %s has no CloudEvents type", amqpType(v))
}

// floatString writes a float as decimal text; NaN and infinities have
// none.
func floatString(f float64, bits int) (string, bool, error) {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return "", false, errors.New("a float that is not a number")
	}
	return strconv.FormatFloat(f, 'f', -1, bits), true, nil
}

// amqpType names a table value's type for a log line.
func amqpType(v interface{}) string {
	switch v.(type) {
	case amqp.Table:
		return "table"
	case []interface{}:
		return "array"
	case []byte:
		return "byte array"
	case time.Time:
		return "timestamp"
	case nil:
		return "void"
	}
	return fmt.Sprintf("%T", v)
}

// checkString holds text to the CloudEvents String type: valid UTF-8,
// no control characters and no noncharacters. It is checked before the
// length bound only for what fits it.
func checkString(s string) error {
	if len(s) > maxAttributeBytes {
		return fmt.Errorf("text of %d bytes, over %d", len(s), maxAttributeBytes)
	}
	if !utf8.ValidString(s) {
		return errors.New("text that is not valid UTF-8")
	}
	for _, r := range s {
		if r < 0x20 || r >= 0x7f && r <= 0x9f || r >= 0xfdd0 && r <= 0xfdef || r&0xfffe == 0xfffe {
			return fmt.Errorf("text with the character %U, which CloudEvents forbids", r)
		}
	}
	return nil
}

// valid returns the event when it is valid, else why it is not.
func (e *event) valid() (*event, error) {
	if err := e.validate(); err != nil {
		return nil, err
	}
	return e, nil
}

// validate checks the attributes an event must have and the form of the
// core ones.
func (e *event) validate() error {
	a := e.attributes
	if v := a["specversion"]; v != "1.0" {
		return fmt.Errorf("specversion %q, not \"1.0\"", truncate(v, 16))
	}
	for _, name := range []string{"id", "source", "type"} {
		if strings.TrimSpace(a[name]) == "" {
			return fmt.Errorf("no %s", name)
		}
	}
	if s, ok := a["subject"]; ok && strings.TrimSpace(s) == "" {
		return errors.New("an empty subject")
	}
	if _, err := url.Parse(a["source"]); err != nil {
		return errors.New("a source that is not a URI reference")
	}
	if s, ok := a["dataschema"]; ok {
		if u, err := url.Parse(s); err != nil || !u.IsAbs() {
			return errors.New("a dataschema that is not an absolute URI")
		}
	}
	if s, ok := a["time"]; ok {
		if _, err := time.Parse(time.RFC3339Nano, s); err != nil {
			return errors.New("a time that is not an RFC 3339 timestamp")
		}
	}
	if s, ok := a[ceDataContentType]; ok {
		if media, _, err := mime.ParseMediaType(s); err != nil || !strings.Contains(media, "/") {
			return errors.New("a datacontenttype that is not a media type")
		}
	}
	return nil
}

// readStructured reads an event in structured mode: the body is the
// event in the JSON format.
func readStructured(body []byte) (*event, error) {
	if len(body) > maxStructuredBytes {
		return nil, fmt.Errorf("a structured event of %d bytes, over the %d read", len(body), maxStructuredBytes)
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(body, &members); err != nil {
		return nil, errors.New("a body that is not a JSON object")
	}
	if err := checkData(members); err != nil {
		return nil, err
	}
	e := &event{structured: true, attributes: map[string]string{}}
	for name, raw := range members {
		if name == "data" || name == "data_base64" {
			continue
		}
		if err := e.add(name, func() (string, bool, error) { return jsonAttribute(name, raw) }); err != nil {
			return nil, fmt.Errorf("member %q: %w", truncate(name, 64), err)
		}
	}
	return e.valid()
}

// checkData: data and data_base64 exclude each other, and data_base64
// is base64 text.
func checkData(members map[string]json.RawMessage) error {
	raw, binary := members["data_base64"]
	if !binary {
		return nil
	}
	if _, both := members["data"]; both {
		return errors.New("both data and data_base64")
	}
	var s *string
	if json.Unmarshal(raw, &s) != nil {
		return errors.New("a data_base64 that is not text")
	}
	if s != nil {
		if _, err := base64.StdEncoding.DecodeString(*s); err != nil {
			return errors.New("a data_base64 that is not base64")
		}
	}
	return nil
}

// jsonAttribute is the canonical string of an attribute of the JSON
// format; set is false for null (unset).
func jsonAttribute(name string, raw json.RawMessage) (s string, set bool, err error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v interface{}
	if err := dec.Decode(&v); err != nil {
		return "", false, err
	}
	if _, isText := v.(string); textAttributes[name] && v != nil && !isText {
		return "", false, errors.New("not a JSON string")
	}
	switch x := v.(type) {
	case nil:
		return "", false, nil
	case string:
		return x, true, checkString(x)
	case bool:
		return strconv.FormatBool(x), true, nil
	case json.Number:
		if n, err := x.Int64(); err == nil && n >= math.MinInt32 && n <= math.MaxInt32 {
			return x.String(), true, nil
		}
		return "", false, errors.New("a number that is not a 32-bit integer")
	}
	return "", false, errors.New("an object or array, which no CloudEvents type is")
}

// ceHeaders writes a binary event's attributes as request headers, each
// value percent-encoded as the HTTP binding says; datacontenttype is
// the Content-Type, set from it when the message has none.
func (e *event) ceHeaders(h map[string][]string) {
	for name, s := range e.attributes {
		if name == ceDataContentType {
			continue
		}
		h[cleanName(ceHeaderPrefix+name)] = []string{cleanValue(percentEncode(s))}
	}
	if s, ok := e.attributes[ceDataContentType]; ok && len(h["Content-Type"]) == 0 {
		h["Content-Type"] = []string{cleanValue(s)}
	}
}

// percentEncode encodes, as the HTTP binding asks, every byte of a
// value's UTF-8 that is a space, a double quote, a percent sign or
// outside printable ASCII.
func percentEncode(s string) string {
	const hex = "0123456789ABCDEF"
	i := 0
	for i < len(s) && !mustEncode(s[i]) {
		i++
	}
	if i == len(s) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 16)
	b.WriteString(s[:i])
	for ; i < len(s); i++ {
		if c := s[i]; mustEncode(c) {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

func mustEncode(c byte) bool { return c <= ' ' || c >= 0x7f || c == '"' || c == '%' }

// idempotencyKey is the event's natural key, source and id, which the
// spec makes unique per event: the two percent-encoded, as in the
// ce-source and ce-id headers, joined by a space.
func (e *event) idempotencyKey() string {
	return percentEncode(e.attributes["source"]) + " " + percentEncode(e.attributes["id"])
}

// replyEvent reads a backend answer that is a CloudEvent under the HTTP
// binding's binary mode (ce- headers) into the headers of a reply that is
// the same event under the AMQP binding: "cloudEvents:" and each
// attribute, percent-decoded. It returns nil when the answer is no valid
// event; its datacontenttype is the answer's Content-Type, which the
// reply carries as its content type.
func replyEvent(h map[string][]string) amqp.Table {
	e := &event{attributes: map[string]string{}}
	for k, v := range h {
		if len(k) <= len(ceHeaderPrefix) || !strings.EqualFold(k[:len(ceHeaderPrefix)], ceHeaderPrefix) || len(v) == 0 {
			continue
		}
		name := strings.ToLower(k[len(ceHeaderPrefix):])
		if name == ceDataContentType { // the HTTP binding's is Content-Type
			continue
		}
		s, err := url.PathUnescape(v[0])
		if err != nil || !validAttributeName(name) || checkString(s) != nil || e.set(name, s) != nil {
			return nil
		}
	}
	if len(e.attributes) == 0 || e.validate() != nil {
		return nil
	}
	t := make(amqp.Table, len(e.attributes))
	for name, s := range e.attributes {
		t[cePrefixColon+name] = s
	}
	return t
}
