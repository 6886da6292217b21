package listener

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestNextRequestAfterSlowAnswer: the wait for a kept-alive connection's next request arms its
// own deadline only when the request is not there yet. A deadline the last request left on the
// client connection (its head's, 200 ms here) may have passed while the target took its time
// (400 ms); the wait must not take that for its own idle timeout (90 ms, too short to park), or
// the connection would close under a client sending its next request at once.
func TestNextRequestAfterSlowAnswer(t *testing.T) {
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			time.Sleep(400 * time.Millisecond)
		}
		io.WriteString(w, r.URL.Path)
	}))
	defer target.Close()
	dir := t.TempDir()
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
header_timeout = "200ms"
idle_timeout = "90ms"
default_action = { forward = "web" }
`, hostOf(target), addr))
	startRuntime(t, cfg, nil)

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	for i, path := range []string{"/slow", "/next", "/slow", "/next"} {
		if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatalf("request %d (%s): %v", i, path, err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("request %d (%s) on the kept-alive connection: %v", i, path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != path {
			t.Fatalf("request %d: %d %q, want 200 %q", i, resp.StatusCode, body, path)
		}
	}
}
