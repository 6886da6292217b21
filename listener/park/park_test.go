package park

import (
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// handler records which of Wake and Expire was called.
type handler struct {
	woke, expired chan struct{}
}

func newHandler() *handler {
	return &handler{woke: make(chan struct{}, 1), expired: make(chan struct{}, 1)}
}

func (h *handler) Wake()   { h.woke <- struct{}{} }
func (h *handler) Expire() { h.expired <- struct{}{} }

// pair is a connected loopback TCP pair: the server side (to park) and the client side.
func pair(t *testing.T) (srv, cli *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return s.(*net.TCPConn), c.(*net.TCPConn)
}

func rawOf(t *testing.T, c *net.TCPConn) syscall.RawConn {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

func newPoller(t *testing.T) *Poller {
	t.Helper()
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return p
}

// wait for one of the handler's signals, bounded.
func await(t *testing.T, ch chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not called within 10s", what)
	}
}

func quiet(t *testing.T, h *handler) {
	t.Helper()
	select {
	case <-h.woke:
		t.Fatal("woken unexpectedly")
	case <-h.expired:
		t.Fatal("expired unexpectedly")
	default:
	}
}

func TestWakeOnData(t *testing.T) {
	p := newPoller(t)
	s, c := pair(t)
	h := newHandler()
	if _, err := p.Park(rawOf(t, s), time.Time{}, h); err != nil {
		t.Fatal(err)
	}
	quiet(t, h)
	if p.Len() != 1 {
		t.Fatalf("Len = %d, want 1", p.Len())
	}
	c.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	await(t, h.woke, "Wake after data")
	if p.Len() != 0 {
		t.Fatalf("Len = %d after wake, want 0", p.Len())
	}
	// The bytes are still there for the owner, and the descriptor can park again.
	buf := make([]byte, 64)
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := s.Read(buf); err != nil || n == 0 {
		t.Fatalf("read after wake: %d %v", n, err)
	}
	h2 := newHandler()
	if _, err := p.Park(rawOf(t, s), time.Time{}, h2); err != nil {
		t.Fatalf("park again: %v", err)
	}
	c.Write([]byte("x"))
	await(t, h2.woke, "second Wake")
}

func TestWakeOnDataAlreadyQueued(t *testing.T) {
	p := newPoller(t)
	s, c := pair(t)
	c.Write([]byte("early"))
	// Give the bytes time to be queued; then parking must still report them.
	buf := make([]byte, 1)
	rc := rawOf(t, s)
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	rc.Read(func(fd uintptr) bool {
		_, _, e := syscall.Recvfrom(int(fd), buf, syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return e != syscall.EAGAIN
	})
	h := newHandler()
	if _, err := p.Park(rc, time.Time{}, h); err != nil {
		t.Fatal(err)
	}
	await(t, h.woke, "Wake for bytes queued before parking")
}

func TestWakeOnEOF(t *testing.T) {
	p := newPoller(t)
	s, c := pair(t)
	h := newHandler()
	if _, err := p.Park(rawOf(t, s), time.Time{}, h); err != nil {
		t.Fatal(err)
	}
	c.Close()
	await(t, h.woke, "Wake after the peer closed")
}

func TestExpireAtDeadline(t *testing.T) {
	p := newPoller(t)
	s, _ := pair(t)
	s2, _ := pair(t)
	h, h2 := newHandler(), newHandler()
	if _, err := p.Park(rawOf(t, s2), time.Now().Add(time.Hour), h2); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Park(rawOf(t, s), time.Now().Add(30*time.Millisecond), h); err != nil {
		t.Fatal(err)
	}
	await(t, h.expired, "Expire at the deadline")
	quiet(t, h2)
	if p.Len() != 1 {
		t.Fatalf("Len = %d, want the one with the later deadline", p.Len())
	}
}

func TestUnpark(t *testing.T) {
	p := newPoller(t)
	s, c := pair(t)
	h := newHandler()
	tk, err := p.Park(rawOf(t, s), time.Now().Add(50*time.Millisecond), h)
	if err != nil {
		t.Fatal(err)
	}
	if !p.Unpark(tk) {
		t.Fatal("Unpark of a parked connection = false")
	}
	if p.Unpark(tk) {
		t.Fatal("second Unpark = true")
	}
	c.Write([]byte("x"))
	// Neither callback may come: wait past the deadline and a sweep, bounded.
	time.Sleep(200 * time.Millisecond)
	quiet(t, h)
}

func TestExpireAllAndStop(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	var hs []*handler
	for range 3 {
		s, _ := pair(t)
		h := newHandler()
		if _, err := p.Park(rawOf(t, s), time.Time{}, h); err != nil {
			t.Fatal(err)
		}
		hs = append(hs, h)
	}
	if n := p.ExpireAll(); n != 3 {
		t.Fatalf("ExpireAll = %d, want 3", n)
	}
	for _, h := range hs {
		await(t, h.expired, "Expire by ExpireAll")
	}
	s, _ := pair(t)
	h := newHandler()
	if _, err := p.Park(rawOf(t, s), time.Time{}, h); err != nil {
		t.Fatal(err)
	}
	p.Stop()
	await(t, h.expired, "Expire by Stop")
	if _, err := p.Park(rawOf(t, s), time.Time{}, newHandler()); err != ErrStopped {
		t.Fatalf("Park after Stop: %v, want ErrStopped", err)
	}
	p.Stop() // idempotent
}

// ExpireExcept expires all but the kept connections at once; a kept one with no deadline, or a
// later one, expires at the given time instead, and one that is kept still wakes on bytes.
func TestExpireExcept(t *testing.T) {
	p := newPoller(t)
	gone, graced, woken := newHandler(), newHandler(), newHandler()
	s1, _ := pair(t)
	s2, _ := pair(t)
	s3, c3 := pair(t)
	for _, x := range []struct {
		s *net.TCPConn
		h *handler
	}{{s1, gone}, {s2, graced}, {s3, woken}} {
		if _, err := p.Park(rawOf(t, x.s), time.Time{}, x.h); err != nil {
			t.Fatal(err)
		}
	}
	n := p.ExpireExcept(func(h Handler) bool { return h != Handler(gone) }, time.Now().Add(100*time.Millisecond))
	if n != 1 {
		t.Fatalf("ExpireExcept = %d, want 1", n)
	}
	await(t, gone.expired, "Expire by ExpireExcept")
	quiet(t, graced)
	c3.Write([]byte("x"))
	await(t, woken.woke, "Wake of a kept connection")
	await(t, graced.expired, "Expire of a kept connection at its new deadline")
}

// Parking many connections holds no goroutine per connection, and Stop leaves none behind.
func TestNoGoroutinePerConnection(t *testing.T) {
	before := runtime.NumGoroutine()
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	const n = 200
	var hs []*handler
	var clients []*net.TCPConn
	for range n {
		s, c := pair(t)
		h := newHandler()
		if _, err := p.Park(rawOf(t, s), time.Time{}, h); err != nil {
			t.Fatal(err)
		}
		hs = append(hs, h)
		clients = append(clients, c)
	}
	if g := runtime.NumGoroutine(); g > before+5 {
		t.Fatalf("%d goroutines with %d parked connections (was %d)", g, n, before)
	}
	for _, c := range clients[:n/2] {
		c.Write([]byte("x"))
	}
	for _, h := range hs[:n/2] {
		await(t, h.woke, "Wake")
	}
	p.Stop()
	for _, h := range hs[n/2:] {
		await(t, h.expired, "Expire by Stop")
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > before {
		t.Fatalf("%d goroutines after Stop, want at most %d", g, before)
	}
}
