package main

import (
	"fmt"
	"io"

	"github.com/krakend-contrib/async-amqp/driver"
)

// checkCommand validates a krakend.json: Lura's parser first (syntax,
// version, endpoints), then every async/amqp block. Problems and warnings
// go to stderr, one per line; a valid file gets a one-line summary on
// stdout.
func checkCommand(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("check", "-c krakend.json", stderr)
	file := fs.String("c", "krakend.json", "the configuration `file` to validate")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	cfg, err := loadConfig(*file)
	if err != nil {
		fmt.Fprintln(stderr, driver.OneLine(err))
		return exitFailure
	}
	f := inspect(&cfg)
	printFindings(stderr, *file, f)
	if len(f.problems) > 0 {
		fmt.Fprintf(stderr, "%s: %s\n", *file, plural(len(f.problems), "problem"))
		return exitFailure
	}
	fmt.Fprintf(stdout, "%s: OK (%s, %s)\n", *file, plural(len(cfg.Endpoints), "endpoint"), plural(len(cfg.AsyncAgents), "async agent"))
	return exitOK
}
