//go:build integration

package asyncamqp_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	luraconfig "github.com/luraproject/lura/v2/config"
	amqp "github.com/rabbitmq/amqp091-go"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/internal/brokertest"
)

// ---------------------------------------------------------------- TLS

// tlsPKI is what a TLS test needs: a CA the agent trusts, a server
// certificate it signed for 127.0.0.1 and localhost, a client
// certificate it signed, and a second CA that signed nothing the proxy
// shows.
type tlsPKI struct {
	dir                   string
	caFile, otherCAFile   string
	clientCert, clientKey string
	server                tls.Certificate
	clientCAs             *x509.CertPool
	keyMaterial           []string // a line of each private key's PEM, to look for in logs
	caKey                 *ecdsa.PrivateKey
	caCert                *x509.Certificate
	serial                int64
}

func newTLSPKI(t *testing.T) *tlsPKI {
	t.Helper()
	p := &tlsPKI{dir: t.TempDir()}
	p.caCert, p.caKey = p.newCA(t, "async-amqp test CA")
	p.caFile = p.writePEM(t, "ca.pem", "CERTIFICATE", p.caCert.Raw)
	other, _ := p.newCA(t, "an unrelated CA")
	p.otherCAFile = p.writePEM(t, "other-ca.pem", "CERTIFICATE", other.Raw)
	p.clientCAs = x509.NewCertPool()
	p.clientCAs.AddCert(p.caCert)

	serverDER, serverKey := p.leaf(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "localhost"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	p.server = tls.Certificate{Certificate: [][]byte{serverDER}, PrivateKey: serverKey}
	clientDER, clientKey := p.leaf(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "krakend-agent"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	p.clientCert = p.writePEM(t, "client.pem", "CERTIFICATE", clientDER)
	keyDER, err := x509.MarshalPKCS8PrivateKey(clientKey)
	if err != nil {
		t.Fatal(err)
	}
	p.clientKey = p.writePEM(t, "client-key.pem", "PRIVATE KEY", keyDER)
	p.keyMaterial = append(p.keyMaterial, base64Body(keyDER))
	return p
}

func (p *tlsPKI) newCA(t *testing.T, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p.serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// leaf issues a certificate signed by the test CA.
func (p *tlsPKI) leaf(t *testing.T, tmpl *x509.Certificate) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p.serial++
	tmpl.SerialNumber = big.NewInt(p.serial)
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return der, key
}

func (p *tlsPKI) writePEM(t *testing.T, name, kind string, der []byte) string {
	t.Helper()
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// base64Body is the first PEM line of a key: a log that held the key
// would hold it.
func base64Body(der []byte) string {
	lines := strings.Split(string(pem.EncodeToMemory(&pem.Block{Type: "X", Bytes: der})), "\n")
	return lines[1]
}

// tlsTerminator accepts TLS on 127.0.0.1 and forwards the plain bytes to
// the test broker, as a TLS-terminating load balancer in front of
// RabbitMQ does.
type tlsTerminator struct {
	addr       string
	handshakes atomic.Int64 // completed
	mu         sync.Mutex
	failures   []string // handshake errors, as the server saw them
}

func startTLSTerminator(t *testing.T, cfg *tls.Config) *tlsTerminator {
	t.Helper()
	upstream := brokerAddr(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := &tlsTerminator{addr: ln.Addr().String()}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	track := func(c net.Conn, on bool) {
		mu.Lock()
		defer mu.Unlock()
		if on {
			open[c] = true
		} else {
			delete(open, c)
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.serve(c.(*tls.Conn), upstream, track)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for c := range open {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return p
}

func (p *tlsTerminator) serve(c *tls.Conn, upstream string, track func(net.Conn, bool)) {
	track(c, true)
	defer track(c, false)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		p.mu.Lock()
		p.failures = append(p.failures, err.Error())
		p.mu.Unlock()
		return
	}
	_ = c.SetDeadline(time.Time{})
	p.handshakes.Add(1)
	up, err := net.Dial("tcp", upstream)
	if err != nil {
		return
	}
	track(up, true)
	defer track(up, false)
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
}

func (p *tlsTerminator) handshakeFailures() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.failures...)
}

// brokerAddr is host:port of the test broker.
func brokerAddr(t *testing.T) string {
	t.Helper()
	u, err := url.Parse(brokertest.URL())
	if err != nil {
		t.Fatal(err)
	}
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), "5672")
	}
	return u.Host
}

// brokerURLVia is the test broker's URL, with its credentials and
// virtual host, reached through scheme://addr.
func brokerURLVia(t *testing.T, scheme, addr string) string {
	t.Helper()
	u, err := url.Parse(brokertest.URL())
	if err != nil {
		t.Fatal(err)
	}
	u.Scheme, u.Host = scheme, addr
	return u.String()
}

// brokerPassword is the password of the test broker's URL.
func brokerPassword(t *testing.T) string {
	u, _ := url.Parse(brokertest.URL())
	pw, _ := u.User.Password()
	return pw
}

// assertNoSecrets fails when the logs hold the URL's password (as
// user:password) or any key material.
func assertNoSecrets(t *testing.T, logs string, secrets ...string) {
	t.Helper()
	for _, s := range append(secrets, "BEGIN", "PRIVATE KEY") {
		if s != "" && strings.Contains(logs, s) {
			t.Errorf("the logs hold %q:\n%s", s, logs)
		}
	}
}

// TestTLSThroughATerminatingProxy runs agents over amqps:// through a TLS
// proxy in front of the local broker, with certificates the test makes:
// a trusted CA delivers, a wrong CA fails with the x509 reason, an
// insecure_skip_verify agent delivers and warns once, and a proxy that
// requires a client certificate accepts the agent's cert_file/key_file
// and refuses an agent without one. No log holds the password or a key.
func TestTLSThroughATerminatingProxy(t *testing.T) {
	pki := newTLSPKI(t)
	proxy := startTLSTerminator(t, &tls.Config{Certificates: []tls.Certificate{pki.server}, MinVersion: tls.VersionTLS12})
	mtls := startTLSTerminator(t, &tls.Config{Certificates: []tls.Certificate{pki.server}, MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pki.clientCAs})
	secrets := []string{":" + brokerPassword(t) + "@"}
	secrets = append(secrets, pki.keyMaterial...)

	delivers := []struct {
		name  string
		proxy *tlsTerminator
		tls   map[string]interface{}
		host  string // the host in the URL; 127.0.0.1 by default
	}{
		{"trusted CA", proxy, map[string]interface{}{"ca_file": pki.caFile}, ""},
		{"server_name", proxy, map[string]interface{}{"ca_file": pki.caFile, "server_name": "localhost"}, ""},
		{"localhost URL", proxy, map[string]interface{}{"ca_file": pki.caFile}, "localhost"},
		{"insecure_skip_verify", proxy, map[string]interface{}{"insecure_skip_verify": true}, ""},
		{"client certificate", mtls, map[string]interface{}{"ca_file": pki.caFile, "cert_file": pki.clientCert, "key_file": pki.clientKey}, ""},
	}
	for _, c := range delivers {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t)
			be := newBackend(t, nil)
			addr := c.proxy.addr
			if c.host != "" {
				_, port, _ := net.SplitHostPort(addr)
				addr = net.JoinHostPort(c.host, port)
			}
			name := brokertest.Name(t, "agent")
			before := c.proxy.handshakes.Load()
			gw := startAgents(t, agentSpec{Name: name, Topic: "k", Workers: 2, Backend: be.URL,
				Block: block(f.queue, f.exchange, map[string]interface{}{"host": brokerURLVia(t, "amqps", addr), "tls": c.tls})})
			gw.waitPing(t, name)
			if c.proxy.handshakes.Load() == before {
				t.Fatal("the agent consumes, but not through the TLS proxy")
			}
			f.pub.PublishN(f.exchange, "k", 20, jsonBody)
			brokertest.Eventually(t, 20*time.Second, "20 messages at the backend", func() bool { return be.count() >= 20 })
			f.waitEmpty(t)

			const warning = "tls.insecure_skip_verify is set"
			if c.tls["insecure_skip_verify"] == true {
				// Once per agent, not per connection: force a reconnect.
				if n := brokertest.CloseConnections(t, "krakend-amqp "+name+"@"); n != 2 {
					t.Fatalf("closed %d connections of the agent, want 2 (consuming, copies)", n)
				}
				brokertest.Eventually(t, 20*time.Second, "a second session", func() bool {
					return strings.Count(gw.logs.String(), "consuming queue") >= 2
				})
				if n := strings.Count(gw.logs.String(), warning); n != 1 {
					t.Errorf("the insecure_skip_verify warning is logged %d times, want once:\n%s", n, gw.logs.String())
				}
				gw.expectLogs(t, "WARNING: [SERVICE: AsyncAgent][AMQP]["+name+"] "+warning)
			} else if strings.Contains(gw.logs.String(), warning) {
				t.Errorf("warning about insecure_skip_verify without it:\n%s", gw.logs.String())
			}
			gw.stop(t)
			assertNoSecrets(t, gw.logs.String(), secrets...)
		})
	}

	refuses := []struct {
		name  string
		proxy *tlsTerminator
		tls   map[string]interface{}
		want  string // in the agent's log
	}{
		{"wrong CA", proxy, map[string]interface{}{"ca_file": pki.otherCAFile}, "x509: certificate signed by unknown authority"},
		{"no CA: system roots", proxy, nil, "x509: certificate signed by unknown authority"},
		{"wrong server_name", proxy, map[string]interface{}{"ca_file": pki.caFile, "server_name": "broker.example"}, "x509: certificate is valid for localhost, not broker.example"},
		{"client certificate missing", mtls, map[string]interface{}{"ca_file": pki.caFile}, "certificate required"},
	}
	for _, c := range refuses {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t)
			preDeclare(t, f, "topic", true, "k")
			f.pub.PublishN(f.exchange, "k", 3, jsonBody)
			be := newBackend(t, nil)
			name := brokertest.Name(t, "agent")
			over := map[string]interface{}{"host": brokerURLVia(t, "amqps", c.proxy.addr)}
			if c.tls != nil {
				over["tls"] = c.tls
			}
			gw := startAgents(t, agentSpec{Name: name, Topic: "k", Workers: 1, Backend: be.URL, Block: block(f.queue, f.exchange, over)})
			brokertest.Eventually(t, 20*time.Second, "the TLS error in the log", func() bool {
				return strings.Contains(gw.logs.String(), c.want)
			})
			gw.stop(t)
			redacted := config.Redacted(brokerURLVia(t, "amqps", c.proxy.addr))
			gw.expectLogs(t, "connect to "+redacted+": ", "retry 1 in")
			if be.count() != 0 {
				t.Errorf("the backend got %d messages through a refused TLS connection", be.count())
			}
			if ready, _ := brokertest.Counts(t, f.queue); ready != 3 {
				t.Errorf("queue holds %d ready messages, want the 3 published", ready)
			}
			assertNoSecrets(t, gw.logs.String(), secrets...)
			t.Logf("agent error: %s; proxy saw: %v", lineWith(gw.logs.String(), c.want), c.proxy.handshakeFailures())
		})
	}
}

