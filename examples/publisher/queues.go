package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	luraconfig "github.com/luraproject/lura/v2/config"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/consumer"
)

// dialTimeout bounds the TCP and AMQP handshakes of -ping, -inspect and
// -cleanup, so a broker that does not answer fails them quickly.
const dialTimeout = 5 * time.Second

// Queue roles, as -inspect prints them.
const (
	roleWork       = "work"
	roleRetry      = "retry"
	roleDeadLetter = "dead-letter"
)

// agentTopology is what one agent of a krakend.json uses on its broker.
type agentTopology struct {
	name     string
	host     string
	exchange string
	// declares is false when the agent's "topology" is passive or none:
	// its queue and exchange are someone else's, and -cleanup keeps them.
	declares bool
	queues   []queueRef
}

// queueRef is one queue an agent uses.
type queueRef struct {
	name, role string
}

// readAgents returns the topology of every agent of a krakend.json that
// has a block for the driver, in file order. An agent whose block does not
// parse is left out and reported in the error. Agents with no host use
// fallbackURL.
func readAgents(file, fallbackURL string) ([]agentTopology, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var doc struct {
		Agents []struct {
			Name        string                 `json:"name"`
			ExtraConfig luraconfig.ExtraConfig `json:"extra_config"`
		} `json:"async_agent"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var (
		agents []agentTopology
		errs   []error
	)
	for i, a := range doc.Agents {
		if a.Name == "" {
			a.Name = fmt.Sprintf("AsyncAgent-%02d", i) // as Lura names it
		}
		cfg, err := config.FromExtraConfig(a.ExtraConfig)
		if errors.Is(err, config.ErrNoConfig) {
			continue // another driver's agent
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: agent %q: %s", file, a.Name, strings.ReplaceAll(err.Error(), "\n", "; ")))
			continue
		}
		agents = append(agents, topologyOf(a.Name, cfg, fallbackURL))
	}
	if len(agents) == 0 && len(errs) == 0 {
		errs = append(errs, fmt.Errorf("%s: no async agent has an %q block", file, config.Namespace))
	}
	return agents, errors.Join(errs...)
}

// topologyOf lists the queues the driver declares for an agent: its work
// queue, a retry queue per retry delay and the dead-letter queue, the
// latter two only when the driver handles failures itself (neither
// auto_ack nor nack_discard).
func topologyOf(name string, cfg config.Config, fallbackURL string) agentTopology {
	t := agentTopology{name: name, host: cfg.Host, exchange: cfg.Exchange, declares: cfg.Topology == config.TopologyDeclare}
	if t.host == "" {
		t.host = fallbackURL
	}
	t.queues = append(t.queues, queueRef{cfg.Queue, roleWork})
	if cfg.AutoAck || cfg.NackDiscard {
		return t
	}
	for _, d := range cfg.Retry.RetryDelays() {
		t.queues = append(t.queues, queueRef{consumer.RetryQueue(cfg.Queue, d), roleRetry})
	}
	if cfg.DeadLetter.Queue != "" {
		t.queues = append(t.queues, queueRef{cfg.DeadLetter.Queue, roleDeadLetter})
	}
	return t
}

// brokers keeps one connection per broker URL.
type brokers map[string]*amqp.Connection

func (b brokers) get(url string) (*amqp.Connection, error) {
	if conn, ok := b[url]; ok {
		return conn, nil
	}
	conn, err := dial(url)
	if err != nil {
		return nil, err
	}
	b[url] = conn
	return conn, nil
}

func (b brokers) close() {
	for _, conn := range b {
		_ = conn.Close()
	}
}

func dial(url string) (*amqp.Connection, error) {
	conn, err := amqp.DialConfig(url, amqp.Config{
		Dial:       amqp.DefaultDial(dialTimeout),
		Properties: amqp.Table{"connection_name": "krakend-amqp example publisher"},
	})
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", config.Redacted(url), err)
	}
	return conn, nil
}

// ping connects to the broker and prints its product and version.
func ping(w io.Writer, url string) error {
	conn, err := dial(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	product, _ := conn.Properties["product"].(string)
	version, _ := conn.Properties["version"].(string)
	fmt.Fprintf(w, "broker at %s answers: %s %s\n", config.Redacted(url), product, version)
	return nil
}

// inspectQueues prints, for every queue the agents of file use, the
// messages it holds and its consumers, as a table. MESSAGES is the count
// of ready messages a passive declare reports: deliveries not yet
// acknowledged are counted again only once their consumer has gone. A
// queue that does not exist shows "-".
func inspectQueues(w io.Writer, file, fallbackURL string) error {
	agents, err := readAgents(file, fallbackURL)
	errs := []error{err}
	conns := brokers{}
	defer conns.close()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "AGENT\tQUEUE\tROLE\tMESSAGES\tCONSUMERS")
	for _, a := range agents {
		conn, err := conns.get(a.host)
		if err != nil {
			errs = append(errs, fmt.Errorf("agent %q: %w", a.name, err))
			continue
		}
		for _, q := range a.queues {
			state, found, err := queueState(conn, q.name)
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("agent %q: %w", a.name, err))
			case !found:
				fmt.Fprintf(tw, "%s\t%s\t%s\t-\t-\n", a.name, q.name, q.role)
			default:
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\n", a.name, q.name, q.role, state.Messages, state.Consumers)
			}
		}
	}
	if err := tw.Flush(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// queueState declares the queue passively: found is false when it does
// not exist.
func queueState(conn *amqp.Connection, name string) (state amqp.Queue, found bool, err error) {
	err = withChannel(conn, func(ch *amqp.Channel) error {
		var err error
		state, err = ch.QueueDeclarePassive(name, false, false, false, false, nil)
		return err
	})
	if isCode(err, amqp.NotFound) {
		return amqp.Queue{}, false, nil
	}
	if err != nil {
		return amqp.Queue{}, false, fmt.Errorf("queue %q: %w", name, err)
	}
	return state, true, nil
}

// cleanupTopology deletes the queues the agents of file use, then their
// exchanges. A queue that still has consumers, or an exchange still bound
// to a queue, is kept and reported as an error: it is in use, perhaps by
// someone else. Absent ones are skipped. The queue and exchange of an
// agent whose "topology" is passive or none (the driver did not declare
// them) and built-in exchanges (amq.*) are never deleted.
func cleanupTopology(w io.Writer, file, fallbackURL string) error {
	agents, err := readAgents(file, fallbackURL)
	errs := []error{err}
	conns := brokers{}
	defer conns.close()
	type exchangeRef struct{ host, name string }
	var exchanges []exchangeRef
	seen := map[exchangeRef]bool{}
	for _, a := range agents {
		conn, err := conns.get(a.host)
		if err != nil {
			errs = append(errs, fmt.Errorf("agent %q: %w", a.name, err))
			continue
		}
		for _, q := range a.queues {
			if q.role == roleWork && !a.declares {
				continue
			}
			if err := deleteQueue(w, conn, q.name); err != nil {
				errs = append(errs, fmt.Errorf("agent %q: %w", a.name, err))
			}
		}
		if x := (exchangeRef{a.host, a.exchange}); a.declares && !seen[x] {
			seen[x] = true
			exchanges = append(exchanges, x)
		}
	}
	for _, x := range exchanges {
		if err := deleteExchange(w, conns[x.host], x.name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func deleteQueue(w io.Writer, conn *amqp.Connection, name string) error {
	if _, found, err := queueState(conn, name); err != nil || !found {
		return err
	}
	var purged int
	err := withChannel(conn, func(ch *amqp.Channel) error {
		var err error
		purged, err = ch.QueueDelete(name, true /* ifUnused */, false /* ifEmpty */, false /* noWait */)
		return err
	})
	if isCode(err, amqp.PreconditionFailed) {
		return fmt.Errorf("queue %q still has consumers: kept", name)
	}
	if err != nil {
		return fmt.Errorf("deleting queue %q: %w", name, err)
	}
	fmt.Fprintf(w, "deleted queue %q (%d messages)\n", name, purged)
	return nil
}

func deleteExchange(w io.Writer, conn *amqp.Connection, name string) error {
	if name == "" || strings.HasPrefix(name, "amq.") {
		return nil
	}
	err := withChannel(conn, func(ch *amqp.Channel) error {
		return ch.ExchangeDeclarePassive(name, "topic", false, false, false, false, nil)
	})
	if isCode(err, amqp.NotFound) {
		return nil
	}
	if err == nil {
		err = withChannel(conn, func(ch *amqp.Channel) error {
			return ch.ExchangeDelete(name, true /* ifUnused */, false /* noWait */)
		})
	}
	if isCode(err, amqp.PreconditionFailed) {
		return fmt.Errorf("exchange %q is still bound to queues: kept", name)
	}
	if err != nil {
		return fmt.Errorf("deleting exchange %q: %w", name, err)
	}
	fmt.Fprintf(w, "deleted exchange %q\n", name)
	return nil
}

// withChannel runs f on a channel of its own: a refused passive declare or
// delete closes the channel it ran on.
func withChannel(conn *amqp.Connection, f func(*amqp.Channel) error) error {
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	err = f(ch)
	_ = ch.Close() // already closed after a refusal
	return err
}

func isCode(err error, code int) bool {
	var amqpErr *amqp.Error
	return errors.As(err, &amqpErr) && amqpErr.Code == code
}
