package asyncamqp_test

import (
	"encoding/json"
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

// lintJSON checks every async/amqp (and legacy) block in a JSON text, a
// whole file or a fragment such as `"async/amqp": {...}`, and returns how
// many it found.
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
				if block, ok := sub.(map[string]interface{}); ok && (k == asyncamqp.Namespace || k == asyncamqp.LegacyNamespace) {
					n++
					for field := range block {
						if !config.Standard(field) && !krakendRule.MatchString(field) {
							t.Errorf("%s: %s.%s: KrakenD's schema refuses it there (krakend check --lint); move it to %q",
								where, k, field, asyncamqp.ExtensionNamespace)
						}
					}
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

// TestDeprecatedFixtures: files of the old placement, extension fields in
// async/amqp, still pass Check, with the deprecation warning.
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
					warned = warned || strings.Contains(w, "deprecated placement") && strings.Contains(w, asyncamqp.ExtensionNamespace)
				}
				if !warned {
					t.Errorf("agent %q: no deprecation warning in %q", agent.Name, asyncamqp.Warnings(agent))
				}
			}
		})
	}
}