// lineWith returns the first log line holding s.
func lineWith(logs, s string) string {
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}

// preDeclare declares the fixture's exchange (of kind) and durable
// queue and binds them with keys, as an operator's tooling would.
func preDeclare(t *testing.T, f fixture, kind string, withExchange bool, keys ...string) {
	t.Helper()
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if withExchange {
		if err := ch.ExchangeDeclare(f.exchange, kind, true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ch.QueueDeclare(f.queue, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := ch.QueueBind(f.queue, k, f.exchange, false, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// ---------------------------------------------------------------- quorum

// queueArguments reads a queue's arguments as rabbitmqctl prints them.
func queueArguments(t *testing.T, name string) string {
	t.Helper()
	for _, row := range brokertest.Rabbitmqctl(t, "--formatter", "json", "list_queues", "name", "arguments") {
		if len(row) > 0 && strings.Contains(strings.Join(row, " "), `"`+name+`"`) {
			return strings.Join(row, " ")
		}
	}
	return ""
}

// queueType reads a queue's type (classic, quorum, stream).
func queueType(t *testing.T, name string) string {
	t.Helper()
	for _, row := range brokertest.Rabbitmqctl(t, "list_queues", "--no-table-headers", "name", "type") {
		if len(row) == 2 && row[0] == name {
			return row[1]
		}
	}
	return ""
}

// TestQuorumQueueRejectsWhatItCannotBe: Check refuses a quorum queue that
// is exclusive, auto-delete or not durable, naming the field, one
// problem each.
func TestQuorumQueueRejectsWhatItCannotBe(t *testing.T) {
	for _, c := range []struct {
		over  map[string]interface{}
		field string
	}{
		{map[string]interface{}{"exclusive": true}, "extra_config.async/amqp.exclusive: a quorum queue cannot be exclusive"},
		{map[string]interface{}{"delete": true}, "extra_config.async/amqp.delete: a quorum queue cannot be auto-delete"},
		{map[string]interface{}{"durable": false}, "extra_config.async/amqp.durable: a quorum queue is always durable"},
	} {
		b := block("q", "x", c.over)
		b["queue_args"] = map[string]interface{}{"x-queue-type": "quorum"}
		agent := &luraconfig.AsyncAgent{
			Name: "quorum", Consumer: luraconfig.Consumer{Topic: "k"},
			Backend:     []*luraconfig.Backend{{URLPattern: "/events"}},
			ExtraConfig: blocks(b),
		}
		err := asyncamqp.Check(agent)
		if err == nil {
			t.Errorf("%v: Check accepted a quorum queue with it", c.over)
			continue
		}
		if want := `agent "quorum": ` + c.field; !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: Check says %q, want one problem: %q", c.over, err, want)
		}
	}
}

// TestQuorumQueue: an agent declares a quorum queue from queue_args; it
// acks, a failing message goes through the retry queues and is acked on
// its second attempt, and a stop mid-flight hands the undispatched
// messages back to the quorum queue (nack with requeue), none lost.
func TestQuorumQueue(t *testing.T) {
	f := newFixture(t)
	var mu sync.Mutex
	seen := map[string]int{}
	var slow atomic.Bool
	be := newBackend(t, func(_ int, r received) int {
		if slow.Load() {
			time.Sleep(20 * time.Millisecond)
		}
		mu.Lock()
		defer mu.Unlock()
		id := r.Header.Get("X-Amqp-Message-Id")
		seen[id]++
		if !slow.Load() && strings.HasSuffix(id, "7") && seen[id] == 1 {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	spec := agentSpec{Name: "quorum", Topic: "k", Workers: 4, Backend: be.URL, Block: block(f.queue, f.exchange, map[string]interface{}{
		"queue_args": map[string]interface{}{"x-queue-type": "quorum"}, "retry": fastRetry(5), "prefetch_count": 20,
	})}
	gw := startAgents(t, spec)
	gw.waitPing(t, "quorum")
	if got := queueType(t, f.queue); got != "quorum" {
		t.Fatalf("queue type %q, want quorum", got)
	}
	// The way back from a retry queue is the broker's dead-lettering:
	// at-least-once only between quorum queues.
	for _, d := range []string{"50ms", "100ms", "200ms"} {
		retryQueue := f.queue + ".retry." + d
		if got := queueType(t, retryQueue); got != "quorum" {
			t.Errorf("retry queue %s: type %q, want quorum", retryQueue, got)
		}
		args := queueArguments(t, retryQueue)
		for _, want := range []string{"x-dead-letter-strategy", "at-least-once", "x-overflow", "reject-publish"} {
			if !strings.Contains(args, want) {
				t.Errorf("retry queue %s: arguments %s lack %s", retryQueue, args, want)
			}
		}
	}

	const n = 40 // ids 7, 17, 27, 37 fail once
	f.pub.PublishN(f.exchange, "k", n, jsonBody)
	brokertest.Eventually(t, 30*time.Second, "44 dispatches", func() bool { return be.count() >= n+4 })
	f.waitEmpty(t)
	if be.count() != n+4 {
		t.Errorf("%d dispatches, want %d (each message once, the 4 failing ones twice)", be.count(), n+4)
	}
	attempts := map[string][]string{}
	for _, r := range be.requests() {
		id := r.Header.Get("X-Amqp-Message-Id")
		attempts[id] = append(attempts[id], r.Header.Get("X-Amqp-Attempt"))
	}
	for i := range n {
		id := strconv.Itoa(i)
		want := []string{"1"}
		if strings.HasSuffix(id, "7") {
			want = []string{"1", "2"}
		}
		if !slices.Equal(attempts[id], want) {
			t.Errorf("message %s: attempts %v, want %v", id, attempts[id], want)
		}
	}

	// Requeue: stop while messages are prefetched but not dispatched.
	slow.Store(true)
	before := be.count()
	const m = 400
	f.pub.PublishN(f.exchange, "k", m, func(i int) []byte { return jsonBody(1000 + i) })
	brokertest.Eventually(t, 30*time.Second, "the second batch under way", func() bool { return be.count() >= before+40 })
	gw.stop(t)
	// A quorum queue applies the returns through its Raft log, so its
	// counts settle a moment after the connection has closed.
	brokertest.Eventually(t, 10*time.Second, "no message unacked after the stop", func() bool {
		_, unacked := brokertest.Counts(t, f.queue)
		return unacked == 0
	})
	handled := map[string]bool{}
	for _, r := range be.requests()[before:] {
		handled[string(r.Body)] = true
	}
	left := drainBodies(t, f.conn, f.queue)
	for _, b := range left {
		handled[b] = true
	}
	if len(handled) != m {
		t.Errorf("lost %d of %d messages: the backend saw %d, the quorum queue kept %d", m-len(handled), m, be.count()-before, len(left))
	}
	if len(left) == 0 {
		t.Error("the stop was not mid-flight: nothing was left in the queue")
	}
}

// drainBodies takes every ready message off a queue and returns the
// bodies.
func drainBodies(t *testing.T, conn *amqp.Connection, queue string) []string {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	var out []string
	for {
		d, ok, err := ch.Get(queue, false)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return out
		}
		out = append(out, string(d.Body))
		_ = d.Ack(false)
	}
}

// ---------------------------------------------------------------- bindings

// bindingKeys lists the routing keys binding exchange to queue.
func bindingKeys(t *testing.T, exchange, queue string) []string {
	t.Helper()
	var keys []string
	for _, row := range brokertest.Rabbitmqctl(t, "list_bindings", "--no-table-headers", "source_name", "destination_name", "routing_key") {
		if len(row) == 3 && row[0] == exchange && row[1] == queue {
			keys = append(keys, row[2])
		}
	}
	sort.Strings(keys)
	return keys
}

func publishKeyed(f fixture, keys ...string) {
	for _, k := range keys {
		f.pub.Publish(f.exchange, k, amqp.Publishing{MessageId: k, Body: []byte(`{}`)})
	}
}

func sortedIDs(b *backend) []string {
	out := ids(b.requests())
	sort.Strings(out)
	return out
}

// TestRoutingKeysBindEveryKey: routing_keys binds the queue with each
// key, in place of consumer.topic; messages on each arrive, others do not.
func TestRoutingKeysBindEveryKey(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "keys", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"routing_keys": []string{"a.*", "b.#"}})})
	gw.waitPing(t, "keys")
	if got := bindingKeys(t, f.exchange, f.queue); !slices.Equal(got, []string{"a.*", "b.#"}) {
		t.Errorf("bindings %q, want [a.* b.#]", got)
	}
	// c.x is published before the last one: had it been routed, it
	// would have arrived before the queue emptied.
	publishKeyed(f, "a.1", "b", "b.x.y", "c.x", "a.2.3", "a.last")
	brokertest.Eventually(t, 10*time.Second, "a.last at the backend", func() bool { return slices.Contains(ids(be.requests()), "a.last") })
	f.waitEmpty(t)
	if got := sortedIDs(be); !slices.Equal(got, []string{"a.1", "a.last", "b", "b.x.y"}) {
		t.Errorf("the backend got %q, want [a.1 a.last b b.x.y]", got)
	}
	gw.expectLogs(t, `with "a.*", "b.#" as`)
}

// TestExchangeTypes: exchange_type direct and fanout declare exchanges of
// that type and route as such.
func TestExchangeTypes(t *testing.T) {
	for _, c := range []struct {
		kind      string
		topic     string
		published []string
		want      []string
	}{
		{"direct", "d1", []string{"d1.x", "d2", "d1"}, []string{"d1"}},
		{"fanout", "", []string{"any", "other.key"}, []string{"any", "other.key"}},
	} {
		t.Run(c.kind, func(t *testing.T) {
			f := newFixture(t)
			be := newBackend(t, nil)
			gw := startAgents(t, agentSpec{Name: c.kind, Topic: c.topic, Workers: 1, Backend: be.URL,
				Block: block(f.queue, f.exchange, map[string]interface{}{"exchange_type": c.kind})})
			gw.waitPing(t, c.kind)
			if kind, durable, _, _, ok := brokertest.Exchange(t, f.exchange); !ok || kind != c.kind || !durable {
				t.Fatalf("exchange: found %t, type %q, durable %t; want a durable %s", ok, kind, durable, c.kind)
			}
			publishKeyed(f, c.published...)
			last := c.want[len(c.want)-1]
			brokertest.Eventually(t, 10*time.Second, last+" at the backend", func() bool { return slices.Contains(ids(be.requests()), last) })
			f.waitEmpty(t)
			if got := sortedIDs(be); !slices.Equal(got, c.want) {
				t.Errorf("the backend got %q, want %q", got, c.want)
			}
		})
	}
}

// TestTopologyPassive: with topology "passive" the agent consumes from an
// exchange and a queue the operator declared, binds nothing, and reports
// a missing queue by name without creating it.
func TestTopologyPassive(t *testing.T) {
	t.Run("pre-declared", func(t *testing.T) {
		f := newFixture(t)
		preDeclare(t, f, "topic", true, "k")
		be := newBackend(t, nil)
		gw := startAgents(t, agentSpec{Name: "passive", Topic: "not.bound", Workers: 1, Backend: be.URL,
			Block: block(f.queue, f.exchange, map[string]interface{}{"topology": "passive"})})
		gw.waitPing(t, "passive")
		f.pub.PublishN(f.exchange, "k", 5, jsonBody)
		brokertest.Eventually(t, 10*time.Second, "5 messages at the backend", func() bool { return be.count() >= 5 })
		f.waitEmpty(t)
		if got := bindingKeys(t, f.exchange, f.queue); !slices.Equal(got, []string{"k"}) {
			t.Errorf("bindings %q, want the operator's [k] only", got)
		}
	})
	t.Run("queue missing", func(t *testing.T) {
		f := newFixture(t)
		ch, err := f.conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		if err := ch.ExchangeDeclare(f.exchange, "topic", true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		ch.Close()
		be := newBackend(t, nil)
		gw := startAgents(t, agentSpec{Name: "passive-missing", Topic: "k", Workers: 1, Backend: be.URL,
			Block: block(f.queue, f.exchange, map[string]interface{}{"topology": "passive"})})
		want := fmt.Sprintf("queue %q does not exist", f.queue)
		brokertest.Eventually(t, 15*time.Second, "the missing queue in the log", func() bool {
			return strings.Count(gw.logs.String(), want) >= 2 // the first attempt and a retry
		})
		if _, ok := brokertest.Queue(t, f.queue); ok {
			t.Errorf("queue %s was created in passive mode", f.queue)
		}
		gw.expectLogs(t, "[AMQP][passive-missing] "+want, "retry 1 in")
	})
}

// TestTopologyNone: with topology "none" the agent consumes from a queue
// the operator declared and declares nothing: the exchange named in its
// block is never created.
func TestTopologyNone(t *testing.T) {
	f := newFixture(t)
	preDeclare(t, f, "", false)
	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "none", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"topology": "none"})})
	gw.waitPing(t, "none")
	for i := range 5 {
		f.pub.Publish("", f.queue, amqp.Publishing{MessageId: strconv.Itoa(i), Body: []byte(`{}`)})
	}
	brokertest.Eventually(t, 10*time.Second, "5 messages at the backend", func() bool { return be.count() >= 5 })
	f.waitEmpty(t)
	if _, _, _, _, found := brokertest.Exchange(t, f.exchange); found {
		t.Errorf("exchange %s was declared with topology none", f.exchange)
	}
	var retryQueues []string
	for _, row := range brokertest.Rabbitmqctl(t, "list_queues", "--no-table-headers", "name") {
		if strings.HasPrefix(row[0], f.queue+".retry.") {
			retryQueues = append(retryQueues, row[0])
		}
	}
	// The driver still declares its own retry queues: it owns retries.
	t.Logf("retry queues declared with topology none: %v", retryQueues)
}

