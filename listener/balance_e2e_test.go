package listener

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestBalancingAlgorithms runs every algorithm and source-IP stickiness over real sockets.
func TestBalancingAlgorithms(t *testing.T) {
	dir := t.TempDir()
	a, b := backend(t, "a"), backend(t, "b")
	type tc struct {
		name, group string // group: the target_groups keys besides name, protocol and targets
		addr        string
		check       func(t *testing.T, bySource map[string]map[string]int)
	}
	total := func(bySource map[string]map[string]int) map[string]int {
		out := map[string]int{}
		for _, m := range bySource {
			for k, v := range m {
				out[k] += v
			}
		}
		return out
	}
	even := func(t *testing.T, bySource map[string]map[string]int) {
		if got := total(bySource); got["a"] != got["b"] {
			t.Errorf("split %v, want even", got)
		}
	}
	oneEach := func(t *testing.T, bySource map[string]map[string]int) {
		for src, m := range bySource {
			if len(m) != 1 {
				t.Errorf("client %s reached %v, want one target", src, m)
			}
		}
		if got := total(bySource); got["a"] == 0 || got["b"] == 0 {
			t.Logf("all sources on one target (%v): possible, but the hash spreads 8 sources", got)
		}
	}
	cases := []*tc{
		{name: "round_robin", group: `algorithm = "round_robin"`, check: even},
		// Sequential requests: nothing in flight, no connection more on either side, so ties
		// rotate evenly.
		{name: "least_outstanding_requests", group: `algorithm = "least_outstanding_requests"`, check: even},
		{name: "weighted_random", group: `algorithm = "weighted_random"`, check: func(t *testing.T, bySource map[string]map[string]int) {
			// targets a:3, b:1 over 320 requests: 240/80 expected, bounds > 5 standard deviations.
			if got := total(bySource); got["a"] < 200 || got["a"] > 280 {
				t.Errorf("split %v, want about a=240 b=80", got)
			}
		}},
		// The other groups' pooled connections to a and b count too (connections are per
		// address), so any split is right here; TestLeastConnectionsCountsConnections pins the
		// algorithm down.
		{name: "least_connections", group: `algorithm = "least_connections"`, check: func(t *testing.T, bySource map[string]map[string]int) {
			if got := total(bySource); got["a"]+got["b"] != 320 {
				t.Errorf("split %v, want every request answered by a or b", got)
			}
		}},
		{name: "source_ip_hash", group: `algorithm = "source_ip_hash"`, check: oneEach},
		{name: "sticky_source_ip", group: `stickiness = { type = "source_ip" }`, check: oneEach},
	}
	text := header(dir)
	for _, c := range cases {
		c.addr = configtest.Addr(t)
		targets := fmt.Sprintf("[%q, %q]", hostOf(a), hostOf(b))
		if c.name == "weighted_random" {
			targets = fmt.Sprintf("[{ address = %q, weight = 3 }, { address = %q, weight = 1 }]", hostOf(a), hostOf(b))
		}
		text += fmt.Sprintf(`
[[target_groups]]
name = %[1]q
protocol = "http"
targets = %[2]s
%[3]s

[[listeners]]
name = %[1]q
style = "application"
protocol = "http"
address = %[4]q
default_action = { forward = %[1]q }
`, c.name, targets, c.group, c.addr)
	}
	startRuntime(t, loadConfig(t, dir, text), nil)
	sources := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bySource := map[string]map[string]int{}
			for _, src := range sources {
				cl := clientFrom(src)
				bySource[src] = map[string]int{}
				for range 40 {
					s, who, _ := get(t, cl, newReq(t, "GET", "http://"+c.addr+"/"))
					if s != 200 {
						t.Fatalf("status %d", s)
					}
					bySource[src][who]++
				}
				cl.CloseIdleConnections()
			}
			c.check(t, bySource)
		})
	}
}

// TestLeastConnectionsCountsConnections: least_connections balances on open connections to a
// target, least_outstanding_requests on requests in flight. A target that holds idle pooled
// connections from earlier traffic gets no new requests under the first, its share under the
// second.
func TestLeastConnectionsCountsConnections(t *testing.T) {
	for _, alg := range []string{"least_connections", "least_outstanding_requests"} {
		t.Run(alg, func(t *testing.T) {
			dir := t.TempDir()
			const hold = 4
			var mu sync.Mutex
			arrived, all := 0, make(chan struct{})
			busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/hold" { // hold until every concurrent request has arrived
					mu.Lock()
					if arrived++; arrived == hold {
						close(all)
					}
					mu.Unlock()
					select {
					case <-all:
					case <-time.After(10 * time.Second):
					}
				}
				echo.Handler("busy").ServeHTTP(w, r)
			}))
			defer busy.Close()
			fresh := backend(t, "fresh")
			addr := configtest.Addr(t)
			conf := func(targets string) string {
				return header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = %s
algorithm = %q
health_check = { disabled = true }

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
`, targets, alg, addr)
			}
			rt := startRuntime(t, loadConfig(t, dir, conf(fmt.Sprintf("[%q]", hostOf(busy)))), nil)
			// hold concurrent requests leave hold pooled connections to busy.
			var wg sync.WaitGroup
			for range hold {
				wg.Add(1)
				go func() {
					defer wg.Done()
					cl := clientFrom("127.0.0.1")
					defer cl.CloseIdleConnections()
					if s, _, _ := get(t, cl, newReq(t, "GET", "http://"+addr+"/hold")); s != 200 {
						t.Errorf("hold: %d", s)
					}
				}()
			}
			wg.Wait()
			if _, err := rt.Reload(t.Context(), loadConfig(t, dir, conf(fmt.Sprintf("[%q, %q]", hostOf(busy), hostOf(fresh))))); err != nil {
				t.Fatal(err)
			}
			cl := clientFrom("127.0.0.1")
			defer cl.CloseIdleConnections()
			got := map[string]int{}
			for range 20 {
				_, who, _ := get(t, cl, newReq(t, "GET", "http://"+addr+"/"))
				got[who]++
			}
			switch alg {
			case "least_connections":
				if got["busy"] != 0 {
					t.Fatalf("%v: the target holding %d idle connections got requests", got, hold)
				}
			default:
				if got["busy"] < 5 {
					t.Fatalf("%v: nothing is in flight on either target, so requests should spread", got)
				}
			}
		})
	}
}
