package config

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestParseReply(t *testing.T) {
	cfg, err := Parse(validBlock())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Reply.Enabled || cfg.Reply.Answers("amq.rabbitmq.reply-to.abc") {
		t.Errorf("replies are on without a reply object: %+v", cfg.Reply)
	}

	cfg, err = Parse(with(map[string]interface{}{"reply": map[string]interface{}{}}))
	if err != nil {
		t.Fatal(err)
	}
	want := Reply{Enabled: true, To: DefaultReplyTo, MaxBodyBytes: DefaultReplyMaxBodyBytes, Errors: true}
	if !reflect.DeepEqual(cfg.Reply, want) {
		t.Errorf("reply {} = %+v, want %+v", cfg.Reply, want)
	}

	cfg, err = Parse(with(map[string]interface{}{"reply": map[string]interface{}{
		"to": []interface{}{"rpc.*.replies"}, "headers": []interface{}{"Location", "X-Request-Id"},
		"max_body_bytes": 4096.0, "errors": false,
	}}))
	if err != nil {
		t.Fatal(err)
	}
	want = Reply{Enabled: true, To: []string{"rpc.*.replies"}, Headers: []string{"Location", "X-Request-Id"}, MaxBodyBytes: 4096}
	if !reflect.DeepEqual(cfg.Reply, want) {
		t.Errorf("reply = %+v, want %+v", cfg.Reply, want)
	}
}

func TestParseReplyErrors(t *testing.T) {
	for _, tc := range []struct {
		reply interface{}
		want  string
	}{
		{true, "reply: must be an object, got a boolean"},
		{map[string]interface{}{"to": []interface{}{""}}, "reply.to: item 0 must not be empty"},
		{map[string]interface{}{"to": "amq.gen-*"}, "reply.to: must be a list of strings"},
		{map[string]interface{}{"headers": []interface{}{"Bad Name"}}, `reply.headers: item 0 must be an HTTP header name, got "Bad Name"`},
		{map[string]interface{}{"max_body_bytes": 17e6}, "reply.max_body_bytes: must be between 0 and 16777216"},
		{map[string]interface{}{"errors": "yes"}, "reply.errors: must be true or false"},
		{map[string]interface{}{"timeout": "1s"}, "reply.timeout: unknown field"},
	} {
		_, err := Parse(with(map[string]interface{}{"reply": tc.reply}))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("reply %v: error %v, want %q", tc.reply, err, tc.want)
		}
	}
}

func TestReplyAnswers(t *testing.T) {
	r := Reply{Enabled: true, To: append(slices.Clone(DefaultReplyTo), "rpc.*.replies", "exact")}
	for name, want := range map[string]bool{
		"amq.rabbitmq.reply-to.g1h2AA==": true,
		"amq.rabbitmq.reply-to":          false, // the broker rewrites it; the bare name is no queue
		"amq.gen-JzTY20BRgKO-HjmUJj0wLg": true,
		"rpc.billing.replies":            true,
		"rpc..replies":                   true,
		"rpc.replies":                    false,
		"exact":                          true,
		"exactly":                        false,
		"orders":                         false,
		"":                               false,
	} {
		if got := r.Answers(name); got != want {
			t.Errorf("Answers(%q) = %v, want %v", name, got, want)
		}
	}
	if (Reply{To: DefaultReplyTo}).Answers("amq.gen-x") {
		t.Error("a reply that is not enabled answers")
	}
}

func TestMatch(t *testing.T) {
	for _, tc := range []struct {
		pattern, s string
		want       bool
	}{
		{"*", "", true}, {"*", "anything", true}, {"a*", "a", true}, {"*a", "ba", true},
		{"a*b*c", "abc", true}, {"a*b*c", "axxbyyc", true}, {"a*b*c", "acb", false},
		{"a*a", "a", false}, {"ab*ba", "aba", false}, {"ab*ba", "abba", true},
	} {
		if got := match(tc.pattern, tc.s); got != tc.want {
			t.Errorf("match(%q, %q) = %v, want %v", tc.pattern, tc.s, got, tc.want)
		}
	}
}
