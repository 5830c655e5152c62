// Package consumer owns one AMQP session of an agent: it dials the broker,
// declares the topology (topic exchange, queue, binding), sets the prefetch
// window and starts consuming. A Session is single-use: when it ends,
// because the broker or the network closed it or because it was cancelled,
// the caller opens a new one. Reconnect policy lives in the driver. The
// consuming connection reads through a frame filter (frames.go), so that
// a message whose headers amqp091 cannot decode arrives with them emptied
// (Session.Unreadable) instead of closing the connection.
package consumer

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
)

// Topology is what the session declares before it consumes.
type Topology struct {
	Exchange     string
	ExchangeType string
	Queue        string
	RoutingKeys  []string
	// QueueArgs are the queue declaration's arguments (x-queue-type...).
	QueueArgs amqp.Table
	// Mode is config.TopologyDeclare, TopologyPassive or TopologyNone.
	Mode string
	// Durable applies to the exchange and the queue.
	Durable bool
	// AutoDelete applies to the exchange and the queue.
	AutoDelete bool
	// Exclusive applies to the queue and the consumer, never to the
	// exchange (whose third flag is "internal").
	Exclusive bool
	NoWait    bool
}

// Settings configure one session.
type Settings struct {
	// URLs are tried in turn. They hold credentials: errors and logs
	// only ever show config.Redacted(url).
	URLs []string
	// TLS is used for amqps:// URLs; nil means amqp091's defaults.
	TLS *tls.Config
	Topology
	PrefetchCount int
	PrefetchSize  int
	AutoAck       bool
	NoLocal       bool
	// Name identifies the agent to the broker (connection name and
	// consumer tag prefix).
	Name        string
	DialTimeout time.Duration
	// RetryDelays declares one retry queue per delay (see RetryQueue).
	RetryDelays []time.Duration
	// DeadLetterQueue is declared durable when set.
	DeadLetterQueue string
	// DeadLetterExchange must exist when set (checked passively).
	DeadLetterExchange string
	// Publish opens a connection of its own, with a channel in confirm
	// mode, for retries and dead letters.
	Publish bool
	// OnBlocked, when set, hears when the broker blocks the publishing
	// connection (a memory or disk alarm) and unblocks it.
	OnBlocked func(blocked bool, reason string)
}

// Session is one connection, one channel and one consumer, and, when it
// publishes copies, a second connection for them.
type Session struct {
	ch         *amqp.Channel
	pub        *publisher
	pubConn    *amqp.Connection
	retries    map[string]time.Duration // retry queue names and their delays
	settings   Settings
	tag        string
	deliveries <-chan amqp.Delivery
	closed     chan *amqp.Error
	done       chan struct{} // closed with the consuming channel
	dialed
}

// dialed is the outcome of trying the URLs in turn.
type dialed struct {
	conn *amqp.Connection
	// refused holds the deliveries whose headers the frame filter
	// replaced.
	refused *unreadable
	// index of the URL connected to in Settings.URLs, and its redacted
	// form; skipped holds why the URLs tried before it failed.
	index   int
	host    string
	skipped error
}

// Open dials, declares the topology and starts consuming. Nothing is taken
// off the queue before Open returns the session to its caller, who must
// drain Deliveries until it is closed. When ctx ends before Open is done,
// Open closes what it opened and returns an error wrapping ctx.Err(), even
// if the broker stopped answering.
func Open(ctx context.Context, s Settings) (*Session, error) {
	d, err := dialAny(ctx, s)
	if err != nil {
		return nil, err
	}
	// The declarations, qos and consume take no context: closing the
	// connections when ctx ends is what ends a call the broker does not
	// answer.
	o := &opening{conns: []*amqp.Connection{d.conn}, done: make(chan struct{})}
	stop := context.AfterFunc(ctx, o.abort)
	sess, err := setUp(d, s)
	if err == nil && s.Publish {
		err = sess.openPublisher(ctx, s, o)
	}
	if err == nil {
		err = sess.consume()
	}
	if err != nil {
		if sess != nil {
			_ = sess.Close()
		} else {
			d.conn.Close()
		}
	}
	if !stop() { // ctx ended: abort has closed the connections, or is closing them
		<-o.done
		if err == nil {
			_ = sess.Close()
		}
		return nil, fmt.Errorf("set up the session on %s: %w", d.host, ctx.Err())
	}
	if err != nil {
		return nil, err
	}
	return sess, nil
}

