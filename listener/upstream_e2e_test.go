package listener

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// startNginxTarget runs nginx as an HTTP target that ends keep-alive connections early: after
// 3 requests (it says Connection: close) and after 300 ms idle (it just closes). It answers
// "ok", reading and discarding any request body.
func startNginxTarget(t testing.TB) string {
	t.Helper()
	bin := peerBinary(t, "nginx")
	dir := t.TempDir()
	addr := freeAddr(t)
	conf := fmt.Sprintf(`master_process off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 512; }
http {
	access_log off;
	keepalive_requests 3;
	keepalive_timeout 300ms;
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
	return addr
}

// TestTargetClosingKeepAlive: a target that closes kept-alive connections (after a request
// count, and when idle) never costs a client a failed request. Bursts of GETs and POSTs (small
// bodies written inline, large ones streamed) are separated by pauses longer than the target's
// idle timeout, so pooled connections are closed under the proxy between bursts: GETs that meet
// one are retried, POSTs find them closed before sending.
func TestTargetClosingKeepAlive(t *testing.T) {
	target := startNginxTarget(t)
	dir := t.TempDir()
	addr := freeAddr(t)
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
			// What is under test is the target's idle timeout passing: there is no event to
			// wait for but the clock.
			time.Sleep(600 * time.Millisecond)
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
						fail(err)
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
	addr := freeAddr(t)
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
