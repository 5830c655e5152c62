package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestStats: /__stats counts requests, distinct message ids and routing
// keys, and the latency from published_at_unix_nano; DELETE resets it.
func TestStats(t *testing.T) {
	srv := httptest.NewServer(newHandler(log.New(io.Discard, "", 0), false))
	defer srv.Close()
	post := func(id, key string, publishedAt time.Time) {
		t.Helper()
		body := fmt.Sprintf(`{"id":%q,"published_at_unix_nano":%d}`, id, publishedAt.UnixNano())
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/orders/"+key, strings.NewReader(body))
		req.Header.Set("X-Amqp-Message-Id", id)
		req.Header.Set("X-Amqp-Routing-Key", key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("POST: %d", resp.StatusCode)
		}
	}
	past := time.Now().Add(-50 * time.Millisecond)
	post("a", "orders.created", past)
	post("a", "orders.created", past) // a duplicate
	post("b", "payments.card", past)

	got := getStats(t, srv.URL)
	if got.Requests != 3 || got.DistinctMessageIDs != 2 ||
		got.ByRoutingKey["orders.created"] != 2 || got.ByRoutingKey["payments.card"] != 1 {
		t.Errorf("stats %+v", got)
	}
	if got.Latency.Count != 3 || got.Latency.P50 < 50 || got.Latency.P99 < got.Latency.P50 {
		t.Errorf("latency %+v, want 3 samples of at least 50ms", got.Latency)
	}

	req, _ := http.NewRequest(http.MethodDelete, srv.URL+"/__stats", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := getStats(t, srv.URL); got.Requests != 0 || got.DistinctMessageIDs != 0 || got.Latency.Count != 0 {
		t.Errorf("after DELETE: %+v", got)
	}
}

func getStats(t *testing.T, url string) snapshot {
	t.Helper()
	resp, err := http.Get(url + "/__stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s snapshot
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s
}
