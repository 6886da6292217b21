// Package router compiles a listener's rules into a matching table, once per configuration
// generation, and matches requests against it with ALB semantics: all conditions of a rule must
// match (AND), any value of one condition may match (OR), the first matching rule by priority
// wins, otherwise the default action. It is pure: no I/O, no goroutines, no locks. A Table is
// immutable after Compile and safe for concurrent use; MatchHTTP and MatchSNI do not allocate.
package router

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sort"
	"strings"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// Rule is one compiled rule. The default action is a Rule too (Priority 0, ID 0), so a match
// always returns a Rule.
type Rule struct {
	Priority int // 0 for the default action
	// ID is dense: 0 is the default action, 1..N the rules in priority order. Callers keep
	// per-rule parallel slices (resolved groups, metrics) indexed by it.
	ID              int
	Action          *Action
	RequestHeaders  *HeaderOps // nil when none
	ResponseHeaders *HeaderOps // nil when none

	hosts   []pattern // lower-cased, trailing dot removed; case-insensitive
	paths   []pattern // case-sensitive
	methods []string  // exact
	headers []headerCond
	query   []queryCond
	sources []netip.Prefix

	exactHosts bool // every host value is a plain name (indexed in Table.byHost)
}

// headerCond is one header condition: the header (by canonical name) must have a value that
// matches one of values (case-insensitive wildcards).
type headerCond struct {
	name   string // canonical
	host   bool   // the Host header, which net/http keeps in r.Host: match the host instead
	values []pattern
}

// queryCond is one query condition: some key=value pair of the query string must have a key
// matching key (or any key when anyKey) and a value matching one of values. Keys and values are
// compared percent-decoded and case-insensitively, with wildcards.
type queryCond struct {
	key    pattern
	anyKey bool
	values []pattern
}

// candidate is a rule to try for some host; hostKnown says its host condition is already
// satisfied by the exact-host index, so it need not be checked again.
type candidate struct {
	r         *Rule
	hostKnown bool
}

// Table is a compiled listener: its rules by priority, an exact-host index and the default.
type Table struct {
	rules []*Rule // by ID; rules[0] is the default

	// byHost maps a lower-case host to the rules that can match it, in priority order: the
	// rules naming that exact host, merged with every rule that is not exact-host-only. Hosts
	// not in the map try other: the rules that are not exact-host-only.
	byHost map[string][]candidate
	other  []candidate
}

// maxIndexedHost bounds the names kept in the exact-host index, so a request host can be
// lower-cased in a stack buffer. DNS names are at most 253 bytes.
const maxIndexedHost = 256

// Compile builds the table of listener l. Application listeners use l.Rules and
// l.DefaultAction; network tcp listeners with SNI rules use l.Rules (hosts only) and l.Forward
// as the default. Listener-level header operations (classic listeners) belong to the default.
// l must come from configs.Load: defaults (redirect parts, weights, fixed-response content
// type) and parsing (source_ips, redirect port) are configs' job. Compile refuses only what it
// could not compile without panicking.
func Compile(l *configs.Listener) (*Table, error) {
	if l == nil {
		return nil, errors.New("router: nil listener")
	}
	var def *Action
	var err error
	switch {
	case l.DefaultAction != nil:
		def, err = compileAction(*l.DefaultAction)
	case len(l.Forward) > 0:
		def, err = compileForward(l.Forward)
	default:
		err = errors.New("no default action (default_action or forward)")
	}
	if err != nil {
		return nil, fmt.Errorf("listener %q: default action: %w", l.Name, err)
	}
	t := &Table{rules: make([]*Rule, 1, len(l.Rules)+1)}
	t.rules[0] = &Rule{Action: def, RequestHeaders: compileHeaderOps(l.RequestHeaders), ResponseHeaders: compileHeaderOps(l.ResponseHeaders)}

	order := make([]int, len(l.Rules))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return l.Rules[order[a]].Priority < l.Rules[order[b]].Priority })
	for k, i := range order {
		cr := &l.Rules[i]
		if k > 0 && l.Rules[order[k-1]].Priority == cr.Priority {
			return nil, fmt.Errorf("listener %q: rules[%d]: priority %d is used twice", l.Name, i, cr.Priority)
		}
		r, err := compileRule(cr)
		if err != nil {
			return nil, fmt.Errorf("listener %q: rules[%d] (priority %d): %w", l.Name, i, cr.Priority, err)
		}
		r.ID = len(t.rules)
		t.rules = append(t.rules, r)
	}
	t.index()
	return t, nil
}

