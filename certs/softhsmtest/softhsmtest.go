// Package softhsmtest creates a throw-away SoftHSM2 token for a test package (as httptest
// gives tests a server): a real PKCS#11 token, never a mock. Only tests import it.
//
// SOFTHSM2_CONF is read by the module at C_Initialize and is process-wide, so a test package
// calls Setup once from TestMain and all its tests share the token.
package softhsmtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// Module is where Debian/Ubuntu install SoftHSM2.
const Module = "/usr/lib/softhsm/libsofthsm2.so"

// Token labels and PINs used by the tests.
const (
	Label = "fulcrum"
	Pin   = "1234"
	SOPin = "5678"
	// PinEnv is the environment variable Run sets to Pin: configurations name the PIN as
	// "env:"+PinEnv, as an operator's would.
	PinEnv = "TEST_HSM_PIN"
)

// Keystore is the [keystore] of a configuration that uses the test token.
func Keystore() configs.Keystore {
	return configs.Keystore{Type: "pkcs11", Module: Module, TokenLabel: Label, Pin: "env:" + PinEnv, MaxSessions: 8}
}

// Run is a test package's TestMain body: with SoftHSM2 installed it creates a token in a
// temporary directory, sets *tok, PinEnv and SOFTHSM2_CONF (for this process and the binaries
// it starts), runs the tests and removes the token; without it, *tok stays nil (see Need).
//
//	func TestMain(m *testing.M) { os.Exit(softhsmtest.Run(m, &token)) }
func Run(m *testing.M, tok **Token) int {
	if !Available() {
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "fulcrum-softhsm-")
	if err == nil {
		*tok, err = Setup(dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "softhsm2 setup:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	os.Setenv(PinEnv, Pin)
	return m.Run()
}

// Need skips t when tok is nil and MustSkip allows it, and fails t in CI, where a missing
// SoftHSM2 is an installation error.
func Need(t testing.TB, tok *Token) {
	t.Helper()
	if tok != nil {
		return
	}
	if MustSkip() {
		t.Skip("softhsm2 is not installed")
	}
	t.Fatal("softhsm2 is not installed (CI must install it)")
}

// Token is a SoftHSM2 token in a temporary directory.
type Token struct {
	Dir      string // the directory holding SOFTHSM2_CONF and tokens/
	TokenDir string // directories.tokendir
}

// Available reports whether the module and the softhsm2-util tool are installed.
func Available() bool {
	if _, err := os.Stat(Module); err != nil {
		return false
	}
	_, err := exec.LookPath("softhsm2-util")
	return err == nil
}

// MustSkip reports whether tests needing SoftHSM may be skipped: only when it is absent and
// CI is unset (in CI a missing HSM is a failure).
func MustSkip() bool { return !Available() && os.Getenv("CI") == "" }

// Setup creates a token labelled Label under dir and points SOFTHSM2_CONF at it.
func Setup(dir string) (*Token, error) {
	if !Available() {
		return nil, fmt.Errorf("softhsm2 is not installed (%s)", Module)
	}
	t := &Token{Dir: dir, TokenDir: filepath.Join(dir, "tokens")}
	if err := os.MkdirAll(t.TokenDir, 0o700); err != nil {
		return nil, err
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", t.TokenDir)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		return nil, err
	}
	os.Setenv("SOFTHSM2_CONF", conf)
	out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", Label, "--pin", Pin, "--so-pin", SOPin).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("softhsm2-util --init-token: %v: %s", err, out)
	}
	return t, nil
}

// Remove moves the token's files away (an HSM outage); Restore puts them back.
func (t *Token) Remove() error  { return os.Rename(t.TokenDir, t.TokenDir+".away") }
func (t *Token) Restore() error { return os.Rename(t.TokenDir+".away", t.TokenDir) }

// AssertSensitive reads CKA_VALUE of the private key labelled name directly through PKCS#11
// and expects CKR_ATTRIBUTE_SENSITIVE. It never finalizes the module, which the keystore
// shares in this process.
func AssertSensitive(t testing.TB, module, label, pin, name string) {
	t.Helper()
	p := pkcs11.New(module)
	if p == nil {
		t.Fatal("load module")
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		t.Fatal(err)
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	var slot uint
	found := false
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && ti.Label == label {
			slot, found = s, true
		}
	}
	if !found {
		t.Fatal("token not found")
	}
	sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer p.CloseSession(sh)
	if err := p.Login(sh, pkcs11.CKU_USER, pin); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		t.Fatal(err)
	}
	if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, name),
	}); err != nil {
		t.Fatal(err)
	}
	objs, _, err := p.FindObjects(sh, 4)
	p.FindObjectsFinal(sh)
	if err != nil || len(objs) != 1 {
		t.Fatalf("find private key %s: %v (%d objects)", name, err, len(objs))
	}
	// The secret is CKA_VALUE for EC keys and CKA_PRIVATE_EXPONENT (with the primes) for RSA.
	secret, secretName := uint(pkcs11.CKA_VALUE), "CKA_VALUE"
	kt, err := p.GetAttributeValue(sh, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)})
	if err == nil && len(kt) == 1 && len(kt[0].Value) > 0 && kt[0].Value[0] == byte(pkcs11.CKK_RSA) {
		secret, secretName = pkcs11.CKA_PRIVATE_EXPONENT, "CKA_PRIVATE_EXPONENT"
	}
	_, err = p.GetAttributeValue(sh, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(secret, nil)})
	if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
		t.Fatalf("reading %s of %s: got %v, want CKR_ATTRIBUTE_SENSITIVE", secretName, name, err)
	}
	attrs, err := p.GetAttributeValue(sh, objs[0], []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil)})
	if err != nil {
		t.Fatal(err)
	}
	if attrs[0].Value[0] != 1 || attrs[1].Value[0] != 0 {
		t.Fatalf("CKA_SENSITIVE=%v CKA_EXTRACTABLE=%v", attrs[0].Value, attrs[1].Value)
	}
}
