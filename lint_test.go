package asyncamqp_test

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	asyncamqp "github.com/krakend-contrib/async-amqp"
	"github.com/krakend-contrib/async-amqp/config"
)

// krakendRule is KrakenD's schema for the async/amqp block (v2.13): its
// twelve fields, and keys starting with @, $, _ or # (additionalProperties
// false). `krakend check --lint` refuses anything else in it.
var krakendRule = regexp.MustCompile(`^[@$_#]`)

// TestConfigurationsPassKrakenDLint holds every configuration of the
// repository to KrakenD's rule for async/amqp: the examples, the valid
// fixtures, and every json block of the README and docs that has an
// async/amqp block. testdata/invalid keeps bad files on purpose, and
// testdata/deprecated the old placement (TestDeprecatedFixtures).
func TestConfigurationsPassKrakenDLint(t *testing.T) {
	var checked int
	for _, dir := range []string{"examples", filepath.Join("testdata", "valid")} {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || filepath.Ext(path) != ".json" {
				return err
			}
			raw, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			checked += lintJSON(t, path, string(raw))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	docs, _ := filepath.Glob(filepath.Join("docs", "*.md"))
	for _, path := range append([]string{"README.md"}, docs...) {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range jsonBlocks(string(raw)) {
			if strings.Contains(b.text, `"`+asyncamqp.Namespace+`"`) {
				checked += lintJSON(t, path+":"+b.line, b.text)
			}
		}
	}
	if checked < 10 {
		t.Errorf("only %d async/amqp blocks checked: the test no longer finds the configurations", checked)
	}
}

// krakendAgentFields are the keys KrakenD's v2.13 schema allows in an
// async_agent entry (with the krakendRule keys); name, consumer (with its
// topic), backend and extra_config are required, and extra_config must
// hold async/amqp or async/kafka: the legacy key alone fails the lint.
var krakendAgentFields = map[string]bool{
	"name": true, "consumer": true, "backend": true, "extra_config": true, "connection": true, "encoding": true,
}

// lintJSON holds a JSON text, a whole file or a fragment such as
// `"async/amqp": {...}`, to KrakenD's v2.13 schema for async agents: every
// async_agent entry to the agent rule, and every async/amqp (and legacy)
// block to the block rule. It returns how many blocks it found.
func lintJSON(t *testing.T, where, text string) int {
	t.Helper()
	var doc interface{}
	if err := json.Unmarshal([]byte(text), &doc); err != nil {
		if err2 := json.Unmarshal([]byte("{"+text+"}"), &doc); err2 != nil {
			t.Errorf("%s: not JSON: %v", where, err)
			return 0
		}
	}
	n := 0
	var walk func(v interface{})
	walk = func(v interface{}) {
		switch v := v.(type) {
		case map[string]interface{}:
			for k, sub := range v {
				if agents, ok := sub.([]interface{}); ok && k == "async_agent" {
					for i, agent := range agents {
						lintAgent(t, fmt.Sprintf("%s: async_agent[%d]", where, i), agent)
					}
				}
				if block, ok := sub.(map[string]interface{}); ok && (k == asyncamqp.Namespace || k == asyncamqp.LegacyNamespace) {
					n++
					lintBlock(t, where+": "+k, block)
				}
				walk(sub)
			}
		case []interface{}:
			for _, item := range v {
				walk(item)
			}
		}
	}
	walk(doc)
	return n
}

func lintAgent(t *testing.T, where string, v interface{}) {
	t.Helper()
	agent, ok := v.(map[string]interface{})
	if !ok {
		t.Errorf("%s: not an object", where)
		return
	}
	for k := range agent {
		if !krakendAgentFields[k] && !krakendRule.MatchString(k) {
			t.Errorf("%s.%s: KrakenD's schema allows no such agent field", where, k)
		}
	}
	for _, k := range []string{"name", "consumer", "backend", "extra_config"} {
		if _, ok := agent[k]; !ok {
			t.Errorf("%s: KrakenD's schema requires %q", where, k)
		}
	}
	if consumer, ok := agent["consumer"].(map[string]interface{}); ok {
		if _, ok := consumer["topic"].(string); !ok {
			t.Errorf("%s.consumer: KrakenD's schema requires a string topic", where)
		}
	}
	extra, _ := agent["extra_config"].(map[string]interface{})
	if _, ok := extra[asyncamqp.Namespace]; !ok {
		t.Errorf("%s.extra_config: KrakenD's schema requires %q (the legacy key does not lint)", where, asyncamqp.Namespace)
	}
	if block, ok := extra[asyncamqp.Namespace].(map[string]interface{}); ok {
		for _, k := range []string{"name", "host", "exchange"} {
			if _, ok := block[k].(string); !ok {
				t.Errorf("%s.extra_config.%s: KrakenD's schema requires a string %q", where, asyncamqp.Namespace, k)
			}
		}
	}
}

func lintBlock(t *testing.T, where string, block map[string]interface{}) {
	t.Helper()
	for field := range block {
		if !config.Standard(field) && !krakendRule.MatchString(field) {
			t.Errorf("%s.%s: KrakenD's schema refuses it there (krakend check --lint); move it to %q",
				where, field, asyncamqp.ExtensionNamespace)
		}
	}
}

type mdBlock struct{ line, text string }

// jsonBlocks returns the ```json blocks of a Markdown text, with the
// line each starts on.
func jsonBlocks(md string) []mdBlock {
	var out []mdBlock
	lines := strings.Split(md, "\n")
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != "```json" {
			continue
		}
		start := i + 1
		for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
		}
		out = append(out, mdBlock{line: strconv.Itoa(start + 1), text: strings.Join(lines[start:i], "\n")})
	}
	return out
}

// TestDeprecatedFixtures: files of the old placement (extension fields in
// async/amqp) or of KrakenD's legacy key, which `krakend check --lint`
// refuses, still pass Check, with a warning that says what to change.
func TestDeprecatedFixtures(t *testing.T) {
	for _, path := range fixtureFiles(t, "deprecated") {
		t.Run(filepath.Base(path), func(t *testing.T) {
			for _, agent := range fixtureAgents(t, path) {
				if err := asyncamqp.Check(agent); err != nil {
					t.Errorf("agent %q: Check: %v", agent.Name, err)
					continue
				}
				var warned bool
				for _, w := range asyncamqp.Warnings(agent) {
					warned = warned || strings.Contains(w, "deprecated placement") && strings.Contains(w, asyncamqp.ExtensionNamespace) ||
						strings.Contains(w, "the legacy key") && strings.Contains(w, "rename the block to \""+asyncamqp.Namespace)
				}
				if !warned {
					t.Errorf("agent %q: no deprecation warning in %q", agent.Name, asyncamqp.Warnings(agent))
				}
			}
		})
	}
}
