package backends

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// connCounter is an httptest server that counts the connections it accepted and closed.
type connCounter struct {
	*httptest.Server
	opened, closed atomic.Int64
}

func countingServer(t *testing.T, h http.Handler) *connCounter {
	t.Helper()
	s := &connCounter{Server: httptest.NewUnstartedServer(h)}
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			s.opened.Add(1)
		case http.StateClosed, http.StateHijacked:
			s.closed.Add(1)
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	return s
}

func newTestH1(t *testing.T, response time.Duration, maxIdle int) *h1Transport {
	t.Helper()
	var d net.Dialer
	std := &http.Transport{DialContext: d.DialContext, IdleConnTimeout: time.Minute,
		ResponseHeaderTimeout: response, MaxIdleConnsPerHost: maxIdle}
	h := newH1Transport(std, nil)
	t.Cleanup(h.CloseIdleConnections)
	return h
}

// roundTrip sends one request and reads the whole answer.
func roundTrip(rt http.RoundTripper, method, url string, body io.Reader, size int64) (int, string, error) {
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		return 0, "", err
	}
	if body != nil {
		req.ContentLength = size
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func echoBody() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
			return
		case "/close":
			w.Header().Set("Connection", "close")
		}
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.Path, b)
	})
}

// TestH1KeepAlive: every kind of exchange leaves the connection reusable, through the
// transport a plain-HTTP group really gets.
func TestH1KeepAlive(t *testing.T) {
	srv := countingServer(t, echoBody())
	r := newReg(t)
	gc := configs.TargetGroup{Name: "web", Protocol: "http", HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets: []configs.Target{{Address: srv.Listener.Addr().String(), Weight: 1}}}
	rt := build(t, r, conf(gc)).Group("web").Transport()
	if _, ok := rt.(*h1Transport); !ok {
		t.Fatalf("plain-HTTP group transport is %T, want *h1Transport", rt)
	}
	url := srv.URL
	for i := range 10 {
		body := strings.Repeat("b", i*1000)
		for _, c := range []struct {
			method, path string
			body         io.Reader
			size         int64
			status       int
			want         string
		}{
			{"GET", "/g", nil, 0, 200, "GET /g "},
			{"POST", "/p", strings.NewReader(body), int64(len(body)), 200, "POST /p " + body},
			{"HEAD", "/h", nil, 0, 200, ""},
			{"GET", "/empty", nil, 0, 204, ""},
		} {
			status, got, err := roundTrip(rt, c.method, url+c.path, c.body, c.size)
			if err != nil || status != c.status || got != c.want {
				t.Fatalf("%s %s: %d %.40q %v, want %d %.40q", c.method, c.path, status, got, err, c.status, c.want)
			}
		}
	}
	if n := srv.opened.Load(); n != 1 {
		t.Fatalf("40 sequential exchanges opened %d connections, want 1", n)
	}
	// "Connection: close" from the target is obeyed.
	if _, _, err := roundTrip(rt, "GET", url+"/close", nil, 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := roundTrip(rt, "GET", url+"/g", nil, 0); err != nil {
		t.Fatal(err)
	}
	if n := srv.opened.Load(); n != 2 {
		t.Fatalf("after Connection: close, %d connections opened, want 2", n)
	}
}

// TestH1StreamedUpload: a body of unknown length goes chunked, written while the answer is read,
// and the connection is reused afterwards.
func TestH1StreamedUpload(t *testing.T) {
	srv := countingServer(t, echoBody())
	h := newTestH1(t, 0, 8)
	want := strings.Repeat("0123456789", 20000) // 200 KB, above syncBodyMax
	for i := range 5 {
		pr, pw := io.Pipe()
		go func() {
			for j := 0; j < len(want); j += 10000 {
				pw.Write([]byte(want[j : j+10000]))
			}
			pw.Close()
		}()
		status, got, err := roundTrip(h, "POST", srv.URL+"/up", pr, -1)
		if err != nil || status != 200 || got != "POST /up "+want {
			t.Fatalf("upload %d: %d %d bytes %v", i, status, len(got), err)
		}
	}
	// The writer signals right after its last write, before the target can answer; a lost race
	// costs a connection, not correctness.
	if n := srv.opened.Load(); n > 2 {
		t.Fatalf("5 streamed uploads opened %d connections, want the first reused", n)
	}
}

// rawTarget serves each connection with serve (closing it after), counting connections.
func rawTarget(t *testing.T, serve func(c net.Conn, br *bufio.Reader)) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	conns := new(atomic.Int64)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				serve(c, bufio.NewReader(c))
			}()
		}
	}()
	return ln.Addr().String(), conns
}

