package backends

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

func newReg(t testing.TB, opts ...Option) *Registry {
	t.Helper()
	r := NewRegistry(nil, opts...)
	t.Cleanup(r.Close)
	return r
}

// fakeClock makes time explicit in tests of slow start and ejection.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() int64              { return c.ns.Load() }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

func withClock(r *Registry, c *fakeClock) { c.ns.Store(int64(time.Hour)); r.clock = c.now }

// conf validates groups the way the binary loads a file (configtest), so backends only ever
// sees validated configuration. It panics on a group that does not validate: tests of
// validation belong to configs.
func conf(groups ...configs.TargetGroup) *configs.Config {
	return configtest.Must("", configs.Config{TargetGroups: groups})
}

// noHC is a group whose targets need no server (Pick never dials).
func noHC(name, alg string, weights ...int) configs.TargetGroup {
	g := configs.TargetGroup{Name: name, Protocol: "http", Algorithm: alg,
		HealthCheck: &configs.HealthCheck{Disabled: true}, DeregistrationDelay: "0s"}
	for i, w := range weights {
		g.Targets = append(g.Targets, configs.Target{Address: net.JoinHostPort("127.0.0.1", itoa(1000+i)), Weight: w})
	}
	return g
}

func itoa(i int) string { return strconv.Itoa(i) }

func build(t testing.TB, r *Registry, c *configs.Config) *Set {
	t.Helper()
	s, err := r.Build(c, nil)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return s
}

func countPicks(g *Group, n int, client func(i int) netip.Addr) map[string]int {
	out := map[string]int{}
	for i := range n {
		var ip netip.Addr
		if client != nil {
			ip = client(i)
		}
		if t := g.Pick(ip, nil); t != nil {
			out[t.Addr()]++
		} else {
			out["<nil>"]++
		}
	}
	return out
}

// testPKI is a CA and a leaf for 127.0.0.1 / backend.test.
type testPKI struct {
	ca      *x509.Certificate
	caPEM   []byte
	caFile  string
	leaf    tls.Certificate
	leafPin string
	caPin   string
}

func newPKI(t testing.TB) *testPKI {
	t.Helper()
	ca := configtest.NewCA(t, "test CA")
	leaf := ca.Issue(t, []string{"backend.test", "127.0.0.1"}, x509.ExtKeyUsageServerAuth)
	return &testPKI{
		ca:      ca.Cert,
		caPEM:   ca.PEM,
		caFile:  ca.WriteCA(t, t.TempDir(), "ca.pem"),
		leaf:    leaf,
		leafPin: pinOf(leaf.Leaf),
		caPin:   pinOf(ca.Cert),
	}
}

func (p *testPKI) serverTLS() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.leaf}, MinVersion: tls.VersionTLS12}
}

func stickinessOf(typ string) *configs.Stickiness { return &configs.Stickiness{Type: typ} }

func (p *testPKI) leafPool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.caPEM)
	return pool
}
