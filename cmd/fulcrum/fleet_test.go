package main

import (
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/certs/fleet/etcdtest"
)

// TestFleetStickyAndAdmin: two nodes of one fleet share the sticky-cookie key, so a cookie set
// by node a routes to the same target through node b; /admin/fleet lists both nodes; with all
// of etcd stopped both serve hey's load without a failure and rejoin when it is back; the
// fleet's storage operations are exported.
func TestFleetStickyAndAdmin(t *testing.T) {
	c := etcdtest.Start(t, 1)
	b1, b2 := echoBackend(t, "one"), echoBackend(t, "two")
	shared := t.TempDir() // one master key for both nodes, as an operator gives every node
	var nodes []*testDaemon
	var webs []string
	for _, n := range []string{"a", "b"} {
		dir := t.TempDir()
		web := configtest.Addr(t)
		text := fmt.Sprintf(`[server]
admin = %q
admin_auth = "none"
state_dir = %q
shutdown_timeout = "5s"

[keystore]
type = "software"
master_key = "file:%s/master.key"

[fleet]
etcd = [%q]
prefix = "/fulcrum-test/sticky"
node = %q
lease_ttl = "2s"

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
`, configtest.Addr(t), dir, shared, c.Endpoints()[0], n, hostOf(b1), hostOf(b2), web)
		nodes = append(nodes, startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), text))
		webs = append(webs, web)
	}
	client := httpClient()
	for i := range 6 {
		req, _ := http.NewRequest("GET", "http://"+webs[0]+"/", nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		target := resp.Header.Get("X-Backend")
		var cookies []*http.Cookie
		for _, ck := range resp.Cookies() {
			if strings.HasPrefix(ck.Name, "FULCRUMLB") {
				cookies = append(cookies, ck)
			}
		}
		if len(cookies) == 0 || target == "" {
			t.Fatalf("request %d: no sticky cookie or backend (%q)", i, target)
		}
		for range 3 {
			req, _ := http.NewRequest("GET", "http://"+webs[1]+"/", nil)
			for _, ck := range cookies {
				req.AddCookie(ck)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := resp.Header.Get("X-Backend"); got != target {
				t.Fatalf("cookie from node a went to %q through node b, want %q", got, target)
			}
		}
	}

	var view struct {
		Fleet  bool `json:"fleet"`
		Status struct {
			Node  string `json:"node"`
			Nodes []struct {
				Node      string    `json:"node"`
				Heartbeat time.Time `json:"last_heartbeat"`
			} `json:"nodes"`
			Locks []struct{ Name, Holder string } `json:"locks"`
		} `json:"status"`
	}
	configtest.WaitFor(t, 20*time.Second, "both nodes in /admin/fleet", func() bool {
		if code := fetchJSON(t, client, "GET", nodes[0].admin+"/admin/fleet", &view); code != 200 {
			t.Fatalf("/admin/fleet: %d", code)
		}
		return view.Fleet && len(view.Status.Nodes) == 2
	})
	if view.Status.Node != "a" || view.Status.Nodes[0].Heartbeat.IsZero() {
		t.Fatalf("/admin/fleet: %+v", view)
	}
	leader := false
	for _, l := range view.Status.Locks {
		leader = leader || (l.Name == "leader:session-tickets" && (l.Holder == "a" || l.Holder == "b"))
	}
	if !leader {
		t.Fatalf("/admin/fleet: no ticket-rotation leader in %+v", view.Status.Locks)
	}
	// All of etcd stops: both nodes keep serving under load without a failed request, and
	// rejoin the fleet when it is back.
	c.StopAll()
	for i, web := range webs {
		codes := driveLoad(t, "http://"+web+"/", 400, 8)
		if codes[200] != 400 {
			t.Fatalf("node %d with etcd down: %v", i, codes)
		}
	}
	c.StartAll(t)
	configtest.WaitFor(t, 30*time.Second, "both nodes back in /admin/fleet", func() bool {
		view.Status.Nodes = nil
		fetchJSON(t, client, "GET", nodes[1].admin+"/admin/fleet", &view)
		return len(view.Status.Nodes) == 2
	})

	// No certificates here, so no storage traffic yet: the series exist, at zero.
	ss := scrape(t, client, nodes[1].admin)
	for _, name := range []string{"fulcrum_fleet_storage_operations_total", "fulcrum_fleet_storage_errors_total"} {
		if _, ok := value(ss, name, "op", "lock"); !ok {
			t.Fatalf("%s not exported", name)
		}
	}
}
