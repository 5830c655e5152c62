package consumer

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// chunkConn hands out data in reads of the sizes chunks gives, in turn.
type chunkConn struct {
	net.Conn // nil: only Read is used
	data     []byte
	chunks   []int
	i        int
}

func (c *chunkConn) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := len(p)
	if len(c.chunks) > 0 {
		n = min(n, max(c.chunks[c.i%len(c.chunks)], 1))
		c.i++
	}
	n = copy(p, c.data[:min(n, len(c.data))])
	c.data = c.data[n:]
	return n, nil
}

// filterAll reads all of input through a filter, the connection giving
// reads of the chunks' sizes and the reader asking for readSize bytes at a
// time; it returns the output and the reasons recorded by tag.
func filterAll(t testing.TB, input []byte, chunks []int, readSize int) ([]byte, map[uint64]string) {
	t.Helper()
	refused := map[uint64]string{}
	f := newFrameFilter(&chunkConn{data: input, chunks: chunks}, 131072, func(tag uint64, reason string) { refused[tag] = reason })
	var out []byte
	p := make([]byte, readSize)
	for {
		n, err := f.Read(p)
		out = append(out, p[:n]...)
		if errors.Is(err, io.EOF) {
			return out, refused
		}
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Fatal("Read returned 0 bytes and no error")
		}
	}
}

// splitFrames splits a stream of whole frames of known types, or says
// it is not one.
func splitFrames(b []byte) ([][]byte, bool) {
	var frames [][]byte
	for len(b) > 0 {
		if len(b) < frameHeaderLen {
			return nil, false
		}
		total := frameHeaderLen + int(binary.BigEndian.Uint32(b[3:7])) + 1
		switch b[0] {
		case frameMethod, frameHeader, frameBody, frameHeartbeat:
		default:
			return nil, false
		}
		if len(b) < total || b[total-1] != frameEnd {
			return nil, false
		}
		frames = append(frames, b[:total])
		b = b[total:]
	}
	return frames, true
}

func repeat(n int, field func(i int) []byte) []byte {
	var b []byte
	for i := range n {
		b = append(b, field(i)...)
	}
	return b
}

func ints(n int) []byte { return repeat(n, func(i int) []byte { return fI32(int32(i)) }) }

func entries(n int) []byte {
	return repeat(n, func(i int) []byte { return kv(fmt.Sprintf("k%d", i), []byte{'V'}) })
}

func nestedArrays(depth int) []byte {
	v := fArr()
	for range depth - 1 {
		v = fArr(v)
	}
	return v
}

func nestedTables(depth int) []byte {
	v := fTab()
	for range depth - 1 {
		v = fTab(kv("n", v))
	}
	return v
}

