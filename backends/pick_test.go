package backends

import (
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

func addr(i int) string { return "127.0.0.1:" + itoa(1000+i) }

func TestRoundRobin(t *testing.T) {
	tests := []struct {
		name    string
		weights []int
		n       int
		want    []int
	}{
		{"equal", []int{1, 1, 1}, 300, []int{100, 100, 100}},
		{"weighted", []int{5, 1, 1}, 700, []int{500, 100, 100}},
		{"zero weight never picked", []int{2, 0, 1}, 300, []int{200, 0, 100}},
		{"unvalidated all-zero means 1", []int{0, 0}, 10, []int{5, 5}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newReg(t)
			g := build(t, r, conf(noHC("g", "round_robin", tc.weights...))).Group("g")
			got := countPicks(g, tc.n, nil)
			for i, w := range tc.want {
				if got[addr(i)] != w {
					t.Errorf("target %d: %d picks, want %d (all: %v)", i, got[addr(i)], w, got)
				}
			}
		})
	}
}

func TestRoundRobinIsSmooth(t *testing.T) {
	r := newReg(t)
	g := build(t, r, conf(noHC("g", "", 5, 1, 1))).Group("g")
	// nginx's smooth weighted round robin: 5,1,1 interleaves as a a b a c a a.
	want := []int{0, 0, 1, 0, 2, 0, 0}
	seq := g.current().seq
	if len(seq) != len(want) {
		t.Fatalf("sequence length %d, want %d", len(seq), len(want))
	}
	for i, w := range want {
		if seq[i].Addr() != addr(w) {
			t.Fatalf("sequence[%d] = %s, want %s", i, seq[i].Addr(), addr(w))
		}
	}
}

func TestWeightedRandom(t *testing.T) {
	r := newReg(t)
	g := build(t, r, conf(noHC("g", "weighted_random", 3, 1, 0))).Group("g")
	const n = 40000
	got := countPicks(g, n, nil)
	if got[addr(2)] != 0 {
		t.Errorf("weight 0 picked %d times", got[addr(2)])
	}
	share := float64(got[addr(0)]) / n
	if math.Abs(share-0.75) > 0.02 {
		t.Errorf("weight-3 share %.3f, want 0.75±0.02 (%v)", share, got)
	}
}

// TestLeastOutstanding: least_outstanding_requests balances on in-flight requests,
// least_connections on open connections (of an http group; a layer-4 stream is both).
func TestLeastOutstanding(t *testing.T) {
	for _, alg := range []string{"least_outstanding_requests", "least_connections"} {
		t.Run(alg, func(t *testing.T) {
			r := newReg(t)
			g := build(t, r, conf(noHC("g", alg, 1, 1, 1))).Group("g")
			// The counter alg balances on moves with Acquire/Release here; the other one is
			// loaded the opposite way and must not matter.
			load := func(t *Target, n int64) {
				if alg == "least_connections" {
					t.conns.Add(n)
					t.inflight.Add(-n)
				}
			}
			// Idle: ties rotate, so picks spread evenly.
			got := countPicks(g, 300, nil)
			for i := range 3 {
				if got[addr(i)] != 100 {
					t.Errorf("idle spread: %v", got)
				}
			}
			// Load target 0 and 1; every pick goes to 2 until loads even out.
			ts := g.Targets()
			for range 3 {
				ts[0].Acquire()
				load(ts[0], 1)
				ts[1].Acquire()
				load(ts[1], 1)
			}
			for i := range 3 {
				p := g.Pick(netip.Addr{}, nil)
				if p != ts[2] {
					t.Fatalf("pick %d went to %s with loads %d/%d/%d", i, p.Addr(), ts[0].InFlight(), ts[1].InFlight(), ts[2].InFlight())
				}
				p.Acquire()
				load(p, 1)
			}
			// Exclude honoured even when it is the least loaded.
			ts[2].Release()
			load(ts[2], -1)
			ts[2].Release()
			load(ts[2], -1)
			if p := g.Pick(netip.Addr{}, ts[2]); p == ts[2] {
				t.Error("picked the excluded target")
			}
		})
	}
}

