package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// clientCert issues an admin client certificate from ca and writes it and its key as PEM files.
func clientCert(t testing.TB, ca *configtest.CA, dir, cn string) tls.Certificate {
	t.Helper()
	c := ca.Issue(t, []string{cn}, x509.ExtKeyUsageClientAuth)
	configtest.WritePair(t, dir, cn, c)
	return c
}

// authConfig is an HTTPS admin endpoint with three bearer tokens and two client certificates.
func authConfig(t testing.TB, dir, admin, extra string) string {
	t.Helper()
	for role, tok := range map[string]string{"viewer": viewerToken, "operator": operatorToken, "key_admin": keyAdminToken} {
		if err := os.WriteFile(filepath.Join(dir, role+".token"), []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return fmt.Sprintf(`[server]
admin = %q
state_dir = %q
shutdown_timeout = "5s"
admin_tls_certificate = "admin"
admin_client_ca = "clients-ca.pem"

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

[[server.admin_clients]]
common_name = "alice"
role = "key_admin"

[[server.admin_clients]]
common_name = "bob"
role = "viewer"

%s
[[authorities]]
name = "test-ca"

[[certificates]]
name = "admin"
domains = ["127.0.0.1"]
authority = "test-ca"
`, admin, dir, extra)
}

const (
	viewerToken   = "viewer-0123456789abcdef0123456789"
	operatorToken = "operator-0123456789abcdef01234567"
	keyAdminToken = "keyadmin-0123456789abcdef01234567"
)

type auditRecord struct {
	Time     time.Time `json:"time"`
	Identity string    `json:"identity"`
	Role     string    `json:"role"`
	Action   string    `json:"action"`
	Object   string    `json:"object"`
	Result   string    `json:"result"`
	Error    string    `json:"error"`
	Count    uint64    `json:"count"`
	Errors   uint64    `json:"errors"`
}

func readAudit(t testing.TB, path string) []auditRecord {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []auditRecord
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r auditRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		if r.Time.IsZero() || r.Identity == "" || r.Action == "" || r.Result == "" {
			t.Fatalf("audit line lacks a field: %s", sc.Text())
		}
		out = append(out, r)
	}
	return out
}

func TestAdminRoles(t *testing.T) {
	dir := t.TempDir()
	ca := configtest.NewCA(t, "Ops Clients CA")
	ca.WriteCA(t, dir, "clients-ca.pem")
	admin := configtest.Addr(t)
	path := filepath.Join(dir, "fulcrum.toml")
	d := startTestDaemon(t, path, authConfig(t, dir, admin, ""))
	base := "https://" + admin
	pool := caPool(t, dir, "test-ca")

	alice := clientCert(t, ca, dir, "alice")
	bob := clientCert(t, ca, dir, "bob")
	carol := clientCert(t, ca, dir, "carol") // the right authority, but not in admin_clients
	client := func(cert *tls.Certificate) *http.Client {
		tc := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
		if cert != nil {
			tc.Certificates = []tls.Certificate{*cert}
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: tc}, Timeout: 30 * time.Second}
	}
	type who struct {
		name   string
		c      *http.Client
		token  string
		role   string // "" unauthenticated
		denied bool   // credentials presented but refused
	}
	callers := []who{
		{"nobody", client(nil), "", "", false},
		{"wrong token", client(nil), "not-a-configured-token-0123456789", "", true},
		{"viewer token", client(nil), viewerToken, "viewer", false},
		{"operator token", client(nil), operatorToken, "operator", false},
		{"key_admin token", client(nil), keyAdminToken, "key_admin", false},
		{"alice cert", client(&alice), "", "key_admin", false},
		{"bob cert", client(&bob), "", "viewer", false},
		{"carol cert", client(&carol), "", "", true},
	}
	calls := []struct {
		method, path string
		need         string // "" public
	}{
		{"GET", "/healthz", ""},
		{"GET", "/readyz", ""},
		{"GET", "/metrics", "viewer"},
		{"GET", "/admin/certificates", "viewer"},
		{"GET", "/admin/config", "viewer"},
		{"GET", "/admin/keys", "viewer"},
		{"POST", "/admin/reload", "operator"},
		{"POST", "/admin/certificates/admin/renew", "operator"},
		{"POST", "/admin/keys/no-such-key/cancel-deletion", "key_admin"},
		{"GET", "/admin/no-such-page", "viewer"},
	}
	rank := map[string]int{"": 0, "viewer": 1, "operator": 2, "key_admin": 3}
	for _, w := range callers {
		for _, c := range calls {
			req, _ := http.NewRequest(c.method, base+c.path, nil)
			if w.token != "" {
				req.Header.Set("Authorization", "Bearer "+w.token)
			}
			resp, err := w.c.Do(req)
			if err != nil {
				t.Fatalf("%s %s %s: %v", w.name, c.method, c.path, err)
			}
			resp.Body.Close()
			allowed := c.need == "" || rank[w.role] >= rank[c.need]
			switch {
			case allowed && (resp.StatusCode == 401 || resp.StatusCode == 403):
				t.Errorf("%s %s %s: %d, want allowed", w.name, c.method, c.path, resp.StatusCode)
			case !allowed && w.role == "" && resp.StatusCode != 401:
				t.Errorf("%s %s %s: %d, want 401", w.name, c.method, c.path, resp.StatusCode)
			case !allowed && w.role != "" && resp.StatusCode != 403:
				t.Errorf("%s %s %s: %d, want 403", w.name, c.method, c.path, resp.StatusCode)
			}
		}
	}
	// A certificate from another authority with a configured name authenticates nobody.
	stranger := clientCert(t, configtest.NewCA(t, "Other CA"), dir, "alice")
	if resp, err := client(&stranger).Get(base + "/admin/keys"); err == nil {
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("a client certificate from another authority: %d", resp.StatusCode)
		}
	}

	if res := d.reload("SIGHUP"); !res.OK {
		t.Fatalf("SIGHUP reload: %v", res.Errors)
	}
	d.stop()
	recs := readAudit(t, filepath.Join(dir, "audit.log"))
	count := func(identity, action, result string) int {
		n := 0
		for _, r := range recs {
			if r.Identity == identity && strings.HasPrefix(r.Action, action) && r.Result == result {
				n++
			}
		}
		return n
	}
	if n := count("token:deploy", "POST /admin/reload", "ok"); n != 1 {
		t.Errorf("operator's reload: %d audit lines", n)
	}
	if n := count("token:grafana", "POST /admin/reload", "denied"); n != 1 {
		t.Errorf("viewer's refused reload: %d audit lines", n)
	}
	if n := count("anonymous", "POST /admin/reload", "denied"); n != 2 { // nobody + wrong token
		t.Errorf("unauthenticated reloads: %d audit lines", n)
	}
	if n := count("cert:carol", "GET /admin/keys", "denied"); n != 1 {
		t.Errorf("carol's refused read: %d audit lines", n)
	}
	if n := count("cert:alice", "cancel-deletion", "error"); n != 1 {
		t.Errorf("alice's cancel-deletion: %d audit lines", n)
	}
	if n := count("fulcrum", "generate", "ok"); n < 2 { // the authority's and the certificate's keys
		t.Errorf("key generation at start: %d audit lines", n)
	}
	if n := count("signal:SIGHUP", "reload", "ok"); n != 1 {
		t.Errorf("SIGHUP reload: %d audit lines", n)
	}
	// Health probes and reads are not written; writes and refusals are.
	if n := count("token:grafana", "GET /admin/keys", "ok"); n != 0 {
		t.Errorf("reads are audited: %d lines", n)
	}
}

