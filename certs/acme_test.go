package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/mholt/acmez/v3/acme"
	"github.com/miekg/dns"
)

// syncBuffer collects Pebble's log; it is printed only when a test fails. Pebble's VA
// goroutines cannot be stopped and may still log after the test, so never log to t.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testDNS is the test's DNS server, over TCP (how Pebble's VA queries a custom resolver): every
// A question gets 127.0.0.1, so the test domains reach this machine only; it is authoritative
// for fulcrum.test (SOA, TXT) and takes RFC 2136 updates signed with its TSIG key, as a BIND
// primary would for DNS-01.
type testDNS struct {
	addr string

	mu      sync.Mutex
	txt     map[string][]string // by lower-case FQDN
	updates int
}

const (
	testZone       = "fulcrum.test."
	testTSIGKey    = "fulcrum-acme."
	testTSIGSecret = "c2VjcmV0LWtleS1mb3ItZnVsY3J1bS1hY21lLXRlc3Q=" // base64
)

func startDNS(t *testing.T) *testDNS {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &testDNS{addr: ln.Addr().String(), txt: map[string][]string{}}
	srv := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(d.serve), TsigSecret: map[string]string{testTSIGKey: testTSIGSecret},
		MsgAcceptFunc: func(h dns.Header) dns.MsgAcceptAction {
			if op := int(h.Bits>>11) & 0xF; op == dns.OpcodeUpdate {
				return dns.MsgAccept // the default refuses UPDATE (NOTIMP)
			}
			return dns.DefaultMsgAcceptFunc(h)
		}}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	t.Cleanup(func() { srv.Shutdown() })
	return d
}

func (d *testDNS) serve(w dns.ResponseWriter, q *dns.Msg) {
	r := new(dns.Msg)
	r.SetReply(q)
	tsig := q.IsTsig()
	if tsig != nil && w.TsigStatus() != nil {
		r.Rcode = dns.RcodeNotAuth // a bad signature: answered unsigned, as servers do
		w.WriteMsg(r)
		return
	}
	if q.Opcode == dns.OpcodeUpdate {
		if tsig == nil {
			r.Rcode = dns.RcodeRefused
		} else {
			d.apply(q.Ns)
		}
	} else {
		for _, qq := range q.Question {
			name := strings.ToLower(qq.Name)
			switch qq.Qtype {
			case dns.TypeA:
				r.Answer = append(r.Answer, &dns.A{Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeA, Class: dns.ClassINET}, A: net.IPv4(127, 0, 0, 1)})
			case dns.TypeSOA:
				if name == testZone {
					r.Answer = append(r.Answer, &dns.SOA{Hdr: dns.RR_Header{Name: testZone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 60},
						Ns: "ns1." + testZone, Mbox: "hostmaster." + testZone, Serial: 1, Refresh: 60, Retry: 60, Expire: 600, Minttl: 0})
				}
			case dns.TypeTXT:
				d.mu.Lock()
				for _, v := range d.txt[name] {
					r.Answer = append(r.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET}, Txt: []string{v}})
				}
				d.mu.Unlock()
			}
		}
	}
	if tsig != nil {
		r.SetTsig(tsig.Hdr.Name, tsig.Algorithm, 300, time.Now().Unix())
	}
	w.WriteMsg(r)
}

// apply carries out the TXT additions (class IN) and removals of one RR (class NONE).
func (d *testDNS) apply(rrs []dns.RR) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.updates++
	for _, rr := range rrs {
		txt, ok := rr.(*dns.TXT)
		if !ok {
			continue
		}
		name, v := strings.ToLower(txt.Hdr.Name), strings.Join(txt.Txt, "")
		switch txt.Hdr.Class {
		case dns.ClassINET:
			d.txt[name] = append(d.txt[name], v)
		case dns.ClassNONE:
			d.txt[name] = slices.DeleteFunc(d.txt[name], func(x string) bool { return x == v })
			if len(d.txt[name]) == 0 {
				delete(d.txt, name)
			}
		}
	}
}

