package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
)

// The JSON keys every access-log line carries: ALB's fields (README, "Access log"). Written out
// rather than read from the encoder's struct, so that dropping a field fails here.
var accessFields = strings.Fields(`type time listener client target target_group
	request_processing_time target_processing_time response_time elb_status_code
	target_status_code received_bytes sent_bytes request host user_agent ssl_protocol ssl_cipher
	sni matched_rule_priority trace_id error_reason classification classification_reason
	actions_executed redirect_url`)

// The keys of a layer-4 connection's line: the fields of an NLB connection log that apply.
var connFields = strings.Fields(`type time listener client destination target connection_time
	received_bytes sent_bytes tls_protocol_version tls_cipher domain_name alpn_fe_protocol
	error_reason`)

// readLines parses every line of an access log; each must be one JSON object with every field.
func readLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("%s: line %d is not JSON: %v\n%s", path, len(out)+1, err, sc.Text())
		}
		fields := accessFields
		if m["type"] == "tcp" || m["type"] == "tls" { // a layer-4 connection's line
			fields = connFields
		}
		for _, k := range fields {
			if _, ok := m[k]; !ok {
				t.Fatalf("%s: line %d lacks %q:\n%s", path, len(out)+1, k, sc.Text())
			}
		}
		out = append(out, m)
	}
	return out
}

// killableBackend is an echo back end whose in-flight requests can be counted and cut.
type killableBackend struct {
	ln      net.Listener
	srv     *http.Server
	arrived chan struct{}
}

func newKillableBackend(t *testing.T) *killableBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	kb := &killableBackend{ln: ln, arrived: make(chan struct{}, 1024)}
	h := echo.Handler("fragile")
	kb.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/delay/") {
			kb.arrived <- struct{}{}
		}
		h.ServeHTTP(w, r)
	})}
	go kb.srv.Serve(ln)
	t.Cleanup(func() { kb.srv.Close() })
	return kb
}

func (kb *killableBackend) addr() string { return kb.ln.Addr().String() }

func accessConfig(dir, admin, web, webTLS, good, fragile, slow, dead, logPath string) string {
	return configHead(dir, admin, logPath) + fmt.Sprintf(`
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

[[target_groups]]
name = "fragile"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[target_groups]]
name = "slow"
protocol = "http"
targets = [%q]
response_timeout = "300ms"

[[target_groups]]
name = "down"
protocol = "http"
targets = [%q]
health_check = { protocol = "tcp", interval = "100ms", timeout = "50ms", unhealthy_threshold = 1, healthy_threshold = 1 }

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "echo" }

[[listeners.rules]]
priority = 3
query = { t = ["fragile"] }
forward = "fragile"

[[listeners.rules]]
priority = 4
query = { t = ["slow"] }
forward = "slow"

[[listeners.rules]]
priority = 5
paths = ["/down/*"]
forward = "down"

[[listeners.rules]]
priority = 10
paths = ["/missing"]
fixed_response = { status = 404, content_type = "text/plain", body = "nope" }

[[listeners]]
name = "web-tls"
style = "application"
protocol = "https"
address = %q
certificates = ["site"]
default_action = { forward = "echo" }
`, good, fragile, slow, dead, web, webTLS)
}