// An admin endpoint without credentials answers health probes only, and says why.
func TestAdminNoCredentials(t *testing.T) {
	dir := t.TempDir()
	admin := configtest.Addr(t)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), fmt.Sprintf(`[server]
admin = %q
state_dir = %q
`, admin, dir))
	c := httpClient()
	if s, _ := fetch(t, c, "GET", d.admin+"/healthz", nil); s != 200 {
		t.Fatalf("/healthz: %d", s)
	}
	s, body := fetch(t, c, "POST", d.admin+"/admin/reload", nil)
	if s != 401 || !strings.Contains(body, "admin_auth") {
		t.Fatalf("unauthenticated reload: %d %s", s, body)
	}
	if s, _ := fetch(t, c, "GET", d.admin+"/metrics", nil); s != 401 {
		t.Fatalf("/metrics: %d", s)
	}
}

// validate finds what the admin endpoint's start would fail on: a token file that is missing,
// a directory or too short, a client authority that is missing or holds no certificate, and an
// audit or access log that cannot be created. Each is one positioned line; the start fails on
// the same file.
func TestValidateAdminFiles(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "short.token"), []byte("abc\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "junk-ca.pem"), []byte("not a certificate\n"), 0o600)
	os.Mkdir(filepath.Join(dir, "dir.token"), 0o700)
	os.WriteFile(filepath.Join(dir, "plain"), []byte("a file, not a directory"), 0o600)
	for _, tc := range []struct{ name, add, want string }{
		{"missing token", "[[server.admin_tokens]]\nname = \"deploy\"\nsecret = \"file:missing.token\"\nrole = \"operator\"\n",
			"server.admin_tokens[0] (\"deploy\"): secret missing.token does not exist"},
		{"token is a directory", "[[server.admin_tokens]]\nname = \"deploy\"\nsecret = \"file:dir.token\"\nrole = \"operator\"\n",
			"secret dir.token cannot be read: is a directory"},
		{"short token", "[[server.admin_tokens]]\nname = \"deploy\"\nsecret = \"file:short.token\"\nrole = \"operator\"\n",
			"secret short.token holds 3 bytes, want at least 16"},
		{"audit log under a file", "", "audit_log plain/audit.log cannot be created"},
		{"access log under a file", "", "access_log plain/logs/access.log cannot be created"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := strings.Replace(minimalConfig(dir, "127.0.0.1:18095", "127.0.0.1:18096"), "admin_auth = \"none\"\n", "", 1) + "\n" + tc.add
			switch tc.name {
			case "audit log under a file":
				text = strings.Replace(text, "[server]\n", "[server]\naudit_log = \"plain/audit.log\"\n", 1)
			case "access log under a file":
				text = strings.Replace(text, "access_log = \"\"", "access_log = \"plain/logs/access.log\"", 1)
			}
			path := filepath.Join(dir, "f.toml")
			writeConfig(t, path, text)
			code, _, errs := cliRun("validate", path)
			if code != 1 || !strings.Contains(errs, tc.want) {
				t.Fatalf("validate: exit %d: %s, want %q", code, errs, tc.want)
			}
			if !strings.Contains(errs, "f.toml:") {
				t.Fatalf("validate: no file position: %s", errs)
			}
		})
	}
	// A client authority that is missing, or holds no certificate (it needs the admin endpoint
	// over HTTPS).
	for _, ca := range []string{"missing-ca.pem", "junk-ca.pem"} {
		text := strings.Replace(minimalConfig(dir, "127.0.0.1:18095", "127.0.0.1:18096"), "admin_auth = \"none\"\n",
			fmt.Sprintf("admin_client_ca = %q\nadmin_tls_certificate = \"admin\"\n", ca), 1) + `
[[server.admin_clients]]
common_name = "alice"
role = "key_admin"

[[authorities]]
name = "internal"

[[certificates]]
name = "admin"
domains = ["localhost"]
authority = "internal"
`
		path := filepath.Join(dir, "ca.toml")
		writeConfig(t, path, text)
		code, _, errs := cliRun("validate", path)
		if code != 1 || !strings.Contains(errs, "admin_client_ca "+ca) {
			t.Fatalf("admin_client_ca %s: exit %d: %s", ca, code, errs)
		}
	}
}
