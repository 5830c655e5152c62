package consumer

// The frame filter. amqp091 v1.16 refuses a content header whose headers
// table breaks its reader limits (more than 8192 entries in a table or
// array, nesting deeper than 32, an unknown field type...), and it does so
// by closing the whole connection. RabbitMQ accepts such a message, so it
// stays at the head of the queue and kills every session before its first
// delivery. The filter sits under amqp091's reader on the consuming
// connection, checks every headers table by the same rules, and replaces
// one that amqp091 would refuse by an empty table, so the delivery arrives
// and the driver can settle it. The limits themselves are kept.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"sync/atomic"
)

const (
	frameMethod    = 1
	frameHeader    = 2
	frameBody      = 3
	frameHeartbeat = 8
	frameEnd       = 0xCE
	frameHeaderLen = 7 // type, channel, size

	classBasic         = 60
	methodBasicReturn  = 50
	methodBasicDeliver = 60
	methodBasicGetOk   = 71

	flagContentType     = 0x8000
	flagContentEncoding = 0x4000
	flagHeaders         = 0x2000

	// amqp091 v1.16's reader limits (read.go: maxFieldDepth,
	// maxContainerElements, readAllocChunk).
	maxFieldDepth        = 32
	maxContainerElements = 8192
	readAllocChunk       = 64 * 1024

	// minReadBuffer is what the filter reads at once while it holds the
	// start of a frame it cannot decide on yet.
	minReadBuffer = 32 * 1024
)

// frameFilter wraps the consuming connection's net.Conn on the read side.
// Method, body and heartbeat frames pass as they come, examined in the
// caller's buffer; only a content header frame is held until it is whole.
// Whatever it cannot parse as a frame stream (the broker's protocol header
// answering a version mismatch, an unknown frame type) turns the filter
// off for the rest of the connection: amqp091 sees the bytes as they were.
type frameFilter struct {
	net.Conn
	// refused hears the delivery tag and the reason of each headers table
	// replaced after a basic.deliver or basic.get-ok (one replaced after a
	// basic.return is not reported: no delivery to settle).
	refused  func(tag uint64, reason string)
	maxFrame int64 // larger content header frames pass unexamined: amqp091 refuses them anyway

	// buf[start:start+ready] is examined and ready to hand out;
	// buf[start+ready:end] is the start of a frame still undecided.
	buf               []byte
	start, ready, end int
	need              int   // bytes of the undecided frame needed to decide
	pass              int64 // bytes of the current frame left to pass unexamined
	off               bool  // not a frame stream: pass everything
	err               error // read error to return once ready bytes are out

	tags []uint64 // per channel: last delivery tag + 1, 0 when none
	v    validator
}

func newFrameFilter(conn net.Conn, maxFrame int, refused func(tag uint64, reason string)) *frameFilter {
	if maxFrame <= 0 {
		maxFrame = 1 << 20
	}
	return &frameFilter{Conn: conn, refused: refused, maxFrame: int64(maxFrame)}
}

// Read hands out the connection's bytes with every content header frame
// checked. SetReadDeadline and SetDeadline are the embedded conn's: a
// deadline that expires while the filter holds part of a frame returns
// the error, and the held bytes stay for the next Read.
func (f *frameFilter) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if f.ready > 0 {
			n := copy(p, f.buf[f.start:f.start+f.ready])
			f.start += n
			f.ready -= n
			if f.start == f.end {
				f.start, f.end = 0, 0
			}
			return n, nil
		}
		if err := f.err; err != nil {
			f.err = nil
			return 0, err
		}
		if f.start == f.end {
			// Nothing held: read into p and examine it in place.
			n, err := f.Conn.Read(p)
			decided, length := f.scan(p[:n])
			if err != nil && !isTimeout(err) {
				// The connection is done: amqp091 gets what came.
				f.off, decided = true, length
			}
			if decided < length {
				f.buf = append(f.buf[:0], p[decided:length]...)
				f.start, f.end = 0, length-decided
				f.buf = f.buf[:cap(f.buf)]
			}
			if decided > 0 || err != nil {
				return decided, err
			}
			continue
		}
		// The start of a frame is held: read the rest behind it.
		f.makeRoom()
		n, err := f.Conn.Read(f.buf[f.end:])
		f.end += n
		decided, length := f.scan(f.buf[f.start:f.end])
		f.ready, f.end = decided, f.start+length
		if err != nil && !isTimeout(err) {
			f.off, f.ready = true, length
		}
		f.err = err
	}
}

