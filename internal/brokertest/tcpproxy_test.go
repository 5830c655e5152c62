package brokertest

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// echoServer echoes every line back until the client goes; it needs no
// broker. stop closes it and waits for its goroutines.
func echoServer(t *testing.T) (addr string, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = ln.Close()
			mu.Lock()
			for _, c := range conns {
				_ = c.Close()
			}
			mu.Unlock()
			wg.Wait()
		})
	}
	t.Cleanup(stop)
	return ln.Addr().String(), stop
}

// roundTrip writes a line and reads the echo, within a deadline.
func roundTrip(c net.Conn, r *bufio.Reader, line string) (string, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := r.ReadString('\n')
	return strings.TrimSuffix(got, "\n"), err
}

func dialProxy(t *testing.T, p *Proxy) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, bufio.NewReader(c)
}

// closedByPeer tells whether the proxy closed the connection: a read
// returns EOF or a reset, not a timeout.
func closedByPeer(c net.Conn, r *bufio.Reader) bool {
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := r.ReadByte()
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

func TestProxyForwardsCutsPausesAndLeaksNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	addr, stopEcho := echoServer(t)
	p := NewProxy(t, addr)

	a, ra := dialProxy(t, p)
	b, rb := dialProxy(t, p)
	for _, x := range []struct {
		c net.Conn
		r *bufio.Reader
	}{{a, ra}, {b, rb}} {
		if got, err := roundTrip(x.c, x.r, "hello"); err != nil || got != "hello" {
			t.Fatalf("echo through the proxy: got %q, %v", got, err)
		}
	}
	if n := p.Live(); n != 2 {
		t.Errorf("Live: got %d, want 2", n)
	}

	if n := p.Cut(); n != 2 {
		t.Errorf("Cut: got %d connections, want 2", n)
	}
	if !closedByPeer(a, ra) || !closedByPeer(b, rb) {
		t.Error("a cut connection is still open on the client side")
	}
	Eventually(t, 10*time.Second, "cut links to be forgotten", func() bool { return p.Live() == 0 })
	if n := p.Cut(); n != 0 {
		t.Errorf("second Cut: got %d, want 0", n)
	}

	p.Pause()
	c, rc := dialProxy(t, p)
	if !closedByPeer(c, rc) {
		t.Error("a connection made while paused was not closed at once")
	}
	p.Resume()
	d, rd := dialProxy(t, p)
	if got, err := roundTrip(d, rd, "again"); err != nil || got != "again" {
		t.Fatalf("echo after Resume: got %q, %v", got, err)
	}

	p.Close()
	p.Close() // idempotent
	if !closedByPeer(d, rd) {
		t.Error("Close left a connection open")
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Error("the proxy still accepts connections after Close")
	}
	stopEcho()
	Eventually(t, 10*time.Second, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

func TestProxyCutReachesTheServerSide(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	p := NewProxy(t, ln.Addr().String())
	dialProxy(t, p)
	var server net.Conn
	select {
	case server = <-accepted:
		defer server.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy never dialled the target")
	}
	Eventually(t, 10*time.Second, "the link to be live", func() bool { return p.Live() == 1 })
	if n := p.Cut(); n != 1 {
		t.Fatalf("Cut: got %d, want 1", n)
	}
	if !closedByPeer(server, bufio.NewReader(server)) {
		t.Error("the server side of a cut connection stayed open")
	}
}

func TestProxyUnreachableTargetClosesTheClient(t *testing.T) {
	p := NewProxy(t, "127.0.0.1:1")
	c, r := dialProxy(t, p)
	if !closedByPeer(c, r) {
		t.Error("the client stayed connected although the target refused")
	}
}

func TestProxyURLKeepsCredentialsAndVhost(t *testing.T) {
	t.Setenv("AMQP_URL", "amqp://user:secret@broker.example:5673/vh")
	p := NewProxy(t, "127.0.0.1:1")
	u, err := url.Parse(p.URL())
	if err != nil {
		t.Fatal(err)
	}
	pass, _ := u.User.Password()
	if u.Scheme != "amqp" || u.User.Username() != "user" || pass != "secret" || u.Path != "/vh" || u.Host != p.Addr() {
		t.Errorf("URL: got %s", p.URL())
	}
	if got := brokerAddr(t); got != "broker.example:5673" {
		t.Errorf("default target: got %s", got)
	}
	t.Setenv("AMQP_URL", "amqp://guest:guest@localhost/")
	if got := brokerAddr(t); got != "localhost:5672" {
		t.Errorf("default target without a port: got %s", got)
	}
}
