package backends

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"sort"
	"sync/atomic"
	"time"
)

// targetSpec is what identifies a target in the registry besides its key.
type targetSpec struct {
	protocol string // the group's protocol: http | https | tcp | tls
	address  string
	hc       hcSpec
}

// Target is one back end. It is shared by every group (and generation) that names the same
// address with the same protocol and health-check settings; its counters are atomics.
type Target struct {
	reg  *Registry
	key  string
	id   string
	spec targetSpec

	inflight atomic.Int64
	_        [56]byte // keep the per-request counter off the read-mostly line below

	// conns counts the open HTTP connections to the address (pooled, idle or busy), shared by
	// every target of that address: what least_connections balances on. A layer-4 stream is
	// one connection, so layer-4 groups balance on inflight for both algorithms.
	conns *atomic.Int64

	activeUp atomic.Bool
	// decided: active checks have reached a verdict (healthy_threshold successes or
	// unhealthy_threshold failures in a row). Until then the target is routed to (see the
	// package doc) but reported "initial", as ALB does, not "healthy".
	decided      atomic.Bool
	upSince      atomic.Int64 // now() when it last became healthy; slow start ramps from here
	ejectedUntil atomic.Int64 // now() before which passive health keeps it out
	consec       atomic.Int32 // consecutive passive failures
	ejections    atomic.Int32 // ejections without a success in between (cool-down doubling)
	failures     atomic.Uint64
	reason       atomic.Pointer[string]
	tlsConf      atomic.Pointer[tls.Config] // latest generation's client TLS, for TLS health checks

	// Guarded by reg.mu.
	refs, pending int
	groups        map[string]int
	cancel        context.CancelFunc
	done          chan struct{}
}

func newTarget(r *Registry, key string, spec targetSpec) *Target {
	sum := sha256.Sum256([]byte(spec.protocol + "|" + spec.address))
	t := &Target{reg: r, key: key, id: hex.EncodeToString(sum[:8]), spec: spec, conns: r.connCounter(spec.address)}
	t.activeUp.Store(true) // healthy until proven otherwise (see package doc)
	t.upSince.Store(r.now())
	return t
}

// ID is a stable identifier derived from the group protocol and address (it survives reloads and
// restarts, so sticky cookies do too).
func (t *Target) ID() string { return t.id }

// Addr is the target's "host:port".
func (t *Target) Addr() string { return t.spec.address }

// Acquire counts one in-flight request or connection; pair it with Release.
func (t *Target) Acquire() { t.inflight.Add(1) }

// Release ends what Acquire started.
func (t *Target) Release() { t.inflight.Add(-1) }

// TryAcquire counts a request in flight unless limit (> 0) are already; limit 0 is unlimited.
func (t *Target) TryAcquire(limit int64) bool {
	if limit <= 0 {
		t.inflight.Add(1)
		return true
	}
	if t.inflight.Add(1) > limit {
		t.inflight.Add(-1)
		return false
	}
	return true
}

// Conns is the number of open HTTP connections to the target's address.
func (t *Target) Conns() int64 { return t.conns.Load() }

// InFlight is the number of requests or connections in progress.
func (t *Target) InFlight() int64 { return t.inflight.Load() }

// Healthy reports whether active checks pass and passive health has not ejected the target.
func (t *Target) Healthy() bool {
	return t.activeUp.Load() && t.reg.now() >= t.ejectedUntil.Load()
}

// ReportFailure records a failed request or connection (refused, reset, timeout, garbage). After
// the registry's threshold of consecutive failures the target is ejected for a cool-down that
// doubles on each repeat ejection, independently of active health checks.
func (t *Target) ReportFailure() {
	t.failures.Add(1)
	lim := t.reg.ejectFailures
	if lim <= 0 {
		return
	}
	if t.consec.Add(1) < lim {
		return
	}
	now := t.reg.now()
	until := t.ejectedUntil.Load()
	if now < until {
		return // already ejected
	}
	n := t.ejections.Add(1)
	cool := t.reg.ejectCooldown
	for i := int32(1); i < n && cool < maxEjection; i++ {
		cool *= 2
	}
	cool = min(cool, maxEjection)
	if !t.ejectedUntil.CompareAndSwap(until, now+int64(cool)) {
		return // another goroutine ejected it first
	}
	t.consec.Store(0)
	t.setReason("passive: consecutive failures")
	t.reg.bump()
	t.reg.log.Warn("target ejected", "target", t.spec.address, "protocol", t.spec.protocol,
		"cooldown", cool, "ejection", n)
}

// ReportSuccess records a successful request; it resets the consecutive-failure count. The
// loads before the stores keep the common case free of writes to shared cache lines.
func (t *Target) ReportSuccess() {
	if t.consec.Load() != 0 {
		t.consec.Store(0)
	}
	if t.ejections.Load() != 0 && t.reg.now() >= t.ejectedUntil.Load() {
		t.ejections.Store(0)
	}
}

func (t *Target) setReason(s string) { t.reason.Store(&s) }

// TargetStatus is a target's state for the admin API and metrics.
type TargetStatus struct {
	ID       string
	Address  string
	Protocol string   // the group protocol
	Groups   []string // groups of live generations naming it
	Healthy  bool     // routable now (active check up and not ejected)
	// Initial: active checks have not reached a verdict yet (always false with checks disabled).
	Initial bool
	Ejected bool // passive health has it out for a cool-down
	// Reason is the last failed check ("" if none failed yet).
	Reason              string
	InFlight            int64
	Draining            bool   // no live generation names it; kept for deregistration_delay
	Failures            uint64 // passive failures reported, total
	ConsecutiveFailures int
	HealthCheck         string // e.g. "http /healthz every 5s", or "disabled"
}

// Status snapshots the target.
func (t *Target) Status() TargetStatus {
	t.reg.mu.Lock()
	defer t.reg.mu.Unlock()
	return t.statusLocked()
}

func (t *Target) statusLocked() TargetStatus {
	st := TargetStatus{
		ID:                  t.id,
		Address:             t.spec.address,
		Protocol:            t.spec.protocol,
		Healthy:             t.Healthy(),
		Ejected:             t.reg.now() < t.ejectedUntil.Load(),
		InFlight:            t.inflight.Load(),
		Draining:            t.refs == 0 && t.pending > 0,
		Failures:            t.failures.Load(),
		ConsecutiveFailures: int(t.consec.Load()),
		HealthCheck:         t.spec.hc.String(),
		Initial:             t.spec.hc.enabled && !t.decided.Load(),
	}
	if p := t.reason.Load(); p != nil {
		st.Reason = *p
	}
	for g := range t.groups {
		st.Groups = append(st.Groups, g)
	}
	sort.Strings(st.Groups)
	return st
}

// rampWeight is the slow-start share of weight w (scaled by 1000) at time now, and the time at
// which the share should next be recomputed (0 when the ramp is over).
func (t *Target) rampWeight(w int, slow time.Duration, now int64) (eff uint64, recheck int64) {
	full := uint64(w) * 1000
	if slow <= 0 {
		return full, 0
	}
	start := max(t.upSince.Load(), t.ejectedUntil.Load())
	el := now - start
	if el >= int64(slow) || el < 0 {
		return full, 0
	}
	eff = full * uint64(el) / uint64(slow)
	eff = max(eff, 1)
	step := max(int64(slow)/20, int64(10*time.Millisecond)) // ~5% steps
	return eff, now + step
}
