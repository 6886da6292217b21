package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// echoBackend is the project's echo server on a real socket.
func echoBackend(t testing.TB, name string) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(echo.Handler(name))
	t.Cleanup(s.Close)
	return s
}

func hostOf(s *httptest.Server) string { return strings.TrimPrefix(s.URL, "http://") }

// configHead is the start of every test configuration: state in dir, an admin endpoint.
func configHead(dir, admin, accessLog string) string {
	return fmt.Sprintf(`[server]
admin = %q
admin_auth = "none"
state_dir = %q
shutdown_timeout = "5s"
access_log = %q

[keystore]
type = "software"
master_key = "file:%s/master.key"
`, admin, dir, accessLog, dir)
}

func writeConfig(t testing.TB, path, text string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil { // atomic, as deploy tools do
		t.Fatal(err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// testDaemon is a daemon started in-process from a config file in a temp dir.
type testDaemon struct {
	*daemon
	path  string
	admin string
	stop  func() // shuts down now (idempotent); also registered as cleanup
}

func startTestDaemon(t testing.TB, path, text string) *testDaemon {
	t.Helper()
	writeConfig(t, path, text)
	cfg, err := configs.LoadFile(path)
	if err != nil {
		t.Fatalf("config: %v\n%s", err, text)
	}
	d, err := startDaemon(context.Background(), path, cfg, testLogger(t), nil)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	var stopped atomic.Bool
	stop := func() {
		if stopped.Swap(true) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		d.shutdown(ctx)
	}
	t.Cleanup(stop)
	td := &testDaemon{daemon: d, path: path, stop: stop}
	if d.admin != nil {
		td.admin = "http://" + d.admin.Addr()
	}
	return td
}

func httpClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true},
		Timeout:   15 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// fetch does one request and returns the status and body.
func fetch(t testing.TB, c *http.Client, method, url string, body io.Reader) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func fetchJSON(t testing.TB, c *http.Client, method, url string, v any) int {
	t.Helper()
	status, body := fetch(t, c, method, url, nil)
	if err := json.Unmarshal([]byte(body), v); err != nil {
		t.Fatalf("%s %s: %v\n%s", method, url, err, body)
	}
	return status
}

// sample is one Prometheus series.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// scrape reads /metrics in the text format.
func scrape(t testing.TB, c *http.Client, admin string) []sample {
	t.Helper()
	resp, err := c.Get(admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("/metrics content type %q", ct)
	}
	var out []sample
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		s := sample{labels: map[string]string{}}
		rest := line
		if i := strings.IndexByte(line, '{'); i >= 0 {
			s.name = line[:i]
			j := strings.LastIndexByte(line, '}')
			for _, kv := range splitLabels(line[i+1 : j]) {
				k, v, _ := strings.Cut(kv, "=")
				uq, err := strconv.Unquote(v)
				if err != nil {
					t.Fatalf("label %q in %q: %v", kv, line, err)
				}
				s.labels[k] = uq
			}
			rest = strings.TrimSpace(line[j+1:])
		} else {
			s.name, rest, _ = strings.Cut(line, " ")
		}
		f := strings.Fields(rest)
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			t.Fatalf("value in %q: %v", line, err)
		}
		s.value = v
		out = append(out, s)
	}
	return out
}

// splitLabels splits `a="x",b="y,z"` at commas outside quotes.
func splitLabels(s string) []string {
	var out []string
	inq, esc, start := false, false, 0
	for i := 0; i < len(s); i++ {
		switch {
		case esc:
			esc = false
		case s[i] == '\\':
			esc = true
		case s[i] == '"':
			inq = !inq
		case s[i] == ',' && !inq:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}

// value returns the series with the name and exactly these label values (others ignored), and
// whether it exists.
func value(ss []sample, name string, labels ...string) (float64, bool) {
next:
	for _, s := range ss {
		if s.name != name {
			continue
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if v, ok := s.labels[labels[i]]; !ok || v != labels[i+1] {
				continue next
			}
		}
		return s.value, true
	}
	return 0, false
}

// caPool trusts the authority "name" of the state dir (PEM written by the certificate manager).
func caPool(t testing.TB, stateDir, name string) *x509.CertPool {
	t.Helper()
	pemBytes, err := os.ReadFile(filepath.Join(stateDir, "authorities", name+".pem"))
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(pemBytes) {
		t.Fatal("no CA certificate in PEM")
	}
	return p
}

func tlsClient(pool *x509.CertPool, serverName string) *http.Client {
	return &http.Client{
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: serverName}, ForceAttemptHTTP2: true},
		Timeout:   15 * time.Second,
	}
}