// scripted answers the first request on each connection with the bytes given.
func scripted(t *testing.T, reply string) string {
	addr, _ := rawTarget(t, func(c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err == nil {
			io.WriteString(c, reply)
			io.Copy(io.Discard, br)
		}
	})
	return addr
}

// answer reads one request (and its body) and answers it with a keep-alive "ok".
func answer(c net.Conn, br *bufio.Reader) (*http.Request, bool) {
	req, err := http.ReadRequest(br)
	if err != nil {
		return nil, false
	}
	io.Copy(io.Discard, req.Body)
	_, err = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	return req, err == nil
}

func TestH1StaleConnection(t *testing.T) {
	// A target whose idle timeout ends right after the first answer.
	idleClose := func(closed chan<- struct{}) func(net.Conn, *bufio.Reader) {
		return func(c net.Conn, br *bufio.Reader) {
			answer(c, br)
			c.Close()
			closed <- struct{}{}
		}
	}
	t.Run("retried when idempotent", func(t *testing.T) {
		closed := make(chan struct{}, 4)
		addr, conns := rawTarget(t, idleClose(closed))
		h := newTestH1(t, 5*time.Second, 8)
		h.probeAfter = time.Hour // no peek: the GET meets the closed connection
		if _, _, err := roundTrip(h, "GET", "http://"+addr+"/1", nil, 0); err != nil {
			t.Fatal(err)
		}
		<-closed
		status, got, err := roundTrip(h, "GET", "http://"+addr+"/2", nil, 0)
		if err != nil || status != 200 || got != "ok" || conns.Load() != 2 {
			t.Fatalf("GET on a stale connection: %d %q %v, %d connections; want it retried on a second",
				status, got, err, conns.Load())
		}
	})
	t.Run("peeked before a body is sent", func(t *testing.T) {
		closed := make(chan struct{}, 4)
		addr, conns := rawTarget(t, idleClose(closed))
		h := newTestH1(t, 5*time.Second, 8)
		h.probeAfter = time.Hour // bodies are peeked for regardless
		if _, _, err := roundTrip(h, "GET", "http://"+addr+"/1", nil, 0); err != nil {
			t.Fatal(err)
		}
		<-closed
		status, got, err := roundTrip(h, "POST", "http://"+addr+"/2", strings.NewReader("once"), 4)
		if err != nil || status != 200 || got != "ok" || conns.Load() != 2 {
			t.Fatalf("POST after an idle close: %d %q %v, %d connections", status, got, err, conns.Load())
		}
	})
	t.Run("body never sent twice", func(t *testing.T) {
		// The target takes a second request on the connection and closes without answering:
		// a GET may go again, a POST may not (the target may have acted on it).
		var posts atomic.Int64
		addr, conns := rawTarget(t, func(c net.Conn, br *bufio.Reader) {
			if _, ok := answer(c, br); !ok {
				return
			}
			if req, err := http.ReadRequest(br); err == nil && req.Method == "POST" {
				posts.Add(1)
			}
		})
		h := newTestH1(t, 5*time.Second, 8)
		for _, c := range []struct {
			method string
			body   io.Reader
			ok     bool
		}{{"GET", nil, true}, {"POST", strings.NewReader("once"), false}} {
			if _, _, err := roundTrip(h, "GET", "http://"+addr+"/first", nil, 0); err != nil {
				t.Fatal(err)
			}
			_, _, err := roundTrip(h, c.method, "http://"+addr+"/dropped", c.body, 4)
			if (err == nil) != c.ok {
				t.Fatalf("%s dropped by the target: err %v, want success %v", c.method, err, c.ok)
			}
		}
		if posts.Load() != 1 {
			t.Fatalf("the target got the POST %d times, want once", posts.Load())
		}
		if conns.Load() != 3 {
			t.Fatalf("%d connections, want 3 (first, GET's retry, POST's)", conns.Load())
		}
	})
}

