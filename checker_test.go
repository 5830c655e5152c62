package asyncamqp_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	luraconfig "github.com/luraproject/lura/v2/config"

	asyncamqp "github.com/krakend-contrib/async-amqp"
)

// krakendAlias registers what KrakenD CE's main.go registers before it
// parses the file: async/amqp is an alias of the legacy key. KrakenD's
// check command leaves the blocks where they are; its executor calls
// Normalize before the agents start, which moves the block under
// github.com/devopsfaith/krakend-amqp/agent.
func krakendAlias(t *testing.T) {
	t.Helper()
	prev, had := luraconfig.ExtraConfigAlias[asyncamqp.Namespace]
	luraconfig.ExtraConfigAlias[asyncamqp.Namespace] = asyncamqp.LegacyNamespace
	t.Cleanup(func() {
		if had {
			luraconfig.ExtraConfigAlias[asyncamqp.Namespace] = prev
		} else {
			delete(luraconfig.ExtraConfigAlias, asyncamqp.Namespace)
		}
	})
}

func parseFile(t *testing.T, path string) luraconfig.ServiceConfig {
	t.Helper()
	cfg, err := luraconfig.NewParser().Parse(path)
	if err != nil {
		t.Fatalf("Lura cannot parse %s: %v", path, err)
	}
	return cfg
}

// TestCheckerRejectsInvalidFixtures runs the checker on each invalid
// fixture as KrakenD's `check` command parses it and as KrakenD CE's
// executor has it (normalized to the legacy key), and wants it refused
// with the agent and the key the user wrote.
func TestCheckerRejectsInvalidFixtures(t *testing.T) {
	for _, krakend := range []bool{false, true} {
		for _, path := range fixtureFiles(t, "invalid") {
			name := filepath.Base(path)
			t.Run(map[bool]string{false: "lura/", true: "krakend/"}[krakend]+name, func(t *testing.T) {
				if krakend {
					krakendAlias(t)
				}
				want, ok := invalidFixtures[name]
				if !ok {
					t.Fatalf("%s is not listed in invalidFixtures", name)
				}
				field := want.field
				if krakend {
					field = strings.Replace(field, "extra_config.async/amqp.",
						"extra_config.async/amqp ("+asyncamqp.LegacyNamespace+").", 1)
				}
				cfg := parseFile(t, path)
				if krakend {
					cfg.Normalize()
				}
				var out bytes.Buffer
				errs := asyncamqp.NewChecker(&out)(cfg)
				if len(errs) == 0 {
					t.Fatal("the checker accepted an invalid file")
				}
				var named bool
				for _, err := range errs {
					msg := err.Error()
					if strings.Contains(msg, "\n") {
						t.Errorf("error spans lines: %q", msg)
					}
					named = named || strings.Contains(msg, `agent "`+want.agent+`"`) && strings.Contains(msg, field)
				}
				if !named {
					t.Errorf("no error names agent %q and %q: %q", want.agent, field, errs)
				}
			})
		}
	}
}

// TestCheckerAcceptsValidFiles: the valid fixtures and the examples pass,
// the old placement passes with its warning on w, and the files are not
// changed by the check (a run after it still rewrites the placeholders).
func TestCheckerAcceptsValidFiles(t *testing.T) {
	files := append(fixtureFiles(t, "valid"), fixtureFiles(t, "deprecated")...)
	examples, _ := filepath.Glob(filepath.Join("examples", "*.json"))
	if len(examples) == 0 {
		t.Fatal("no examples/*.json")
	}
	for _, path := range append(files, examples...) {
		t.Run(path, func(t *testing.T) {
			krakendAlias(t)
			cfg := parseFile(t, path)
			before := patterns(cfg)
			var out bytes.Buffer
			if errs := asyncamqp.NewChecker(&out)(cfg); len(errs) > 0 {
				t.Fatalf("the checker refused a valid file: %q", errs)
			}
			if got := patterns(cfg); got != before {
				t.Errorf("the checker changed the url_patterns: %q, was %q", got, before)
			}
			deprecated := strings.Contains(path, "deprecated")
			lint := strings.Contains(out.String(), "deprecated placement") || strings.Contains(out.String(), "the legacy key")
			if warned := strings.Contains(out.String(), "WARNING: agent ") && lint; warned != deprecated {
				t.Errorf("deprecation warning on w: %v, want %v: %q", warned, deprecated, out.String())
			}
		})
	}
}

func patterns(cfg luraconfig.ServiceConfig) string {
	var out []string
	for _, a := range cfg.AsyncAgents {
		for _, b := range a.Backend {
			out = append(out, b.URLPattern)
		}
	}
	return strings.Join(out, " ")
}

// TestCheckerLeavesOtherAgents: an agent of another driver is not this
// checker's business, and an unnamed agent is named as Lura will name it,
// without renaming it in the configuration.
func TestCheckerLeavesOtherAgents(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "krakend.json")
	file := `{"version": 3, "async_agent": [
	  {"consumer": {"topic": "#"}, "backend": [{"host": ["http://127.0.0.1:8080"], "url_pattern": "/x"}],
	   "extra_config": {"async/kafka": {"prefetch_count": "ten"}}},
	  {"consumer": {"topic": "#"}, "backend": [{"host": ["http://127.0.0.1:8080"], "url_pattern": "/x"}],
	   "extra_config": {"async/amqp": {"host": "amqp://localhost", "name": "q", "exchange": "e", "prefetch_count": "ten"}}}
	]}`
	if err := os.WriteFile(path, []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := parseFile(t, path)
	errs := asyncamqp.NewChecker(nil)(cfg)
	if len(errs) != 1 {
		t.Fatalf("want one error (the amqp agent), got %q", errs)
	}
	if msg := errs[0].Error(); !strings.Contains(msg, `agent "AsyncAgent-01"`) || !strings.Contains(msg, "prefetch_count") {
		t.Errorf("error does not name the unnamed agent as Lura will and its field: %q", msg)
	}
	if cfg.AsyncAgents[1].Name != "" {
		t.Errorf("the checker renamed the agent in the configuration to %q", cfg.AsyncAgents[1].Name)
	}
}
