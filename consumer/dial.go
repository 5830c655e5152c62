package consumer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/krakend-contrib/async-amqp/config"
)

// Dialing: the URLs of a cluster tried in turn, the TLS settings, and the
// connection settings (name, heartbeat, SASL mechanisms) each connection
// of a session opens with.

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

func connectionName(agent string) string {
	host, _ := os.Hostname()
	return fmt.Sprintf("krakend-amqp %s@%s pid %d", agent, host, os.Getpid())
}
