package listener

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// startNginxTarget runs nginx as an HTTP target that ends keep-alive connections early: after
// 3 requests it says Connection: close and closes. It answers "ok", reading and discarding any
// request body. It returns the target's address and the directory holding its pid file, for
// nginxCloseIdle.
func startNginxTarget(t testing.TB) (addr, dir string) {
	t.Helper()
	bin := peerBinary(t, "nginx")
	dir = t.TempDir()
	addr = configtest.Addr(t)
	// A master process, so that a reload can make the workers close their idle connections on
	// cue (nginxCloseIdle). The idle timeout is long on purpose: see TestTargetClosingKeepAlive.
	conf := fmt.Sprintf(`master_process on;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 512; }
http {
	access_log off;
	keepalive_requests 3;
	keepalive_timeout 60s;
	client_max_body_size 1m;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen %[2]s;
		default_type text/plain;
		location / { return 200 "ok"; }
	}
}
`, dir, addr)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	startPeer(t, dir, addr, bin, "-c", path, "-p", dir, "-e", filepath.Join(dir, "error.log"), "-g", "daemon off;")
	return addr, dir
}

// nginxCloseIdle makes the nginx target close every keep-alive connection it holds idle, as a
// server does when its idle timeout passes, and returns once it has. A reload (SIGHUP) starts
// new workers; the old ones close their idle connections at once and exit, so their exit,
// watched through pidfds, is the signal. By then the FINs are in the proxy's sockets (loopback
// delivers them within the close).
func nginxCloseIdle(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "nginx.pid"))
	if err != nil {
		t.Fatalf("nginx pid: %v", err)
	}
	master, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("nginx pid %q: %v", b, err)
	}
	var fds []int
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for _, pid := range childrenOf(t, master) {
		fd, err := unix.PidfdOpen(pid, 0)
		if err == nil {
			fds = append(fds, fd)
		} else if !errors.Is(err, unix.ESRCH) { // ESRCH: gone already
			t.Fatalf("pidfd_open %d: %v", pid, err)
		}
	}
	if len(fds) == 0 {
		t.Fatalf("nginx master %d has no workers", master)
	}
	if err := unix.Kill(master, unix.SIGHUP); err != nil {
		t.Fatalf("reload nginx: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, fd := range fds {
		for {
			left := time.Until(deadline)
			if left <= 0 {
				t.Fatal("nginx's old workers did not exit within 10 s of a reload")
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(pfd, int(left/time.Millisecond)+1)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				t.Fatalf("poll pidfd: %v", err)
			}
			if n == 1 {
				break
			}
		}
	}
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(t *testing.T, pid int) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var kids []int
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
		i := bytes.LastIndexByte(b, ')')
		if f := strings.Fields(string(b[i+1:])); i > 0 && len(f) > 1 && f[1] == strconv.Itoa(pid) {
			kids = append(kids, p)
		}
	}
	return kids
}