// opening holds the connections of a session being opened, for abort.
type opening struct {
	mu      sync.Mutex
	conns   []*amqp.Connection
	aborted bool
	done    chan struct{} // closed when abort has returned
}

// add hands conn over to abort; false when abort has already run, and
// conn is closed.
func (o *opening) add(conn *amqp.Connection) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.aborted {
		_ = conn.CloseDeadline(time.Now())
		return false
	}
	o.conns = append(o.conns, conn)
	return true
}

// abort closes the connections without waiting for a broker that may not
// answer, and every call waiting on them fails. The deadline is already
// past, so that the socket is closed at once: a later one would bound the
// close handshake only until amqp091's heartbeater, on the next frame
// read, sets the read deadline again.
func (o *opening) abort() {
	defer close(o.done)
	o.mu.Lock()
	o.aborted = true
	conns := o.conns
	o.mu.Unlock()
	for _, conn := range conns {
		_ = conn.CloseDeadline(time.Now())
	}
}

// openPublisher dials the broker the session is on a second time, for
// the copies. The session ends with either connection.
func (sess *Session) openPublisher(ctx context.Context, s Settings, o *opening) error {
	conn, err := dial(ctx, s.URLs[sess.index], s, " (copies)", nil)
	if err != nil {
		return fmt.Errorf("connect for publishing copies to %s: %w", sess.host, err)
	}
	if !o.add(conn) {
		return fmt.Errorf("connect for publishing copies to %s: %w", sess.host, ctx.Err())
	}
	sess.pubConn, sess.pub = conn, newPublisher(conn)
	go closeWith(conn.NotifyClose(make(chan *amqp.Error, 1)), sess.conn)
	go closeWith(sess.conn.NotifyClose(make(chan *amqp.Error, 1)), conn)
	if s.OnBlocked != nil {
		go func(blocks <-chan amqp.Blocking) {
			for b := range blocks {
				s.OnBlocked(b.Active, b.Reason)
			}
		}(conn.NotifyBlocked(make(chan amqp.Blocking, 1)))
	}
	return nil
}