// tableCases are headers tables (their content) at and around amqp091's
// limits, with the reason the filter must give, "" for none. Each is also
// played against amqp091 itself (TestValidatorAgreesWithAmqp091).
var tableCases = []struct {
	name    string
	headers []byte
	reason  string
}{
	{"plain", cat(kv("a", fStr("x")), kv("b", fI32(1)), kv("c", fArr(fStr("y"), fTab(kv("d", []byte{'t', 1}))))), ""},
	{"empty", nil, ""},
	{"array of 8192", kv("big", fArr(ints(8192))), ""},
	{"array of 8193", kv("big", fArr(ints(8193))), `header "big": array of more than 8192 elements`},
	{"nested array of 8193", kv("big", fArr(fArr(ints(8193)))), `header "big": array of more than 8192 elements`},
	{"arrays 32 deep", kv("deep", nestedArrays(32)), ""},
	{"arrays 33 deep", kv("deep", nestedArrays(33)), `header "deep": nested more than 32 levels`},
	{"tables 32 deep", kv("deep", nestedTables(32)), ""},
	{"tables 33 deep", kv("deep", nestedTables(33)), `header "deep": nested more than 32 levels`},
	{"mixed 33 deep", kv("deep", fArr(fTab(kv("a", nestedArrays(31))))), `header "deep": nested more than 32 levels`},
	{"headers of 8192", entries(8192), ""},
	{"headers of 8193", entries(8193), "headers: table of more than 8192 entries"},
	{"8193 with a duplicate key", cat(entries(8192), kv("k0", []byte{'V'})), "headers: table of more than 8192 entries"},
	{"8193 entries, 8192 keys", cat(kv("k1", []byte{'V'}), entries(8192)), ""},
	{"nested table of 8193", kv("t", fTab(entries(8193))), `header "t": table of more than 8192 entries`},
	{"unknown type", kv("x", []byte{'Z', 0}), `header "x": unknown field type 'Z'`},
	{"unknown type in array", kv("x", fArr(fI32(1), []byte{'Z'})), `header "x": unknown field type 'Z'`},
	{"truncated value", kv("x", []byte{'I', 0, 0}), `header "x": truncated value`},
	{"value missing", kv("x", []byte{'l'}), `header "x": truncated value`},
	{"truncated name", []byte{5, 'a', 'b'}, "headers: truncated name"},
	{"negative byte array", kv("x", append([]byte{'x'}, u32(math.MaxUint32)...)), `header "x": byte array of negative length`},
	{"string over 2^31-1", kv("x", append([]byte{'S'}, u32(math.MaxInt32+1)...)), `header "x": length over 2^31-1`},
	// amqp091 ends an array quietly where a read finds nothing left...
	{"array ends in a type", kv("x", fArr(fI32(1), []byte{'I'})), ""},
	{"array shorter than said", kv("x", []byte{'A', 0, 0, 0, 9, 'I', 0, 0, 0, 1}), ""},
	{"table in array ends early", kv("x", fArr(fTab([]byte{1, 'k', 'I'}))), ""},
	{"string ends at a 64 KiB chunk", kv("x", fArr(cat([]byte{'S'}, u32(70000), make([]byte, 65536)))), ""},
	// ...but not where it finds part of what it needs,
	{"array ends in half a value", kv("x", fArr(fI32(1), []byte{'I', 0})), `header "x": truncated value`},
	{"string ends past a 64 KiB chunk", kv("x", fArr(cat([]byte{'S'}, u32(70000), make([]byte, 65537)))), `header "x": truncated value`},
	// ...and the bytes the array did not read are the table's next entry.
	{"array left bytes", kv("x", fArr(fTab([]byte{1, 'k', 'I'}), fI32(5))), "headers: truncated name"},
}

func TestValidatorLimits(t *testing.T) {
	for _, tc := range tableCases {
		t.Run(tc.name, func(t *testing.T) {
			if got := new(validator).headers(tc.headers); got != tc.reason {
				t.Errorf("reason %q, want %q", got, tc.reason)
			}
		})
	}
}

// TestValidatorAgreesWithAmqp091 plays every case to amqp091 through a
// fake broker: without the filter, amqp091 takes the delivery exactly
// when the validator has no reason; with it, the delivery always arrives,
// with its headers emptied when there is a reason.
func TestValidatorAgreesWithAmqp091(t *testing.T) {
	for _, tc := range tableCases {
		t.Run(tc.name, func(t *testing.T) {
			msgs := func(ch uint16, ctag string) []byte { return message(ch, ctag, 1, tc.headers, "body") }
			_, err := outcome(t, fakeSessionOf(t, msgs, nil))
			if says := new(validator).headers(tc.headers); (err == nil) != (says == "") {
				t.Fatalf("amqp091 without the filter: closed with %v; the validator says %q", err, says)
			}
			refused := new(unreadable)
			d, err := outcome(t, fakeSessionOf(t, msgs, refused))
			if err != nil {
				t.Fatalf("with the filter the connection closed: %v", err)
			}
			reason, ok := refused.take(d.DeliveryTag)
			if reason != tc.reason || ok != (tc.reason != "") {
				t.Errorf("Unreadable = %q, %t; want %q", reason, ok, tc.reason)
			}
			if ok && len(d.Headers) != 0 {
				t.Errorf("headers %v, want none", d.Headers)
			}
			if d.ContentType != "text/plain" || d.DeliveryMode != 2 || d.MessageId != "id-1" || string(d.Body) != "body" {
				t.Errorf("delivery %+v lost its other properties or body", d)
			}
		})
	}
}