// TestAccessLogLines: every line parses and has every field; a target killed with requests in
// flight gives 502 lines, a response_timeout 504 lines, each with its error reason and no target
// status; TLS lines carry protocol, cipher and SNI.
func TestAccessLogLines(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "access.log")
	good := echoBackend(t, "good")
	fragile := newKillableBackend(t)
	web, webTLS, dead, admin := configtest.Addr(t), configtest.Addr(t), configtest.DeadAddr(t), configtest.Addr(t)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"),
		accessConfig(dir, admin, web, webTLS, hostOf(good), fragile.addr(), hostOf(good), dead, logPath))
	c := httpClient()
	configtest.WaitFor(t, 5*time.Second, "dead target out of rotation", func() bool {
		var tv targetsResponse
		fetchJSON(t, c, "GET", d.admin+"/admin/targets", &tv)
		return tv.Groups[3].Healthy == 0
	})

	req, _ := http.NewRequest("GET", "http://"+web+"/hello?x=1", nil)
	req.Header.Set("User-Agent", "fulcrum-test/1")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if s, _ := fetch(t, c, "POST", "http://"+web+"/post", strings.NewReader("twelve bytes")); s != 200 {
		t.Fatalf("POST: %d", s)
	}
	// A reader without a length goes out chunked: received_bytes counts what was read.
	if s, _ := fetch(t, c, "POST", "http://"+web+"/chunked", io.MultiReader(strings.NewReader("chunked, "), strings.NewReader("no length"))); s != 200 {
		t.Fatalf("chunked POST: %d", s)
	}
	fetch(t, c, "GET", "http://"+web+"/missing", nil)
	fetch(t, c, "GET", "http://"+web+"/down/x", nil)
	if s, _ := fetch(t, c, "GET", "http://"+web+"/status/502", nil); s != 502 { // the target's own 502
		t.Fatalf("/status/502: %d", s)
	}
	if s, _ := fetch(t, tlsClient(caPool(t, dir, "test-ca"), "localhost"), "GET", "https://"+webTLS+"/tls", nil); s != 200 {
		t.Fatalf("https: %d", s)
	}
	if s, _ := fetch(t, c, "GET", "http://"+web+"/delay/5s?t=slow", nil); s != 504 {
		t.Fatalf("response timeout: %d", s)
	}

	// Kill the fragile target with requests in flight.
	const inflight = 5
	var wg sync.WaitGroup
	statuses := make(chan int, inflight)
	for range inflight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := c.Get("http://" + web + "/delay/5s?t=fragile")
			if err != nil {
				statuses <- 0
				return
			}
			resp.Body.Close()
			statuses <- resp.StatusCode
		}()
	}
	for range inflight {
		select {
		case <-fragile.arrived:
		case <-time.After(10 * time.Second):
			t.Fatal("requests did not reach the fragile target")
		}
	}
	fragile.srv.Close() // listener and every connection, mid-request
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != 502 {
			t.Errorf("killed target: status %d, want 502", s)
		}
	}

	d.stop() // flushes the log
	lines := readLines(t, logPath)
	find := func(pred func(m map[string]any) bool) []map[string]any {
		var out []map[string]any
		for _, m := range lines {
			if pred(m) {
				out = append(out, m)
			}
		}
		return out
	}
	req1 := func(path string) func(m map[string]any) bool {
		return func(m map[string]any) bool { return strings.Contains(m["request"].(string), " "+path+" ") }
	}
	one := func(what string, ms []map[string]any) map[string]any {
		t.Helper()
		if len(ms) != 1 {
			t.Fatalf("%s: %d lines, want 1:\n%v", what, len(ms), lines)
		}
		return ms[0]
	}

	m := one("GET /hello", find(req1("/hello?x=1")))
	if m["type"] != "http" {
		t.Errorf("type %v, want http", m["type"])
	}
	if m["elb_status_code"] != 200.0 || m["target_status_code"] != 200.0 || m["target"] != hostOf(good) || m["target_group"] != "echo" ||
		m["listener"] != "web" || m["user_agent"] != "fulcrum-test/1" || m["request"] != "GET /hello?x=1 HTTP/1.1" ||
		m["matched_rule_priority"] != 0.0 || len(m["trace_id"].(string)) != 32 || m["error_reason"] != "" || m["ssl_protocol"] != "" ||
		m["sent_bytes"].(float64) <= 0 || m["host"] != web {
		t.Errorf("GET /hello line: %v", m)
	}
	if ap, err := netip.ParseAddrPort(m["client"].(string)); err != nil || !ap.Addr().IsLoopback() {
		t.Errorf("client %v", m["client"])
	}
	if ts, err := time.Parse(time.RFC3339Nano, m["time"].(string)); err != nil || time.Since(ts) > time.Minute {
		t.Errorf("time %v: %v", m["time"], err)
	}
	if rt, rp, tp := m["response_time"].(float64), m["request_processing_time"].(float64), m["target_processing_time"].(float64); rp < 0 || tp <= 0 || rt < rp+tp {
		t.Errorf("timings: want 0 <= request_processing_time, 0 < target_processing_time, their sum <= response_time: %v", m)
	}
	if m := one("POST", find(req1("/post"))); m["received_bytes"] != 12.0 {
		t.Errorf("POST line: %v", m)
	}
	if m := one("chunked POST", find(req1("/chunked"))); m["received_bytes"] != 18.0 {
		t.Errorf("chunked POST line: want the 18 body bytes read, got %v", m)
	}
	if m := one("404", find(req1("/missing"))); m["elb_status_code"] != 404.0 || m["target_status_code"] != 0.0 ||
		m["target"] != "" || m["target_group"] != "" || m["matched_rule_priority"] != 10.0 ||
		m["request_processing_time"] != -1.0 || m["target_processing_time"] != -1.0 {
		t.Errorf("fixed 404 line: %v", m)
	}
	if m := one("503", find(req1("/down/x"))); m["elb_status_code"] != 503.0 || m["target_status_code"] != 0.0 ||
		m["error_reason"] != "no_healthy_target" || m["target_group"] != "down" || m["matched_rule_priority"] != 5.0 {
		t.Errorf("503 line: %v", m)
	}
	if m := one("target 502", find(req1("/status/502"))); m["elb_status_code"] != 502.0 || m["target_status_code"] != 502.0 || m["error_reason"] != "" {
		t.Errorf("target's own 502 line: %v", m)
	}
	if m := one("https", find(req1("/tls"))); m["listener"] != "web-tls" || m["type"] != "h2" || m["ssl_protocol"] != "TLS 1.3" ||
		m["ssl_cipher"] == "" || m["sni"] != "localhost" || !strings.HasSuffix(m["request"].(string), "HTTP/2.0") {
		t.Errorf("https line: %v", m)
	}
	if m := one("504", find(req1("/delay/5s?t=slow"))); m["elb_status_code"] != 504.0 || m["target_status_code"] != 0.0 ||
		m["error_reason"] != "target_timeout" || m["target"] != hostOf(good) || m["target_group"] != "slow" ||
		m["request_processing_time"].(float64) < 0 || m["target_processing_time"] != -1.0 {
		t.Errorf("504 line: %v", m)
	}
	killed := find(req1("/delay/5s?t=fragile"))
	if len(killed) != inflight {
		t.Fatalf("killed target: %d lines, want %d", len(killed), inflight)
	}
	for _, m := range killed {
		if m["elb_status_code"] != 502.0 || m["target_status_code"] != 0.0 || m["target"] != fragile.addr() ||
			!strings.HasPrefix(m["error_reason"].(string), "target_") {
			t.Errorf("killed target line: %v", m)
		}
	}
}

