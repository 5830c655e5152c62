package config

import (
	"encoding/json"
	"os"
	"reflect"
	"sort"
	"testing"
)

// schemaDoc is the part of schema.json these tests compare with the code.
type schemaDoc struct {
	Schema               string                    `json:"$schema"`
	Type                 string                    `json:"type"`
	Required             []string                  `json:"required"`
	AdditionalProperties *bool                     `json:"additionalProperties"`
	Properties           map[string]schemaProperty `json:"properties"`
}

type schemaProperty struct {
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
	return doc
}

func TestSchemaPropertiesMatchFields(t *testing.T) {
	doc := readSchemaDoc(t)
	var inSchema, inCode []string
	for k := range doc.Properties {
		inSchema = append(inSchema, k)
	}
	for k := range fields {
		inCode = append(inCode, k)
	}
	sort.Strings(inSchema)
	sort.Strings(inCode)
	if !reflect.DeepEqual(inSchema, inCode) {
		t.Errorf("schema.json properties %v, config fields %v", inSchema, inCode)
	}
	for k, p := range doc.Properties {
		if p.Description == "" {
			t.Errorf("schema.json: %s has no description", k)
		}
	}
}

func TestSchemaShape(t *testing.T) {
	doc := readSchemaDoc(t)
	if doc.Schema != "https://json-schema.org/draft/2020-12/schema" {
		t.Errorf("$schema = %q, want draft 2020-12", doc.Schema)
	}
	if doc.Type != "object" {
		t.Errorf("type = %q, want object", doc.Type)
	}
	if want := []string{"host", "name", "exchange"}; !reflect.DeepEqual(doc.Required, want) {
		t.Errorf("required = %v, want %v", doc.Required, want)
	}
	if doc.AdditionalProperties == nil || *doc.AdditionalProperties {
		t.Error("additionalProperties must be false: the parser refuses unknown fields")
	}
}

func TestSchemaPrefetchDefault(t *testing.T) {
	doc := readSchemaDoc(t)
	var def int
	if err := json.Unmarshal(doc.Properties["prefetch_count"].Default, &def); err != nil {
		t.Fatalf("prefetch_count default: %v", err)
	}
	if def != DefaultPrefetchCount {
		t.Errorf("schema prefetch_count default %d, DefaultPrefetchCount %d", def, DefaultPrefetchCount)
	}
}

// TestSchemaBoundsMatchParser feeds each integer bound of the schema to
// Parse: the bounds are accepted, one step outside is refused.
func TestSchemaBoundsMatchParser(t *testing.T) {
	doc := readSchemaDoc(t)
	for name, p := range doc.Properties {
		if p.Type != "integer" {
			continue
		}
		if p.Minimum == nil || p.Maximum == nil {
			t.Errorf("schema.json: %s has no minimum or maximum", name)
			continue
		}
		for _, c := range []struct {
			value float64
			ok    bool
		}{{*p.Minimum, true}, {*p.Maximum, true}, {*p.Minimum - 1, false}, {*p.Maximum + 1, false}} {
			block := map[string]interface{}{
				"host": "amqp://guest:guest@localhost:5672/", "name": "q", "exchange": "x",
				name: c.value,
			}
			_, err := Parse(block)
			if (err == nil) != c.ok {
				t.Errorf("%s = %v: Parse error %v, schema says valid=%t", name, c.value, err, c.ok)
			}
		}
	}
}
