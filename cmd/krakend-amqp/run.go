package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/luraproject/lura/v2/async"
	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
	"github.com/luraproject/lura/v2/proxy"
	luragin "github.com/luraproject/lura/v2/router/gin"
	"github.com/luraproject/lura/v2/transport/http/server"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"golang.org/x/sync/errgroup"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/driver"
)

const logPrefix = "[SERVICE: krakend-amqp]"

// runCommand serves a krakend.json until SIGINT or SIGTERM. A file that
// does not parse, or whose agents do not validate, is refused before
// anything starts.
func runCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("run", "-c krakend.json [-d] [-p port] [-metrics address]", stderr)
	file := fs.String("c", "krakend.json", "the configuration `file`")
	debug := fs.Bool("d", false, "log at DEBUG level and enable the /__debug/ endpoint")
	port := fs.Int("p", 0, "listen on this `port` instead of the file's \"port\"")
	metricsAddr := fs.String("metrics", "", "serve the agents' metrics for Prometheus on GET /metrics at this `address`\n"+
		"(e.g. 127.0.0.1:9091 or :9091); default: the file's extra_config\n"+
		"\""+metricsNamespace+"\".listen_address, else no metrics endpoint")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *port < 0 || *port > 65535 {
		fmt.Fprintf(stderr, "krakend-amqp run: -p %d: not a TCP port\n", *port)
		return exitUsage
	}
	if *metricsAddr != "" {
		if _, _, err := net.SplitHostPort(*metricsAddr); err != nil {
			fmt.Fprintf(stderr, "krakend-amqp run: -metrics %q: not host:port (e.g. 127.0.0.1:9091 or :9091)\n", *metricsAddr)
			return exitUsage
		}
	}
	cfg, err := loadConfig(*file)
	if err != nil {
		fmt.Fprintln(stderr, driver.OneLine(err))
		return exitFailure
	}
	f := inspect(&cfg)
	if len(f.problems) > 0 {
		printFindings(stderr, *file, f)
		fmt.Fprintf(stderr, "%s: not started: %s\n", *file, plural(len(f.problems), "problem"))
		return exitFailure
	}
	if *port != 0 {
		cfg.Port = *port
	}
	cfg.Debug = cfg.Debug || *debug
	logger, err := newLogger(cfg.ExtraConfig, *debug, stdout)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", *file, err)
		return exitFailure
	}
	for _, w := range f.warnings {
		logger.Warning(logPrefix, w)
	}
	if *metricsAddr == "" {
		*metricsAddr, _ = metricsAddress(cfg.ExtraConfig) // checked by inspect
	}
	return serveUntilSignal(ctx, cfg, f.prepared, logger, *metricsAddr, stdout, stderr)
}

// serveUntilSignal runs the gateway until a signal, and turns its end into
// an exit code. The telemetry (the metrics endpoint with its
// MeterProvider, the OTLP tracer provider) is set up before any agent
// starts, and shut down after every agent has stopped.
func serveUntilSignal(ctx context.Context, cfg luraconfig.ServiceConfig, prepared []*asyncamqp.Prepared, logger logging.Logger, metricsAddr string, stdout, stderr io.Writer) int {
	ctx, stop := withSignals(ctx, logger)
	defer stop()
	v := versions()
	logger.Info(logPrefix, "starting krakend-amqp", v.gateway, "on Lura", v.lura, "with", plural(len(cfg.Endpoints), "endpoint"), "and", plural(len(cfg.AsyncAgents), "async agent"))
	tel, stopTelemetry, err := startTelemetry(ctx, metricsAddr, logger)
	if err != nil {
		logger.Error(logPrefix, err)
		fmt.Fprintln(stderr, "krakend-amqp run:", err)
		return exitFailure
	}
	err = serve(ctx, cfg, prepared, logger, stdout, tel)
	stopTelemetry()
	if err != nil {
		logger.Error(logPrefix, err)
		fmt.Fprintln(stderr, "krakend-amqp run:", err)
		return exitFailure
	}
	logger.Info(logPrefix, "stopped")
	return exitOK
}