// ---------------------------------------------------------------- clusters

// TestHostsAreTriedInTurn: the first host is a dead port; the agent
// connects through the next one, on start and on every reconnect, and
// logs the host that failed, without its password.
func TestHostsAreTriedInTurn(t *testing.T) {
	f := newFixture(t)
	be := newBackend(t, nil)
	const deadPassword = "dead-host-s3cret"
	dead := "amqp://guest:" + deadPassword + "@127.0.0.1:1/"
	name := brokertest.Name(t, "agent")
	gw := startAgents(t, agentSpec{Name: name, Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"host": dead, "hosts": []string{brokertest.URL()}})})
	gw.waitPing(t, name)
	f.pub.PublishN(f.exchange, "k", 5, jsonBody)
	brokertest.Eventually(t, 10*time.Second, "5 messages", func() bool { return be.count() >= 5 })

	if n := brokertest.CloseConnections(t, "krakend-amqp "+name+"@"); n != 2 {
		t.Fatalf("closed %d connections, want 2 (consuming, copies)", n)
	}
	brokertest.Eventually(t, 20*time.Second, "a second session", func() bool {
		return strings.Count(gw.logs.String(), "consuming queue") >= 2
	})
	f.pub.PublishN(f.exchange, "k", 5, func(i int) []byte { return jsonBody(100 + i) })
	brokertest.Eventually(t, 10*time.Second, "10 messages", func() bool { return be.count() >= 10 })
	gw.stop(t)

	failover := fmt.Sprintf("connected to %s after failing to reach the hosts before it: connect to amqp://guest:xxxxx@127.0.0.1:1/: dial tcp 127.0.0.1:1:",
		config.Redacted(brokertest.URL()))
	if n := strings.Count(gw.logs.String(), failover); n != 2 {
		t.Errorf("%d lines %q, want 2 (start and reconnect):\n%s", n, failover, gw.logs.String())
	}
	assertNoSecrets(t, gw.logs.String(), deadPassword)
}

