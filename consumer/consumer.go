// Package consumer owns one AMQP session of an agent: it dials the broker,
// declares the topology (topic exchange, queue, binding), sets the prefetch
// window and starts consuming. A Session is single-use: when it ends,
// because the broker or the network closed it or because it was cancelled,
// the caller opens a new one. Reconnect policy lives in the driver. The
// consuming connection reads through a frame filter (frames.go), so that
// a message whose headers amqp091 cannot decode arrives with them emptied
// (Session.Unreadable) instead of closing the connection.
//
// consumer.go opens and runs a session; dial.go connects (URLs, TLS,
// connection properties); declare.go declares the topology and the
// failure paths' queues; publish.go publishes copies and replies.
package consumer

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
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

func closeWith(closed <-chan *amqp.Error, conn *amqp.Connection) {
	if err, ok := <-closed; ok && err != nil {
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
	}
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
