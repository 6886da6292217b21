package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestMonitoringKit: the alert rules pass `promtool check rules` (Debian package prometheus,
// in TEST_PACKAGES), and every metric the rules and the Grafana dashboard name is one a running
// fulcrum exports on /metrics (after traffic on HTTP, HTTPS and TCP listeners).
func TestMonitoringKit(t *testing.T) {
	rules := "../../configs/monitoring/fulcrum-alerts.yml"
	dashboard := "../../configs/monitoring/fulcrum-dashboard.json"
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool not installed (make deps installs package prometheus)")
		}
		t.Log("promtool not installed: rules not checked by promtool (make deps installs package prometheus)")
	} else if out, err := exec.Command(promtool, "check", "rules", rules).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}

	named := map[string][]string{}
	nameRE := regexp.MustCompile(`\bfulcrum_[a-z0-9_]+`)
	for _, f := range []string{rules, dashboard} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nameRE.FindAllString(string(b), -1) {
			named[n] = append(named[n], filepath.Base(f))
		}
	}
	if len(named) < 10 {
		t.Fatalf("only %d metric names found in the kit", len(named))
	}

	dir := t.TempDir()
	b := echoBackend(t, "b1")
	web, webTLS, dead, admin, tcp := configtest.Addr(t), configtest.Addr(t), configtest.DeadAddr(t), configtest.Addr(t), configtest.Addr(t)
	text := adminConfig(dir, admin, web, webTLS, hostOf(b), dead, "") + fmt.Sprintf(`
[[target_groups]]
name = "relay"
protocol = "tcp"
targets = [%q]

[[listeners]]
name = "tcp"
style = "network"
protocol = "tcp"
address = %q
forward = "relay"
`, hostOf(b), tcp)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), text)
	c := httpClient()
	for _, u := range []string{"http://" + web + "/", "http://" + web + "/down/x"} {
		fetch(t, c, "GET", u, nil)
	}
	tc := tlsClient(caPool(t, dir, "test-ca"), "localhost")
	tc.Timeout = 10 * time.Second
	if resp, err := tc.Get("https://" + webTLS + "/"); err == nil {
		resp.Body.Close()
	} else {
		t.Fatalf("https: %v", err)
	}
	if conn, err := net.DialTimeout("tcp", tcp, 5*time.Second); err == nil {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		io.Copy(io.Discard, conn)
		conn.Close()
	} else {
		t.Fatal(err)
	}
	// fulcrum_config_reloads_total has a series once a reload happened.
	if res := d.reload("test"); !res.OK {
		t.Fatalf("reload: %+v", res)
	}

	exported := map[string]bool{}
	for _, s := range scrape(t, c, d.admin) {
		exported[s.name] = true
	}
	var missing []string
	for n, where := range named {
		if !exported[n] {
			missing = append(missing, fmt.Sprintf("%s (in %v)", n, where))
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Fatalf("named in the monitoring kit but not on /metrics: %v", missing)
	}
}
