package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/logging"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = cli(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		args     []string
		code     int
		inStdout bool
	}{
		{args: nil, code: exitUsage},
		{args: []string{"-h"}, code: exitOK, inStdout: true},
		{args: []string{"help"}, code: exitOK, inStdout: true},
		{args: []string{"serve"}, code: exitUsage},
	} {
		code, stdout, stderr := runCLI(t, tc.args...)
		out := stderr
		if tc.inStdout {
			out = stdout
		}
		if code != tc.code || !strings.Contains(out, "krakend-amqp run -c krakend.json") {
			t.Errorf("%v: exit %d (want %d); stdout %q; stderr %q", tc.args, code, tc.code, stdout, stderr)
		}
	}
}

func TestCommandFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"run", "-h"}, exitOK, "-p port"},
		{[]string{"check", "-h"}, exitOK, "-c file"},
		{[]string{"check", "-x"}, exitUsage, "flag provided but not defined"},
		{[]string{"check", "-c", "a.json", "b.json"}, exitUsage, `unexpected argument "b.json"`},
		{[]string{"run", "-p", "70000"}, exitUsage, "not a TCP port"},
		{[]string{"version", "extra"}, exitUsage, "unexpected argument"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d (want %d); stderr %q lacks %q", tc.args, code, tc.code, stderr, tc.want)
		}
	}
}

func TestVersion(t *testing.T) {
	code, stdout, _ := runCLI(t, "version")
	if code != exitOK {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"krakend-amqp ", "lura ", "amqp091-go ", "go "} {
		if !strings.Contains(stdout, want) {
			t.Errorf("version output lacks %q:\n%s", want, stdout)
		}
	}
}

// agent returns an async_agent entry with a driver block under key.
func agent(name, key string, block map[string]interface{}) map[string]interface{} {
	a := map[string]interface{}{
		"name":     name,
		"consumer": map[string]interface{}{"topic": "orders.*"},
		"backend":  []interface{}{map[string]interface{}{"host": []string{"http://127.0.0.1:8081"}, "url_pattern": "/orders", "method": "POST"}},
	}
	if key != "" {
		a["extra_config"] = map[string]interface{}{key: block}
	}
	return a
}

func validBlock() map[string]interface{} {
	return map[string]interface{}{"host": "amqp://guest:secret@localhost:5672/", "name": "q", "exchange": "x", "durable": true}
}

func writeConfig(t *testing.T, doc map[string]interface{}) string {
	t.Helper()
	raw, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "krakend.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCheckValid(t *testing.T) {
	file := writeConfig(t, map[string]interface{}{
		"version": 3,
		"endpoints": []interface{}{map[string]interface{}{
			"endpoint": "/status", "backend": []interface{}{map[string]interface{}{"host": []string{"http://127.0.0.1:8081"}, "url_pattern": "/status"}},
		}},
		"async_agent": []interface{}{
			agent("orders", "async/amqp", validBlock()),
			agent("legacy", "github.com/devopsfaith/krakend-amqp/agent", validBlock()),
		},
	})
	code, stdout, stderr := runCLI(t, "check", "-c", file)
	if want := file + ": OK (1 endpoint, 2 async agents)\n"; code != exitOK || stdout != want {
		t.Errorf("exit %d; stdout %q (want %q); stderr %q", code, stdout, want, stderr)
	}
	// The legacy key works; its one warning says that KrakenD's lint
	// refuses it.
	warning := file + `: warning: agent "legacy": extra_config.github.com/devopsfaith/krakend-amqp/agent: the legacy key, still read`
	if lines := strings.Split(strings.TrimSpace(stderr), "\n"); len(lines) != 1 || !strings.HasPrefix(lines[0], warning) {
		t.Errorf("stderr %q, want one line starting %q", stderr, warning)
	}
}

