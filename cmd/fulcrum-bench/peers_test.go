package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
	buildDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// buildFulcrum builds the binary the bench runs, once per test binary (the test command's Go, as
// the conformance suite does).
func buildFulcrum(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		if buildDir, buildErr = os.MkdirTemp("", "fulcrum-bench-bin-"); buildErr != nil {
			return
		}
		builtBin = filepath.Join(buildDir, "fulcrum")
		goCmd := filepath.Join(runtime.GOROOT(), "bin", "go")
		out, err := exec.Command(goCmd, "build", "-o", builtBin, "../fulcrum").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ../fulcrum: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// requireTools fails when a program the bench needs is missing: CI installs them
// (Makefile TEST_PACKAGES: nginx, haproxy, wrk, nghttp2-client, hey).
func requireTools(t *testing.T, o peersOptions) {
	t.Helper()
	if err := checkTools(o); err != nil {
		t.Fatalf("%v (make deps installs the Debian packages the tests need)", err)
	}
}

// TestSmoke runs every scenario for one second against Fulcrum alone, so the tool and its
// parsers keep working: every scenario must produce a figure and no errors.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts nginx as the origin and runs wrk, h2load and hey for a few seconds; skipped with -short")
	}
	var log bytes.Buffer
	o := peersOptions{
		fulcrum: buildFulcrum(t), peers: []string{"fulcrum"}, only: allScenarios,
		reps: 1, duration: time.Second, conns: 8, rate: 300, idleConns: 50,
		proxyCPU: "1", otherCPUs: "0", log: &log, settle: 100 * time.Millisecond,
	}
	requireTools(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	results, err := runPeersWith(ctx, o, &out)
	if err != nil {
		t.Fatalf("%v\nprogress:\n%s", err, log.String())
	}
	for _, sc := range allScenarios {
		rs := results[sc]["fulcrum"]
		if len(rs) != 1 {
			t.Fatalf("%s: %d runs, want 1", sc, len(rs))
		}
		r := rs[0]
		if v := scenarioRows[sc].value(r); v <= 0 {
			t.Errorf("%s: no figure (%+v)", sc, r)
		}
		if r.errors != 0 {
			t.Errorf("%s: %d errors (%+v)", sc, r.errors, r)
		}
		if !strings.Contains(out.String(), "| "+scenarioRows[sc].label(o)+" |") {
			t.Errorf("%s: no row in the report", sc)
		}
	}
	if t.Failed() {
		t.Logf("report:\n%s\nprogress:\n%s", out.String(), log.String())
	}
}

