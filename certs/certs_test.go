package certs

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs"
)

var token *softhsmtest.Token

func TestMain(m *testing.M) { os.Exit(softhsmtest.Run(m, &token)) }

func needHSM(t testing.TB) { softhsmtest.Need(t, token) }

var quiet = slog.New(slog.DiscardHandler)

// testConfig: authority "internal", certificates www (exact + wildcard) and other, listener
// "public" serving both (www first), and one with mTLS.
func testConfig(stateDir string, hsm bool) *configs.Config {
	cfg := &configs.Config{
		Server:      configs.Server{StateDir: stateDir},
		Authorities: []configs.Authority{{Name: "internal", CommonName: "Test CA", KeyType: "ecdsa-p256", Validity: "87600h"}},
		Certificates: []configs.Certificate{
			{Name: "www", Domains: []string{"www.example.test", "*.api.example.test"}, Authority: "internal", Lifetime: "2160h"},
			{Name: "other", Domains: []string{"other.example.test", "127.0.0.1"}, Authority: "internal"},
		},
		Listeners: []configs.Listener{httpsListener("public", 1443, "www", "other"), httpsListener("mtls", 2443, "other")},
		TargetGroups: []configs.TargetGroup{
			{Name: "secure", Protocol: "https", TLS: &configs.BackendTLS{ServerName: "other.example.test", Authority: "internal", ClientCertificate: "www"}},
		},
	}
	cfg.Listeners[1].ClientAuth = &configs.ClientAuth{Mode: "verify", Authority: "internal"}
	if hsm {
		cfg.Keystore = softhsmtest.Keystore()
	}
	return cfg
}

func newManager(t testing.TB, cfg *configs.Config) *Manager {
	t.Helper()
	m, err := NewManager(context.Background(), valid(t, cfg), quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

// serve runs a TLS server on 127.0.0.1 that writes "ok" after each handshake.
func serve(t testing.TB, tc *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
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
				io.Copy(io.Discard, c) // until the client closes (lets TLS 1.3 tickets flow)
			}()
		}
	}()
	return ln.Addr().String()
}

