package router

import (
	"fmt"
	"net/http/httptest"
	"net/netip"
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// benchListener has n rules: 60% exact host + path, 20% wildcard host + path, 20% path +
// header (host-agnostic). Priorities interleave the kinds so the index has to merge.
func benchListener(n int) *configs.Listener {
	var rules []configs.Rule
	for i := range n {
		r := configs.Rule{Priority: i + 1, Forward: fw(fmt.Sprintf("g%d", i))}
		switch i % 5 {
		case 0, 1, 2:
			r.Hosts = []string{fmt.Sprintf("svc%d.example.com", i)}
			r.Paths = []string{fmt.Sprintf("/api/v%d/*", i%7), "/health"}
		case 3:
			r.Hosts = []string{fmt.Sprintf("*.zone%d.example.net", i)}
			r.Paths = []string{"/static/*"}
		case 4:
			r.Paths = []string{fmt.Sprintf("/legacy/%d/*", i)}
			r.Headers = map[string][]string{"x-tenant": {fmt.Sprintf("t%d", i)}}
		}
		rules = append(rules, r)
	}
	return app(rules...)
}

func BenchmarkMatchHTTP(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		tb := mustCompile(b, benchListener(n))
		mid := n / 2 / 5 * 5 // an exact-host rule in the middle
		cases := []struct {
			name, host, url string
		}{
			{"exact", fmt.Sprintf("svc%d.example.com", mid), fmt.Sprintf("/api/v%d/users/42", mid%7)},
			{"exact-upper-port", fmt.Sprintf("SVC%d.Example.com:443", mid), fmt.Sprintf("/api/v%d/users/42", mid%7)},
			{"wildcard", fmt.Sprintf("www.zone%d.example.net", mid+3), "/static/app.js"},
			{"miss", "unknown.example.org", "/nothing/here"},
		}
		for _, c := range cases {
			r := httptest.NewRequest("GET", c.url, nil)
			r.Header.Set("X-Tenant", "t0")
			src := netip.MustParseAddr("198.51.100.7")
			want := tb.MatchHTTP(r, c.host, src)
			if c.name != "miss" && want == tb.Default() {
				b.Fatalf("%s/%d: no rule matched", c.name, n)
			}
			b.Run(fmt.Sprintf("rules=%d/%s", n, c.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if tb.MatchHTTP(r, c.host, src) != want {
						b.Fatal("different rule")
					}
				}
			})
		}
	}
}

func BenchmarkMatchSNI(b *testing.B) {
	tb := mustCompile(b, benchListener(100))
	b.ReportAllocs()
	for b.Loop() {
		tb.MatchSNI("www.zone48.example.net")
	}
}

func BenchmarkPickGroup(b *testing.B) {
	a, _ := compileForward(configs.Forward{{Group: "a", Weight: 50}, {Group: "b", Weight: 30}, {Group: "c", Weight: 20}})
	b.ReportAllocs()
	var x uint64
	for b.Loop() {
		x += 0x9e3779b97f4a7c15
		a.PickGroup(x)
	}
}

func BenchmarkRedirectLocation(b *testing.B) {
	tb := mustCompile(b, &configs.Listener{Name: "r", DefaultAction: &configs.Action{Redirect: &configs.Redirect{Protocol: "HTTPS", Port: int64(443), Status: 301}}})
	a := tb.Default().Action
	r := httptest.NewRequest("GET", "/a/b?c=d", nil)
	b.ReportAllocs()
	for b.Loop() {
		a.RedirectLocation(r, "example.com:80", false, "80")
	}
}