// TestAccessLogReopen: logrotate renames the file and sends SIGUSR1; lines after the reopen go to
// the new file, and no line is lost or written twice.
func TestAccessLogReopen(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "access.log")
	good := echoBackend(t, "good")
	web, webTLS, dead, admin := configtest.Addr(t), configtest.Addr(t), configtest.DeadAddr(t), configtest.Addr(t)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"),
		accessConfig(dir, admin, web, webTLS, hostOf(good), hostOf(good), hostOf(good), dead, logPath))
	c := httpClient()

	// Load runs across the rotation: requests are numbered, before and after the reopen.
	var seq atomic.Int64
	var phase atomic.Int32 // 0 before the reopen, 1 after
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				p := phase.Load()
				s, _ := fetch(t, c, "GET", fmt.Sprintf("http://%s/p%d/%d", web, p, seq.Add(1)), nil)
				if s != 200 {
					t.Errorf("status %d", s)
					return
				}
			}
		}()
	}
	configtest.WaitFor(t, 10*time.Second, "some load", func() bool { return seq.Load() > 200 })
	rotated := logPath + ".1"
	if err := os.Rename(logPath, rotated); err != nil {
		t.Fatal(err)
	}
	d.reopenLogs()
	phase.Store(1)
	mark := seq.Load()
	configtest.WaitFor(t, 10*time.Second, "load after the reopen", func() bool { return seq.Load() > mark+200 })
	close(stop)
	wg.Wait()
	d.stop()

	sent := seq.Load()
	old, cur := readLines(t, rotated), readLines(t, logPath)
	if len(old) == 0 || len(cur) == 0 {
		t.Fatalf("old file %d lines, new file %d lines", len(old), len(cur))
	}
	seen := map[string]int{}
	for _, m := range append(old, cur...) {
		seen[strings.Fields(m["request"].(string))[1]]++
	}
	if int64(len(seen)) != sent || int64(len(old)+len(cur)) != sent {
		t.Fatalf("sent %d requests, logged %d distinct in %d lines", sent, len(seen), len(old)+len(cur))
	}
	for _, m := range old {
		if strings.HasPrefix(m["request"].(string), "GET /p1/") {
			t.Fatalf("a request sent after the reopen went to the rotated file: %v", m)
		}
	}
}