func TestH1ResponseTimeoutAndCancel(t *testing.T) {
	release := make(chan struct{})
	srv := countingServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer close(release)
	h := newTestH1(t, 100*time.Millisecond, 8)
	_, _, err := roundTrip(h, "GET", srv.URL, nil, 0)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("silent target: %v, want a timeout", err)
	}

	h = newTestH1(t, time.Minute, 8)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL, nil)
	// Cancel once the target has the request, so the wait for the answer is what is aborted.
	opened := srv.opened.Load()
	go func() {
		for srv.opened.Load() == opened {
			time.Sleep(time.Millisecond)
		}
		cancel()
	}()
	start := time.Now()
	_, err = h.RoundTrip(req)
	if !errors.Is(err, context.Canceled) || time.Since(start) > 10*time.Second {
		t.Fatalf("canceled request: %v after %v, want context.Canceled", err, time.Since(start))
	}
	configtest.WaitFor(t, 5*time.Second, "target sees both connections closed", func() bool { return srv.closed.Load() == 2 })
}

// TestH1EarlyAnswer: a target that answers before the upload ends gets its answer through, and
// the connection, with a request half sent, is never reused.
func TestH1EarlyAnswer(t *testing.T) {
	addr, conns := rawTarget(t, func(c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil { // the head only
			return
		}
		io.WriteString(c, "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
		answer(c, br) // a request sent on this connection now would be misread: answer it anyway
	})
	h := newTestH1(t, 5*time.Second, 8)
	pr, pw := io.Pipe()
	go pw.Write([]byte("first chunk")) // then the upload stalls
	status, _, err := roundTrip(h, "POST", "http://"+addr+"/up", pr, -1)
	if err != nil || status != http.StatusRequestEntityTooLarge {
		t.Fatalf("early answer: %d %v", status, err)
	}
	if _, _, err := roundTrip(h, "GET", "http://"+addr+"/next", nil, 0); err != nil {
		t.Fatal(err)
	}
	if n := conns.Load(); n != 2 {
		t.Fatalf("%d connections, want 2: the half-sent one must not be reused", n)
	}
	// The writer goroutine ends with the upload: the body is closed once it stops.
	pw.Close()
	if _, err := pw.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("upload body still open after the exchange: %v", err)
	}
}

func TestH1Informational(t *testing.T) {
	const final = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
	addr := scripted(t, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"+
		"HTTP/1.1 100 Continue\r\n\r\n"+final)
	h := newTestH1(t, 0, 8)
	var got []string
	trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, hdr textproto.MIMEHeader) error {
		got = append(got, fmt.Sprint(code, " ", hdr.Get("Link")))
		return nil
	}}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", "http://"+addr, nil)
	resp, err := h.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "ok" || strings.Join(got, ",") != "103 </a.css>; rel=preload,100 " {
		t.Fatalf("got %d %q after 1xx %q", resp.StatusCode, b, got)
	}

	endless := scripted(t, strings.Repeat("HTTP/1.1 103 Early Hints\r\n\r\n", 6)+final)
	if _, _, err := roundTrip(h, "GET", "http://"+endless, nil, 0); !errors.Is(err, errTooMany1xx) {
		t.Fatalf("six 1xx answers: %v", err)
	}
	unasked := scripted(t, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
	if _, _, err := roundTrip(h, "GET", "http://"+unasked, nil, 0); err == nil {
		t.Fatal("101 to a request without Upgrade accepted")
	}
}

// TestH1AbandonedBody: closing a body early closes the connection and never drains it.
func TestH1AbandonedBody(t *testing.T) {
	srv := countingServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/endless" {
			return
		}
		for ctx := r.Context(); ctx.Err() == nil; {
			if _, err := w.Write(make([]byte, 32<<10)); err != nil {
				return
			}
		}
	}))
	h := newTestH1(t, 0, 8)
	req, _ := http.NewRequest("GET", srv.URL+"/endless", nil)
	resp, err := h.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := resp.Body.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { resp.Body.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close of an endless body did not return: it drains")
	}
	if _, _, err := roundTrip(h, "GET", srv.URL+"/next", nil, 0); err != nil {
		t.Fatal(err)
	}
	if n := srv.opened.Load(); n != 2 {
		t.Fatalf("%d connections, want 2", n)
	}
}

