package router

import (
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

func fw(groups ...string) configs.Forward {
	f := make(configs.Forward, len(groups))
	for i, g := range groups {
		f[i] = configs.WeightedGroup{Group: g, Weight: 1}
	}
	return f
}

// app is an application listener whose default forwards to "default".
func app(rules ...configs.Rule) *configs.Listener {
	return &configs.Listener{
		Name: "test", Style: "application", Protocol: "http",
		DefaultAction: &configs.Action{Forward: fw("default")},
		Rules:         rules,
	}
}

// mustCompile compiles l as the runtime sees it: validated and defaulted by configs.Load.
func mustCompile(t testing.TB, l *configs.Listener) *Table {
	t.Helper()
	v, err := validated(l)
	if err != nil {
		t.Fatal(err)
	}
	tb, err := Compile(v)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return tb
}

// validated loads l through configs (configtest) with a target group for every group it
// forwards to, and returns the loaded listener. Application listeners default to HTTP.
func validated(l *configs.Listener) (*configs.Listener, error) {
	c := *l
	if c.Style == "" {
		c.Style, c.Protocol = "application", "http"
	}
	c.Address = "127.0.0.1:8080"
	groupProto := "http"
	if c.Style == "network" {
		groupProto = c.Protocol
	}
	var groups []configs.TargetGroup
	seen := map[string]bool{}
	add := func(fw configs.Forward) {
		for _, g := range fw {
			if g.Group != "" && !seen[g.Group] {
				seen[g.Group] = true
				groups = append(groups, configs.TargetGroup{Name: g.Group, Protocol: groupProto,
					Targets: []configs.Target{{Address: "127.0.0.1:9"}}, HealthCheck: &configs.HealthCheck{Disabled: true}})
			}
		}
	}
	if c.DefaultAction != nil {
		add(c.DefaultAction.Forward)
	}
	add(c.Forward)
	for _, r := range c.Rules {
		add(r.Forward)
	}
	loaded, err := configtest.Load("", configs.Config{Listeners: []configs.Listener{c}, TargetGroups: groups})
	if err != nil {
		return nil, err
	}
	return &loaded.Listeners[0], nil
}

type req struct {
	method, host, url string
	header            http.Header
	src               string
}

func (q req) build() (*http.Request, string, netip.Addr) {
	m := q.method
	if m == "" {
		m = "GET"
	}
	u := q.url
	if u == "" {
		u = "/"
	}
	r := httptest.NewRequest(m, u, nil)
	if q.host != "" {
		r.Host = q.host
	}
	for k, vs := range q.header {
		for _, v := range vs {
			r.Header.Add(k, v)
		}
	}
	var src netip.Addr
	if q.src != "" {
		src = netip.MustParseAddr(q.src)
	}
	return r, r.Host, src
}

// group names the first group of the matched rule's forward action.
func group(r *Rule) string {
	if r.Action.Kind != ActionForward {
		return r.Action.Kind.String()
	}
	return r.Action.Groups[0]
}

func TestMatchHTTP(t *testing.T) {
	tests := []struct {
		name  string
		rules []configs.Rule
		req   req
		want  string
	}{
		{"no rules: default", nil, req{host: "a.test"}, "default"},
		{"exact host", []configs.Rule{{Priority: 1, Hosts: []string{"api.example.com"}, Forward: fw("api")}},
			req{host: "api.example.com"}, "api"},
		{"host is case-insensitive", []configs.Rule{{Priority: 1, Hosts: []string{"API.example.com"}, Forward: fw("api")}},
			req{host: "Api.EXAMPLE.com"}, "api"},
		{"host port ignored", []configs.Rule{{Priority: 1, Hosts: []string{"api.example.com"}, Forward: fw("api")}},
			req{host: "api.example.com:8443"}, "api"},
		{"host trailing dot ignored", []configs.Rule{{Priority: 1, Hosts: []string{"api.example.com"}, Forward: fw("api")}},
			req{host: "API.example.com.:80"}, "api"},
		{"pattern trailing dot ignored", []configs.Rule{{Priority: 1, Hosts: []string{"api.example.com."}, Forward: fw("api")}},
			req{host: "api.example.com"}, "api"},
		{"other host: default", []configs.Rule{{Priority: 1, Hosts: []string{"api.example.com"}, Forward: fw("api")}},
			req{host: "www.example.com"}, "default"},
		{"wildcard host", []configs.Rule{{Priority: 1, Hosts: []string{"*.example.com"}, Forward: fw("wild")}},
			req{host: "a.b.example.com"}, "wild"},
		{"wildcard host does not match apex", []configs.Rule{{Priority: 1, Hosts: []string{"*.example.com"}, Forward: fw("wild")}},
			req{host: "example.com"}, "default"},
		{"host question mark", []configs.Rule{{Priority: 1, Hosts: []string{"ap?.example.com"}, Forward: fw("q")}},
			req{host: "apX.example.com"}, "q"},
		{"host question mark needs one char", []configs.Rule{{Priority: 1, Hosts: []string{"ap?.example.com"}, Forward: fw("q")}},
			req{host: "ap.example.com"}, "default"},
		{"star host matches ipv6 literal", []configs.Rule{{Priority: 1, Hosts: []string{"*"}, Forward: fw("any")}},
			req{host: "[::1]:8080"}, "any"},
		{"path prefix", []configs.Rule{{Priority: 1, Paths: []string{"/v1/*"}, Forward: fw("v1")}},
			req{url: "/v1/users/7"}, "v1"},
		{"path is case-sensitive", []configs.Rule{{Priority: 1, Paths: []string{"/V1/*"}, Forward: fw("v1")}},
			req{url: "/v1/users"}, "default"},
		{"path is decoded", []configs.Rule{{Priority: 1, Paths: []string{"/admin*"}, Forward: fw("admin")}},
			req{url: "/%61dmin/x"}, "admin"},
		{"path ignores the query", []configs.Rule{{Priority: 1, Paths: []string{"/a"}, Forward: fw("a")}},
			req{url: "/a?x=1"}, "a"},
		{"path OR", []configs.Rule{{Priority: 1, Paths: []string{"/a", "/b"}, Forward: fw("ab")}},
			req{url: "/b"}, "ab"},
		{"method", []configs.Rule{{Priority: 1, Methods: []string{"POST", "PUT"}, Forward: fw("write")}},
			req{method: "PUT"}, "write"},
		{"method miss", []configs.Rule{{Priority: 1, Methods: []string{"POST"}, Forward: fw("write")}},
			req{method: "GET"}, "default"},
		{"header name case-insensitive", []configs.Rule{{Priority: 1, Headers: map[string][]string{"x-CANARY": {"1"}}, Forward: fw("canary")}},
			req{header: http.Header{"X-Canary": {"1"}}}, "canary"},
		{"header value case-insensitive wildcard", []configs.Rule{{Priority: 1, Headers: map[string][]string{"user-agent": {"*mobile*"}}, Forward: fw("m")}},
			req{header: http.Header{"User-Agent": {"Foo MOBILE Safari"}}}, "m"},
		{"header any of several values", []configs.Rule{{Priority: 1, Headers: map[string][]string{"x-a": {"2"}}, Forward: fw("a")}},
			req{header: http.Header{"X-A": {"1", "2"}}}, "a"},
		{"header missing", []configs.Rule{{Priority: 1, Headers: map[string][]string{"x-a": {"*"}}, Forward: fw("a")}},
			req{}, "default"},
		{"header AND across names", []configs.Rule{{Priority: 1, Headers: map[string][]string{"x-a": {"1"}, "x-b": {"1"}}, Forward: fw("ab")}},
			req{header: http.Header{"X-A": {"1"}}}, "default"},
		{"host header condition uses the host", []configs.Rule{{Priority: 1, Headers: map[string][]string{"host": {"*.example.com"}}, Forward: fw("h")}},
			req{host: "www.example.com:443"}, "h"},
		{"query key value", []configs.Rule{{Priority: 1, Query: map[string][]string{"version": {"2"}}, Forward: fw("v2")}},
			req{url: "/?a=1&version=2"}, "v2"},
		{"query value case-insensitive and decoded", []configs.Rule{{Priority: 1, Query: map[string][]string{"q": {"hello world"}}, Forward: fw("q")}},
			req{url: "/?q=HELLO%20World"}, "q"},
		{"query plus is space", []configs.Rule{{Priority: 1, Query: map[string][]string{"q": {"a b"}}, Forward: fw("q")}},
			req{url: "/?q=a+b"}, "q"},
		{"query key decoded", []configs.Rule{{Priority: 1, Query: map[string][]string{"a b": {"1"}}, Forward: fw("q")}},
			req{url: "/?a%20b=1"}, "q"},
		{"query any key", []configs.Rule{{Priority: 1, Query: map[string][]string{"": {"debug"}}, Forward: fw("dbg")}},
			req{url: "/?mode=debug"}, "dbg"},
		{"query wildcard value", []configs.Rule{{Priority: 1, Query: map[string][]string{"v": {"2.*"}}, Forward: fw("v2")}},
			req{url: "/?v=2.14"}, "v2"},
		{"query key without value", []configs.Rule{{Priority: 1, Query: map[string][]string{"flag": {"*"}}, Forward: fw("f")}},
			req{url: "/?flag"}, "f"},
		{"query AND across keys", []configs.Rule{{Priority: 1, Query: map[string][]string{"a": {"1"}, "b": {"2"}}, Forward: fw("ab")}},
			req{url: "/?a=1"}, "default"},
		{"query AND across keys, both", []configs.Rule{{Priority: 1, Query: map[string][]string{"a": {"1"}, "b": {"2"}}, Forward: fw("ab")}},
			req{url: "/?b=2&a=1"}, "ab"},
		{"query OR within values", []configs.Rule{{Priority: 1, Query: map[string][]string{"a": {"1", "3"}}, Forward: fw("a")}},
			req{url: "/?a=3"}, "a"},
		{"query empty", []configs.Rule{{Priority: 1, Query: map[string][]string{"a": {"*"}}, Forward: fw("a")}},
			req{url: "/"}, "default"},
		{"source ip", []configs.Rule{{Priority: 1, SourceIPs: []string{"192.0.2.0/24"}, Forward: fw("office")}},
			req{src: "192.0.2.77"}, "office"},
		{"source ip mapped", []configs.Rule{{Priority: 1, SourceIPs: []string{"192.0.2.0/24"}, Forward: fw("office")}},
			req{src: "::ffff:192.0.2.77"}, "office"},
		{"source ip single address", []configs.Rule{{Priority: 1, SourceIPs: []string{"2001:db8::1"}, Forward: fw("one")}},
			req{src: "2001:db8::1"}, "one"},
		{"source ip miss", []configs.Rule{{Priority: 1, SourceIPs: []string{"192.0.2.0/24"}, Forward: fw("office")}},
			req{src: "198.51.100.1"}, "default"},
		{"source ip unknown client", []configs.Rule{{Priority: 1, SourceIPs: []string{"0.0.0.0/0"}, Forward: fw("all")}},
			req{}, "default"},
		{"AND across conditions: all match", []configs.Rule{{Priority: 1, Hosts: []string{"api.example.com"}, Paths: []string{"/v1/*"}, Methods: []string{"GET"}, Forward: fw("r")}},
			req{host: "api.example.com", url: "/v1/x"}, "r"},
		{"AND across conditions: one fails", []configs.Rule{{Priority: 1, Hosts: []string{"api.example.com"}, Paths: []string{"/v1/*"}, Methods: []string{"GET"}, Forward: fw("r")}},
			req{host: "api.example.com", url: "/v2/x"}, "default"},
		{"priority order, not file order", []configs.Rule{
			{Priority: 20, Paths: []string{"*"}, Forward: fw("late")},
			{Priority: 10, Paths: []string{"/x"}, Forward: fw("early")},
		}, req{url: "/x"}, "early"},
		{"host-agnostic rule before exact-host rule", []configs.Rule{
			{Priority: 2, Hosts: []string{"api.example.com"}, Forward: fw("host")},
			{Priority: 1, Paths: []string{"/health"}, Forward: fw("health")},
		}, req{host: "api.example.com", url: "/health"}, "health"},
		{"exact-host rule before wildcard rule", []configs.Rule{
			{Priority: 1, Hosts: []string{"api.example.com"}, Forward: fw("exact")},
			{Priority: 2, Hosts: []string{"*.example.com"}, Forward: fw("wild")},
		}, req{host: "API.example.com"}, "exact"},
		{"wildcard rule before exact-host rule", []configs.Rule{
			{Priority: 2, Hosts: []string{"api.example.com"}, Forward: fw("exact")},
			{Priority: 1, Hosts: []string{"*.example.com"}, Forward: fw("wild")},
		}, req{host: "api.example.com"}, "wild"},
		{"exact and wildcard in one rule", []configs.Rule{
			{Priority: 1, Hosts: []string{"example.com", "*.example.com"}, Forward: fw("both")},
		}, req{host: "example.com"}, "both"},
		{"empty host", []configs.Rule{{Priority: 1, Hosts: []string{"a.test"}, Forward: fw("a")}},
			req{host: " "}, "default"},
		{"redirect action", []configs.Rule{{Priority: 1, Paths: []string{"/old"}, Redirect: &configs.Redirect{Path: "/new", Status: 301}}},
			req{url: "/old"}, "redirect"},
		{"fixed action", []configs.Rule{{Priority: 1, Paths: []string{"/down"}, FixedResponse: &configs.FixedResponse{Status: 503, Body: "x"}}},
			req{url: "/down"}, "fixed_response"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tb := mustCompile(t, app(tc.rules...))
			r, host, src := tc.req.build()
			got := tb.MatchHTTP(r, host, src)
			if got == nil {
				t.Fatal("MatchHTTP returned nil")
			}
			if g := group(got); g != tc.want {
				t.Errorf("matched %q (rule ID %d, priority %d), want %q", g, got.ID, got.Priority, tc.want)
			}
			if lin := matchLinear(tb, r, host, src); lin != got {
				t.Errorf("index and linear scan disagree: %d vs %d", got.ID, lin.ID)
			}
		})
	}
}

