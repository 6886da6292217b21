package listener

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestApplicationRouting drives every rule condition through a real listener to real back ends.
func TestApplicationRouting(t *testing.T) {
	dir := t.TempDir()
	web, api, canary, admin, v2 := backend(t, "web"), backend(t, "api"), backend(t, "canary"), backend(t, "admin"), backend(t, "v2")
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
[[target_groups]]
name = "api"
protocol = "http"
targets = [%q]
[[target_groups]]
name = "canary"
protocol = "http"
targets = [%q]
[[target_groups]]
name = "admin"
protocol = "http"
targets = [%q]
[[target_groups]]
name = "v2"
protocol = "http"
targets = [%q]

[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }

[[listeners.rules]]
priority = 5
paths = ["/maintenance"]
fixed_response = { status = 503, content_type = "text/plain", body = "down for maintenance" }

[[listeners.rules]]
priority = 6
paths = ["/old/*"]
redirect = { protocol = "https", host = "new.example.test", port = 8443, path = "/new/#{path}", query = "#{query}&moved=1", status = 301 }

[[listeners.rules]]
priority = 10
headers = { "x-canary" = ["1"] }
forward = "canary"

[[listeners.rules]]
priority = 20
hosts = ["api.example.test", "*.api.example.test"]
paths = ["/v1/*"]
methods = ["GET", "POST"]
forward = "api"
request_headers = { set = { "x-env" = "prod" }, remove = ["x-debug"] }
response_headers = { set = { "strict-transport-security" = "max-age=31536000" } }

[[listeners.rules]]
priority = 30
query = { version = ["2"] }
forward = "v2"

[[listeners.rules]]
priority = 40
source_ips = ["127.0.0.2/32"]
forward = "admin"
`, hostOf(web), hostOf(api), hostOf(canary), hostOf(admin), hostOf(v2), addr))
	startRuntime(t, cfg, nil)
	c := clientFrom("127.0.0.1")
	base := "http://" + addr

	cases := []struct {
		name    string
		method  string
		path    string
		host    string
		header  map[string]string
		src     string
		backend string
		status  int
	}{
		{name: "default action", method: "GET", path: "/", backend: "web", status: 200},
		{name: "exact host and path", method: "GET", path: "/v1/users", host: "api.example.test", backend: "api", status: 200},
		{name: "wildcard host, mixed case, port and trailing dot ignored", method: "POST", path: "/v1/x", host: "EU.Api.Example.Test.:8080", backend: "api", status: 200},
		{name: "method not in rule", method: "DELETE", path: "/v1/users", host: "api.example.test", backend: "web", status: 200},
		{name: "path is case-sensitive", method: "GET", path: "/V1/users", host: "api.example.test", backend: "web", status: 200},
		{name: "host alone is not enough (AND)", method: "GET", path: "/v2/users", host: "api.example.test", backend: "web", status: 200},
		{name: "header condition wins by priority", method: "GET", path: "/v1/users", host: "api.example.test", header: map[string]string{"X-Canary": "1"}, backend: "canary", status: 200},
		{name: "query condition", method: "GET", path: "/anything?version=2", backend: "v2", status: 200},
		{name: "query value must match", method: "GET", path: "/anything?version=3", backend: "web", status: 200},
		{name: "source ip condition", method: "GET", path: "/", src: "127.0.0.2", backend: "admin", status: 200},
		{name: "fixed response", method: "GET", path: "/maintenance", status: 503},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req := newReq(t, tc.method, base+tc.path)
			if tc.host != "" {
				req.Host = tc.host
			}
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			cl := c
			if tc.src != "" {
				cl = clientFrom(tc.src)
			}
			status, be, _ := get(t, cl, req)
			if status != tc.status || be != tc.backend {
				t.Fatalf("got %d from %q, want %d from %q", status, be, tc.status, tc.backend)
			}
		})
	}

	t.Run("fixed response is exact", func(t *testing.T) {
		resp, err := c.Get(base + "/maintenance")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 503 || string(b) != "down for maintenance" || resp.Header.Get("Content-Type") != "text/plain" {
			t.Fatalf("got %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), b)
		}
	})
	t.Run("redirect is exact", func(t *testing.T) {
		resp, err := c.Get(base + "/old/page?a=b")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		want := "https://new.example.test:8443/new/old/page?a=b&moved=1" // ALB: #{path} has no leading slash
		if resp.StatusCode != 301 || resp.Header.Get("Location") != want {
			t.Fatalf("got %d %q, want 301 %q", resp.StatusCode, resp.Header.Get("Location"), want)
		}
	})
	t.Run("header rewriting", func(t *testing.T) {
		req := newReq(t, "GET", base+"/v1/users")
		req.Host = "api.example.test"
		req.Header.Set("X-Debug", "1")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var seen echoReply
		if err := json.NewDecoder(resp.Body).Decode(&seen); err != nil {
			t.Fatal(err)
		}
		if got := seen.header("X-Env"); got != "prod" {
			t.Errorf("x-env at target = %q, want prod", got)
		}
		if got := seen.header("X-Debug"); got != "" {
			t.Errorf("x-debug reached the target: %q", got)
		}
		if got := resp.Header.Get("Strict-Transport-Security"); got != "max-age=31536000" {
			t.Errorf("response header = %q", got)
		}
		if seen.Host != "api.example.test" {
			t.Errorf("target saw Host %q, want the client's", seen.Host)
		}
		if seen.header("X-Request-Id") == "" {
			t.Error("no X-Request-Id at the target")
		}
	})
}

// echoReply is what the echo back end answers.
type echoReply struct {
	Backend string              `json:"backend"`
	Host    string              `json:"host"`
	URI     string              `json:"uri"`
	Headers map[string][]string `json:"headers"`
}

func (e echoReply) header(k string) string {
	for name, v := range e.Headers {
		if strings.EqualFold(name, k) && len(v) > 0 {
			return strings.Join(v, ", ")
		}
	}
	return ""
}

func TestWeightedForward(t *testing.T) {
	dir := t.TempDir()
	a, b := backend(t, "a"), backend(t, "b")
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "a"
protocol = "http"
targets = [%q]
[[target_groups]]
name = "b"
protocol = "http"
targets = [%q]
[[listeners]]
name = "split"
style = "application"
protocol = "http"
address = %q
default_action = { forward = [{ group = "a", weight = 90 }, { group = "b", weight = 10 }] }
`, hostOf(a), hostOf(b), addr))
	startRuntime(t, cfg, nil)
	c := clientFrom("127.0.0.1")
	const n = 10000
	counts := map[string]int{}
	for i := 0; i < n; i++ {
		_, be, _ := get(t, c, newReq(t, "GET", "http://"+addr+"/"))
		counts[be]++
	}
	share := float64(counts["a"]) / n
	if math.Abs(share-0.90) > 0.03 {
		t.Fatalf("group a got %.3f of %d requests, want 0.90 ± 0.03 (%v)", share, n, counts)
	}
}

