package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"golang.org/x/sys/unix"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
)

// TestBinaryUpgrade: under `hey -z 20s -c 50` against an HTTP listener, three binary upgrades
// (SIGUSR2) in a row, each with a WebSocket and a TCP relay open across it. No request fails;
// the WebSocket and the relay keep working on the old process while it drains and end
// cleanly (the first two finished by the client with a close handshake, the third cut by the
// old process when server.shutdown_timeout runs out, as an orderly EOF); every old process exits
// 0; each new process tells systemd MAINPID=<itself> with READY=1. The second upgrade also adds
// a listener and the third removes it: configuration changes apply with the new binary.
func TestBinaryUpgrade(t *testing.T) {
	hey, err := exec.LookPath("hey")
	if err != nil {
		t.Fatal("hey is not installed (make deps installs the test packages)")
	}
	bin := buildBinary(t)
	// Old processes are children of their predecessors; once those exit they are reparented
	// to this process, which can then reap them and read their exit status.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	msgs := notifySocket(t, filepath.Join(dir, "notify.sock"))

	web := echoBackend(t, "web")
	relayTarget := tcpEchoServer(t)
	admin, httpAddr, relayAddr, extraAddr := configtest.Addr(t), configtest.Addr(t), configtest.Addr(t), configtest.Addr(t)
	base := configHead(dir, admin, "") + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]

[[target_groups]]
name = "raw"
protocol = "tcp"
targets = [%q]

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }

[[listeners]]
name = "relay"
style = "network"
protocol = "tcp"
address = %q
forward = "raw"
`, hostOf(web), relayTarget, httpAddr, relayAddr)
	extra := fmt.Sprintf(`
