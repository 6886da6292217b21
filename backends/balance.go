// balance.go: the balancing policies, every algorithm of target_groups.algorithm in one place.
// A generation's snapshot precomputes what a policy needs (the smooth weighted round-robin
// sequence, cumulative weights, hash seeds); Pick then runs without locks.

package backends

import (
	"crypto/sha256"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"net/netip"

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
	case configs.LeastOutstandingRequests:
		return algLeastOutstanding
	case configs.LeastConnections:
		return algLeastConnections
	case configs.WeightedRandom:
		return algWeightedRandom
	case configs.SourceIPHash:
		return algSourceIPHash
	}
	return algRoundRobin // configs.RoundRobin, the default configs applies
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
