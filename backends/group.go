package backends

import (
	"crypto/tls"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

type stickyKind uint8

const (
	stickyNone stickyKind = iota
	stickyLBCookie
	stickyAppCookie
	stickySourceIP
)

// member is a target in one group, with the group's weight for it.
type member struct {
	t      *Target
	weight int
}

// Group is one generation's target group. Pick is lock-free: it reads an immutable snapshot of the
// routable targets, rebuilt (by one goroutine, others keep using the old one) when any target's
// health changes or a slow-start ramp or ejection cool-down reaches its next step.
type Group struct {
	reg     *Registry
	name    string
	cfg     *configs.TargetGroup
	proto   string
	alg     algorithm
	members []member
	byID    map[string]*Target

	slow, dereg, connect, response time.Duration
	proxyProto                     string
	tlsConf                        *tls.Config // https/tls groups
	pool                           *poolRef    // http/https groups

	sticky         stickyKind
	stickyDuration time.Duration
	appCookie      string

	ctr     atomic.Uint64
	_       [56]byte
	snap    atomic.Pointer[snapshot]
	rebuild sync.Mutex // TryLock only: never waited on by Pick
}

// snapshot is the routable part of a group at one moment. Immutable once published.
type snapshot struct {
	epoch   uint64
	recheck int64     // now() at which weights or ejections change; 0 = never
	tgts    []*Target // routable targets
	weights []uint64  // effective weights, parallel to tgts
	seeds   []uint64  // per-target hash seeds (source_ip_hash)
	seq     []*Target // round robin: smooth weighted sequence, precomputed
	cum     []uint64  // weighted random: cumulative weights
	total   uint64
	uniform bool // all weights equal
}

// Name is the group's name.
func (g *Group) Name() string { return g.name }

// Config is the group's configuration (do not modify).
func (g *Group) Config() *configs.TargetGroup { return g.cfg }

// Protocol is the group's protocol: http, https, tcp or tls.
func (g *Group) Protocol() string { return g.proto }

// MaxInFlight is the group's cap on requests in progress per target (0: unlimited).
func (g *Group) MaxInFlight() int64 { return int64(g.cfg.MaxInFlight) }

// Targets returns the group's targets (healthy or not) in configuration order.
func (g *Group) Targets() []*Target {
	out := make([]*Target, len(g.members))
	for i, m := range g.members {
		out[i] = m.t
	}
	return out
}

// Target returns the group's target with the given ID, or nil.
func (g *Group) Target(id string) *Target { return g.byID[id] }

func (r *Registry) buildGroup(cfg *configs.Config, gc *configs.TargetGroup, tlsp TLSProvider) (g *Group, err error) {
	// gc is validated configuration (configs.Load): every value is known and every default
	// applied; building only maps it onto the runtime.
	g = &Group{reg: r, name: gc.Name, cfg: gc, proto: gc.Protocol, proxyProto: gc.ProxyProtocol,
		alg: algorithmOf(gc.Algorithm), slow: gc.SlowStartDuration(), dereg: gc.DeregistrationDelayDuration(),
		connect: gc.ConnectTimeoutDuration(), response: gc.ResponseTimeoutDuration()}
	if st := gc.Stickiness; st != nil {
		g.stickyDuration = st.DurationValue()
		switch st.Type {
		case configs.StickyLBCookie:
			g.sticky = stickyLBCookie
		case configs.StickyAppCookie:
			g.sticky, g.appCookie = stickyAppCookie, st.Cookie
		case configs.StickySourceIP:
			g.sticky = stickySourceIP
		}
	}
	hc := resolveHC(gc)
	tlsFP := ""
	if gc.Protocol == "https" || gc.Protocol == "tls" {
		if g.tlsConf, tlsFP, err = clientTLS(cfg, gc, tlsp); err != nil {
			return nil, err
		}
	}
	// Targets.
	g.byID = make(map[string]*Target, len(gc.Targets))
	hcFP := hc.fingerprint()
	if hc.protocol == "https" || hc.protocol == "tls" {
		hcFP += "|" + tlsFP
	}
	for _, tc := range gc.Targets {
		w := tc.Weight
		key := gc.Protocol + "|" + tc.Address + "|" + hcFP
		t := r.acquireTarget(key, targetSpec{protocol: gc.Protocol, address: tc.Address, hc: hc}, gc.Name, g.tlsConf)
		g.members = append(g.members, member{t: t, weight: w})
		g.byID[t.id] = t
	}
	// Every target drained (weight 0): serve on all of them rather than on none.
	allZero := true
	for _, m := range g.members {
		if m.weight != 0 {
			allZero = false
		}
	}
	if allZero {
		for i := range g.members {
			g.members[i].weight = 1
		}
	}
	if gc.Protocol == "http" || gc.Protocol == "https" {
		g.pool = r.acquireTransport(g.transportKey(gc, tlsFP), g.newTransport)
	}
	g.snap.Store(g.build())
	return g, nil
}

func (g *Group) release(delay time.Duration) {
	g.rebuild.Lock() // current() reads members under this lock
	ms := g.members
	g.members = nil // Pick keeps working on the last snapshot
	g.rebuild.Unlock()
	for _, m := range ms {
		g.reg.releaseTarget(m.t, g.name, delay)
	}
	if g.pool != nil {
		g.reg.releaseTransport(g.pool, delay)
	}
}

// build computes a snapshot from the members' current health.
func (g *Group) build() *snapshot {
	r := g.reg
	s := &snapshot{epoch: r.epoch.Load()}
	now := r.now()
	var ejected []member
	for _, m := range g.members {
		if m.weight <= 0 || !m.t.activeUp.Load() {
			continue
		}
		if until := m.t.ejectedUntil.Load(); now < until {
			ejected = append(ejected, m)
			if s.recheck == 0 || until < s.recheck {
				s.recheck = until
			}
			continue
		}
		s.add(m, g.slow, now)
	}
	// Passive ejection must not take out the whole group: when every actively healthy target is
	// ejected, route to them anyway (Envoy's max-ejection idea; the active checks are the
	// authority on "down", and the spec wants 503 only when every target is down).
	if len(s.tgts) == 0 {
		for _, m := range ejected {
			s.add(m, 0, now)
		}
	}
	s.finish(g.alg, g.sticky == stickySourceIP)
	return s
}

func (s *snapshot) add(m member, slow time.Duration, now int64) {
	w, recheck := m.t.rampWeight(m.weight, slow, now)
	if recheck != 0 && (s.recheck == 0 || recheck < s.recheck) {
		s.recheck = recheck
	}
	s.tgts = append(s.tgts, m.t)
	s.weights = append(s.weights, w)
}

// current returns the snapshot, rebuilding it when stale. Only one goroutine rebuilds; the others
// keep using the previous snapshot meanwhile.
func (g *Group) current() *snapshot {
	s := g.snap.Load()
	if s.epoch == g.reg.epoch.Load() && (s.recheck == 0 || g.reg.now() < s.recheck) {
		return s
	}
	if !g.rebuild.TryLock() {
		return s
	}
	defer g.rebuild.Unlock()
	if s2 := g.snap.Load(); s2 != s {
		return s2 // someone rebuilt while we looked
	}
	if g.members == nil {
		return s // released: keep the last view
	}
	s = g.build()
	g.snap.Store(s)
	return s
}

// Transport is the group's HTTP transport (http/https groups; nil for tcp/tls). It is shared
// with other generations whose group configuration is unchanged, keeping idle connections.
func (g *Group) Transport() http.RoundTripper {
	if g.pool == nil {
		return nil
	}
	return g.pool.rt
}