func compileRule(c *configs.Rule) (*Rule, error) {
	a, err := compileAction(c.Action())
	if err != nil {
		return nil, err
	}
	r := &Rule{
		Priority:        c.Priority,
		Action:          a,
		RequestHeaders:  compileHeaderOps(c.RequestHeaders),
		ResponseHeaders: compileHeaderOps(c.ResponseHeaders),
		methods:         append([]string(nil), c.Methods...),
	}
	r.exactHosts = len(c.Hosts) > 0
	for _, h := range c.Hosts {
		h = strings.TrimSuffix(h, ".") // "example.com." and "example.com" are one name
		if h == "" {
			return nil, errors.New("empty host pattern")
		}
		p := compilePattern(h, true)
		if p.kind != patExact || len(p.lit) > maxIndexedHost {
			r.exactHosts = false
		}
		r.hosts = append(r.hosts, p)
	}
	for _, p := range c.Paths {
		if p == "" {
			return nil, errors.New("empty path pattern")
		}
		r.paths = append(r.paths, compilePattern(p, false))
	}
	for _, k := range sortedKeys(c.Headers) {
		vs := c.Headers[k]
		if k == "" || len(vs) == 0 {
			return nil, fmt.Errorf("header condition %q needs a name and at least one value", k)
		}
		hc := headerCond{name: http.CanonicalHeaderKey(k)}
		hc.host = hc.name == "Host"
		for _, v := range vs {
			if hc.host {
				v = strings.TrimSuffix(v, ".")
			}
			hc.values = append(hc.values, compilePattern(v, true))
		}
		r.headers = append(r.headers, hc)
	}
	for _, k := range sortedKeys(c.Query) {
		vs := c.Query[k]
		if len(vs) == 0 {
			return nil, fmt.Errorf("query condition %q needs at least one value", k)
		}
		qc := queryCond{anyKey: k == "" || k == "*", key: compilePattern(k, true)}
		for _, v := range vs {
			qc.values = append(qc.values, compilePattern(v, true))
		}
		r.query = append(r.query, qc)
	}
	for _, p := range c.SourcePrefixes() {
		r.sources = append(r.sources, unmapPrefix(p))
	}
	return r, nil
}

// unmapPrefix turns an IPv4-mapped IPv6 prefix (::ffff:192.0.2.0/120) into its IPv4 form and
// masks it, because client addresses are unmapped before matching.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked()
}