// TestAmqp091ClosesOnALongArray is the failure the filter is for, seen
// from amqp091 and from a Session.
func TestAmqp091ClosesOnALongArray(t *testing.T) {
	msgs := func(ch uint16, ctag string) []byte {
		return cat(message(ch, ctag, 1, kv("big", fArr(ints(8193))), "poison"), message(ch, ctag, 2, kv("ok", fStr("yes")), "fine"))
	}
	if _, err := outcome(t, fakeSessionOf(t, msgs, nil)); err == nil || err.Code != 501 {
		t.Fatalf("without the filter: %v, want a frame error (501)", err)
	}
	sess := &Session{dialed: dialed{refused: new(unreadable)}}
	s := fakeSessionOf(t, msgs, sess.refused)
	first, err := outcome(t, s)
	if err != nil {
		t.Fatal(err)
	}
	if reason, ok := sess.Unreadable(first.DeliveryTag); !ok || !strings.Contains(reason, `"big"`) || !strings.Contains(reason, "8192") {
		t.Errorf("Unreadable(%d) = %q, %t", first.DeliveryTag, reason, ok)
	}
	if _, ok := first.Headers["big"]; ok || string(first.Body) != "poison" {
		t.Errorf("first delivery: headers %v, body %q", first.Headers, first.Body)
	}
	if _, ok := sess.Unreadable(first.DeliveryTag); ok {
		t.Error("Unreadable did not forget the tag")
	}
	second, err := outcome(t, s)
	if err != nil {
		t.Fatal(err)
	}
	if reason, ok := sess.Unreadable(second.DeliveryTag); ok || second.Headers["ok"] != "yes" {
		t.Errorf("healthy delivery: Unreadable %q, %t; headers %v", reason, ok, second.Headers)
	}
}

func TestUnreadableOfASessionWithoutFilter(t *testing.T) {
	if _, ok := new(Session).Unreadable(1); ok {
		t.Error("a session with no filter reports an unreadable delivery")
	}
}

// stream is two messages on channel 1, the first refused, with a
// heartbeat between them.
func stream() []byte {
	return cat(
		method(0, 10, 41, shortstr("")),
		message(1, "ctag", 7, cat(kv("big", fArr(ints(8193))), kv("ok", fStr("gone too"))), "poison"),
		frame(frameHeartbeat, 0, nil),
		message(1, "ctag", 8, kv("ok", fStr("kept")), "fine"),
	)
}

func TestFilterRewritesTheRefusedHeaderFrame(t *testing.T) {
	in := stream()
	out, refused := filterAll(t, in, nil, 1<<20)
	if !strings.Contains(refused[7], `header "big"`) || len(refused) != 1 {
		t.Errorf("refused %v, want tag 7 only", refused)
	}
	want := cat(
		method(0, 10, 41, shortstr("")),
		message(1, "ctag", 7, []byte{}, "poison"),
		frame(frameHeartbeat, 0, nil),
		message(1, "ctag", 8, kv("ok", fStr("kept")), "fine"),
	)
	if !bytes.Equal(out, want) {
		t.Errorf("output of %d bytes differs from the %d expected", len(out), len(want))
	}
}

// TestFilterSmallReads: frames split across many small reads of the
// connection and of the reader come out the same.
func TestFilterSmallReads(t *testing.T) {
	in := stream()
	want, _ := filterAll(t, in, nil, 1<<20)
	for _, tc := range []struct {
		chunks []int
		read   int
	}{
		{[]int{1}, 1}, {[]int{1}, 4096}, {[]int{3, 7, 1, 100}, 5}, {[]int{7}, 4096}, {[]int{8, 9}, 11}, {[]int{4096}, 4096}, {[]int{65536}, 333},
	} {
		out, refused := filterAll(t, in, tc.chunks, tc.read)
		if !bytes.Equal(out, want) || len(refused) != 1 {
			t.Errorf("chunks %v, reads of %d: output differs (%d bytes, want %d), refused %v", tc.chunks, tc.read, len(out), len(want), refused)
		}
	}
}