[[listeners]]
name = "extra"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
`, extraAddr)
	path := filepath.Join(dir, "fulcrum.toml")
	writeConfig(t, path, base)

	logPath := filepath.Join(dir, "fulcrum.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	logs := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	cmd := exec.Command(bin, path)
	// A file, not a pipe: every generation writes to it, and the test reaps each by PID.
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+filepath.Join(dir, "notify.sock"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cur := cmd.Process.Pid
	live := map[int]bool{cur: true} // processes of this test not reaped yet
	t.Cleanup(func() {
		for pid := range live {
			syscall.Kill(pid, syscall.SIGKILL) // only the processes this test started
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, 0, nil)
		}
	})
	// waitExit reaps pid (a child, or an orphan reparented here) and returns its status.
	waitExit := func(pid int, within time.Duration) unix.WaitStatus {
		t.Helper()
		for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			var ws unix.WaitStatus
			got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
			if err == nil && got == pid {
				delete(live, pid)
				return ws
			}
			if err != nil && !errors.Is(err, unix.ECHILD) { // ECHILD: not reparented here yet
				t.Fatalf("wait %d: %v", pid, err)
			}
		}
		t.Fatalf("process %d still running after %s\n%s", pid, within, logs())
		return 0
	}
	// ready waits for READY=1 from a process other than old and returns its MAINPID.
	ready := func(old int) int {
		t.Helper()
		timeout := time.After(2 * time.Minute)
		for {
			select {
			case m := <-msgs:
				if m["READY"] != "1" {
					continue
				}
				pid, _ := strconv.Atoi(m["MAINPID"])
				if pid != old && pid > 0 {
					return pid
				}
			case <-timeout:
				t.Fatalf("no READY=1 with a new MAINPID\n%s", logs())
			}
		}
	}
	if got := ready(0); got != cur {
		t.Fatalf("first READY=1 names MAINPID %d, want %d", got, cur)
	}

	heyOut := make(chan string, 1)
	hcmd := exec.Command(hey, "-z", "20s", "-c", "50", "http://"+httpAddr+"/")
	go func() { // owned by this test: hey ends by itself after 20 s
		out, err := hcmd.CombinedOutput()
		if err != nil {
			out = append(out, []byte("\nhey: "+err.Error())...)
		}
		heyOut <- string(out)
	}()
	t.Cleanup(func() {
		if hcmd.Process != nil {
			hcmd.Process.Kill()
		}
	})
	c := httpClient()
	// Traffic flows before the first upgrade: the listener has answered some of hey's requests.
	configtest.WaitFor(t, time.Minute, "hey's requests to be answered", func() bool {
		n := 0.0
		for _, s := range scrape(t, c, "http://"+admin) {
			if s.name == "fulcrum_http_requests_total" {
				n += s.value
			}
		}
		return n > 100
	})

	for i := 1; i <= 3; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		ws, err := echo.DialWebSocket(ctx, "ws://"+httpAddr+"/ws", nil)
		cancel()
		if err != nil {
			t.Fatalf("upgrade %d: websocket: %v", i, err)
		}
		rc, err := net.Dial("tcp", relayAddr)
		if err != nil {
			t.Fatalf("upgrade %d: relay: %v", i, err)
		}
		echoBoth(t, fmt.Sprintf("upgrade %d, before", i), ws, rc)

		switch i {
		case 2:
			writeConfig(t, path, base+extra) // a listener the new process binds
		case 3:
			writeConfig(t, path, base) // and that the next one no longer has
		}
		old := cur
		if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		cur = ready(old)
		live[cur] = true
		select {
		case out := <-heyOut:
			t.Fatalf("upgrade %d: hey finished before it: %s", i, out)
		default:
		}
		// The old process drains: what it holds keeps working.
		echoBoth(t, fmt.Sprintf("upgrade %d, after", i), ws, rc)
		budget := 5 * time.Second // shutdown_timeout of configHead
		if i < 3 {
			closeBoth(t, i, ws, rc) // finished by the client: the old process exits without waiting
		} else {
			// Left open: the old process ends them when its drain budget runs out.
			for name, conn := range map[string]net.Conn{"websocket": ws.NetConn(), "relay": rc} {
				conn.SetReadDeadline(time.Now().Add(budget + time.Minute))
				n, err := conn.Read(make([]byte, 64))
				if n != 0 || err != io.EOF {
					t.Fatalf("upgrade %d: %s at the end of the drain: %d bytes, %v (want an orderly EOF)", i, name, n, err)
				}
				conn.Close()
			}
		}
		if ws := waitExit(old, budget+time.Minute); !ws.Exited() || ws.ExitStatus() != 0 {
			t.Fatalf("upgrade %d: old process %d: %v\n%s", i, old, ws, logs())
		}
		if i == 2 {
			if code, _ := fetch(t, c, "GET", "http://"+extraAddr+"/", nil); code != 200 {
				t.Fatalf("listener added by the upgrade: %d", code)
			}
		}
		if i == 3 {
			// The new configuration has no "extra": nobody listens there once the old process
			// is gone, so the address can be bound again.
			ln, err := net.Listen("tcp", extraAddr)
			if err != nil {
				t.Fatalf("listener removed by the upgrade still holds %s: %v", extraAddr, err)
			}
			ln.Close()
		}
		if code, body := fetch(t, c, "GET", "http://"+admin+"/admin/status", nil); code != 200 {
			t.Fatalf("upgrade %d: admin endpoint of the new process: %d %s", i, code, body)
		}
	}

	var out string
	select {
	case out = <-heyOut:
	case <-time.After(2 * time.Minute):
		t.Fatal("hey did not finish")
	}
	codes := map[string]int{}
	for _, m := range regexp.MustCompile(`\[(\d{3})\]\s+(\d+) responses`).FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(m[2])
		codes[m[1]] += n
	}
	if codes["200"] == 0 || len(codes) != 1 || strings.Contains(out, "Error distribution") || strings.Contains(out, "\nhey: ") {
		t.Fatalf("requests failed across the upgrades: %v\n%s\n%s", codes, out, logs())
	}
	t.Logf("hey -z 20s -c 50 across three binary upgrades: %d requests, all 200", codes["200"])

	syscall.Kill(cur, syscall.SIGTERM)
	if ws := waitExit(cur, time.Minute); !ws.Exited() || ws.ExitStatus() != 0 {
		t.Fatalf("last process: %v\n%s", ws, logs())
	}
}

// notifySocket listens where NOTIFY_SOCKET will point and delivers each datagram as key/values.
func notifySocket(t *testing.T, path string) <-chan map[string]string {
	t.Helper()
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	msgs := make(chan map[string]string, 1024)
	go func() { // owned by this test: ends when sock is closed
		buf := make([]byte, 4096)
		for {
			n, _, err := sock.ReadFromUnix(buf)
			if err != nil {
				return
			}
			kv := map[string]string{}
			for _, line := range strings.Split(strings.TrimSpace(string(buf[:n])), "\n") {
				k, v, _ := strings.Cut(line, "=")
				kv[k] = v
			}
			select {
			case msgs <- kv:
			default: // nobody reads watchdog pings; never block the reader
			}
		}
	}()
	return msgs
}

// tcpEchoServer echoes every connection until the client closes its side.
func tcpEchoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() { // owned by this test: ends when ln is closed
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

// echoBoth sends a message on the WebSocket and the relay and expects it back on each.
func echoBoth(t *testing.T, when string, ws *echo.WSConn, rc net.Conn) {
	t.Helper()
	for k := range 3 {
		msg := fmt.Sprintf("%s #%d", when, k)
		ws.NetConn().SetDeadline(time.Now().Add(30 * time.Second))
		if err := ws.WriteText(msg); err != nil {
			t.Fatalf("%s: websocket write: %v", when, err)
		}
		if _, got, err := ws.ReadMessage(); err != nil || string(got) != msg {
			t.Fatalf("%s: websocket echo %q, %v", when, got, err)
		}
		ws.NetConn().SetDeadline(time.Time{})
		rc.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := rc.Write([]byte(msg)); err != nil {
			t.Fatalf("%s: relay write: %v", when, err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(rc, got); err != nil || string(got) != msg {
			t.Fatalf("%s: relay echo %q, %v", when, got, err)
		}
		rc.SetDeadline(time.Time{})
	}
}

// closeBoth ends the WebSocket with a close handshake and the relay with a half-close answered
// by EOF.
func closeBoth(t *testing.T, i int, ws *echo.WSConn, rc net.Conn) {
	t.Helper()
	ws.NetConn().SetDeadline(time.Now().Add(30 * time.Second))
	if err := ws.WriteMessage(echo.OpClose, []byte{0x03, 0xe8}); err != nil {
		t.Fatalf("upgrade %d: websocket close: %v", i, err)
	}
	var ce *echo.CloseError
	if _, _, err := ws.ReadMessage(); !errors.As(err, &ce) || ce.Code != 1000 {
		t.Fatalf("upgrade %d: websocket close answered with %v", i, err)
	}
	ws.NetConn().Close()
	rc.SetDeadline(time.Now().Add(30 * time.Second))
	if err := rc.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatalf("upgrade %d: relay half-close: %v", i, err)
	}
	if n, err := rc.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("upgrade %d: relay after half-close: %d bytes, %v", i, n, err)
	}
	rc.Close()
}
