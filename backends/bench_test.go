package backends

import (
	"net/netip"
	"sync/atomic"
	"testing"
)

func BenchmarkPick(b *testing.B) {
	for _, alg := range []string{"round_robin", "least_outstanding_requests", "least_connections", "weighted_random", "source_ip_hash"} {
		for _, weighted := range []bool{false, true} {
			name := alg
			ws := []int{1, 1, 1, 1, 1, 1, 1, 1}
			if weighted {
				name += "/weighted"
				ws = []int{1, 2, 3, 4, 5, 6, 7, 8}
			}
			b.Run(name, func(b *testing.B) {
				r := NewRegistry(nil)
				defer r.Close()
				s, err := r.Build(conf(noHC("g", alg, ws...)), nil)
				if err != nil {
					b.Fatal(err)
				}
				g := s.Group("g")
				var n atomic.Uint32
				b.ReportAllocs()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					ip := clientIP(int(n.Add(1)))
					for pb.Next() {
						t := g.Pick(ip, nil)
						t.Acquire()
						t.Release()
					}
				})
			})
		}
	}
}

func TestPickDoesNotAllocate(t *testing.T) {
	for _, alg := range []string{"round_robin", "least_outstanding_requests", "least_connections", "weighted_random", "source_ip_hash"} {
		r := newReg(t)
		gc := noHC("g", alg, 1, 2, 3)
		gc.SlowStart = "1h" // ramping: the snapshot is rebuilt periodically, but not per pick
		g := build(t, r, conf(gc)).Group("g")
		ip := netip.MustParseAddr("192.0.2.1")
		if n := testing.AllocsPerRun(1000, func() { g.Pick(ip, g.Targets()[0]) }); n != 0 {
			t.Errorf("%s: Pick allocates %v per call", alg, n)
		}
	}
}
