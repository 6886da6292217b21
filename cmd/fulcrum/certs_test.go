package main

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestCertsCommand runs `fulcrum certs` as an operator does, with the software keystore and
// with a SoftHSM2 token: import an externally issued certificate into a configuration that
// already names it (imported = true), then list, show, export and renew.
func TestCertsCommand(t *testing.T) {
	for _, ks := range []string{"software", "pkcs11"} {
		t.Run(ks, func(t *testing.T) {
			dir := t.TempDir()
			keystore := `type = "software"`
			if ks == "pkcs11" {
				softhsmtest.Need(t, hsm)
				ks := softhsmtest.Keystore()
				keystore = fmt.Sprintf("type = %q\nmodule = %q\ntoken_label = %q\npin = %q", ks.Type, ks.Module, ks.TokenLabel, ks.Pin)
			}
			certPEM, keyPEM, leaf := externalCert(t, "legacy.example.test")
			certFile, keyFile := filepath.Join(dir, "legacy.pem"), filepath.Join(dir, "legacy.key")
			os.WriteFile(certFile, certPEM, 0o600)
			os.WriteFile(keyFile, keyPEM, 0o600)
			cfgPath := filepath.Join(dir, "fulcrum.toml")
			writeConfig(t, cfgPath, fmt.Sprintf(`[server]
admin = ""
state_dir = "state"

[keystore]
%s

[[authorities]]
name = "internal"

[[certificates]]
name = "www"
domains = ["www.example.test"]
authority = "internal"

[[certificates]]
name = "legacy"
imported = true

[[target_groups]]
name = "web"
protocol = "http"
targets = ["127.0.0.1:9"]

[[listeners]]
name = "public"
style = "application"
protocol = "https"
address = "127.0.0.1:8443"
certificates = ["legacy", "www"]
default_action = { forward = "web" }
`, keystore))
			cli := func(args ...string) (int, string, string) {
				var out, errb bytes.Buffer
				code := run(append([]string{"certs"}, append(args, "-config", cfgPath)...), &out, &errb)
				return code, out.String(), errb.String()
			}

			if code, out, errs := cli("import", "legacy", "-cert", certFile, "-key", keyFile); code != 0 {
				t.Fatalf("certs import: exit %d\n%s%s", code, out, errs)
			} else if want := "pkcs11 token " + softhsmtest.Label; ks == "pkcs11" && !strings.Contains(out, want) {
				t.Fatalf("certs import says %q, want it to name %q", out, want)
			}
			code, out, errs := cli("list")
			if code != 0 || !strings.Contains(out, "legacy") || !strings.Contains(out, "www") {
				t.Fatalf("certs list: exit %d\n%s%s", code, out, errs)
			}
			code, out, errs = cli("show", "legacy", "-o", "json")
			var ci certificateView
			if code != 0 || json.Unmarshal([]byte(out), &ci) != nil {
				t.Fatalf("certs show: exit %d\n%s%s", code, out, errs)
			}
			wantLoc := map[string]string{"software": "software", "pkcs11": "pkcs11 token " + softhsmtest.Label}[ks]
			// The serial is shown as its big-endian bytes in hex (even length, as openssl prints it).
			wantSerial := hex.EncodeToString(leaf.SerialNumber.Bytes())
			if ci.Kind != "stored" || ci.Serial != wantSerial || !strings.HasPrefix(ci.KeyLocation, wantLoc) {
				t.Fatalf("certs show legacy: kind %q serial %q key %q, want stored, %s, in %q", ci.Kind, ci.Serial, ci.KeyLocation, wantSerial, wantLoc)
			}
			if code, out, errs := cli("export", "legacy"); code != 0 || out != string(certPEM) {
				t.Fatalf("certs export: exit %d, chain equal %v\n%s", code, out == string(certPEM), errs)
			}
			if code, _, errs := cli("renew", "legacy"); code != 1 || !strings.Contains(errs, "never renewed") {
				t.Fatalf("certs renew of an imported certificate: exit %d %q, want 1 and why", code, errs)
			}
			if code, out, errs := cli("renew", "www"); code != 0 {
				t.Fatalf("certs renew www: exit %d\n%s%s", code, out, errs)
			}
			// Nothing in the state dir is the key, in any form.
			der, _ := pem.Decode(keyPEM)
			filepath.WalkDir(filepath.Join(dir, "state"), func(p string, d os.DirEntry, err error) error {
				if err == nil && !d.IsDir() {
					if b, _ := os.ReadFile(p); bytes.Contains(b, der.Bytes) || bytes.Contains(b, keyPEM) {
						t.Errorf("%s holds the imported key in the clear", p)
					}
				}
				return nil
			})
		})
	}
}

// externalCert is a certificate and key from a CA Fulcrum does not manage.
func externalCert(t *testing.T, name string) (certPEM, keyPEM []byte, leaf *x509.Certificate) {
	t.Helper()
	c := configtest.NewCA(t, "External CA").Issue(t, []string{name}, x509.ExtKeyUsageServerAuth)
	cf, kf := configtest.WritePair(t, t.TempDir(), name, c)
	certPEM, _ = os.ReadFile(cf)
	keyPEM, _ = os.ReadFile(kf)
	return certPEM, keyPEM, c.Leaf
}

// TestDuplicateTokenLabel: a second `softhsm2-util --init-token` with the same label makes two
// tokens; a keystore naming that label must refuse to guess which one holds its keys. It runs
// the binary with its own SoftHSM2 configuration, so the shared test token is not disturbed.
func TestDuplicateTokenLabel(t *testing.T) {
	softhsmtest.Need(t, hsm)
	bin := buildBinary(t)
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	os.MkdirAll(tokens, 0o700)
	conf := filepath.Join(dir, "softhsm2.conf")
	os.WriteFile(conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600)
	env := append(os.Environ(), "SOFTHSM2_CONF="+conf, "TEST_PIN=1234")
	initToken := func() {
		cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "dup", "--pin", "1234", "--so-pin", "5678")
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("softhsm2-util: %v\n%s", err, out)
		}
	}
	path := filepath.Join(dir, "fulcrum.toml")
	writeConfig(t, path, fmt.Sprintf("[server]\nadmin = \"\"\nstate_dir = %q\n\n[keystore]\ntype = \"pkcs11\"\nmodule = %q\ntoken_label = \"dup\"\npin = \"env:TEST_PIN\"\n\n[[authorities]]\nname = \"internal\"\n", dir, softhsmtest.Keystore().Module))
	certsList := func() (string, error) {
		cmd := exec.Command(bin, "certs", "authorities", path)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	initToken()
	if out, err := certsList(); err != nil {
		t.Fatalf("one token labelled dup: %v\n%s", err, out)
	}
	initToken()
	out, err := certsList()
	if err == nil || !strings.Contains(out, `token label "dup" matches 2 tokens`) {
		t.Fatalf("two tokens labelled dup: %v\n%s", err, out)
	}
}
