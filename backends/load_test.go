package backends

import (
	"net/netip"
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// TestBuildFromValidatedConfig runs the registry on a configuration that went through
// configs.Load (defaults and parsed durations set by the configs package).
func TestBuildFromValidatedConfig(t *testing.T) {
	cfg, err := configs.Load("t.toml", []byte(`
[[target_groups]]
name = "web"
protocol = "http"
targets = ["127.0.0.1:9101", { address = "127.0.0.1:9102", weight = 3 }]
algorithm = "weighted_random"
slow_start = "0s"
deregistration_delay = "0s"
stickiness = { type = "lb_cookie", duration = "1h" }
[target_groups.health_check]
interval = "1h"
matcher = "200,204"

[[target_groups]]
name = "db"
protocol = "tcp"
targets = ["127.0.0.1:5432"]
proxy_protocol = "v2"

[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = "127.0.0.1:18080"
default_action = { forward = "web" }

[[listeners]]
name = "pg"
style = "network"
protocol = "tcp"
address = "127.0.0.1:15433"
forward = "db"
`))
	if err != nil {
		t.Fatalf("configs.Load: %v", err)
	}
	r := newReg(t)
	s := build(t, r, cfg)
	defer s.Release()
	web := s.Group("web")
	if web == nil || len(web.Targets()) != 2 || web.sticky != stickyLBCookie || web.dereg != 0 {
		t.Fatalf("web group: %+v", web)
	}
	got := countPicks(web, 4000, nil)
	if got["127.0.0.1:9102"] < 2700 {
		t.Errorf("weights from TOML not applied: %v", got)
	}
	hc := web.Targets()[0].spec.hc
	if !hc.matches(204) || hc.matches(201) || hc.interval.Hours() != 1 {
		t.Errorf("health check: %+v", hc)
	}
	if db := s.Group("db"); db.Pick(netip.Addr{}, nil) == nil || db.proxyProto != "v2" || db.connect.Seconds() != 5 {
		t.Errorf("db group: %+v", db)
	}
}
