package main

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
)

// The docker compose example runs krakend.docker.json: the same file as
// krakend.json, with the broker and the backend reached by service name.
const (
	exampleJSON       = "../../examples/krakend.json"
	exampleDockerJSON = "../../examples/krakend.docker.json"
	rpcExampleJSON    = "../../examples/krakend.rpc.json"
	composeFile       = "../../examples/docker-compose.yml"
)

// TestExamplesCheck: the example files pass `check`, with no warning.
func TestExamplesCheck(t *testing.T) {
	for file, summary := range map[string]string{
		exampleJSON: "1 endpoint, 2 async agents", exampleDockerJSON: "1 endpoint, 2 async agents", rpcExampleJSON: "0 endpoints, 1 async agent",
	} {
		code, stdout, stderr := runCLI(t, "check", "-c", file)
		if want := file + ": OK (" + summary + ")\n"; code != exitOK || stdout != want || stderr != "" {
			t.Errorf("check %s: exit %d; stdout %q (want %q); stderr %q", file, code, stdout, want, stderr)
		}
	}
}

// TestDockerExampleMatchesExample: krakend.docker.json differs from
// krakend.json only in the hosts, and the compose file mounts it.
func TestDockerExampleMatchesExample(t *testing.T) {
	local, docker := readJSON(t, exampleJSON), readJSON(t, exampleDockerJSON)
	replaceStrings(local, map[string]string{
		"http://127.0.0.1:8081":              "http://backend:8081",
		"amqp://guest:guest@localhost:5672/": "amqp://guest:guest@rabbitmq:5672/",
	})
	if !reflect.DeepEqual(local, docker) {
		a, _ := json.MarshalIndent(local, "", "  ")
		b, _ := json.MarshalIndent(docker, "", "  ")
		t.Errorf("%s is not %s with the docker hosts (backend:8081, rabbitmq:5672):\nwant\n%s\ngot\n%s", exampleDockerJSON, exampleJSON, a, b)
	}
	compose, err := os.ReadFile(composeFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(compose), "./krakend.docker.json:/etc/krakend/krakend.json") {
		t.Errorf("%s does not mount krakend.docker.json as the gateway's configuration", composeFile)
	}
}

func readJSON(t *testing.T, path string) interface{} {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc interface{}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return doc
}

// replaceStrings replaces, in place, every string value of a decoded JSON
// document that is a key of repl.
func replaceStrings(v interface{}, repl map[string]string) {
	switch v := v.(type) {
	case map[string]interface{}:
		for k, item := range v {
			if s, ok := item.(string); ok && repl[s] != "" {
				v[k] = repl[s]
				continue
			}
			replaceStrings(item, repl)
		}
	case []interface{}:
		for i, item := range v {
			if s, ok := item.(string); ok && repl[s] != "" {
				v[i] = repl[s]
				continue
			}
			replaceStrings(item, repl)
		}
	}
}
