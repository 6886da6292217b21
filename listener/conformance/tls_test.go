package conformance

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// tlsListeners is a configuration with one HTTPS listener per named TLS policy, certificates
// from a private authority, in front of target tg.
func tlsListeners(tg *target, addrs map[string]string) string {
	s := fmt.Sprintf(`
[[authorities]]
name = "ca"
common_name = "Conformance CA"

[[certificates]]
name = "site"
domains = ["localhost", "127.0.0.1"]
authority = "ca"

[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
`, tg.addr())
	names := make([]string, 0, len(addrs))
	for n := range addrs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, policy := range names {
		s += fmt.Sprintf(`
[[listeners]]
name = %q
style = "application"
protocol = "https"
address = %q
certificates = ["site"]
tls_policy = %q
http2 = true
# testssl's socket probes send a partial handshake and wait for the server to give up: the
# handshake budget (header_timeout) decides how long each of them takes.
header_timeout = "1s"
default_action = { forward = "be" }
`, policy, addrs[policy], policy)
	}
	return s
}

// h2specAllowed are the h2spec cases allowed to fail. It can only shrink: the test fails when
// an allowlisted case passes, so the list stays honest. Empty since the HTTP/2 engine replaced
// x/net/http2's server (which failed 4.2/3, 6.5.3/1, 8.1.2.2/1 and 8.1.2.2/2).
var h2specAllowed = map[string]bool{}

var (
	h2specSummary = regexp.MustCompile(`(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed`)
	h2specSection = regexp.MustCompile(`^\s*(\d+(?:\.\d+)*)\.\s`)
	h2specFailed  = regexp.MustCompile(`^\s*×\s+(\d+):`)
)

// h2specFailures lists the failed cases of h2spec's "Failures:" section as "4.2/3".
func h2specFailures(out string) map[string]bool {
	failed := map[string]bool{}
	i := strings.Index(out, "Failures:")
	if i < 0 {
		return failed
	}
	section := ""
	for _, line := range strings.Split(out[i:], "\n") {
		if m := h2specSection.FindStringSubmatch(line); m != nil {
			section = m[1]
		} else if m := h2specFailed.FindStringSubmatch(line); m != nil {
			failed[section+"/"+m[1]] = true
		}
	}
	return failed
}

// TestH2Spec runs every h2spec case against the running process over TLS, plain and strict.
func TestH2Spec(t *testing.T) {
	dir, err := filepath.Abs("../h2/tools") // the pinned h2spec (github.com/summerwind/h2spec)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "h2spec")
	build := exec.Command(goCmd(), "build", "-C", dir, "-o", bin, "github.com/summerwind/h2spec/cmd/h2spec")
	build.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build h2spec: %v\n%s", err, out)
	}
	tg := newTarget(t, nil)
	addr := configtest.Addr(t)
	startFulcrum(t, tlsListeners(tg, map[string]string{"recommended": addr}))
	host, port, _ := strings.Cut(addr, ":")
	for _, mode := range []struct {
		name string
		args []string
	}{{"tls", nil}, {"tls-strict", []string{"-S"}}} {
		t.Run(mode.name, func(t *testing.T) {
			args := append([]string{"-h", host, "-p", port, "-t", "-k", "-o", "5", "-j", filepath.Join(t.TempDir(), "r.xml")}, mode.args...)
			out, _ := exec.Command(bin, args...).CombinedOutput()
			m := h2specSummary.FindSubmatch(out)
			if m == nil {
				t.Fatalf("h2spec printed no summary:\n%s", out)
			}
			failed := h2specFailures(string(out))
			if n := fmt.Sprint(len(failed)); n != string(m[4]) {
				t.Errorf("h2spec reports %s failures, the suite parsed %s: %v", m[4], n, failed)
			}
			for id := range failed {
				if !h2specAllowed[id] {
					t.Errorf("h2spec %s fails and is not allowlisted", id)
				}
			}
			for id := range h2specAllowed {
				if !failed[id] {
					t.Errorf("h2spec %s passes now: remove it from h2specAllowed", id)
				}
			}
			if t.Failed() {
				t.Logf("%s", out)
			}
			t.Logf("h2spec %s: %s", mode.name, m[0])
		})
	}
}

