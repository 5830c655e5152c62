package asyncamqp_test

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	luraconfig "github.com/luraproject/lura/v2/config"

	asyncamqp "github.com/krakend-contrib/async-amqp"
)

// invalidFixtures names, for every file in testdata/invalid, the agent
// that is wrong and a substring of the field path the error must name.
var invalidFixtures = map[string]struct {
	agent string
	field string
}{
	"missing-host.json":     {agent: "no-host", field: "extra_config.async/amqp.host"},
	"bad-scheme.json":       {agent: "bad-scheme", field: "extra_config.async/amqp.host"},
	"bad-prefetch.json":     {agent: "bad-prefetch", field: "extra_config.async/amqp.prefetch_count"},
	"unknown-field.json":    {agent: "unknown-field", field: "extra_config.async/amqp.exchange_kind"},
	"missing-topic.json":    {agent: "no-topic", field: "consumer.topic"},
	"bad-placeholder.json":  {agent: "bad-placeholder", field: "backend[0].url_pattern"},
	"quorum-exclusive.json": {agent: "quorum-exclusive", field: "extra_config.async/amqp.exclusive"},
	"set-twice.json":        {agent: "set-twice", field: "extra_config.github.com/krakend-contrib/async-amqp.shutdown_timeout: also set in extra_config.async/amqp"},
}

// fixtureAgents parses a krakend.json fixture with Lura's own parser, as
// the gateway does before it starts the agents.
func fixtureAgents(t *testing.T, path string) []*luraconfig.AsyncAgent {
	t.Helper()
	cfg, err := luraconfig.NewParser().Parse(path)
	if err != nil {
		t.Fatalf("Lura cannot parse %s: %v", path, err)
	}
	if len(cfg.AsyncAgents) == 0 {
		t.Fatalf("%s has no async_agent", path)
	}
	return cfg.AsyncAgents
}

func fixtureFiles(t *testing.T, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", dir, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no fixtures in testdata/%s", dir)
	}
	return files
}

// luraPlaceholder is the only form of placeholder left in a url_pattern
// once the agent is prepared to start.
var luraPlaceholder = regexp.MustCompile(`\{\{\.[A-Z][A-Za-z_]*\}\}`)

func TestTestdataValidFixtures(t *testing.T) {
	for _, path := range fixtureFiles(t, "valid") {
		t.Run(filepath.Base(path), func(t *testing.T) {
			for _, agent := range fixtureAgents(t, path) {
				if err := asyncamqp.Check(agent); err != nil {
					t.Errorf("agent %q: Check: %v", agent.Name, err)
					continue
				}
				if _, err := asyncamqp.Prepare(agent); err != nil {
					t.Errorf("agent %q: Prepare: %v", agent.Name, err)
					continue
				}
				for i, b := range agent.Backend {
					if rest := luraPlaceholder.ReplaceAllString(b.URLPattern, ""); strings.ContainsAny(rest, "{}") {
						t.Errorf("agent %q: backend[%d].url_pattern %q still holds a placeholder Lura does not fill", agent.Name, i, b.URLPattern)
					}
				}
				// A prepared agent is still accepted (a `check` after a
				// start, say).
				if err := asyncamqp.Check(agent); err != nil {
					t.Errorf("agent %q: second Check: %v", agent.Name, err)
				}
			}
		})
	}
}

func TestTestdataInvalidFixtures(t *testing.T) {
	files := fixtureFiles(t, "invalid")
	seen := map[string]bool{}
	for _, path := range files {
		name := filepath.Base(path)
		seen[name] = true
		want, ok := invalidFixtures[name]
		if !ok {
			t.Errorf("testdata/invalid/%s has no entry in invalidFixtures", name)
			continue
		}
		t.Run(name, func(t *testing.T) {
			var failed int
			for _, agent := range fixtureAgents(t, path) {
				err := asyncamqp.Check(agent)
				if agent.Name != want.agent {
					if err != nil {
						t.Errorf("agent %q is valid, Check: %v", agent.Name, err)
					}
					continue
				}
				failed++
				if err == nil {
					t.Fatalf("agent %q: Check accepted it, want an error naming %s", agent.Name, want.field)
				}
				msg := err.Error()
				if !strings.Contains(msg, `agent "`+want.agent+`"`) {
					t.Errorf("error does not name agent %q: %s", want.agent, msg)
				}
				if !strings.Contains(msg, want.field) {
					t.Errorf("error does not name field %s: %s", want.field, msg)
				}
				if lines := strings.Count(msg, "\n") + 1; lines != 1 {
					t.Errorf("fixture has one problem, error reports %d: %s", lines, msg)
				}
				if strings.Contains(msg, "guest:guest") {
					t.Errorf("error leaks the password: %s", msg)
				}
			}
			if failed != 1 {
				t.Errorf("want exactly one agent named %q, found %d", want.agent, failed)
			}
		})
	}
	for name := range invalidFixtures {
		if !seen[name] {
			t.Errorf("invalidFixtures lists %s, which is not in testdata/invalid", name)
		}
	}
}