// isTimeout tells a deadline that expired, after which the connection may
// still be read, from the end of the connection.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// makeRoom moves the held bytes to the front of buf and makes it large
// enough for the frame start they hold, and for a read of some size.
func (f *frameFilter) makeRoom() {
	held := f.end - f.start
	size := max(f.need, minReadBuffer)
	if len(f.buf) < size {
		nb := make([]byte, size)
		copy(nb, f.buf[f.start:f.end])
		f.buf = nb
	} else if f.start > 0 {
		copy(f.buf, f.buf[f.start:f.end])
	}
	f.start, f.end = 0, held
}

// scan examines b, a piece of the stream that starts where the last scan
// stopped, and rewrites refused content headers in place (which shortens
// b). It returns how many bytes are decided and the new length: the bytes
// in between are the start of a frame that needs more to be decided, and
// f.need says how much.
func (f *frameFilter) scan(b []byte) (decided, length int) {
	i, n := 0, len(b)
	for i < n {
		if f.off {
			return n, n
		}
		if f.pass > 0 {
			step := int(min(f.pass, int64(n-i)))
			i += step
			f.pass -= int64(step)
			continue
		}
		rest := b[i:n]
		if len(rest) < frameHeaderLen {
			f.need = frameHeaderLen
			return i, n
		}
		typ := rest[0]
		channel := binary.BigEndian.Uint16(rest[1:3])
		size := int64(binary.BigEndian.Uint32(rest[3:7]))
		total := frameHeaderLen + size + 1
		switch typ {
		case frameMethod:
			if need := f.method(channel, rest, size); need > 0 {
				f.need = need
				return i, n
			}
			f.pass = total
		case frameHeader:
			if total > f.maxFrame {
				f.pass = total
				break
			}
			if int64(len(rest)) < total {
				f.need = int(total)
				return i, n
			}
			cut, cutLen := f.header(channel, rest[:total])
			if cutLen > 0 {
				copy(b[i+cut:], b[i+cut+cutLen:n])
				n -= cutLen
				total -= int64(cutLen)
			}
			i += int(total)
		case frameBody, frameHeartbeat:
			f.pass = total
		default:
			f.off = true
		}
	}
	return n, n
}

// method notes the delivery tag of a basic.deliver or basic.get-ok, whose
// content header comes next on the channel. It returns how many bytes of
// the frame it needs to see, or 0 once it has seen enough.
func (f *frameFilter) method(channel uint16, frame []byte, size int64) int {
	const ids = frameHeaderLen + 4
	if size < 4 {
		return 0
	}
	if len(frame) < ids {
		return ids
	}
	if binary.BigEndian.Uint16(frame[7:9]) != classBasic {
		return 0
	}
	var tagAt int
	switch binary.BigEndian.Uint16(frame[9:11]) {
	case methodBasicDeliver: // consumer-tag shortstr, then delivery-tag
		if size < 5 {
			f.setTag(channel, 0, false)
			return 0
		}
		if len(frame) < ids+1 {
			return ids + 1
		}
		tagAt = ids + 1 + int(frame[ids])
	case methodBasicGetOk: // delivery-tag first
		tagAt = ids
	case methodBasicReturn:
		f.setTag(channel, 0, false)
		return 0
	default:
		return 0
	}
	if int64(tagAt+8) > frameHeaderLen+size {
		f.setTag(channel, 0, false)
		return 0
	}
	if len(frame) < tagAt+8 {
		return tagAt + 8
	}
	f.setTag(channel, binary.BigEndian.Uint64(frame[tagAt:]), true)
	return 0
}

func (f *frameFilter) setTag(channel uint16, tag uint64, known bool) {
	if int(channel) >= len(f.tags) {
		if !known {
			return
		}
		f.tags = append(f.tags, make([]uint64, int(channel)+1-len(f.tags))...)
	}
	if known {
		f.tags[channel] = tag + 1
	} else {
		f.tags[channel] = 0
	}
}

