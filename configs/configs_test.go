package configs

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/invalid/*.err from the current output")

// TestExamples loads every example configuration shipped next to the package.
func TestExamples(t *testing.T) {
	files, err := filepath.Glob("*.toml")
	if err != nil || len(files) < 5 {
		t.Fatalf("examples: %v %v", files, err)
	}
	for _, f := range files {
		if _, err := LoadFile(f); err != nil {
			t.Errorf("%s:\n%v", f, err)
		}
	}
}

// TestInvalid loads each testdata/invalid/NAME.toml and compares the complete error text with
// NAME.err. Every problem must carry a line number.
func TestInvalid(t *testing.T) {
	files, _ := filepath.Glob("testdata/invalid/*.toml")
	if len(files) == 0 {
		t.Fatal("no invalid configs")
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".toml")
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			c, err := Load(filepath.Base(f), b)
			if err == nil {
				t.Fatal("loaded without error")
			}
			if c != nil {
				t.Error("a config came back with the error")
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error is %T, not *ValidationError", err)
			}
			for _, p := range ve.Problems {
				if p.Line == 0 || p.File != filepath.Base(f) {
					t.Errorf("problem without position: %v", p)
				}
				if strings.Contains(p.Error(), "\n") {
					t.Errorf("problem spans lines: %q", p.Error())
				}
			}
			got := err.Error() + "\n"
			golden := strings.TrimSuffix(f, ".toml") + ".err"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update)", err)
			}
			if got != string(want) {
				t.Errorf("errors differ\n--- got\n%s--- want\n%s", got, want)
			}
		})
	}
}

func mustLoad(t testing.TB, text string) *Config {
	t.Helper()
	c, err := Load("test.toml", []byte(text))
	if err != nil {
		t.Fatalf("load:\n%v", err)
	}
	return c
}

func TestDefaults(t *testing.T) {
	c := mustLoad(t, `
[[target_groups]]
name = "web"
protocol = "http"
targets = ["127.0.0.1:1", { address = "127.0.0.1:2" }, { address = "127.0.0.1:3", weight = 0 }]
[[target_groups]]
name = "db"
protocol = "tcp"
[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = "127.0.0.1:8080"
default_action = { forward = "web" }
[[listeners]]
name = "db"
style = "network"
protocol = "tcp"
address = "127.0.0.1:5432"
forward = [{ group = "db" }]
`)
	s := c.Server
	if s.StateDir != "state" || s.ShutdownTimeoutDuration() != 30*time.Second || s.LogLevel != "info" || s.Admin != "" {
		t.Errorf("server: %+v", s)
	}
	if c.Keystore.Type != "software" || c.Keystore.MasterKey != "file:state/master.key" {
		t.Errorf("keystore: %+v", c.Keystore)
	}
	g := c.Group("web")
	if g.Algorithm != "round_robin" || g.DeregistrationDelayDuration() != 30*time.Second ||
		g.ConnectTimeoutDuration() != 5*time.Second || g.ResponseTimeoutDuration() != 60*time.Second || g.MaxIdleConns != 1024 {
		t.Errorf("group: %+v", g)
	}
	if w := []int{g.Targets[0].Weight, g.Targets[1].Weight, g.Targets[2].Weight}; w[0] != 1 || w[1] != 1 || w[2] != 0 {
		t.Errorf("weights %v, want [1 1 0]", w)
	}
	h := g.HealthCheck
	if h == nil || h.Protocol != "http" || h.Path != "/" || h.IntervalDuration() != 5*time.Second || h.TimeoutDuration() != 2*time.Second ||
		h.HealthyThreshold != 3 || h.UnhealthyThreshold != 2 || !h.Matches(200) || !h.Matches(399) || h.Matches(400) || h.Matches(199) {
		t.Errorf("health check: %+v", h)
	}
	if dh := c.Group("db").HealthCheck; dh.Protocol != "tcp" || dh.Path != "" || dh.MatcherRanges() != nil {
		t.Errorf("tcp health check: %+v", dh)
	}
	l := c.Listener("web")
	if l.IdleTimeoutDuration() != 60*time.Second || l.HeaderTimeoutDuration() != 10*time.Second || l.MaxHeaderBytes != 65536 ||
		l.XFF != "append" || l.DesyncMitigation != "defensive" || l.ClientAuth == nil || l.ClientAuth.Mode != "off" || l.TLSPolicy != "" {
		t.Errorf("listener: %+v", l)
	}
	if fw := l.DefaultAction.Forward; len(fw) != 1 || fw[0].Group != "web" || fw[0].Weight != 1 {
		t.Errorf("forward: %+v", fw)
	}
	n := c.Listener("db")
	if n.IdleTimeoutDuration() != 350*time.Second || n.XFF != "" || n.Forward[0].Weight != 1 {
		t.Errorf("network listener: %+v", n)
	}
	if want := netipAddrPort("127.0.0.1:8080"); l.AddrPort() != want {
		t.Errorf("addr %v", l.AddrPort())
	}
}

func TestClassicSynthesis(t *testing.T) {
	c, err := LoadFile("classic.toml")
	if err != nil {
		t.Fatal(err)
	}
	ssl := c.Listener("legacy-ssl")
	if ssl.DefaultAction != nil || len(ssl.Forward) != 1 || ssl.Forward[0].Group != "@classic/legacy-ssl" || !ssl.Synthesized() {
		t.Fatalf("ssl forward: %+v", ssl.Forward)
	}
	g := c.Group(ClassicGroupName("legacy-ssl"))
	if g == nil || g.Protocol != "tcp" || g.ProxyProtocol != "v1" || len(g.Targets) != 2 || g.ClassicListener() != "legacy-ssl" {
		t.Fatalf("ssl group: %+v", g)
	}
	if h := g.HealthCheck; h.Protocol != "tcp" || h.Port != 7001 || h.IntervalDuration() != 10*time.Second {
		t.Errorf("ssl health check: %+v", h)
	}
	web := c.Listener("legacy-http")
	if web.DefaultAction == nil || web.DefaultAction.Forward[0].Group != "@classic/legacy-http" || web.Forward != nil {
		t.Fatalf("http action: %+v", web.DefaultAction)
	}
	hg := c.Group("@classic/legacy-http")
	if hg.Protocol != "http" || hg.HealthCheck.Path != "/ping" || hg.HealthCheck.Port != 7101 || hg.HealthCheck.TimeoutDuration() != 5*time.Second {
		t.Errorf("http group: %+v %+v", hg, hg.HealthCheck)
	}
	if tg := c.Group("@classic/legacy-https"); tg.Protocol != "https" || tg.TLS == nil || tg.TLS.Authority != "internal" {
		t.Errorf("https group: %+v", tg)
	}
	if tg := c.Group("@classic/legacy-tcp"); tg.Protocol != "tcp" || tg.ProxyProtocol != "" {
		t.Errorf("tcp group: %+v", tg)
	}
	// Validate again: idempotent, no second synthesized group.
	n := len(c.TargetGroups)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(c.TargetGroups) != n || c.Listener("legacy-ssl").Forward[0].Group != "@classic/legacy-ssl" {
		t.Errorf("re-validate changed the config: %d -> %d groups", n, len(c.TargetGroups))
	}
}

func TestDecodeForms(t *testing.T) {
	c := mustLoad(t, `
[[target_groups]]
name = "a"
protocol = "http"
targets = [{ address = "127.0.0.1:1", weight = 7 }]
[[target_groups]]
name = "b"
protocol = "http"
[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = "127.0.0.1:8080"
trusted_proxies = ["10.1.2.3/8", "192.0.2.7"]
default_action = { redirect = { protocol = "HTTPS", port = "#{port}", status = 301 } }
[[listeners.rules]]
priority = 1
paths = ["/x"]
source_ips = ["2001:db8::1"]
forward = [{ group = "a", weight = 90 }, { group = "b", weight = 10 }]
[[listeners.rules]]
priority = 2
paths = ["/y"]
redirect = { port = 8443, status = 302 }
`)
	l := c.Listener("web")
	if l.DefaultAction.Redirect.PortValue() != "#{port}" || l.Rules[1].Redirect.PortValue() != "8443" {
		t.Errorf("ports %q %q", l.DefaultAction.Redirect.PortValue(), l.Rules[1].Redirect.PortValue())
	}
	if fw := l.Rules[0].Forward; len(fw) != 2 || fw[0] != (WeightedGroup{Group: "a", Weight: 90, weightSet: true}) || fw[1].Weight != 10 {
		t.Errorf("forward %+v", fw)
	}
	if tp := l.TrustedPrefixes(); len(tp) != 2 || tp[0].String() != "10.0.0.0/8" || tp[1].String() != "192.0.2.7/32" {
		t.Errorf("trusted %v", tp)
	}
	if sp := l.Rules[0].SourcePrefixes(); len(sp) != 1 || sp[0].String() != "2001:db8::1/128" {
		t.Errorf("source %v", sp)
	}
	if a := l.Rules[0].Action(); a.Forward == nil || a.Redirect != nil {
		t.Errorf("action %+v", a)
	}
	if c.Group("a").Targets[0].Weight != 7 || !c.Group("a").Targets[0].AddrPort().IsValid() {
		t.Errorf("target %+v", c.Group("a").Targets[0])
	}
}

func TestResolve(t *testing.T) {
	c, err := LoadFile(filepath.Join("testdata", "..", "quickstart.toml"))
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	if got := c.StateDirPath(); got != filepath.Join(wd, "state") {
		t.Errorf("state dir %q", got)
	}
	if kind, ref := c.SecretRef(c.Keystore.MasterKey); kind != "file" || ref != filepath.Join(wd, "state", "master.key") {
		t.Errorf("master key %q %q", kind, ref)
	}
	if c.Resolve("/abs") != "/abs" {
		t.Error("absolute path changed")
	}
}

// TestValidateGoBuilt checks a configuration built in Go: defaults apply, problems have no line.
func TestValidateGoBuilt(t *testing.T) {
	c := &Config{
		TargetGroups: []TargetGroup{{Name: "web", Protocol: "http", Targets: []Target{{Address: "127.0.0.1:1"}}}},
		Listeners: []Listener{{Name: "web", Style: "application", Protocol: "http", Address: "127.0.0.1:8080",
			DefaultAction: &Action{Forward: Forward{{Group: "web"}}}}},
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.TargetGroups[0].Targets[0].Weight != 1 || c.Listeners[0].DefaultAction.Forward[0].Weight != 1 {
		t.Error("weights not defaulted")
	}
	c.Listeners[0].Address = "nope"
	err := c.Validate()
	if err == nil || err.Error() != `config: listeners[0] ("web"): address "nope" is not "host:port" (IPv6 as "[::1]:443")` {
		t.Errorf("got %v", err)
	}
}

// TestLineIndex checks the path -> line mapping used for problem positions.
func TestLineIndex(t *testing.T) {
	src := `# comment
[server]
admin = "x" # trailing
[[listeners]]
name = "a"
[[listeners.rules]]
paths = [
  "/a",   # first
  "/b",
]
headers = { "x-a" = ["1"], b.c = 2 }
[[listeners]]
name = """
multi
line"""
default_action = { forward = [
  { group = "g", weight = 1 },
] }
[listeners.client_auth]
mode = 'off'
[[listeners.rules]]
priority = 1
`
	li := buildLineIndex(src)
	for path, want := range map[string]int{
		"server.admin":                                  3,
		"listeners[0]":                                  4,
		"listeners[0].rules[0].paths":                   7,
		"listeners[0].rules[0].paths[1]":                9,
		"listeners[0].rules[0].headers.x-a":             11,
		"listeners[0].rules[0].headers.b.c":             11,
		"listeners[1].name":                             13,
		"listeners[1].default_action.forward[0]":        17,
		"listeners[1].default_action.forward[0].weight": 17,
		"listeners[1].client_auth.mode":                 20,
		"listeners[1].rules[0].priority":                22,
		"listeners[1].rules[0].nothing":                 21, // falls back to the parent
		"nothing":                                       0,
	} {
		if got := li.lineOf(path); got != want {
			t.Errorf("%s: line %d, want %d", path, got, want)
		}
	}
}

func TestProblemFormat(t *testing.T) {
	p := &Problem{File: "f.toml", Line: 41, Path: "listeners[2]", Name: "legacy-ssl", Message: "m"}
	if p.Error() != `f.toml:41: listeners[2] ("legacy-ssl"): m` {
		t.Error(p.Error())
	}
	p = &Problem{File: "f.toml", Line: 3, Col: 7, Message: "syntax"}
	if p.Error() != `f.toml:3:7: syntax` {
		t.Error(p.Error())
	}
	ve := &ValidationError{Problems: []*Problem{p, p}}
	var got *Problem
	if !errors.As(ve, &got) || got != p || ve.Error() != p.Error()+"\n"+p.Error() {
		t.Error("ValidationError wrapping")
	}
}

func TestLoadFileMissing(t *testing.T) {
	_, err := LoadFile(filepath.Join(t.TempDir(), "none.toml"))
	if err == nil || !strings.Contains(err.Error(), "none.toml") || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("got %v", err)
	}
}

func FuzzLoad(f *testing.F) {
	seeds, _ := filepath.Glob("*.toml")
	more, _ := filepath.Glob("testdata/invalid/*.toml")
	for _, s := range append(seeds, more...) {
		if b, err := os.ReadFile(s); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("a = [1, {b = 2}, \"c\"]\n[x.y]\n'q' = \"\"\"\n\"\"\"\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Load("fuzz.toml", b)
		if err == nil {
			if c == nil {
				t.Fatal("nil config without error")
			}
			return
		}
		var ve *ValidationError
		if !errors.As(err, &ve) || len(ve.Problems) == 0 {
			t.Fatalf("error %T without problems: %v", err, err)
		}
		for _, p := range ve.Problems {
			if p.File != "fuzz.toml" {
				t.Fatalf("problem without file: %v", p)
			}
			if p.Line == 0 && p.Path == "" {
				t.Fatalf("problem without position or path: %v", p)
			}
			if strings.ContainsAny(p.Error(), "\n\r") {
				t.Fatalf("multi-line problem: %q", p.Error())
			}
		}
		_ = buildLineIndex(string(b)) // the indexer must survive any input
	})
}

// TestStickyKeyOverlapCoversDuration: a cookie must not outlive the key that signed it.
func TestStickyKeyOverlapCoversDuration(t *testing.T) {
	base := `[server]
sticky_key_overlap = "2h"

[[target_groups]]
name = "g"
protocol = "http"
targets = ["127.0.0.1:1"]
stickiness = { type = "lb_cookie", duration = "%s" }
`
	if _, err := Load("t.toml", []byte(fmt.Sprintf(base, "2h"))); err != nil {
		t.Fatalf("duration = overlap: %v", err)
	}
	_, err := Load("t.toml", []byte(fmt.Sprintf(base, "3h")))
	if err == nil || !strings.Contains(err.Error(), "sticky_key_overlap") {
		t.Fatalf("duration > overlap: %v", err)
	}
	c, err := Load("t.toml", []byte(`[server]`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Server.StickyKeyRotationDuration() != 168*time.Hour || c.Server.StickyKeyOverlapDuration() != 168*time.Hour {
		t.Errorf("defaults: rotation %v overlap %v", c.Server.StickyKeyRotationDuration(), c.Server.StickyKeyOverlapDuration())
	}
}
