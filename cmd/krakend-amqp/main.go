// Command krakend-amqp is a KrakenD-compatible API gateway built on Lura
// with the AMQP async agent driver of this module inside. It reads a
// krakend.json, serves its endpoints with Lura's gin router and default
// HTTP proxy, and starts its async agents: every agent with an
// "async/amqp" block (or KrakenD's legacy
// "github.com/devopsfaith/krakend-amqp/agent" block) consumes its RabbitMQ
// queue and sends each message through its backends.
//
// Usage:
//
//	krakend-amqp run -c krakend.json [-d] [-p port] [-metrics address]
//	krakend-amqp check -c krakend.json
//	krakend-amqp version
//
// run serves until SIGINT or SIGTERM, then stops the router, lets the
// agents finish the messages in flight, and exits 0. check validates the
// whole file and every driver block, prints every problem naming the agent
// and the field, and exits 1 if there is any. /__health lists each agent
// with the time of its last ping. With -metrics (or the service-level
// extra_config block "async/amqp/metrics": {"listen_address": ":9091"})
// run also serves the agents' OpenTelemetry metrics for Prometheus on
// GET /metrics at that address.
//
// Install it with
//
//	go install github.com/krakend-contrib/async-amqp/cmd/krakend-amqp@latest
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // a bad file, a failed check, a server that cannot run
	exitUsage   = 2 // a bad command line
)

const usageText = `krakend-amqp: a KrakenD-compatible API gateway with the AMQP async agent driver.

Usage:
  krakend-amqp run -c krakend.json [-d] [-p port] [-metrics address]
        serve the endpoints and start the async agents until SIGINT/SIGTERM;
        -metrics 127.0.0.1:9091 also serves the agents' metrics for
        Prometheus on GET /metrics at that address
  krakend-amqp check -c krakend.json
        validate the file and every async/amqp block; exit 1 on any problem
  krakend-amqp version
        print the gateway, Lura and amqp091-go versions

Run "krakend-amqp <command> -h" for the flags of a command.
`

func main() {
	os.Exit(cli(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

// cli runs one command line and returns the process exit code.
func cli(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return runCommand(ctx, args[1:], stdout, stderr)
	case "check":
		return checkCommand(args[1:], stdout, stderr)
	case "version":
		return versionCommand(args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return exitOK
	}
	fmt.Fprintf(stderr, "krakend-amqp: unknown command %q\n\n%s", args[0], usageText)
	return exitUsage
}

// newFlagSet returns a flag set for a command whose errors and usage go to
// stderr.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("krakend-amqp "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: krakend-amqp %s %s\n\nFlags:\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses a command's flags. When done is true the command must
// return code at once: help was asked for, or the command line is wrong.
func parseFlags(fs *flag.FlagSet, args []string) (code int, done bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK, true
		}
		return exitUsage, true
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		fs.Usage()
		return exitUsage, true
	}
	return exitOK, false
}