// dialAny tries each URL in turn and returns the first connection, with
// its redacted URL and the failures of the URLs tried before it, or every
// failure.
func dialAny(ctx context.Context, s Settings) (dialed, error) {
	var errs []error
	for i, u := range s.URLs {
		refused := new(unreadable)
		conn, err := dial(ctx, u, s, "", refused)
		if err == nil {
			return dialed{conn: conn, refused: refused, index: i, host: config.Redacted(u), skipped: errors.Join(errs...)}, nil
		}
		errs = append(errs, fmt.Errorf("connect to %s: %w", config.Redacted(u), err))
		if ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 0 {
		return dialed{}, errors.New("no broker URL to connect to")
	}
	return dialed{}, errors.Join(errs...)
}

// dial connects to rawURL; role is added to the connection name. The
// consuming connection (filter not nil) reads through a frameFilter,
// which must see the AMQP frames, not TLS records: so dial does the TCP
// and TLS steps that amqp.DialConfig would, and fills the amqp.Config as
// it would from the URL, then hands the connection to amqp.Open.
func dial(ctx context.Context, rawURL string, s Settings, role string, filter *unreadable) (*amqp.Connection, error) {
	uri, err := amqp.ParseURI(rawURL)
	if err != nil {
		return nil, err
	}
	cfg, err := openConfig(uri, rawURL, s, role)
	if err != nil {
		return nil, err
	}
	timeout := s.DialTimeout
	if timeout <= 0 && uri.ConnectionTimeout > 0 {
		timeout = time.Duration(uri.ConnectionTimeout) * time.Millisecond
	}
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(uri.Host, strconv.Itoa(uri.Port)))
	if err != nil {
		return nil, err
	}
	// Bounds the TLS and AMQP handshakes; amqp091 clears it once the
	// connection is open and heartbeats take over.
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		conn.Close()
		return nil, err
	}
	if uri.Scheme == "amqps" {
		tc, err := tlsConfig(uri, s.TLS)
		if err != nil {
			conn.Close()
			return nil, err
		}
		tconn := tls.Client(conn, tc)
		if err := tconn.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, err
		}
		conn = tconn
	}
	if filter != nil {
		conn = newFrameFilter(conn, cfg.FrameSize, filter.add)
	}
	c, err := amqp.Open(conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// openConfig is the amqp.Config that amqp.DialConfig would build from
// the URL (vhost, SASL mechanisms, heartbeat, channel max, frame size,
// locale), with the connection's name and product.
func openConfig(uri amqp.URI, rawURL string, s Settings, role string) (amqp.Config, error) {
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName(connectionName(s.Name) + role)
	props["product"] = "krakend-contrib/async-amqp"
	cfg := amqp.Config{
		Properties: props,
		Vhost:      uri.Vhost,
		ChannelMax: uri.ChannelMax,
		FrameSize:  131072, // amqp091's default, RabbitMQ's frame_max
		Heartbeat:  10 * time.Second,
		Locale:     "en_US",
	}
	// amqp.URI keeps whether the URL set a heartbeat to itself; 0 is a
	// value (no heartbeats), so read the query again.
	if u, err := url.Parse(rawURL); err == nil && u.Query().Has("heartbeat") {
		secs, err := strconv.ParseUint(u.Query().Get("heartbeat"), 10, 16)
		if err != nil {
			return cfg, fmt.Errorf("heartbeat is not an uint16: %w", err)
		}
		cfg.Heartbeat = time.Duration(secs) * time.Second
	}
	if len(uri.AuthMechanism) == 0 {
		cfg.SASL = []amqp.Authentication{uri.PlainAuth()}
	}
	for _, m := range uri.AuthMechanism {
		switch strings.ToUpper(m) {
		case "PLAIN":
			cfg.SASL = append(cfg.SASL, uri.PlainAuth())
		case "AMQPLAIN":
			cfg.SASL = append(cfg.SASL, uri.AMQPlainAuth())
		case "EXTERNAL":
			cfg.SASL = append(cfg.SASL, &amqp.ExternalAuth{})
		default:
			return cfg, fmt.Errorf("unsupported auth_mechanism: %v", m)
		}
	}
	return cfg, nil
}

// tlsConfig is the session's TLS configuration, or the one the URL's
// cacertfile, certfile, keyfile and server_name_indication describe, as
// amqp091 builds it; the server name is the URL's host unless set.
func tlsConfig(uri amqp.URI, base *tls.Config) (*tls.Config, error) {
	var c *tls.Config
	if base != nil {
		c = base.Clone()
	} else {
		c = &tls.Config{ServerName: uri.ServerName, MinVersion: tls.VersionTLS12}
		if uri.CACertFile != "" {
			pem, err := os.ReadFile(uri.CACertFile)
			if err != nil {
				return nil, fmt.Errorf("read CA certificate: %w", err)
			}
			c.RootCAs = x509.NewCertPool()
			c.RootCAs.AppendCertsFromPEM(pem)
		}
		if uri.CertFile != "" && uri.KeyFile != "" {
			cert, err := tls.LoadX509KeyPair(uri.CertFile, uri.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("load client certificate: %w", err)
			}
			c.Certificates = []tls.Certificate{cert}
		}
	}
	if c.ServerName == "" {
		c.ServerName = uri.Host
	}
	return c, nil
}

func setUp(d dialed, s Settings) (*Session, error) {
	conn := d.conn
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open channel: %w", err)
	}
	sess := &Session{dialed: d, ch: ch, tag: consumerTag(s.Name), settings: s, retries: RetryQueues(s.Queue, s.RetryDelays)}
	sess.closed = ch.NotifyClose(make(chan *amqp.Error, 1))
	sess.done = make(chan struct{})
	go closeWhenClosed(ch.NotifyClose(make(chan *amqp.Error, 1)), sess.done)
	if err := declare(ch, s.Topology); err != nil {
		return nil, err
	}
	if err := declareFailurePaths(conn, ch, s); err != nil {
		return nil, err
	}
	if err := ch.Qos(s.PrefetchCount, s.PrefetchSize, false); err != nil {
		return nil, qosError(err, s)
	}
	return sess, nil
}

