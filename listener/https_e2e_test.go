package listener

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"golang.org/x/net/http2/hpack"

	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener/h2"
)

// l7PKI is the head of a TLS test configuration: an authority in the software keystore and two
// certificates it issues. "www" is listed first on listeners, so it is the SNI default.
func l7PKI(dir string) string {
	return header(dir) + `
[[authorities]]
name = "internal"
common_name = "Fulcrum Test CA"
key_type = "ecdsa-p256"

[[certificates]]
name = "www"
domains = ["www.example.test"]
authority = "internal"
key_type = "ecdsa-p256"

[[certificates]]
name = "api"
domains = ["api.example.test", "*.api.example.test"]
authority = "internal"
key_type = "ecdsa-p256"
`
}

// l7CAPool trusts the authority the way a user would: through the CA certificate the certificate
// manager writes to state_dir/authorities/NAME.pem.
func l7CAPool(t testing.TB, dir, name string) (*x509.CertPool, string) {
	t.Helper()
	path := filepath.Join(dir, "authorities", name+".pem")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("authority certificate: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		t.Fatalf("%s holds no certificate", path)
	}
	return pool, path
}

// l7TLSClient is an HTTPS client that dials addr whatever the URL's host (so URLs can carry real
// server names for SNI and verification) and offers h2 when h2 is set.
func l7TLSClient(addr string, pool *x509.CertPool, h2 bool) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		},
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func l7Decode(t testing.TB, resp *http.Response) echoReply {
	t.Helper()
	defer resp.Body.Close()
	var rep struct {
		echoReply
		Proto string `json:"proto"`
		TLS   bool   `json:"tls"`
	}
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("echo reply %d %q: %v", resp.StatusCode, b, err)
	}
	rep.echoReply.Headers = rep.Headers
	if rep.echoReply.Headers == nil {
		rep.echoReply.Headers = map[string][]string{}
	}
	rep.echoReply.Headers[":proto"] = []string{rep.Proto}
	rep.echoReply.Headers[":tls"] = []string{fmt.Sprint(rep.TLS)}
	return rep.echoReply
}

// TestHTTPSListeners: an application https listener negotiates h2 or http/1.1 by ALPN, a
// classic https listener speaks HTTP/1.1 only, SNI picks among the listener's certificates, and
// clients trust them through the authority's CA certificate (Go, curl and openssl as peers).
func TestHTTPSListeners(t *testing.T) {
	dir := t.TempDir()
	be := backend(t, "be")
	app, classic := configtest.Addr(t), configtest.Addr(t)
	cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]

[[listeners]]
name = "app"
style = "application"
protocol = "https"
address = %q
certificates = ["www", "api"]
default_action = { forward = "web" }

