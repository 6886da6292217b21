package backends

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

type algorithm uint8

const (
	algRoundRobin algorithm = iota
	algLeastOutstanding
	algLeastConnections
	algWeightedRandom
	algSourceIPHash
)

// algorithmOf maps a validated algorithm name (configs.Algorithms) to its policy.
func algorithmOf(s string) algorithm {
	switch s {
	case "least_outstanding_requests":
		return algLeastOutstanding
	case "least_connections":
		return algLeastConnections
	case "weighted_random":
		return algWeightedRandom
	case "source_ip_hash":
		return algSourceIPHash
	}
	return algRoundRobin
}

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
		case "lb_cookie":
			g.sticky = stickyLBCookie
		case "app_cookie":
			g.sticky, g.appCookie = stickyAppCookie, st.Cookie
		case "source_ip":
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

const maxSeq = 1024 // round robin sequence length cap

func (s *snapshot) finish(alg algorithm, seeds bool) {
	n := len(s.tgts)
	if n == 0 {
		return
	}
	// Reduce weights by their gcd so equal weights give a sequence of length n.
	gd := s.weights[0]
	for _, w := range s.weights[1:] {
		gd = gcd(gd, w)
	}
	s.uniform = true
	for i := range s.weights {
		s.weights[i] /= gd
		s.total += s.weights[i]
		if s.weights[i] != s.weights[0] {
			s.uniform = false
		}
	}
	switch alg {
	case algRoundRobin:
		s.seq = smoothSequence(s.tgts, s.weights, s.total)
	case algWeightedRandom:
		s.cum = make([]uint64, n)
		var c uint64
		for i, w := range s.weights {
			c += w
			s.cum[i] = c
		}
	}
	if seeds || alg == algSourceIPHash {
		s.fillSeeds()
	}
}

func (s *snapshot) fillSeeds() {
	s.seeds = make([]uint64, len(s.tgts))
	for i, t := range s.tgts {
		sum := sha256.Sum256([]byte(t.spec.address))
		s.seeds[i] = binary.LittleEndian.Uint64(sum[:8])
	}
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// smoothSequence precomputes nginx's smooth weighted round robin, so a pick is one atomic add and
// an index: weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
func smoothSequence(tgts []*Target, weights []uint64, total uint64) []*Target {
	w := weights
	if total > maxSeq {
		// Scale down, keeping every target at least once.
		sum := total
		w = make([]uint64, len(weights))
		for i, x := range weights {
			w[i] = max(1, x*maxSeq/sum)
		}
		total = sumOf(w)
	}
	cur := make([]int64, len(tgts))
	seq := make([]*Target, 0, total)
	for range total {
		best := 0
		for i := range tgts {
			cur[i] += int64(w[i])
			if cur[i] > cur[best] {
				best = i
			}
		}
		cur[best] -= int64(total)
		seq = append(seq, tgts[best])
	}
	return seq
}

func sumOf(w []uint64) uint64 {
	var s uint64
	for _, x := range w {
		s += x
	}
	return s
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

// Pick chooses a routable target for a request or connection from client, avoiding exclude (the
// target that just failed, for a retry; pass nil otherwise). It returns nil when no target is
// routable, or when the only routable one is exclude. It never dials and does not allocate.
func (g *Group) Pick(client netip.Addr, exclude *Target) *Target {
	s := g.current()
	n := len(s.tgts)
	if n == 0 || (n == 1 && s.tgts[0] == exclude) {
		return nil
	}
	if g.sticky == stickySourceIP {
		return s.hashPick(client, exclude)
	}
	switch g.alg {
	case algLeastOutstanding:
		return s.leastPick(g.ctr.Add(1), exclude, false)
	case algLeastConnections:
		// A layer-4 stream is one target connection: its in-flight count is its connections.
		return s.leastPick(g.ctr.Add(1), exclude, g.proto == "http" || g.proto == "https")
	case algWeightedRandom:
		return s.randomPick(exclude)
	case algSourceIPHash:
		return s.hashPick(client, exclude)
	default:
		seq := s.seq
		i := g.ctr.Add(1)
		t := seq[i%uint64(len(seq))]
		for k := uint64(1); t == exclude && k < uint64(len(seq)); k++ {
			t = seq[(i+k)%uint64(len(seq))]
		}
		return t
	}
}

// leastPick takes the target with the least load per unit of weight — in-flight requests
// (least_outstanding_requests), or with byConns open connections (least_connections, HAProxy's
// and NLB's leastconn); ties go to the first found from a rotating start, so equal loads
// spread evenly.
func (s *snapshot) leastPick(start uint64, exclude *Target, byConns bool) *Target {
	n := uint64(len(s.tgts))
	var best *Target
	var bestLoad, bestW uint64
	for k := range n {
		i := (start + k) % n
		t := s.tgts[i]
		if t == exclude {
			continue
		}
		n := t.inflight.Load()
		if byConns {
			n = t.conns.Load()
		}
		load := uint64(max(n, 0)) + 1
		w := s.weights[i]
		// load/w < bestLoad/bestW, without division.
		if best == nil || load*bestW < bestLoad*w {
			best, bestLoad, bestW = t, load, w
		}
	}
	return best
}

func (s *snapshot) randomPick(exclude *Target) *Target {
	for range 4 {
		x := rand.Uint64N(s.total)
		// Binary search the cumulative weights.
		lo, hi := 0, len(s.cum)-1
		for lo < hi {
			mid := (lo + hi) / 2
			if s.cum[mid] > x {
				hi = mid
			} else {
				lo = mid + 1
			}
		}
		if t := s.tgts[lo]; t != exclude {
			return t
		}
	}
	for _, t := range s.tgts {
		if t != exclude {
			return t
		}
	}
	return nil
}

// hashPick is weighted rendezvous hashing: each client maps to the target with the highest score,
// so when the routable set changes only the clients of the targets that came or went move, and
// the retry target (second best) is stable too.
func (s *snapshot) hashPick(client netip.Addr, exclude *Target) *Target {
	a := client.Unmap().As16()
	hi, lo := binary.BigEndian.Uint64(a[:8]), binary.BigEndian.Uint64(a[8:])
	var best *Target
	bestScore := -1.0
	var bestH uint64
	for i, t := range s.tgts {
		if t == exclude {
			continue
		}
		h := mix(hi, lo, s.seeds[i])
		if s.uniform {
			if best == nil || h > bestH {
				best, bestH = t, h
			}
			continue
		}
		u := (float64(h>>11) + 0.5) / (1 << 53) // (0,1)
		score := float64(s.weights[i]) / -math.Log(u)
		if score > bestScore {
			best, bestScore = t, score
		}
	}
	return best
}

// mix is a 128-bit-in, 64-bit-out hash (splitmix64 finalizer rounds).
func mix(hi, lo, seed uint64) uint64 {
	x := hi ^ seed
	x = fmix(x) ^ lo
	return fmix(x + seed*0x9e3779b97f4a7c15)
}

func fmix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Transport is the group's HTTP transport (http/https groups; nil for tcp/tls). It is shared
// with other generations whose group configuration is unchanged, keeping idle connections.
func (g *Group) Transport() http.RoundTripper {
	if g.pool == nil {
		return nil
	}
	return g.pool.rt
}