// TestCheckReportsEveryProblem: every problem of every agent, one line
// each, naming agent and field; warnings do not fail the check.
func TestCheckReportsEveryProblem(t *testing.T) {
	bad := validBlock()
	bad["host"] = "http://guest:secret@localhost/"
	bad["prefetch_count"] = -1
	file := writeConfig(t, map[string]interface{}{
		"version":      3,
		"extra_config": map[string]interface{}{"telemetry/logging": map[string]interface{}{"level": "TRACE"}},
		"async_agent": []interface{}{
			agent("good", "async/amqp", validBlock()),
			agent("bad", "async/amqp", bad),
			agent("kafka", "", nil),
		},
	})
	code, stdout, stderr := runCLI(t, "check", "-c", file)
	if code != exitFailure || stdout != "" {
		t.Fatalf("exit %d, stdout %q", code, stdout)
	}
	wants := []string{
		file + `: extra_config.telemetry/logging.level: unknown level "TRACE"`,
		file + `: agent "bad": extra_config.async/amqp.host: must start with amqp:// or amqps://`,
		file + `: agent "bad": extra_config.async/amqp.prefetch_count: must be between`,
		file + `: warning: agent "kafka": extra_config: no "async/amqp" block`,
		file + ": 3 problems",
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if len(lines) != len(wants) {
		t.Errorf("want %d lines, got:\n%s", len(wants), stderr)
	}
	for _, want := range wants {
		if !strings.Contains(stderr, want) {
			t.Errorf("output lacks %q:\n%s", want, stderr)
		}
	}
	if strings.Contains(stderr, "secret") || strings.Contains(stderr, `"good"`) {
		t.Errorf("output leaks the password or blames a valid agent:\n%s", stderr)
	}
}

func TestCheckUnparsableFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "broken.json")
	if err := os.WriteFile(path, []byte(`{"version": 3,`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, file := range []string{path, filepath.Join(t.TempDir(), "absent.json")} {
		code, _, stderr := runCLI(t, "check", "-c", file)
		if code != exitFailure || !strings.Contains(stderr, file) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%s: exit %d; stderr %q", file, code, stderr)
		}
	}
}

func TestRunRefusesInvalidAgent(t *testing.T) {
	bad := validBlock()
	delete(bad, "exchange")
	file := writeConfig(t, map[string]interface{}{"version": 3, "async_agent": []interface{}{agent("orders", "async/amqp", bad)}})
	code, stdout, stderr := runCLI(t, "run", "-c", file)
	if code != exitFailure || stdout != "" ||
		!strings.Contains(stderr, `agent "orders": extra_config.async/amqp.exchange: required`) ||
		!strings.Contains(stderr, "not started: 1 problem") {
		t.Errorf("exit %d; stdout %q; stderr %q", code, stdout, stderr)
	}
}

func TestLogLevel(t *testing.T) {
	block := func(level interface{}) luraconfig.ExtraConfig {
		return luraconfig.ExtraConfig{loggingNamespace: map[string]interface{}{"level": level}}
	}
	for _, tc := range []struct {
		name  string
		extra luraconfig.ExtraConfig
		debug bool
		want  int
	}{
		{"default", nil, false, logging.LEVEL_INFO},
		{"from the file", block("warning"), false, logging.LEVEL_WARNING},
		{"legacy key", luraconfig.ExtraConfig{legacyLoggingNamespace: map[string]interface{}{"level": "ERROR"}}, false, logging.LEVEL_ERROR},
		{"-d wins", block("ERROR"), true, logging.LEVEL_DEBUG},
	} {
		l, err := newLogger(tc.extra, tc.debug, &bytes.Buffer{})
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if got := l.(logging.BasicLogger).Level; got != tc.want {
			t.Errorf("%s: level %d, want %d", tc.name, got, tc.want)
		}
	}
	if _, err := newLogger(block(3), false, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "telemetry/logging.level") {
		t.Errorf("a numeric level: %v", err)
	}
}

// TestCheckTwoBlocks: the driver's own fields go in their block beside
// async/amqp; in async/amqp they still work, with a warning; the new
// block alone is a problem, not an agent left to another driver.
func TestCheckTwoBlocks(t *testing.T) {
	withExtensions := agent("new", "async/amqp", validBlock())
	withExtensions["extra_config"].(map[string]interface{})["github.com/krakend-contrib/async-amqp"] = map[string]interface{}{"shutdown_timeout": "5s"}
	old := validBlock()
	old["shutdown_timeout"] = "5s"
	orphan := agent("orphan", "github.com/krakend-contrib/async-amqp", map[string]interface{}{"shutdown_timeout": "5s"})
	file := writeConfig(t, map[string]interface{}{"version": 3, "async_agent": []interface{}{withExtensions, agent("old", "async/amqp", old)}})
	code, stdout, stderr := runCLI(t, "check", "-c", file)
	want := file + `: warning: agent "old": extra_config.async/amqp: shutdown_timeout: deprecated placement, still read: KrakenD's schema allows ` +
		"only its own fields in async/amqp, so `krakend check --lint` fails on it; move it to extra_config.github.com/krakend-contrib/async-amqp\n"
	if code != exitOK || !strings.Contains(stdout, "OK") || stderr != want {
		t.Errorf("exit %d; stdout %q; stderr %q, want %q", code, stdout, stderr, want)
	}
	file = writeConfig(t, map[string]interface{}{"version": 3, "async_agent": []interface{}{orphan}})
	code, _, stderr = runCLI(t, "check", "-c", file)
	if code != exitFailure || !strings.Contains(stderr, `agent "orphan": no async/amqp block in extra_config: extra_config.github.com/krakend-contrib/async-amqp holds the driver's extensions`) {
		t.Errorf("exit %d; stderr %q", code, stderr)
	}
}
