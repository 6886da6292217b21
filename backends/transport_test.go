package backends

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

func protoEcho() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, r.Proto)
	})
}

func tlsServer(t *testing.T, p *testPKI, h2 bool) *httptest.Server {
	srv := httptest.NewUnstartedServer(protoEcho())
	srv.TLS = p.serverTLS()
	srv.EnableHTTP2 = h2
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // expected handshake failures
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func get(t *testing.T, g *Group, target *Target, scheme string) (string, error) {
	t.Helper()
	req, _ := http.NewRequest("GET", scheme+"://"+target.Addr()+"/", nil)
	resp, err := g.Transport().RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func httpsGroup(address string, bt *configs.BackendTLS, h2 bool) configs.TargetGroup {
	return configs.TargetGroup{Name: "secure", Protocol: "https", HTTP2: h2, TLS: bt,
		HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets:     []configs.Target{{Address: address, Weight: 1}}}
}

func TestHTTPSVerification(t *testing.T) {
	p := newPKI(t)
	wrong := newPKI(t)
	srv := tlsServer(t, p, false)
	address := srv.Listener.Addr().String()
	tests := []struct {
		name string
		tls  *configs.BackendTLS
		ok   bool
	}{
		{"ca file", &configs.BackendTLS{CAFile: p.caFile}, true},
		{"ca file and server name", &configs.BackendTLS{CAFile: p.caFile, ServerName: "backend.test"}, true},
		{"ca file wrong server name", &configs.BackendTLS{CAFile: p.caFile, ServerName: "other.test"}, false},
		{"wrong ca", &configs.BackendTLS{CAFile: wrong.caFile}, false},
		{"system roots", nil, false},
		{"leaf pin", &configs.BackendTLS{PinPublicKeys: []string{wrong.leafPin, p.leafPin}}, true},
		{"wrong pin", &configs.BackendTLS{PinPublicKeys: []string{wrong.leafPin}}, false},
		{"ca pin alone does not pin the leaf", &configs.BackendTLS{PinPublicKeys: []string{p.caPin}}, false},
		{"ca file and ca pin", &configs.BackendTLS{CAFile: p.caFile, PinPublicKeys: []string{p.caPin}}, true},
		{"ca file and wrong pin", &configs.BackendTLS{CAFile: p.caFile, PinPublicKeys: []string{wrong.caPin}}, false},
		{"insecure", &configs.BackendTLS{InsecureSkipVerify: true}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newReg(t)
			g := build(t, r, conf(httpsGroup(address, tc.tls, false))).Group("secure")
			body, err := get(t, g, g.Targets()[0], "https")
			if tc.ok && (err != nil || body != "HTTP/1.1") {
				t.Fatalf("want success: body %q err %v", body, err)
			}
			if !tc.ok && err == nil {
				t.Fatal("want a verification failure")
			}
		})
	}
}

func TestBadTLSConfig(t *testing.T) {
	r := newReg(t)
	if _, err := r.Build(conf(httpsGroup("127.0.0.1:1", &configs.BackendTLS{CAFile: "/nonexistent/ca.pem"}, false)), nil); err == nil {
		t.Error("a missing ca_file was accepted")
	}
}

// fixedProvider is a certificate manager with one authority and no client certificates.
type fixedProvider struct{ ca *x509.Certificate }

func (f fixedProvider) AuthorityCert(string) (*x509.Certificate, error) { return f.ca, nil }
func (f fixedProvider) ClientCertificate(name string) (func(*tls.CertificateRequestInfo) (*tls.Certificate, error), error) {
	return nil, errors.New("no client certificates here")
}

func TestTLSProviderAndTransportReuse(t *testing.T) {
	p := newPKI(t)
	srv := tlsServer(t, p, false)
	r := newReg(t)
	gc := httpsGroup(srv.Listener.Addr().String(), &configs.BackendTLS{Authority: "internal"}, false)
	withAuthority := func(gc configs.TargetGroup) *configs.Config {
		c, err := configtest.Load("", configs.Config{Authorities: []configs.Authority{{Name: "internal"}}, TargetGroups: []configs.TargetGroup{gc}})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	s1, err := r.Build(withAuthority(gc), fixedProvider{p.ca})
	if err != nil {
		t.Fatal(err)
	}
	if body, err := get(t, s1.Group("secure"), s1.Group("secure").Targets()[0], "https"); err != nil || body != "HTTP/1.1" {
		t.Fatalf("authority TLS: %q %v", body, err)
	}
	s2, _ := r.Build(withAuthority(gc), fixedProvider{p.ca})
	if s1.Group("secure").Transport() != s2.Group("secure").Transport() {
		t.Error("same authority: transport not reused")
	}
	s3, _ := r.Build(withAuthority(gc), fixedProvider{newPKI(t).ca})
	if s3.Group("secure").Transport() == s2.Group("secure").Transport() {
		t.Error("new authority certificate: transport reused")
	}
	gc.MaxIdleConns = 7
	s4, _ := r.Build(withAuthority(gc), fixedProvider{p.ca})
	if s4.Group("secure").Transport() == s2.Group("secure").Transport() {
		t.Error("changed max_idle_conns: transport reused")
	}
	if got := s4.Group("secure").Transport().(*h1Transport).maxIdle; got != 7 {
		t.Errorf("MaxIdleConnsPerHost %d", got)
	}
}

func TestH2C(t *testing.T) {
	srv := httptest.NewServer(h2c.NewHandler(protoEcho(), &http2.Server{}))
	defer srv.Close()
	r := newReg(t)
	gc := configs.TargetGroup{Name: "grpc", Protocol: "http", HTTP2: true,
		HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets:     []configs.Target{{Address: srv.Listener.Addr().String(), Weight: 1}}}
	g := build(t, r, conf(gc)).Group("grpc")
	for range 3 {
		body, err := get(t, g, g.Targets()[0], "http")
		if err != nil || body != "HTTP/2.0" {
			t.Fatalf("h2c: %q %v", body, err)
		}
	}
	// Without http2 the same server is spoken to in HTTP/1.1.
	gc.HTTP2 = false
	g1 := build(t, r, conf(gc)).Group("grpc")
	if body, err := get(t, g1, g1.Targets()[0], "http"); err != nil || body != "HTTP/1.1" {
		t.Fatalf("http1: %q %v", body, err)
	}
}

func TestHTTPSWithALPNH2(t *testing.T) {
	p := newPKI(t)
	srv := tlsServer(t, p, true)
	for _, tc := range []struct {
		h2   bool
		want string
	}{{true, "HTTP/2.0"}, {false, "HTTP/1.1"}} {
		r := newReg(t)
		g := build(t, r, conf(httpsGroup(srv.Listener.Addr().String(), &configs.BackendTLS{CAFile: p.caFile}, tc.h2))).Group("secure")
		if body, err := get(t, g, g.Targets()[0], "https"); err != nil || body != tc.want {
			t.Errorf("http2=%v: %q %v", tc.h2, body, err)
		}
	}
}

func TestResponseTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	r := newReg(t)
	gc := configs.TargetGroup{Name: "slow", Protocol: "http", ResponseTimeout: "50ms",
		HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets:     []configs.Target{{Address: srv.Listener.Addr().String(), Weight: 1}}}
	g := build(t, r, conf(gc)).Group("slow")
	start := time.Now()
	_, err := get(t, g, g.Targets()[0], "http")
	var te interface{ Timeout() bool }
	if err == nil || !errors.As(err, &te) || !te.Timeout() {
		t.Fatalf("want a timeout error, got %v", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("timeout took %v", el)
	}
}

func TestHTTPSHealthCheckUsesGroupTLS(t *testing.T) {
	p := newPKI(t)
	srv := tlsServer(t, p, false)
	wrong := newPKI(t)
	for _, tc := range []struct {
		name    string
		caFile  string
		healthy bool
	}{{"right ca", p.caFile, true}, {"wrong ca", wrong.caFile, false}} {
		t.Run(tc.name, func(t *testing.T) {
			r := newReg(t)
			gc := httpsGroup(srv.Listener.Addr().String(), &configs.BackendTLS{CAFile: tc.caFile}, false)
			// The timeout is far above any handshake a loaded machine under -race takes, and one
			// check decides (thresholds 1): the test waits for that verdict, so what it asserts
			// is the verification outcome, never whether the check was fast enough.
			gc.HealthCheck = &configs.HealthCheck{Path: "/", Interval: "20s", Timeout: "10s", HealthyThreshold: 1, UnhealthyThreshold: 1}
			g := build(t, r, conf(gc)).Group("secure")
			tg := g.Targets()[0]
			configtest.WaitFor(t, 15*time.Second, "the first check's verdict", func() bool { return !tg.Status().Initial })
			st := tg.Status()
			if tc.healthy {
				if !st.Healthy || st.Reason != "" {
					t.Fatalf("with the group's CA: healthy %v, reason %q", st.Healthy, st.Reason)
				}
				return
			}
			if st.Healthy || !strings.Contains(st.Reason, "certificate") {
				t.Errorf("with another CA: healthy %v, reason %q; want down for the certificate", st.Healthy, st.Reason)
			}
		})
	}
}