// TestFilterPassesWhatItCannotRead: what is not a frame stream, or not a
// whole one, comes out as it went in.
func TestFilterPassesWhatItCannotRead(t *testing.T) {
	big := message(1, "ctag", 7, kv("big", fArr(ints(8193))), "poison")
	header := contentHeader(1, kv("big", fArr(ints(8193))), 1)
	header[len(header)-1] = 0
	badEnd := cat(deliver(1, "ctag", 7), header, frame(frameBody, 1, []byte("b")), big)
	for name, in := range map[string][]byte{
		"protocol header":       cat([]byte("AMQP\x00\x00\x09\x01"), big),
		"unknown frame type":    cat([]byte{4, 0, 0, 0, 0, 0, 0, frameEnd}, big),
		"bad frame end":         badEnd,
		"cut in a header frame": big[:len(big)-20],
		"cut in a frame header": big[:3],
		"header frame too big":  cat(deliver(1, "c", 1), frame(frameHeader, 1, cat(make([]byte, 12), u16(flagHeaders), longstr(cat(kv("big", fArr(ints(8193))), make([]byte, 131072)))))),
		"table past the frame":  frame(frameHeader, 1, cat(make([]byte, 12), u16(flagHeaders), u32(100), kv("x", []byte{'Z'}))),
		"content type past it":  frame(frameHeader, 1, cat(make([]byte, 12), u16(flagContentType|flagHeaders), []byte{200})),
	} {
		for _, chunks := range [][]int{nil, {1}, {5}} {
			out, refused := filterAll(t, in, chunks, 4096)
			if !bytes.Equal(out, in) || len(refused) != 0 {
				t.Errorf("%s, chunks %v: output differs (%d bytes of %d), refused %v", name, chunks, len(out), len(in), refused)
			}
		}
	}
}

// TestFilterKeepsDeadlines: a read deadline that expires while the filter
// holds part of a frame is the caller's error, and the frame comes whole
// once the deadline is moved.
func TestFilterKeepsDeadlines(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	f := newFrameFilter(client, 131072, nil)
	msg := message(1, "c", 1, kv("big", fArr(ints(8193))), "b")
	written := make(chan error, 1)
	go func() { _, err := server.Write(msg[:len(msg)/2]); written <- err }()
	p := make([]byte, len(msg))
	n, err := f.Read(p) // the method frame
	if err != nil || n != len(deliver(1, "c", 1)) {
		t.Fatalf("first read: %d, %v", n, err)
	}
	if err := <-written; err != nil {
		t.Fatal(err)
	}
	if err := f.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Read(p); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v", err)
	}
	if err := f.SetDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	go func() { _, err := server.Write(msg[len(msg)/2:]); written <- err }()
	var out []byte
	for len(out) < len(message(1, "c", 1, []byte{}, "b"))-n {
		m, err := f.Read(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p[:m]...)
	}
	if want := message(1, "c", 1, []byte{}, "b")[n:]; !bytes.Equal(out, want) {
		t.Errorf("after the deadline: %q, want %q", out, want)
	}
	if err := <-written; err != nil {
		t.Fatal(err)
	}
}

