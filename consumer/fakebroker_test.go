package consumer

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Builders of AMQP 0-9-1 wire bytes for the tests.

func u16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func u32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func shortstr(s string) []byte { return append([]byte{byte(len(s))}, s...) }
func longstr(s []byte) []byte  { return append(u32(uint32(len(s))), s...) }

func frame(typ byte, channel uint16, payload []byte) []byte {
	return cat([]byte{typ}, u16(channel), u32(uint32(len(payload))), payload, []byte{frameEnd})
}

func method(channel uint16, class, id uint16, args ...[]byte) []byte {
	return frame(frameMethod, channel, cat(u16(class), u16(id), cat(args...)))
}

// Fields of a table or an array, and table entries.

func fI32(v int32) []byte           { return append([]byte{'I'}, u32(uint32(v))...) }
func fStr(s string) []byte          { return append([]byte{'S'}, longstr([]byte(s))...) }
func fArr(elems ...[]byte) []byte   { return append([]byte{'A'}, longstr(cat(elems...))...) }
func fTab(entries ...[]byte) []byte { return append([]byte{'F'}, longstr(cat(entries...))...) }
func kv(key string, field []byte) []byte {
	return append(shortstr(key), field...)
}

func deliver(channel uint16, ctag string, tag uint64) []byte {
	return method(channel, classBasic, methodBasicDeliver, shortstr(ctag), u64(tag), []byte{0}, shortstr("ex"), shortstr("rk"))
}

// contentHeader has a content type, the headers table (content without
// its length; none when nil), a delivery mode and a message id, so that a
// test sees the properties around the headers survive.
func contentHeader(channel uint16, headers []byte, bodySize int) []byte {
	flags := uint16(flagContentType | 0x1000 | 0x0080)
	if headers != nil {
		flags |= flagHeaders
	}
	p := cat(u16(classBasic), u16(0), u64(uint64(bodySize)), u16(flags), shortstr("text/plain"))
	if headers != nil {
		p = append(p, longstr(headers)...)
	}
	p = cat(p, []byte{2}, shortstr("id-1"))
	return frame(frameHeader, channel, p)
}

func message(channel uint16, ctag string, tag uint64, headers []byte, body string) []byte {
	return cat(deliver(channel, ctag, tag), contentHeader(channel, headers, len(body)), frame(frameBody, channel, []byte(body)))
}

// fakeBroker plays the broker's side of a connection for amqp091: the
// handshake, channel.open, basic.qos and basic.consume, after which it
// writes what deliveries returns for the consumer tag, then answers the
// closes.
// It returns when the client goes away.
func fakeBroker(conn net.Conn, deliveries func(w io.Writer, channel uint16, ctag string) error) error {
	defer conn.Close()
	r := bufio.NewReader(conn)
	if _, err := io.ReadFull(r, make([]byte, 8)); err != nil { // "AMQP" 0 0 9 1
		return err
	}
	start := method(0, 10, 10, []byte{0, 9}, longstr(nil), longstr([]byte("PLAIN")), longstr([]byte("en_US")))
	if _, err := conn.Write(start); err != nil {
		return err
	}
	for {
		var head [7]byte
		if _, err := io.ReadFull(r, head[:]); err != nil {
			return err
		}
		payload := make([]byte, binary.BigEndian.Uint32(head[3:])+1)
		if _, err := io.ReadFull(r, payload); err != nil {
			return err
		}
		if head[0] != frameMethod {
			continue
		}
		ch := binary.BigEndian.Uint16(head[1:])
		var out []byte
		switch class, id := binary.BigEndian.Uint16(payload), binary.BigEndian.Uint16(payload[2:]); [2]uint16{class, id} {
		case [2]uint16{10, 11}: // start-ok
			out = method(0, 10, 30, u16(2047), u32(131072), u16(0))
		case [2]uint16{10, 40}: // open
			out = method(0, 10, 41, shortstr(""))
		case [2]uint16{10, 50}: // close
			_, err := conn.Write(method(0, 10, 51))
			return err
		case [2]uint16{20, 10}: // channel.open
			out = method(ch, 20, 11, longstr(nil))
		case [2]uint16{20, 40}: // channel.close
			out = method(ch, 20, 41)
		case [2]uint16{60, 10}: // qos
			out = method(ch, 60, 11)
		case [2]uint16{60, 20}: // consume: reserved short, queue, consumer tag
			q := payload[6:]
			at := 1 + int(q[0]) // the consumer tag's length
			tag := string(q[at+1 : at+1+int(q[at])])
			if _, err := conn.Write(method(ch, 60, 21, shortstr(tag))); err != nil {
				return err
			}
			if err := deliveries(conn, ch, tag); err != nil {
				return err
			}
			continue
		}
		if _, err := conn.Write(out); err != nil {
			return err
		}
	}
}

// fakeSession opens an amqp091 connection to a fakeBroker, through the
// filter when refused is not nil, and consumes: it returns the
// deliveries and the connection's close notifications.
func fakeSession(t testing.TB, client, server net.Conn, deliveries func(w io.Writer, channel uint16, ctag string) error, refused *unreadable) (<-chan amqp.Delivery, <-chan *amqp.Error) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = fakeBroker(server, deliveries)
	}()
	var conn net.Conn = client
	if refused != nil {
		conn = newFrameFilter(client, 131072, refused.add)
	}
	c, err := amqp.Open(conn, amqp.Config{
		SASL:  []amqp.Authentication{&amqp.PlainAuth{Username: "guest", Password: "guest"}},
		Vhost: "/", FrameSize: 131072, Locale: "en_US",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.CloseDeadline(time.Now().Add(time.Second))
		_ = client.Close()
		<-done
	})
	closed := c.NotifyClose(make(chan *amqp.Error, 1))
	ch, err := c.Channel()
	if err != nil {
		t.Fatal(err)
	}
	d, err := ch.Consume("q", "ctag", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return d, closed
}

// sessionOutcome is what fakeSession returns, for outcome.
type sessionOutcome struct {
	d      <-chan amqp.Delivery
	closed <-chan *amqp.Error
}

// fakeSessionOf is a fakeSession over net.Pipe whose broker writes the
// bytes msgs returns.
func fakeSessionOf(t testing.TB, msgs func(channel uint16, ctag string) []byte, refused *unreadable) sessionOutcome {
	client, server := net.Pipe()
	d, closed := fakeSession(t, client, server, func(w io.Writer, channel uint16, ctag string) error {
		_, err := w.Write(msgs(channel, ctag))
		return err
	}, refused)
	return sessionOutcome{d, closed}
}

// tcpPair is a connected pair of loopback TCP connections.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	if client, err = net.Dial("tcp", l.Addr().String()); err != nil {
		t.Fatal(err)
	}
	if server = <-accepted; server == nil {
		t.Fatal("accept failed")
	}
	return client, server
}

// outcome is a delivery, or the error that closed the connection first.
func outcome(t testing.TB, s sessionOutcome) (amqp.Delivery, *amqp.Error) {
	t.Helper()
	d, closed := s.d, s.closed
	select {
	case del, ok := <-d:
		if ok {
			return del, nil
		}
		return amqp.Delivery{}, <-closed
	case err := <-closed:
		return amqp.Delivery{}, err
	case <-time.After(10 * time.Second):
		t.Fatal("neither a delivery nor a close")
	}
	return amqp.Delivery{}, nil
}