// TestXForwardedFor checks the whole matrix: client header present/absent × trusted/untrusted
// peer × append/preserve/remove.
func TestXForwardedFor(t *testing.T) {
	dir := t.TempDir()
	be := backend(t, "be")
	addrs := map[string]string{"append": configtest.Addr(t), "preserve": configtest.Addr(t), "remove": configtest.Addr(t)}
	text := header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
`, hostOf(be))
	for _, mode := range []string{"append", "preserve", "remove"} {
		text += fmt.Sprintf(`
[[listeners]]
name = %q
style = "application"
protocol = "http"
address = %q
xff = %q
trusted_proxies = ["127.0.0.1/32"]
default_action = { forward = "be" }
`, mode, addrs[mode], mode)
	}
	startRuntime(t, loadConfig(t, dir, text), nil)

	cases := []struct {
		mode, src, sent, want string
	}{
		{"append", "127.0.0.1", "203.0.113.7", "203.0.113.7, 127.0.0.1"},
		{"append", "127.0.0.1", "", "127.0.0.1"},
		{"append", "127.0.0.2", "203.0.113.7", "127.0.0.2"},
		{"append", "127.0.0.2", "", "127.0.0.2"},
		{"preserve", "127.0.0.1", "203.0.113.7", "203.0.113.7"},
		{"preserve", "127.0.0.1", "", ""},
		{"preserve", "127.0.0.2", "203.0.113.7", "127.0.0.2"},
		{"preserve", "127.0.0.2", "", "127.0.0.2"},
		{"remove", "127.0.0.1", "203.0.113.7", ""},
		{"remove", "127.0.0.1", "", ""},
		{"remove", "127.0.0.2", "203.0.113.7", ""},
		{"remove", "127.0.0.2", "", ""},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/from=%s/sent=%q", tc.mode, tc.src, tc.sent), func(t *testing.T) {
			req := newReq(t, "GET", "http://"+addrs[tc.mode]+"/")
			if tc.sent != "" {
				req.Header.Set("X-Forwarded-For", tc.sent)
			}
			// A client trying to strip our headers through Connection must not succeed.
			req.Header.Set("Connection", "X-Forwarded-For, X-Forwarded-Proto")
			resp, err := clientFrom(tc.src).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var seen echoReply
			if err := json.NewDecoder(resp.Body).Decode(&seen); err != nil {
				t.Fatal(err)
			}
			if got := seen.header("X-Forwarded-For"); got != tc.want {
				t.Errorf("X-Forwarded-For at target = %q, want %q", got, tc.want)
			}
			if got := seen.header("X-Forwarded-Proto"); got != "http" {
				t.Errorf("X-Forwarded-Proto = %q, want http", got)
			}
			if got, want := seen.header("X-Forwarded-Port"), portOf(addrs[tc.mode]); got != want {
				t.Errorf("X-Forwarded-Port = %q, want %q", got, want)
			}
		})
	}
}

// TestNoHealthyTarget503IsFast: with every target down the client gets 503 without a dial.
// TestNoHealthyTarget503IsFast: with every target unhealthy the answer is 503 at once, and no
// request is tried on a target (each would cost a connect or a timeout). The target here is
// alive but fails its health check, so any request that reached it would be counted.
func TestNoHealthyTarget503IsFast(t *testing.T) {
	dir := t.TempDir()
	addr := configtest.Addr(t)
	var reached atomic.Int64
	sick := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			reached.Add(1)
		}
		w.WriteHeader(http.StatusInternalServerError)
	}))
	defer sick.Close()
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "down"
protocol = "http"
targets = [%q]
health_check = { path = "/healthz", interval = "100ms", timeout = "50ms", unhealthy_threshold = 1, healthy_threshold = 1 }
[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "down" }
`, hostOf(sick), addr))
	rt := startRuntime(t, cfg, nil)
	g := rt.set.Group("down")
	configtest.WaitFor(t, 5*time.Second, "the sick target marked down", func() bool { return g.Pick(clientAddrPort("127.0.0.1:1").Addr(), nil) == nil })
	c := clientFrom("127.0.0.1")
	var worst time.Duration
	for i := 0; i < 50; i++ {
		t0 := time.Now()
		status, _, _ := get(t, c, newReq(t, "GET", "http://"+addr+"/"))
		worst = max(worst, time.Since(t0))
		if status != http.StatusServiceUnavailable {
			t.Fatalf("status %d, want 503", status)
		}
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("%d requests reached the unhealthy target", n)
	}
	// Generous: a wait on a connect or response timeout (seconds) shows; scheduling noise does not.
	if worst > time.Second {
		t.Fatalf("slowest 503 took %v", worst)
	}
}

// TestMaxConnections: over max_connections a new connection is closed at once, and served
// again once a slot frees up.
func TestMaxConnections(t *testing.T) {
	dir := t.TempDir()
	be := backend(t, "be")
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %q
max_connections = 1
default_action = { forward = "be" }
`, hostOf(be), addr))
	rt := startRuntime(t, cfg, nil)
	first := clientFrom("127.0.0.1")
	if status, _, _ := get(t, first, newReq(t, "GET", "http://"+addr+"/")); status != 200 {
		t.Fatalf("first connection: status %d", status)
	}
	// The first client's keep-alive connection holds the only slot.
	second := clientFrom("127.0.0.1")
	if _, err := second.Get("http://" + addr + "/"); err == nil {
		t.Fatal("a second connection was served over max_connections = 1")
	}
	if r := rejectedOf(t, rt, "l"); r.MaxConnections != 1 || r.UntrustedProxy != 0 {
		t.Fatalf("rejections %+v, want exactly the one over max_connections", r)
	}
	first.CloseIdleConnections()
	configtest.WaitFor(t, 5*time.Second, "a second connection served once the first closed", func() bool {
		resp, err := second.Get("http://" + addr + "/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}
