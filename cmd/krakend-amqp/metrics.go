package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"time"

	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
)

// metricsNamespace is the service-level extra_config block that turns the
// Prometheus endpoint on without the -metrics flag:
//
//	"extra_config": {"async/amqp/metrics": {"listen_address": ":9091"}}
const metricsNamespace = "async/amqp/metrics"

// metricsPath is where the endpoint answers.
const metricsPath = "/metrics"

// metricsShutdownTimeout bounds the endpoint's shutdown.
const metricsShutdownTimeout = 5 * time.Second

// metricsAddress reads the listen address of the metrics block: "" when
// the block is absent. Its errors name the field.
func metricsAddress(extra luraconfig.ExtraConfig) (string, error) {
	raw, ok := extra[metricsNamespace]
	if !ok {
		return "", nil
	}
	block, ok := raw.(map[string]interface{})
	if !ok {
		return "", fmt.Errorf("extra_config.%s: must be an object such as {\"listen_address\": \":9091\"}", metricsNamespace)
	}
	keys := make([]string, 0, len(block))
	for k := range block {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var errs []error
	var addr string
	for _, k := range keys {
		if k != "listen_address" {
			errs = append(errs, fmt.Errorf("extra_config.%s.%s: unknown field; the block has listen_address only", metricsNamespace, k))
			continue
		}
		s, isString := block[k].(string)
		if !isString || s == "" {
			errs = append(errs, fmt.Errorf("extra_config.%s.listen_address: must be an address such as \":9091\" or \"127.0.0.1:9091\"", metricsNamespace))
			continue
		}
		if _, _, err := net.SplitHostPort(s); err != nil {
			errs = append(errs, fmt.Errorf("extra_config.%s.listen_address: %q is not host:port (e.g. \":9091\")", metricsNamespace, s))
			continue
		}
		addr = s
	}
	if len(errs) > 0 {
		return "", errors.Join(errs...)
	}
	return addr, nil
}

// metricsServer serves the agents' OpenTelemetry metrics in Prometheus's
// text format. It owns an OpenTelemetry MeterProvider, given to the
// driver, and a private Prometheus registry holding that provider's
// exporter and the Go and process collectors.
type metricsServer struct {
	addr     string
	provider *sdkmetric.MeterProvider
	server   *http.Server
	served   chan error
}

// startMetrics listens on addr and builds the MeterProvider. It must run
// before the agents start: each agent creates its instruments when it is
// built. A listen failure is returned, and nothing is left running.
func startMetrics(addr string) (*metricsServer, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exporter, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return nil, fmt.Errorf("metrics: Prometheus exporter: %w", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: cannot listen on %s: %w", addr, err)
	}
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter), sdkmetric.WithResource(serviceResource()))
	mux := http.NewServeMux()
	mux.Handle("GET "+metricsPath, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	m := &metricsServer{
		addr:     ln.Addr().String(),
		provider: provider,
		server:   &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		served:   make(chan error, 1),
	}
	go func() { m.served <- m.server.Serve(ln) }()
	return m, nil
}

// stop closes the endpoint and shuts the MeterProvider down. Call it once
// the agents have stopped.
func (m *metricsServer) stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), metricsShutdownTimeout)
	defer cancel()
	err := m.server.Shutdown(ctx)
	if serveErr := <-m.served; !errors.Is(serveErr, http.ErrServerClosed) {
		err = errors.Join(err, serveErr)
	}
	return errors.Join(err, m.provider.Shutdown(ctx))
}
