package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// rawRequest sends one request as raw bytes on a new connection and returns the status code.
func rawRequest(t *testing.T, addr, req string) int {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%q: %v", req, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// TestAccessLogClassificationAndActions: the access log carries ALB's classification,
// classification_reason, actions_executed and redirect_url, filled by the HTTP/1 engine (raw
// requests of each desync tier, forward, redirect, fixed response) and by the HTTP/2 path.
func TestAccessLogClassificationAndActions(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "access.log")
	good := echoBackend(t, "good")
	web, webTLS, admin := configtest.Addr(t), configtest.Addr(t), configtest.Addr(t)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), configHead(dir, admin, logPath)+fmt.Sprintf(`
[[authorities]]
name = "test-ca"

[[certificates]]
name = "site"
domains = ["localhost"]
authority = "test-ca"

[[target_groups]]
name = "echo"
protocol = "http"
targets = [%q]

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
desync_mitigation = "defensive"
default_action = { forward = "echo" }

[[listeners.rules]]
priority = 1
paths = ["/old/*"]
redirect = { host = "new.example", path = "/#{path}", status = 308 }

[[listeners.rules]]
priority = 2
paths = ["/missing"]
fixed_response = { status = 404, content_type = "text/plain", body = "nope" }

[[listeners]]
name = "web-tls"
style = "application"
protocol = "https"
address = %q
certificates = ["site"]
default_action = { redirect = { host = "h2.example", status = 302 } }
`, hostOf(good), web, webTLS))

	const host = "Host: a.example\r\n"
	if s := rawRequest(t, web, "GET /fwd HTTP/1.1\r\n"+host+"\r\n"); s != 200 {
		t.Fatalf("forward: %d", s)
	}
	if s := rawRequest(t, web, "GET /old/x?q=1 HTTP/1.1\r\n"+host+"\r\n"); s != 308 {
		t.Fatalf("redirect: %d", s)
	}
	if s := rawRequest(t, web, "GET /missing HTTP/1.1\r\n"+host+"\r\n"); s != 404 {
		t.Fatalf("fixed response: %d", s)
	}
	// Acceptable: forwarded.
	if s := rawRequest(t, web, "GET /acceptable HTTP/1.1\r\n"+host+"Content-Length: 0\r\n\r\n"); s != 200 {
		t.Fatalf("acceptable: %d", s)
	}
	// Ambiguous: forwarded (defensive), then the connection closes.
	if s := rawRequest(t, web, "GET /ambiguous HTTP/1.1\r\n"+host+"Content-Length: 3\r\n\r\nabc"); s != 200 {
		t.Fatalf("ambiguous: %d", s)
	}
	// Severe: blocked before any rule runs.
	if s := rawRequest(t, web, "GET /severe HTTP/1.1\r\n"+host+"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"); s != 400 {
		t.Fatalf("severe: %d", s)
	}
	h2c := tlsClient(caPool(t, dir, "test-ca"), "localhost")
	h2c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	if s, _ := fetch(t, h2c, "GET", "https://"+webTLS+"/two", nil); s != 302 {
		t.Fatalf("h2 redirect: %d", s)
	}

	d.stop() // flushes the log
	byPath := map[string]map[string]any{}
	for _, m := range readLines(t, logPath) {
		if f := strings.Fields(m["request"].(string)); len(f) == 3 {
			byPath[f[1]] = m
		}
	}
	for _, w := range []struct {
		path, class, reason, actions, redirect string
	}{
		{"/fwd", "", "", "forward", ""},
		{"/old/x?q=1", "", "", "redirect", "http://new.example:" + portOf(web) + "/old/x?q=1"},
		{"/missing", "", "", "fixed-response", ""},
		{"/acceptable", "Acceptable", "GetHeadZeroContentLength", "forward", ""},
		{"/ambiguous", "Ambiguous", "UndefinedContentLengthSemantics", "forward", ""},
		{"/severe", "Severe", "MultipleContentLength", "", ""},
		{"/two", "", "", "redirect", "https://h2.example:" + portOf(webTLS) + "/two"},
	} {
		m := byPath[w.path]
		if m == nil {
			t.Errorf("%s: no line", w.path)
			continue
		}
		if m["classification"] != w.class || m["classification_reason"] != w.reason ||
			m["actions_executed"] != w.actions || m["redirect_url"] != w.redirect {
			t.Errorf("%s: classification %q reason %q actions %q redirect %q; want %q %q %q %q", w.path,
				m["classification"], m["classification_reason"], m["actions_executed"], m["redirect_url"],
				w.class, w.reason, w.actions, w.redirect)
		}
	}
	if m := byPath["/two"]; m != nil && m["type"] != "h2" {
		t.Errorf("/two went over %v, want h2", m["type"])
	}
}