// consume starts the consumer: from here on the broker delivers.
func (s *Session) consume() error {
	t := s.settings
	var err error
	s.deliveries, err = s.ch.Consume(t.Queue, s.tag, t.AutoAck, t.Exclusive, t.NoLocal, t.NoWait, nil)
	if err != nil {
		return fmt.Errorf("consume from queue %q: %w", t.Queue, err)
	}
	return nil
}

// declare maps the configuration to the declarations in one place,
// naming every positional flag.
func declare(ch *amqp.Channel, t Topology) error {
	switch t.Mode {
	case config.TopologyNone:
		return nil
	case config.TopologyPassive:
		return checkExists(ch, t)
	}
	const internal = false
	err := ch.ExchangeDeclare(t.Exchange, t.ExchangeType, t.Durable, t.AutoDelete, internal, t.NoWait, nil)
	if err != nil {
		return exchangeError(err, t)
	}
	_, err = ch.QueueDeclare(t.Queue, t.Durable, t.AutoDelete, t.Exclusive, t.NoWait, t.QueueArgs)
	if err != nil {
		return queueError(err, t)
	}
	for _, key := range t.RoutingKeys {
		if err := ch.QueueBind(t.Queue, key, t.Exchange, t.NoWait, nil); err != nil {
			return fmt.Errorf("bind queue %q to exchange %q with routing key %q: %w", t.Queue, t.Exchange, key, err)
		}
	}
	return nil
}

// checkExists passively declares the exchange and the queue: the broker
// answers 404 for one that is missing, and the error says which.
func checkExists(ch *amqp.Channel, t Topology) error {
	err := ch.ExchangeDeclarePassive(t.Exchange, t.ExchangeType, t.Durable, t.AutoDelete, false, false, nil)
	if isCode(err, amqp.NotFound) {
		return fmt.Errorf("exchange %q does not exist (topology is passive: the driver declares nothing): %w", t.Exchange, err)
	}
	if err != nil {
		return fmt.Errorf("check exchange %q: %w", t.Exchange, err)
	}
	_, err = ch.QueueDeclarePassive(t.Queue, t.Durable, t.AutoDelete, t.Exclusive, false, nil)
	if isCode(err, amqp.NotFound) {
		return fmt.Errorf("queue %q does not exist (topology is passive: the driver declares nothing): %w", t.Queue, err)
	}
	if err != nil {
		return fmt.Errorf("check queue %q: %w", t.Queue, err)
	}
	return nil
}

// declareFailurePaths declares the retry queues, whose TTL sends each
// message back to the work queue through the default exchange, and the
// dead-letter queue, or checks that the dead-letter exchange exists.
func declareFailurePaths(conn *amqp.Connection, ch *amqp.Channel, s Settings) error {
	for _, d := range s.RetryDelays {
		if err := declareRetryQueue(ch, s, d); err != nil {
			return err
		}
	}
	if s.DeadLetterQueue != "" {
		if err := declareDeadLetterQueue(conn, s); err != nil {
			return err
		}
	}
	if s.DeadLetterExchange != "" {
		if err := ch.ExchangeDeclarePassive(s.DeadLetterExchange, "topic", false, false, false, false, nil); err != nil {
			if isCode(err, amqp.NotFound) {
				return fmt.Errorf("dead-letter exchange %q does not exist: declare it and bind a queue to it: %w", s.DeadLetterExchange, err)
			}
			return fmt.Errorf("check dead-letter exchange %q: %w", s.DeadLetterExchange, err)
		}
	}
	return nil
}

