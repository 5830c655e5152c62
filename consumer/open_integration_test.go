//go:build integration

package consumer

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// stallingProxy forwards connections to the test broker until a client
// sends its first queue.declare: from then on it forwards nothing either
// way (a broker that stopped answering after the handshake, or a network
// that black-holes), while keeping the sockets open.
type stallingProxy struct {
	ln      net.Listener
	target  string
	stalled chan struct{} // closed at the first queue.declare held
	once    sync.Once
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
	closed  bool
}

func newStallingProxy(t *testing.T) *stallingProxy {
	t.Helper()
	u, err := url.Parse(brokertest.URL())
	if err != nil {
		t.Fatalf("AMQP_URL does not parse: %v", err)
	}
	target := u.Host
	if u.Port() == "" {
		target = net.JoinHostPort(u.Hostname(), "5672")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallingProxy{ln: ln, target: target, stalled: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// URL is the test broker's URL with the proxy as host.
func (p *stallingProxy) URL(t *testing.T) string {
	u, err := url.Parse(brokertest.URL())
	if err != nil {
		t.Fatal(err)
	}
	u.Host = p.ln.Addr().String()
	return u.String()
}

// Close closes the listener and every socket, and waits for the proxy's
// goroutines.
func (p *stallingProxy) Close() {
	_ = p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *stallingProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = c.Close()
		return false
	}
	p.conns = append(p.conns, c)
	return true
}

func (p *stallingProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(client) {
			return
		}
		server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			_ = client.Close()
			continue
		}
		if !p.track(server) {
			return
		}
		p.wg.Add(2)
		go p.toClient(client, server)
		go p.toServer(client, server)
	}
}

// toClient copies the broker's bytes to the client until the stall, and
// drops them after it.
func (p *stallingProxy) toClient(client, server net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := server.Read(buf)
		select {
		case <-p.stalled:
		default:
			if _, werr := client.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// toServer copies the client's frames to the broker until the first
// queue.declare (class 50, method 10), which it holds with everything
// after it.
func (p *stallingProxy) toServer(client, server net.Conn) {
	defer p.wg.Done()
	r := bufio.NewReader(client)
	header := make([]byte, 8) // "AMQP" 0 0 9 1
	if _, err := io.ReadFull(r, header); err != nil {
		return
	}
	if _, err := server.Write(header); err != nil {
		return
	}
	for {
		head := make([]byte, 7) // type, channel, payload size
		if _, err := io.ReadFull(r, head); err != nil {
			return
		}
		frame := make([]byte, 7+int(binary.BigEndian.Uint32(head[3:]))+1) // + frame end
		copy(frame, head)
		if _, err := io.ReadFull(r, frame[7:]); err != nil {
			return
		}
		payload := frame[7 : len(frame)-1]
		if head[0] == 1 && len(payload) >= 4 && binary.BigEndian.Uint16(payload) == 50 && binary.BigEndian.Uint16(payload[2:]) == 10 {
			p.once.Do(func() { close(p.stalled) })
			_, _ = io.Copy(io.Discard, r)
			return
		}
		if _, err := server.Write(frame); err != nil {
			return
		}
	}
}

// TestOpenReturnsWhenCancelledWhileTheBrokerStalls: the broker stops
// answering in the middle of the declarations; cancelling Open's context
// (the agent shutting down) makes Open return at once with the context's
// error, not when the TCP connection dies.
func TestOpenReturnsWhenCancelledWhileTheBrokerStalls(t *testing.T) {
	conn := brokertest.Dial(t) // fails, not skips, when no broker answers
	queue, exchange := brokertest.Name(t, "q"), brokertest.Name(t, "x")
	brokertest.Cleanup(t, conn, queue, exchange)
	p := newStallingProxy(t)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	type result struct {
		sess *Session
		err  error
	}
	opened := make(chan result, 1)
	go func() {
		sess, err := Open(ctx, Settings{
			URLs: []string{p.URL(t)}, Name: "open-stall", DialTimeout: 10 * time.Second,
			Topology:      Topology{Exchange: exchange, ExchangeType: "topic", Queue: queue, RoutingKeys: []string{"k"}, Durable: true},
			PrefetchCount: 1,
		})
		opened <- result{sess, err}
	}()
	select {
	case <-p.stalled:
	case r := <-opened:
		t.Fatalf("Open returned before the broker stalled: %v", r.err)
	case <-time.After(30 * time.Second):
		t.Fatal("Open did not reach the queue declaration within 30s")
	}

	cancel()
	cancelled := time.Now()
	select {
	case r := <-opened:
		if r.sess != nil {
			_ = r.sess.Close()
			t.Fatal("Open returned a session although its context ended")
		}
		if !errors.Is(r.err, context.Canceled) {
			t.Errorf("Open: %v, want an error wrapping context.Canceled", r.err)
		}
		t.Logf("Open returned %s after the cancel: %v", time.Since(cancelled).Round(time.Millisecond), r.err)
	case <-time.After(5 * time.Second):
		p.Close() // lets Open return, so that nothing outlives the test
		r := <-opened
		t.Fatalf("Open still blocked 5s after its context ended; once the proxy closed: %v", r.err)
	}
}
