package clustertest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nodeUser is who runs the nodes when the tests run as root: RabbitMQ's
// own user, whose home holds the Erlang cookie the CLI uses too.
const nodeUser = "rabbitmq"

func isRoot() bool { return os.Geteuid() == 0 }

// asNodeUser builds the command that runs path with env added, as the
// node user when we are root.
func asNodeUser(path string, env []string, args ...string) *exec.Cmd {
	if isRoot() {
		argv := append([]string{"-u", nodeUser, "--", "env"}, env...)
		return exec.Command("runuser", append(append(argv, path), args...)...)
	}
	cmd := exec.Command(path, args...)
	cmd.Env = append(os.Environ(), env...)
	return cmd
}

// serverPath prefers the script under /usr/lib/rabbitmq/bin: Debian's
// wrapper on PATH would redirect the node's output into the machine
// broker's startup log.
func serverPath() string {
	const debian = "/usr/lib/rabbitmq/bin/rabbitmq-server"
	if _, err := os.Stat(debian); err == nil {
		return debian
	}
	if p, err := exec.LookPath("rabbitmq-server"); err == nil {
		return p
	}
	return "rabbitmq-server"
}

func nodeUserHome() string {
	if isRoot() {
		if u, err := user.Lookup(nodeUser); err == nil {
			return u.HomeDir
		}
	}
	home, _ := os.UserHomeDir()
	return home
}

// ensureCookie gives root the node user's Erlang cookie when it has
// none, so that a rabbitmqctl run as root (not through Debian's wrapper,
// which switches to the rabbitmq user) may talk to the nodes.
func ensureCookie(t testing.TB) {
	if !isRoot() {
		return
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return
	}
	mine := filepath.Join(home, ".erlang.cookie")
	if _, err := os.Stat(mine); err == nil {
		return
	}
	cookie, err := os.ReadFile(filepath.Join(nodeUserHome(), ".erlang.cookie"))
	if err != nil {
		return // the first node creates one; Debian's wrapper finds it
	}
	if err := os.WriteFile(mine, cookie, 0o400); err != nil {
		t.Logf("cluster: copy the Erlang cookie to %s: %v", mine, err)
	}
}

// chownToNodeUser hands dir and what it holds to the node user, when we
// are root, so that the nodes may write their data and logs there.
func chownToNodeUser(t testing.TB, dir string) {
	if !isRoot() {
		return
	}
	u, err := user.Lookup(nodeUser)
	if err != nil {
		t.Fatalf("cluster: running as root needs a %q user to run the nodes as: %v", nodeUser, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	err = filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, uid, gid)
	})
	if err != nil {
		t.Fatalf("cluster: chown %s: %v", dir, err)
	}
}

func writeFile(t testing.TB, path, content string) {
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatalf("cluster: %v", err)
	}
}

// ports hands out free loopback ports below Linux's ephemeral range
// (32768 and up), where no outgoing connection can take one between the
// check and the node's bind, and never the same one twice in a run.
type ports struct{ used map[int]bool }

func (p *ports) pair(t testing.TB) (int, int) { return p.one(t), p.one(t) }

func (p *ports) one(t testing.TB) int {
	if p.used == nil {
		p.used = map[int]bool{}
	}
	for range 1000 {
		port := 20000 + rand.IntN(12000)
		if p.used[port] || port == 25672 || !free(port) {
			continue
		}
		p.used[port] = true
		return port
	}
	t.Fatal("cluster: no free port found")
	return 0
}

func free(port int) bool {
	for _, host := range []string{"127.0.0.1", "0.0.0.0"} {
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return false
		}
		_ = ln.Close()
	}
	return true
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	if err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	// A killed node the init process has not reaped yet is a zombie.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	if i := bytes.LastIndexByte(stat, ')'); i > 0 && len(stat) > i+2 {
		return stat[i+2] != 'Z'
	}
	return true
}

// processCPU is the user and system time a process has used, from
// /proc/<pid>/stat (in clock ticks, 100 a second on Linux).
func processCPU(pid int) time.Duration {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil || pid <= 0 {
		return 0
	}
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// SelfCPU is the processor time this process (the tests, the gateways
// and their backends) has used so far.
func SelfCPU() time.Duration { return processCPU(os.Getpid()) }

// nodeRun returns the run a process belongs to: the run id in its
// RABBITMQ_NODENAME (a node: the VM's command line does not name it) or
// in its command line (a CLI call naming a node), or "".
func nodeRun(pid int) string {
	for _, file := range []string{"environ", "cmdline"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, file))
		if err != nil {
			continue
		}
		for _, field := range bytes.Split(b, []byte{0}) {
			f := string(field)
			f = strings.TrimPrefix(f, "RABBITMQ_NODENAME=")
			if strings.HasPrefix(f, Prefix) {
				run, _, _ := strings.Cut(strings.TrimPrefix(f, Prefix), "-")
				return run
			}
		}
	}
	return ""
}

// killRuns kills, by process id, every process of the runs that doomed
// says are over: their nodes (and CLI calls still talking to them). It
// waits up to 10 s for them to end, so that their data can be removed,
// and returns those that did not.
func killRuns(doomed func(run string) bool) []int {
	var pids []int
	for _, pid := range processes(doomed) {
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			pids = append(pids, pid)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	var left []int
	for _, pid := range pids {
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if alive(pid) {
			left = append(left, pid)
		}
	}
	return left
}

// processes lists the live processes of the runs that match says.
func processes(match func(run string) bool) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() || !alive(pid) {
			continue
		}
		if run := nodeRun(pid); run != "" && match(run) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// sweep kills the nodes and removes the data of earlier runs whose test
// process is gone: a run killed before its cleanup (a test timeout, a
// kill) left them.
func sweep() {
	live := map[string]bool{}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), Prefix+"*"))
	for _, dir := range dirs {
		owner, err := os.ReadFile(filepath.Join(dir, "owner"))
		pid, _ := strconv.Atoi(strings.TrimSpace(string(owner)))
		if err == nil && alive(pid) {
			live[runOfDir(dir)] = true
		}
	}
	killRuns(func(run string) bool { return !live[run] })
	for _, dir := range dirs {
		if !live[runOfDir(dir)] {
			_ = os.RemoveAll(dir)
		}
	}
}

func runOfDir(dir string) string {
	run, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(dir), Prefix), "-")
	return run
}