// declareRetryQueue declares the retry queue of one delay: its TTL sends
// each message back to the work queue through the default exchange.
func declareRetryQueue(ch *amqp.Channel, s Settings, d time.Duration) error {
	name := RetryQueue(s.Queue, d)
	args := retryQueueArgs(s, d)
	// Exclusive like an exclusive work queue: RabbitMQ 4.3 refuses a
	// queue that is neither durable nor exclusive, and the retries of a
	// queue of one connection go with it anyway.
	const autoDelete, noWait = false, false
	if _, err := ch.QueueDeclare(name, s.Durable, autoDelete, s.Exclusive, noWait, args); err != nil {
		if denied := deniedFeature(err, name, s.Topology); denied != nil {
			return denied
		}
		if isCode(err, amqp.PreconditionFailed) || isCode(err, amqp.ResourceLocked) {
			return fmt.Errorf("declare retry queue %q: it exists with other arguments than %v (declared by an earlier "+
				"version or another agent?): delete it once it is empty, and the agent declares it again; the broker says: %w", name, args, err)
		}
		return fmt.Errorf("declare retry queue %q (ttl %s, back to %q): %w", name, d, s.Queue, err)
	}
	return nil
}

// declareDeadLetterQueue declares the dead-letter queue durable, and a
// quorum queue when the work queue is one, so that dead letters survive
// a node's loss as the work does. One that exists already as a classic
// queue (declared by an earlier version) is kept as it is: the broker
// refuses the quorum declaration (406), which closes the channel, so it
// runs on a channel of its own and the queue is then only checked.
func declareDeadLetterQueue(conn *amqp.Connection, s Settings) error {
	const durable, autoDelete, exclusive, noWait = true, false, false, false
	name, args := s.DeadLetterQueue, deadLetterQueueArgs(s)
	err := onOwnChannel(conn, func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclare(name, durable, autoDelete, exclusive, noWait, args)
		return err
	})
	if args != nil && isCode(err, amqp.PreconditionFailed) {
		err = onOwnChannel(conn, func(ch *amqp.Channel) error {
			_, err := ch.QueueDeclarePassive(name, durable, autoDelete, exclusive, noWait, nil)
			return err
		})
	}
	if err != nil {
		return fmt.Errorf("declare dead-letter queue %q: %w", name, err)
	}
	return nil
}

// deadLetterQueueArgs follow the work queue's type: nil (classic) unless
// it is a quorum queue.
func deadLetterQueueArgs(s Settings) amqp.Table {
	if s.QueueArgs["x-queue-type"] == "quorum" {
		return amqp.Table{"x-queue-type": "quorum"}
	}
	return nil
}

// onOwnChannel runs f on a channel opened for it, and closes it.
func onOwnChannel(conn *amqp.Connection, f func(*amqp.Channel) error) error {
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	err = f(ch)
	if cerr := ch.Close(); err == nil && !errors.Is(cerr, amqp.ErrClosed) {
		err = cerr
	}
	return err
}

// retryQueueArgs are the arguments of a retry queue. The way back from a
// retry queue is the broker's dead-lettering, which is at-most-once for
// classic queues; for a quorum work queue the retry queues are quorum
// queues too, with at-least-once dead-lettering (which needs the
// reject-publish overflow).
func retryQueueArgs(s Settings, d time.Duration) amqp.Table {
	args := amqp.Table{
		"x-message-ttl":             d.Milliseconds(),
		"x-dead-letter-exchange":    "",
		"x-dead-letter-routing-key": s.Queue,
	}
	if s.QueueArgs["x-queue-type"] == "quorum" {
		args["x-queue-type"] = "quorum"
		args["x-dead-letter-strategy"] = "at-least-once"
		args["x-overflow"] = "reject-publish"
	}
	return args
}