func (d *testDNS) state() (records, updates int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, vs := range d.txt {
		records += len(vs)
	}
	return records, d.updates
}

// pebble is an in-process Pebble ACME server: its web front end on an httptest TLS server,
// its VA validating for real on the given ports through the test DNS server.
type pebble struct {
	dns    *testDNS
	dirURL string
	caFile string // PEM of the front end's TLS certificate (acme_ca_file)
	ca     *ca.CAImpl
	log    *syncBuffer
}

func startPebble(t *testing.T, httpPort, tlsPort int, validity uint64) *pebble {
	t.Helper()
	return startPebbleEAB(t, httpPort, tlsPort, validity, nil)
}

// startPebbleEAB is startPebble that, given MAC keys by key id (base64url), requires an
// external account binding with one of them for every new account.
func startPebbleEAB(t *testing.T, httpPort, tlsPort int, validity uint64, eabKeys map[string]string) *pebble {
	t.Helper()
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	t.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	t.Setenv("PEBBLE_AUTHZREUSE", "0") // every order validates again
	resolver := startDNS(t)
	buf := &syncBuffer{}
	logger := log.New(buf, "pebble ", log.Lmicroseconds)
	store := db.NewMemoryStore()
	profiles := map[string]ca.Profile{"default": {Description: "test", ValidityPeriod: validity}}
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, profiles)
	validator := va.New(logger, httpPort, tlsPort, false, resolver.addr, store)
	for kid, key := range eabKeys {
		if err := store.AddExternalAccountKeyByID(kid, key); err != nil {
			t.Fatal(err)
		}
	}
	front := wfe.New(logger, store, validator, authority, []string{"pebble.letsencrypt.org"}, false, eabKeys != nil, 0, 0)
	srv := httptest.NewUnstartedServer(front.Handler())
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pebble log:\n%s", buf.String())
		}
	})
	caFile := filepath.Join(t.TempDir(), "pebble-wfe.pem")
	if err := os.WriteFile(caFile, pemCert(srv.Certificate().Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	return &pebble{dns: resolver, dirURL: srv.URL + wfe.DirectoryPath, caFile: caFile, ca: authority, log: buf}
}

func (p *pebble) roots() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.ca.GetRootCert(0).Cert)
	return pool
}

func listenPort(t *testing.T) (net.Listener, int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln, ln.Addr().(*net.TCPAddr).Port
}

// challengeServer is a listener's plain-HTTP side: the ACME hook first, then 404.
func challengeServer(t *testing.T, ln net.Listener, m *Manager, hits *atomic.Int64) {
	t.Helper()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if m.HandleHTTPChallenge(w, r) {
			hits.Add(1)
			return
		}
		http.NotFound(w, r)
	}), ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// serveOn is serve (certs_test.go) on a listener opened beforehand.
func serveOn(t *testing.T, ln net.Listener, tc *tls.Config) {
	t.Helper()
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	tln := tls.NewListener(ln, tc)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := tln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if err := c.(*tls.Conn).Handshake(); err != nil {
					return
				}
				c.Write([]byte("ok"))
				io.Copy(io.Discard, c)
			}()
		}
	}()
}

func acmeConfig(stateDir string, p *pebble, hsm bool, domains ...string) *configs.Config {
	cfg := &configs.Config{
		Server: configs.Server{StateDir: stateDir},
		Certificates: []configs.Certificate{
			{Name: "site", Domains: domains, ACME: p.dirURL, ACMEEmail: "ops@fulcrum.test", ACMECAFile: p.caFile},
		},
		Listeners: []configs.Listener{httpsListener("public", 1443, "site")},
	}
	if hsm {
		cfg.Keystore = softhsmtest.Keystore()
	}
	return cfg
}

// onlyChallenge keeps one solver so a test proves that challenge type end to end. Called
// before StartACME, which orders it before any use by the renewal loop.
func onlyChallenge(m *Manager, name, typ string) {
	solvers := entryOf(m, name).acme.client.ChallengeSolvers
	for k := range solvers {
		if k != typ {
			delete(solvers, k)
		}
	}
}