// TestConnectionLog: network listeners log one line per connection: a plain TCP stream (bytes
// both ways, its target), a TLS-offloaded one (protocol, cipher, SNI, ALPN), and one whose
// target refused (error_reason dial, no target).
func TestConnectionLog(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "access.log")
	good := echoBackend(t, "good")
	tcpAddr, tlsAddr, brokenAddr, dead := configtest.Addr(t), configtest.Addr(t), configtest.Addr(t), configtest.DeadAddr(t)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), configHead(dir, "", logPath)+fmt.Sprintf(`
[[authorities]]
name = "test-ca"

[[certificates]]
name = "site"
domains = ["localhost"]
authority = "test-ca"

[[target_groups]]
name = "raw"
protocol = "tcp"
targets = [%q]
health_check = { disabled = true }

[[target_groups]]
name = "gone"
protocol = "tcp"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "tcp"
style = "network"
protocol = "tcp"
address = %q
forward = "raw"

[[listeners]]
name = "edge"
style = "network"
protocol = "tls"
address = %q
certificates = ["site"]
alpn_policy = "HTTP1Only"
forward = "raw"

[[listeners]]
name = "broken"
style = "network"
protocol = "tcp"
address = %q
forward = "gone"
`, hostOf(good), dead, tcpAddr, tlsAddr, brokenAddr))

	// An HTTP request through each (the target speaks HTTP), with the connection closed after.
	plain := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	if s, _ := fetch(t, plain, "GET", "http://"+tcpAddr+"/over-tcp", nil); s != 200 {
		t.Fatalf("through the tcp listener: %d", s)
	}
	tc := tlsClient(caPool(t, dir, "test-ca"), "localhost")
	tc.Transport.(*http.Transport).DisableKeepAlives = true
	if s, _ := fetch(t, tc, "GET", "https://"+tlsAddr+"/over-tls", nil); s != 200 {
		t.Fatalf("through the tls listener: %d", s)
	}
	if _, err := plain.Get("http://" + brokenAddr + "/"); err == nil {
		t.Fatal("a listener whose only target refuses answered")
	}
	// Each connection is logged when it ends, which the client's close starts.
	configtest.WaitFor(t, 5*time.Second, "three connections ended", func() bool {
		var n int
		for _, s := range d.rt.Stats() {
			if s.Kind == "l4" {
				n += int(s.Accepted) - int(s.Active)
			}
		}
		return n >= 3
	})
	d.stop() // flushes the log

	byListener := map[string]map[string]any{}
	for _, m := range readLines(t, logPath) {
		if l, _ := m["listener"].(string); m["type"] == "tcp" || m["type"] == "tls" {
			byListener[l] = m
		}
	}
	if m := byListener["tcp"]; m == nil || m["type"] != "tcp" || m["target"] != hostOf(good) || m["error_reason"] != "" ||
		m["received_bytes"].(float64) <= 0 || m["sent_bytes"].(float64) <= 0 || m["destination"] != tcpAddr || m["connection_time"].(float64) <= 0 {
		t.Errorf("tcp connection line: %v", m)
	}
	if m := byListener["edge"]; m == nil || m["type"] != "tls" || m["tls_protocol_version"] != "TLS 1.3" || m["tls_cipher"] == "" ||
		m["domain_name"] != "localhost" || m["alpn_fe_protocol"] != "http/1.1" || m["sent_bytes"].(float64) <= 0 {
		t.Errorf("tls connection line: %v", m)
	}
	if m := byListener["broken"]; m == nil || m["error_reason"] != "dial" || m["target"] != "" {
		t.Errorf("refused target line: %v", m)
	}
}