// RetryQueues maps the names of a work queue's retry queues to their
// delays.
func RetryQueues(queue string, delays []time.Duration) map[string]time.Duration {
	names := make(map[string]time.Duration, len(delays))
	for _, d := range delays {
		names[RetryQueue(queue, d)] = d
	}
	return names
}

// RetryQueue names the retry queue of a work queue for one delay, e.g.
// orders.retry.30s.
func RetryQueue(queue string, d time.Duration) string {
	switch {
	case d%time.Hour == 0:
		return fmt.Sprintf("%s.retry.%dh", queue, d/time.Hour)
	case d%time.Minute == 0:
		return fmt.Sprintf("%s.retry.%dm", queue, d/time.Minute)
	case d%time.Second == 0:
		return fmt.Sprintf("%s.retry.%ds", queue, d/time.Second)
	}
	return fmt.Sprintf("%s.retry.%dms", queue, d.Milliseconds())
}

func closeWith(closed <-chan *amqp.Error, conn *amqp.Connection) {
	if err, ok := <-closed; ok && err != nil {
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
	}
}

func exchangeError(err error, t Topology) error {
	if isCode(err, amqp.PreconditionFailed) {
		return fmt.Errorf("declare exchange %q: it already exists with other settings than this agent's "+
			"(type %s, durable %t, auto-delete %t); the broker says: %w",
			t.Exchange, t.ExchangeType, t.Durable, t.AutoDelete, err)
	}
	return fmt.Errorf("declare exchange %q: %w", t.Exchange, err)
}

func queueError(err error, t Topology) error {
	if denied := deniedFeature(err, t.Queue, t); denied != nil {
		return denied
	}
	switch {
	case isCode(err, amqp.PreconditionFailed):
		return fmt.Errorf("declare queue %q: it already exists with other settings than this agent's "+
			"(durable %t, auto-delete %t, exclusive %t, arguments %v); the broker says: %w",
			t.Queue, t.Durable, t.AutoDelete, t.Exclusive, t.QueueArgs, err)
	case isCode(err, amqp.ResourceLocked):
		return fmt.Errorf("declare queue %q: it is exclusive to another connection; the broker says: %w", t.Queue, err)
	}
	return fmt.Errorf("declare queue %q: %w", t.Queue, err)
}

func qosError(err error, s Settings) error {
	if isCode(err, amqp.NotImplemented) && s.PrefetchSize != 0 {
		return fmt.Errorf("set prefetch (basic.qos): the broker does not support prefetch_size %d "+
			"(RabbitMQ only supports 0): %w", s.PrefetchSize, err)
	}
	return fmt.Errorf("set prefetch (basic.qos) to %d messages, %d bytes: %w", s.PrefetchCount, s.PrefetchSize, err)
}

func isCode(err error, code int) bool {
	var aerr *amqp.Error
	return errors.As(err, &aerr) && aerr.Code == code
}

// Deliveries is closed when the consumer is cancelled or the channel
// closes; what was buffered is still handed out before it closes.
func (s *Session) Deliveries() <-chan amqp.Delivery { return s.deliveries }

// Done is closed when the consuming channel closes, for any reason: the
// deliveries of the session can no longer be acknowledged.
func (s *Session) Done() <-chan struct{} { return s.done }

// closeWhenClosed closes done once amqp091 closes its notification
// channel, which it does when the AMQP channel closes.
func closeWhenClosed(closes <-chan *amqp.Error, done chan struct{}) {
	for range closes {
	}
	close(done)
}

// Err returns why the channel closed, or nil while it is open or when it
// was closed by this client.
func (s *Session) Err() error {
	select {
	case err, ok := <-s.closed:
		if ok && err != nil {
			return err
		}
	default:
	}
	return nil
}