[[listeners]]
name = "classic"
style = "classic"
protocol = "https"
address = %q
certificates = ["www"]
backend_protocol = "http"
instances = [%q]
`, hostOf(be), app, classic, hostOf(be)))
	startRuntime(t, cfg, nil)
	pool, caPath := l7CAPool(t, dir, "internal")

	t.Run("application h2 by ALPN", func(t *testing.T) {
		resp, err := l7TLSClient(app, pool, true).Get("https://www.example.test/h2")
		if err != nil {
			t.Fatal(err)
		}
		if resp.ProtoMajor != 2 || resp.TLS.NegotiatedProtocol != "h2" {
			t.Fatalf("proto %s, ALPN %q; want HTTP/2 by ALPN h2", resp.Proto, resp.TLS.NegotiatedProtocol)
		}
		rep := l7Decode(t, resp)
		if rep.header("X-Forwarded-Proto") != "https" || rep.header(":proto") != "HTTP/1.1" {
			t.Fatalf("target saw X-Forwarded-Proto %q over %q; want https over HTTP/1.1 (http2 is off on the group)",
				rep.header("X-Forwarded-Proto"), rep.header(":proto"))
		}
	})
	t.Run("application http/1.1", func(t *testing.T) {
		resp, err := l7TLSClient(app, pool, false).Get("https://www.example.test/h1")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 1 || resp.StatusCode != 200 {
			t.Fatalf("got %d %s, want 200 HTTP/1.1", resp.StatusCode, resp.Proto)
		}
	})
	t.Run("classic is HTTP/1.1 only", func(t *testing.T) {
		resp, err := l7TLSClient(classic, pool, true).Get("https://www.example.test/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 1 || resp.TLS.NegotiatedProtocol == "h2" || resp.StatusCode != 200 {
			t.Fatalf("got %d %s ALPN %q, want 200 HTTP/1.1", resp.StatusCode, resp.Proto, resp.TLS.NegotiatedProtocol)
		}
		// A client that offers only h2 must not get it.
		c, err := tls.Dial("tcp", classic, &tls.Config{RootCAs: pool, ServerName: "www.example.test", NextProtos: []string{"h2"}})
		if err == nil {
			defer c.Close()
			if p := c.ConnectionState().NegotiatedProtocol; p == "h2" {
				t.Fatal("classic https listener negotiated h2")
			}
		}
	})
	t.Run("SNI", func(t *testing.T) {
		cases := []struct{ name, sni, want string }{
			{"exact", "www.example.test", "www.example.test"},
			{"second certificate", "api.example.test", "api.example.test"},
			{"wildcard", "eu.api.example.test", "api.example.test"},
			{"unknown name gets the first", "other.example.test", "www.example.test"},
			{"no SNI gets the first", "", "www.example.test"},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				var leaf *x509.Certificate
				conf := &tls.Config{
					ServerName:         tc.sni,
					InsecureSkipVerify: true, // verified below against the CA, ignoring the name
					VerifyConnection: func(cs tls.ConnectionState) error {
						leaf = cs.PeerCertificates[0]
						_, err := leaf.Verify(x509.VerifyOptions{Roots: pool})
						return err
					},
				}
				c, err := tls.Dial("tcp", app, conf)
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
				if len(leaf.DNSNames) == 0 || leaf.DNSNames[0] != tc.want {
					t.Fatalf("SNI %q got certificate for %v, want %s", tc.sni, leaf.DNSNames, tc.want)
				}
			})
		}
	})
	t.Run("curl", func(t *testing.T) {
		if _, err := exec.LookPath("curl"); err != nil {
			t.Skip("curl not installed")
		}
		_, port, _ := net.SplitHostPort(app)
		for _, proto := range []string{"--http2", "--http1.1"} {
			out, err := exec.Command("curl", "-sS", "--max-time", "10", proto, "--cacert", caPath,
				"--resolve", "api.example.test:"+port+":127.0.0.1",
				"-o", "/dev/null", "-w", "%{http_version} %{http_code}",
				"https://api.example.test:"+port+"/curl").CombinedOutput()
			want := map[string]string{"--http2": "2 200", "--http1.1": "1.1 200"}[proto]
			if err != nil || string(out) != want {
				t.Fatalf("curl %s: %q, %v; want %q", proto, out, err, want)
			}
		}
	})
	t.Run("openssl", func(t *testing.T) {
		if _, err := exec.LookPath("openssl"); err != nil {
			t.Skip("openssl not installed")
		}
		run := func(version string) (string, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, "openssl", "s_client", version, "-connect", app,
				"-servername", "www.example.test", "-CAfile", caPath, "-verify_return_error", "-brief")
			cmd.Stdin = strings.NewReader("")
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		out, err := run("-tls1_2")
		if err != nil || !strings.Contains(out, "Verification: OK") || !strings.Contains(out, "TLSv1.2") {
			t.Fatalf("openssl -tls1_2: %v\n%s", err, out)
		}
		// The recommended policy is TLS 1.2+; a TLS 1.1 hello is refused.
		if out, err := run("-tls1_1"); err == nil && strings.Contains(out, "Verification: OK") {
			t.Fatalf("TLS 1.1 handshake succeeded under the recommended policy:\n%s", out)
		}
	})
}

// l7TLSBackend serves h with TLS (h2 and http/1.1 by ALPN) whose certificate is chosen on each
// handshake by cert, so a test can issue it after the runtime has created the authority.
func l7TLSBackend(t testing.TB, h http.Handler, cert *atomic.Pointer[tls.Certificate]) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:  h,
		ErrorLog: discardLog,
		TLSConfig: &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			if c := cert.Load(); c != nil {
				return c, nil
			}
			return nil, fmt.Errorf("no certificate yet")
		}},
	}
	done := make(chan struct{})
	go func() { defer close(done); srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { srv.Close(); <-done })
	return ln.Addr().String()
}

// l7Issue issues a server certificate for names from the runtime's authority (the key is the
// test's: the target is not Fulcrum's).
func l7Issue(t testing.TB, rt *Runtime, authority string, names ...string) *tls.Certificate {
	t.Helper()
	a := rt.Certs().Authority(authority)
	if a == nil {
		t.Fatalf("authority %q not loaded", authority)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := a.Sign(key.Public(), names, time.Hour, certs.UsageServer)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestBackendProtocols: https target groups verify targets against the authority (502 for a
// target it did not issue), http2 on an https group negotiates h2, and http2 on an http group
// speaks h2c.
func TestBackendProtocols(t *testing.T) {
	dir := t.TempDir()
	var cert atomic.Pointer[tls.Certificate]
	trusted := l7TLSBackend(t, echo.Handler("trusted"), &cert)
	untrusted := httptest.NewTLSServer(echo.Handler("untrusted")) // httptest's own CA
	t.Cleanup(untrusted.Close)
	h2cSrv := httptest.NewServer(h2c.NewHandler(echo.Handler("h2c"), &http2.Server{}))
	t.Cleanup(h2cSrv.Close)
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "secure"
protocol = "https"
targets = [%[1]q]
tls = { server_name = "backend.internal", authority = "internal" }
health_check = { disabled = true }

[[target_groups]]
name = "secure-h2"
protocol = "https"
http2 = true
targets = [%[1]q]
tls = { server_name = "backend.internal", authority = "internal" }
health_check = { disabled = true }

[[target_groups]]
name = "untrusted"
protocol = "https"
targets = [%[2]q]
tls = { server_name = "example.com", authority = "internal" }
health_check = { disabled = true }

[[target_groups]]
name = "h2c"
protocol = "http"
http2 = true
targets = [%[3]q]

[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %[4]q
default_action = { forward = "secure" }
[[listeners.rules]]
priority = 1
paths = ["/h2/*"]
forward = "secure-h2"
[[listeners.rules]]
priority = 2
paths = ["/untrusted/*"]
forward = "untrusted"
[[listeners.rules]]
priority = 3
paths = ["/h2c/*"]
forward = "h2c"
`, trusted, strings.TrimPrefix(untrusted.URL, "https://"), hostOf(h2cSrv), addr))
	rt := startRuntime(t, cfg, nil)
	cert.Store(l7Issue(t, rt, "internal", "backend.internal"))
	c := clientFrom("127.0.0.1")

	check := func(t *testing.T, path string, status int, proto string, tlsOn bool) {
		t.Helper()
		resp, err := c.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != status {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			t.Fatalf("GET %s: %d %q, want %d", path, resp.StatusCode, b, status)
		}
		if status != 200 {
			resp.Body.Close()
			return
		}
		rep := l7Decode(t, resp)
		if rep.header(":proto") != proto || rep.header(":tls") != fmt.Sprint(tlsOn) {
			t.Fatalf("GET %s: target saw %s tls=%s, want %s tls=%v", path, rep.header(":proto"), rep.header(":tls"), proto, tlsOn)
		}
	}
	t.Run("re-encryption verified by the authority", func(t *testing.T) { check(t, "/", 200, "HTTP/1.1", true) })
	t.Run("h2 to an https target", func(t *testing.T) { check(t, "/h2/x", 200, "HTTP/2.0", true) })
	t.Run("untrusted target is 502", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			check(t, "/untrusted/x", http.StatusBadGateway, "", false)
		}
	})
	t.Run("h2c", func(t *testing.T) { check(t, "/h2c/x", 200, "HTTP/2.0", false) })
}

