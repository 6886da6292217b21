package listener

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener/door"
)

// backend is a real HTTP back end that says who it is (the project's echo server).
func backend(t testing.TB, name string) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(echo.Handler(name))
	t.Cleanup(s.Close)
	return s
}

func hostOf(s *httptest.Server) string { return strings.TrimPrefix(s.URL, "http://") }

// loadConfig loads TOML text the way the binary does, with state in a temp dir.
func loadConfig(t testing.TB, dir, text string) *configs.Config {
	t.Helper()
	path := filepath.Join(dir, "fulcrum.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := configs.LoadFile(path)
	if err != nil {
		t.Fatalf("config: %v\n%s", err, text)
	}
	return cfg
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startRuntime starts a runtime for cfg and stops it when the test ends.
func startRuntime(t testing.TB, cfg *configs.Config, obs Observer) *Runtime {
	t.Helper()
	log := testLogger(t)
	cm, err := certs.NewManager(context.Background(), cfg, log)
	if err != nil {
		t.Fatalf("certificate manager: %v", err)
	}
	reg := backends.NewRegistry(log)
	rt, err := Start(context.Background(), cfg, Options{Log: log, Observer: obs, Certs: cm, Registry: reg})
	if err != nil {
		reg.Close()
		cm.Close()
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		rt.Shutdown(ctx)
		reg.Close()
		cm.Close()
	})
	return rt
}

// header is the common head of test configurations.
func header(dir string) string {
	return fmt.Sprintf(`[server]
state_dir = %q
shutdown_timeout = "5s"

[keystore]
type = "software"
master_key = "file:%s/master.key"
`, dir, dir)
}

// get sends one request and returns the status, the X-Backend header and the body.
func get(t testing.TB, c *http.Client, req *http.Request) (int, string, string) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Backend"), string(b)
}

func newReq(t testing.TB, method, url string) *http.Request {
	t.Helper()
	r, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// clientFrom is an HTTP client whose connections come from a given loopback source address.
func clientFrom(src string) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	return &http.Client{
		Transport: &http.Transport{DialContext: d.DialContext, MaxIdleConnsPerHost: 64},
		Timeout:   10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// rejectedOf is the listener's count of connections closed at accept.
func rejectedOf(t testing.TB, rt *Runtime, listener string) door.Rejections {
	t.Helper()
	for _, s := range rt.Stats() {
		if s.Name == listener {
			return s.Rejected
		}
	}
	t.Fatalf("no listener %q in Stats", listener)
	return door.Rejections{}
}
