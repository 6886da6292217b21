package listener

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// The slow-peer bounds: client_body_timeout, send_timeout, min_transfer_rate and
// target_read_timeout. Timings are asserted loosely (the machine is shared): a connection must
// end within its timeout plus a generous slack, where before it stayed open indefinitely.
const slowSlack = 8 * time.Second

// slowPeerConfig is one HTTP listener with 1 s slow-peer timeouts in front of group "be".
func slowPeerConfig(dir, addr, target string, h2 bool) string {
	return header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
http2 = %v
target_read_timeout = "1s"
health_check = { disabled = true }

[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %q
client_body_timeout = "1s"
send_timeout = "1s"
min_transfer_rate = 1000
default_action = { forward = "be" }

[[listeners.rules]]
priority = 1
paths = ["/fixed"]
fixed_response = { status = 200, content_type = "text/plain", body = "fixed" }
`, target, h2, addr)
}

// closedWithin reads from c until it is closed (EOF or error) and returns how long that took
// and everything read.
func closedWithin(t *testing.T, c net.Conn, limit time.Duration) (time.Duration, string) {
	t.Helper()
	start := time.Now()
	c.SetReadDeadline(start.Add(limit))
	var b strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if b.Len() < 1<<16 {
			b.Write(buf[:n])
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("connection still open after %v (read so far: %.200q)", limit, b.String())
			}
			return time.Since(start), b.String()
		}
	}
}

func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestSlowClientsAreCut(t *testing.T) {
	dir := t.TempDir()
	be := newL7Backend(t, "be", nil)
	// big answers 8 MiB, more than socket buffers hold, for the slow reader.
	big := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(8<<20))
		chunk := make([]byte, 64<<10)
		for range 128 {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	t.Cleanup(big.Close)
	addr, bigAddr := configtest.Addr(t), configtest.Addr(t)
	obs := newL7Recorder()
	text := slowPeerConfig(dir, addr, hostOf(be.Server), false) + fmt.Sprintf(`
[[target_groups]]
name = "big"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "big"
style = "application"
protocol = "http"
address = %q
send_timeout = "1s"
min_transfer_rate = 1000
default_action = { forward = "big" }
`, hostOf(big), bigAddr)
	rt := startRuntime(t, loadConfig(t, dir, text), obs)

	t.Run("body withheld", func(t *testing.T) {
		c := dialRaw(t, addr)
		io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nfirst")
		d, got := closedWithin(t, c, 1*time.Second+slowSlack)
		if !strings.HasPrefix(got, "HTTP/1.1 408") {
			t.Errorf("answer %.80q, want 408", got)
		}
		rec := obs.next(t, func(r RequestRecord) bool { return r.URI == "/upload" })
		if rec.Reason != "client_body_timeout" || rec.Status != 408 {
			t.Errorf("log: status %d reason %q", rec.Status, rec.Reason)
		}
		t.Logf("cut after %v", d)
	})
	t.Run("body trickled", func(t *testing.T) {
		// One byte every 600 ms never waits a whole second, but moves 2 bytes/s, far below
		// min_transfer_rate: the budget (1 s + bytes/1000) runs out after a couple of seconds.
		c := dialRaw(t, addr)
		io.WriteString(c, "POST /trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			tk := time.NewTicker(600 * time.Millisecond)
			defer tk.Stop()
			for i := 0; i < 1000; i++ {
				select {
				case <-stop:
					return
				case <-tk.C:
					if _, err := c.Write([]byte("x")); err != nil {
						return
					}
				}
			}
		}()
		d, _ := closedWithin(t, c, 2*time.Second+slowSlack)
		rec := obs.next(t, func(r RequestRecord) bool { return r.URI == "/trickle" })
		if rec.Reason != "client_body_timeout" {
			t.Errorf("log reason %q", rec.Reason)
		}
		t.Logf("trickle cut after %v", d)
	})
	t.Run("desync 400 then body withheld", func(t *testing.T) {
		// Severe (obs-fold): 400 and Connection: close, and the announced body never comes.
		c := dialRaw(t, addr)
		io.WriteString(c, "POST /desync HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nContent-Length: 100\r\n\r\n")
		d, got := closedWithin(t, c, 1*time.Second+slowSlack)
		if !strings.HasPrefix(got, "HTTP/1.1 400") {
			t.Errorf("answer %.80q, want 400", got)
		}
		t.Logf("closed after %v", d)
	})
	t.Run("fixed response then body withheld", func(t *testing.T) {
		c := dialRaw(t, addr)
		io.WriteString(c, "POST /fixed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
		// Cut: net/http reads a body it will discard before answering, and that read now has
		// a deadline. (No answer is owed to a client that never finished its request.)
		closedWithin(t, c, 1*time.Second+slowSlack)
	})
	t.Run("slow reader", func(t *testing.T) {
		c := dialRaw(t, bigAddr)
		io.WriteString(c, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
		// Read nothing: once the socket buffers are full the proxy's writes block, and
		// send_timeout ends them. The proxy closes its side (the kernel may still hold the
		// unsent bytes for a while; the process does not).
		start := time.Now()
		rec := obs.next(t, func(r RequestRecord) bool { return r.URI == "/big" })
		if rec.Reason != "send_timeout" {
			t.Errorf("log reason %q, want send_timeout", rec.Reason)
		}
		if rec.BytesOut >= 8<<20 {
			t.Errorf("slow reader was sent the whole response")
		}
		configtest.WaitFor(t, 1*time.Second+slowSlack, "the slow reader's connection to close", func() bool { return activeHTTP(t, rt, "big") == 0 })
		t.Logf("slow reader's request ended after %v (%s), connection closed after %v", rec.Duration, rec.Reason, time.Since(start))
	})
	t.Run("normal requests still work", func(t *testing.T) {
		resp, err := http.Post("http://"+addr+"/ok", "text/plain", strings.NewReader(strings.Repeat("y", 1<<20)))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	})
}

// stallingTarget answers with a Content-Length of 1 MiB, sends 1 KiB and stalls until the test
// ends. h2c makes it an HTTP/2 (cleartext) target.
func stallingTarget(t *testing.T, h2 bool) *httptest.Server {
	stop := make(chan struct{})
	h := http.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(1<<20))
		w.WriteHeader(200)
		w.Write(make([]byte, 1024))
		w.(http.Flusher).Flush()
		select {
		case <-stop:
		case <-r.Context().Done():
		}
	}))
	if h2 {
		h = h2c.NewHandler(h, &http2.Server{})
	}
	s := httptest.NewServer(h)
	t.Cleanup(func() { close(stop); s.Close() })
	return s
}

// TestTargetStallMidBody: a target that stops sending mid-body is cut after
// target_read_timeout; the client's connection (HTTP/1) or stream (HTTP/2) is aborted, never a
// short response presented as complete; passive health is told; the request is logged.
func TestTargetStallMidBody(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("http2=%v", h2), func(t *testing.T) {
			dir := t.TempDir()
			tgt := stallingTarget(t, h2)
			addr := configtest.Addr(t)
			obs := newL7Recorder()
			rt := startRuntime(t, loadConfig(t, dir, slowPeerConfig(dir, addr, hostOf(tgt), h2)), obs)

			c := dialRaw(t, addr)
			io.WriteString(c, "GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
			br := bufio.NewReader(c)
			c.SetReadDeadline(time.Now().Add(1*time.Second + slowSlack))
			start := time.Now()
			resp, err := http.ReadResponse(br, nil)
			var n int64
			if err == nil {
				// The head (and maybe some of the body) went out before the stall.
				n, err = io.Copy(io.Discard, resp.Body)
			}
			if err == nil {
				t.Fatalf("the response ended cleanly after %d of %d bytes: a truncated response presented as complete", n, resp.ContentLength)
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("still waiting for the stalled body after %v", time.Since(start))
			}
			rec := obs.next(t, func(r RequestRecord) bool { return r.URI == "/stall" })
			if rec.Reason != "target_read_timeout" {
				t.Errorf("log reason %q, want target_read_timeout", rec.Reason)
			}
			st := rt.Registry().Targets()
			failures := uint64(0)
			for _, s := range st {
				if s.Address == hostOf(tgt) {
					failures = s.Failures
				}
			}
			if failures == 0 {
				t.Errorf("passive health was not told of the stall: %+v", st)
			}
		})
	}
}

// activeHTTP is the number of open client connections of an HTTP listener.
func activeHTTP(t testing.TB, rt *Runtime, name string) int64 {
	t.Helper()
	for _, s := range rt.Stats() {
		if s.Name == name {
			return s.Active
		}
	}
	t.Fatalf("no listener %q", name)
	return 0
}

// TestTargetDiesMidBody: a target that closes its connection mid-body aborts the client's
// connection too; the request is logged (target_closed_mid_body) and passive health is told.
func TestTargetDiesMidBody(t *testing.T) {
	dir := t.TempDir()
	tgt := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		bw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + strings.Repeat("x", 5000))
		bw.Flush()
		c.Close()
	}))
	t.Cleanup(tgt.Close)
	addr := configtest.Addr(t)
	obs := newL7Recorder()
	rt := startRuntime(t, loadConfig(t, dir, slowPeerConfig(dir, addr, hostOf(tgt), false)), obs)
	resp, err := http.Get("http://" + addr + "/die")
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Fatal("a response cut short by its target reached the client as complete")
	}
	rec := obs.next(t, func(r RequestRecord) bool { return r.URI == "/die" })
	if rec.Reason != "target_closed_mid_body" {
		t.Errorf("log reason %q", rec.Reason)
	}
	for _, s := range rt.Registry().Targets() {
		if s.Address == hostOf(tgt) && s.Failures == 0 {
			t.Errorf("passive health not told: %+v", s)
		}
	}
}