func TestH1IdleLimits(t *testing.T) {
	arrived := make(chan struct{}, 3)
	release := make(chan struct{})
	srv := countingServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			arrived <- struct{}{}
			<-release
		}
	}))
	h := newTestH1(t, 0, 1)
	h.idleTimeout = 200 * time.Millisecond
	errs := make(chan error, 3)
	for range 3 {
		go func() { _, _, err := roundTrip(h, "GET", srv.URL+"/hold", nil, 0); errs <- err }()
	}
	for range 3 {
		<-arrived
	}
	close(release)
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// One idle connection is kept, two closed at once; the kept one idles out.
	configtest.WaitFor(t, 5*time.Second, "two of three closed", func() bool { return srv.closed.Load() == 2 })
	if srv.closed.Load() != 2 {
		t.Fatalf("%d closed, want 2", srv.closed.Load())
	}
	configtest.WaitFor(t, 5*time.Second, "idle connection swept", func() bool { return srv.closed.Load() == 3 })
	h.host(srv.Listener.Addr().String()).mu.Lock()
	left := len(h.host(srv.Listener.Addr().String()).idle)
	h.host(srv.Listener.Addr().String()).mu.Unlock()
	if left != 0 {
		t.Fatalf("%d idle connections left after the sweep", left)
	}
}

func TestH1RefusesInvalidHeaders(t *testing.T) {
	srv := countingServer(t, echoBody())
	h := newTestH1(t, 0, 8)
	for _, hdr := range []http.Header{{"Bad Name": {"x"}}, {"X-Ok": {"split\r\nInjected: 1"}}} {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		req.Header = hdr
		if _, err := h.RoundTrip(req); err == nil {
			t.Errorf("header %q sent", hdr)
		}
	}
	if n := srv.opened.Load(); n != 0 {
		t.Fatalf("invalid requests opened %d connections", n)
	}
}

// TestH1UpgradeFallsBack: a WebSocket-style upgrade goes through the standard transport, whose
// 101 answer carries a writable body.
func TestH1UpgradeFallsBack(t *testing.T) {
	srv := countingServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		io.Copy(c, brw)
	}))
	h := newTestH1(t, 0, 8)
	req, _ := http.NewRequest("GET", srv.URL, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "echo")
	resp, err := h.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	rw, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		t.Fatalf("101 body %T is not writable", resp.Body)
	}
	defer rw.Close()
	rw.Write([]byte("ping"))
	b := make([]byte, 4)
	if _, err := io.ReadFull(rw, b); err != nil || string(b) != "ping" {
		t.Fatalf("upgraded stream: %q %v", b, err)
	}
}

// TestH1ExtraBytesDropConnection: bytes after a response (a target out of step, or one trying to
// answer a request before it is asked) are never read as the next request's answer.
func TestH1ExtraBytesDropConnection(t *testing.T) {
	const ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
	addr, conns := rawTarget(t, func(c net.Conn, br *bufio.Reader) {
		for first := true; ; first = false {
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			reply := ok
			if first {
				reply += "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
			}
			if _, err := io.WriteString(c, reply); err != nil {
				return
			}
		}
	})
	h := newTestH1(t, 5*time.Second, 8)
	for range 2 {
		if _, got, err := roundTrip(h, "GET", "http://"+addr, nil, 0); err != nil || got != "ok" {
			t.Fatalf("got %q %v, want ok", got, err)
		}
	}
	if n := conns.Load(); n != 2 {
		t.Fatalf("%d connections, want 2", n)
	}
}