// testsslFinding is one finding of testssl.sh's flat JSON.
type testsslFinding struct {
	ID       string `json:"id"`
	Severity string `json:"severity"`
	Finding  string `json:"finding"`
}

// testsslIgnored are findings that are true of any private-CA test setup, not of Fulcrum.
var testsslIgnored = regexp.MustCompile(`^(cert_chain_of_trust|cert_trust|cert_crlDistributionPoints|cert_ocspURL|OCSP_stapling|cert_caaRecord|DNS_CAArecord|cert_mustStapleExtension|cert_extlifeSpan|cert_certificateTransparency|cert_revocation|intermediate_cert_badOCSP|HSTS|HPKP|security_headers|banner_.*|cookie_.*|scanProblem|engine_problem)`)

// testsslChecks: protocols, cipher categories, forward secrecy, server defaults (certificate,
// expiry, session tickets) and the vulnerability checks; no per-cipher enumeration.
var testsslChecks = strings.Fields(os.Getenv("TESTSSL_CHECKS") + " -p -s -f -S -U")

// TestTestssl scans every named TLS policy with testssl.sh and fails on MEDIUM or worse.
//
// The three scans run in parallel, about a minute in all: testssl's socket probes send a partial
// handshake and wait for the server to give up, so the listeners' handshake budget is 1 s (with
// the default 10 s, a scan took 1.5-2.5 minutes and -S seemed to stall).
func TestTestssl(t *testing.T) {
	bin := tool(t, "testssl")
	tg := newTarget(t, nil)
	addrs := map[string]string{"recommended": configtest.Addr(t), "tls13": configtest.Addr(t), "compatible": configtest.Addr(t)}
	p := startFulcrum(t, tlsListeners(tg, addrs))
	ca := filepath.Join(p.dir, "state", "authorities", "ca.pem")
	if _, err := os.Stat(ca); err != nil {
		t.Fatalf("authority certificate: %v", err)
	}
	for _, policy := range []string{"recommended", "tls13", "compatible"} {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			out := filepath.Join(t.TempDir(), "r.json")
			// Protocols, cipher categories, forward secrecy, server defaults (certificate,
			// tickets) and the classic vulnerabilities; no per-cipher enumeration, no DNS, no
			// phone-home: tens of seconds per listener.
			args := append([]string{"--quiet", "--color", "0", "--warnings", "off", "--nodns", "none", "--sneaky", "--openssl-timeout", "10", "--ssl-native"}, testsslChecks...)
			args = append(args, "--add-ca", ca, "--jsonfile", out, "https://"+addrs[policy])
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, args...)
			cmd.WaitDelay = 5 * time.Second
			cmd.Env = append(os.Environ(), "TERM=dumb")
			raw, err := cmd.CombinedOutput()
			b, rerr := os.ReadFile(out)
			if rerr != nil {
				t.Fatalf("testssl wrote no JSON (%v): %v\n%s", err, rerr, tail(string(raw), 3000))
			}
			var findings []testsslFinding
			if jerr := json.Unmarshal(b, &findings); jerr != nil {
				err := jerr
				t.Fatalf("testssl JSON after %v ): %v\n%s", time.Since(start), err, tail(string(raw), 3000))
			}
			bad := 0
			for _, f := range findings {
				switch f.Severity {
				case "MEDIUM", "HIGH", "CRITICAL":
					if testsslIgnored.MatchString(f.ID) {
						continue
					}
					bad++
					t.Errorf("testssl %s: %s %s", f.ID, f.Severity, f.Finding)
				}
			}
			t.Logf("testssl %s: %d findings, %d MEDIUM or worse, %v", policy, len(findings), bad, time.Since(start).Round(time.Second))
		})
	}
}

func TestH2specFailuresParse(t *testing.T) {
	out := "Failures: \n\nHypertext Transfer Protocol Version 2 (HTTP/2)\n  4. HTTP Frames\n    4.2. Frame Size\n      × 3: Sends a large size HEADERS frame\n  6. Frame Definitions\n    6.5. SETTINGS\n      6.5.3. Settings Synchronization\n        × 1: Sends multiple values\n"
	got := h2specFailures(out)
	if len(got) != 2 || !got["4.2/3"] || !got["6.5.3/1"] {
		t.Fatalf("parsed %v", got)
	}
}
