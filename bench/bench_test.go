package main

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median(nil) is not NaN")
	}
	in := []float64{3, 1, 2}
	median(in)
	if in[0] != 3 {
		t.Error("median sorted its argument")
	}
}

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i))
	}
	for p, want := range map[float64]time.Duration{50: 50, 99: 99, 100: 100, 0.1: 1} {
		if got := percentile(s, p); got != want {
			t.Errorf("p%v = %v, want %v", p, got, want)
		}
	}
	if got := percentile([]time.Duration{7}, 99); got != 7 {
		t.Errorf("p99 of one = %v", got)
	}
	if got := percentile(nil, 50); got != 0 {
		t.Errorf("p50 of none = %v", got)
	}
}

func TestMessageBody(t *testing.T) {
	for _, size := range []int{512, 100, 46} {
		b := messageBody(12345, 1700000000123456789, size)
		if len(b) != size {
			t.Errorf("size %d: got %d bytes", size, len(b))
		}
		var v struct {
			ID  int
			TS  int64
			Pad string
		}
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatalf("size %d: not JSON: %v: %s", size, err, b)
		}
		if v.ID != 12345 || v.TS != 1700000000123456789 {
			t.Errorf("size %d: decoded %+v", size, v)
		}
		if got := stamp(b); got != 1700000000123456789 {
			t.Errorf("stamp = %d", got)
		}
	}
	if got := stamp(messageBody(1, 0, 512)); got != 0 {
		t.Errorf("unstamped body: stamp = %d", got)
	}
	if got := len(messageBody(1, 0, 5)); got < 5 {
		t.Errorf("a too small size still gives a whole object, got %d bytes", got)
	}
}

func TestParseFlags(t *testing.T) {
	o, err := parseFlags([]string{"-points", "1/10, 16/100", "-only", "ours,latency"})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.points) != 2 || o.points[1] != (point{16, 100}) {
		t.Errorf("points = %v", o.points)
	}
	if !o.selected("ours", false) || o.selected("floor", false) || !o.selected("latency", false) {
		t.Errorf("only = %v", o.only)
	}
	def, _ := parseFlags(nil)
	if !def.selected("floor", false) || def.selected("ours-json", true) || def.messages != 20000 || def.runs != 3 {
		t.Errorf("defaults: %+v", def)
	}
	for _, bad := range [][]string{{"-points", "16"}, {"-points", "0/10"}, {"-only", "nope"}, {"-runs", "0"}} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
}

func TestFormatTable(t *testing.T) {
	rows := []row{
		{name: "http", label: "(c) http", runs: 3, rate: 20000, cpu: 0.5, lo: 19000, hi: 21000},
		{name: "floor", label: "(b) floor", runs: 3, rate: 10000, cpu: 1.2},
		{name: "broker", label: "(d) broker"},
		{name: "ours", label: "(a) ours", floor: "floor", runs: 3, rate: 11000, cpu: 1.5, lo: 10500, hi: 11500, dups: 2},
	}
	var buf bytes.Buffer
	formatTable(&buf, "W=16 prefetch=100", rows)
	lines := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n")
	if len(lines) != 6 {
		t.Fatalf("want title, header and 4 rows, got:\n%s", buf.String())
	}
	ours := strings.Fields(lines[5])
	want := []string{"(a)", "ours", "11000", "(10500-11500)", "1.500", "2", "0", "1.10x", "0.55x", "1.25x"}
	if strings.Join(ours, " ") != strings.Join(want, " ") {
		t.Errorf("ours row = %q, want %q", ours, want)
	}
	if !strings.Contains(lines[2], "(19000-21000)") || !strings.Contains(lines[4], "FAILED") {
		t.Errorf("table:\n%s", buf.String())
	}
	// Without its floor, ours gets no ratio to it.
	buf.Reset()
	formatTable(&buf, "t", rows[3:])
	if f := strings.Fields(strings.Split(buf.String(), "\n")[2]); strings.Join(f[len(f)-3:], " ") != "- - -" {
		t.Errorf("ratios without floor: %q", f)
	}
}

func TestProfilePath(t *testing.T) {
	p := point{16, 100}
	for _, tc := range []struct {
		in    string
		multi bool
		want  string
	}{
		{"cpu.prof", false, "cpu.prof"},
		{"cpu.prof", true, "cpu.16-100.prof"},
		{"out.d/cpu", true, "out.d/cpu.16-100"},
	} {
		if got := profilePath(tc.in, p, tc.multi); got != tc.want {
			t.Errorf("profilePath(%q, %v) = %q, want %q", tc.in, tc.multi, got, tc.want)
		}
	}
}