func waitCert(t *testing.T, m *Manager, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := m.WaitCertificate(ctx, name); err != nil {
		t.Fatal(err)
	}
}

// TestACMEHTTP01HSM: a certificate from Pebble through real HTTP-01 validation (Pebble's VA
// fetches the token from the listener's HTTP hook), with the leaf key and the account key
// generated in SoftHSM2; the chain verifies against Pebble's root in a real handshake; a
// restart reuses the stored certificate without any ACME traffic.
func TestACMEHTTP01HSM(t *testing.T) {
	needHSM(t)
	httpLn, httpPort := listenPort(t)
	tlsLn, tlsPort := listenPort(t)
	p := startPebble(t, httpPort, tlsPort, 0)
	dir := t.TempDir()
	cfg := acmeConfig(dir, p, true, "www.fulcrum.test", "api.fulcrum.test", "127.0.0.1")

	m, err := NewManager(context.Background(), valid(t, cfg), quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { m.Close() }()
	// Pending until StartACME: listed, not served, and the CLI path cannot renew it.
	if l := m.List(); len(l) != 1 || !l[0].Pending || l[0].Kind != "acme" {
		t.Fatalf("before StartACME: %+v", l)
	}
	if err := m.Renew("site"); err == nil {
		t.Fatal("Renew of an ACME certificate before StartACME succeeded")
	}
	if _, err := m.Export("site"); err == nil {
		t.Fatal("Export of a pending certificate succeeded")
	}
	onlyChallenge(m, "site", acme.ChallengeTypeHTTP01)
	var hits atomic.Int64
	challengeServer(t, httpLn, m, &hits)
	tc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, tlsLn, tc)
	start := time.Now()
	m.StartACME()
	waitCert(t, m, "site")
	t.Logf("ACME issuance (3 identifiers, HTTP-01, HSM keys): %v", time.Since(start))
	if n := hits.Load(); n < 3 {
		t.Fatalf("HTTP-01 hook answered %d validations, want >= 3", n)
	}

	addr := tlsLn.Addr().String()
	roots := p.roots()
	for _, sni := range []string{"www.fulcrum.test", "api.fulcrum.test"} {
		for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			cs, err := dial(addr, &tls.Config{RootCAs: roots, ServerName: sni, MinVersion: v, MaxVersion: v})
			if err != nil {
				t.Fatalf("%s %x: %v", sni, v, err)
			}
			if len(cs.VerifiedChains) == 0 || !cs.VerifiedChains[0][len(cs.VerifiedChains[0])-1].Equal(p.ca.GetRootCert(0).Cert) {
				t.Fatalf("%s: chain does not end at Pebble's root", sni)
			}
		}
	}
	// The IP identifier too (no SNI: the listener's first certificate).
	if _, err := dial(addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}); err != nil {
		t.Fatalf("ip: %v", err)
	}

	e := entryOf(m, "site")
	leaf := e.cur.Load().Leaf
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates(e.cur.Load()), DNSName: "www.fulcrum.test"}); err != nil {
		t.Fatal(err)
	}
	if !publicKeysEqual(e.cur.Load().PrivateKey.(crypto.Signer).Public(), leaf.PublicKey) {
		t.Fatal("served key does not match the leaf")
	}
	// Both keys live in the token, sensitive and not extractable.
	e.meta.Lock()
	keyName := e.keyName
	e.meta.Unlock()
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, keyName)
	e.acme.mu.Lock()
	acctKey := e.acme.account != nil
	e.acme.mu.Unlock()
	if !acctKey {
		t.Fatal("no ACME account")
	}
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, m.acmeAccountKey(p.dirURL, "ops@fulcrum.test"))
	// Storage: chain and key reference only.
	b, err := os.ReadFile(m.certPath("site"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("PRIVATE KEY")) {
		t.Fatal("key material in the stored certificate")
	}
	info := m.List()[0]
	if info.Pending || info.Kind != "acme" || !info.RenewAt.Equal(renewAt(leaf)) || info.Generation != 1 {
		t.Fatalf("List: %+v", info)
	}
	if got, want := info.RenewAt.Sub(leaf.NotBefore), leaf.NotAfter.Sub(leaf.NotBefore)*2/3; got < want-time.Second || got > want+time.Second {
		t.Fatalf("renew at %v after NotBefore, want two thirds of the lifetime (%v)", got, want)
	}
	serial := serialHex(leaf)

	// certmagic and acmez never went anywhere on their own: no ARI (renewal is our loop's).
	if strings.Contains(p.log.String(), "renewalInfo") {
		t.Fatal("ARI was requested")
	}

	// Restart: the stored certificate and its HSM key are reused; StartACME is not even called.
	m.Close()
	hitsBefore := hits.Load()
	m2 := newManager(t, cfg)
	if err := m2.WaitCertificate(context.Background(), "site"); err != nil {
		t.Fatal(err)
	}
	if got := serialOf(m2, "site"); got != serial {
		t.Fatalf("restart issued a new certificate: %s, was %s", got, serial)
	}
	tc2, err := m2.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr2 := serve(t, tc2)
	cs, err := dial(addr2, &tls.Config{RootCAs: roots, ServerName: "www.fulcrum.test"})
	if err != nil {
		t.Fatal(err)
	}
	if serialHex(cs.PeerCertificates[0]) != serial {
		t.Fatal("restarted manager serves another certificate")
	}
	if hits.Load() != hitsBefore {
		t.Fatal("restart validated again")
	}
}

