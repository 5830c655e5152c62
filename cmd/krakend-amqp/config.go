package main

import (
	"errors"
	"fmt"
	"io"

	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/config"
	"github.com/krakend-contrib/async-amqp/driver"
)

// Logging settings are read from KrakenD's logging block (or its legacy
// key); only level and prefix apply here, and the log goes to stdout.
const (
	loggingNamespace       = "telemetry/logging"
	legacyLoggingNamespace = "github_com/devopsfaith/krakend-gologging"
	defaultLogLevel        = "INFO"
	defaultLogPrefix       = "[KRAKEND]"
)

// The legacy driver key is not registered in luraconfig.ExtraConfigAlias:
// the driver reads both keys itself, and aliasing would rename the block
// the user wrote in every error ("extra_config.async/amqp.host" for a
// legacy block) and let a legacy block override an "async/amqp" one.

// loadConfig parses a krakend.json with Lura's parser. Its errors name
// the file.
func loadConfig(path string) (luraconfig.ServiceConfig, error) {
	return luraconfig.NewParser().Parse(path)
}

// findings is what inspect found in a parsed file.
type findings struct {
	// problems stop the gateway; each names the agent (or block) and the field.
	problems []string
	// warnings do not: an agent no driver here starts, say.
	warnings []string
	// agentWarnings are asyncamqp.Warnings: check prints them, and each
	// agent logs its own when it starts.
	agentWarnings []string
	// prepared are the valid agents, their blocks parsed once: run starts
	// them from there.
	prepared []*asyncamqp.Prepared
}

// inspect validates what Lura's parser does not: the logging and metrics
// blocks and, with asyncamqp.Prepare, every agent that has a driver block.
// Like Lura's agent starter, it names unnamed agents AsyncAgent-NN; like
// the driver, it rewrites url_pattern placeholders into Lura's form, so
// the file must be inspected before the agents start.
func inspect(cfg *luraconfig.ServiceConfig) findings {
	var f findings
	if _, err := newLogger(cfg.ExtraConfig, false, io.Discard); err != nil {
		f.problems = append(f.problems, err.Error())
	}
	if _, err := metricsAddress(cfg.ExtraConfig); err != nil {
		for _, e := range config.Errors(err) {
			f.problems = append(f.problems, e.Error())
		}
	}
	seen := map[string]bool{}
	for i, agent := range cfg.AsyncAgents {
		if agent.Name == "" {
			agent.Name = fmt.Sprintf("AsyncAgent-%02d", i)
		}
		if seen[agent.Name] {
			f.warnings = append(f.warnings, fmt.Sprintf("agent %q: name: used by more than one agent; /__health cannot tell them apart", agent.Name))
		}
		seen[agent.Name] = true
		if _, ext := agent.ExtraConfig[asyncamqp.ExtensionNamespace]; !ext && !hasDriverBlock(agent.ExtraConfig) {
			f.warnings = append(f.warnings, fmt.Sprintf("agent %q: extra_config: no %q block; no driver in this gateway starts it", agent.Name, asyncamqp.Namespace))
			continue
		}
		p, err := asyncamqp.Prepare(agent)
		for _, err := range config.Errors(err) {
			f.problems = append(f.problems, driver.OneLine(err))
		}
		if err == nil {
			f.prepared = append(f.prepared, p)
			f.agentWarnings = append(f.agentWarnings, p.Warnings()...)
		}
	}
	return f
}

func hasDriverBlock(extra luraconfig.ExtraConfig) bool {
	_, ok := extra[asyncamqp.Namespace]
	if !ok {
		_, ok = extra[asyncamqp.LegacyNamespace]
	}
	return ok
}

// newLogger builds Lura's logger writing to out. The level is DEBUG when
// debug is set, else the logging block's level, else INFO.
func newLogger(extra luraconfig.ExtraConfig, debug bool, out io.Writer) (logging.Logger, error) {
	level, prefix := defaultLogLevel, defaultLogPrefix
	key, block := loggingBlock(extra)
	if v, ok := block["level"]; ok {
		s, isString := v.(string)
		if !isString {
			return nil, fmt.Errorf("extra_config.%s.level: must be a string, got %v", key, v)
		}
		level = s
	}
	if v, ok := block["prefix"].(string); ok {
		prefix = v
	}
	if debug {
		level = "DEBUG"
	}
	logger, err := logging.NewLogger(level, out, prefix)
	if errors.Is(err, logging.ErrInvalidLogLevel) {
		return nil, fmt.Errorf("extra_config.%s.level: unknown level %q; use DEBUG, INFO, WARNING, ERROR or CRITICAL", key, level)
	}
	return logger, err
}

// loggingBlock returns the logging block and its key, or an empty block.
func loggingBlock(extra luraconfig.ExtraConfig) (string, map[string]interface{}) {
	for _, key := range []string{loggingNamespace, legacyLoggingNamespace} {
		if block, ok := extra[key].(map[string]interface{}); ok {
			return key, block
		}
	}
	return loggingNamespace, nil
}

// printFindings writes one line per problem and warning, each prefixed
// with the file name, as a compiler does.
func printFindings(w io.Writer, file string, f findings) {
	for _, p := range f.problems {
		fmt.Fprintf(w, "%s: %s\n", file, p)
	}
	for _, warning := range append(f.warnings, f.agentWarnings...) {
		fmt.Fprintf(w, "%s: warning: %s\n", file, warning)
	}
}

// plural renders "1 endpoint", "2 endpoints".
func plural(n int, noun string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, noun)
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
