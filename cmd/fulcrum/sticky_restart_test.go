package main

import (
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestStickyCookieSurvivesRestart: without a fleet, a cookie set by one process still routes to
// its target through the next process on the same state dir (the key is sealed in the keystore,
// not random per process).
func TestStickyCookieSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	b1, b2 := echoBackend(t, "one"), echoBackend(t, "two")
	web, admin := configtest.Addr(t), configtest.Addr(t)
	text := configHead(dir, admin, "") + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q, %q]
stickiness = { type = "lb_cookie", duration = "1h" }

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
`, hostOf(b1), hostOf(b2), web)
	path := filepath.Join(dir, "fulcrum.toml")
	client := httpClient()
	get := func(cookies []*http.Cookie) (string, []*http.Cookie) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+web+"/", nil)
		for _, ck := range cookies {
			req.AddCookie(ck)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		var set []*http.Cookie
		for _, ck := range resp.Cookies() {
			if strings.HasPrefix(ck.Name, "FULCRUMLB") {
				set = append(set, ck)
			}
		}
		return resp.Header.Get("X-Backend"), set
	}

	d := startTestDaemon(t, path, text)
	bound := map[string][]*http.Cookie{} // a cookie bound to each back end
	for i := 0; i < 40 && len(bound) < 2; i++ {
		target, cookies := get(nil)
		if target == "" || len(cookies) == 0 {
			t.Fatalf("request %d: no sticky cookie or backend (%q)", i, target)
		}
		bound[target] = cookies
	}
	if len(bound) != 2 {
		t.Fatalf("40 requests reached only %v", bound)
	}
	d.stop()

	startTestDaemon(t, path, text) // the next process lifetime
	for target, cookies := range bound {
		for range 3 {
			if got, _ := get(cookies); got != target {
				t.Fatalf("after a restart, a cookie bound to %q went to %q", target, got)
			}
		}
	}
}