func intermediates(tc *tls.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, der := range tc.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			p.AddCert(c)
		}
	}
	return p
}

// TestACMETLSALPN01Renewal: TLS-ALPN-01 answered by the TLS configuration ServerTLS returns,
// with the software keystore, and renewal by the lifecycle loop at a third of the real
// lifetime left (Pebble issues 9-second certificates here); the renewed certificate is
// served without a failed handshake.
// TestACMEExternalAccountBinding: against a CA that requires an external account binding,
// an account without one is refused (and the error says so), and a certificate configured with
// acme_eab_key_id and acme_eab_mac_key is issued and served.
func TestACMEExternalAccountBinding(t *testing.T) {
	httpLn, httpPort := listenPort(t)
	_, tlsPort := listenPort(t)
	mac := make([]byte, 32)
	rand.Read(mac)
	// Handed out as CAs often do: padded standard base64. Pebble stores the raw bytes.
	t.Setenv("TEST_EAB_MAC", base64.StdEncoding.EncodeToString(mac))
	p := startPebbleEAB(t, httpPort, tlsPort, 0, map[string]string{"kid-fulcrum": base64.RawURLEncoding.EncodeToString(mac)})

	// Without a binding, the account is refused.
	plain := newManager(t, acmeConfig(t.TempDir(), p, false, "eab.fulcrum.test"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := entryOf(plain, "site").acme.ensureAccount(ctx); err == nil || !strings.Contains(err.Error(), "externalAccountRequired") {
		t.Fatalf("account without a binding: err = %v, want the CA's externalAccountRequired", err)
	}
	plain.Close()

	m := newManager(t, acmeConfigEAB(t.TempDir(), p))
	onlyChallenge(m, "site", acme.ChallengeTypeHTTP01)
	var hits atomic.Int64
	challengeServer(t, httpLn, m, &hits)
	m.StartACME()
	waitCert(t, m, "site")
	leaf := entryOf(m, "site").cur.Load().Leaf
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: p.roots(), DNSName: "eab.fulcrum.test", Intermediates: poolOf(entryOf(m, "site").cur.Load())}); err != nil {
		t.Fatalf("certificate issued with a binding does not verify: %v", err)
	}

	// A MAC key that is not base64 is refused when the configuration loads, naming the field.
	t.Setenv("TEST_EAB_MAC", "not base64!")
	if _, err := NewManager(context.Background(), valid(t, acmeConfigEAB(t.TempDir(), p)), quiet); err == nil || !strings.Contains(err.Error(), "acme_eab_mac_key") {
		t.Fatalf("bad MAC key: err = %v", err)
	}
}