// matchLinear is MatchHTTP without the host index: every rule in priority order.
func matchLinear(t *Table, r *http.Request, host string, src netip.Addr) *Rule {
	h := trimHost(host)
	path, query := "/", ""
	if r.URL != nil {
		if r.URL.Path != "" {
			path = r.URL.Path
		}
		query = r.URL.RawQuery
	}
	for _, rule := range t.rules[1:] {
		if rule.match(&Request{Method: r.Method, Header: stdHeader(r.Header)}, h, path, query, src.Unmap(), false) {
			return rule
		}
	}
	return t.rules[0]
}

func TestRuleIDs(t *testing.T) {
	tb := mustCompile(t, app(
		configs.Rule{Priority: 30, Paths: []string{"/c"}, Forward: fw("c")},
		configs.Rule{Priority: 10, Paths: []string{"/a"}, Forward: fw("a")},
		configs.Rule{Priority: 20, Hosts: []string{"b.test"}, Forward: fw("b")},
	))
	rules := tb.Rules()
	if len(rules) != 4 {
		t.Fatalf("%d rules, want 4", len(rules))
	}
	want := []struct {
		prio  int
		group string
	}{{0, "default"}, {10, "a"}, {20, "b"}, {30, "c"}}
	for i, r := range rules {
		if r.ID != i || r.Priority != want[i].prio || group(r) != want[i].group {
			t.Errorf("rules[%d] = ID %d priority %d %q, want ID %d priority %d %q", i, r.ID, r.Priority, group(r), i, want[i].prio, want[i].group)
		}
	}
	if tb.Default() != rules[0] {
		t.Error("Default is not rules[0]")
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name string
		l    *configs.Listener
		want string
	}{
		{"nil", nil, "nil listener"},
		{"no default", &configs.Listener{Name: "x"}, "no default action"},
		{"two actions", &configs.Listener{Name: "x", DefaultAction: &configs.Action{Forward: fw("a"), FixedResponse: &configs.FixedResponse{Status: 200}}}, "exactly one"},
		{"duplicate priority", app(configs.Rule{Priority: 1, Paths: []string{"/a"}, Forward: fw("a")}, configs.Rule{Priority: 1, Paths: []string{"/b"}, Forward: fw("b")}), "used twice"},
		{"bad source", app(configs.Rule{Priority: 1, SourceIPs: []string{"nope"}, Forward: fw("a")}), "not a CIDR"},
		{"bad redirect status", app(configs.Rule{Priority: 1, Paths: []string{"/a"}, Redirect: &configs.Redirect{Host: "x", Status: 200}}), "status 200"},
		{"bad redirect protocol", app(configs.Rule{Priority: 1, Paths: []string{"/a"}, Redirect: &configs.Redirect{Protocol: "ftp", Status: 301}}), "protocol"},
		{"negative weight", app(configs.Rule{Priority: 1, Paths: []string{"/a"}, Forward: configs.Forward{{Group: "a", Weight: 2}, {Group: "b", Weight: -1}}}), "out of range"},
		{"empty forward", app(configs.Rule{Priority: 1, Paths: []string{"/a"}, Forward: configs.Forward{}}), "no group with a positive weight"},
		{"empty group", app(configs.Rule{Priority: 1, Paths: []string{"/a"}, Forward: configs.Forward{{Weight: 1}}}), "needs group"},
		{"empty host pattern", app(configs.Rule{Priority: 1, Hosts: []string{"."}, Forward: fw("a")}), "empty host"},
		{"header without values", app(configs.Rule{Priority: 1, Headers: map[string][]string{"x": {}}, Forward: fw("a")}), "header condition"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Compile refuses what it cannot compile without panicking; what it leaves to
			// validation must then be refused by configs, so the runtime never sees it.
			_, err := Compile(tc.l)
			if err == nil {
				_, err = validated(tc.l)
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestMatchSNI(t *testing.T) {
	l := &configs.Listener{
		Name: "sni", Style: "network", Protocol: "tcp",
		Forward: fw("default-tls"),
		Rules: []configs.Rule{
			{Priority: 1, Hosts: []string{"*.internal.example.test"}, Forward: fw("internal")},
			{Priority: 2, Hosts: []string{"db.example.test"}, Forward: fw("db")},
		},
	}
	tb := mustCompile(t, l)
	tests := []struct{ name, sni, want string }{
		{"wildcard", "a.internal.example.test", "internal"},
		{"wildcard case and dot", "A.Internal.EXAMPLE.test.", "internal"},
		{"exact", "db.example.test", "db"},
		{"exact upper", "DB.example.test", "db"},
		{"apex not wildcard", "internal.example.test", "default-tls"},
		{"no sni", "", "default-tls"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if g := group(tb.MatchSNI(tc.sni)); g != tc.want {
				t.Errorf("MatchSNI(%q) = %q, want %q", tc.sni, g, tc.want)
			}
		})
	}
	if n := testing.AllocsPerRun(100, func() { tb.MatchSNI("DB.example.test") }); n != 0 {
		t.Errorf("MatchSNI allocates %v times", n)
	}
}

func TestNetworkDefaultForward(t *testing.T) {
	tb := mustCompile(t, &configs.Listener{Name: "db", Style: "network", Protocol: "tcp", Forward: fw("pg")})
	if g := group(tb.MatchSNI("x")); g != "pg" {
		t.Fatalf("default = %q", g)
	}
}

func TestPickGroup(t *testing.T) {
	a, err := compileForward(configs.Forward{{Group: "a", Weight: 90}, {Group: "off", Weight: 0}, {Group: "b", Weight: 10}})
	if err != nil {
		t.Fatal(err)
	}
	// Exact: every residue once.
	counts := map[string]int{}
	for r := uint64(0); r < 100; r++ {
		counts[a.Groups[a.PickGroup(r)]]++
	}
	if counts["a"] != 90 || counts["b"] != 10 || counts["off"] != 0 {
		t.Fatalf("over one period: %v", counts)
	}
	// Random: 10,000 picks within 3 points of the configured share.
	rng := rand.New(rand.NewPCG(1, 2))
	counts = map[string]int{}
	const n = 10000
	for range n {
		counts[a.Groups[a.PickGroup(rng.Uint64())]]++
	}
	for g, share := range map[string]float64{"a": 0.90, "b": 0.10, "off": 0} {
		if got := float64(counts[g]) / n; got < share-0.03 || got > share+0.03 {
			t.Errorf("group %q got %.3f of picks, want %.2f±0.03", g, got, share)
		}
	}
	if counts["off"] != 0 {
		t.Errorf("weight-0 group picked %d times", counts["off"])
	}

	single, _ := compileForward(fw("only"))
	if single.PickGroup(12345) != 0 {
		t.Error("single group not 0")
	}
	if _, err := compileForward(configs.Forward{{Group: "x"}, {Group: "y"}}); err == nil { // configs refuses it; never divide by zero
		t.Error("all-zero weights compiled")
	}
	if n := testing.AllocsPerRun(100, func() { a.PickGroup(rng.Uint64()) }); n != 0 {
		t.Errorf("PickGroup allocates %v times", n)
	}
}

func TestRedirectLocation(t *testing.T) {
	tests := []struct {
		name   string
		rd     configs.Redirect
		url    string
		host   string
		tls    bool
		port   string
		want   string
		status int
	}{
		{"http to https on 443", configs.Redirect{Protocol: "HTTPS", Port: int64(443), Status: 301},
			"/a%20b/c?x=1&y=2", "Example.COM:80", false, "80", "https://example.com/a%20b/c?x=1&y=2", 301},
		{"https keeps port when ALB would", configs.Redirect{Protocol: "HTTPS", Status: 302},
			"/p", "example.com", false, "8080", "https://example.com:8080/p", 302},
		{"default port omitted for http", configs.Redirect{Protocol: "HTTP", Status: 301},
			"/", "example.com", true, "80", "http://example.com/", 301},
		{"host and path templates", configs.Redirect{Host: "new.example.com", Path: "/v2/#{path}", Query: "#{query}&from=#{host}", Status: 307},
			"/a/b?x=1", "old.example.com:8080", false, "8080", "http://new.example.com:8080/v2/a/b?x=1&from=old.example.com", 307},
		{"protocol placeholder keeps https", configs.Redirect{Host: "#{host}.mirror", Status: 308},
			"/z", "a.test", true, "443", "https://a.test.mirror/z", 308},
		{"placeholders are case-insensitive", configs.Redirect{Path: "/x/#{PATH}", Status: 301},
			"/y", "a.test", false, "80", "http://a.test/x/y", 301},
		{"port placeholder in path", configs.Redirect{Path: "/from-#{port}", Status: 301},
			"/", "a.test", false, "8081", "http://a.test:8081/from-8081", 301},
		{"no query stays without ?", configs.Redirect{Protocol: "HTTPS", Port: "443", Status: 301},
			"/q", "a.test", false, "80", "https://a.test/q", 301},
		{"fixed query replaces", configs.Redirect{Query: "lang=en", Status: 302},
			"/?x=1", "a.test", false, "80", "http://a.test/?lang=en", 302},
		{"int port", configs.Redirect{Port: 8443, Status: 301},
			"/", "a.test", true, "443", "https://a.test:8443/", 301},
		{"root path", configs.Redirect{Protocol: "HTTPS", Status: 301},
			"/", "a.test", false, "443", "https://a.test/", 301},
		{"ipv6 host", configs.Redirect{Protocol: "HTTPS", Port: 443, Status: 301},
			"/", "[2001:db8::1]:80", false, "80", "https://[2001:db8::1]/", 301},
		{"unknown placeholder is literal", configs.Redirect{Path: "/#{nope}", Status: 301},
			"/", "a.test", false, "80", "http://a.test/#{nope}", 301},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rd := tc.rd
			tb := mustCompile(t, &configs.Listener{Name: "r", DefaultAction: &configs.Action{Redirect: &rd}})
			a := tb.Default().Action
			r := httptest.NewRequest("GET", tc.url, nil)
			if got := a.RedirectLocation(r, tc.host, tc.tls, tc.port); got != tc.want {
				t.Errorf("RedirectLocation = %q, want %q", got, tc.want)
			}
			if a.RedirectStatus() != tc.status {
				t.Errorf("RedirectStatus = %d, want %d", a.RedirectStatus(), tc.status)
			}
		})
	}
	// Non-redirect actions answer empty values rather than panicking.
	tb := mustCompile(t, app())
	if tb.Default().Action.RedirectLocation(httptest.NewRequest("GET", "/", nil), "a", false, "80") != "" || tb.Default().Action.RedirectStatus() != 0 {
		t.Error("forward action produced a redirect")
	}
}

func TestWriteFixed(t *testing.T) {
	tests := []struct {
		name     string
		fx       configs.FixedResponse
		wantType string
	}{
		{"content type given", configs.FixedResponse{Status: 503, ContentType: "application/json", Body: `{"down":true}`}, "application/json"},
		{"default content type", configs.FixedResponse{Status: 404, Body: "not here"}, "text/plain; charset=utf-8"},
		{"empty body", configs.FixedResponse{Status: 204}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fx := tc.fx
			tb := mustCompile(t, &configs.Listener{Name: "f", DefaultAction: &configs.Action{FixedResponse: &fx}})
			w := httptest.NewRecorder()
			tb.Default().Action.WriteFixed(w)
			if w.Code != tc.fx.Status || w.Body.String() != tc.fx.Body {
				t.Errorf("got %d %q", w.Code, w.Body.String())
			}
			if ct := w.Header().Get("Content-Type"); ct != tc.wantType {
				t.Errorf("Content-Type %q, want %q", ct, tc.wantType)
			}
			if cl := w.Header().Get("Content-Length"); cl != strconv.Itoa(len(tc.fx.Body)) {
				t.Errorf("Content-Length %q", cl)
			}
		})
	}
}

