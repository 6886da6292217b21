package listener

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/h1"
)

// l7Recorder is an Observer that keeps the access-log records, so a test can see what happened
// to a request whose client is gone.
type l7Recorder struct {
	ch chan RequestRecord
}

func newL7Recorder() *l7Recorder { return &l7Recorder{ch: make(chan RequestRecord, 4096)} }

func (o *l7Recorder) Request(rec *RequestRecord) {
	select {
	case o.ch <- rec.Detach():
	default:
	}
}
func (o *l7Recorder) Desync(string, desync.Tier, desync.Reason) {}

// next waits for the next record matching pred (bounded).
func (o *l7Recorder) next(t testing.TB, pred func(RequestRecord) bool) RequestRecord {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case rec := <-o.ch:
			if pred(rec) {
				return rec
			}
		case <-timeout:
			t.Fatal("no matching access-log record within 5s")
		}
	}
}

// l7Backend is an echo back end that counts requests and remembers whether each asked to close.
type l7Backend struct {
	*httptest.Server
	hits, closing atomic.Int64
	arrived       chan string // paths of requests as they arrive (never blocks)
}

func newL7Backend(t testing.TB, name string, wrap func(http.Handler) http.Handler) *l7Backend {
	t.Helper()
	b := &l7Backend{arrived: make(chan string, 1024)}
	var h http.Handler = echo.Handler(name)
	if wrap != nil {
		h = wrap(h)
	}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		if r.Close {
			b.closing.Add(1)
		}
		select {
		case b.arrived <- r.URL.Path:
		default:
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(b.Close)
	return b
}

// l7RawServer is a broken back end: for every request it reads the head, writes reply and closes.
func l7RawServer(t testing.TB, reply string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					return
				}
				io.WriteString(c, reply)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// l7Raw sends raw bytes on a new connection and returns the response (nil when the connection
// closed without one) and whether the server closed the connection afterwards.
func l7Raw(t testing.TB, addr, method, raw string) (*http.Response, string, bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		return nil, "", true
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// Closed means EOF (or a reset) promptly; a kept-alive connection would hit the deadline.
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err = br.ReadByte()
	var ne net.Error
	closed := err != nil && !(errors.As(err, &ne) && ne.Timeout())
	return resp, string(body), closed
}

// TestStickiness: lb_cookie binds a client to a target; a tampered cookie is ignored; app_cookie
// binds once the application sets its own cookie.
func TestStickiness(t *testing.T) {
	dir := t.TempDir()
	setSession := func(name string) func(http.Handler) http.Handler {
		return func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasSuffix(r.URL.Path, "/login") {
					http.SetCookie(w, &http.Cookie{Name: "SESSION", Value: name, Path: "/"})
				}
				h.ServeHTTP(w, r)
			})
		}
	}
	var lb, app []string
	for _, n := range []string{"a", "b", "c"} {
		lb = append(lb, fmt.Sprintf("%q", newL7Backend(t, n, nil).Listener.Addr().String()))
		app = append(app, fmt.Sprintf("%q", newL7Backend(t, "app-"+n, setSession(n)).Listener.Addr().String()))
	}
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "lb"
protocol = "http"
targets = [%s]
stickiness = { type = "lb_cookie", duration = "1h" }
health_check = { disabled = true }
[[target_groups]]
name = "app"
protocol = "http"
targets = [%s]
stickiness = { type = "app_cookie", cookie = "SESSION" }
health_check = { disabled = true }
[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "lb" }
[[listeners.rules]]
priority = 1
paths = ["/app/*"]
forward = "app"
`, strings.Join(lb, ", "), strings.Join(app, ", "), addr))
	startRuntime(t, cfg, nil)
	c := clientFrom("127.0.0.1") // no cookie jar: cookies are sent by hand
	do := func(path string, cookies ...string) (string, *http.Response) {
		t.Helper()
		req := newReq(t, "GET", "http://"+addr+path)
		if len(cookies) > 0 {
			req.Header.Set("Cookie", strings.Join(cookies, "; "))
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d", path, resp.StatusCode)
		}
		return resp.Header.Get("X-Backend"), resp
	}
	cookieOf := func(resp *http.Response, name string) string {
		for _, ck := range resp.Cookies() {
			if ck.Name == name {
				return ck.Value
			}
		}
		return ""
	}

	t.Run("lb_cookie", func(t *testing.T) {
		first, resp := do("/")
		v := cookieOf(resp, backends.LBCookieName)
		if v == "" {
			t.Fatalf("no %s cookie in %q", backends.LBCookieName, resp.Header["Set-Cookie"])
		}
		for i := 0; i < 50; i++ {
			if be, _ := do("/", backends.LBCookieName+"="+v); be != first {
				t.Fatalf("request %d with the cookie went to %s, want %s", i, be, first)
			}
		}
		// Tampered: change the first character of the MAC (not the last: in unpadded base64 its
		// low bits are padding, so changing it may not change the MAC at all). The cookie must be
		// ignored (normal balancing, and a fresh valid cookie), never followed.
		b := []byte(v)
		i := strings.LastIndexByte(v, '.') + 1
		b[i] = map[bool]byte{true: 'B', false: 'A'}[b[i] == 'A']
		seen := map[string]bool{}
		for i := 0; i < 9; i++ {
			be, resp := do("/", backends.LBCookieName+"="+string(b))
			seen[be] = true
			if nv := cookieOf(resp, backends.LBCookieName); nv == "" || nv == string(b) {
				t.Fatalf("tampered cookie not replaced: %q", nv)
			}
		}
		if len(seen) < 2 {
			t.Fatalf("a tampered cookie still pinned every request to %v", seen)
		}
	})
	t.Run("app_cookie", func(t *testing.T) {
		// No application cookie set: no stickiness cookie either.
		if _, resp := do("/app/page"); cookieOf(resp, backends.AppCookieName) != "" {
			t.Fatalf("%s set although the application set no cookie", backends.AppCookieName)
		}
		first, resp := do("/app/login")
		v, sess := cookieOf(resp, backends.AppCookieName), cookieOf(resp, "SESSION")
		if v == "" || sess == "" {
			t.Fatalf("after login: cookies %q", resp.Header["Set-Cookie"])
		}
		for i := 0; i < 50; i++ {
			if be, _ := do("/app/page", "SESSION="+sess, backends.AppCookieName+"="+v); be != first {
				t.Fatalf("request %d with the cookie went to %s, want %s", i, be, first)
			}
		}
	})
}

// TestErrorStatuses: every failure maps to a status a user can tell apart, and malformed client
// input never reaches a target.
func TestErrorStatuses(t *testing.T) {
	dir := t.TempDir()
	web := newL7Backend(t, "web", nil)
	slow := backend(t, "slow")
	garbage := l7RawServer(t, "this is not HTTP\r\n\r\n")
	midHead := l7RawServer(t, "HTTP/1.1 200 OK\r\nContent-Le")
	midBody := l7RawServer(t, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
	def, strict := configtest.Addr(t), configtest.Addr(t)
	rec := newL7Recorder()
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[target_groups]]
name = "slow"
protocol = "http"
targets = [%q]
response_timeout = "200ms"
health_check = { disabled = true }
[[target_groups]]
name = "garbage"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[target_groups]]
name = "midhead"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[target_groups]]
name = "midbody"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "defensive"
style = "application"
protocol = "http"
address = %q
max_header_bytes = 4096
header_timeout = "300ms"
default_action = { forward = "web" }
[[listeners.rules]]
priority = 1
hosts = ["slow.test"]
forward = "slow"
[[listeners.rules]]
priority = 2
hosts = ["garbage.test"]
forward = "garbage"
[[listeners.rules]]
priority = 3
hosts = ["midhead.test"]
forward = "midhead"
[[listeners.rules]]
priority = 4
hosts = ["midbody.test"]
forward = "midbody"

[[listeners]]
name = "strictest"
style = "application"
protocol = "http"
address = %q
desync_mitigation = "strictest"
default_action = { forward = "web" }
`, web.Listener.Addr().String(), hostOf(slow), garbage, midHead, midBody, def, strict))
	startRuntime(t, cfg, rec)
	c := clientFrom("127.0.0.1")
	status := func(t *testing.T, host, path string) (int, time.Duration) {
		t.Helper()
		req := newReq(t, "GET", "http://"+def+path)
		req.Host = host
		t0 := time.Now()
		code, _, _ := get(t, c, req)
		return code, time.Since(t0)
	}

	t.Run("504 when the target is slower than response_timeout", func(t *testing.T) {
		code, d := status(t, "slow.test", "/delay/2s")
		if code != http.StatusGatewayTimeout || d > 1500*time.Millisecond {
			t.Fatalf("got %d after %v, want 504 after ~200ms", code, d)
		}
	})
	t.Run("502 on garbage", func(t *testing.T) {
		if code, _ := status(t, "garbage.test", "/"); code != http.StatusBadGateway {
			t.Fatalf("got %d, want 502", code)
		}
	})
	t.Run("502 when the target closes mid-head", func(t *testing.T) {
		if code, _ := status(t, "midhead.test", "/"); code != http.StatusBadGateway {
			t.Fatalf("got %d, want 502", code)
		}
	})
	t.Run("truncated body is not passed off as complete", func(t *testing.T) {
		req := newReq(t, "GET", "http://"+def+"/")
		req.Host = "midbody.test"
		// Either the head never leaves the proxy (it aborts before flushing) or the body is cut
		// short: the client must see an error either way, never a clean short response.
		resp, err := c.Do(req)
		if err != nil {
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			t.Fatalf("read a complete %d-byte body from a target that sent 10 of 100", len(b))
		}
	})

	// The remaining cases must never reach the target.
	var hits int64
	notForwarded := func(t *testing.T) {
		t.Helper()
		if n := web.hits.Load(); n != hits {
			t.Fatalf("%d request(s) reached the target", n-hits)
		}
	}
	t.Run("400 on a bad chunk size", func(t *testing.T) {
		hits = web.hits.Load()
		resp, body, closed := l7Raw(t, def, "POST",
			"POST /upload HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
		if resp == nil || resp.StatusCode != 400 || !closed {
			t.Fatalf("got %v %q closed=%v, want 400 and close", resp, body, closed)
		}
		notForwarded(t)
	})
	const clte = "POST /clte HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
	t.Run("Content-Length with Transfer-Encoding, strictest: 400 and close", func(t *testing.T) {
		hits = web.hits.Load()
		resp, body, closed := l7Raw(t, strict, "POST", clte)
		if resp == nil || resp.StatusCode != 400 || !closed {
			t.Fatalf("got %v %q closed=%v, want 400 and close", resp, body, closed)
		}
		notForwarded(t)
	})
	t.Run("431 for a head over max_header_bytes", func(t *testing.T) {
		hits = web.hits.Load()
		raw := "GET / HTTP/1.1\r\nHost: web.test\r\nX-Big: " + strings.Repeat("x", 16<<10) + "\r\n\r\n"
		resp, body, closed := l7Raw(t, def, "GET", raw)
		if resp == nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge || !closed {
			t.Fatalf("got %v %q closed=%v, want 431 and close", resp, body, closed)
		}
		notForwarded(t)
	})
	t.Run("slowloris: a head not finished within header_timeout is closed", func(t *testing.T) {
		hits = web.hits.Load()
		conn, err := net.Dial("tcp", def)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		t0 := time.Now()
		io.WriteString(conn, "GET / HTTP/1.1\r\nHost: web.test\r\nX-Slow: 1\r\n")
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.Copy(io.Discard, conn) // returns at EOF (a 408 may come first)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("connection still open after 5s; header_timeout is 300ms")
		}
		if d := time.Since(t0); d > 3*time.Second {
			t.Fatalf("closed after %v; header_timeout is 300ms", d)
		}
		notForwarded(t)
	})
	t.Run("Content-Length with Transfer-Encoding, defensive: never on a kept-alive connection", func(t *testing.T) {
		// Ambiguous in defensive mode: forwarded, but with Connection: close to the target (its
		// connection is not reused) and the client connection closed after the answer.
		hits, closing := web.hits.Load(), web.closing.Load()
		resp, body, closed := l7Raw(t, def, "POST", clte)
		if resp == nil || !closed {
			t.Fatalf("got %v %q closed=%v, want an answer and close", resp, body, closed)
		}
		if n := web.hits.Load() - hits; n > 0 && web.closing.Load()-closing != n {
			t.Fatalf("forwarded to the target on a connection kept alive (status %d)", resp.StatusCode)
		}
	})
	// Last: the head of this one reaches the target asynchronously (see below).
	t.Run("400 when the client disconnects mid-body", func(t *testing.T) {
		// The head of a Content-Length request streams to the target before the body; the
		// target gets a truncated body on a connection that is then closed.
		conn, err := net.Dial("tcp", def)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(conn, "POST /half HTTP/1.1\r\nHost: web.test\r\nContent-Length: 100\r\n\r\n0123456789")
		conn.Close()
		r := rec.next(t, func(r RequestRecord) bool { return r.URI == "/half" })
		if r.Status != 400 || r.Reason != "client_body_error" {
			t.Fatalf("access log: status %d reason %q, want 400 client_body_error", r.Status, r.Reason)
		}
	})
}