func TestLeastOutstandingWeighted(t *testing.T) {
	r := newReg(t)
	g := build(t, r, conf(noHC("g", "least_outstanding_requests", 3, 1))).Group("g")
	// Acquire as we go: weight 3 should carry 3x the in-flight load.
	for range 40 {
		g.Pick(netip.Addr{}, nil).Acquire()
	}
	ts := g.Targets()
	if a, b := ts[0].InFlight(), ts[1].InFlight(); a != 30 || b != 10 {
		t.Errorf("in-flight %d/%d, want 30/10", a, b)
	}
}

func clientIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
}

func TestSourceIPHash(t *testing.T) {
	r := newReg(t)
	g := build(t, r, conf(noHC("g", "source_ip_hash", 1, 1, 1, 1))).Group("g")
	const n = 8000
	first := make([]*Target, n)
	counts := map[*Target]int{}
	for i := range n {
		first[i] = g.Pick(clientIP(i), nil)
		counts[first[i]]++
		if again := g.Pick(clientIP(i), nil); again != first[i] {
			t.Fatalf("client %d moved from %s to %s", i, first[i].Addr(), again.Addr())
		}
		if ex := g.Pick(clientIP(i), first[i]); ex == first[i] || ex == nil {
			t.Fatalf("exclude: got %v", ex)
		}
	}
	for tg, c := range counts {
		if c < n/4-n/16 || c > n/4+n/16 {
			t.Errorf("%s got %d of %d clients", tg.Addr(), c, n)
		}
	}
	// Take target 0 out: only its clients move.
	victim := g.Targets()[0]
	victim.activeUp.Store(false)
	r.bump()
	moved := 0
	for i := range n {
		now := g.Pick(clientIP(i), nil)
		if now == victim {
			t.Fatal("picked the unhealthy target")
		}
		if now != first[i] {
			moved++
			if first[i] != victim {
				t.Fatalf("client %d of a healthy target moved", i)
			}
		}
	}
	if moved != counts[victim] {
		t.Errorf("moved %d clients, want %d", moved, counts[victim])
	}
}

func TestSourceIPHashWeighted(t *testing.T) {
	r := newReg(t)
	g := build(t, r, conf(noHC("g", "source_ip_hash", 3, 1))).Group("g")
	const n = 20000
	got := countPicks(g, n, clientIP)
	if share := float64(got[addr(0)]) / n; math.Abs(share-0.75) > 0.03 {
		t.Errorf("weight-3 share %.3f, want 0.75 (%v)", share, got)
	}
}

func TestSourceIPStickiness(t *testing.T) {
	r := newReg(t)
	gc := noHC("g", "round_robin", 1, 1, 1)
	gc.Stickiness = stickinessOf("source_ip")
	g := build(t, r, conf(gc)).Group("g")
	for i := range 100 {
		a, b := g.Pick(clientIP(i), nil), g.Pick(clientIP(i), nil)
		if a != b {
			t.Fatalf("client %d not sticky: %s then %s", i, a.Addr(), b.Addr())
		}
	}
}

func TestPickExcludeAndEmpty(t *testing.T) {
	for _, alg := range []string{"round_robin", "least_outstanding_requests", "least_connections", "weighted_random", "source_ip_hash"} {
		t.Run(alg, func(t *testing.T) {
			r := newReg(t)
			g := build(t, r, conf(noHC("g", alg, 1, 1))).Group("g")
			ts := g.Targets()
			for i := range 50 {
				if p := g.Pick(clientIP(i), ts[0]); p != ts[1] {
					t.Fatalf("exclude %s: got %v", ts[0].Addr(), p)
				}
			}
			ts[1].activeUp.Store(false)
			r.bump()
			if p := g.Pick(clientIP(1), ts[0]); p != nil {
				t.Errorf("only the excluded target is healthy: got %s, want nil", p.Addr())
			}
			ts[0].activeUp.Store(false)
			r.bump()
			if p := g.Pick(clientIP(1), nil); p != nil {
				t.Errorf("no healthy target: got %s, want nil", p.Addr())
			}
		})
	}
}