// ---------------------------------------------------------------- competing consumers

// handledBy maps message ids to how many times a backend saw each.
func handledBy(backends ...*backend) (perID map[string]int, total int) {
	perID = map[string]int{}
	for _, b := range backends {
		for _, id := range ids(b.requests()) {
			perID[id]++
			total++
		}
	}
	return perID, total
}

// TestCompetingConsumers runs two gateways (two AgentStarter runs) on one
// queue. Steady: 2,000 messages split between them, each a share, none
// twice. Then one gateway stops mid-flight: the other takes what it
// handed back, and every message is handled.
func TestCompetingConsumers(t *testing.T) {
	const n = 2000
	start := func(t *testing.T, f fixture, delay time.Duration, workers int) (gws []*gateway, bes []*backend) {
		for i := range 2 {
			be := newBackend(t, nil)
			be.delay = delay
			name := fmt.Sprintf("gw%d", i+1)
			gw := startAgents(t, agentSpec{Name: name, Topic: "k", Workers: workers, Backend: be.URL, Block: block(f.queue, f.exchange, nil)})
			gw.waitPing(t, name)
			gws, bes = append(gws, gw), append(bes, be)
		}
		if c, _ := brokertest.Queue(t, f.queue); c.Consumers != 2 {
			t.Fatalf("queue has %d consumers, want 2", c.Consumers)
		}
		return gws, bes
	}

	t.Run("steady", func(t *testing.T) {
		f := newFixture(t)
		_, bes := start(t, f, time.Millisecond, 4)
		f.pub.PublishN(f.exchange, "k", n, jsonBody)
		brokertest.Eventually(t, 2*time.Minute, "2000 requests", func() bool { return bes[0].count()+bes[1].count() >= n })
		f.waitEmpty(t)
		perID, total := handledBy(bes...)
		t.Logf("gw1 handled %d, gw2 %d", bes[0].count(), bes[1].count())
		for i, be := range bes {
			if be.count() <= n/10 {
				t.Errorf("gw%d handled %d of %d messages, want more than 10%%", i+1, be.count(), n)
			}
		}
		if len(perID) != n || total != n {
			t.Errorf("%d distinct messages handled in %d requests, want %d and no duplicate", len(perID), total, n)
		}
	})

	t.Run("one stops mid-flight", func(t *testing.T) {
		f := newFixture(t)
		gws, bes := start(t, f, 5*time.Millisecond, 2)
		f.pub.PublishN(f.exchange, "k", n, jsonBody)
		brokertest.Eventually(t, time.Minute, "processing under way", func() bool { return bes[0].count() >= 200 })
		gws[0].stop(t)
		stoppedAt := bes[0].count()
		if stoppedAt >= n/2+n/10 {
			t.Fatalf("gw1 had handled %d messages when it stopped: not mid-flight", stoppedAt)
		}
		brokertest.Eventually(t, 2*time.Minute, "every message handled", func() bool {
			perID, _ := handledBy(bes...)
			return len(perID) == n
		})
		f.waitEmpty(t)
		if got := brokertest.Pending(t, f.queue); got != 0 {
			t.Errorf("Pending = %d at the end", got)
		}
		if bes[0].count() != stoppedAt {
			t.Errorf("gw1 handled %d messages after it stopped", bes[0].count()-stoppedAt)
		}
		perID, total := handledBy(bes...)
		var dups []string
		for id, c := range perID {
			if c > 1 {
				dups = append(dups, id)
			}
		}
		sort.Strings(dups)
		// At-least-once allows a duplicate when the stop cuts a
		// dispatch after the backend answered but before the ack.
		t.Logf("gw1 handled %d before its stop, gw2 %d; %d requests for %d messages; duplicates: %d %v",
			stoppedAt, bes[1].count(), total, len(perID), len(dups), dups)
	})
}

