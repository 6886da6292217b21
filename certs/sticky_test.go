package certs

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// stickyGroup is group "g" of a registry whose cookie keys come from m.
func stickyGroup(t *testing.T, m *Manager, cfg *configs.Config) *backends.Group {
	t.Helper()
	reg := backends.NewRegistry(quiet, backends.WithStickyKeys(m))
	t.Cleanup(func() { reg.Close() })
	set, err := reg.Build(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	return set.Group("g")
}

// cookieRequest is a request carrying the cookies the response header h sets.
func cookieRequest(h http.Header) *http.Request {
	req, _ := http.NewRequest("GET", "http://example.test/", nil)
	for _, c := range (&http.Response{Header: h}).Cookies() {
		req.AddCookie(c)
	}
	return req
}

// TestStickyKeysSurviveRestartAndRotate: a cookie set through one manager is honoured by the
// next one on the same state dir and keystore (a restart), and after a rotation for the
// overlap; once the overlap has passed, its key is gone from the keystore and the cookie no
// longer binds. Software keystore and SoftHSM2.
func TestStickyKeysSurviveRestartAndRotate(t *testing.T) {
	for _, hsm := range []bool{false, true} {
		name := "software"
		if hsm {
			name = "pkcs11"
		}
		t.Run(name, func(t *testing.T) {
			if hsm {
				needHSM(t)
			}
			dir := t.TempDir()
			c := configs.Config{
				Server: configs.Server{StateDir: dir, StickyKeyRotation: "1h", StickyKeyOverlap: "2h"},
				TargetGroups: []configs.TargetGroup{{Name: "g", Protocol: "http",
					Targets:     []configs.Target{{Address: "127.0.0.1:1001"}, {Address: "127.0.0.1:1002"}},
					HealthCheck: &configs.HealthCheck{Disabled: true}, Stickiness: &configs.Stickiness{Type: "lb_cookie", Duration: "1h"}}},
			}
			if hsm {
				c.Keystore = softhsmtest.Keystore()
			}
			cfg := configtest.Must(dir, c)

			m1, err := NewManager(context.Background(), cfg, quiet)
			if err != nil {
				t.Fatal(err)
			}
			g1 := stickyGroup(t, m1, cfg)
			target := g1.Targets()[1]
			h := http.Header{}
			g1.SetSticky(h, target)
			old := cookieRequest(h)
			if got := g1.StickyTarget(old); got == nil || got.Addr() != target.Addr() {
				t.Fatalf("same process: bound to %v, want %s", got, target.Addr())
			}
			firstKey := m1.sticky.gens[0].Key
			m1.Close()

			m2 := newManager(t, cfg) // the restart
			g2 := stickyGroup(t, m2, cfg)
			if got := g2.StickyTarget(old); got == nil || got.Addr() != target.Addr() {
				t.Fatalf("after a restart: bound to %v, want %s", got, target.Addr())
			}

			ctx := context.Background()
			now := time.Now()
			if _, err := m2.refreshSticky(ctx, now.Add(61*time.Minute)); err != nil { // a rotation
				t.Fatal(err)
			}
			if n := len(m2.sticky.gens); n != 2 || m2.sticky.gens[1].Key != firstKey {
				t.Fatalf("after a rotation: generations %+v", m2.sticky.gens)
			}
			h = http.Header{}
			g2.SetSticky(h, target)
			fresh := cookieRequest(h)
			if fresh.Header.Get("Cookie") == old.Header.Get("Cookie") {
				t.Fatal("the rotation did not change the signing key")
			}
			for what, req := range map[string]*http.Request{"old": old, "new": fresh} {
				if got := g2.StickyTarget(req); got == nil || got.Addr() != target.Addr() {
					t.Errorf("within the overlap, %s cookie: bound to %v", what, got)
				}
			}

			if _, err := m2.refreshSticky(ctx, now.Add(61*time.Minute+2*time.Hour+time.Second)); err != nil { // past the overlap
				t.Fatal(err)
			}
			if got := g2.StickyTarget(old); got != nil {
				t.Errorf("past the overlap, the first key's cookie still binds (to %s)", got.Addr())
			}
			if _, err := m2.ks.Signer(ctx, firstKey); !errors.Is(err, keystore.ErrNotFound) {
				t.Errorf("the expired key is still in the keystore: %v", err)
			}
			if got := g2.StickyTarget(fresh); got == nil || got.Addr() != target.Addr() {
				t.Errorf("past the first overlap, the second key's cookie: bound to %v", got)
			}
		})
	}
}
