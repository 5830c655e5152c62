package asyncamqp_test

import (
	"bufio"
	"bytes"
	"cmp"
	"go/version"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// floorFile lists the module versions of the KrakenD CE release the
// library must fit in.
const floorFile = "testdata/krakend-ce-v2.13.8.txt"

// maxGo is the newest go line the library module may declare: KrakenD's
// builder ships a Go 1.25 toolchain with GOTOOLCHAIN=local.
const maxGo = "go1.25.0"

// floor is KrakenD CE's go line and, by module, the newest version the
// library may use.
type floor struct {
	goVersion string
	modules   map[string]string
}

func readFloor(t *testing.T) floor {
	t.Helper()
	raw, err := os.ReadFile(floorFile)
	if err != nil {
		t.Fatal(err)
	}
	f := floor{modules: map[string]string{}}
	s := bufio.NewScanner(bytes.NewReader(raw))
	for s.Scan() {
		fields := strings.Fields(s.Text())
		switch {
		case len(fields) == 0 || strings.HasPrefix(fields[0], "#"):
		case fields[0] == "go" && len(fields) == 2:
			f.goVersion = "go" + fields[1]
		case len(fields) == 2 || len(fields) == 3:
			f.modules[fields[0]] = fields[len(fields)-1]
		default:
			t.Fatalf("%s: cannot read line %q", floorFile, s.Text())
		}
	}
	if f.goVersion == "" || len(f.modules) == 0 {
		t.Fatalf("%s: no go line or no modules", floorFile)
	}
	return f
}

// graphModule is one module of the library's build graph.
type graphModule struct{ path, version, goVersion string }

// libraryGraph lists the library module's graph as a KrakenD build sees
// it: the library's own go.mod, without this repository's go.work.
func libraryGraph(t *testing.T) (main graphModule, deps []graphModule) {
	t.Helper()
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to list the module graph: %v", err)
	}
	cmd := exec.Command(goCmd, "list", "-m", "-f", "{{.Path}} {{.Version}} {{.GoVersion}}", "all")
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -m all: %v\n%s", err, stderr.String())
	}
	for i, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		m := graphModule{path: fields[0]}
		if i == 0 { // the main module has no version
			if len(fields) > 1 {
				m.goVersion = fields[1]
			}
			main = m
			continue
		}
		if len(fields) > 1 {
			m.version = fields[1]
		}
		if len(fields) > 2 {
			m.goVersion = fields[2]
		}
		deps = append(deps, m)
	}
	return main, deps
}

// TestLibraryFitsKrakenD keeps the library module buildable inside
// KrakenD CE as it is: its go line, the go line of every module it
// brings, and the version of every module KrakenD also uses.
func TestLibraryFitsKrakenD(t *testing.T) {
	f := readFloor(t)
	main, deps := libraryGraph(t)
	if main.goVersion == "" || version.Compare("go"+main.goVersion, maxGo) > 0 {
		t.Errorf("go.mod declares go %s: KrakenD builds with Go 1.25, so it must be %s or lower", main.goVersion, strings.TrimPrefix(maxGo, "go"))
	}
	for _, m := range deps {
		if m.goVersion != "" && version.Compare("go"+m.goVersion, f.goVersion) > 0 {
			t.Errorf("%s %s declares go %s, newer than KrakenD CE's go %s: it would raise KrakenD's go line",
				m.path, m.version, m.goVersion, strings.TrimPrefix(f.goVersion, "go"))
		}
		if limit, ok := f.modules[m.path]; ok && compareSemver(m.version, limit) > 0 {
			t.Errorf("%s is at %s in the library's graph, past %s (%s): adding the driver would move KrakenD's build",
				m.path, m.version, limit, floorFile)
		}
	}
}

func TestCompareSemver(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"v1.2.3", "v1.2.3", 0},
		{"v1.2.3", "v1.10.0", -1},
		{"v2.14.1", "v2.14.2-0.20260316170719-6d79b4ef723b", -1},
		{"v2.14.2", "v2.14.2-0.20260316170719-6d79b4ef723b", 1},
		{"v1.0.0-rc.2", "v1.0.0-rc.10", -1},
		{"v1.0.0-alpha", "v1.0.0-1", 1},
		{"v1.0.0-alpha", "v1.0.0-alpha.1", -1},
		{"v0.0.0-20240903120638-7835f813f4da", "v0.0.0-20260218203240-3dfff04db8fa", -1},
		{"v1.5.0+incompatible", "v1.5.0", 0},
	} {
		if got := compareSemver(tc.a, tc.b); got != tc.want {
			t.Errorf("compareSemver(%s, %s) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if got := compareSemver(tc.b, tc.a); got != -tc.want {
			t.Errorf("compareSemver(%s, %s) = %d, want %d", tc.b, tc.a, got, -tc.want)
		}
	}
}

// compareSemver orders two module versions (vMAJOR.MINOR.PATCH with an
// optional pre-release, pseudo-versions included) as semver does: -1, 0
// or 1. Build metadata (+incompatible) is ignored.
func compareSemver(a, b string) int {
	coreA, preA := splitVersion(a)
	coreB, preB := splitVersion(b)
	for i := range coreA {
		if c := compareNumber(coreA[i], coreB[i]); c != 0 {
			return c
		}
	}
	switch {
	case preA == "" && preB == "":
		return 0
	case preA == "":
		return 1
	case preB == "":
		return -1
	}
	return comparePrerelease(strings.Split(preA, "."), strings.Split(preB, "."))
}

func splitVersion(v string) (core [3]string, pre string) {
	v, _, _ = strings.Cut(strings.TrimPrefix(v, "v"), "+")
	v, pre, _ = strings.Cut(v, "-")
	parts := strings.SplitN(v, ".", 3)
	for i := range core {
		core[i] = "0"
		if i < len(parts) {
			core[i] = parts[i]
		}
	}
	return core, pre
}

func comparePrerelease(a, b []string) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		_, errA := strconv.ParseUint(a[i], 10, 64)
		_, errB := strconv.ParseUint(b[i], 10, 64)
		var c int
		switch {
		case errA == nil && errB == nil:
			c = compareNumber(a[i], b[i])
		case errA == nil: // numeric identifiers sort first
			c = -1
		case errB == nil:
			c = 1
		default:
			c = strings.Compare(a[i], b[i])
		}
		if c != 0 {
			return c
		}
	}
	return compareNumber(strconv.Itoa(len(a)), strconv.Itoa(len(b)))
}

// compareNumber orders two decimal strings of any length.
func compareNumber(a, b string) int {
	a, b = strings.TrimLeft(a, "0"), strings.TrimLeft(b, "0")
	if len(a) != len(b) {
		return cmp.Compare(len(a), len(b))
	}
	return strings.Compare(a, b)
}