func sortedKeys(m map[string][]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// index builds the exact-host map and the fallback candidate list from t.rules (in priority
// order). A rule whose host values are all plain names can only match those names, so it is
// listed under them and nowhere else.
func (t *Table) index() {
	rules := t.rules[1:]
	hosts := map[string]bool{}
	for _, r := range rules {
		if r.exactHosts {
			for _, p := range r.hosts {
				hosts[p.lit] = true
			}
		} else {
			t.other = append(t.other, candidate{r: r})
		}
	}
	if len(hosts) == 0 {
		return
	}
	t.byHost = make(map[string][]candidate, len(hosts))
	for h := range hosts {
		var list []candidate
		for _, r := range rules {
			switch {
			case !r.exactHosts:
				list = append(list, candidate{r: r})
			case r.namesHost(h):
				list = append(list, candidate{r: r, hostKnown: true})
			}
		}
		t.byHost[h] = list
	}
}

func (r *Rule) namesHost(h string) bool {
	for _, p := range r.hosts {
		if p.lit == h {
			return true
		}
	}
	return false
}

// Rules returns the rules by ID: [0] is the default action, then the rules in priority order.
// The slice is shared; do not modify it.
func (t *Table) Rules() []*Rule { return t.rules }

// Default returns the default action's rule (ID 0).
func (t *Table) Default() *Rule { return t.rules[0] }

// candidates returns the rules worth trying for host h (port and trailing dot already gone).
func (t *Table) candidates(h string) []candidate {
	if t.byHost == nil {
		return t.other
	}
	if !hasUpper(h) {
		if l, ok := t.byHost[h]; ok {
			return l
		}
		return t.other
	}
	if len(h) > maxIndexedHost {
		return t.other // longer than any indexed name, so in none of the lists
	}
	var buf [maxIndexedHost]byte
	for i := 0; i < len(h); i++ {
		buf[i] = lower(h[i])
	}
	if l, ok := t.byHost[string(buf[:len(h)])]; ok { // the compiler does not allocate for this key
		return l
	}
	return t.other
}

// Headers gives the router a request's header values without a header map, so an engine that
// keeps fields as slices of its read buffer can be matched without building one.
type Headers interface {
	// HeaderValue returns the i-th value (0-based, in arrival order) of the field named name
	// (canonical form; compare names case-insensitively), without surrounding whitespace.
	HeaderValue(name string, i int) (string, bool)
}

// Request is what matching reads of a request. An engine fills it from its own representation
// (the strings may alias a buffer it owns: matching keeps none of them).
type Request struct {
	Method   string
	Host     string // as received: its port, a trailing dot and case do not matter
	Path     string // decoded ("/%61dmin" is "/admin", as the back end will see it); "" means "/"
	RawQuery string
	Header   Headers
}

// stdHeader serves an http.Header through Headers (a map is pointer-shaped: no allocation).
type stdHeader http.Header

func (h stdHeader) HeaderValue(name string, i int) (string, bool) {
	vs := http.Header(h)[name]
	if i < len(vs) {
		return vs[i], true
	}
	return "", false
}

// MatchHTTP returns the first rule by priority that matches r, or the default; never nil.
// host is the host the request is for (normally r.Host; its port, a trailing dot and case do not
// matter) and src the client's address (already resolved through trusted proxies by the caller).
// Paths are matched against r.URL.Path (decoded: "/%61dmin" is "/admin", as the back end will
// see it). It does not allocate.
func (t *Table) MatchHTTP(r *http.Request, host string, src netip.Addr) *Rule {
	m := Request{Method: r.Method, Host: host, Header: stdHeader(r.Header)}
	if r.URL != nil {
		m.Path, m.RawQuery = r.URL.Path, r.URL.RawQuery
	}
	return t.Match(&m, src)
}

// Match is MatchHTTP for engines without an *http.Request. It does not allocate.
func (t *Table) Match(m *Request, src netip.Addr) *Rule {
	h := trimHost(m.Host)
	path := m.Path
	if path == "" {
		path = "/"
	}
	src = src.Unmap()
	for _, c := range t.candidates(h) {
		if c.r.match(m, h, path, m.RawQuery, src, c.hostKnown) {
			return c.r
		}
	}
	return t.rules[0]
}

// MatchSNI returns the first rule by priority whose hosts match the TLS server name, or the
// default; never nil. It serves network tcp listeners that route TLS pass-through by SNI, whose
// rules have only host conditions (any other condition makes a rule never match here).
func (t *Table) MatchSNI(serverName string) *Rule {
	h := trimHost(serverName)
	for _, c := range t.candidates(h) {
		r := c.r
		if len(r.paths)+len(r.methods)+len(r.headers)+len(r.query)+len(r.sources) > 0 {
			continue
		}
		if c.hostKnown || len(r.hosts) == 0 || matchAny(r.hosts, h) {
			return r
		}
	}
	return t.rules[0]
}

// match checks every condition, cheapest first.
func (r *Rule) match(req *Request, host, path, query string, src netip.Addr, hostKnown bool) bool {
	if len(r.methods) > 0 && !containsString(r.methods, req.Method) {
		return false
	}
	if !hostKnown && len(r.hosts) > 0 && !matchAny(r.hosts, host) {
		return false
	}
	if len(r.sources) > 0 && !containsAddr(r.sources, src) {
		return false
	}
	if len(r.paths) > 0 && !matchAny(r.paths, path) {
		return false
	}
	for i := range r.headers {
		if !r.headers[i].match(req.Header, host) {
			return false
		}
	}
	for i := range r.query {
		if !r.query[i].match(query) {
			return false
		}
	}
	return true
}

func matchAny(ps []pattern, s string) bool {
	for i := range ps {
		if ps[i].match(s) {
			return true
		}
	}
	return false
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (c *headerCond) match(h Headers, host string) bool {
	if c.host {
		return matchAny(c.values, host)
	}
	if h == nil {
		return false
	}
	for i := 0; ; i++ {
		v, ok := h.HeaderValue(c.name, i)
		if !ok {
			return false
		}
		if matchAny(c.values, v) {
			return true
		}
	}
}

// match scans the raw query string pair by pair ('&'-separated; a pair without '=' has an
// empty value) without splitting or decoding it into new strings.
func (c *queryCond) match(q string) bool {
	for len(q) > 0 {
		pair := q
		if i := strings.IndexByte(q, '&'); i >= 0 {
			pair, q = q[:i], q[i+1:]
		} else {
			q = ""
		}
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		if !c.anyKey && !c.key.matchDecoded(k) {
			continue
		}
		for i := range c.values {
			if c.values[i].matchDecoded(v) {
				return true
			}
		}
	}
	return false
}
