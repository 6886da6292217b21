package keystore

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

var token *softhsmtest.Token

func TestMain(m *testing.M) { os.Exit(softhsmtest.Run(m, &token)) }

func needHSM(t testing.TB) { softhsmtest.Need(t, token) }

func openHSM(t testing.TB) Keystore {
	t.Helper()
	needHSM(t)
	ks, err := Open(context.Background(), softhsmtest.Keystore(), Options{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ks.Close() })
	return ks
}

func signVerify(t testing.TB, s crypto.Signer) error {
	t.Helper()
	d := sha256.Sum256([]byte("hello"))
	sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		return err
	}
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatal("signature does not verify")
	}
	return nil
}

func TestSoftwareSealed(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	ks, err := Open(ctx, softwareConfig(t, dir, configs.Keystore{}), Options{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	s, err := ks.Generate(ctx, "cert-www-1", ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	if err := signVerify(t, s); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "master.key")); err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != 32 {
		t.Fatalf("master key: %v %v", fi, err)
	}
	priv := s.(*gatedSigner).Signer.(countingSigner).Signer.(*ecdsa.PrivateKey)
	raw, _ := priv.Bytes()
	assertNoKeyOnDisk(t, dir, raw)

	// A second keystore over the same state finds the key again.
	ks2, err := Open(ctx, softwareConfig(t, dir, configs.Keystore{MasterKey: "file:" + filepath.Join(dir, "master.key")}), Options{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	s2, err := ks2.Signer(ctx, "cert-www-1")
	if err != nil {
		t.Fatal(err)
	}
	if !s2.Public().(*ecdsa.PublicKey).Equal(s.Public()) {
		t.Fatal("reloaded key differs")
	}
	// Renaming a sealed file into another key name fails (the name is authenticated).
	b, _ := os.ReadFile(filepath.Join(dir, "keys", "cert-www-1.sealed"))
	os.WriteFile(filepath.Join(dir, "keys", "other.sealed"), b, 0o600)
	if _, err := ks2.Signer(ctx, "other"); err == nil {
		t.Fatal("renamed sealed key opened")
	}
	// A wrong master key fails.
	t.Setenv("TEST_MK", base64.StdEncoding.EncodeToString(make([]byte, 32)))
	// It is refused at open, before any key is tried.
	if _, err := Open(ctx, softwareConfig(t, dir, configs.Keystore{MasterKey: "env:TEST_MK"}), Options{StateDir: dir}); err == nil || !strings.Contains(err.Error(), "not the one the keys") {
		t.Fatalf("opened with the wrong master key: %v", err)
	}
	if _, err := ks2.Signer(ctx, "missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing key: %v", err)
	}
	if err := ks2.Delete(ctx, "cert-www-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "keys", "cert-www-1.sealed")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal("sealed file survived Delete")
	}
	if _, err := ks.Generate(ctx, "../x", ECDSAP256); err == nil {
		t.Fatal("path traversal in key name accepted")
	}
}

// assertNoKeyOnDisk scans dir for PEM private keys and for the raw key bytes.
func assertNoKeyOnDisk(t testing.TB, dir string, raw []byte) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
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
}

func TestPKCS11KeysSensitive(t *testing.T) {
	ks := openHSM(t)
	ctx := context.Background()
	s, err := ks.Generate(ctx, "t-sensitive", ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	if err := signVerify(t, s); err != nil {
		t.Fatal(err)
	}
	if got := ks.Describe(); got != "pkcs11 token fulcrum" {
		t.Fatalf("Describe = %q", got)
	}
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, "t-sensitive")
	// Found again by label.
	if err := ks.Delete(ctx, "t-sensitive"); err != nil {
		t.Fatal(err)
	}
	if _, err := ks.Signer(ctx, "t-sensitive"); err == nil {
		t.Fatal("deleted key found")
	}
}

func TestPKCS11Outage(t *testing.T) {
	ks := openHSM(t)
	ctx := context.Background()
	s, err := ks.Generate(ctx, "t-outage", ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	if err := signVerify(t, s); err != nil {
		t.Fatal(err)
	}
	if err := token.Remove(); err != nil {
		t.Fatal(err)
	}
	restored := false
	defer func() {
		if !restored {
			token.Restore()
		}
	}()
	failed := false
	for i := 0; i < 200 && !failed; i++ {
		if err := signVerify(t, s); err != nil {
			t.Logf("sign during outage: %v", err)
			failed = true
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !failed {
		t.Fatal("signatures kept working with the token removed")
	}
	if err := token.Restore(); err != nil {
		t.Fatal(err)
	}
	restored = true
	start := time.Now()
	for {
		err := signVerify(t, s)
		if err == nil {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("no recovery 5s after restore: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("recovered %v after restore; rebuilds=%d", time.Since(start), ks.Stats().Rebuilds.Load())
}

func benchSign(b *testing.B, ks Keystore) {
	s, err := ks.Generate(context.Background(), "bench-sign", ECDSAP256)
	if err != nil {
		b.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSignECDSAP256PKCS11(b *testing.B) { benchSign(b, openHSM(b)) }
func BenchmarkSignECDSAP256Software(b *testing.B) {
	dir := b.TempDir()
	ks, err := Open(context.Background(), softwareConfig(b, dir, configs.Keystore{}), Options{StateDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	benchSign(b, ks)
}

// TestPKCS11Import: keys imported into the token (ECDSA P-256 and P-384, RSA-2048) sign as the
// originals would, are found again by name after a reopen, cannot be read back out of the token,
// and a second import under the same name replaces the first.
func TestPKCS11Import(t *testing.T) {
	ks := openHSM(t)
	ctx := context.Background()
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	r2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	keys := map[string]crypto.Signer{"t-import-p256": p256, "t-import-p384": p384, "t-import-rsa": r2048}
	for name, key := range keys {
		s, err := ks.Import(ctx, name, key)
		if err != nil {
			t.Fatalf("import %s: %v", name, err)
		}
		verifyWith(t, name, s, key.Public())
		softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, name)
	}
	// Another process (a restart) finds them by name.
	ks2 := openHSM(t)
	for name, key := range keys {
		s, err := ks2.Signer(ctx, name)
		if err != nil {
			t.Fatalf("find imported %s after reopen: %v", name, err)
		}
		verifyWith(t, name+" (reopened)", s, key.Public())
	}
	// Importing again under a name replaces the key.
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := ks.Import(ctx, "t-import-p256", other); err != nil {
		t.Fatal(err)
	}
	s, err := openHSM(t).Signer(ctx, "t-import-p256")
	if err != nil {
		t.Fatal(err)
	}
	verifyWith(t, "re-imported", s, other.Public())
	// What the token cannot hold is refused, naming the reason.
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if _, err := ks.Import(ctx, "t-import-p224", p224); err == nil || !strings.Contains(err.Error(), "P-224") {
		t.Fatalf("P-224 import: err = %v, want a refusal naming the curve", err)
	}
	for name := range keys {
		if err := ks.Delete(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
}

// verifyWith signs with s (PKCS#1 v1.5 and PSS for RSA, as TLS uses both) and verifies with pub.
func verifyWith(t *testing.T, what string, s crypto.Signer, pub crypto.PublicKey) {
	t.Helper()
	d := sha256.Sum256([]byte("imported"))
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
		if err != nil || !ecdsa.VerifyASN1(pub, d[:], sig) {
			t.Fatalf("%s: ECDSA signature: err %v, or it does not verify with the original key", what, err)
		}
	case *rsa.PublicKey:
		sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
		if err != nil || rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) != nil {
			t.Fatalf("%s: RSA PKCS#1 v1.5 signature: err %v, or it does not verify", what, err)
		}
		pss := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
		sig, err = s.Sign(rand.Reader, d[:], pss)
		if err != nil || rsa.VerifyPSS(pub, crypto.SHA256, d[:], sig, pss) != nil {
			t.Fatalf("%s: RSA-PSS signature: err %v, or it does not verify", what, err)
		}
	default:
		t.Fatalf("%s: public key %T", what, pub)
	}
}

// softwareConfig is k as the binary runs it: a software keystore under state_dir dir, validated and
// defaulted by configs (the keystore applies no defaults of its own).
func softwareConfig(t testing.TB, dir string, k configs.Keystore) configs.Keystore {
	t.Helper()
	k.Type = "software"
	c, err := configtest.Load(dir, configs.Config{Server: configs.Server{StateDir: dir}, Keystore: k})
	if err != nil {
		t.Fatal(err)
	}
	return c.Keystore
}