// TestPeerConfigsServe starts nginx, HAProxy and Fulcrum from their templates, as the bench
// does, and checks that each forwards over HTTP/1.1, HTTPS and HTTP/2 to the origin with TLS 1.3
// and X-Forwarded-For: the configurations compared must do the same work.
func TestPeerConfigsServe(t *testing.T) {
	if testing.Short() {
		t.Skip("starts nginx and HAProxy; skipped with -short")
	}
	o := peersOptions{
		fulcrum: buildFulcrum(t), peers: peerOrder, only: []string{"h1"}, reps: 1,
		duration: time.Second, idleConns: 100, log: io.Discard,
	}
	requireTools(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := &bench{o: o, nofile: hardNofile()}
	var err error
	if b.dir, err = os.MkdirTemp("", "fulcrum-bench-test-"); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(b.dir)
	if err := b.makeCerts(); err != nil {
		t.Fatal(err)
	}
	if err := b.startOrigin(ctx); err != nil {
		t.Fatal(err)
	}
	defer b.origin.stop()
	for _, name := range peerOrder {
		t.Run(name, func(t *testing.T) {
			p, httpAddr, httpsAddr, err := b.startPeer(ctx, name, 1, "test")
			if err != nil {
				t.Fatal(err)
			}
			defer p.stop()
			h2cfg := b.tlsConfig()
			h2cfg.NextProtos = []string{"h2"}
			clients := map[string]*http.Client{
				"http/1.1": b.client(),
				"h2": {Timeout: 5 * time.Second, Transport: &http.Transport{
					TLSClientConfig: h2cfg, ForceAttemptHTTP2: true}},
			}
			for _, tc := range []struct{ url, client, proto string }{
				{"http://" + httpAddr + "/", "http/1.1", "HTTP/1.1"},
				{"https://" + httpsAddr + "/", "http/1.1", "HTTP/1.1"},
				{"https://" + httpsAddr + "/", "h2", "HTTP/2.0"},
			} {
				resp, err := clients[tc.client].Get(tc.url)
				if err != nil {
					t.Fatalf("GET %s (%s): %v", tc.url, tc.client, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || len(body) != 100 || resp.Proto != tc.proto {
					t.Errorf("GET %s (%s): %d %s, %d-byte body; want 200 %s with the origin's 100 bytes", tc.url, tc.client, resp.StatusCode, resp.Proto, len(body), tc.proto)
				}
				if resp.TLS != nil && (resp.TLS.Version != tls.VersionTLS13 || resp.TLS.CipherSuite != tls.TLS_AES_128_GCM_SHA256) {
					t.Errorf("GET %s: TLS %x cipher %x, want TLS 1.3 with TLS_AES_128_GCM_SHA256", tc.url, resp.TLS.Version, resp.TLS.CipherSuite)
				}
			}
		})
	}
}

func TestParseH2load(t *testing.T) {
	out := `starting benchmark...
finished in 2.00s, 12345.50 req/s, 1.20MB/s
requests: 24691 total, 24700 started, 24691 done, 24690 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 24690 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 2.40MB (2516582) total, 100.00KB (102400) headers (space savings 90.00%), 2.35MB (2469100) data
Application protocol: h2
`
	r, err := parseH2load(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.requests != 24691 || r.errors != 1 || r.rps != 12345.5 {
		t.Errorf("got %+v", r)
	}
	if _, err := parseH2load(strings.Replace(out, "Application protocol: h2", "Application protocol: http/1.1", 1)); err == nil {
		t.Error("an h2load run that fell back to HTTP/1.1 was accepted")
	}
	if _, err := parseH2load("connect: Connection refused\n"); err == nil {
		t.Error("unreadable output accepted")
	}
}

func TestPeersReport(t *testing.T) {
	o := peersOptions{peers: peerOrder, only: []string{"h1", "idle"}, reps: 1, conns: 64, idleConns: 9900, proxyCPU: "1", otherCPUs: "0", duration: 10 * time.Second}
	res := peerResults{
		"h1": {
			"nginx":   {{requests: 250000, cpu: 10 * time.Second, wall: 10 * time.Second}},
			"haproxy": {{requests: 200000, cpu: 10 * time.Second, wall: 10 * time.Second}},
			"fulcrum": {{requests: 200000, cpu: 10 * time.Second, wall: 10 * time.Second}},
		},
		"idle": {
			"nginx":   {{kibPerConn: 0.5, open: 9900}},
			"haproxy": {{kibPerConn: 1.0, open: 9900}},
			"fulcrum": {{kibPerConn: 2.0, open: 9900}},
		},
	}
	var out bytes.Buffer
	writePeersReport(&out, o, peerTitle, "", res)
	// Paired ratios: in the second repetition every proxy ran at half speed (a busy machine);
	// within each repetition Fulcrum is 0.8 of nginx, whatever the medians of each column say.
	o3 := o
	o3.reps, o3.only = 3, []string{"h1"}
	res3 := peerResults{"h1": {}}
	for _, p := range peerOrder {
		n := map[string]int64{"nginx": 250000, "haproxy": 200000, "fulcrum": 200000}[p]
		for _, f := range []int64{1, 2, 1} {
			res3["h1"][p] = append(res3["h1"][p], peerRun{requests: n / f, cpu: 10 * time.Second, wall: 10 * time.Second})
		}
	}
	var out3 bytes.Buffer
	writePeersReport(&out3, o3, peerTitle, "", res3)
	if !strings.Contains(out3.String(), "| 0.80 |") {
		t.Errorf("paired ratio: want 0.80:\n%s", out3.String())
	}
	for _, want := range []string{
		"| scenario | nginx | HAProxy | Fulcrum | Fulcrum vs best |",
		"| h1 keep-alive, 64 conns | 25.0k | 20.0k | 20.0k | 0.80 |",
		"| KiB per idle keep-alive connection (9,900) | 0.50 | 1.00 | 2.00 | 0.25 |",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}