// dial handshakes and reads the server's "ok"; it returns the served leaf.
func dial(addr string, cfg *tls.Config) (*tls.ConnectionState, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(&d, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil {
		return nil, err
	}
	cs := c.ConnectionState()
	return &cs, nil
}

func clientCfg(m *Manager, sni string, v uint16) *tls.Config {
	return &tls.Config{RootCAs: m.Authority("internal").Pool(), ServerName: sni, MinVersion: v, MaxVersion: v}
}

func entryOf(m *Manager, name string) *entry { return m.snap.Load().certs[name] }

func serialOf(m *Manager, name string) string { return serialHex(entryOf(m, name).cur.Load().Leaf) }

func TestHSMHandshakes(t *testing.T) {
	needHSM(t)
	dir := t.TempDir()
	m := newManager(t, testConfig(dir, true))
	if got := m.Keystore().Describe(); got != "pkcs11 token fulcrum" {
		t.Fatalf("keystore %q", got)
	}
	cfg := m.cfg.Load()
	tc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, tc)
	signsBefore := m.Keystore().Stats().Signs.Load()

	www, other := serialOf(m, "www"), serialOf(m, "other")
	tests := []struct {
		name, sni string
		version   uint16
		want      string
		verifyAs  string
	}{
		{"tls13 exact", "www.example.test", tls.VersionTLS13, www, ""},
		{"tls12 exact", "www.example.test", tls.VersionTLS12, www, ""},
		{"wildcard", "v1.api.example.test", tls.VersionTLS13, www, ""},
		{"second cert", "other.example.test", tls.VersionTLS13, other, ""},
		{"case and dot", "OTHER.example.test.", tls.VersionTLS12, other, "other.example.test"},
		{"unknown sni gets default", "nope.example.test", tls.VersionTLS13, www, "www.example.test"},
		{"no sni gets default", "", tls.VersionTLS13, www, "www.example.test"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := clientCfg(m, tt.sni, tt.version)
			if tt.verifyAs != "" || tt.sni == "" {
				// The client does not verify the name it sent; check the chain to the CA only.
				cc.InsecureSkipVerify = true
				cc.VerifyConnection = func(cs tls.ConnectionState) error {
					_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: m.Authority("internal").Pool(), DNSName: tt.verifyAs})
					return err
				}
			}
			cs, err := dial(addr, cc)
			if err != nil {
				t.Fatal(err)
			}
			if cs.Version != tt.version {
				t.Fatalf("version %x", cs.Version)
			}
			if got := serialHex(cs.PeerCertificates[0]); got != tt.want {
				t.Fatalf("served serial %s, want %s", got, tt.want)
			}
		})
	}
	// Real peers: OpenSSL verifies the chain (to the CA whose key is in the token) for TLS 1.3
	// and 1.2, and curl completes a verified handshake (its exit code says the reply was empty,
	// not that TLS failed: this listener speaks no HTTP).
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, m.Authority("internal").CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"-tls1_3", "-tls1_2"} {
		out, err := exec.Command("openssl", "s_client", "-connect", addr, "-servername", "www.example.test",
			"-CAfile", caFile, "-verify_return_error", "-verify_hostname", "www.example.test", v).CombinedOutput()
		if err != nil || !bytes.Contains(out, []byte("Verify return code: 0 (ok)")) {
			t.Fatalf("openssl s_client %s: %v\n%s", v, err, out)
		}
	}
	if _, port, err := net.SplitHostPort(addr); err == nil {
		cmd := exec.Command("curl", "-s", "--max-time", "5", "--cacert", caFile,
			"--resolve", "www.example.test:"+port+":127.0.0.1", "https://www.example.test:"+port+"/")
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) && (ee.ExitCode() == 35 || ee.ExitCode() == 60) {
			t.Fatalf("curl --cacert: TLS failed (exit %d)", ee.ExitCode())
		}
	}
	if m.Keystore().Stats().Signs.Load() <= signsBefore {
		t.Fatal("handshakes did not sign through the HSM")
	}
	// The keys live in the token and are not readable.
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, m.prefix+"ca-internal")
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, entryOf(m, "www").keyName)
	assertNoKeyOnDisk(t, dir, nil)

	// acme-tls/1-only hellos are refused (no ACME issuer).
	cc := clientCfg(m, "www.example.test", tls.VersionTLS13)
	cc.NextProtos = []string{"acme-tls/1"}
	if _, err := dial(addr, cc); err == nil {
		t.Fatal("acme-tls/1 hello accepted")
	}
	// List and Export.
	infos := m.List()
	if len(infos) != 2 || infos[1].Name != "www" || infos[1].Serial != www || !strings.HasPrefix(infos[1].KeyLocation, "pkcs11 token fulcrum: ") {
		t.Fatalf("List = %+v", infos)
	}
	pemChain, err := m.Export("www")
	if err != nil || bytes.Count(pemChain, []byte("BEGIN CERTIFICATE")) != 2 || bytes.Contains(pemChain, []byte("PRIVATE")) {
		t.Fatalf("Export: %v\n%s", err, pemChain)
	}
}

func TestMutualTLSAndClientTLS(t *testing.T) {
	m := newManager(t, testConfig(t.TempDir(), false))
	cfg := m.cfg.Load()
	srv, err := m.ServerTLS(&cfg.Listeners[1]) // client_auth verify
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, srv)
	// What backends builds a group's client TLS from: trust the authority, present www.
	ca, err := m.AuthorityCert("internal")
	if err != nil {
		t.Fatal(err)
	}
	getCert, err := m.ClientCertificate("www")
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	ct := &tls.Config{RootCAs: roots, ServerName: "other.example.test", GetClientCertificate: getCert}
	cs, err := dial(addr, ct)
	if err != nil {
		t.Fatalf("mTLS handshake: %v", err)
	}
	if serialHex(cs.PeerCertificates[0]) != serialOf(m, "other") {
		t.Fatal("wrong server certificate")
	}
	// Without a client certificate the server refuses.
	noCert := ct.Clone()
	noCert.GetClientCertificate = nil
	if _, err := dial(addr, noCert); err == nil {
		t.Fatal("handshake without client certificate accepted")
	}
	if _, err := m.AuthorityCert("nope"); err == nil {
		t.Fatal("an unknown authority was found")
	}
	if _, err := m.ClientCertificate("nope"); err == nil {
		t.Fatal("an unknown client certificate was found")
	}
}