// startTelemetry starts the metrics endpoint when there is an address,
// and the OTLP trace export when the OTEL_* variables ask for it. It
// returns the telemetry to give the agents, made global too, and a
// function that stops what it started.
func startTelemetry(ctx context.Context, metricsAddr string, logger logging.Logger) (telemetry, func(), error) {
	tel := telemetry{propagator: newPropagator()}
	export, err := traceExportFromEnv(os.Getenv)
	if err != nil {
		return tel, nil, err
	}
	var metrics *metricsServer
	if metricsAddr != "" {
		if metrics, err = startMetrics(metricsAddr); err != nil {
			return tel, nil, err
		}
		tel.meters = metrics.provider
		logger.Info(logPrefix, fmt.Sprintf("metrics for Prometheus on http://%s%s", metrics.addr, metricsPath))
	}
	var tracer *sdktrace.TracerProvider
	if export.on {
		if tracer, err = startTracing(ctx, export); err != nil {
			if metrics != nil {
				_ = metrics.stop()
			}
			return tel, nil, err
		}
		tel.tracers = tracer
		logger.Info(logPrefix, "exporting traces over OTLP", export.protocol)
	}
	tel.setGlobal()
	return tel, func() {
		if metrics != nil {
			if err := metrics.stop(); err != nil {
				logger.Warning(logPrefix, "stopping the metrics endpoint:", err)
			}
		}
		if tracer != nil {
			if err := stopTracing(tracer); err != nil {
				logger.Warning(logPrefix, "sending the last spans:", err)
			}
		}
	}, nil
}

// withSignals returns a context cancelled by the first SIGINT or SIGTERM.
// After that first signal the default action is restored, so a second one
// ends the process at once.
func withSignals(parent context.Context, logger logging.Logger) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(parent)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		defer signal.Stop(signals)
		select {
		case s := <-signals:
			logger.Info(logPrefix, fmt.Sprintf("%v: stopping the router and draining the agents (signal again to exit at once)", s))
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// serve runs the router and the async agents in one errgroup, the way
// KrakenD does. The agents inspect prepared start from there: their
// blocks are parsed once. The router serves until ctx ends; its end cancels the
// agents, which finish their messages in flight before serve returns. An
// HTTP server that cannot run (a port in use) is an error, and stops the
// agents too.
func serve(ctx context.Context, cfg luraconfig.ServiceConfig, prepared []*asyncamqp.Prepared, logger logging.Logger, accessLog io.Writer, tel telemetry) error {
	server.InitHTTPDefaultTransportWithLogger(cfg, logger)
	pf := proxy.DefaultFactory(logger)
	// Agents ping with their name; the engine's /__health lists each one
	// with the time of its last ping.
	agentPing := make(chan string, len(cfg.AsyncAgents))
	var serverErr error
	routerFactory := luragin.NewFactory(luragin.Config{
		Engine: luragin.NewEngine(cfg, luragin.EngineOptions{
			Logger: logger,
			Writer: accessLog,
			Health: agentPing,
		}),
		HandlerFactory: luragin.EndpointHandler,
		ProxyFactory:   pf,
		Logger:         logger,
		RunServer:      recordError(server.RunServerWithLoggerFactory(logger), &serverErr),
	})

	g, gctx := errgroup.WithContext(ctx)
	agentsCtx, stopAgents := context.WithCancel(gctx)
	defer stopAgents()
	starter := async.AgentStarter{asyncamqp.NewFactory(asyncamqp.WithTelemetry(tel), asyncamqp.WithPrepared(prepared...))}
	startAgents := func() func() error {
		return starter.Start(agentsCtx, cfg.AsyncAgents, logger, agentPing, pf)
	}
	if cfg.SequentialStart {
		g.Go(startAgents())
	} else {
		g.Go(func() error { return startAgents()() })
	}
	g.Go(func() error {
		routerFactory.NewWithContext(ctx).Run(cfg)
		stopAgents()
		return serverErr
	})
	return g.Wait()
}

// recordError wraps Lura's RunServer to keep the error the router only
// logs, so that a server that cannot listen fails the process.
func recordError(run luragin.RunServerFunc, dst *error) luragin.RunServerFunc {
	return func(ctx context.Context, cfg luraconfig.ServiceConfig, h http.Handler) error {
		err := run(ctx, cfg, h)
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			*dst = fmt.Errorf("HTTP server on port %d: %w", cfg.Port, err)
		}
		return err
	}
}
