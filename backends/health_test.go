package backends

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// toggleServer answers the health path with 200 or 503 as told.
func toggleServer(t *testing.T) (*httptest.Server, *atomic.Bool) {
	var down atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" && down.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	}))
	t.Cleanup(srv.Close)
	return srv, &down
}

func fastHC(proto string) *configs.HealthCheck {
	h := &configs.HealthCheck{Protocol: proto, Interval: "100ms", Timeout: "90ms", HealthyThreshold: 2, UnhealthyThreshold: 2}
	if proto == "" || proto == "http" || proto == "https" {
		h.Path, h.Matcher = "/healthz", "200-299"
	}
	return h
}

func TestActiveHTTPHealth(t *testing.T) {
	r := newReg(t)
	srv, down := toggleServer(t)
	other, _ := toggleServer(t)
	gc := configs.TargetGroup{Name: "web", Protocol: "http", HealthCheck: fastHC(""),
		Targets: []configs.Target{{Address: srv.Listener.Addr().String(), Weight: 1},
			{Address: other.Listener.Addr().String(), Weight: 1}}}
	g := build(t, r, conf(gc)).Group("web")
	tg := g.Targets()[0]
	if !tg.Healthy() {
		t.Fatal("a new target starts healthy")
	}
	down.Store(true)
	// interval*unhealthy_threshold = 40ms; allow generous slack under -race.
	configtest.WaitFor(t, 2*time.Second, "target marked unhealthy", func() bool { return !tg.Healthy() })
	if st := tg.Status(); st.Reason == "" || st.Healthy {
		t.Errorf("status after failure: %+v", st)
	}
	for range 10 {
		if p := g.Pick(netip.Addr{}, nil); p == tg {
			t.Fatal("picked an unhealthy target")
		}
	}
	down.Store(false)
	configtest.WaitFor(t, 2*time.Second, "target healthy again", tg.Healthy)
	configtest.WaitFor(t, time.Second, "target picked again", func() bool { return g.Pick(netip.Addr{}, nil) == tg })
}

func TestActiveTCPHealthServerClosed(t *testing.T) {
	r := newReg(t)
	// A port below the ephemeral range: once closed, nothing but an explicit bind can take it,
	// so listening on it again must work and the test fails if it does not.
	address := configtest.Addr(t)
	ln, err := net.Listen("tcp", address)
	if err != nil {
		t.Fatal(err)
	}
	go acceptAndClose(ln)
	gc := configs.TargetGroup{Name: "db", Protocol: "tcp", HealthCheck: fastHC("tcp"),
		Targets: []configs.Target{{Address: address, Weight: 1}}}
	g := build(t, r, conf(gc)).Group("db")
	tg := g.Targets()[0]
	start := time.Now()
	ln.Close()
	configtest.WaitFor(t, 2*time.Second, "closed server marked down", func() bool { return !tg.Healthy() })
	t.Logf("closed server detected after %v (interval 20ms x 2)", time.Since(start).Round(time.Millisecond))
	if g.Pick(netip.Addr{}, nil) != nil {
		t.Error("Pick returned a target with every target down")
	}
	ln2, err := net.Listen("tcp", address)
	if err != nil {
		t.Fatalf("listen again on %s: %v", address, err)
	}
	defer ln2.Close()
	go acceptAndClose(ln2)
	configtest.WaitFor(t, 2*time.Second, "restarted server marked up", tg.Healthy)
}

func acceptAndClose(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}

func TestReloadKeepsHealthAndDrains(t *testing.T) {
	r := newReg(t)
	srv, down := toggleServer(t)
	other, _ := toggleServer(t)
	a, b := srv.Listener.Addr().String(), other.Listener.Addr().String()
	mk := func(dereg string, addrs ...string) *configs.Config {
		gc := configs.TargetGroup{Name: "web", Protocol: "http", HealthCheck: fastHC(""), DeregistrationDelay: dereg}
		for _, x := range addrs {
			gc.Targets = append(gc.Targets, configs.Target{Address: x, Weight: 1})
		}
		return conf(gc)
	}
	s1 := build(t, r, mk("0s", a))
	t1 := s1.Group("web").Targets()[0]
	down.Store(true)
	configtest.WaitFor(t, 2*time.Second, "unhealthy", func() bool { return !t1.Healthy() })
	t1.Acquire() // a request in flight across the reload

	s2 := build(t, r, mk("100ms", a, b))
	s1.Release()
	t2 := s2.Group("web").Targets()[0]
	if t2 != t1 {
		t.Fatal("reload created a new target for an unchanged address")
	}
	if t2.Healthy() || t2.InFlight() != 1 {
		t.Errorf("reload lost state: healthy=%v inflight=%d", t2.Healthy(), t2.InFlight())
	}
	if s1.Group("web").Transport() != s2.Group("web").Transport() {
		t.Error("unchanged group did not reuse its transport")
	}
	// Remove a; it drains for deregistration_delay, then is forgotten.
	s3 := build(t, r, mk("100ms", b))
	s2.Release()
	st := findStatus(r, a)
	if st == nil || !st.Draining || st.InFlight != 1 {
		t.Fatalf("removed target status: %+v", st)
	}
	t1.Release()
	configtest.WaitFor(t, 2*time.Second, "drained target forgotten", func() bool { return findStatus(r, a) == nil })
	if st := findStatus(r, b); st == nil || st.Draining || len(st.Groups) != 1 {
		t.Errorf("kept target: %+v", st)
	}
	s3.Release()
}

func findStatus(r *Registry, address string) *TargetStatus {
	for _, st := range r.Targets() {
		if st.Address == address {
			return &st
		}
	}
	return nil
}

func TestCloseStopsCheckers(t *testing.T) {
	before := runtime.NumGoroutine()
	r := NewRegistry(nil)
	srv, _ := toggleServer(t)
	gc := configs.TargetGroup{Name: "web", Protocol: "http", HealthCheck: fastHC(""),
		Targets: []configs.Target{{Address: srv.Listener.Addr().String(), Weight: 1}}}
	s := build(t, r, conf(gc))
	r.Close()
	s.Release()
	srv.CloseClientConnections()
	configtest.WaitFor(t, 2*time.Second, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= before+2 })
}

func TestReleaseStopsChecker(t *testing.T) {
	r := newReg(t)
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { hits.Add(1) }))
	defer srv.Close()
	gc := configs.TargetGroup{Name: "web", Protocol: "http", HealthCheck: fastHC(""), DeregistrationDelay: "0s",
		Targets: []configs.Target{{Address: srv.Listener.Addr().String(), Weight: 1}}}
	s := build(t, r, conf(gc))
	configtest.WaitFor(t, 2*time.Second, "first check", func() bool { return hits.Load() > 0 })
	s.Release()
	if len(r.Targets()) != 0 {
		t.Fatal("target kept after release with no delay")
	}
	n := hits.Load()
	time.Sleep(100 * time.Millisecond) // five intervals: no check may happen
	if hits.Load() != n {
		t.Errorf("checks continued after release: %d -> %d", n, hits.Load())
	}
}
