package listener

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// selfSigned is a certificate that is its own issuer, as an ELB Classic back end may present.
func selfSigned(t testing.TB, name string) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

func pinOf(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return "sha256/" + base64.StdEncoding.EncodeToString(sum[:])
}

// TestBackendTLSAuthentication: back-end authentication with pins only (a self-signed target
// whose key matches a pin: ELB Classic), a CA only, and a CA plus pins, for HTTP groups, for
// re-encryption on a network listener and for TLS health checks — one builder for all three.
// A wrong pin fails in each.
func TestBackendTLSAuthentication(t *testing.T) {
	dir := t.TempDir()
	ca := configtest.NewCA(t, "Back-end CA")
	caFile := filepath.Join(dir, "backend-ca.PEM")
	if err := os.WriteFile(caFile, ca.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	self, signed := selfSigned(t, "target.test"), leaf(t, ca, "target.test")
	var selfPtr, signedPtr atomic.Pointer[tls.Certificate]
	selfPtr.Store(self)
	signedPtr.Store(signed)
	httpSelf := l7TLSBackend(t, echo.Handler("self"), &selfPtr)
	httpSigned := l7TLSBackend(t, echo.Handler("signed"), &signedPtr)
	l4Self := tlsEchoBackend(t, "self", &selfPtr)
	l4Signed := tlsEchoBackend(t, "signed", &signedPtr)
	wrongPin := pinOf(selfSigned(t, "target.test").Leaf)

	type tc struct {
		name, tls   string
		http, l4    string // target addresses
		ok          bool
		l7Addr, l4L string
	}
	cases := []*tc{
		{name: "pins-only", tls: fmt.Sprintf(`{ server_name = "target.test", pin_public_keys = [%q] }`, pinOf(self.Leaf)), http: httpSelf, l4: l4Self, ok: true},
		{name: "ca-only", tls: fmt.Sprintf(`{ server_name = "target.test", ca_file = %q }`, caFile), http: httpSigned, l4: l4Signed, ok: true},
		{name: "ca-and-pins", tls: fmt.Sprintf(`{ server_name = "target.test", ca_file = %q, pin_public_keys = [%q, %q] }`, caFile, wrongPin, pinOf(ca.Cert)), http: httpSigned, l4: l4Signed, ok: true},
		{name: "wrong-pin", tls: fmt.Sprintf(`{ server_name = "target.test", pin_public_keys = [%q] }`, wrongPin), http: httpSelf, l4: l4Self},
		{name: "ca-and-wrong-pin", tls: fmt.Sprintf(`{ server_name = "target.test", ca_file = %q, pin_public_keys = [%q] }`, caFile, wrongPin), http: httpSigned, l4: l4Signed},
		{name: "self-signed-ca-only", tls: fmt.Sprintf(`{ server_name = "target.test", ca_file = %q }`, caFile), http: httpSelf, l4: l4Self},
	}
	text := header(dir) + `
[[authorities]]
name = "internal"

[[certificates]]
name = "edge"
domains = ["edge.test"]
authority = "internal"
`
	for _, c := range cases {
		c.l7Addr, c.l4L = configtest.Addr(t), configtest.Addr(t)
		text += fmt.Sprintf(`
[[target_groups]]
name = "h-%[1]s"
protocol = "https"
targets = [%[2]q]
tls = %[3]s
health_check = { protocol = "https", path = "/", interval = "3s", unhealthy_threshold = 1, healthy_threshold = 1 }

[[target_groups]]
name = "t-%[1]s"
protocol = "tls"
targets = [%[4]q]
tls = %[3]s
health_check = { protocol = "tls", interval = "3s", unhealthy_threshold = 1, healthy_threshold = 1 }

[[listeners]]
name = "h-%[1]s"
style = "application"
protocol = "http"
address = %[5]q
default_action = { forward = "h-%[1]s" }

[[listeners]]
name = "t-%[1]s"
style = "network"
protocol = "tls"
certificates = ["edge"]
address = %[6]q
forward = "t-%[1]s"
`, c.name, c.http, c.tls, c.l4, c.l7Addr, c.l4L)
	}
	rt := startRuntime(t, loadConfig(t, dir, text), nil)

	// Health checks run on the same client TLS: every failing group's targets go down.
	status := func(group string) (healthy bool, reason string) {
		for _, ts := range rt.Registry().Targets() {
			for _, g := range ts.Groups {
				if g == group {
					return ts.Healthy, ts.Reason
				}
			}
		}
		t.Fatalf("no target in group %s", group)
		return false, ""
	}
	// A loaded machine may fail a good check now and then (the timeout is half of 3 s): good
	// groups must be healthy at some point, failing ones must go down and stay down.
	for _, c := range cases {
		for _, g := range []string{"h-" + c.name, "t-" + c.name} {
			configtest.WaitFor(t, 20*time.Second, fmt.Sprintf("group %s healthy=%v", g, c.ok), func() bool { h, _ := status(g); return h == c.ok })
		}
	}
	edgeRoots := x509.NewCertPool()
	edgeRoots.AddCert(rt.Certs().Authority("internal").Cert)
	cl := clientFrom("127.0.0.1")
	defer cl.CloseIdleConnections()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, g := range []string{"h-" + c.name, "t-" + c.name} {
				if h, reason := status(g); !c.ok && h {
					t.Errorf("group %s: healthy (%s), want down", g, reason)
				}
			}
			s, who, body := get(t, cl, newReq(t, "GET", "http://"+c.l7Addr+"/"))
			if c.ok && (s != 200 || who == "") {
				t.Errorf("HTTP through %s: %d %q %q", c.name, s, who, body)
			}
			if !c.ok && s < 500 {
				t.Errorf("HTTP through %s: %d, want a 5xx", c.name, s)
			}
			conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", c.l4L,
				&tls.Config{ServerName: "edge.test", RootCAs: edgeRoots})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			fmt.Fprintf(conn, "hello\n")
			line, err := bufio.NewReader(conn).ReadString('\n')
			if c.ok && line == "" {
				t.Errorf("re-encrypted stream through %s: %v", c.name, err)
			}
			if !c.ok && line != "" {
				t.Errorf("re-encrypted stream through %s answered %q", c.name, line)
			}
		})
	}
}
