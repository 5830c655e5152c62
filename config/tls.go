package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// Load builds the client TLS configuration. Errors name the field and
// the file, never its content. It returns nil, nil when nothing is set,
// so that amqp091's own defaults (system CAs) apply.
func (t TLS) Load() (*tls.Config, error) {
	if t == (TLS{}) {
		return nil, nil
	}
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         t.ServerName,
		InsecureSkipVerify: t.InsecureSkipVerify, //nolint:gosec // opt-in, warned about
	}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, &FieldError{Field: "tls.ca_file", Reason: fmt.Sprintf("cannot read %q: %v", t.CAFile, unwrapPath(err))}
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, &FieldError{Field: "tls.ca_file", Reason: fmt.Sprintf("%q holds no PEM certificate", t.CAFile)}
		}
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return nil, &FieldError{Field: "tls.cert_file", Reason: "cert_file and key_file go together"}
	}
	if t.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, &FieldError{Field: "tls.cert_file", Reason: fmt.Sprintf("cannot load the pair %q / %q: %v",
				t.CertFile, t.KeyFile, unwrapPath(err))}
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// unwrapPath keeps the reason of a file error without repeating the path.
func unwrapPath(err error) error {
	var perr *os.PathError
	if errors.As(err, &perr) {
		return perr.Err
	}
	return err
}