func TestHeaderOps(t *testing.T) {
	ops := compileHeaderOps(&configs.HeaderOps{
		Set:    map[string]string{"x-env": "prod", "strict-transport-security": "max-age=1"},
		Add:    map[string]string{"x-multi": "b"},
		Remove: []string{"x-debug", "X-ENV"},
	})
	h := http.Header{"X-Debug": {"1"}, "X-Env": {"old"}, "X-Multi": {"a"}, "Keep": {"k"}}
	ops.Apply(h)
	want := http.Header{"X-Env": {"prod"}, "Strict-Transport-Security": {"max-age=1"}, "X-Multi": {"a", "b"}, "Keep": {"k"}}
	if len(h) != len(want) {
		t.Fatalf("got %v, want %v", h, want)
	}
	for k, v := range want {
		if strings.Join(h[k], ",") != strings.Join(v, ",") {
			t.Errorf("%s = %q, want %q", k, h[k], v)
		}
	}
	var none *HeaderOps
	none.Apply(h) // nil is a no-op
	if compileHeaderOps(nil) != nil || compileHeaderOps(&configs.HeaderOps{}) != nil {
		t.Error("empty ops should compile to nil")
	}

	// Rule ops reach their rule; a classic listener's ops reach its default action.
	tb := mustCompile(t, app(configs.Rule{Priority: 1, Paths: []string{"/a"}, Forward: fw("a"),
		RequestHeaders: &configs.HeaderOps{Set: map[string]string{"x-a": "1"}}, ResponseHeaders: &configs.HeaderOps{Remove: []string{"server"}}}))
	if r := tb.Rules()[1]; r.RequestHeaders == nil || r.RequestHeaders.Set[0].Name != "X-A" || r.ResponseHeaders.Remove[0] != "Server" {
		t.Errorf("rule ops not compiled: %+v %+v", r.RequestHeaders, r.ResponseHeaders)
	}
	tb = mustCompile(t, &configs.Listener{Name: "c", Style: "classic", Protocol: "http",
		Instances: []configs.Target{{Address: "127.0.0.1:9"}}, RequestHeaders: &configs.HeaderOps{Add: map[string]string{"x-classic": "1"}}})
	if d := tb.Default(); d.RequestHeaders == nil || d.RequestHeaders.Add[0].Name != "X-Classic" {
		t.Errorf("listener ops not on the default: %+v", d.RequestHeaders)
	}
}