// TestStreamingAndDrain: streamed responses arrive as they are written; WebSockets work through
// an HTTPS listener; a request in flight to a target removed by a reload completes.
func TestStreamingAndDrain(t *testing.T) {
	dir := t.TempDir()
	old, repl := newL7Backend(t, "old", nil), newL7Backend(t, "new", nil)
	plain, secure := configtest.Addr(t), configtest.Addr(t)
	text := func(target string) string {
		return l7PKI(dir) + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
deregistration_delay = "3s"
health_check = { disabled = true }
[[listeners]]
name = "plain"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
[[listeners]]
name = "secure"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "web" }
`, target, plain, secure)
	}
	rt := startRuntime(t, loadConfig(t, dir, text(old.Listener.Addr().String())), nil)
	pool, _ := l7CAPool(t, dir, "internal")

	t.Run("server-sent events arrive incrementally", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			c    *http.Client
			url  string
		}{
			{"http/1.1", clientFrom("127.0.0.1"), "http://" + plain},
			{"h2", l7TLSClient(secure, pool, true), "https://www.example.test"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				resp, err := tc.c.Get(tc.url + "/stream?n=5&interval=200ms")
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				br := bufio.NewReader(resp.Body)
				var at []time.Time
				for len(at) < 5 {
					line, err := br.ReadString('\n')
					if err != nil {
						t.Fatalf("after %d events: %v", len(at), err)
					}
					if strings.HasPrefix(line, "data:") {
						at = append(at, time.Now())
					}
				}
				// The target writes one event every 200ms: if the proxy buffered, all five would
				// arrive together at the end.
				if spread := at[4].Sub(at[0]); spread < 500*time.Millisecond {
					t.Fatalf("five events over %v; the first arrived with the last", spread)
				}
			})
		}
	})
	t.Run("WebSocket through HTTPS", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ws, err := echo.DialWebSocketTLS(ctx, "wss://"+secure+"/ws", nil, &tls.Config{RootCAs: pool, ServerName: "www.example.test"})
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		ws.NetConn().SetDeadline(time.Now().Add(5 * time.Second))
		for _, msg := range []string{"one", strings.Repeat("x", 70000), "three"} {
			if err := ws.WriteText(msg); err != nil {
				t.Fatal(err)
			}
			_, got, err := ws.ReadMessage()
			if err != nil || string(got) != msg {
				t.Fatalf("echo of %d bytes: got %d bytes, %v", len(msg), len(got), err)
			}
		}
	})
	t.Run("deregistration delay lets an in-flight request finish", func(t *testing.T) {
		c := clientFrom("127.0.0.1")
		type result struct {
			status int
			be     string
		}
		done := make(chan result, 1)
		go func() {
			resp, err := c.Get("http://" + plain + "/delay/1s")
			if err != nil {
				done <- result{status: -1, be: err.Error()}
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			done <- result{resp.StatusCode, resp.Header.Get("X-Backend")}
		}()
		for p := range old.arrived { // bounded by the request's own timeout
			if p == "/delay/1s" {
				break
			}
		}
		if _, err := rt.Reload(context.Background(), loadConfig(t, dir, text(repl.Listener.Addr().String()))); err != nil {
			t.Fatal(err)
		}
		if _, be, _ := get(t, c, newReq(t, "GET", "http://"+plain+"/")); be != "new" {
			t.Fatalf("after the reload a new request went to %q", be)
		}
		select {
		case r := <-done:
			if r.status != 200 || r.be != "old" {
				t.Fatalf("in-flight request: %d from %q, want 200 from the removed target", r.status, r.be)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("in-flight request did not finish")
		}
	})
}

// l7CorpusCase is one case of the desync corpus shipped with the classifier.
type l7CorpusCase struct {
	Name    string `json:"name"`
	Method  string `json:"method"`
	URI     string `json:"uri"`
	Version string `json:"version"`
	Headers []struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	} `json:"headers"`
	Expected struct {
		Tier string `json:"tier"`
	} `json:"expected"`
}

// frame returns the raw request: its head, then the body the engine's parser frames after it.
func (c *l7CorpusCase) frame() (raw string, req *h1.Request) {
	var b strings.Builder
	b.WriteString(c.Method + " " + c.URI + " " + c.Version + "\r\nHost: corpus.test\r\n")
	for _, h := range c.Headers {
		b.WriteString(h.Name + ": " + h.Value + "\r\n")
	}
	b.WriteString("\r\n")
	head := b.String()
	req = new(h1.Request)
	if err := req.Parse([]byte(head), 1<<20); err != nil {
		return head, nil
	}
	switch req.Framing {
	case h1.Chunked:
		return head + "0\r\n\r\n", req
	case h1.Sized:
		if req.ContentLength <= 8<<20 {
			return head + strings.Repeat("x", int(req.ContentLength)), req
		}
	}
	return head, req
}

// desyncRecorder counts the Desync calls and the access-log records by tier and mode.
type desyncRecorder struct {
	mu      sync.Mutex
	desyncs map[string]int // listener/tier
	records map[string]int // listener/status
}

func (o *desyncRecorder) Request(rec *RequestRecord) {
	o.mu.Lock()
	o.records[rec.Listener+"/"+strconv.Itoa(rec.Status)]++
	o.mu.Unlock()
}

func (o *desyncRecorder) Desync(l string, tier desync.Tier, _ desync.Reason) {
	o.mu.Lock()
	o.desyncs[l+"/"+tier.String()]++
	o.mu.Unlock()
}

// TestDesyncCorpusThroughProxy sends every case of the desync corpus through a real listener in
// each mitigation mode. The engine parses and classifies every head itself (none is refused by
// another parser first), so each case gets its tier's action: monitor forwards all but what
// cannot be framed (closing after ambiguous and severe ones), defensive refuses severe ones with
// 400 and a close and forwards ambiguous ones then closes, strictest forwards only compliant
// ones. Every non-compliant case is counted in the desync metric, and every request is logged.
func TestDesyncCorpusThroughProxy(t *testing.T) {
	b, err := os.ReadFile("desync/testdata/corpus.json")
	if err != nil {
		t.Fatal(err)
	}
	var corpus []l7CorpusCase
	if err := json.Unmarshal(b, &corpus); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	web := newL7Backend(t, "web", nil)
	modes := []desync.Mode{desync.Monitor, desync.Defensive, desync.Strictest}
	addrs := map[desync.Mode]string{}
	text := header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
`, web.Listener.Addr().String())
	for _, m := range modes {
		addrs[m] = configtest.Addr(t)
		text += fmt.Sprintf(`
[[listeners]]
name = %q
style = "application"
protocol = "http"
address = %q
desync_mitigation = %q
default_action = { forward = "web" }
`, m.String(), addrs[m], m.String())
	}
	obs := &desyncRecorder{desyncs: map[string]int{}, records: map[string]int{}}
	startRuntime(t, loadConfig(t, dir, text), obs)

	wantDesync := map[string]int{}
	sent := map[desync.Mode]int{}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16) // cases run side by side: a kept-alive answer waits 3 s for a close
	for _, m := range modes {
		for i, cc := range corpus {
			raw, req := cc.frame()
			if req == nil {
				t.Fatalf("case %d %q: the head does not parse", i, cc.Name)
			}
			sent[m]++
			if req.Tier != desync.Compliant {
				wantDesync[m.String()+"/"+req.Tier.String()]++
			}
			v := desync.Decide(m, req.Tier)
			refused := req.Unframeable != h1.Frameable || v.Block
			method := cc.Method
			if refused {
				method = "GET" // our 400 carries a body, whatever the method
			}
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				resp, body, closed := l7Raw(t, addrs[m], method, raw)
				status := 0
				if resp != nil {
					status = resp.StatusCode
				}
				backend := ""
				if resp != nil {
					backend = resp.Header.Get("X-Backend")
				}
				what := fmt.Sprintf("%v case %d %q (%v/%v): status %d closed=%v backend %q body %.60q", m, i, cc.Name,
					req.Tier, req.Reason, status, closed, backend, body)
				switch {
				case refused:
					if backend != "" || status != 400 || !closed {
						t.Errorf("%s: want 400 and close, not forwarded", what)
					}
				case v.CloseAfter:
					if backend != "web" || !closed {
						t.Errorf("%s: want forwarded, then closed", what)
					}
				default:
					if backend != "web" {
						t.Errorf("%s: want forwarded", what)
					}
				}
			}()
		}
	}
	wg.Wait()
	// Every request was logged (records are handed over before the connection closes) and every
	// non-compliant one counted with its tier.
	obs.mu.Lock()
	defer obs.mu.Unlock()
	for k, n := range wantDesync {
		if obs.desyncs[k] != n {
			t.Errorf("desync metric %s = %d, want %d", k, obs.desyncs[k], n)
		}
	}
	for _, m := range modes {
		logged := 0
		for k, n := range obs.records {
			if strings.HasPrefix(k, m.String()+"/") {
				logged += n
			}
		}
		if logged != sent[m] {
			t.Errorf("%v: %d requests logged, want %d", m, logged, sent[m])
		}
	}
}