func TestPolicies(t *testing.T) {
	m := newManager(t, testConfig(t.TempDir(), false))
	for _, tt := range []struct {
		policy   string
		version  uint16
		suite    uint16
		accepted bool
	}{
		{"recommended", tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, true},
		{"recommended", tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, false},
		{"recommended", tls.VersionTLS11, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, false},
		{"tls13", tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, false},
		{"tls13", tls.VersionTLS13, 0, true},
		{"compatible", tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, true},
		{"compatible", tls.VersionTLS10, tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA, true},
	} {
		t.Run(fmt.Sprintf("%s/%x/%x", tt.policy, tt.version, tt.suite), func(t *testing.T) {
			l := &configs.Listener{Name: "p-" + tt.policy, Certificates: []string{"www"}, TLSPolicy: tt.policy}
			tc, err := m.ServerTLS(l)
			if err != nil {
				t.Fatal(err)
			}
			addr := serve(t, tc)
			cc := clientCfg(m, "www.example.test", tt.version)
			if tt.suite != 0 {
				cc.CipherSuites = []uint16{tt.suite}
			}
			_, err = dial(addr, cc)
			if (err == nil) != tt.accepted {
				t.Fatalf("accepted=%v err=%v", err == nil, err)
			}
		})
	}
	if _, err := m.ServerTLS(&configs.Listener{Name: "bad", Certificates: []string{"nope"}}); err == nil {
		t.Fatal("unknown certificate accepted")
	}
}

// softwareKeyBytes digs the in-memory private scalar out of the keystore's signer wrapper.
func softwareKeyBytes(t testing.TB, tc *tls.Certificate) []byte {
	t.Helper()
	// Unwrap nested signer wrappers (the lifecycle gate, then the counting signer).
	v := any(tc.PrivateKey)
	for range 4 {
		rv := reflect.ValueOf(v)
		if rv.Kind() == reflect.Pointer && rv.Elem().Kind() == reflect.Struct {
			rv = rv.Elem()
		}
		if rv.Kind() != reflect.Struct {
			break
		}
		f := rv.FieldByName("Signer")
		if !f.IsValid() {
			break
		}
		v = f.Interface()
	}
	k, ok := v.(*ecdsa.PrivateKey)
	if !ok {
		t.Fatalf("key %T", v)
	}
	b, err := k.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSoftwareRestartReusesAndNoKeysOnDisk(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir, false)
	m1, err := NewManager(context.Background(), valid(t, cfg), quiet)
	if err != nil {
		t.Fatal(err)
	}
	serial := serialOf(m1, "www")
	raw := softwareKeyBytes(t, entryOf(m1, "www").cur.Load())
	m1.Close()
	assertNoKeyOnDisk(t, dir, raw)

	m2 := newManager(t, testConfig(dir, false))
	if got := serialOf(m2, "www"); got != serial {
		t.Fatalf("restart re-issued: serial %s, was %s", got, serial)
	}
	// Changing the domains re-issues.
	cfg3 := testConfig(dir, false)
	cfg3.Certificates[0].Domains = []string{"www.example.test"}
	m2.Close()
	m3 := newManager(t, cfg3)
	if serialOf(m3, "www") == serial {
		t.Fatal("changed domains reused the stored certificate")
	}
	assertNoKeyOnDisk(t, dir, softwareKeyBytes(t, entryOf(m3, "www").cur.Load()))
}

func assertNoKeyOnDisk(t testing.TB, dir string, raw []byte) {
	t.Helper()
	n := 0
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		n++
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte("PRIVATE KEY")) {
			t.Errorf("%s contains a PEM private key", p)
		}
		if len(raw) > 0 && bytes.Contains(b, raw) {
			t.Errorf("%s contains the raw private key", p)
		}
		return nil
	})
	if n == 0 {
		t.Fatal("state dir is empty")
	}
}