// ---------------------------------------------------------------- logs

// addBrokerUser creates a RabbitMQ user with a random password and full
// permissions on the test broker's virtual host; it is deleted when the
// test ends.
func addBrokerUser(t *testing.T) (user, password string) {
	t.Helper()
	var b [16]byte
	_, _ = rand.Read(b[:])
	password = hex.EncodeToString(b[:])
	user = "krakend-test-" + password[:8]
	password = password[8:]
	u, _ := url.Parse(brokertest.URL())
	vhost := strings.TrimPrefix(u.Path, "/")
	if vhost == "" {
		vhost = "/"
	} else if v, err := url.PathUnescape(vhost); err == nil {
		vhost = v
	}
	brokertest.Rabbitmqctl(t, "add_user", user, password)
	t.Cleanup(func() { brokertest.Rabbitmqctl(t, "delete_user", user) })
	brokertest.Rabbitmqctl(t, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
	return user, password
}

// TestLogsNeverHoldThePassword captures every log line of a run (start
// through a dead first host, messages with failures and retries at DEBUG,
// a connection the broker closes, the stop) with a dedicated user's
// random password in the URLs: the password is in none of them, and the
// state changes are.
func TestLogsNeverHoldThePassword(t *testing.T) {
	user, password := addBrokerUser(t)
	withUser := func(raw string) string {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		u.User = url.UserPassword(user, password)
		return u.String()
	}
	f := newFixture(t)
	var mu sync.Mutex
	seen := map[string]int{}
	be := newBackend(t, func(_ int, r received) int {
		mu.Lock()
		defer mu.Unlock()
		id := r.Header.Get("X-Amqp-Message-Id")
		if seen[id]++; strings.HasSuffix(id, "7") && seen[id] == 1 {
			return http.StatusBadGateway
		}
		return http.StatusOK
	})
	name := brokertest.Name(t, "agent")
	gw := startAgents(t, agentSpec{Name: name, Topic: "k", Workers: 2, Backend: be.URL, Block: block(f.queue, f.exchange, map[string]interface{}{
		"host":  withUser("amqp://127.0.0.1:1/"),
		"hosts": []string{withUser(brokertest.URL())},
		"retry": fastRetry(3),
	})})
	gw.waitPing(t, name)
	f.pub.PublishN(f.exchange, "k", 20, jsonBody)
	brokertest.Eventually(t, 20*time.Second, "22 dispatches", func() bool { return be.count() >= 22 })
	f.waitEmpty(t)

	if n := brokertest.CloseConnections(t, "krakend-amqp "+name+"@"); n != 2 {
		t.Fatalf("closed %d connections, want 2 (consuming, copies)", n)
	}
	brokertest.Eventually(t, 20*time.Second, "a second session", func() bool {
		return strings.Count(gw.logs.String(), "consuming queue") >= 2
	})
	f.pub.PublishN(f.exchange, "k", 10, func(i int) []byte { return jsonBody(100 + i) })
	brokertest.Eventually(t, 20*time.Second, "the second batch", func() bool { return be.count() >= 32 })
	f.waitEmpty(t)
	gw.stop(t)

	logs := gw.logs.String()
	if strings.Contains(logs, password) {
		t.Errorf("the password is in the logs:\n%s", logs)
	}
	prefix := "[SERVICE: AsyncAgent][AMQP][" + name + "] "
	gw.expectLogs(t,
		prefix+"connected to amqp://"+user+":xxxxx@", // the redacted URLs are there
		prefix+"consuming queue",
		prefix+"session lost: Exception (320) Reason: \"CONNECTION_FORCED",
		"retry 1 in",
		"messages failed and were scheduled for a retry or dead-lettered; last failure: invalid status code 502",
		prefix+"stopping",
		prefix+"stopped",
	)
}

// TestQuorumDeliveryCountReachesTheBackend: a message a quorum queue
// delivers again (here after a consumer closed its channel without an
// ack) reaches the backend with X-Amqp-Delivery-Count, the broker's
// x-delivery-count; a first delivery never has it, even when its
// publisher set an x-delivery-count header (passed as any header).
func TestQuorumDeliveryCountReachesTheBackend(t *testing.T) {
	f := newFixture(t)
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if _, err := ch.QueueDeclare(f.queue, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		t.Fatal(err)
	}
	f.pub.Publish("", f.queue, amqp.Publishing{MessageId: "again", Body: []byte(`{}`)})
	// The broker returns the message when the channel closes unacked.
	taker, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	ds, err := taker.Consume(f.queue, "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-ds:
	case <-time.After(10 * time.Second):
		t.Fatal("the message was not delivered")
	}
	_ = taker.Close()
	f.pub.Publish("", f.queue, amqp.Publishing{MessageId: "first", Body: []byte(`{}`),
		Headers: amqp.Table{"x-delivery-count": int64(7)}})

	be := newBackend(t, nil)
	gw := startAgents(t, agentSpec{Name: "counted", Topic: "k", Workers: 1, Backend: be.URL,
		Block: block(f.queue, f.exchange, map[string]interface{}{"queue_args": map[string]interface{}{"x-queue-type": "quorum"}})})
	gw.waitPing(t, "counted")
	brokertest.Eventually(t, 20*time.Second, "both messages at the backend", func() bool { return be.count() >= 2 })
	for _, r := range be.requests() {
		id, count := r.Header.Get("X-Amqp-Message-Id"), r.Header.Get("X-Amqp-Delivery-Count")
		switch id {
		case "again":
			if n, err := strconv.Atoi(count); err != nil || n < 1 || r.Header.Get("X-Amqp-Redelivered") != "true" {
				t.Errorf("redelivered message: X-Amqp-Delivery-Count %q, X-Amqp-Redelivered %q; want a count of at least 1, true",
					count, r.Header.Get("X-Amqp-Redelivered"))
			}
		case "first":
			if count != "" {
				t.Errorf("first delivery: X-Amqp-Delivery-Count %q, want none (the publisher's header is not the broker's count)", count)
			}
			if got := r.Header.Get("X-Amqp-Header-X-Delivery-Count"); got != "7" {
				t.Errorf("first delivery: the publisher's header came as %q, want 7", got)
			}
		default:
			t.Errorf("unexpected message %q", id)
		}
	}
}
