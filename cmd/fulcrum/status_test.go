package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/chromedp/chromedp"
)

// TestStatusPageBrowser loads the admin endpoint's status page in headless Chromium (Debian
// package chromium, in TEST_PACKAGES) and checks what an operator would look at: every listener
// is listed, a target killed turns unhealthy on the page without a reload, and the request
// counter moves under load.
func TestStatusPageBrowser(t *testing.T) {
	// Air-gapped hosts: nothing on the page may come from elsewhere.
	for _, bad := range []string{"http://", "https://", "src=", "<link", "@import", "url("} {
		if strings.Contains(string(statusHTML), bad) {
			t.Fatalf("status page refers to something outside itself: %q", bad)
		}
	}
	browser := ""
	for _, b := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(b); err == nil {
			browser = p
			break
		}
	}
	if browser == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("chromium not installed (make deps installs it)")
		}
		t.Skip("chromium not installed")
	}
	dir := t.TempDir()
	live := echoBackend(t, "live")
	victim := echoBackend(t, "victim")
	web, admin := configtest.Addr(t), configtest.Addr(t)
	text := configHead(dir, admin, "") + fmt.Sprintf(`
[[target_groups]]
name = "pool"
protocol = "http"
targets = [%q, %q]
health_check = { protocol = "tcp", interval = "200ms", timeout = "100ms", unhealthy_threshold = 1, healthy_threshold = 1 }

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "pool" }

[[listeners.rules]]
priority = 1
paths = ["/fixed"]
fixed_response = { status = 200, content_type = "text/plain", body = "fixed" }
`, hostOf(live), hostOf(victim), web)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), text)

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.Headless, chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.NoFirstRun, chromedp.UserDataDir(filepath.Join(dir, "chromium")))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancel()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancel = context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()

	// text1 reads an element's text in one script evaluation: the page replaces its rows on
	// every refresh, so a node found by one call may be gone by the next.
	text1 := func(sel string) string {
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string](fmt.Sprintf(`(document.querySelector(%q)||{textContent:""}).textContent`, sel)))
		if err != nil {
			t.Fatalf("%s: %v", sel, err)
		}
		return strings.TrimSpace(s)
	}
	if err := chromedp.Do(ctx, chromedp.Navigate(d.admin+"/"),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-listener="web"]`))); err != nil {
		t.Fatalf("status page: %v", err)
	}
	if rules := text1(`tr[data-listener="web"]`); !strings.Contains(rules, "1: path /fixed -> fixed response 200") || !strings.Contains(rules, "default -> forward pool") {
		t.Fatalf("listener row without its rules: %q", rules)
	}

	// Requests move the counter, on the page, without a reload.
	before, _ := strconv.ParseFloat(text1(`tr[data-listener="web"] .requests`), 64)
	c := httpClient()
	for range 20 {
		if resp, err := c.Get("http://" + web + "/fixed"); err == nil {
			resp.Body.Close()
		}
	}
	configtest.WaitFor(t, 30*time.Second, "request counter moving on the page", func() bool {
		n, _ := strconv.ParseFloat(text1(`tr[data-listener="web"] .requests`), 64)
		return n >= before+20
	})

	// Kill a target: its row turns unhealthy in place.
	sel := fmt.Sprintf(`tr[data-target="%s"] .state`, hostOf(victim))
	configtest.WaitFor(t, 30*time.Second, "victim listed healthy", func() bool { return text1(sel) == "healthy" })
	victim.Close()
	configtest.WaitFor(t, 30*time.Second, "killed target shown unhealthy", func() bool { return text1(sel) == "unhealthy" })
	if s := text1(fmt.Sprintf(`tr[data-target="%s"] .state`, hostOf(live))); s != "healthy" {
		t.Fatalf("live target shown %q", s)
	}
}
