package backends

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// cookieFrom turns the Set-Cookie SetSticky wrote into a request carrying it.
func cookieFrom(t *testing.T, h http.Header, name string) (*http.Request, string) {
	t.Helper()
	resp := http.Response{Header: h}
	for _, c := range resp.Cookies() {
		if c.Name == name {
			req := httptest.NewRequest("GET", "/", nil)
			req.Header.Set("Cookie", "other=1; "+name+"="+c.Value+"; x=y")
			return req, c.Value
		}
	}
	t.Fatalf("no %s cookie in %v", name, h)
	return nil, ""
}

func TestLBCookie(t *testing.T) {
	r := newReg(t)
	gc := noHC("g", "round_robin", 1, 1, 1)
	gc.Stickiness = stickinessOf("lb_cookie")
	gc2 := noHC("h", "round_robin", 1, 1, 1)
	gc2.Stickiness = stickinessOf("lb_cookie")
	s := build(t, r, conf(gc, gc2))
	g := s.Group("g")
	tg := g.Targets()[2]
	h := http.Header{}
	g.SetSticky(h, tg)
	sc := h.Get("Set-Cookie")
	if !strings.Contains(sc, "HttpOnly") || !strings.Contains(sc, "Path=/") || !strings.Contains(sc, "Max-Age=86400") {
		t.Errorf("Set-Cookie %q", sc)
	}
	req, val := cookieFrom(t, h, LBCookieName)
	for range 5 {
		if got := g.StickyTarget(req); got != tg {
			t.Fatalf("sticky target %v, want %s", got, tg.Addr())
		}
	}
	// Another group does not accept it (the MAC covers the group name).
	if got := s.Group("h").StickyTarget(req); got != nil {
		t.Error("cookie accepted by another group")
	}
	// Tampering in any part fails.
	id, rest, _ := strings.Cut(val, ".")
	exp, mac, _ := strings.Cut(rest, ".")
	other := g.Targets()[0].ID()
	flip := func(s string) string {
		b := []byte(s)
		if b[0] == 'A' {
			b[0] = 'B'
		} else {
			b[0] = 'A'
		}
		return string(b)
	}
	for name, v := range map[string]string{
		"other id":       other + "." + exp + "." + mac,
		"later expiry":   id + "." + "9" + exp + "." + mac,
		"flipped mac":    id + "." + exp + "." + flip(mac),
		"truncated":      val[:len(val)-1],
		"no dots":        strings.ReplaceAll(val, ".", ""),
		"empty":          "",
		"expired signed": g.cookieValue(LBCookieName, tg.ID(), time.Now().Add(-time.Minute).Unix()),
		"app kind":       g.cookieValue(AppCookieName, tg.ID(), time.Now().Add(time.Hour).Unix()),
	} {
		req := httptest.NewRequest("GET", "/", nil)
		req.Header.Set("Cookie", LBCookieName+"="+v)
		if got := g.StickyTarget(req); got != nil {
			t.Errorf("%s: accepted %q", name, v)
		}
	}
	// An unhealthy target is not returned: the caller picks normally.
	tg.activeUp.Store(false)
	r.bump()
	if got := g.StickyTarget(req); got != nil {
		t.Error("sticky to an unhealthy target")
	}
}

func TestStickyKeySharedAcrossRegistries(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	gc := noHC("g", "", 1, 1)
	gc.Stickiness = stickinessOf("lb_cookie")
	g1 := build(t, newReg(t, WithStickyKey(key)), conf(gc)).Group("g")
	g2 := build(t, newReg(t, WithStickyKey(key)), conf(gc)).Group("g")
	g3 := build(t, newReg(t), conf(gc)).Group("g")
	h := http.Header{}
	g1.SetSticky(h, g1.Targets()[1])
	req, _ := cookieFrom(t, h, LBCookieName)
	if got := g2.StickyTarget(req); got == nil || got.Addr() != g1.Targets()[1].Addr() {
		t.Errorf("same key: %v", got)
	}
	if got := g3.StickyTarget(req); got != nil {
		t.Error("random key accepted a foreign cookie")
	}
}

func TestAppCookie(t *testing.T) {
	r := newReg(t)
	gc := noHC("g", "", 1, 1)
	gc.Stickiness = stickinessOf("app_cookie")
	gc.Stickiness.Cookie = "SESSION"
	gc.Stickiness.Duration = "1h"
	g := build(t, r, conf(gc)).Group("g")
	tg := g.Targets()[1]
	h := http.Header{}
	g.SetSticky(h, tg)
	if len(h) != 0 {
		t.Fatalf("set a cookie although the app did not: %v", h)
	}
	h.Add("Set-Cookie", "SESSION=abc; Path=/")
	g.SetSticky(h, tg)
	req, _ := cookieFrom(t, h, AppCookieName)
	if !strings.Contains(strings.Join(h["Set-Cookie"], "\n"), "Max-Age=3600") {
		t.Errorf("duration not applied: %v", h)
	}
	if got := g.StickyTarget(req); got != tg {
		t.Errorf("app cookie: got %v", got)
	}
}

func TestFindCookie(t *testing.T) {
	lines := []string{`a=1; b="two"`, ` c = x;FULCRUMLB=v.1.m ;d=`}
	for name, want := range map[string]string{"a": "1", "b": "two", "FULCRUMLB": "v.1.m", "d": ""} {
		if got, ok := findCookie(lines, name); !ok || got != want {
			t.Errorf("%s = %q,%v want %q", name, got, ok, want)
		}
	}
	if _, ok := findCookie(lines, "e"); ok {
		t.Error("found a missing cookie")
	}
	if n := testing.AllocsPerRun(100, func() { findCookie(lines, "FULCRUMLB") }); n != 0 {
		t.Errorf("findCookie allocates %v", n)
	}
}

func FuzzStickyCookie(f *testing.F) {
	r := NewRegistry(nil, WithStickyKey([]byte("k")))
	defer r.Close()
	gc := noHC("g", "", 1, 1)
	gc.Stickiness = stickinessOf("lb_cookie")
	s, err := r.Build(conf(gc), nil)
	if err != nil {
		f.Fatal(err)
	}
	g := s.Group("g")
	f.Add("FULCRUMLB=" + g.cookieValue(LBCookieName, g.Targets()[0].ID(), time.Now().Add(time.Hour).Unix()))
	f.Add(`FULCRUMLB="a.b.c"; x=1`)
	f.Add("FULCRUMLB=..; FULCRUMLB=")
	f.Fuzz(func(t *testing.T, cookie string) {
		req := httptest.NewRequest("GET", "/", nil)
		req.Header["Cookie"] = []string{cookie}
		got := g.StickyTarget(req)
		if got == nil {
			return
		}
		// Anything accepted must carry a valid MAC for that target.
		v, _ := findCookie(req.Header["Cookie"], LBCookieName)
		if g.verifyCookie(LBCookieName, v, time.Now().Unix()) != got {
			t.Fatalf("accepted %q inconsistently", cookie)
		}
	})
}
