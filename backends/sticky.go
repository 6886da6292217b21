package backends

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Cookie names Fulcrum sets for stickiness (ALB's AWSALB and AWSALBAPP).
const (
	LBCookieName  = "FULCRUMLB"
	AppCookieName = "FULCRUMLB_APP"
)

const macLen = 16 // truncated HMAC-SHA256: 128 bits is ample against forgery

// StickyTarget returns the target a request is bound to by the group's stickiness cookie, or nil
// (no stickiness, no cookie, a forged/expired/garbled cookie, or a target that is not routable
// now): the caller then picks normally and calls SetSticky. source_ip stickiness lives in Pick.
func (g *Group) StickyTarget(r *http.Request) *Target {
	name := g.stickyCookie()
	if name == "" {
		return nil
	}
	v, ok := findCookie(r.Header["Cookie"], name)
	if !ok {
		return nil
	}
	return g.boundTarget(name, v)
}

// stickyCookie is the name of the cookie that binds a client to a target, "" when the group
// binds none by cookie.
func (g *Group) stickyCookie() string {
	switch g.sticky {
	case stickyLBCookie:
		return LBCookieName
	case stickyAppCookie:
		return AppCookieName
	}
	return ""
}

// boundTarget is the target the value v of cookie name binds to, if v is genuine and the target
// routable now; else nil.
func (g *Group) boundTarget(name, v string) *Target {
	t := g.verifyCookie(name, v, time.Now().Unix())
	if t == nil {
		return nil
	}
	for _, x := range g.current().tgts {
		if x == t {
			return t
		}
	}
	return nil
}

// SetSticky adds the stickiness cookie binding the client to t to the response header h. For
// lb_cookie it always does (refreshing the expiry, as ALB does); for app_cookie only when the
// application's response sets its cookie. Call it after the back end answered.
func (g *Group) SetSticky(h http.Header, t *Target) {
	name := g.stickyCookie()
	if t == nil || name == "" || g.sticky == stickyAppCookie && !setsCookie(h, g.appCookie) {
		return
	}
	exp := time.Now().Add(g.stickyDuration)
	c := http.Cookie{
		Name:     name,
		Value:    g.cookieValue(name, t.id, exp.Unix()),
		Path:     "/",
		Expires:  exp,
		MaxAge:   int(g.stickyDuration / time.Second),
		HttpOnly: true,
	}
	h.Add("Set-Cookie", c.String())
}

// cookieValue is "ID.EXPIRY.MAC", MAC = HMAC(key, cookie name | group | ID | EXPIRY).
func (g *Group) cookieValue(name, id string, exp int64) string {
	b := make([]byte, 0, 80)
	b = append(b, id...)
	b = append(b, '.')
	b = strconv.AppendInt(b, exp, 10)
	sign, _ := g.reg.sticky.StickyKeys()
	mac := g.mac(sign, name, b)
	b = append(b, '.')
	return string(base64.RawURLEncoding.AppendEncode(b, mac[:macLen]))
}

func (g *Group) mac(key []byte, name string, idExp []byte) [sha256.Size]byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(name))
	m.Write([]byte{0})
	m.Write([]byte(g.name))
	m.Write([]byte{0})
	m.Write(idExp)
	var out [sha256.Size]byte
	m.Sum(out[:0])
	return out
}

// verifyCookie checks a cookie value and returns its target, or nil.
func (g *Group) verifyCookie(name, v string, now int64) *Target {
	dot := strings.LastIndexByte(v, '.')
	if dot < 0 || len(v)-dot-1 != base64.RawURLEncoding.EncodedLen(macLen) {
		return nil
	}
	idExp, macB64 := v[:dot], v[dot+1:]
	id, expS, ok := strings.Cut(idExp, ".")
	if !ok {
		return nil
	}
	exp, err := strconv.ParseInt(expS, 10, 64)
	if err != nil || exp < now {
		return nil
	}
	var got [macLen]byte
	if n, err := base64.RawURLEncoding.Decode(got[:], []byte(macB64)); err != nil || n != macLen {
		return nil
	}
	// Any key still in its overlap verifies: a rotation does not end the bindings made before it.
	_, keys := g.reg.sticky.StickyKeys()
	for _, k := range keys {
		if want := g.mac(k, name, []byte(idExp)); hmac.Equal(got[:], want[:macLen]) {
			return g.byID[id]
		}
	}
	return nil
}

// findCookie finds name's value in Cookie header lines without allocating (http.Request.Cookie
// parses and allocates every cookie). Quotes around the value are removed.
func findCookie(lines []string, name string) (string, bool) {
	for _, line := range lines {
		for len(line) > 0 {
			var part string
			part, line, _ = strings.Cut(line, ";")
			part = strings.TrimSpace(part)
			k, v, ok := strings.Cut(part, "=")
			if !ok || k != name {
				continue
			}
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			return v, true
		}
	}
	return "", false
}

// setsCookie reports whether response header h sets cookie name.
func setsCookie(h http.Header, name string) bool {
	for _, sc := range h["Set-Cookie"] {
		k, _, ok := strings.Cut(sc, "=")
		if ok && strings.TrimSpace(k) == name {
			return true
		}
	}
	return false
}

// HeaderValues reads a message's header values without a header map (the listener's HTTP/1
// engine keeps fields as slices of its read buffer): the i-th value of name, trimmed.
type HeaderValues interface {
	HeaderValue(name string, i int) (string, bool)
}

// StickyTargetCookies is StickyTarget for a request read through HeaderValues.
func (g *Group) StickyTargetCookies(h HeaderValues) *Target {
	name := g.stickyCookie()
	if name == "" {
		return nil
	}
	for i := 0; ; i++ {
		line, ok := h.HeaderValue("Cookie", i)
		if !ok {
			return nil
		}
		if v, ok := findCookie([]string{line}, name); ok {
			return g.boundTarget(name, v)
		}
	}
}

// StickySetCookie is SetSticky for a response read through HeaderValues: the Set-Cookie value
// binding the client to t, and whether one is due.
func (g *Group) StickySetCookie(t *Target, h HeaderValues) (string, bool) {
	if t == nil || g.sticky == stickyNone {
		return "", false
	}
	hdr := http.Header{}
	if g.sticky == stickyAppCookie {
		for i := 0; ; i++ {
			v, ok := h.HeaderValue("Set-Cookie", i)
			if !ok {
				break
			}
			hdr.Add("Set-Cookie", v)
		}
	}
	n := len(hdr["Set-Cookie"])
	g.SetSticky(hdr, t)
	vs := hdr["Set-Cookie"]
	if len(vs) == n {
		return "", false
	}
	return vs[len(vs)-1], true
}