// TestTargetClosingKeepAlive: a target that closes kept-alive connections — announced (after a
// request count, with Connection: close) or while they sit idle in the proxy's pool — never
// costs a client a failed request. Bursts of GETs and POSTs (small bodies written inline, large
// ones streamed) are separated by the target closing every idle connection: GETs that meet one
// are retried, POSTs find them closed by the pool's peek before sending.
//
// What no proxy can promise, and so this test does not ask: a target closing an idle
// connection at the very moment a POST is written on it (an idle timeout racing the reuse).
// The target may have read the request before closing, so the POST cannot go again (nginx and
// HAProxy do not send it again either; TestTargetDropsReusedConnection pins that); the remedy
// is a target idle timeout longer than the proxy's, as for ALB. So the target here closes idle
// connections on cue, between bursts, not on a timer that a loaded machine makes race.
func TestTargetClosingKeepAlive(t *testing.T) {
	target, nginxDir := startNginxTarget(t)
	dir := t.TempDir()
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "nginx"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "nginx" }
`, target, addr))
	startRuntime(t, cfg, nil)
	c := clientFrom("127.0.0.1")
	// Go's client may dial a connection it then never uses; the server waits up to 5 s for
	// such a connection's first request on shutdown.
	defer c.CloseIdleConnections()
	small, large := bytes.Repeat([]byte("s"), 1000), bytes.Repeat([]byte("L"), 200<<10)
	var failed atomic.Int64
	var first atomic.Value
	fail := func(err error) {
		if failed.Add(1) == 1 {
			first.Store(err)
		}
	}
	for round := range 4 {
		if round > 0 {
			nginxCloseIdle(t, nginxDir)
		}
		var wg sync.WaitGroup
		for w := range 12 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 8 {
					var req *http.Request
					switch (w + i) % 3 {
					case 0:
						req = newReq(t, "GET", "http://"+addr+"/")
					case 1:
						req, _ = http.NewRequest("POST", "http://"+addr+"/", bytes.NewReader(small))
					default:
						req, _ = http.NewRequest("POST", "http://"+addr+"/", io.MultiReader(bytes.NewReader(large)))
						req.ContentLength = -1 // chunked: the streamed path
					}
					resp, err := c.Do(req)
					if err != nil {
						fail(fmt.Errorf("round %d, %s: %w", round, req.Method, err))
						continue
					}
					b, rerr := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 || string(b) != "ok" {
						fail(fmt.Errorf("round %d, %s: status %d %q %v", round, req.Method, resp.StatusCode, b, rerr))
					}
				}
			}()
		}
		wg.Wait()
	}
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of 384 requests failed (first: %v)", n, first.Load())
	}
}

// TestTargetDropsReusedConnection: a target that reads a request on a kept-alive connection and
// closes it without an answer may have acted on it. A GET goes again on a new connection; a
// POST does not (502), and the target sees it once.
func TestTargetDropsReusedConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var posts, conns atomic.Int64
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Add(1)
	go func() { // owned: ends when ln closes; each connection ends when the proxy's does
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				// The first request is answered and the connection kept alive; the second is
				// read whole and dropped.
				for n := 0; ; n++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					if n == 1 {
						if req.Method == "POST" {
							posts.Add(1)
						}
						return
					}
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}()
		}
	}()
	dir := t.TempDir()
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "drops"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "drops" }
`, ln.Addr().String(), addr))
	startRuntime(t, cfg, nil)
	c := clientFrom("127.0.0.1")
	defer c.CloseIdleConnections()
	do := func(method string, body io.Reader) int {
		req, err := http.NewRequest(method, "http://"+addr+"/", body)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, tc := range []struct {
		method string
		body   func() io.Reader
		want   int
	}{
		{"GET", func() io.Reader { return nil }, 200},
		{"POST", func() io.Reader { return strings.NewReader("once") }, 502},
	} {
		if got := do("GET", nil); got != 200 {
			t.Fatalf("first request: %d", got)
		}
		if got := do(tc.method, tc.body()); got != tc.want {
			t.Fatalf("%s dropped on a reused connection: %d, want %d", tc.method, got, tc.want)
		}
	}
	if n := posts.Load(); n != 1 {
		t.Fatalf("the target got the POST %d times, want once", n)
	}
}

// TestClientGoneNeverGets200: a client that is gone (here it half-closes after its request, which
// is how net/http learns of it) cancels the request to the target, is logged as client_closed,
// and is never sent the empty 200 net/http writes for a handler that wrote nothing.
func TestClientGoneNeverGets200(t *testing.T) {
	arrived, canceled := make(chan struct{}, 1), make(chan struct{}, 1)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		select {
		case <-r.Context().Done():
			canceled <- struct{}{}
		case <-time.After(10 * time.Second):
		}
	}))
	defer slow.Close()
	dir := t.TempDir()
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "slow"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "slow" }
`, hostOf(slow), addr))
	rec := newL7Recorder()
	startRuntime(t, cfg, rec)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
	<-arrived
	conn.(*net.TCPConn).CloseWrite()
	select {
	case <-canceled:
	case <-time.After(5 * time.Second):
		t.Fatal("the target's request was not cancelled when the client left")
	}
	got, err := io.ReadAll(conn)
	if len(got) != 0 {
		t.Fatalf("a departed client was answered %q (%v)", got, err)
	}
	r := rec.next(t, func(r RequestRecord) bool { return r.URI == "/slow" })
	if r.Reason != "client_closed" || r.Status != 0 {
		t.Fatalf("logged status %d reason %q, want 0 client_closed", r.Status, r.Reason)
	}
}
