package listener

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

// echoFrom sends req with c and decodes what the echo back end saw.
func echoFrom(t *testing.T, c *http.Client, req *http.Request) echoReply {
	t.Helper()
	status, _, body := get(t, c, req)
	if status != 200 {
		t.Fatalf("%s %s: status %d: %s", req.Method, req.URL, status, body)
	}
	var r echoReply
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatalf("echo reply %q: %v", body, err)
	}
	return r
}

// parseChainHeader decodes X-Amzn-Mtls-Clientcert: URL-encoded PEM certificates.
func parseChainHeader(t *testing.T, v string) []*x509.Certificate {
	t.Helper()
	s, err := url.PathUnescape(v)
	if err != nil {
		t.Fatalf("chain header %q: %v", v, err)
	}
	var out []*x509.Certificate
	for rest := []byte(s); ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			return out
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatalf("chain header certificate: %v", err)
		}
		out = append(out, c)
	}
}

// TestClientCertHeaders: client_auth passthrough sends the client's whole chain, unverified, in
// X-Amzn-Mtls-Clientcert; verify sends the verified leaf and its details; a client can never
// supply these headers itself (unless its peer is a trusted proxy), over HTTP/1.1 or HTTP/2.
func TestClientCertHeaders(t *testing.T) {
	dir := t.TempDir()
	be := backend(t, "be")
	// A group that speaks HTTP/2 to its targets takes another forwarding path; the fields must
	// reach it too.
	beH2C := httptest.NewServer(h2c.NewHandler(echo.Handler("be-h2c"), &http2.Server{}))
	t.Cleanup(beH2C.Close)
	passAddr, verAddr, plainAddr := configtest.Addr(t), configtest.Addr(t), configtest.Addr(t)
	rt := startRuntime(t, loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[authorities]]
name = "internal"
common_name = "Header Test CA"

[[certificates]]
name = "site"
domains = ["site.example.test"]
authority = "internal"

[[target_groups]]
name = "be"
protocol = "http"
targets = [%[1]q]
health_check = { disabled = true }

[[target_groups]]
name = "be-h2c"
protocol = "http"
http2 = true
targets = [%[5]q]
health_check = { disabled = true }

[[listeners]]
name = "pass"
style = "application"
protocol = "https"
address = %[2]q
certificates = ["site"]
client_auth = { mode = "passthrough" }
default_action = { forward = "be" }
[[listeners.rules]]
priority = 1
paths = ["/h2c/*"]
forward = "be-h2c"

[[listeners]]
name = "verify"
style = "application"
protocol = "https"
address = %[3]q
certificates = ["site"]
client_auth = { mode = "verify", authority = "internal" }
default_action = { forward = "be" }

[[listeners]]
name = "plain"
style = "application"
protocol = "http"
address = %[4]q
trusted_proxies = ["127.0.0.2/32"]
default_action = { forward = "be" }
`, hostOf(be), passAddr, verAddr, plainAddr, hostOf(beH2C))), nil)
	roots := rt.Certs().Authority("internal").Pool()
	issued := authorityLeaf(t, rt, "internal", certs.UsageClient, "client.example.test")
	// A certificate from an authority Fulcrum does not know, sent with its CA: a chain of two.
	strangerCA := configtest.NewCA(t, "Stranger CA")
	stranger := leaf(t, strangerCA, "stranger.example.test")

	client := func(cert *tls.Certificate, h2 bool) *http.Client {
		tc := &tls.Config{RootCAs: roots, ServerName: "site.example.test"}
		if cert != nil {
			tc.Certificates = []tls.Certificate{*cert}
		}
		tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: h2}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{} // HTTP/1.1 only
		}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 10 * time.Second}
	}
	spoofed := func(t *testing.T, url string) *http.Request {
		req := newReq(t, "GET", url)
		req.Header.Set(mtlsChain, "forged")
		req.Header.Set(mtlsSubject, "CN=admin")
		return req
	}

	for _, h2 := range []bool{false, true} {
		proto := map[bool]string{false: "http1", true: "h2"}[h2]
		t.Run("passthrough/"+proto, func(t *testing.T) {
			for name, cert := range map[string]*tls.Certificate{"issued": issued, "unknown-ca": stranger} {
				for _, path := range []string{"/", "/h2c/x"} { // an HTTP/1.1 group, an HTTP/2 one
					r := echoFrom(t, client(cert, h2), spoofed(t, "https://"+passAddr+path))
					chain := parseChainHeader(t, r.header(mtlsChain))
					if len(chain) != len(cert.Certificate) || string(chain[0].Raw) != string(cert.Certificate[0]) {
						t.Fatalf("%s %s: target got %d certificates, want the client's %d (leaf first)", name, path, len(chain), len(cert.Certificate))
					}
					if r.header(mtlsSubject) != "" {
						t.Fatalf("%s %s: a client-supplied %s reached the target", name, path, mtlsSubject)
					}
				}
			}
			// No certificate: no header, and the forged one is gone.
			if r := echoFrom(t, client(nil, h2), spoofed(t, "https://"+passAddr+"/")); r.header(mtlsChain) != "" {
				t.Fatalf("without a client certificate the target got %s = %q", mtlsChain, r.header(mtlsChain))
			}
		})
		t.Run("verify/"+proto, func(t *testing.T) {
			r := echoFrom(t, client(issued, h2), spoofed(t, "https://"+verAddr+"/"))
			leaf, _ := x509.ParseCertificate(issued.Certificate[0])
			want := map[string]string{
				mtlsSerial:   strings.ToUpper(leaf.SerialNumber.Text(16)),
				mtlsSubject:  leaf.Subject.String(),
				mtlsIssuer:   leaf.Issuer.String(), // the authority: CN=Header Test CA,O=Fulcrum
				mtlsValidity: "NotBefore=" + leaf.NotBefore.UTC().Format(time.RFC3339) + ";NotAfter=" + leaf.NotAfter.UTC().Format(time.RFC3339),
			}
			for k, v := range want {
				if got := r.header(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if got := parseChainHeader(t, r.header(mtlsLeaf)); len(got) != 1 || !got[0].Equal(leaf) {
				t.Errorf("%s does not carry the client's leaf", mtlsLeaf)
			}
			if r.header(mtlsChain) != "" {
				t.Errorf("verify mode passed a client-supplied %s", mtlsChain)
			}
			// The listener refuses a certificate its authority did not issue.
			if _, err := client(stranger, h2).Get("https://" + verAddr + "/"); err == nil {
				t.Error("verify mode accepted a client certificate from an unknown authority")
			}
		})
	}
	t.Run("plain/untrusted-peer", func(t *testing.T) {
		if r := echoFrom(t, clientFrom("127.0.0.1"), spoofed(t, "http://"+plainAddr+"/")); r.header(mtlsChain) != "" || r.header(mtlsSubject) != "" {
			t.Fatalf("client-supplied certificate headers reached the target: %v", r.Headers)
		}
	})
	t.Run("plain/trusted-peer", func(t *testing.T) {
		// A trusted proxy in front (which terminated TLS itself) may pass them on.
		if r := echoFrom(t, clientFrom("127.0.0.2"), spoofed(t, "http://"+plainAddr+"/")); r.header(mtlsChain) != "forged" {
			t.Fatalf("a trusted proxy's %s was not passed on: %v", mtlsChain, r.Headers)
		}
	})
}

// TestDropInvalidHeaderFields: with drop_invalid_header_fields, header names other than letters,
// digits and hyphens never reach the target (X_Forwarded_For is read as X-Forwarded-For by some
// servers); without it they are forwarded, as ALB does by default.
func TestDropInvalidHeaderFields(t *testing.T) {
	dir := t.TempDir()
	be := backend(t, "be")
	dropAddr, keepAddr := configtest.Addr(t), configtest.Addr(t)
	startRuntime(t, loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "drop"
style = "application"
protocol = "http"
address = %q
drop_invalid_header_fields = true
default_action = { forward = "be" }

[[listeners]]
name = "keep"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "be" }
`, hostOf(be), dropAddr, keepAddr)), nil)

	invalid := []string{"X_Forwarded_For", "X.Dotted", "X~Tilde", "X!Bang"}
	send := func(addr string) echoReply {
		req := newReq(t, "GET", "http://"+addr+"/")
		for _, k := range invalid {
			req.Header[k] = []string{"6.6.6.6"}
		}
		req.Header.Set("Good-Header-9", "kept")
		return echoFrom(t, clientFrom("127.0.0.1"), req)
	}
	r := send(dropAddr)
	for _, k := range invalid {
		if v := r.header(k); v != "" {
			t.Errorf("drop: %s = %q reached the target", k, v)
		}
	}
	if r.header("Good-Header-9") != "kept" || r.header("X-Forwarded-For") == "" {
		t.Errorf("drop: valid headers lost: %v", r.Headers)
	}
	r = send(keepAddr)
	for _, k := range invalid {
		if v := r.header(k); v != "6.6.6.6" {
			t.Errorf("keep: %s = %q, want it forwarded", k, v)
		}
	}
}

func TestValidHeaderName(t *testing.T) {
	for name, want := range map[string]bool{
		"X-Forwarded-For": true, "abc-123": true, "A": true,
		"": false, "X_Forwarded_For": false, "x.y": false, "a b": false, "é": false, "x:": false,
	} {
		if got := validHeaderName(name); got != want {
			t.Errorf("validHeaderName(%q) = %v, want %v", name, got, want)
		}
	}
}
