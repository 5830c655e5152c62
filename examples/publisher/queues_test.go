package main

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestReadAgentsExample(t *testing.T) {
	agents, err := readAgents("../krakend.json", "amqp://fallback/")
	if err != nil {
		t.Fatal(err)
	}
	if len(agents) != 2 || agents[0].name != "orders" || agents[1].name != "payments" {
		t.Fatalf("agents %+v, want orders and payments", agents)
	}
	orders := agents[0]
	if orders.host != "amqp://guest:guest@localhost:5672/" || orders.exchange != "events" {
		t.Errorf("orders: host %q, exchange %q", orders.host, orders.exchange)
	}
	var names []string
	for _, q := range orders.queues {
		names = append(names, q.name+" "+q.role)
	}
	want := []string{
		"orders-queue work",
		"orders-queue.retry.1s retry", "orders-queue.retry.2s retry", "orders-queue.retry.4s retry",
		"orders-queue.retry.8s retry", "orders-queue.retry.16s retry", "orders-queue.retry.32s retry",
		"orders-queue.retry.1m retry",
	}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("orders queues\n got %q\nwant %q", names, want)
	}
}

func TestReadAgentsTopologies(t *testing.T) {
	file := filepath.Join(t.TempDir(), "krakend.json")
	doc := `{"version": 3, "async_agent": [
	  {"name": "fast", "extra_config": {"async/amqp": {"host": "amqp://h1/", "name": "q1", "exchange": "x", "auto_ack": true}}},
	  {"name": "dlq", "extra_config": {"async/amqp": {"host": "amqp://h1/", "name": "q2", "exchange": "x"},
	    "github.com/krakend-contrib/async-amqp": {"retry": {"delay": "1s", "max_delay": "2s"}, "dead_letter": {"queue": "q2.dead"}}}},
	  {"extra_config": {"github.com/devopsfaith/krakend-amqp/agent": {"host": "amqp://h2/", "name": "q3", "exchange": "y", "nack_discard": true}}},
	  {"name": "other", "extra_config": {"async/kafka": {}}},
	  {"name": "theirs", "extra_config": {"async/amqp": {"host": "amqp://h1/", "name": "q5", "exchange": "z", "auto_ack": true},
	    "github.com/krakend-contrib/async-amqp": {"topology": "passive"}}},
	  {"name": "broken", "extra_config": {"async/amqp": {"name": "q4", "exchange": "x", "prefetch_count": "ten"}}}
	]}`
	if err := os.WriteFile(file, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	agents, err := readAgents(file, "amqp://fallback/")
	if err == nil || !strings.Contains(err.Error(), `agent "broken"`) || !strings.Contains(err.Error(), "prefetch_count") {
		t.Errorf("error %v, want one naming agent \"broken\" and prefetch_count", err)
	}
	got := map[string][]queueRef{}
	for _, a := range agents {
		got[fmt.Sprintf("%s %s %s declares=%t", a.name, a.host, a.exchange, a.declares)] = a.queues
	}
	want := map[string][]queueRef{
		"fast amqp://h1/ x declares=true": {{"q1", roleWork}},
		"dlq amqp://h1/ x declares=true":  {{"q2", roleWork}, {"q2.retry.1s", roleRetry}, {"q2.retry.2s", roleRetry}, {"q2.dead", roleDeadLetter}},
		// Unnamed agents are named as Lura names them.
		"AsyncAgent-02 amqp://h2/ y declares=true": {{"q3", roleWork}},
		"theirs amqp://h1/ z declares=false":       {{"q5", roleWork}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("agents\n got %v\nwant %v", got, want)
	}
}

func TestReadAgentsNone(t *testing.T) {
	file := filepath.Join(t.TempDir(), "krakend.json")
	if err := os.WriteFile(file, []byte(`{"version": 3}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readAgents(file, ""); err == nil || !strings.Contains(err.Error(), "no async agent") {
		t.Errorf("error %v, want \"no async agent\"", err)
	}
}

// TestCloudEvent: -cloudevents makes an event the driver reads as a
// CloudEvent in binary mode: the four required attributes, and a time.
func TestCloudEvent(t *testing.T) {
	at := time.Date(2026, 12, 7, 1, 2, 3, 0, time.UTC)
	h := cloudEvent("run-000001", "orders.created", at)
	want := map[string]interface{}{
		"cloudEvents:specversion": "1.0", "cloudEvents:id": "run-000001",
		"cloudEvents:source": "/krakend-amqp/examples/publisher", "cloudEvents:type": "com.example.orders.created",
		"cloudEvents:time": at,
	}
	if len(h) != len(want) {
		t.Fatalf("headers %v", h)
	}
	for k, v := range want {
		if h[k] != v {
			t.Errorf("%s = %v, want %v", k, h[k], v)
		}
	}
}