// TestH1HTTPS: an https group (HTTP/1.1) goes through this client: verified TLS, one kept-alive
// connection, and only http/1.1 offered even to a target that speaks h2.
func TestH1HTTPS(t *testing.T) {
	p := newPKI(t)
	srv := &connCounter{Server: httptest.NewUnstartedServer(protoEcho())}
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			srv.opened.Add(1)
		}
	}
	srv.TLS = p.serverTLS()
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	g := build(t, newReg(t), conf(httpsGroup(srv.Listener.Addr().String(), &configs.BackendTLS{CAFile: p.caFile}, false))).Group("secure")
	if _, ok := g.Transport().(*h1Transport); !ok {
		t.Fatalf("https group transport is %T, want *h1Transport", g.Transport())
	}
	for range 20 {
		body, err := get(t, g, g.Targets()[0], "https")
		if err != nil || body != "HTTP/1.1" {
			t.Fatalf("got %q %v, want HTTP/1.1", body, err)
		}
	}
	if n := srv.opened.Load(); n != 1 {
		t.Fatalf("20 requests opened %d TLS connections, want 1", n)
	}
}

// FuzzH1Response: whatever a target answers, the client returns an error or a response whose
// body reads to an end; it never panics, hangs, or pools a connection with unread bytes or
// one whose answer it did not finish.
func FuzzH1Response(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n2\r\nok\r\n0\r\nX-T: v\r\n\r\n",
		"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
		"HTTP/1.0 200 OK\r\n\r\nuntil close",
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
		"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
		"HTTP/1.1 999\r\n\r\n",
		"garbage",
		"",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, answer []byte) {
		h := newTestH1(t, time.Second, 8)
		h.dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
			client, target := net.Pipe()
			go func() {
				defer target.Close()
				target.SetDeadline(time.Now().Add(2 * time.Second))
				if _, err := http.ReadRequest(bufio.NewReader(target)); err != nil {
					return
				}
				target.Write(answer)
			}()
			return client, nil
		}
		req, _ := http.NewRequest("GET", "http://fuzz.test/", nil)
		resp, err := h.RoundTrip(req)
		if err != nil {
			return
		}
		if resp.StatusCode < 200 {
			t.Fatalf("interim status %d returned as final", resp.StatusCode)
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		hh := h.host("fuzz.test")
		hh.mu.Lock()
		defer hh.mu.Unlock()
		for _, pc := range hh.idle {
			if n := pc.br.Buffered(); n != 0 {
				t.Fatalf("pooled a connection with %d unread bytes", n)
			}
		}
	})
}

// TestH1PoolRawSocket: a plain-TCP connection the engine borrows offers its socket for raw
// reads and writes, though the registry wraps it to count it open; a TLS one does not. Without
// the socket the engine falls back to net.Conn reads and writes, and every one of them enters
// the scheduler as a system call.
func TestH1PoolRawSocket(t *testing.T) {
	plain := countingServer(t, echoBody())
	r := newReg(t)
	gc := configs.TargetGroup{Name: "web", Protocol: "http", HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets: []configs.Target{{Address: plain.Listener.Addr().String(), Weight: 1}}}
	pool, ok := build(t, r, conf(gc)).Group("web").H1Pool()
	if !ok {
		t.Fatal("plain-HTTP group has no H1Pool")
	}
	tc, err := pool.Get(context.Background(), plain.Listener.Addr().String(), false, false)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Done(false)
	if _, counted := tc.Conn().(*net.TCPConn); counted {
		t.Fatal("the registry no longer wraps target connections: this test checks the wrapped case")
	}
	sock, rc := tc.RawConn()
	if sock == nil || rc == nil {
		t.Fatalf("plain-TCP target connection %T offers no raw socket", tc.Conn())
	}
	if got, want := sock.LocalAddr().String(), tc.Conn().LocalAddr().String(); got != want {
		t.Fatalf("raw socket is %s, the connection %s", got, want)
	}

	p := newPKI(t)
	secure := httptest.NewUnstartedServer(protoEcho())
	secure.TLS = p.serverTLS()
	secure.StartTLS()
	t.Cleanup(secure.Close)
	addr := secure.Listener.Addr().String()
	spool, ok := build(t, newReg(t), conf(httpsGroup(addr, &configs.BackendTLS{CAFile: p.caFile}, false))).Group("secure").H1Pool()
	if !ok {
		t.Fatal("https group has no H1Pool")
	}
	stc, err := spool.Get(context.Background(), addr, false, false)
	if err != nil {
		t.Fatal(err)
	}
	defer stc.Done(false)
	if sock, rc := stc.RawConn(); sock != nil || rc != nil {
		t.Fatal("a TLS target connection offers its raw socket")
	}
}