func FuzzFrames(f *testing.F) {
	// Small seeds: the limits themselves are in tableCases.
	small := cat(
		method(0, 10, 41, shortstr("")),
		message(1, "ctag", 7, kv("bad", fArr(fI32(1), []byte{'Z'})), "poison"),
		frame(frameHeartbeat, 0, nil),
		message(1, "ctag", 8, kv("ok", fStr("kept")), "fine"),
		method(1, classBasic, methodBasicGetOk, u64(9), []byte{0}, shortstr("ex"), shortstr("rk"), u32(0)),
		contentHeader(1, kv("x", []byte{'I', 0}), 0),
	)
	f.Add(small, uint8(0))
	f.Add(small, uint8(7))
	f.Add(message(1, "c", 3, kv("x", fArr(fI32(1), []byte{'Z'})), "b"), uint8(3))
	f.Add(message(1, "c", 3, kv("x", nestedTables(3)), "b"), uint8(1))
	f.Add([]byte("AMQP\x00\x00\x09\x01"), uint8(2))
	f.Fuzz(func(t *testing.T, in []byte, chunk uint8) {
		var chunks []int
		if chunk > 0 {
			chunks = []int{int(chunk), int(chunk)/3 + 1}
		}
		out, _ := filterAll(t, in, chunks, 4096)
		if len(out) > len(in) || (len(out) == len(in) && !bytes.Equal(out, in)) {
			t.Fatalf("%d bytes in, %d out, not the same", len(in), len(out))
		}
		inFrames, ok := splitFrames(in)
		if !ok {
			return
		}
		outFrames, ok := splitFrames(out)
		if !ok || len(outFrames) != len(inFrames) {
			t.Fatalf("a frame stream of %d frames came out as %d frames (valid: %t)", len(inFrames), len(outFrames), ok)
		}
		for i, fr := range outFrames {
			if bytes.Equal(fr, inFrames[i]) {
				continue
			}
			if fr[0] != frameHeader {
				t.Fatalf("frame %d of type %d changed", i, fr[0])
			}
			// A rewritten header frame is one amqp091 reads.
			if cut, n := new(frameFilter).header(0, bytes.Clone(fr)); n != 0 {
				t.Fatalf("frame %d rewritten, and still refused (%d bytes at %d)", i, n, cut)
			}
		}
	})
}

// BenchmarkConsume consumes b.N deliveries with a few ordinary headers and
// a 256-byte body from a fake broker over loopback TCP, through amqp091
// alone and through the filter.
func BenchmarkConsume(b *testing.B) {
	headers := cat(
		kv("traceparent", fStr("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")),
		kv("x-krakend-attempt", fI32(1)), kv("source", fStr("orders")),
		kv("tags", fArr(fStr("a"), fStr("b"))), kv("meta", fTab(kv("k", fStr("v")))),
	)
	body := strings.Repeat("x", 256)
	for _, filtered := range []bool{false, true} {
		b.Run(map[bool]string{false: "amqp091", true: "filtered"}[filtered], func(b *testing.B) {
			n := b.N
			stream := func(w io.Writer, channel uint16, ctag string) error {
				one := message(channel, ctag, 0, headers, body)
				tagAt := frameHeaderLen + 4 + 1 + len(ctag)
				bw := bufio.NewWriterSize(w, 64*1024)
				for i := range n {
					binary.BigEndian.PutUint64(one[tagAt:], uint64(i+1))
					if _, err := bw.Write(one); err != nil {
						return err
					}
				}
				return bw.Flush()
			}
			var refused *unreadable
			if filtered {
				refused = new(unreadable)
			}
			client, server := tcpPair(b)
			b.ReportAllocs()
			b.ResetTimer()
			d, _ := fakeSession(b, client, server, stream, refused)
			for range n {
				if del := <-d; len(del.Headers) != 5 {
					b.Fatalf("headers %v", del.Headers)
				}
			}
		})
	}
}

// BenchmarkFilterRead is the filter's own cost: 1000 such deliveries
// read through it from memory in amqp091's 4096-byte reads (an op), and
// per delivery.
func BenchmarkFilterRead(b *testing.B) {
	headers := cat(
		kv("traceparent", fStr("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")),
		kv("x-krakend-attempt", fI32(1)), kv("source", fStr("orders")),
		kv("tags", fArr(fStr("a"), fStr("b"))), kv("meta", fTab(kv("k", fStr("v")))),
	)
	const n = 1000
	in := repeat(n, func(i int) []byte { return message(1, "ctag", uint64(i+1), headers, strings.Repeat("x", 256)) })
	p := make([]byte, 4096)
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	for b.Loop() {
		f := newFrameFilter(&chunkConn{data: in, chunks: []int{4096}}, 131072, nil)
		for {
			if _, err := f.Read(p); err != nil {
				break
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/delivery")
}
