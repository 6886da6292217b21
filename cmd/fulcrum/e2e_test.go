package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
)

// buildBinary builds cmd/fulcrum into a temp dir, once per test binary.
var built struct {
	once sync.Once
	path string
	err  error
	out  []byte
}

func buildBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binary")
	}
	built.once.Do(func() {
		goBin, err := exec.LookPath("go")
		if err != nil {
			goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		dir, err := os.MkdirTemp("", "fulcrum-e2e-")
		if err != nil {
			built.err = err
			return
		}
		built.path = filepath.Join(dir, "fulcrum")
		args := []string{"build", "-o", built.path}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command(goBin, append(args, "github.com/fulcrum-lb/fulcrum/cmd/fulcrum")...)
		built.out, built.err = cmd.CombinedOutput()
	})
	if built.err != nil {
		t.Fatalf("go build: %v\n%s", built.err, built.out)
	}
	return built.path
}

// hsm is the SoftHSM2 token the tests share (nil when SoftHSM2 is not installed).
var hsm *softhsmtest.Token

func TestMain(m *testing.M) {
	code := softhsmtest.Run(m, &hsm)
	if built.path != "" {
		os.RemoveAll(filepath.Dir(built.path))
	}
	os.Exit(code)
}

// TestValidateCommand: every shipped configuration validates (exit 0); a bad one exits 1 with one
// positioned line per problem.
func TestValidateCommand(t *testing.T) {
	bin := buildBinary(t)
	files, _ := filepath.Glob("../../configs/*.toml")
	if len(files) == 0 {
		t.Fatal("no configs/*.toml")
	}
	for _, f := range files {
		out, err := exec.Command(bin, "validate", "-config", f).CombinedOutput()
		if err != nil {
			t.Errorf("fulcrum validate %s: %v\n%s", f, err, out)
		} else if !strings.Contains(string(out), "valid") {
			t.Errorf("fulcrum validate %s: %s", f, out)
		}
	}

	bad := filepath.Join(t.TempDir(), "bad.toml")
	writeConfig(t, bad, `[server]
admin = "127.0.0.1:9900"

[[target_groups]]
name = "web"
protocol = "http"
targets = ["127.0.0.1:9101"]
algorithm = "fastest"

[[listeners]]
name = "legacy-ssl"
style = "classic"
protocol = "ssl"
address = "127.0.0.1:8443"
backend_protocol = "http"
instances = ["127.0.0.1:9101"]
typo_key = 1
`)
	cmd := exec.Command(bin, "validate", "-config", bad)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("validate of a bad file: %v, want exit 1\n%s", err, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if len(lines) < 2 {
		t.Fatalf("want one line per problem, got:\n%s", stderr.String())
	}
	for _, want := range []string{bad + ":8:", bad + ":17:"} {
		found := false
		for _, l := range lines {
			found = found || strings.HasPrefix(l, want)
		}
		if !found {
			t.Errorf("no problem positioned at %s in:\n%s", want, stderr.String())
		}
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, bad+":") {
			t.Errorf("problem without a position: %q", l)
		}
	}
}

// syncBuffer collects a child's output safely.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestBinaryReloadAndDrain runs the real binary: SIGHUP with a changed file serves the new route
// with zero failed requests under load, and SIGTERM lets an in-flight request finish and exits 0.
func TestBinaryReloadAndDrain(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	b1 := echoBackend(t, "b1")
	b2 := newKillableBackend(t) // counts /delay arrivals
	web, admin := configtest.Addr(t), configtest.Addr(t)
	path := filepath.Join(dir, "fulcrum.toml")
	cfg := func(extra string) string {
		return configHead(dir, admin, "") + fmt.Sprintf(`
[[target_groups]]
name = "one"
protocol = "http"
targets = [%q]
deregistration_delay = "1s"

[[target_groups]]
name = "two"
protocol = "http"
targets = [%q]
deregistration_delay = "1s"

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "one" }

[[listeners.rules]]
priority = 1
paths = ["/delay/*"]
forward = "two"
%s`, hostOf(b1), b2.addr(), web, extra)
	}
	writeConfig(t, path, cfg(""))

	var logs syncBuffer
	cmd := exec.Command(bin, "-config", path)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// exited is closed when the child is gone; exitErr is its status then.
	exited := make(chan struct{})
	var exitErr error
	go func() { exitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill() // only the child this test started
			<-exited
		}
	})
	c := httpClient()
	c.Timeout = 5 * time.Second
	configtest.WaitFor(t, 20*time.Second, "fulcrum ready", func() bool {
		select {
		case <-exited:
			t.Fatalf("fulcrum exited: %v\n%s", exitErr, logs.String())
		default:
		}
		resp, err := c.Get("http://" + admin + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})

	// Load across the reload.
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				resp, err := c.Get("http://" + web + "/")
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode == 200 {
						ok.Add(1)
						continue
					}
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			}
		}()
	}
	configtest.WaitFor(t, 10*time.Second, "load running", func() bool { return ok.Load() > 100 })
	writeConfig(t, path, cfg(`
[[listeners.rules]]
priority = 2
paths = ["/new"]
fixed_response = { status = 200, content_type = "text/plain", body = "new route" }
`))
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	configtest.WaitFor(t, 10*time.Second, "new route served after SIGHUP", func() bool {
		resp, err := c.Get("http://" + web + "/new")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode == 200 && b.String() == "new route"
	})
	mark := ok.Load()
	configtest.WaitFor(t, 10*time.Second, "load after the reload", func() bool { return ok.Load() > mark+100 })
	cancel()
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed across the reload; first: %v", failed.Load(), ok.Load()+failed.Load(), firstErr.Load())
	}
	if !strings.Contains(logs.String(), `"msg":"reloaded"`) {
		t.Errorf("no reload in the log:\n%s", logs.String())
	}

	// Drain: a request in flight at SIGTERM completes; the process exits 0.
	type result struct {
		status int
		err    error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := c.Get("http://" + web + "/delay/1500ms")
		if err != nil {
			done <- result{0, err}
			return
		}
		resp.Body.Close()
		done <- result{resp.StatusCode, nil}
	}()
	select {
	case <-b2.arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request did not reach its target")
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil || r.status != 200 {
			t.Fatalf("in-flight request across SIGTERM: %d %v\n%s", r.status, r.err, logs.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("in-flight request did not finish")
	}
	select {
	case <-exited:
		if exitErr != nil {
			t.Fatalf("fulcrum exit: %v\n%s", exitErr, logs.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("fulcrum did not exit after SIGTERM\n%s", logs.String())
	}
	for _, want := range []string{`"msg":"draining"`, `"msg":"stopped"`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %s", want)
		}
	}
	_ = http.StatusOK
}