// l7H2Conn opens a raw HTTP/2 connection (TLS, ALPN h2) and completes the preface.
func l7H2Conn(t testing.TB, addr string, pool *x509.CertPool) (*tls.Conn, *http2.Framer) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "www.example.test", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q, want h2", p)
	}
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return c, fr
}

// TestHTTP2RapidReset: a client that opens streams and resets them at once (CVE-2023-44487)
// must not get more requests running at the back end than one connection's stream limit.
func TestHTTP2RapidReset(t *testing.T) {
	dir := t.TempDir()
	var cur, peak, hits, curHeld, peakHeld atomic.Int64
	release := make(chan struct{})
	be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		n := cur.Add(1)
		defer cur.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		if r.URL.Path == "/held" { // second phase, counted apart from stragglers of the first
			n := curHeld.Add(1)
			defer curHeld.Add(-1)
			for p := peakHeld.Load(); n > p && !peakHeld.CompareAndSwap(p, n); p = peakHeld.Load() {
			}
		}
		select { // hold the request as a slow application would, until the proxy gives up
		case <-r.Context().Done():
		case <-release:
		case <-time.After(5 * time.Second):
		}
	}))
	t.Cleanup(be.Close)
	t.Cleanup(func() { close(release) })
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "app"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "web" }
`, hostOf(be), addr))
	startRuntime(t, cfg, nil)
	pool, _ := l7CAPool(t, dir, "internal")
	c, fr := l7H2Conn(t, addr, pool)
	defer c.Close()

	// Read (and discard) frames so the server never blocks writing to us; note GOAWAY.
	var goaway atomic.Bool
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			if _, ok := f.(*http2.GoAwayFrame); ok {
				goaway.Store(true)
			}
		}
	}()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	const streams = 3000
	var wmu sync.Mutex
	sent := 0
	for i := 0; i < streams; i++ {
		id := uint32(2*i + 1)
		hb.Reset()
		for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":authority", "www.example.test"}, {":path", "/"}} {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		wmu.Lock()
		err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true})
		if err == nil {
			err = fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}
		wmu.Unlock()
		if err != nil {
			break // the server gave up on us (GOAWAY / close): that is a fine answer
		}
		sent++
	}
	// Let the back end see whatever got through, then check the peak. Requests that reached it
	// are held until the proxy cancels them, so the peak is the proxy's concurrency.
	time.Sleep(500 * time.Millisecond) // nothing to wait on: we measure what arrives in a window
	c.Close()
	<-readDone
	const limit = h2.DefaultMaxConcurrentStreams // SETTINGS_MAX_CONCURRENT_STREAMS of the listener
	t.Logf("sent %d HEADERS+RST_STREAM pairs; back end: %d requests, peak %d concurrent; GOAWAY=%v", sent, hits.Load(), peak.Load(), goaway.Load())
	if p := peak.Load(); p > limit {
		t.Fatalf("back end saw %d concurrent requests from one connection, want <= %d", p, limit)
	}

	// The limit itself: 400 streams held open on one connection get at most the limit running.
	c2, fr2 := l7H2Conn(t, addr, pool)
	defer c2.Close()
	go func() {
		for {
			if _, err := fr2.ReadFrame(); err != nil {
				return
			}
		}
	}()
	enc = hpack.NewEncoder(&hb) // header compression state is per connection
	for i := 0; i < 400; i++ {
		hb.Reset()
		for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":authority", "www.example.test"}, {":path", "/held"}} {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		if err := fr2.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
			break
		}
	}
	configtest.WaitFor(t, 10*time.Second, "the back end to hold the limit of streams", func() bool { return curHeld.Load() >= limit })
	time.Sleep(200 * time.Millisecond) // would more arrive? nothing to wait on
	t.Logf("held streams: peak %d concurrent at the back end", peakHeld.Load())
	if p := peakHeld.Load(); p > limit {
		t.Fatalf("back end saw %d concurrent requests from one connection, want <= %d", p, limit)
	}
}
