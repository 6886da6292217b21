package main

import (
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// adminConfig is an HTTP and an HTTPS listener in front of one echo back end, a group whose only
// target is dead (health-checked out quickly), a fixed response, and header rewrites that carry
// a credential.
func adminConfig(dir, admin, web, webTLS, backend, dead, extra string) string {
	return configHead(dir, admin, "") + fmt.Sprintf(`
[[authorities]]
name = "test-ca"
common_name = "Fulcrum Test CA"

[[certificates]]
name = "site"
domains = ["localhost", "127.0.0.1"]
authority = "test-ca"

[[target_groups]]
name = "echo"
protocol = "http"
targets = [%q]
deregistration_delay = "1s"

[[target_groups]]
name = "down"
protocol = "http"
targets = [%q]
health_check = { protocol = "tcp", interval = "100ms", timeout = "50ms", unhealthy_threshold = 1, healthy_threshold = 1 }

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "echo" }

[[listeners.rules]]
priority = 5
paths = ["/down/*"]
forward = "down"
request_headers = { set = { "Authorization" = "Bearer s3cr3t-token", "X-Env" = "test" } }

[[listeners.rules]]
priority = 10
paths = ["/missing"]
fixed_response = { status = 404, content_type = "text/plain", body = "nope" }
%s
[[listeners]]
name = "web-tls"
style = "application"
protocol = "https"
address = %q
certificates = ["site"]
default_action = { forward = "echo" }
`, backend, dead, web, extra, webTLS)
}

func TestAdminEndpoints(t *testing.T) {
	dir := t.TempDir()
	b := echoBackend(t, "b1")
	web, webTLS, dead, admin := configtest.Addr(t), configtest.Addr(t), configtest.DeadAddr(t), configtest.Addr(t)
	path := filepath.Join(dir, "fulcrum.toml")
	d := startTestDaemon(t, path, adminConfig(dir, admin, web, webTLS, hostOf(b), dead, ""))
	c := httpClient()

	t.Run("healthz+readyz", func(t *testing.T) {
		if s, body := fetch(t, c, "GET", d.admin+"/healthz", nil); s != 200 || body != "ok\n" {
			t.Fatalf("/healthz: %d %q", s, body)
		}
		if s, body := fetch(t, c, "GET", d.admin+"/readyz", nil); s != 200 || body != "ready\n" {
			t.Fatalf("/readyz: %d %q", s, body)
		}
		if s, _ := fetch(t, c, "POST", d.admin+"/healthz", nil); s != http.StatusMethodNotAllowed {
			t.Fatalf("POST /healthz: %d", s)
		}
	})

	t.Run("targets", func(t *testing.T) {
		var tv targetsResponse
		configtest.WaitFor(t, 5*time.Second, "dead target reported unhealthy", func() bool {
			fetchJSON(t, c, "GET", d.admin+"/admin/targets", &tv)
			for _, g := range tv.Groups {
				if g.Name == "down" && len(g.Targets) == 1 && g.Targets[0].State == "unhealthy" {
					return true
				}
			}
			return false
		})
		if len(tv.Groups) != 2 || tv.Groups[0].Name != "echo" || tv.Groups[1].Name != "down" {
			t.Fatalf("groups not in configuration order: %+v", tv.Groups)
		}
		e := tv.Groups[0]
		if e.Protocol != "http" || e.Healthy != 1 || len(e.Targets) != 1 || e.Targets[0].Address != hostOf(b) ||
			e.Targets[0].State != "initial" || !e.Targets[0].Healthy || e.Targets[0].Draining || e.Targets[0].HealthCheck == "" {
			// echo's checks (every 5s, 3 to pass) cannot have passed yet: routed to, but
			// "initial", not claimed healthy.
			t.Fatalf("echo group: %+v", e)
		}
		dt := tv.Groups[1].Targets[0]
		if dt.Address != dead || dt.Healthy || dt.Reason == "" || tv.Groups[1].Unhealthy != 1 {
			t.Fatalf("down target: %+v", dt)
		}
		// The raw JSON keys are the documented snake_case ones.
		_, raw := fetch(t, c, "GET", d.admin+"/admin/targets", nil)
		for _, k := range []string{`"groups"`, `"draining"`, `"address"`, `"state"`, `"reason"`, `"in_flight"`, `"consecutive_failures"`, `"health_check"`} {
			if !strings.Contains(raw, k) {
				t.Errorf("/admin/targets lacks %s:\n%s", k, raw)
			}
		}
	})

	t.Run("certificates", func(t *testing.T) {
		var cv []certificateView
		if s := fetchJSON(t, c, "GET", d.admin+"/admin/certificates", &cv); s != 200 || len(cv) != 1 {
			t.Fatalf("/admin/certificates: %d %+v", s, cv)
		}
		ci := cv[0]
		if ci.Name != "site" || ci.Kind != "issued" || !slices.Contains(ci.Domains, "localhost") || ci.Issuer != "Fulcrum Test CA" ||
			ci.Serial == "" || ci.KeyLocation == "" || ci.NotAfter.Before(time.Now()) || ci.ExpiresInSeconds <= 0 || ci.RenewAt == "" {
			t.Fatalf("certificate: %+v", ci)
		}
		_, raw := fetch(t, c, "GET", d.admin+"/admin/certificates", nil)
		for _, k := range []string{`"name"`, `"domains"`, `"issuer"`, `"serial"`, `"not_after"`, `"key_location"`} {
			if !strings.Contains(raw, k) {
				t.Errorf("/admin/certificates lacks %s", k)
			}
		}
		// The certificate is the one served.
		cl := tlsClient(caPool(t, dir, "test-ca"), "localhost")
		resp, err := cl.Get("https://" + webTLS + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := fmt.Sprintf("%x", resp.TLS.PeerCertificates[0].SerialNumber); !strings.EqualFold(strings.TrimLeft(strings.ReplaceAll(ci.Serial, ":", ""), "0"), got) {
			t.Errorf("served serial %s, admin says %s", got, ci.Serial)
		}
	})

	t.Run("config", func(t *testing.T) {
		var cv map[string]any
		if s := fetchJSON(t, c, "GET", d.admin+"/admin/config", &cv); s != 200 {
			t.Fatalf("/admin/config: %d", s)
		}
		_, raw := fetch(t, c, "GET", d.admin+"/admin/config", nil)
		if strings.Contains(raw, "s3cr3t") || strings.Contains(raw, dir+"/master.key") {
			t.Fatalf("/admin/config leaks a secret:\n%s", raw)
		}
		for _, k := range []string{`"target_groups"`, `"listeners"`, `"default_action"`, `"master_key": "file:\u003credacted\u003e"`, `"X-Env": "test"`} {
			if !strings.Contains(raw, k) {
				t.Errorf("/admin/config lacks %s:\n%s", k, raw)
			}
		}
		srv, _ := cv["server"].(map[string]any)
		if srv["admin"] != admin {
			t.Errorf("server.admin = %v", srv["admin"])
		}
	})

	t.Run("reload", func(t *testing.T) {
		if s, _ := fetch(t, c, "GET", "http://"+web+"/new", nil); s != 200 { // default action today
			t.Fatalf("before reload: %d", s)
		}
		extra := `
[[listeners.rules]]
priority = 20
paths = ["/new"]
fixed_response = { status = 201, content_type = "text/plain", body = "new route" }
`
		writeConfig(t, path, adminConfig(dir, admin, web, webTLS, hostOf(b), dead, extra))
		var res reloadResult
		if s := fetchJSON(t, c, "POST", d.admin+"/admin/reload", &res); s != 200 || !res.OK {
			t.Fatalf("reload: %d %+v", s, res)
		}
		ch := res.Changes
		if !slices.Equal(ch.Listeners.Changed, []string{"web"}) || len(ch.Listeners.Added)+len(ch.Listeners.Removed) != 0 ||
			!ch.TargetGroups.empty() || !ch.Certificates.empty() || len(ch.Server) != 0 {
			t.Fatalf("changes: %+v", ch)
		}
		if s, body := fetch(t, c, "GET", "http://"+web+"/new", nil); s != 201 || body != "new route" {
			t.Fatalf("after reload: %d %q", s, body)
		}

		// A bad file: 422, one positioned problem per element, nothing changes.
		bad := adminConfig(dir, admin, web, webTLS, hostOf(b), dead, extra)
		bad = strings.Replace(bad, `algorithm = "x"`, "", 1)
		bad = strings.Replace(bad, `deregistration_delay = "1s"`, `deregistration_delay = "soon"`+"\nalgorithm = \"fastest\"", 1)
		writeConfig(t, path, bad)
		res = reloadResult{}
		if s := fetchJSON(t, c, "POST", d.admin+"/admin/reload", &res); s != http.StatusUnprocessableEntity || res.OK {
			t.Fatalf("bad reload: %d %+v", s, res)
		}
		if len(res.Errors) < 2 {
			t.Fatalf("want one element per problem, got %q", res.Errors)
		}
		for _, e := range res.Errors {
			if !strings.HasPrefix(e, path+":") || strings.Contains(e, "\n") {
				t.Errorf("problem not positioned or not one line: %q", e)
			}
		}
		if s, body := fetch(t, c, "GET", "http://"+web+"/new", nil); s != 201 || body != "new route" {
			t.Fatalf("after refused reload: %d %q", s, body)
		}
		ss := scrape(t, c, d.admin)
		if v, _ := value(ss, "fulcrum_config_reloads_total", "result", "success"); v != 1 {
			t.Errorf("reloads success = %v", v)
		}
		if v, _ := value(ss, "fulcrum_config_reloads_total", "result", "failure"); v != 1 {
			t.Errorf("reloads failure = %v", v)
		}
		if s, _ := fetch(t, c, "GET", d.admin+"/admin/reload", nil); s != http.StatusMethodNotAllowed {
			t.Errorf("GET /admin/reload: %d", s)
		}

		// A SIGHUP reload of the bad file is refused too, and /admin/reload/last says so.
		d.reload("SIGHUP") // what the signal handler calls
		var last reloadResult
		if s := fetchJSON(t, c, "GET", d.admin+"/admin/reload/last", &last); s != 200 || last.OK || last.Trigger != "SIGHUP" ||
			last.File != path || len(last.Errors) < 2 || time.Since(last.At) > time.Minute {
			t.Fatalf("GET /admin/reload/last after a refused SIGHUP reload: %d %+v", s, last)
		}
	})
}

// TestAdminRefusesPublicBind: the daemon itself refuses a non-loopback admin address unless
// admin_allow_public is set, whatever validation said.
func TestAdminRefusesPublicBind(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", ":0", "[::]:0", "192.0.2.1:9900", "example.com:9900"} {
		if a, err := startAdmin(addr, false, nil, nil); err == nil {
			a.Close()
			t.Errorf("startAdmin(%q) bound a public address", addr)
		} else if !strings.Contains(err.Error(), "loopback") {
			t.Errorf("startAdmin(%q): %v", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:9900", "[::1]:9900", "localhost:9900", "127.1.2.3:1"} {
		if err := checkLoopback(addr); err != nil {
			t.Errorf("checkLoopback(%q): %v", addr, err)
		}
	}

	// With admin_allow_public the bind goes ahead (every address, port 0).
	dir := t.TempDir()
	b := echoBackend(t, "b1")
	web := configtest.Addr(t)
	text := configHead(dir, "", "") + fmt.Sprintf(`
[[target_groups]]
name = "echo"
protocol = "http"
targets = [%q]
[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "echo" }
`, hostOf(b), web)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), text)
	a, err := startAdmin("0.0.0.0:0", true, d.daemon, nil)
	if err != nil {
		t.Fatalf("allowed public bind: %v", err)
	}
	defer a.Close()
	_, port, _ := strings.Cut(a.Addr(), "]:")
	if port == "" {
		_, port, _ = strings.Cut(a.Addr(), ":")
	}
	if s, _ := fetch(t, httpClient(), "GET", "http://127.0.0.1:"+port+"/healthz", nil); s != 200 {
		t.Fatalf("public admin /healthz: %d", s)
	}
}

// TestReloadOnTakenPort: a reload that adds a listener on an address another process holds is
// refused before anything changes; the running listener keeps serving, and the answer and
// /admin/reload/last name the listener and the address.
func TestReloadOnTakenPort(t *testing.T) {
	dir := t.TempDir()
	b := echoBackend(t, "b1")
	web, admin := configtest.Addr(t), configtest.Addr(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	conf := func(extra string) string {
		return configHead(dir, admin, "") + fmt.Sprintf(`
[[target_groups]]
name = "echo"
protocol = "http"
targets = [%q]

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { fixed_response = { status = 200, content_type = "text/plain", body = "web" } }
%s`, hostOf(b), web, extra)
	}
	path := filepath.Join(dir, "fulcrum.toml")
	d := startTestDaemon(t, path, conf(""))
	c := httpClient()

	writeConfig(t, path, conf(fmt.Sprintf(`
[[listeners]]
name = "second"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "echo" }
`, taken.Addr())))
	var res reloadResult
	if s := fetchJSON(t, c, "POST", d.admin+"/admin/reload", &res); s != http.StatusUnprocessableEntity || res.OK {
		t.Fatalf("reload onto a taken port: %d %+v", s, res)
	}
	var last reloadResult
	if s := fetchJSON(t, c, "GET", d.admin+"/admin/reload/last", &last); s != 200 || last.OK {
		t.Fatalf("GET /admin/reload/last: %d %+v", s, last)
	}
	joined := strings.Join(last.Errors, "\n")
	if !strings.Contains(joined, `"second"`) || !strings.Contains(joined, taken.Addr().String()) {
		t.Fatalf("the refusal does not name the listener and the address: %q", last.Errors)
	}
	if s, body := fetch(t, c, "GET", "http://"+web+"/", nil); s != 200 || body != "web" {
		t.Fatalf("the running listener after the refused reload: %d %q", s, body)
	}

	// Once the port is free the same file applies.
	taken.Close()
	res = reloadResult{}
	if s := fetchJSON(t, c, "POST", d.admin+"/admin/reload", &res); s != 200 || !res.OK {
		t.Fatalf("reload once the port is free: %d %+v", s, res)
	}
	if s, body := fetch(t, c, "GET", "http://"+taken.Addr().String()+"/", nil); s != 200 || !strings.Contains(body, "b1") {
		t.Fatalf("the added listener: %d %q", s, body)
	}
}
