package backends

import (
	"sync"
	"sync/atomic"
	"testing"
)

// TestReloadUnderPicks rebuilds and releases generations while pickers run (run with -race):
// every pick finds a target, and in-flight counts return to zero.
func TestReloadUnderPicks(t *testing.T) {
	r := newReg(t, withPassiveHealth(3, 1))
	var cur atomic.Pointer[Set]
	cur.Store(build(t, r, conf(noHC("g", "least_outstanding_requests", 1, 1, 1))))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var nils atomic.Int64
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				g := cur.Load().Group("g")
				tg := g.Pick(clientIP(i), nil)
				if tg == nil {
					nils.Add(1)
					continue
				}
				tg.Acquire()
				if (i+w)%7 == 0 {
					tg.ReportFailure()
				} else {
					tg.ReportSuccess()
				}
				tg.Release()
			}
		}()
	}
	algs := []string{"round_robin", "weighted_random", "source_ip_hash", "least_connections"}
	for i := range 200 {
		next := build(t, r, conf(noHC("g", algs[i%len(algs)], 1, 1+i%3, 1)))
		old := cur.Swap(next)
		old.Release()
	}
	close(stop)
	wg.Wait()
	if nils.Load() != 0 {
		t.Errorf("%d picks found no target", nils.Load())
	}
	for _, st := range r.Targets() {
		if st.InFlight != 0 {
			t.Errorf("%s: in-flight %d after all released", st.Address, st.InFlight)
		}
	}
	cur.Load().Release()
	if n := len(r.Targets()); n != 0 {
		t.Errorf("%d targets left after releasing every generation", n)
	}
}
