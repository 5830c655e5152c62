package config

import (
	"encoding/json"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// schemaDoc is the part of schema.json these tests compare with the code:
// the extra_config keys it describes and a definition per block.
type schemaDoc struct {
	Schema           string                 `json:"$schema"`
	Type             string                 `json:"type"`
	Properties       map[string]schemaRef   `json:"properties"`
	DependentSchemas map[string]any         `json:"dependentSchemas"`
	Defs             map[string]schemaBlock `json:"$defs"`
}

type schemaRef struct {
	Ref string `json:"$ref"`
}

// schemaBlock is the definition of one block.
type schemaBlock struct {
	Type                 string                    `json:"type"`
	Description          string                    `json:"description"`
	Required             []string                  `json:"required"`
	AdditionalProperties *bool                     `json:"additionalProperties"`
	PatternProperties    map[string]any            `json:"patternProperties"`
	Properties           map[string]schemaProperty `json:"properties"`
}

type schemaProperty struct {
	Ref         string          `json:"$ref"`
	Deprecated  bool            `json:"deprecated"`
	Type        string          `json:"type"`
	Description string          `json:"description"`
	Default     json.RawMessage `json:"default"`
	Minimum     *float64        `json:"minimum"`
	Maximum     *float64        `json:"maximum"`
}

func readSchemaDoc(t *testing.T) schemaDoc {
	t.Helper()
	raw, err := os.ReadFile("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	var doc schemaDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("schema.json is not valid JSON: %v", err)
	}
	for _, def := range []string{"async_amqp", "extensions"} {
		if _, ok := doc.Defs[def]; !ok {
			t.Fatalf("schema.json has no $defs/%s", def)
		}
	}
	return doc
}

func sortedNames[V any](m map[string]V, keep func(string) bool) []string {
	var out []string
	for k := range m {
		if keep(k) {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// TestSchemaPropertiesMatchFields: the async/amqp definition holds
// KrakenD's twelve fields, and the driver's others only as deprecated
// references to the extensions definition, which holds them all.
func TestSchemaPropertiesMatchFields(t *testing.T) {
	doc := readSchemaDoc(t)
	std, ext := doc.Defs["async_amqp"], doc.Defs["extensions"]
	all := func(string) bool { return true }
	if got, want := sortedNames(std.Properties, all), sortedNames(fields, all); !reflect.DeepEqual(got, want) {
		t.Errorf("$defs/async_amqp properties %v, config fields %v", got, want)
	}
	if got, want := sortedNames(ext.Properties, all), sortedNames(fields, func(k string) bool { return !Standard(k) }); !reflect.DeepEqual(got, want) {
		t.Errorf("$defs/extensions properties %v, extension fields %v", got, want)
	}
	for k, p := range std.Properties {
		if Standard(k) && (p.Ref != "" || p.Deprecated) {
			t.Errorf("$defs/async_amqp: %s is KrakenD's field: neither a reference nor deprecated", k)
		}
		if !Standard(k) && (p.Ref != "#/$defs/extensions/properties/"+k || !p.Deprecated) {
			t.Errorf("$defs/async_amqp: %s must be deprecated and refer to $defs/extensions, got $ref %q deprecated %t", k, p.Ref, p.Deprecated)
		}
	}
	for def, block := range doc.Defs {
		for k, p := range block.Properties {
			if p.Description == "" {
				t.Errorf("$defs/%s: %s has no description", def, k)
			}
		}
	}
	if !strings.Contains(std.Description, "deprecated") || !strings.Contains(std.Description, "krakend check --lint") {
		t.Error("$defs/async_amqp: the description must say the driver's fields are accepted there as deprecated, and why")
	}
}

func TestSchemaShape(t *testing.T) {
	doc := readSchemaDoc(t)
	if doc.Schema != "https://json-schema.org/draft/2020-12/schema" {
		t.Errorf("$schema = %q, want draft 2020-12", doc.Schema)
	}
	for key, want := range map[string]string{
		Namespace:          "#/$defs/async_amqp",
		LegacyNamespace:    "#/$defs/async_amqp",
		ExtensionNamespace: "#/$defs/extensions",
	} {
		if got := doc.Properties[key].Ref; got != want {
			t.Errorf("properties[%q] refers to %q, want %q", key, got, want)
		}
	}
	if _, ok := doc.DependentSchemas[ExtensionNamespace]; !ok {
		t.Errorf("dependentSchemas: %s must need an async/amqp block beside it", ExtensionNamespace)
	}
	for def, block := range doc.Defs {
		if block.Type != "object" {
			t.Errorf("$defs/%s: type = %q, want object", def, block.Type)
		}
		if block.AdditionalProperties == nil || *block.AdditionalProperties {
			t.Errorf("$defs/%s: additionalProperties must be false: the parser refuses unknown fields", def)
		}
		if _, ok := block.PatternProperties["^[@$_#]"]; !ok || len(block.PatternProperties) != 1 {
			t.Errorf("$defs/%s: patternProperties must be ^[@$_#] alone, as KrakenD's schema has", def)
		}
	}
	if want, got := []string{"host", "name", "exchange"}, doc.Defs["async_amqp"].Required; !reflect.DeepEqual(got, want) {
		t.Errorf("$defs/async_amqp: required = %v, want %v", got, want)
	}
	if got := doc.Defs["extensions"].Required; len(got) != 0 {
		t.Errorf("$defs/extensions: required = %v, want none", got)
	}
}

// TestStandardFieldsAreKrakenDs pins the twelve fields KrakenD's schema
// (v2.13) allows in async/amqp.
func TestStandardFieldsAreKrakenDs(t *testing.T) {
	want := []string{"auto_ack", "delete", "durable", "exchange", "exclusive", "host", "nack_discard", "name",
		"no_local", "no_wait", "prefetch_count", "prefetch_size"}
	got := append([]string(nil), StandardFields...)
	sort.Strings(got)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("StandardFields %v, want %v", got, want)
	}
	for _, k := range got {
		if _, ok := fields[k]; !ok {
			t.Errorf("%s: not a field of the parser", k)
		}
	}
}

func TestSchemaPrefetchDefault(t *testing.T) {
	doc := readSchemaDoc(t)
	var def int
	if err := json.Unmarshal(doc.Defs["async_amqp"].Properties["prefetch_count"].Default, &def); err != nil {
		t.Fatalf("prefetch_count default: %v", err)
	}
	if def != DefaultPrefetchCount {
		t.Errorf("schema prefetch_count default %d, DefaultPrefetchCount %d", def, DefaultPrefetchCount)
	}
}

// TestSchemaBoundsMatchParser feeds each integer bound of the schema to
// the parser, in the block the schema gives the field: the bounds are
// accepted, one step outside is refused.
func TestSchemaBoundsMatchParser(t *testing.T) {
	doc := readSchemaDoc(t)
	for def, key := range map[string]string{"async_amqp": Namespace, "extensions": ExtensionNamespace} {
		for name, p := range doc.Defs[def].Properties {
			if p.Type != "integer" {
				continue
			}
			if p.Minimum == nil || p.Maximum == nil {
				t.Errorf("$defs/%s: %s has no minimum or maximum", def, name)
				continue
			}
			for _, c := range []struct {
				value float64
				ok    bool
			}{{*p.Minimum, true}, {*p.Maximum, true}, {*p.Minimum - 1, false}, {*p.Maximum + 1, false}} {
				extra := map[string]interface{}{
					Namespace:          map[string]interface{}{"host": "amqp://guest:guest@localhost:5672/", "name": "q", "exchange": "x"},
					ExtensionNamespace: map[string]interface{}{},
				}
				extra[key].(map[string]interface{})[name] = c.value
				_, err := FromExtraConfig(extra)
				if (err == nil) != c.ok {
					t.Errorf("%s.%s = %v: error %v, schema says valid=%t", key, name, c.value, err, c.ok)
				}
			}
		}
	}
}