// header checks the headers table of a whole content header frame. When
// amqp091 would refuse it, it empties the table in place (the frame size
// too) and returns where the table's content starts in the frame and how
// long it is: the caller cuts those bytes out.
func (f *frameFilter) header(channel uint16, frame []byte) (cut, cutLen int) {
	if frame[len(frame)-1] != frameEnd {
		f.off = true // amqp091 closes the connection on it
		return 0, 0
	}
	payload := frame[frameHeaderLen : len(frame)-1]
	// class-id 2, weight 2, body size 8, property flags 2
	if len(payload) < 14 {
		return 0, 0
	}
	flags := binary.BigEndian.Uint16(payload[12:14])
	if flags&flagHeaders == 0 {
		return 0, 0
	}
	at := 14
	for _, flag := range []uint16{flagContentType, flagContentEncoding} {
		if flags&flag != 0 {
			if at >= len(payload) {
				return 0, 0
			}
			at += 1 + int(payload[at])
		}
	}
	if at+4 > len(payload) {
		return 0, 0
	}
	tableLen := int64(binary.BigEndian.Uint32(payload[at:]))
	if tableLen > int64(len(payload)-at-4) {
		return 0, 0 // amqp091 cannot read past it either, and neither can we
	}
	content := payload[at+4 : at+4+int(tableLen)]
	reason := f.v.headers(content)
	if reason == "" {
		return 0, 0
	}
	binary.BigEndian.PutUint32(payload[at:], 0)
	binary.BigEndian.PutUint32(frame[3:7], uint32(len(payload)-int(tableLen)))
	if int(channel) < len(f.tags) && f.tags[channel] != 0 && f.refused != nil {
		f.refused(f.tags[channel]-1, reason)
	}
	return frameHeaderLen + at + 4, int(tableLen)
}

// unreadable records the deliveries whose headers the filter replaced.
type unreadable struct {
	n  atomic.Int64 // entries in m: the common case, none, takes no lock
	mu sync.Mutex
	m  map[uint64]string
}

func (u *unreadable) add(tag uint64, reason string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.m == nil {
		u.m = make(map[uint64]string)
	}
	if _, ok := u.m[tag]; !ok {
		u.n.Add(1)
	}
	u.m[tag] = reason
}