func acmeConfigEAB(dir string, p *pebble) *configs.Config {
	cfg := acmeConfig(dir, p, false, "eab.fulcrum.test")
	cfg.Certificates[0].ACMEEABKeyID = "kid-fulcrum"
	cfg.Certificates[0].ACMEEABMACKey = "env:TEST_EAB_MAC"
	return cfg
}

// poolOf holds the intermediates of a served chain.
func poolOf(c *tls.Certificate) *x509.CertPool {
	pool := x509.NewCertPool()
	for _, der := range c.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			pool.AddCert(ic)
		}
	}
	return pool
}

// TestACMEDNS01Wildcard: with acme_dns, a certificate for a name and its wildcard is issued
// through DNS-01 alone (nothing answers HTTP-01 or TLS-ALPN-01), the TXT records going in and
// out by TSIG-signed RFC 2136 updates; the zone is found from the server's SOA. The records are
// gone afterwards, and an update signed with the wrong secret is refused.
func TestACMEDNS01Wildcard(t *testing.T) {
	httpLn, httpPort := listenPort(t)
	tlsLn, tlsPort := listenPort(t)
	httpLn.Close() // no HTTP-01 ...
	tlsLn.Close()  // ... and no TLS-ALPN-01: only DNS-01 can succeed
	p := startPebble(t, httpPort, tlsPort, 0)
	t.Setenv("TEST_TSIG", testTSIGSecret)
	cfg := acmeConfig(t.TempDir(), p, false, "fulcrum.test", "*.fulcrum.test")
	cfg.Certificates[0].ACMEDNS = &configs.ACMEDNS{Server: p.dns.addr, TSIGKey: "fulcrum-acme", TSIGSecret: "env:TEST_TSIG", TSIGAlgorithm: "hmac-sha256", TTL: 60}
	m := newManager(t, cfg)
	if solvers := entryOf(m, "site").acme.client.ChallengeSolvers; len(solvers) != 1 || solvers[acme.ChallengeTypeDNS01] == nil {
		t.Fatalf("solvers %v, want dns-01 alone", solvers)
	}
	m.StartACME()
	waitCert(t, m, "site")

	tc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, tc)
	for _, sni := range []string{"fulcrum.test", "anything.fulcrum.test"} {
		if _, err := dial(addr, &tls.Config{RootCAs: p.roots(), ServerName: sni}); err != nil {
			t.Fatalf("%s: %v", sni, err)
		}
	}
	if records, updates := p.dns.state(); records != 0 || updates < 4 {
		t.Fatalf("after issuance: %d challenge records left, %d updates; want 0 left after >= 2 adds and 2 removals", records, updates)
	}

	// The server refuses an update signed with another secret, and the error says so.
	bad := *cfg.Certificates[0].ACMEDNS
	t.Setenv("TEST_TSIG_WRONG", "d3Jvbmctc2VjcmV0")
	bad.TSIGSecret = "env:TEST_TSIG_WRONG"
	s, err := newDNSSolver(cfg, &bad)
	if err != nil {
		t.Fatal(err)
	}
	ch := acme.Challenge{Identifier: acme.Identifier{Type: "dns", Value: "fulcrum.test"}, KeyAuthorization: "x"}
	if err := s.Present(context.Background(), ch); err == nil {
		t.Fatal("an update signed with the wrong TSIG secret was accepted")
	}
	if records, _ := p.dns.state(); records != 0 {
		t.Fatal("a refused update added a record")
	}
}