func TestReconcile(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, testConfig(dir, false))
	www := serialOf(m, "www")

	// A failing reload changes nothing.
	bad := testConfig(dir, false)
	bad.Certificates = append(bad.Certificates, configs.Certificate{Name: "x", CertFile: filepath.Join(dir, "missing.pem"), KeyFile: filepath.Join(dir, "missing.key")})
	if err := m.Reconcile(valid(t, bad)); err == nil {
		t.Fatal("bad reload accepted")
	}
	if m.snap.Load().certs["x"] != nil || serialOf(m, "www") != www {
		t.Fatal("failed reload changed state")
	}
	// Add one, drop one, keep one untouched.
	next := testConfig(dir, false)
	next.Certificates[1] = configs.Certificate{Name: "api", Domains: []string{"api.example.test"}, Authority: "internal"}
	next.Listeners = []configs.Listener{httpsListener("public", 1443, "www", "api")}
	next.TargetGroups = nil
	if err := m.Reconcile(valid(t, next)); err != nil {
		t.Fatal(err)
	}
	if m.snap.Load().certs["other"] != nil || m.snap.Load().certs["api"] == nil {
		t.Fatal("reconcile did not add/remove")
	}
	if serialOf(m, "www") == www {
		// www's usage changed (no longer a client certificate), so it was re-issued: fine.
	}
	if n := len(m.cache.AllMatchingCertificates("other.example.test")); n != 0 {
		t.Fatalf("removed certificate still cached (%d)", n)
	}
	tc, err := m.ServerTLS(&next.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, tc)
	cs, err := dial(addr, clientCfg(m, "api.example.test", tls.VersionTLS13))
	if err != nil || serialHex(cs.PeerCertificates[0]) != serialOf(m, "api") {
		t.Fatalf("api handshake: %v", err)
	}
}

func TestImportedCertificate(t *testing.T) {
	dir := t.TempDir()
	// Issue a certificate from a throw-away manager's authority to use as an "external" one.
	src := newManager(t, testConfig(t.TempDir(), false))
	a := src.Authority("internal")
	key, _ := ecdsaKey()
	der, err := a.Sign(key.Public(), []string{"legacy.example.test"}, 24*time.Hour, UsageServer)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pemCert(der)
	keyPEM := pemKey(t, key)
	os.WriteFile(filepath.Join(dir, "legacy.pem"), certPEM, 0o600)
	os.WriteFile(filepath.Join(dir, "legacy.key"), keyPEM, 0o600)

	cfg := testConfig(filepath.Join(dir, "state"), false)
	cfg.Certificates = append(cfg.Certificates,
		configs.Certificate{Name: "legacy", CertFile: filepath.Join(dir, "legacy.pem"), KeyFile: filepath.Join(dir, "legacy.key")},
		configs.Certificate{Name: "cli", Imported: true}, // served from what Import stored
	)
	if _, err := NewManager(context.Background(), valid(t, cfg), quiet); err == nil {
		t.Fatal("cli certificate without an import accepted")
	}
	cfg.Certificates = cfg.Certificates[:3]
	m := newManager(t, cfg)
	if err := m.Renew("legacy"); err == nil {
		t.Fatal("imported certificate renewed")
	}
	if err := m.Import("cli", certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	m.Close()
	cfg.Certificates = append(cfg.Certificates, configs.Certificate{Name: "cli", Imported: true})
	cfg.Listeners = []configs.Listener{httpsListener("l", 1443, "cli", "legacy")}
	m2 := newManager(t, cfg)
	tc, err := m2.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, tc)
	cc := &tls.Config{RootCAs: a.Pool(), ServerName: "legacy.example.test"}
	if _, err := dial(addr, cc); err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, ci := range m2.List() {
		kinds = append(kinds, fmt.Sprintf("%s=%s/expiring=%v", ci.Name, ci.Kind, ci.Expiring))
	}
	// The imported and stored certificates (24 h left, never renewed) carry the expiry warning;
	// the issued ones renew themselves.
	if got := strings.Join(kinds, ","); got != "cli=stored/expiring=true,legacy=imported/expiring=true,other=issued/expiring=false,www=issued/expiring=false" {
		t.Fatalf("List kinds %s", got)
	}
	// The imported key went into the sealed keystore; nothing in the state dir is a key.
	assertNoKeyOnDisk(t, filepath.Join(dir, "state"), mustBytes(key))
}

