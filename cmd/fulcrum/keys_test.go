package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
)

// The README's wrapping commands, as a script the tests run (certs/keystore checks that the
// README shows exactly these lines).
const wrapScript = "../../certs/keystore/testdata/wrap-key.sh"

func openssl(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("openssl", args...).CombinedOutput(); err != nil {
		t.Fatalf("openssl %v: %v\n%s", args, err, out)
	}
}

// keysConfig is a PKCS#11 keystore, a token-authenticated admin endpoint, one issued
// certificate and, when imported is set, certificates for imported keys on an HTTPS listener.
func keysConfig(t testing.TB, dir, admin, web string, imported bool) string {
	t.Helper()
	ks := softhsmtest.Keystore()
	for role, tok := range map[string]string{"viewer": viewerToken, "key_admin": keyAdminToken, "operator": operatorToken} {
		os.WriteFile(filepath.Join(dir, role+".token"), []byte(tok), 0o600)
	}
	listener := ""
	if imported {
		listener = `
[[certificates]]
name = "legacy-ec"
imported = true

[[certificates]]
name = "legacy-rsa"
imported = true

[[listeners]]
name = "legacy"
style = "application"
protocol = "https"
address = "` + web + `"
certificates = ["www", "legacy-ec", "legacy-rsa"]
default_action = { fixed_response = { status = 200, content_type = "text/plain", body = "ok" } }
`
	}
	return fmt.Sprintf(`[server]
admin = %q
state_dir = %q
shutdown_timeout = "5s"

[[server.admin_tokens]]
name = "grafana"
secret = "file:viewer.token"
role = "viewer"

[[server.admin_tokens]]
name = "deploy"
secret = "file:operator.token"
role = "operator"

[[server.admin_tokens]]
name = "sec-team"
secret = "file:key_admin.token"
role = "key_admin"

[keystore]
type = %q
module = %q
token_label = %q
pin = %q

[[authorities]]
name = "internal"

[[certificates]]
name = "www"
domains = ["www.example.test"]
authority = "internal"
%s`, admin, dir, ks.Type, ks.Module, ks.TokenLabel, ks.Pin, listener)
}

