package main

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestSystemdNotify runs fulcrum as systemd runs a Type=notify service: NOTIFY_SOCKET names a
// socket this test owns, and WATCHDOG_USEC asks for keep-alives. It must see READY=1, then
// RELOADING=1 with MONOTONIC_USEC and READY=1 again around a SIGHUP reload, then STOPPING=1 on
// SIGTERM, in that order, and WATCHDOG=1 in between.
func TestSystemdNotify(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	sockPath := filepath.Join(dir, "notify.sock")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	msgs := make(chan string, 256)
	go func() { // owned by this test: ends when sock is closed
		buf := make([]byte, 4096)
		for {
			n, _, err := sock.ReadFromUnix(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()

	admin := configtest.AddrOn(t, "tcp", "127.0.0.1")
	path := filepath.Join(dir, "fulcrum.toml")
	writeConfig(t, path, minimalConfig(dir, admin, configtest.AddrOn(t, "tcp", "127.0.0.1")))
	var logs syncBuffer
	cmd := exec.Command(bin, path)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sockPath, "WATCHDOG_USEC=200000")
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

	watchdogs := 0
	// next returns the next message that is not a watchdog ping, counting those.
	next := func(what string) map[string]string {
		t.Helper()
		timeout := time.After(60 * time.Second)
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					t.Fatalf("notify socket closed waiting for %s", what)
				}
				kv := map[string]string{}
				for _, line := range strings.Split(strings.TrimSpace(m), "\n") {
					k, v, _ := strings.Cut(line, "=")
					kv[k] = v
				}
				if len(kv) == 1 && kv["WATCHDOG"] == "1" {
					watchdogs++
					continue
				}
				return kv
			case <-exited:
				t.Fatalf("fulcrum exited (%v) waiting for %s\n%s", exitErr, what, logs.String())
			case <-timeout:
				t.Fatalf("no %s from fulcrum\n%s", what, logs.String())
			}
		}
	}

	m := next("READY=1")
	if m["READY"] != "1" || !strings.Contains(m["STATUS"], "serving 1 listeners") || m["MAINPID"] != strconv.Itoa(cmd.Process.Pid) {
		t.Fatalf("first notification %q, want READY=1 with a STATUS and MAINPID", m)
	}
	// Ready means serving: the admin endpoint answers at once.
	c := httpClient()
	if code, _ := fetch(t, c, "GET", "http://"+admin+"/readyz", nil); code != 200 {
		t.Fatalf("READY=1 sent but /readyz = %d", code)
	}

	cmd.Process.Signal(syscall.SIGHUP)
	m = next("RELOADING=1")
	if m["RELOADING"] != "1" {
		t.Fatalf("after SIGHUP: %q, want RELOADING=1", m)
	}
	if us, err := strconv.ParseInt(m["MONOTONIC_USEC"], 10, 64); err != nil || us <= 0 {
		t.Fatalf("RELOADING=1 without MONOTONIC_USEC: %q", m)
	}
	if m = next("READY=1 after the reload"); m["READY"] != "1" || !strings.HasPrefix(m["STATUS"], "serving") {
		t.Fatalf("after the reload: %q, want READY=1 and a serving STATUS", m)
	}

	// The watchdog pings every 100 ms; wait for one at most a bounded time.
	for deadline := time.Now().Add(30 * time.Second); watchdogs == 0 && time.Now().Before(deadline); {
		select {
		case msg := <-msgs:
			if strings.TrimSpace(msg) == "WATCHDOG=1" {
				watchdogs++
			} else {
				t.Fatalf("unexpected notification %q while idle", msg)
			}
		case <-time.After(time.Second):
		}
	}
	if watchdogs == 0 {
		t.Fatal("WATCHDOG_USEC set but no WATCHDOG=1")
	}

	cmd.Process.Signal(syscall.SIGTERM)
	if m = next("STOPPING=1"); m["STOPPING"] != "1" {
		t.Fatalf("after SIGTERM: %q, want STOPPING=1", m)
	}
	select {
	case <-exited:
		if exitErr != nil {
			t.Fatalf("fulcrum exit: %v\n%s", exitErr, logs.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("fulcrum did not exit after SIGTERM")
	}
}
