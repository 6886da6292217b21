package main

import (
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// driveLoad sends n GETs to url over c concurrent connections, with hey when it is installed
// (what operators use) and a Go loop otherwise. It returns how many answered each status.
func driveLoad(t *testing.T, url string, n, c int) map[int]int {
	t.Helper()
	if hey, err := exec.LookPath("hey"); err == nil {
		out, err := exec.Command(hey, "-n", strconv.Itoa(n), "-c", strconv.Itoa(c), "-t", "20", url).CombinedOutput()
		if err != nil {
			t.Fatalf("hey: %v\n%s", err, out)
		}
		codes := map[int]int{}
		for _, m := range regexp.MustCompile(`\[(\d{3})\]\s+(\d+) responses`).FindAllStringSubmatch(string(out), -1) {
			code, _ := strconv.Atoi(m[1])
			k, _ := strconv.Atoi(m[2])
			codes[code] += k
		}
		if len(codes) == 0 {
			t.Fatalf("hey printed no status distribution:\n%s", out)
		}
		return codes
	}
	cl := httpClient()
	var mu sync.Mutex
	codes := map[int]int{}
	var wg sync.WaitGroup
	next := make(chan struct{}, n)
	for range n {
		next <- struct{}{}
	}
	close(next)
	for range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				resp, err := cl.Get(url)
				code := 0
				if err == nil {
					resp.Body.Close()
					code = resp.StatusCode
				}
				mu.Lock()
				codes[code]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return codes
}

// TestMetricsMatchTraffic: what /metrics counts is exactly what was sent, by listener, target
// group and status class, including the errors the load balancer answers itself.
func TestMetricsMatchTraffic(t *testing.T) {
	dir := t.TempDir()
	b := echoBackend(t, "b1")
	web, webTLS, dead, admin := configtest.Addr(t), configtest.Addr(t), configtest.DeadAddr(t), configtest.Addr(t)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), adminConfig(dir, admin, web, webTLS, hostOf(b), dead, ""))
	c := httpClient()
	configtest.WaitFor(t, 5*time.Second, "dead target out of rotation", func() bool {
		var tv targetsResponse
		fetchJSON(t, c, "GET", d.admin+"/admin/targets", &tv)
		return tv.Groups[1].Healthy == 0
	})

	const n = 2000
	codes := driveLoad(t, "http://"+web+"/load", n, 20)
	if codes[200] != n {
		t.Fatalf("load: %v, want %d x 200", codes, n)
	}
	const n404, n503 = 37, 23
	for range n404 {
		if s, _ := fetch(t, c, "GET", "http://"+web+"/missing", nil); s != 404 {
			t.Fatalf("/missing: %d", s)
		}
	}
	for range n503 {
		if s, _ := fetch(t, c, "GET", "http://"+web+"/down/x", nil); s != 503 {
			t.Fatalf("/down/x: %d", s)
		}
	}

	// The listener records a request once its last response byte is written (the duration is
	// "to last response byte", and a response that never went out is not counted as sent), so
	// the client can read the last response before it is counted. The signal that every
	// request is counted is the counts themselves: scrape until they match, within a bound,
	// and report the last scrape's differences. A count that overshoots never matches.
	type count struct {
		name   string
		labels []string
		v      float64
	}
	total := float64(n + n404 + n503)
	want := []count{
		{"fulcrum_http_requests_total", []string{"listener", "web", "target_group", "echo", "code", "2xx"}, n},
		{"fulcrum_http_requests_total", []string{"listener", "web", "target_group", "echo", "code", "5xx"}, 0},
		{"fulcrum_http_requests_total", []string{"listener", "web", "target_group", "", "code", "4xx"}, n404},
		{"fulcrum_http_requests_total", []string{"listener", "web", "target_group", "down", "code", "5xx"}, n503},
		{"fulcrum_http_requests_total", []string{"listener", "web", "target_group", "down", "code", "2xx"}, 0},
		{"fulcrum_http_request_duration_seconds_count", []string{"listener", "web"}, total},
		{"fulcrum_target_response_seconds_count", []string{"listener", "web", "target_group", "echo"}, n},
	}
	var ss []sample
	var wrong []string
	deadline := time.Now().Add(5 * time.Second)
	for {
		ss, wrong = scrape(t, c, d.admin), nil
		for _, w := range want {
			if got, ok := value(ss, w.name, w.labels...); !ok || got != w.v {
				wrong = append(wrong, fmt.Sprintf("%s%v = %v (present %v), want %v", w.name, w.labels, got, ok, w.v))
			}
		}
		if len(wrong) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, w := range wrong {
		t.Error(w)
	}
	if got, _ := value(ss, "fulcrum_target_healthy", "target_group", "down", "target", dead); got != 0 {
		t.Errorf("dead target healthy gauge %v", got)
	}
	if got, _ := value(ss, "fulcrum_target_healthy", "target_group", "echo", "target", hostOf(b)); got != 1 {
		t.Errorf("echo target healthy gauge %v", got)
	}
	if got, _ := value(ss, "fulcrum_connections_total", "listener", "web"); got < 20 {
		t.Errorf("connections accepted %v, want >= 20", got)
	}
	for _, reason := range []string{"max_connections", "untrusted_proxy"} { // exported, and nothing was rejected
		if got, ok := value(ss, "fulcrum_connections_rejected_total", "listener", "web", "reason", reason); !ok || got != 0 {
			t.Errorf("fulcrum_connections_rejected_total{listener=web,reason=%s} = %v (present %v), want 0", reason, got, ok)
		}
	}
	if got, ok := value(ss, "fulcrum_certificate_expiry_warning", "certificate", "site"); !ok || got != 0 {
		t.Errorf("issued certificate expiry warning %v (present %v), want 0: it renews itself", got, ok)
	}
	if got, ok := value(ss, "fulcrum_certificate_expiry_seconds", "certificate", "site"); !ok || got <= 0 {
		t.Errorf("certificate expiry %v %v", got, ok)
	}
	if _, ok := value(ss, "fulcrum_keystore_signs_total"); !ok {
		t.Error("no keystore sign counter")
	}
	if got, _ := value(ss, "fulcrum_http_response_bytes_total", "listener", "web"); got <= 0 {
		t.Errorf("response bytes %v", got)
	}
	// Nothing counted on the TLS listener, which received nothing.
	if got, _ := value(ss, "fulcrum_http_requests_total", "listener", "web-tls", "target_group", "echo", "code", "2xx"); got != 0 {
		t.Errorf("web-tls counted %v", got)
	}
	if testing.Verbose() {
		fmt.Println("codes:", codes)
	}
	_ = http.StatusOK
}