func TestACMETLSALPN01Renewal(t *testing.T) {
	httpLn, httpPort := listenPort(t)
	httpLn.Close() // nothing answers HTTP-01: only TLS-ALPN-01 can succeed
	tlsLn, tlsPort := listenPort(t)
	p := startPebble(t, httpPort, tlsPort, 9)
	cfg := acmeConfig(t.TempDir(), p, false, "alpn.fulcrum.test")
	m := newManager(t, cfg)
	onlyChallenge(m, "site", acme.ChallengeTypeTLSALPN01)
	tc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, tlsLn, tc)
	addr := tlsLn.Addr().String()

	// Without a pending challenge, acme-tls/1 hellos are refused.
	if _, err := dial(addr, &tls.Config{InsecureSkipVerify: true, ServerName: "alpn.fulcrum.test", NextProtos: []string{acmeTLS1}}); err == nil {
		t.Fatal("acme-tls/1 accepted with no pending challenge")
	}
	m.StartACME()
	waitCert(t, m, "site")
	first := entryOf(m, "site").cur.Load().Leaf
	if life := first.NotAfter.Sub(first.NotBefore); life > 10*time.Second {
		t.Fatalf("lifetime %v; the test expects Pebble's 9 s profile", life)
	}
	cc := &tls.Config{RootCAs: p.roots(), ServerName: "alpn.fulcrum.test"}
	if cs, err := dial(addr, cc); err != nil || serialHex(cs.PeerCertificates[0]) != serialHex(first) {
		t.Fatalf("first certificate: %v", err)
	}

	// Handshake continuously until the loop has renewed (at 2/3 of 8 s, plus an ACME order).
	deadline := time.Now().Add(30 * time.Second)
	renewed := false
	handshakes := 0
	for time.Now().Before(deadline) && !renewed {
		cs, err := dial(addr, cc)
		if err != nil {
			t.Fatalf("handshake %d during renewal: %v", handshakes, err)
		}
		handshakes++
		renewed = serialHex(cs.PeerCertificates[0]) != serialHex(first)
		time.Sleep(50 * time.Millisecond) // pacing the client; the event is the CA's clock
	}
	if !renewed {
		t.Fatalf("not renewed within 30 s (renew at %v)\n", renewAt(first))
	}
	if got := entryOf(m, "site").cur.Load().Leaf; got.NotBefore.Before(renewAt(first).Add(-time.Second)) {
		t.Fatalf("renewed too early: new NotBefore %v, renew at %v", got.NotBefore, renewAt(first))
	}
	if info := m.List()[0]; info.Generation < 2 || info.RenewFailures != 0 {
		t.Fatalf("after renewal: %+v", info)
	}
	t.Logf("renewed after %d handshakes, none failed", handshakes)
}

func TestJWSSignerAndALPNName(t *testing.T) {
	k, err := ecdsaKey()
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("payload"))
	sig, err := jwsSigner{k}.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if len(sig) != 64 {
		t.Fatalf("ES256 signature of %d bytes, want 64", len(sig))
	}
	r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	if !ecdsa.Verify(&k.PublicKey, digest[:], r, s) {
		t.Fatal("r||s signature does not verify")
	}
	for _, tt := range []struct {
		id   acme.Identifier
		want string
	}{
		{acme.Identifier{Type: "dns", Value: "WWW.Example.test"}, "www.example.test"},
		{acme.Identifier{Type: "ip", Value: "192.0.2.5"}, "5.2.0.192.in-addr.arpa"},
		{acme.Identifier{Type: "ip", Value: "2001:db8::1"}, "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"},
	} {
		if got := alpnName(tt.id); got != tt.want {
			t.Errorf("alpnName(%v) = %q, want %q", tt.id, got, tt.want)
		}
	}
}