// TestKeysEndToEnd is the operator's session: keys wrapped with openssl are imported into the
// HSM through the CLI and serve TLS; deletion is scheduled, survives a restart, is cancelled,
// scheduled again and carried out when the period ends; every step is in the audit log.
func TestKeysEndToEnd(t *testing.T) {
	softhsmtest.Need(t, hsm)
	if _, err := exec.LookPath("pkcs11-tool"); err != nil {
		t.Fatal("pkcs11-tool (opensc) is not installed")
	}
	dir := t.TempDir()
	admin, web := configtest.Addr(t), configtest.Addr(t)
	path := filepath.Join(dir, "fulcrum.toml")
	d := startTestDaemon(t, path, keysConfig(t, dir, admin, web, false))

	keys := func(token string, args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		full := append([]string{"keys"}, args...)
		full = append(full, "-config", path)
		if token != "" {
			full = append(full, "-admin-token", "file:"+filepath.Join(dir, token+".token"))
		}
		code := run(full, &out, &errb)
		return code, out.String(), errb.String()
	}
	mustKeys := func(token string, args ...string) string {
		t.Helper()
		code, out, errs := keys(token, args...)
		if code != 0 {
			t.Fatalf("fulcrum keys %v: %d\n%s%s", args, code, out, errs)
		}
		return out
	}

	// Import: an EC P-256 and an RSA-2048 key, plus a spare EC key no certificate uses.
	type imp struct{ key, kt, cn string }
	imps := []imp{{"legacy-ec-key", "ecdsa-p256", "legacy-ec.example.test"}, {"legacy-rsa-key", "rsa-2048", "legacy-rsa.example.test"}, {"spare-key", "ecdsa-p256", ""}}
	for _, im := range imps {
		kf := filepath.Join(dir, im.key+".pem")
		if im.kt == "rsa-2048" {
			openssl(t, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", kf)
		} else {
			openssl(t, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", kf)
		}
		if code, _, errs := keys("operator", "import-params", im.key, "-type", im.kt, "-out", dir); code == 0 || !strings.Contains(errs, "needs key_admin") {
			t.Fatalf("operator ran import-params: %d %s", code, errs)
		}
		mustKeys("key_admin", "import-params", im.key, "-type", im.kt, "-out", dir)
		wrapped := filepath.Join(dir, im.key+".wrapped")
		if out, err := exec.Command("sh", wrapScript, kf, filepath.Join(dir, im.key+".wrapping-key.pem"), wrapped).CombinedOutput(); err != nil {
			t.Fatalf("wrap: %v\n%s", err, out)
		}
		out := mustKeys("key_admin", "import", im.key, "-wrapped", wrapped, "-token", filepath.Join(dir, im.key+".import-token"))
		if !strings.Contains(out, "pkcs11 token") {
			t.Fatalf("import: %s", out)
		}
		if im.cn != "" {
			openssl(t, "req", "-new", "-x509", "-key", kf, "-subj", "/CN="+im.cn, "-addext", "subjectAltName=DNS:"+im.cn, "-days", "30", "-out", filepath.Join(dir, im.key+".crt"))
		}
	}
	// The token reused: refused.
	if code, _, errs := keys("key_admin", "import", "spare-key", "-wrapped", filepath.Join(dir, "spare-key.wrapped"), "-token", filepath.Join(dir, "spare-key.import-token")); code == 0 || !strings.Contains(errs, "no import of spare-key in progress") {
		t.Fatalf("reused token: %d %s", code, errs)
	}

	// pkcs11-tool sees sensitive, non-extractable private keys.
	out, err := exec.Command("pkcs11-tool", "--module", softhsmtest.Module, "--token-label", softhsmtest.Label,
		"--login", "--pin", softhsmtest.Pin, "--list-objects", "--type", "privkey").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool: %v\n%s", err, out)
	}
	for _, im := range imps {
		access := objectAccess(string(out), im.key)
		if !strings.Contains(access, "sensitive") || strings.Contains(access, "extractable") {
			t.Fatalf("%s: Access %q\n%s", im.key, access, out)
		}
	}

	// Certificates for the imported keys, then served after a reload.
	for _, c := range []struct{ cert, key string }{{"legacy-ec", "legacy-ec-key"}, {"legacy-rsa", "legacy-rsa-key"}} {
		var o, e bytes.Buffer
		if code := run([]string{"certs", "import", c.cert, "-cert", filepath.Join(dir, c.key+".crt"), "-keystore-key", c.key, "-config", path}, &o, &e); code != 0 {
			t.Fatalf("certs import %s: %s%s", c.cert, o.String(), e.String())
		}
	}
	writeConfig(t, path, keysConfig(t, dir, admin, web, true))
	if res := d.reload("test"); !res.OK {
		t.Fatalf("reload: %v", res.Errors)
	}
	for _, sni := range []string{"legacy-ec.example.test", "legacy-rsa.example.test"} {
		conn, err := tls.Dial("tcp", web, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("handshake %s: %v", sni, err)
		}
		if cn := conn.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != sni {
			t.Fatalf("served %s for %s", cn, sni)
		}
		conn.Close()
	}

	// Scheduled deletion.
	if code, _, errs := keys("key_admin", "schedule-deletion", "legacy-ec-key", "-days", "7"); code == 0 || !strings.Contains(errs, "certificate legacy-ec") {
		t.Fatalf("scheduling a served key: %d %s", code, errs)
	}
	if code, _, errs := keys("key_admin", "schedule-deletion", "spare-key", "-days", "3"); code == 0 || !strings.Contains(errs, "7 to 30") {
		t.Fatalf("3 days: %d %s", code, errs)
	}
	if code, _, errs := keys("viewer", "schedule-deletion", "spare-key"); code == 0 || !strings.Contains(errs, "403") {
		t.Fatalf("viewer scheduled: %d %s", code, errs)
	}
	if code, _, errs := keys("", "list"); code == 0 || !strings.Contains(errs, "401") {
		t.Fatalf("unauthenticated list: %d %s", code, errs)
	}
	mustKeys("key_admin", "schedule-deletion", "spare-key", "-days", "7")
	if _, err := d.managed().Signer(context.Background(), "spare-key"); err == nil {
		t.Fatal("a key pending deletion still signs")
	}
	var o, e bytes.Buffer
	if code := run([]string{"certs", "import", "legacy-ec", "-cert", filepath.Join(dir, "legacy-ec-key.crt"), "-keystore-key", "spare-key", "-config", path}, &o, &e); code == 0 || !strings.Contains(e.String(), "pending deletion") {
		t.Fatalf("a pending key backed a certificate: %s", e.String())
	}
	var js []struct {
		Name   string `json:"name"`
		State  string `json:"state"`
		UsedBy string `json:"used_by"`
	}
	if err := json.Unmarshal([]byte(mustKeys("viewer", "list", "-o", "json")), &js); err != nil || len(js) < 3 {
		t.Fatalf("keys list -o json: %v %+v", err, js)
	}
	list := mustKeys("viewer", "list")
	if !keyLine(list, "spare-key", "pending_deletion") || !keyLine(list, "legacy-ec-key", "certificate legacy-ec") {
		t.Fatalf("keys list:\n%s", list)
	}

	// A restart keeps the schedule.
	d.stop()
	d = startTestDaemon(t, path, keysConfig(t, dir, admin, web, true))
	if list := mustKeys("viewer", "list"); !keyLine(list, "spare-key", "pending_deletion") {
		t.Fatalf("after restart:\n%s", list)
	}
	mustKeys("key_admin", "cancel-deletion", "spare-key")
	if _, err := d.managed().Signer(context.Background(), "spare-key"); err != nil {
		t.Fatalf("cancelled, yet: %v", err)
	}
	mustKeys("key_admin", "schedule-deletion", "spare-key") // 30 days by default
	clk := &fakeClock{t: time.Now()}
	d.managed().SetClock(clk.now)
	clk.add(29 * 24 * time.Hour)
	d.managed().Sweep(context.Background())
	if list := mustKeys("viewer", "list"); !keyLine(list, "spare-key", "pending_deletion") {
		t.Fatalf("destroyed early:\n%s", list)
	}
	clk.add(24*time.Hour + time.Minute)
	d.managed().Sweep(context.Background())
	if list := mustKeys("viewer", "list"); strings.Contains(list, "spare-key") {
		t.Fatalf("not destroyed:\n%s", list)
	}
	out, _ = exec.Command("pkcs11-tool", "--module", softhsmtest.Module, "--token-label", softhsmtest.Label,
		"--login", "--pin", softhsmtest.Pin, "--list-objects").CombinedOutput()
	if strings.Contains(string(out), "spare-key") {
		t.Fatalf("spare-key still in the token:\n%s", out)
	}
	// The served keys still serve.
	conn, err := tls.Dial("tcp", web, &tls.Config{ServerName: "legacy-rsa.example.test", InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	d.stop()

	// The audit log: one line per action, with the caller.
	recs := readAudit(t, filepath.Join(dir, "audit.log"))
	want := []struct{ identity, action, object, result string }{
		{"token:deploy", "POST /admin/keys/legacy-ec-key/import-params", "legacy-ec-key", "denied"},
		{"token:sec-team", "import-params", "legacy-ec-key", "ok"},
		{"token:sec-team", "import", "legacy-ec-key", "ok"},
		{"token:sec-team", "import", "legacy-rsa-key", "ok"},
		{"token:sec-team", "import", "spare-key", "ok"},
		{"token:sec-team", "import", "spare-key", "error"},
		{"token:sec-team", "schedule-deletion", "legacy-ec-key", "error"},
		{"token:sec-team", "schedule-deletion", "spare-key", "error"},
		{"token:grafana", "POST /admin/keys/spare-key/schedule-deletion", "spare-key", "denied"},
		{"anonymous", "GET /admin/keys", "", "denied"},
		{"token:sec-team", "schedule-deletion", "spare-key", "ok"},
		{"token:sec-team", "cancel-deletion", "spare-key", "ok"},
		{"fulcrum", "destroy", "spare-key", "ok"},
	}
	for _, w := range want {
		n := 0
		for _, r := range recs {
			if r.Identity == w.identity && r.Action == w.action && r.Object == w.object && r.Result == w.result {
				n++
			}
		}
		min := 1
		if w.action == "schedule-deletion" && w.result == "ok" {
			min = 2
		}
		if n < min {
			t.Errorf("audit: %d lines %+v", n, w)
		}
	}
	signed := false
	for _, r := range recs {
		if r.Action == "sign" && strings.HasSuffix(r.Object, "legacy-ec-key") && r.Count >= 1 {
			signed = true
		}
	}
	if !signed {
		t.Error("no signing summary for legacy-ec-key")
	}
}

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// objectAccess is the "Access:" line pkcs11-tool prints for the object labelled label.
func objectAccess(out, label string) string {
	blocks := strings.Split(out, "Private Key Object")
	for _, b := range blocks {
		if strings.Contains(b, "label:      "+label+"\n") {
			for _, l := range strings.Split(b, "\n") {
				if a, ok := strings.CutPrefix(strings.TrimSpace(l), "Access:"); ok {
					return strings.TrimSpace(a)
				}
			}
		}
	}
	return ""
}

func keyLine(list, key, want string) bool {
	for _, l := range strings.Split(list, "\n") {
		if strings.HasPrefix(l, key+" ") && strings.Contains(l, want) {
			return true
		}
	}
	return false
}