// TestImportIntoHSM: with a PKCS#11 keystore, an imported key goes into the token (the state
// dir holds only the chain), handshakes sign through the token, and after a restart the
// certificate is served from the token again.
func TestImportIntoHSM(t *testing.T) {
	needHSM(t)
	dir := t.TempDir()
	src := newManager(t, testConfig(t.TempDir(), false))
	a := src.Authority("internal")
	key, _ := ecdsaKey()
	der, err := a.Sign(key.Public(), []string{"imported.example.test"}, 24*time.Hour, UsageServer)
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(filepath.Join(dir, "state"), true)
	cfg.Certificates = append(cfg.Certificates, configs.Certificate{Name: "cli", Imported: true})
	cfg.Listeners = []configs.Listener{httpsListener("l", 1443, "cli")}
	stored := func(cfg *configs.Config) *configs.Config { // without "cli", which needs the import first
		c := *cfg
		c.Certificates = c.Certificates[:len(c.Certificates)-1]
		c.Listeners = nil
		return &c
	}
	m := newManager(t, stored(cfg))
	if err := m.Import("cli", pemCert(der), pemKey(t, key)); err != nil {
		t.Fatalf("import into the token: %v", err)
	}
	m.Close()

	for run := 1; run <= 2; run++ { // the second run is a restart
		m := newManager(t, cfg)
		tc, err := m.ServerTLS(&cfg.Listeners[0])
		if err != nil {
			t.Fatal(err)
		}
		addr := serve(t, tc)
		before := m.Keystore().Stats().Signs.Load()
		if _, err := dial(addr, &tls.Config{RootCAs: a.Pool(), ServerName: "imported.example.test"}); err != nil {
			t.Fatalf("run %d: handshake: %v", run, err)
		}
		if m.Keystore().Stats().Signs.Load() == before {
			t.Fatalf("run %d: the handshake did not sign in the token", run)
		}
		for _, ci := range m.List() {
			if ci.Name == "cli" && !strings.HasPrefix(ci.KeyLocation, "pkcs11 token ") {
				t.Fatalf("run %d: imported key lives in %q, want the token", run, ci.KeyLocation)
			}
		}
		m.Close()
	}
	assertNoKeyOnDisk(t, filepath.Join(dir, "state"), mustBytes(key))
}

// handshakeLoad runs workers doing full handshakes (no resumption) until stop is closed and
// returns counters of successes and failures.
func handshakeLoad(addr string, cc *tls.Config, workers int, stop <-chan struct{}, onOK func(*tls.ConnectionState), onErr func(error)) *sync.WaitGroup {
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				cs, err := dial(addr, cc)
				if err != nil {
					onErr(err)
					time.Sleep(20 * time.Millisecond)
					continue
				}
				onOK(cs)
			}
		}()
	}
	return &wg
}

