package h2

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// h2specBin builds the pinned h2spec (tools module beside this file) once per test binary.
func h2specBin(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("h2spec: skipped in -short")
	}
	dir, err := filepath.Abs("tools")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "h2spec")
	// The go command of the toolchain running the test, whatever PATH says.
	gocmd := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(gocmd); err != nil {
		gocmd = "go"
	}
	cmd := exec.Command(gocmd, "build", "-C", dir, "-o", bin, "github.com/summerwind/h2spec/cmd/h2spec")
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build h2spec from %s: %v\n%s", dir, err, out)
	}
	return bin
}

var h2specSummary = regexp.MustCompile(`(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed`)

// TestH2Spec runs every h2spec case over TLS against the engine, plain and strict: all must pass
// (the allowlist of known failures is empty).
func TestH2Spec(t *testing.T) {
	bin := h2specBin(t)
	ts := startServer(t, Config{}, echoHandler)
	host, port, _ := strings.Cut(ts.addr, ":")
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"plain", nil},
		{"strict", []string{"-S"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			args := append([]string{"-h", host, "-p", port, "-t", "-k", "-o", "5"}, mode.args...)
			out, _ := exec.Command(bin, args...).CombinedOutput()
			m := h2specSummary.FindSubmatch(out)
			if m == nil {
				t.Fatalf("h2spec printed no summary:\n%s", out)
			}
			if string(m[4]) != "0" || string(m[3]) != "0" {
				t.Fatalf("h2spec: %s\n%s", m[0], failures(out))
			}
			t.Logf("h2spec %s: %s", mode.name, m[0])
		})
	}
}

// failures keeps h2spec's failure section.
func failures(out []byte) string {
	s := string(out)
	if i := strings.Index(s, "Failures:"); i >= 0 {
		return s[i:]
	}
	return s
}
