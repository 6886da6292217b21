package listener

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// trailerTarget is an HTTP/1.1 target (Go's net/http) that answers with a chunked body and
// declared trailers.
func trailerTarget(t *testing.T) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum, X-Count")
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(200)
		io.WriteString(w, "hello ")
		w.(http.Flusher).Flush() // chunked on the wire, not one sized write
		io.WriteString(w, "world")
		w.Header().Set("X-Checksum", "abc123")
		w.Header().Set("X-Count", "2")
	}))
	t.Cleanup(s.Close)
	return s
}

// rawTrailerTarget answers every request on a connection with the same chunked response whose
// trailer section carries, besides two ordinary fields, fields that must never be forwarded as
// trailers (framing, routing, connection-specific: RFC 9110 section 6.5.1, RFC 9113 section
// 8.2.2). Go's server would not send these, so the bytes are written by hand.
func rawTrailerTarget(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	const resp = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTrailer: X-Checksum, X-Count\r\n" +
		"Transfer-Encoding: chunked\r\n\r\n" +
		"6\r\nhello \r\n5\r\nworld\r\n0\r\n" +
		"X-Checksum: abc123\r\nContent-Length: 99\r\nConnection: close\r\nHost: evil.example\r\n" +
		"Transfer-Encoding: chunked\r\nTrailer: X-Evil\r\nKeep-Alive: timeout=1\r\nTE: trailers\r\n" +
		"Upgrade: h2c\r\nX-Count:  2 \r\n\r\n"
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					if _, err := io.WriteString(c, resp); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// TestTrailersRelayed: a chunked HTTP/1.1 target response's trailer section reaches the client,
// over HTTP/2 (the direct path: a final HEADERS frame with END_STREAM) and over HTTP/1.1
// (chunked to chunked), with fields that may not be trailers left out on HTTP/2.
func TestTrailersRelayed(t *testing.T) {
	dir := t.TempDir()
	goTarget := trailerTarget(t)
	raw := rawTrailerTarget(t)
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "go"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[target_groups]]
name = "raw"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "app"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "go" }

[[listeners.rules]]
priority = 1
paths = ["/raw"]
forward = "raw"
`, hostOf(goTarget), raw, addr))
	obs := newL7Recorder()
	startRuntime(t, cfg, obs)
	pool, _ := l7CAPool(t, dir, "internal")

	for _, h2 := range []bool{true, false} {
		c := l7TLSClient(addr, pool, h2)
		for _, path := range []string{"/", "/raw"} {
			t.Run(fmt.Sprintf("h2=%v%s", h2, path), func(t *testing.T) {
				// Twice: the second request reuses the target connection the first left idle,
				// which must have been read to the end of its trailer section.
				for i := 0; i < 2; i++ {
					resp, err := c.Get("https://www.example.test" + path)
					if err != nil {
						t.Fatal(err)
					}
					body, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					if err != nil {
						t.Fatalf("body: %v", err)
					}
					if want := 2; h2 && resp.ProtoMajor != want {
						t.Fatalf("protocol %s, want HTTP/2", resp.Proto)
					}
					if resp.StatusCode != 200 || string(body) != "hello world" {
						t.Fatalf("status %d body %q", resp.StatusCode, body)
					}
					if v := resp.Trailer.Get("X-Checksum"); v != "abc123" {
						t.Fatalf("trailer X-Checksum = %q, want abc123 (trailers %v)", v, resp.Trailer)
					}
					if v := resp.Trailer.Get("X-Count"); v != "2" {
						t.Fatalf("trailer X-Count = %q, want 2 (trailers %v)", v, resp.Trailer)
					}
					if !h2 || path != "/raw" {
						continue
					}
					for k := range resp.Trailer {
						switch strings.ToLower(k) {
						case "x-checksum", "x-count":
						default:
							t.Errorf("trailer %s: %q relayed, must be left out", k, resp.Trailer[k])
						}
					}
				}
			})
		}
	}
}