// TestEarlyAnswerDuringUpload: a target that answers before reading the request body (a 401 or
// 413 in real life) while the client is still uploading. The proxy's transport may go on reading
// the client's body after the handler returned; nothing of that request may touch the state of
// the requests that follow (run with -race).
func TestEarlyAnswerDuringUpload(t *testing.T) {
	dir := t.TempDir()
	early := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/upload" {
			w.Header().Set("Connection", "close")
			w.WriteHeader(http.StatusRequestEntityTooLarge)
			return
		}
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	}))
	t.Cleanup(early.Close)
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
`, hostOf(early), addr))
	startRuntime(t, cfg, nil)
	c := clientFrom("127.0.0.1")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var bad atomic.Int64
	for w := 0; w < 4; w++ { // ordinary traffic that reuses pooled request state
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Post("http://"+addr+"/", "text/plain", strings.NewReader("small body"))
				if err != nil {
					bad.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					bad.Add(1)
				}
			}
		}()
	}
	for i := 0; i < 20; i++ {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"+strings.Repeat("x", 32<<10))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("early answer: %v %v", resp, err)
		}
		// Keep uploading a little, then vanish mid-body.
		io.WriteString(conn, strings.Repeat("y", 32<<10))
		conn.Close()
	}
	close(stop)
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d ordinary requests failed next to early-answered uploads", bad.Load())
	}
}