// allocTable is a table with a mix of every condition, for allocation tests.
func allocTable(t testing.TB) *Table {
	rules := []configs.Rule{
		{Priority: 1, Hosts: []string{"api.example.com"}, Paths: []string{"/v1/*"}, Forward: fw("api")},
		{Priority: 2, Hosts: []string{"*.example.com"}, Headers: map[string][]string{"x-canary": {"1", "t*"}}, Forward: fw("canary")},
		{Priority: 3, Query: map[string][]string{"debug": {"on"}, "": {"x y"}}, Forward: fw("debug")},
		{Priority: 4, SourceIPs: []string{"192.0.2.0/24"}, Methods: []string{"POST"}, Forward: fw("office")},
		{Priority: 5, Hosts: []string{"api.example.com", "API2.example.com"}, Forward: fw("api-rest")},
	}
	return mustCompile(t, app(rules...))
}

func TestMatchHTTPDoesNotAllocate(t *testing.T) {
	tb := allocTable(t)
	tests := []struct {
		name string
		req  req
		want string
	}{
		{"exact host", req{host: "api.example.com", url: "/v1/x"}, "api"},
		{"exact host upper with port", req{host: "API.Example.com.:443", url: "/v1/x"}, "api"},
		{"wildcard with header", req{host: "w.example.com", header: http.Header{"X-Canary": {"True"}}}, "canary"},
		{"query decoded", req{host: "other.test", url: "/?z=1&debug=ON&k=x%20y"}, "debug"},
		{"source and method", req{method: "POST", host: "other.test", src: "::ffff:192.0.2.9"}, "office"},
		{"falls through to later exact rule", req{host: "api2.example.com", url: "/"}, "api-rest"},
		{"default", req{host: "nothing.test", url: "/x?y=z"}, "default"},
		{"long host", req{host: strings.Repeat("A", 300), url: "/"}, "default"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, host, src := tc.req.build()
			if g := group(tb.MatchHTTP(r, host, src)); g != tc.want {
				t.Fatalf("matched %q, want %q", g, tc.want)
			}
			if n := testing.AllocsPerRun(200, func() { tb.MatchHTTP(r, host, src) }); n != 0 {
				t.Errorf("MatchHTTP allocates %v times per call", n)
			}
		})
	}
}