// Publish sends a copy of a message (a retry, a dead letter) and returns
// nil only once the broker has confirmed it and routed it to a queue. A
// retry queue or the dead-letter queue found missing (an operator deleted
// it) is declared again, as at connect, and the copy sent once more.
func (s *Session) Publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	if s.pub == nil {
		return errors.New("this session has no publishing connection")
	}
	err := s.pub.publish(ctx, exchange, key, msg)
	if redeclare := s.failureQueue(key); redeclare != nil && exchange == "" && errors.Is(err, ErrUnroutable) {
		err = redeclare()
		if err == nil {
			err = s.pub.publish(ctx, exchange, key, msg)
		}
	}
	if err != nil {
		return fmt.Errorf("publish to exchange %q with routing key %q: %w", exchange, key, err)
	}
	return nil
}

// failureQueue returns how to declare again the queue of the session's
// failure paths (a retry queue, the dead-letter queue) named name, as at
// connect, or nil for any other name.
func (s *Session) failureQueue(name string) func() error {
	if delay, ok := s.retries[name]; ok {
		return func() error {
			return s.pub.declare(func(ch *amqp.Channel) error { return declareRetryQueue(ch, s.settings, delay) })
		}
	}
	if name != "" && name == s.settings.DeadLetterQueue {
		return func() error { return declareDeadLetterQueue(s.pubConn, s.settings) }
	}
	return nil
}

// Unreadable tells whether the delivery with this tag arrived with its
// headers replaced by an empty table, because amqp091 would have refused
// them and closed the connection (see frames.go), and why; it forgets the
// tag. The tag alone is enough: the consuming channel is the only one on
// its connection that gets deliveries. It takes no lock unless some
// delivery of the session had its headers replaced.
func (s *Session) Unreadable(tag uint64) (reason string, ok bool) { return s.refused.take(tag) }

// FrameMax is the largest frame the publishing connection may send, as
// negotiated with the broker; 0 when the session publishes nothing. A
// copy's properties travel in one frame, which amqp091 does not split.
func (s *Session) FrameMax() int {
	if s.pubConn == nil {
		return 0
	}
	return s.pubConn.Config.FrameSize
}

// Host is the URL of the broker this session is connected to, with its
// password redacted.
func (s *Session) Host() string { return s.host }

// Index is the position in Settings.URLs of the URL connected to.
func (s *Session) Index() int { return s.index }

// Skipped returns why the URLs tried before Host failed (joined), or nil
// when the first one answered. The URLs in it are redacted.
func (s *Session) Skipped() error { return s.skipped }

// Tag is the consumer tag, as listed by rabbitmqctl list_consumers.
func (s *Session) Tag() string { return s.tag }

// Cancel asks the broker to stop deliveries (basic.cancel). Deliveries
// already buffered are still handed out, then the channel is closed.
func (s *Session) Cancel() error { return s.ch.Cancel(s.tag, false) }

// Close closes the channel and the connections. Unacknowledged
// deliveries go back to the queue.
func (s *Session) Close() error {
	if s.pub != nil {
		s.pub.close()
	}
	chErr := s.ch.Close()
	connErr := s.conn.Close()
	if s.pubConn != nil {
		connErr = errors.Join(connErr, ignoreClosed(s.pubConn.Close()))
	}
	return errors.Join(ignoreClosed(chErr), ignoreClosed(connErr))
}

func ignoreClosed(err error) error {
	if errors.Is(err, amqp.ErrClosed) {
		return nil
	}
	return err
}

func connectionName(agent string) string {
	host, _ := os.Hostname()
	return fmt.Sprintf("krakend-amqp %s@%s pid %d", agent, host, os.Getpid())
}

// consumerTag is unique per agent, process and session, so that a tag seen
// in rabbitmqctl list_consumers leads back to the gateway that holds it.
func consumerTag(agent string) string {
	host, _ := os.Hostname()
	var b [4]byte
	_, _ = rand.Read(b[:])
	tag := fmt.Sprintf("krakend-amqp.%s.%s.%d.%s", agent, host, os.Getpid(), hex.EncodeToString(b[:]))
	if len(tag) > 255 {
		tag = tag[len(tag)-255:]
	}
	return tag
}
