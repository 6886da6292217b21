package desync

import "sync/atomic"

// Counters counts classifications per tier and per reason. The zero value is
// ready; all methods are safe for concurrent use and lock-free.
type Counters struct {
	tiers   [numTiers]atomic.Uint64
	reasons [numReasons]atomic.Uint64
	blocked atomic.Uint64
	closed  atomic.Uint64
}

// Add counts one classification.
func (c *Counters) Add(t Tier, r Reason) {
	if t < numTiers {
		c.tiers[t].Add(1)
	}
	if r < numReasons {
		c.reasons[r].Add(1)
	}
}

// AddVerdict counts what was done with a request (blocked, or forwarded and
// then closed).
func (c *Counters) AddVerdict(v Verdict) {
	switch {
	case v.Block:
		c.blocked.Add(1)
	case v.CloseAfter:
		c.closed.Add(1)
	}
}

// Tier returns the count for t.
func (c *Counters) Tier(t Tier) uint64 {
	if t >= numTiers {
		return 0
	}
	return c.tiers[t].Load()
}

// Reason returns the count for r.
func (c *Counters) Reason(r Reason) uint64 {
	if r >= numReasons {
		return 0
	}
	return c.reasons[r].Load()
}

// Blocked and ClosedAfter return the verdict counts.
func (c *Counters) Blocked() uint64 { return c.blocked.Load() }

// ClosedAfter is the number of requests forwarded with CloseAfter.
func (c *Counters) ClosedAfter() uint64 { return c.closed.Load() }

// Snapshot is a point-in-time copy for metrics export.
type Snapshot struct {
	Tiers       [NumTiers]uint64
	Reasons     [NumReasons]uint64
	Blocked     uint64
	ClosedAfter uint64
}

// Snapshot copies the counters (each value is atomic; the set is not).
func (c *Counters) Snapshot() Snapshot {
	var s Snapshot
	for i := range c.tiers {
		s.Tiers[i] = c.tiers[i].Load()
	}
	for i := range c.reasons {
		s.Reasons[i] = c.reasons[i].Load()
	}
	s.Blocked = c.blocked.Load()
	s.ClosedAfter = c.closed.Load()
	return s
}