// TestHandleHTTPChallenge: only pending tokens, only GET/HEAD, only for the identifier's host.
func TestHandleHTTPChallenge(t *testing.T) {
	m := &Manager{}
	req := func(method, host, path string) (*httptest.ResponseRecorder, bool) {
		r := httptest.NewRequest(method, "http://"+host+path, nil)
		w := httptest.NewRecorder()
		return w, m.HandleHTTPChallenge(w, r)
	}
	if _, ok := req("GET", "www.example.test", httpChallengePrefix+"tok"); ok {
		t.Fatal("answered with nothing pending")
	}
	ch := acme.Challenge{Type: acme.ChallengeTypeHTTP01, Token: "tok", KeyAuthorization: "tok.thumb",
		Identifier: acme.Identifier{Type: "dns", Value: "www.example.test"}}
	httpSolver{&m.chal}.Present(context.Background(), ch)
	for _, tt := range []struct {
		name, method, host, path string
		want                     bool
	}{
		{"match", "GET", "www.example.test", httpChallengePrefix + "tok", true},
		{"host with port and case", "GET", "WWW.example.test:8080", httpChallengePrefix + "tok", true},
		{"head", "HEAD", "www.example.test", httpChallengePrefix + "tok", true},
		{"other host", "GET", "evil.example.test", httpChallengePrefix + "tok", false},
		{"unknown token", "GET", "www.example.test", httpChallengePrefix + "nope", false},
		{"post", "POST", "www.example.test", httpChallengePrefix + "tok", false},
		{"other path", "GET", "www.example.test", "/tok", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w, ok := req(tt.method, tt.host, tt.path)
			if ok != tt.want {
				t.Fatalf("handled = %v", ok)
			}
			if ok && tt.method == "GET" && w.Body.String() != "tok.thumb" {
				t.Fatalf("body %q", w.Body.String())
			}
		})
	}
	httpSolver{&m.chal}.CleanUp(context.Background(), ch)
	if _, ok := req("GET", "www.example.test", httpChallengePrefix+"tok"); ok || m.chal.pending.Load() != 0 {
		t.Fatal("answered after CleanUp")
	}
}

func BenchmarkHandleHTTPChallengeIdle(b *testing.B) {
	m := &Manager{}
	r := httptest.NewRequest("GET", "http://www.example.test/index.html", nil)
	w := httptest.NewRecorder()
	b.ReportAllocs()
	for b.Loop() {
		if m.HandleHTTPChallenge(w, r) {
			b.Fatal("handled")
		}
	}
}

// TestACMEReconcile: a certificate added by a reload after StartACME is obtained in the
// background (the reload does not wait for the CA) with the same account; removing it stops
// its loop.
func TestACMEReconcile(t *testing.T) {
	httpLn, httpPort := listenPort(t)
	p := startPebble(t, httpPort, 1, 0)
	cfg := acmeConfig(t.TempDir(), p, false, "one.fulcrum.test")
	m := newManager(t, cfg)
	var hits atomic.Int64
	challengeServer(t, httpLn, m, &hits)
	m.StartACME()
	waitCert(t, m, "site")

	cfg2 := *cfg
	cfg2.Certificates = append(append([]configs.Certificate(nil), cfg.Certificates...), configs.Certificate{
		Name: "two", Domains: []string{"two.fulcrum.test"}, ACME: p.dirURL, ACMEEmail: "ops@fulcrum.test", ACMECAFile: p.caFile})
	cfg2.Listeners = []configs.Listener{httpsListener("public", 1443, "site", "two")}
	start := time.Now()
	if err := m.Reconcile(valid(t, &cfg2)); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("reload waited %v for the CA", d)
	}
	first := serialOf(m, "site")
	waitCert(t, m, "two")
	if serialOf(m, "site") != first {
		t.Fatal("unchanged certificate was reissued by the reload")
	}
	if a, b := entryOf(m, "site").acme, entryOf(m, "two").acme; a.account == nil || b.account == nil || a.account.Location != b.account.Location {
		t.Fatal("the two certificates do not share the ACME account")
	}
	if err := m.Reconcile(valid(t, cfg)); err != nil {
		t.Fatal(err)
	}
	if entryOf(m, "two") != nil {
		t.Fatal("removed certificate still configured")
	}
}
