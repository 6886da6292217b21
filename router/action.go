package router

import (
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// ActionKind is what a rule does with a request.
type ActionKind uint8

const (
	ActionForward       ActionKind = iota + 1 // proxy to one of Groups (weighted)
	ActionRedirect                            // answer with a redirect (Redirect)
	ActionFixedResponse                       // answer with a fixed response (Fixed)
)

func (k ActionKind) String() string {
	switch k {
	case ActionForward:
		return "forward"
	case ActionRedirect:
		return "redirect"
	case ActionFixedResponse:
		return "fixed_response"
	}
	return "ActionKind(" + strconv.Itoa(int(k)) + ")"
}

// Action is a compiled rule action. Exactly one of the forward fields (Groups, Weights),
// Redirect or Fixed is set, as Kind says.
type Action struct {
	Kind ActionKind

	// Forward: target group names and their weights, in configuration order. A weight of 0
	// receives no traffic. PickGroup returns an index into Groups.
	Groups  []string
	Weights []int

	Redirect *RedirectAction
	Fixed    *FixedAction

	cum   []int // cumulative effective weights, parallel to Groups
	total int
}

// RedirectAction is an ALB redirect. The component fields are templates, defaulted by configs as
// ALB does (protocol "#{protocol}", host "#{host}", port "#{port}", path "/#{path}", query
// "#{query}"); RedirectLocation expands them.
type RedirectAction struct {
	Status                            int // 301, 302, 307 or 308
	Protocol, Host, Port, Path, Query string

	proto, host, port, path, query template
}

// FixedAction is an ALB fixed response, with everything precomputed for the hot path.
type FixedAction struct {
	Status        int
	ContentType   string // "" when no body and none configured
	Body          []byte
	ContentLength string // len(Body) in decimal
}

// PickGroup returns the index in Groups of the group that gets this request, chosen by weight
// from r (any uniformly distributed number, e.g. rand.Uint64()). Groups with weight 0 are never
// picked. It returns 0 for actions with a single group and for non-forward actions.
func (a *Action) PickGroup(r uint64) int {
	if len(a.cum) <= 1 {
		return 0
	}
	x := int(r % uint64(a.total))
	// Few groups in practice (ALB allows 5): a linear scan beats a binary search.
	for i, c := range a.cum {
		if x < c {
			return i
		}
	}
	return len(a.cum) - 1
}

// RedirectStatus is the redirect's status code (0 for other kinds).
func (a *Action) RedirectStatus() int {
	if a.Redirect == nil {
		return 0
	}
	return a.Redirect.Status
}

// RedirectLocation builds the Location of a redirect action for request r, as ALB does.
// host is the request's host as received (port and trailing dot are dropped, and it is
// lower-cased, for #{host}); tlsOn says whether the request came over TLS (#{protocol} is
// "https" then, else "http"); port is the listener's port as the client sees it (#{port}).
// The port is left out of the URL when it is the protocol's default (80, 443). #{path} is the
// request's escaped path without its leading "/" and #{query} its raw query without "?".
// It returns "" for other kinds.
func (a *Action) RedirectLocation(r *http.Request, host string, tlsOn bool, port string) string {
	var path, query string
	if r != nil && r.URL != nil {
		path, query = r.URL.EscapedPath(), r.URL.RawQuery
	}
	return a.RedirectLocationFor(path, query, host, tlsOn, port)
}

// RedirectLocationFor is RedirectLocation for engines without an *http.Request: escapedPath is
// the request target's path as received, rawQuery its query without "?".
func (a *Action) RedirectLocationFor(escapedPath, rawQuery, host string, tlsOn bool, port string) string {
	rd := a.Redirect
	if rd == nil {
		return ""
	}
	v := vars{host: NormalizeHost(host), port: port, protocol: "http"}
	if tlsOn {
		v.protocol = "https"
	}
	v.path = strings.TrimPrefix(escapedPath, "/")
	v.query = rawQuery
	scheme := asciiLower(rd.proto.expand(&v))
	h := rd.host.expand(&v)
	p := rd.port.expand(&v)
	path := rd.path.expand(&v)
	q := rd.query.expand(&v)

	var b strings.Builder
	b.Grow(len(scheme) + len(h) + len(p) + len(path) + len(q) + 6)
	b.WriteString(scheme)
	b.WriteString("://")
	b.WriteString(h)
	if p != "" && !(scheme == "http" && p == "80" || scheme == "https" && p == "443") {
		b.WriteByte(':')
		b.WriteString(p)
	}
	if path == "" || path[0] != '/' {
		b.WriteByte('/')
	}
	b.WriteString(path)
	if q != "" {
		b.WriteByte('?')
		b.WriteString(q)
	}
	return b.String()
}

// WriteFixed writes a fixed-response action's status, Content-Type, Content-Length and body.
// Headers already set on w (response header operations) are kept. It does nothing for other kinds.
func (a *Action) WriteFixed(w http.ResponseWriter) {
	f := a.Fixed
	if f == nil {
		return
	}
	h := w.Header()
	if f.ContentType != "" {
		h["Content-Type"] = []string{f.ContentType}
	}
	h["Content-Length"] = []string{f.ContentLength}
	w.WriteHeader(f.Status)
	if len(f.Body) > 0 {
		_, _ = w.Write(f.Body) // the client went away: nothing to do about it
	}
}

// ---- templates

type placeholder uint8

const (
	phNone placeholder = iota
	phProtocol
	phHost
	phPort
	phPath
	phQuery
)

var placeholders = [...]struct {
	name string
	ph   placeholder
}{
	{"#{protocol}", phProtocol}, {"#{host}", phHost}, {"#{port}", phPort}, {"#{path}", phPath}, {"#{query}", phQuery},
}

// template is a redirect component split into literals and placeholders at compile time.
type template []segment

type segment struct {
	lit string
	ph  placeholder
}

type vars struct{ protocol, host, port, path, query string }

// parseTemplate splits s on the ALB keywords (matched case-insensitively, as the configuration
// validator does); anything else, including an unknown "#{x}", is literal.
func parseTemplate(s string) template {
	var t template
	lit := 0
	for i := 0; i < len(s); {
		if s[i] == '#' {
			if ph, n := placeholderAt(s[i:]); ph != phNone {
				if lit < i {
					t = append(t, segment{lit: s[lit:i]})
				}
				t = append(t, segment{ph: ph})
				i += n
				lit = i
				continue
			}
		}
		i++
	}
	if lit < len(s) {
		t = append(t, segment{lit: s[lit:]})
	}
	return t
}

func placeholderAt(s string) (placeholder, int) {
	for _, p := range placeholders {
		if len(s) >= len(p.name) && strings.EqualFold(s[:len(p.name)], p.name) {
			return p.ph, len(p.name)
		}
	}
	return phNone, 0
}

func (t template) expand(v *vars) string {
	if len(t) == 1 { // the usual case: one literal or one placeholder, no copy
		return t[0].value(v)
	}
	var b strings.Builder
	for _, s := range t {
		b.WriteString(s.value(v))
	}
	return b.String()
}

func (s segment) value(v *vars) string {
	switch s.ph {
	case phProtocol:
		return v.protocol
	case phHost:
		return v.host
	case phPort:
		return v.port
	case phPath:
		return v.path
	case phQuery:
		return v.query
	}
	return s.lit
}

// ---- compiling actions

func compileAction(a configs.Action) (*Action, error) {
	n := 0
	if a.Forward != nil {
		n++
	}
	if a.Redirect != nil {
		n++
	}
	if a.FixedResponse != nil {
		n++
	}
	if n != 1 {
		return nil, fmt.Errorf("action needs exactly one of forward, redirect or fixed_response (has %d)", n)
	}
	switch {
	case a.Forward != nil:
		return compileForward(a.Forward)
	case a.Redirect != nil:
		return &Action{Kind: ActionRedirect, Redirect: compileRedirect(a.Redirect)}, nil
	default:
		return &Action{Kind: ActionFixedResponse, Fixed: compileFixed(a.FixedResponse)}, nil
	}
}

func compileForward(fw configs.Forward) (*Action, error) {
	a := &Action{Kind: ActionForward, Groups: make([]string, len(fw)), Weights: make([]int, len(fw)), cum: make([]int, len(fw))}
	for i, g := range fw {
		a.Groups[i], a.Weights[i] = g.Group, g.Weight
		a.total += g.Weight
		a.cum[i] = a.total
	}
	if a.total <= 0 { // validation refuses it; PickGroup would divide by zero
		return nil, errors.New("forward has no group with a positive weight")
	}
	return a, nil
}

// compileRedirect parses the templates of a validated redirect (configs has applied ALB's
// defaults and parsed the port).
func compileRedirect(r *configs.Redirect) *RedirectAction {
	rd := &RedirectAction{Status: r.Status, Protocol: r.Protocol, Host: r.Host, Port: r.PortValue(), Path: r.Path, Query: r.Query}
	rd.proto, rd.host, rd.port = parseTemplate(rd.Protocol), parseTemplate(rd.Host), parseTemplate(rd.Port)
	rd.path, rd.query = parseTemplate(rd.Path), parseTemplate(rd.Query)
	return rd
}

func compileFixed(f *configs.FixedResponse) *FixedAction {
	return &FixedAction{Status: f.Status, ContentType: f.ContentType, Body: []byte(f.Body), ContentLength: strconv.Itoa(len(f.Body))}
}

// ---- header operations

// HeaderOps is a compiled set of header rewrites: Apply removes, then sets, then adds. Names are
// canonical (textproto) and the order of Set and Add is sorted by name, so the result does not
// depend on map iteration.
type HeaderOps struct {
	Remove []string
	Set    []HeaderValue
	Add    []HeaderValue
}

// HeaderValue is one header name (canonical) and value.
type HeaderValue struct{ Name, Value string }

// Apply rewrites h. A nil *HeaderOps does nothing.
func (o *HeaderOps) Apply(h http.Header) {
	if o == nil {
		return
	}
	for _, k := range o.Remove {
		delete(h, k)
	}
	for _, kv := range o.Set {
		h[kv.Name] = []string{kv.Value} // fresh slice: callers may modify header values in place
	}
	for _, kv := range o.Add {
		h[kv.Name] = append(h[kv.Name], kv.Value)
	}
}

func compileHeaderOps(c *configs.HeaderOps) *HeaderOps {
	if c == nil || len(c.Set)+len(c.Add)+len(c.Remove) == 0 {
		return nil
	}
	o := &HeaderOps{}
	for _, k := range c.Remove {
		o.Remove = append(o.Remove, http.CanonicalHeaderKey(k))
	}
	o.Set = sortedValues(c.Set)
	o.Add = sortedValues(c.Add)
	return o
}

func sortedValues(m map[string]string) []HeaderValue {
	if len(m) == 0 {
		return nil
	}
	out := make([]HeaderValue, 0, len(m))
	for k, v := range m {
		out = append(out, HeaderValue{Name: http.CanonicalHeaderKey(k), Value: v})
	}
	sort.Slice(out, func(i, j int) bool { // names differing only in case canonicalize alike: tie-break on value
		return out[i].Name < out[j].Name || out[i].Name == out[j].Name && out[i].Value < out[j].Value
	})
	return out
}
