package configs

import (
	"strings"
	"testing"
	"time"
)

// TestSlowPeerTimeoutDefaults: every slow-peer timeout is on without a word in the file, and
// only where it applies (HTTP listeners, HTTP groups).
func TestSlowPeerTimeoutDefaults(t *testing.T) {
	c := mustLoad(t, `
[[target_groups]]
name = "web"
protocol = "http"
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
forward = "db"
`)
	l := c.Listener("web")
	if l.ClientBodyTimeoutDuration() != 60*time.Second || l.SendTimeoutDuration() != 60*time.Second || l.MinTransferRate != 1024 {
		t.Errorf("listener: body %v send %v rate %d", l.ClientBodyTimeoutDuration(), l.SendTimeoutDuration(), l.MinTransferRate)
	}
	if g := c.Group("web"); g.TargetReadTimeoutDuration() != 60*time.Second {
		t.Errorf("group target_read_timeout %v", g.TargetReadTimeoutDuration())
	}
	if n := c.Listener("db"); n.ClientBodyTimeout != "" || n.SendTimeout != "" || n.MinTransferRate != 0 {
		t.Errorf("network listener got HTTP timeouts: %+v", n)
	}
	if g := c.Group("db"); g.TargetReadTimeout != "" || g.TargetReadTimeoutDuration() != 0 {
		t.Errorf("tcp group got target_read_timeout %q", g.TargetReadTimeout)
	}
	// Classic HTTP listeners synthesize an HTTP group, which gets the default as well.
	cc, err := LoadFile("classic.toml")
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range cc.TargetGroups {
		if (g.Protocol == "http" || g.Protocol == "https") && g.TargetReadTimeoutDuration() != 60*time.Second {
			t.Errorf("classic group %s: target_read_timeout %v", g.Name, g.TargetReadTimeoutDuration())
		}
	}
}

func TestSlowPeerTimeoutsSet(t *testing.T) {
	c := mustLoad(t, `
[[target_groups]]
name = "web"
protocol = "http"
target_read_timeout = "7s"
[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = "127.0.0.1:8080"
client_body_timeout = "3s"
send_timeout = "4s"
min_transfer_rate = 100
default_action = { forward = "web" }
`)
	l := c.Listener("web")
	if l.ClientBodyTimeoutDuration() != 3*time.Second || l.SendTimeoutDuration() != 4*time.Second || l.MinTransferRate != 100 {
		t.Errorf("listener: body %v send %v rate %d", l.ClientBodyTimeoutDuration(), l.SendTimeoutDuration(), l.MinTransferRate)
	}
	if g := c.Group("web"); g.TargetReadTimeoutDuration() != 7*time.Second {
		t.Errorf("target_read_timeout %v", g.TargetReadTimeoutDuration())
	}
}

// TestTrustSplit: trusted_proxies says which peers may send a PROXY header; trusted_forwarders
// says whose forwarding headers are believed. Without PROXY protocol an unset
// trusted_forwarders keeps trusted_proxies' old meaning (the peer is the client); with it, the
// default is nobody.
func TestTrustSplit(t *testing.T) {
	const head = `
[[target_groups]]
name = "web"
protocol = "http"
[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = "127.0.0.1:8080"
default_action = { forward = "web" }
`
	for _, tc := range []struct {
		name, keys string
		want       string // ForwarderPrefixes joined
	}{
		{"nothing set", ``, ""},
		{"legacy trusted_proxies without PROXY", `trusted_proxies = ["10.0.0.0/8"]`, "10.0.0.0/8"},
		{"PROXY senders are not forwarders", "trusted_proxies = [\"10.0.0.0/8\"]\naccept_proxy_protocol = true", ""},
		{"PROXY and explicit forwarders", "trusted_proxies = [\"10.0.0.0/8\"]\naccept_proxy_protocol = true\ntrusted_forwarders = [\"192.0.2.1\"]", "192.0.2.1/32"},
		{"explicit none", "trusted_proxies = [\"10.0.0.0/8\"]\ntrusted_forwarders = []", ""},
		{"explicit other", "trusted_proxies = [\"10.0.0.0/8\"]\ntrusted_forwarders = [\"172.16.0.0/12\"]", "172.16.0.0/12"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := mustLoad(t, head+tc.keys+"\n")
			var got []string
			for _, p := range c.Listener("web").ForwarderPrefixes() {
				got = append(got, p.String())
			}
			if strings.Join(got, ",") != tc.want {
				t.Errorf("forwarders %v, want %q", got, tc.want)
			}
		})
	}
}

// TestQuickstartCertificateNeverNearExpiry: the demo certificate is renewed with a third of its
// lifetime left, and that third must exceed the 60 days under which testssl.sh reports an
// expiring certificate (MEDIUM; HIGH under 30), so a scan of the demo is clean on any day.
func TestQuickstartCertificateNeverNearExpiry(t *testing.T) {
	c, err := LoadFile("quickstart.toml")
	if err != nil {
		t.Fatal(err)
	}
	for _, ct := range c.Certificates {
		if left := ct.LifetimeDuration() / 3; ct.Authority != "" && left <= 60*24*time.Hour {
			t.Errorf("certificate %s: lifetime %v is renewed with %v left, within testssl's 60-day warning", ct.Name, ct.LifetimeDuration(), left)
		}
	}
}
