package brokertest

import (
	"errors"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"
)

// Proxy is a TCP proxy in front of the broker, for fault tests: an agent
// given p.URL() connects through it, and the test cuts its connections
// (p.Cut) or refuses new ones (p.Pause) without touching the shared
// broker. Only the agent's traffic goes through it; tests publish and
// inspect queues directly.
type Proxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup // the accept loop and every link's goroutines

	mu      sync.Mutex
	links   map[*link]struct{}
	paused  bool
	closed  bool
	accepts []time.Time // when each client connection was taken
}

// link is one client connection and, once dialled, its broker side.
type link struct {
	client, server net.Conn
	cut            bool
}

func (l *link) close() {
	_ = l.client.Close()
	if l.server != nil {
		_ = l.server.Close()
	}
}

// NewProxy listens on 127.0.0.1:0 and forwards every connection it
// accepts to target ("" means the broker of URL()). It is closed when the
// test ends.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	if target == "" {
		target = brokerAddr(t)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy: listen: %v", err)
	}
	p := &Proxy{ln: ln, target: target, links: map[*link]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// brokerAddr is host:port of URL(), with AMQP's default port.
func brokerAddr(t testing.TB) string {
	u, err := url.Parse(URL())
	if err != nil {
		t.Fatalf("proxy: AMQP_URL does not parse: %v", err)
	}
	if u.Port() != "" {
		return u.Host
	}
	port := "5672"
	if u.Scheme == "amqps" {
		port = "5671"
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// Accepts tells when each client connection the proxy forwarded was
// taken, in order.
func (p *Proxy) Accepts() []time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]time.Time(nil), p.accepts...)
}

// Addr is the proxy's listening address, host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// URL is URL() with the proxy as host: same scheme, credentials and vhost.
func (p *Proxy) URL() string {
	u, err := url.Parse(URL())
	if err != nil {
		panic("brokertest: AMQP_URL does not parse: " + err.Error())
	}
	u.Host = p.Addr()
	return u.String()
}

// Cut closes every live connection through the proxy, both its client and
// its broker side, and returns how many there were. The client sees its
// connection reset; the broker requeues what that connection held.
func (p *Proxy) Cut() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for l := range p.links {
		if !l.cut {
			l.cut = true
			l.close()
			n++
		}
	}
	return n
}

// Pause makes the proxy close every new connection as soon as it is
// accepted, as a broker that is down would; live connections are left
// alone (Cut them too to simulate an outage).
func (p *Proxy) Pause() {
	p.mu.Lock()
	p.paused = true
	p.mu.Unlock()
}

// Resume lets new connections through again.
func (p *Proxy) Resume() {
	p.mu.Lock()
	p.paused = false
	p.mu.Unlock()
}

// Live counts the connections currently forwarded.
func (p *Proxy) Live() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for l := range p.links {
		if !l.cut && l.server != nil {
			n++
		}
	}
	return n
}

// Close stops listening, cuts every connection and waits for all of the
// proxy's goroutines to end. It is safe to call more than once.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	_ = p.ln.Close()
	p.Cut()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		conn, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		p.mu.Lock()
		if p.paused || p.closed {
			p.mu.Unlock()
			_ = conn.Close()
			continue
		}
		l := &link{client: conn}
		p.links[l] = struct{}{}
		p.accepts = append(p.accepts, time.Now())
		p.wg.Add(1)
		p.mu.Unlock()
		go p.forward(l)
	}
}

// forward dials the target for one client and copies both ways until
// either side closes or the link is cut; then it closes both sides.
func (p *Proxy) forward(l *link) {
	defer p.wg.Done()
	defer func() {
		p.mu.Lock()
		delete(p.links, l)
		p.mu.Unlock()
		l.close()
	}()
	server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		return
	}
	p.mu.Lock()
	l.server = server
	cut := l.cut
	p.mu.Unlock()
	if cut {
		return // cut while dialling
	}
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(server, l.client)
	go pipe(l.client, server)
	<-done
	l.close() // ends the other copy
	<-done
}
