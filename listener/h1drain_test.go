package listener

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestDrainServesFirstRequest: a drain (shutdown, binary upgrade) closes an HTTP/1 connection
// that is idle after a response at once, but a connection accepted before the drain that has
// not sent its first request yet (here parked, as after 50 ms) gets that request served, with
// Connection: close, within drainFirstGrace; a silent one is closed when the grace ends, and
// the drain does not wait for more.
func TestDrainServesFirstRequest(t *testing.T) {
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
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
default_action = { forward = "web" }
`, hostOf(target), addr))
	rt := startRuntime(t, cfg, nil)
	rt.mu.Lock()
	srv := rt.listeners[addr].Generation().Server.(*httpServer)
	rt.mu.Unlock()

	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	const get = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
	kept, keptR := dial()
	io.WriteString(kept, get)
	resp, err := http.ReadResponse(keptR, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	fresh, freshR := dial()
	silent, _ := dial()

	// All three parked: no event says so but the poller's count; poll it, bounded.
	for i := 0; ; i++ {
		if p := srv.poller(false); p != nil && p.Len() == 3 {
			break
		}
		if i == 1000 {
			t.Fatal("the three idle connections did not park within 5 s")
		}
		time.Sleep(5 * time.Millisecond)
	}

	shut := make(chan error, 1)
	start := time.Now()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		shut <- rt.Shutdown(ctx)
	}()
	for i := 0; !srv.isDraining(); i++ {
		if i == 1000 {
			t.Fatal("the drain did not begin within 5 s")
		}
		time.Sleep(5 * time.Millisecond)
	}

	// Idle after a response: closed at once, without a byte.
	if b, err := keptR.ReadByte(); err != io.EOF {
		t.Fatalf("idle keep-alive connection during a drain: read %q, %v; want EOF", b, err)
	}
	// Accepted, first request not sent yet: served, and told the connection closes.
	io.WriteString(fresh, get)
	resp, err = http.ReadResponse(freshR, nil)
	if err != nil {
		t.Fatalf("first request on a connection accepted before the drain: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok" || !resp.Close {
		t.Fatalf("first request during a drain: %d %q close=%v; want 200 \"ok\" with Connection: close",
			resp.StatusCode, body, resp.Close)
	}
	if _, err := freshR.ReadByte(); err != io.EOF {
		t.Fatalf("after its answer during a drain the connection stayed open: %v", err)
	}
	// Silent: closed when the grace ends.
	if _, err := silent.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("silent connection during a drain: %v; want EOF", err)
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v; want the drain to end on its own", err)
	}
	if d := time.Since(start); d > drainFirstGrace+3*time.Second {
		t.Fatalf("the drain took %v; a silent new connection may hold it only %v", d, drainFirstGrace)
	}
}
