package certs

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"testing"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// TestHSMRSAHandshakes: an RSA-2048 authority and leaf generated in SoftHSM2; the authority
// signs through the token (PKCS#1 v1.5) and handshakes sign with RSA-PSS (mandatory in TLS
// 1.3, preferred by Go in TLS 1.2) through the token.
func TestHSMRSAHandshakes(t *testing.T) {
	needHSM(t)
	cfg := &configs.Config{
		Server:       configs.Server{StateDir: t.TempDir()},
		Keystore:     softhsmtest.Keystore(),
		Authorities:  []configs.Authority{{Name: "internal", CommonName: "RSA Test CA", KeyType: "rsa-2048", Validity: "87600h"}},
		Certificates: []configs.Certificate{{Name: "rsa", Domains: []string{"rsa.example.test"}, Authority: "internal", KeyType: "rsa-2048"}},
		Listeners:    []configs.Listener{httpsListener("public", 1443, "rsa")},
	}
	m := newManager(t, cfg)
	e := entryOf(m, "rsa")
	tc := e.cur.Load()
	pub, ok := tc.Leaf.PublicKey.(*rsa.PublicKey)
	if !ok || pub.N.BitLen() != 2048 {
		t.Fatalf("leaf key %T", tc.Leaf.PublicKey)
	}
	if ca, ok := m.Authority("internal").Cert.PublicKey.(*rsa.PublicKey); !ok || ca.N.BitLen() != 2048 {
		t.Fatal("authority key is not RSA-2048")
	}
	if tc.Leaf.SignatureAlgorithm != x509.SHA256WithRSA {
		t.Fatalf("leaf signed with %v", tc.Leaf.SignatureAlgorithm)
	}
	e.meta.Lock()
	keyName := e.keyName
	e.meta.Unlock()
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, keyName)
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, m.prefix+"ca-internal")

	// Both RSA signature schemes straight through the token.
	signer := tc.PrivateKey.(crypto.Signer)
	digest := sha256.Sum256([]byte("fulcrum"))
	pss := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
	sig, err := signer.Sign(rand.Reader, digest[:], pss)
	if err != nil {
		t.Fatalf("PSS through the HSM: %v", err)
	}
	if err := rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, pss); err != nil {
		t.Fatal(err)
	}
	sig, err = signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("PKCS#1 v1.5 through the HSM: %v", err)
	}
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
		t.Fatal(err)
	}

	stc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, stc)
	for _, tt := range []struct {
		name    string
		version uint16
		suites  []uint16
	}{
		{"tls13 rsa-pss", tls.VersionTLS13, nil},
		{"tls12 ecdhe-rsa aes-gcm", tls.VersionTLS12, []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}},
		{"tls12 ecdhe-rsa chacha20", tls.VersionTLS12, []uint16{tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := m.Keystore().Stats().Signs.Load()
			cc := clientCfg(m, "rsa.example.test", tt.version)
			cc.CipherSuites = tt.suites
			cs, err := dial(addr, cc)
			if err != nil {
				t.Fatal(err)
			}
			if cs.Version != tt.version || len(cs.VerifiedChains) == 0 {
				t.Fatalf("version %x, %d chains", cs.Version, len(cs.VerifiedChains))
			}
			if tt.suites != nil && cs.CipherSuite != tt.suites[0] {
				t.Fatalf("suite %s", tls.CipherSuiteName(cs.CipherSuite))
			}
			if m.Keystore().Stats().Signs.Load() == before {
				t.Fatal("handshake did not sign through the keystore")
			}
		})
	}
}
