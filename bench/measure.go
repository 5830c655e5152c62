package main

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cpuTime is the CPU time (user + system) this process has used so far.
// The backend runs in another process, so it is not counted.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// meter times one consuming phase: wall clock and CPU of this process.
type meter struct {
	start time.Time
	cpu   time.Duration
}

func startMeter() meter { return meter{start: time.Now(), cpu: cpuTime()} }

// stop returns the outcome of the phase for n messages.
func (m meter) stop() outcome {
	return outcome{elapsed: time.Since(m.start), cpu: cpuTime() - m.cpu}
}

// outcome is one timed run of a scenario.
type outcome struct {
	elapsed time.Duration
	cpu     time.Duration
	// startup is how long the consumer took to start consuming
	// (connect, declare, consume), included in elapsed.
	startup time.Duration
	// dups is how many more requests the backend saw than messages were
	// published; left is how many messages were still in the queue once
	// the consumer had stopped. Both must be 0.
	dups, left int
}

// rate is messages per second.
func (o outcome) rate(n int) float64 { return float64(n) / o.elapsed.Seconds() }

// cpuPer10k is CPU-seconds per 10,000 messages.
func (o outcome) cpuPer10k(n int) float64 { return o.cpu.Seconds() * 10000 / float64(n) }

// rss is the resident memory of this process in bytes, from
// /proc/self/statm (Linux).
func rss() (int64, error) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("/proc/self/statm: unexpected %q", b)
	}
	pages, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("/proc/self/statm: %w", err)
	}
	return pages * int64(os.Getpagesize()), nil
}

// loadavg is the 1, 5 and 15 minute load average, or "?".
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// median of xs (the mean of the two middle values for an even count); NaN
// for none.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// percentile returns the nearest-rank p-th percentile (0 < p <= 100) of
// sorted xs, or 0 for none.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// profile starts the CPU profile and writes the allocation base of the
// first run of (a) at p, when asked; the returned function stops them and
// writes the allocation profile.
func (e *env) profile(p point) (stop func(), err error) {
	if e.profiled[p] || e.cpuProfile == "" && e.memProfile == "" {
		return func() {}, nil
	}
	e.profiled[p] = true
	var cpu *os.File
	if e.cpuProfile != "" {
		if cpu, err = os.Create(profilePath(e.cpuProfile, p, e.multiPoint)); err != nil {
			return nil, err
		}
		if err := pprof.StartCPUProfile(cpu); err != nil {
			cpu.Close()
			return nil, err
		}
	}
	mem := ""
	if e.memProfile != "" {
		mem = profilePath(e.memProfile, p, e.multiPoint)
		if err := writeAllocs(mem + ".base"); err != nil {
			return nil, err
		}
	}
	return func() {
		if cpu != nil {
			pprof.StopCPUProfile()
			_ = cpu.Close()
		}
		if mem != "" {
			runtime.GC() // the profile is as of the last GC
			if err := writeAllocs(mem); err != nil {
				fmt.Fprintln(os.Stderr, "memprofile:", err)
			}
		}
	}, nil
}

func writeAllocs(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("allocs").WriteTo(f, 0)
}

// profilePath adds the point to a profile's file name when several points
// are profiled: cpu.prof becomes cpu.16-100.prof.
func profilePath(path string, p point, multi bool) string {
	if !multi {
		return path
	}
	tag := fmt.Sprintf(".%d-%d", p.workers, p.prefetch)
	if i := strings.LastIndexByte(path, '.'); i > strings.LastIndexByte(path, '/') {
		return path[:i] + tag + path[i:]
	}
	return path + tag
}
