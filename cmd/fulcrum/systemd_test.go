package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSystemdUnit checks the shipped unit: Type=notify with the hardening the README promises,
// and `systemd-analyze verify` (Debian package systemd, in TEST_PACKAGES) accepting it with no
// complaint. verify needs the ExecStart binaries to exist, so they point at the test's copy.
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile("../../configs/systemd/fulcrum.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	have := map[string][]string{}
	for _, line := range strings.Split(unit, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok && !strings.HasPrefix(line, "#") {
			have[k] = append(have[k], v)
		}
	}
	for k, want := range map[string]string{
		"Type": "notify", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
		"CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
		"StateDirectory": "fulcrum", "LogsDirectory": "fulcrum", "NotifyAccess": "all",
		"ExecReload": "/bin/kill -HUP $MAINPID",
	} {
		if len(have[k]) != 1 || have[k][0] != want {
			t.Errorf("%s = %q, want %q", k, have[k], want)
		}
	}
	if len(have["WatchdogSec"]) != 1 {
		t.Error("no WatchdogSec: fulcrum sends WATCHDOG=1 when it is set")
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (make deps installs package systemd): only the directives were checked")
	}
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "fulcrum.service")
	os.WriteFile(path, []byte(strings.ReplaceAll(unit, "/usr/local/bin/fulcrum", bin)), 0o644)
	cmd := exec.Command(analyze, "verify", path)
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
