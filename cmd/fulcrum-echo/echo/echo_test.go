package echo

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func get(t *testing.T, c *http.Client, url string) (*http.Response, []byte) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read %s: %v", url, err)
	}
	return resp, b
}

func TestEcho(t *testing.T) {
	srv := httptest.NewServer(Handler("b1"))
	defer srv.Close()
	req, _ := http.NewRequest("POST", srv.URL+"/some/path?q=1", strings.NewReader("hello"))
	req.Header.Set("X-Test", "yes")
	req.Host = "app.example.com"
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var rep Reply
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		t.Fatal(err)
	}
	if resp.Header.Get("X-Backend") != "b1" || rep.Backend != "b1" || rep.Method != "POST" ||
		rep.URI != "/some/path?q=1" || rep.Host != "app.example.com" || rep.Proto != "HTTP/1.1" ||
		rep.Headers["X-Test"][0] != "yes" || rep.Remote == "" || rep.Body != 5 || rep.TLS {
		t.Fatalf("unexpected reply %+v (X-Backend %q)", rep, resp.Header.Get("X-Backend"))
	}
}

func TestHealthzStatusBytes(t *testing.T) {
	srv := httptest.NewServer(Handler("b2"))
	defer srv.Close()
	c := srv.Client()
	if resp, b := get(t, c, srv.URL+"/healthz"); resp.StatusCode != 200 || string(b) != "ok\n" {
		t.Fatalf("healthz: %d %q", resp.StatusCode, b)
	}
	if resp, _ := get(t, c, srv.URL+"/status/418"); resp.StatusCode != 418 || resp.Header.Get("X-Backend") != "b2" {
		t.Fatalf("status: %d", resp.StatusCode)
	}
	if resp, _ := get(t, c, srv.URL+"/status/abc"); resp.StatusCode != 400 {
		t.Fatalf("bad status: %d", resp.StatusCode)
	}
	resp, b := get(t, c, srv.URL+"/bytes/100000")
	if resp.StatusCode != 200 || len(b) != 100000 || b[0] != 'a' || resp.ContentLength != 100000 {
		t.Fatalf("bytes: %d len %d", resp.StatusCode, len(b))
	}
	for _, bad := range []string{"/bytes/-1", "/bytes/2000000000", "/bytes/x"} {
		if resp, _ := get(t, c, srv.URL+bad); resp.StatusCode != 400 {
			t.Fatalf("%s: %d", bad, resp.StatusCode)
		}
	}
}

func TestDelay(t *testing.T) {
	srv := httptest.NewServer(Handler("b1"))
	defer srv.Close()
	start := time.Now()
	if resp, _ := get(t, srv.Client(), srv.URL+"/delay/50ms"); resp.StatusCode != 200 {
		t.Fatalf("delay: %d", resp.StatusCode)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("delay answered after %v", d)
	}
	if resp, _ := get(t, srv.Client(), srv.URL+"/delay/nope"); resp.StatusCode != 400 {
		t.Fatalf("bad delay: %d", resp.StatusCode)
	}
	// A client that gives up ends the wait (the 30 s bound is not waited on).
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/delay/1h", nil)
	if _, err := srv.Client().Do(req); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled delay: %v", err)
	}
}

// Each event must arrive on its own, before the stream ends.
func TestStreamFlushes(t *testing.T) {
	srv := httptest.NewServer(Handler("b1"))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/stream?n=3&interval=200ms")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	br := bufio.NewReader(resp.Body)
	start := time.Now()
	var got []string
	for {
		line, err := br.ReadString('\n')
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "data: ") {
			if len(got) == 0 && time.Since(start) > 150*time.Millisecond {
				t.Fatalf("first event came after %v: not flushed", time.Since(start))
			}
			got = append(got, line)
		}
	}
	if len(got) != 3 || !strings.Contains(got[2], `"seq":2`) {
		t.Fatalf("events %q", got)
	}
	if resp, _ := get(t, srv.Client(), srv.URL+"/stream?n=x"); resp.StatusCode != 400 {
		t.Fatalf("bad n: %d", resp.StatusCode)
	}
}

func TestWebSocketRoundTrip(t *testing.T) {
	srv := httptest.NewServer(Handler("ws1"))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, err := DialWebSocket(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws", http.Header{"X-Client": {"t"}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	ws.NetConn().SetDeadline(time.Now().Add(10 * time.Second))
	if err := ws.WriteText("hello"); err != nil {
		t.Fatal(err)
	}
	if op, b, err := ws.ReadMessage(); err != nil || op != OpText || string(b) != "hello" {
		t.Fatalf("text echo: %d %q %v", op, b, err)
	}
	big := make([]byte, 70000) // 64-bit length form
	for i := range big {
		big[i] = byte(i)
	}
	if err := ws.WriteBinary(big); err != nil {
		t.Fatal(err)
	}
	if op, b, err := ws.ReadMessage(); err != nil || op != OpBinary || string(b) != string(big) {
		t.Fatalf("binary echo: %d len %d %v", op, len(b), err)
	}
	// Ping is answered with a pong (consumed by ReadMessage), then data flows.
	if err := ws.Ping([]byte("p")); err != nil {
		t.Fatal(err)
	}
	ws.WriteText("after-ping")
	if _, b, err := ws.ReadMessage(); err != nil || string(b) != "after-ping" {
		t.Fatalf("after ping: %q %v", b, err)
	}
	// Close handshake: the server answers our close.
	if err := ws.writeFrame(OpClose, []byte{0x03, 0xe8}); err != nil {
		t.Fatal(err)
	}
	var ce *CloseError
	if _, _, err := ws.ReadMessage(); !errors.As(err, &ce) || ce.Code != 1000 {
		t.Fatalf("close: %v", err)
	}
}

func TestWebSocketRejectsPlainGET(t *testing.T) {
	srv := httptest.NewServer(Handler("ws1"))
	defer srv.Close()
	if resp, _ := get(t, srv.Client(), srv.URL+"/ws"); resp.StatusCode != 400 {
		t.Fatalf("plain GET /ws: %d", resp.StatusCode)
	}
}

func TestWebSocketOverTLS(t *testing.T) {
	srv := httptest.NewTLSServer(Handler("wss"))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg := &tls.Config{RootCAs: srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}
	ws, err := DialWebSocketTLS(ctx, "wss"+strings.TrimPrefix(srv.URL, "https")+"/ws", nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	ws.NetConn().SetDeadline(time.Now().Add(10 * time.Second))
	ws.WriteText("secure")
	if _, b, err := ws.ReadMessage(); err != nil || string(b) != "secure" {
		t.Fatalf("wss echo: %q %v", b, err)
	}
}