func (u *unreadable) take(tag uint64) (string, bool) {
	if u == nil || u.n.Load() == 0 {
		return "", false
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	reason, ok := u.m[tag]
	if ok {
		delete(u.m, tag)
		u.n.Add(-1)
	}
	return reason, ok
}

// The validator reads a field table as amqp091 v1.16's readTableDepth,
// readArrayDepth and readFieldDepth do, down to how they meet the end of
// their input: a read that finds nothing left is io.EOF, which ends an
// array quietly (even when it comes from a table nested in it), while a
// read that finds part of what it needs is io.ErrUnexpectedEOF.
type validator struct{}

var (
	errNothing = errors.New("nothing left") // amqp091 sees io.EOF
	errPartial = errors.New("truncated")    // amqp091 sees io.ErrUnexpectedEOF
)

// refusal is a field amqp091 refuses with ErrSyntax.
type refusal struct{ what string }

func (r *refusal) Error() string { return r.what }

var (
	errTooDeep   = &refusal{fmt.Sprintf("nested more than %d levels", maxFieldDepth)}
	errLongArray = &refusal{fmt.Sprintf("array of more than %d elements", maxContainerElements)}
	errLongTable = &refusal{fmt.Sprintf("table of more than %d entries", maxContainerElements)}
	errLongStr   = &refusal{"length over 2^31-1"}
	errNegBytes  = &refusal{"byte array of negative length"}
)

// cursor reads b[pos:end]; a nested array reads its parent's bytes
// through a cursor of its own with a nearer end, as amqp091 reads them
// through an io.LimitedReader.
type cursor struct {
	b        []byte
	pos, end int
}

// fixed reads n bytes as binary.Read does.
func (c *cursor) fixed(n int) (int, error) {
	at := c.pos
	if c.end-at >= n {
		c.pos += n
		return at, nil
	}
	avail := c.end - at
	c.pos = c.end
	if avail == 0 {
		return 0, errNothing
	}
	return 0, errPartial
}

// skip reads n bytes as amqp091's readBytes does, in chunks of
// readAllocChunk, each an io.ReadFull of its own.
func (c *cursor) skip(n int64) error {
	avail := int64(c.end - c.pos)
	if avail >= n {
		c.pos += int(n)
		return nil
	}
	c.pos = c.end
	if avail%readAllocChunk == 0 {
		return errNothing
	}
	return errPartial
}

// headers returns why amqp091 would refuse the content of a message's
// headers table, naming the header, or "" when it would read it.
func (v *validator) headers(content []byte) string {
	c := cursor{b: content, end: len(content)}
	err := v.entries(&c, 0, func(key []byte, err error) error {
		if key == nil {
			return fmt.Errorf("headers: %w", describe(err, "name"))
		}
		return fmt.Errorf("header %q: %w", key, describe(err, "value"))
	})
	if err != nil {
		return err.Error()
	}
	return ""
}

func describe(err error, what string) error {
	if err == errNothing || err == errPartial {
		return fmt.Errorf("truncated %s", what)
	}
	return err
}

// entries reads the content of a table. name, when not nil, turns an
// error into the error returned, given the key it was met at (nil before
// the key was read): the top-level table names the header.
func (v *validator) entries(c *cursor, depth int, name func(key []byte, err error) error) error {
	if name == nil {
		name = func(_ []byte, err error) error { return err }
	}
	first := c.pos
	var keys map[string]struct{}
	for count := 0; c.pos < c.end; count++ {
		at, _ := c.fixed(1) // the loop's condition says it is there
		keyAt := c.pos
		if err := c.skip(int64(c.b[at])); err != nil {
			return name(nil, err)
		}
		key := c.b[keyAt:c.pos]
		if err := v.field(c, depth); err != nil {
			return name(key, err)
		}
		if count < maxContainerElements {
			continue
		}
		// amqp091 counts the distinct keys of its map.
		if keys == nil {
			keys = v.keys(cursor{b: c.b, pos: first, end: c.end}, depth, count)
		}
		if len(keys) >= maxContainerElements {
			if depth == 0 {
				return fmt.Errorf("headers: %w", errLongTable)
			}
			return errLongTable
		}
		keys[string(key)] = struct{}{}
	}
	return nil
}

// keys reads the first n entries of a table again, which entries read
// without error, and returns their distinct keys.
func (v *validator) keys(c cursor, depth, n int) map[string]struct{} {
	keys := make(map[string]struct{}, n)
	for range n {
		at, _ := c.fixed(1)
		keyAt := c.pos
		_ = c.skip(int64(c.b[at]))
		keys[string(c.b[keyAt:c.pos])] = struct{}{}
		_ = v.field(&c, depth)
	}
	return keys
}

func (v *validator) field(c *cursor, depth int) error {
	at, err := c.fixed(1)
	if err != nil {
		return err
	}
	switch typ := c.b[at]; typ {
	case 't', 'B', 'b':
		_, err = c.fixed(1)
	case 's', 'u':
		_, err = c.fixed(2)
	case 'I', 'i', 'f':
		_, err = c.fixed(4)
	case 'l', 'd', 'T':
		_, err = c.fixed(8)
	case 'D': // scale, then value: two reads
		if _, err = c.fixed(1); err == nil {
			_, err = c.fixed(4)
		}
	case 'S':
		var n int64
		if n, err = c.length(); err == nil {
			err = c.skip(n)
		}
	case 'x':
		if at, err = c.fixed(4); err == nil {
			n := int32(binary.BigEndian.Uint32(c.b[at:]))
			if n < 0 {
				return errNegBytes
			}
			err = c.skip(int64(n))
		}
	case 'A':
		return v.array(c, depth+1)
	case 'F':
		return v.table(c, depth+1)
	case 'V':
	default:
		return &refusal{fmt.Sprintf("unknown field type %q", typ)}
	}
	return err
}

// length reads the length of a long string (or a table), which amqp091
// refuses above math.MaxInt32.
func (c *cursor) length() (int64, error) {
	at, err := c.fixed(4)
	if err != nil {
		return 0, err
	}
	n := int64(binary.BigEndian.Uint32(c.b[at:]))
	if n > math.MaxInt32 {
		return 0, errLongStr
	}
	return n, nil
}

func (v *validator) table(c *cursor, depth int) error {
	if depth > maxFieldDepth {
		return errTooDeep
	}
	n, err := c.length()
	if err != nil {
		return err
	}
	at := c.pos
	if err := c.skip(n); err != nil {
		return err
	}
	return v.entries(&cursor{b: c.b, pos: at, end: c.pos}, depth, nil)
}

func (v *validator) array(c *cursor, depth int) error {
	if depth > maxFieldDepth {
		return errTooDeep
	}
	at, err := c.fixed(4)
	if err != nil {
		return err
	}
	size := int64(binary.BigEndian.Uint32(c.b[at:]))
	if size > math.MaxInt32 {
		return errLongStr
	}
	elems := cursor{b: c.b, pos: c.pos, end: int(min(int64(c.pos)+size, int64(c.end)))}
	defer func() { c.pos = elems.pos }() // the array's reads are its parent's
	for count := 0; ; count++ {
		err := v.field(&elems, depth)
		if err == errNothing {
			return nil
		}
		if err != nil {
			return err
		}
		if count >= maxContainerElements {
			return errLongArray
		}
	}
}