// TestIndexAgreesWithLinearScan compares the exact-host index with a plain priority scan over
// random rule sets and requests.
func TestIndexAgreesWithLinearScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	hosts := []string{"a.test", "B.test", "c.test", "*.test", "?.test", "a.*", "*", "*.a.test", "*.B.Test", "*.x.a.test", "*test"}
	reqHosts := []string{"a.test", "A.TEST:80", "b.test.", "c.test", "d.test", "x.a.test", "", "[::1]:1",
		"y.x.a.test", "Y.X.A.TEST", "q.b.test", ".test", "atest", strings.Repeat("long.", 60) + "a.test"}
	paths := []string{"/", "/a", "/a/*", "*", "/?", "/b*"}
	for round := range 200 {
		var rules []configs.Rule
		for i := range 1 + rng.IntN(12) {
			r := configs.Rule{Priority: i*3 + 1 + rng.IntN(3), Forward: fw(strconv.Itoa(i))}
			for range rng.IntN(3) {
				r.Hosts = append(r.Hosts, hosts[rng.IntN(len(hosts))])
			}
			if rng.IntN(2) == 0 || len(r.Hosts) == 0 { // a rule needs a condition
				r.Paths = []string{paths[rng.IntN(len(paths))]}
			}
			rules = append(rules, r)
		}
		tb := mustCompile(t, app(rules...))
		for _, h := range reqHosts {
			for _, p := range []string{"/", "/a", "/a/b", "/b", "/c"} {
				r := httptest.NewRequest("GET", p, nil)
				got, lin := tb.MatchHTTP(r, h, netip.Addr{}), matchLinear(tb, r, h, netip.Addr{})
				if got != lin {
					t.Fatalf("round %d host %q path %q: index %d, linear %d", round, h, p, got.ID, lin.ID)
				}
				if !anyPaths(tb) { // host-only rules: SNI matching is host matching
					if s := tb.MatchSNI(h); s != lin {
						t.Fatalf("round %d: MatchSNI(%q) = %d, linear %d", round, h, s.ID, lin.ID)
					}
				}
			}
		}
	}
}