func TestSlowStart(t *testing.T) {
	r := newReg(t)
	clk := &fakeClock{}
	withClock(r, clk)
	a := noHC("g", "round_robin", 1)
	old := build(t, r, conf(a))
	clk.advance(time.Minute) // target 0 is long established
	b := noHC("g", "round_robin", 1, 1)
	b.SlowStart = "10s"
	s := build(t, r, conf(b))
	old.Release()
	g := s.Group("g")
	share := func() float64 {
		got := countPicks(g, 2000, nil)
		return float64(got[addr(1)]) / 2000
	}
	// New target: ~0 at first, then weight w*frac against the full weight of the old one.
	for _, step := range []struct {
		at   time.Duration
		want float64
	}{{0, 0}, {1 * time.Second, 0.1 / 1.1}, {5 * time.Second, 0.5 / 1.5}, {10 * time.Second, 0.5}, {20 * time.Second, 0.5}} {
		clk.ns.Store(int64(time.Hour+time.Minute) + int64(step.at))
		if got := share(); math.Abs(got-step.want) > 0.02 {
			t.Errorf("at %v: new target share %.3f, want %.3f", step.at, got, step.want)
		}
	}
}

func TestPassiveEjection(t *testing.T) {
	r := newReg(t, withPassiveHealth(3, 100*time.Millisecond))
	clk := &fakeClock{}
	withClock(r, clk)
	g := build(t, r, conf(noHC("g", "round_robin", 1, 1))).Group("g")
	bad, good := g.Targets()[0], g.Targets()[1]
	bad.ReportFailure()
	bad.ReportFailure()
	bad.ReportSuccess() // resets the run
	bad.ReportFailure()
	bad.ReportFailure()
	if !bad.Healthy() {
		t.Fatal("ejected before 3 consecutive failures")
	}
	bad.ReportFailure()
	if bad.Healthy() || !bad.Status().Ejected {
		t.Fatal("not ejected after 3 consecutive failures")
	}
	for range 10 {
		if p := g.Pick(netip.Addr{}, nil); p != good {
			t.Fatalf("picked %s while ejected", p.Addr())
		}
	}
	clk.advance(100 * time.Millisecond)
	if !bad.Healthy() {
		t.Fatal("still ejected after the cool-down")
	}
	if got := countPicks(g, 10, nil); got[bad.Addr()] != 5 {
		t.Errorf("after cool-down: %v", got)
	}
	// A second ejection without a success in between lasts twice as long.
	for range 3 {
		bad.ReportFailure()
	}
	clk.advance(150 * time.Millisecond)
	if bad.Healthy() {
		t.Error("second ejection did not double the cool-down")
	}
	clk.advance(50 * time.Millisecond)
	if !bad.Healthy() {
		t.Error("second ejection lasted more than 200ms")
	}
	// When every target is ejected, route anyway (active checks decide "down").
	for range 3 {
		bad.ReportFailure()
		good.ReportFailure()
	}
	if p := g.Pick(netip.Addr{}, nil); p == nil {
		t.Error("all targets ejected: Pick returned nil; want fail-open to the actively healthy")
	}
}

// TestBuildErrorLeaksNothing: a Build that fails on one group (what only building finds: a
// missing ca_file) releases the targets of the groups built before it.
func TestBuildErrorLeaksNothing(t *testing.T) {
	r := newReg(t)
	bad := httpsGroup("127.0.0.1:1", &configs.BackendTLS{CAFile: "/nonexistent/ca.pem"}, false)
	if _, err := r.Build(conf(noHC("g", "", 1), bad), nil); err == nil {
		t.Fatal("a group with a missing ca_file was built")
	}
	if n := len(r.Targets()); n != 0 {
		t.Errorf("failed Build leaked %d targets", n)
	}
}
