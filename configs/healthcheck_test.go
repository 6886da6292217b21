package configs

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestHealthCheckTimeoutDefault: an unset timeout is the smaller of the default and half the
// interval, so setting only a short interval works; an explicit timeout that is not shorter
// than the interval stays an error.
func TestHealthCheckTimeoutDefault(t *testing.T) {
	for _, tc := range []struct {
		name, hc string
		want     time.Duration
		err      string
	}{
		{name: "nothing set", hc: `{ path = "/" }`, want: 2 * time.Second},
		{name: "long interval", hc: `{ interval = "30s" }`, want: 2 * time.Second},
		{name: "interval 1s only", hc: `{ interval = "1s" }`, want: 500 * time.Millisecond},
		{name: "interval 3s only", hc: `{ interval = "3s" }`, want: 1500 * time.Millisecond},
		{name: "explicit timeout", hc: `{ interval = "1s", timeout = "900ms" }`, want: 900 * time.Millisecond},
		{name: "explicit timeout equal", hc: `{ interval = "1s", timeout = "1s" }`, err: `health_check.timeout "1s" must be shorter than interval "1s"`},
		{name: "explicit timeout longer", hc: `{ interval = "1s", timeout = "2s" }`, err: "must be shorter than interval"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
health_check = %s
`, tc.hc)
			c, err := Load("test.toml", []byte(text))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Group("web").HealthCheck.TimeoutDuration(); got != tc.want {
				t.Fatalf("timeout %v, want %v", got, tc.want)
			}
		})
	}
}

// TestPKCS11MaxSessionsOne: one session is the login's alone, so max_sessions = 1 is refused
// with the reason rather than silently raised.
func TestPKCS11MaxSessionsOne(t *testing.T) {
	text := `
[keystore]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "fulcrum"
pin = "env:PIN"
max_sessions = %d
`
	if _, err := Load("test.toml", []byte(fmt.Sprintf(text, 1))); err == nil || !strings.Contains(err.Error(), "max_sessions 1 leaves no session to sign with") {
		t.Fatalf("max_sessions = 1: %v", err)
	}
	c, err := Load("test.toml", []byte(fmt.Sprintf(text, 2)))
	if err != nil {
		t.Fatal(err)
	}
	if c.Keystore.MaxSessions != 2 {
		t.Fatalf("max_sessions = 2 became %d", c.Keystore.MaxSessions)
	}
}

// TestMatcher: health-check matchers parse into ranges that match what they say.
func TestMatcher(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		ok, bad []int
		err     bool
	}{
		{"single", "200", []int{200}, []int{201, 302}, false},
		{"range", "200-399", []int{200, 302, 399}, []int{400, 199}, false},
		{"list", "200,204, 300-301", []int{204, 301}, []int{203, 302}, false},
		{"reversed", "399-200", nil, nil, true},
		{"garbage", "2xx", nil, nil, true},
		{"out of range", "99", nil, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rs, err := ParseMatcher(tc.in)
			if (err != nil) != tc.err {
				t.Fatalf("err = %v", err)
			}
			h := HealthCheck{matcher: rs}
			for _, c := range tc.ok {
				if !h.Matches(c) {
					t.Errorf("%d should match %q", c, tc.in)
				}
			}
			for _, c := range tc.bad {
				if h.Matches(c) {
					t.Errorf("%d should not match %q", c, tc.in)
				}
			}
		})
	}
}