func anyPaths(tb *Table) bool {
	for _, r := range tb.rules {
		if len(r.paths) > 0 {
			return true
		}
	}
	return false
}

// FuzzCompile compiles a rule built from odd patterns and matches odd requests against it: no
// panics, the index agrees with a linear scan, and matching never allocates.
func FuzzCompile(f *testing.F) {
	f.Add("*.example.com", "/v1/*", "x-a", "1*", "q", "a b", "192.0.2.0/24", "API.example.com:80", "/v1/x", "q=a+b", "192.0.2.1")
	f.Add("", "", "", "", "", "", "", "", "", "", "")
	f.Add("**?*", "*?*", "host", "*", "", "*", "::/0", "[::1]:80", "*", "&&=&", "::1")
	f.Add("a.", ".", "Host", "?", "%", "%zz", "10.0.0.1", "a", "/%2", "%=%", "10.0.0.1")
	f.Fuzz(func(t *testing.T, host, path, hname, hval, qkey, qval, src, reqHost, reqPath, reqQuery, reqSrc string) {
		rule := configs.Rule{Priority: 1, Forward: fw("r")}
		if host != "" {
			rule.Hosts = []string{host, "exact.test"}
		}
		if path != "" {
			rule.Paths = []string{path}
		}
		if hname != "" {
			rule.Headers = map[string][]string{hname: {hval}}
		}
		if qval != "" {
			rule.Query = map[string][]string{qkey: {qval}}
		}
		if src != "" {
			rule.SourceIPs = []string{src}
		}
		l, err := validated(app(rule, configs.Rule{Priority: 2, Hosts: []string{"exact.test", strings.ToUpper(host) + "x"}, Forward: fw("two")}))
		if err != nil {
			return // configs refuses it: the runtime never compiles it
		}
		tb, err := Compile(l)
		if err != nil {
			return
		}
		r, _ := http.NewRequest("GET", "http://x/", nil)
		r.URL.Path, r.URL.RawQuery = reqPath, reqQuery
		r.Header.Set("X-A", hval)
		var sa netip.Addr
		if a, err := netip.ParseAddr(reqSrc); err == nil {
			sa = a
		}
		got := tb.MatchHTTP(r, reqHost, sa)
		if got == nil {
			t.Fatal("nil rule")
		}
		if lin := matchLinear(tb, r, reqHost, sa); lin != got {
			t.Fatalf("index %d, linear %d", got.ID, lin.ID)
		}
		_ = tb.MatchSNI(reqHost)
	})
}