func TestRenewalUnderLoad(t *testing.T) {
	needHSM(t)
	cfg := testConfig(t.TempDir(), true)
	cfg.Certificates[0].Lifetime = "6s" // renewed when 2s are left
	m := newManager(t, cfg)
	tc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, tc)
	first := serialOf(m, "www")
	firstKey := entryOf(m, "www").keyName // no renewal can run yet (6s lifetime)
	var ok, failed atomic.Int64
	var lastErr atomic.Value
	seen := sync.Map{}
	stop := make(chan struct{})
	wg := handshakeLoad(addr, clientCfg(m, "www.example.test", tls.VersionTLS13), 2, stop,
		func(cs *tls.ConnectionState) { ok.Add(1); seen.Store(serialHex(cs.PeerCertificates[0]), true) },
		func(err error) { failed.Add(1); lastErr.Store(err) })
	deadline := time.Now().Add(15 * time.Second)
	for {
		e := entryOf(m, "www")
		e.mu.Lock()
		gens := e.gen
		e.mu.Unlock()
		if gens >= 3 {
			break // renewed twice: the first generation's key is gone
		}
		if time.Now().After(deadline) {
			t.Fatalf("no renewal (generation %d)", gens)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Let the load see the newest serial.
	newest := serialOf(m, "www")
	for i := 0; i < 200; i++ {
		if _, ok := seen.Load(newest); ok {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d failed handshakes during renewal (ok %d): %v", failed.Load(), ok.Load(), lastErr.Load())
	}
	if _, ok := seen.Load(newest); !ok || newest == first {
		t.Fatalf("new serial %s not served (first %s)", newest, first)
	}
	if _, err := m.Keystore().Signer(context.Background(), firstKey); err == nil {
		t.Fatal("the key two generations back was not deleted")
	}
	n := 0
	seen.Range(func(any, any) bool { n++; return true })
	t.Logf("handshakes ok=%d during 2 renewals; %d serials served", ok.Load(), n)
}

func TestHSMOutageRecovery(t *testing.T) {
	needHSM(t)
	cfg := testConfig(t.TempDir(), true)
	m := newManager(t, cfg)
	tc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, tc)
	var ok, failed atomic.Int64
	stop := make(chan struct{})
	wg := handshakeLoad(addr, clientCfg(m, "www.example.test", tls.VersionTLS13), 2, stop,
		func(*tls.ConnectionState) { ok.Add(1) }, func(error) { failed.Add(1) })
	defer func() { close(stop); wg.Wait() }()
	configtest.WaitFor(t, 5*time.Second, "handshakes before the outage", func() bool { return ok.Load() > 5 })

	if err := token.Remove(); err != nil {
		t.Fatal(err)
	}
	restored := false
	defer func() {
		if !restored {
			token.Restore()
		}
	}()
	configtest.WaitFor(t, 5*time.Second, "failures during the outage", func() bool { return failed.Load() > 3 })
	if err := token.Restore(); err != nil {
		t.Fatal(err)
	}
	restored = true
	start := time.Now()
	okAt := ok.Load()
	configtest.WaitFor(t, 5*time.Second, "recovery after restore", func() bool { return ok.Load() > okAt+3 })
	t.Logf("recovered %v after restore; failed during outage %d; rebuilds %d", time.Since(start), failed.Load(), m.Keystore().Stats().Rebuilds.Load())
	// Renewal works again too (the authority signs through the rebuilt context).
	if err := m.Renew("www"); err != nil {
		t.Fatal(err)
	}
}

func TestResumptionDoesNotSign(t *testing.T) {
	m := newManager(t, testConfig(t.TempDir(), false))
	cfg := m.cfg.Load()
	tc, _ := m.ServerTLS(&cfg.Listeners[0])
	addr := serve(t, tc)
	for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		cc := clientCfg(m, "www.example.test", v)
		cc.ClientSessionCache = tls.NewLRUClientSessionCache(8)
		if _, err := dial(addr, cc); err != nil {
			t.Fatal(err)
		}
		before := m.Keystore().Stats().Signs.Load()
		cs, err := dial(addr, cc)
		if err != nil || !cs.DidResume {
			t.Fatalf("version %x: resume=%v err=%v", v, cs != nil && cs.DidResume, err)
		}
		if n := m.Keystore().Stats().Signs.Load() - before; n != 0 {
			t.Fatalf("resumed handshake signed %d times", n)
		}
		// The ticket is honoured for the lifetime Go's TLS 1.3 advertises (seven days): through
		// every rotation of those seven days and a half (the key's own turn), and not after.
		// The client keeps its first ticket (a resumption hands out fresh ones).
		cc.ClientSessionCache = &firstTicketCache{}
		if _, err := dial(addr, cc); err != nil {
			t.Fatal(err)
		}
		for range ticketKeysKept - 1 {
			m.RotateTicketKeys()
		}
		if cs, err := dial(addr, cc); err != nil || !cs.DidResume {
			t.Fatalf("version %x: ticket not honoured for its advertised lifetime (%d rotations): %v", v, ticketKeysKept-1, err)
		}
		m.RotateTicketKeys()
		if cs, err := dial(addr, cc); err != nil || cs.DidResume {
			t.Fatalf("resumed with a retired ticket key: %v", err)
		}
	}
	// A ticket from one listener does not resume on another.
	tc2, _ := m.ServerTLS(&configs.Listener{Name: "other-listener", Certificates: []string{"www"}})
	addr2 := serve(t, tc2)
	cc := clientCfg(m, "www.example.test", tls.VersionTLS13)
	cc.ClientSessionCache = tls.NewLRUClientSessionCache(8)
	if _, err := dial(addr, cc); err != nil {
		t.Fatal(err)
	}
	if cs, err := dial(addr2, cc); err != nil || cs.DidResume {
		t.Fatalf("cross-listener resumption: %v", err)
	}
}

var _ = errors.New

// firstTicketCache keeps the first session ticket it is given and ignores later ones.
type firstTicketCache struct {
	mu sync.Mutex
	cs *tls.ClientSessionState
}

func (c *firstTicketCache) Get(string) (*tls.ClientSessionState, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cs, c.cs != nil
}

func (c *firstTicketCache) Put(_ string, cs *tls.ClientSessionState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cs == nil && cs != nil {
		c.cs = cs
	}
}
