package listener

import (
	"context"
	"crypto/tls"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/door"
	"github.com/fulcrum-lb/fulcrum/listener/park"
)

var discardLog = log.New(discardWriter{}, "", 0)

type discardWriter struct{}

func (discardWriter) Write(p []byte) (int, error) { return len(p), nil }

// httpServer is the HTTP kind of listener (http, https): HTTP/1 connections are served by the
// engine in h1serve.go, HTTP/2 ones (ALPN "h2") by the h2 engine, each on the connection's own
// goroutine. Reloads swap the request state (httpState) atomically: every request loads the
// current one. When the HTTP/2 settings change, a new h2 engine takes new connections while the
// old one drains.
type httpServer struct {
	addr   net.Addr
	log    *slog.Logger
	budget time.Duration // how long a retired h2 engine may drain

	name  atomic.Pointer[string]
	state atomic.Pointer[httpState]
	key   atomic.Pointer[string] // the server-level settings of the current h2 engine
	h2    atomic.Pointer[h2Gen]  // HTTP/2 engine for ALPN "h2" connections; nil when http2 is off

	// HTTP/1 sessions, for Drain and Close.
	sessMu   sync.Mutex
	sessions map[*h1Session]struct{}
	draining atomic.Bool  // set under sessMu; read per request without it
	drainBy  atomic.Int64 // unix ns: until when a connection drained before its first request may send it

	// Idle HTTP/1 connections parked without a goroutine (h1serve.go), started on first use.
	parking park.Lazy

	ctx    context.Context // canceled by Close: retired engines stop draining
	cancel context.CancelFunc
	wg     sync.WaitGroup // retired engines' drains
}

func newHTTPServer(addr string, budget time.Duration, log *slog.Logger) *httpServer {
	ctx, cancel := context.WithCancel(context.Background())
	return &httpServer{addr: configAddr(addr), log: log, budget: budget, ctx: ctx, cancel: cancel}
}

// configAddr is a listener's configured address as a net.Addr.
type configAddr string

func (configAddr) Network() string  { return "tcp" }
func (a configAddr) String() string { return string(a) }

// Commit implements door.Server.
func (s *httpServer) Commit(g *door.Generation) {
	st := g.State.(*httpState)
	s.name.Store(&g.Name)
	s.state.Store(st)
	key := serverKey(st)
	if cur := s.key.Load(); cur == nil || *cur != key {
		s.key.Store(&key)
		s.installH2(st)
	}
}

func serverKey(st *httpState) string {
	c := st.cfg
	return fmt.Sprintf("%s|%v|%v|%d|%v|%s", c.Protocol, c.IdleTimeoutDuration(), c.HeaderTimeoutDuration(),
		c.MaxHeaderBytes, c.HTTP2Enabled(), c.Style)
}

func (s *httpServer) installH2(st *httpState) {
	var newH2 *h2Gen
	if st.cfg.HTTP2Enabled() {
		newH2 = newH2Gen(st.cfg, newH2Handler(s))
	}
	if oldH2 := s.h2.Swap(newH2); oldH2 != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			retireH2(s.ctx, oldH2, s.budget)
		}()
	}
}

func (s *httpServer) serveHTTP(w http.ResponseWriter, r *http.Request) {
	s.state.Load().ServeHTTP(w, r)
}

// ServeConn implements door.Server: on the connection's goroutine, HTTP/2 connections are
// served by the h2 engine, HTTP/1 ones by the HTTP/1 engine.
func (s *httpServer) ServeConn(c net.Conn, g *door.Generation, done func()) {
	if tc, ok := c.(*tls.Conn); ok && tc.ConnectionState().NegotiatedProtocol == "h2" {
		defer done()
		if gen := s.h2.Load(); gen != nil {
			serveH2(s.ctx, gen, c) // closes c
		} else {
			c.Close()
		}
		return
	}
	s.serveH1(c, done)
}

// track registers a new HTTP/1 session; false once Close began. While draining, sessions
// are still taken: a connection accepted before the drain gets its first request served
// (within drainFirstGrace), and one woken by its next request serves it; both then close.
func (s *httpServer) track(h *h1Session) bool {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if s.ctx.Err() != nil {
		return false
	}
	if s.sessions == nil {
		s.sessions = map[*h1Session]struct{}{}
	}
	s.sessions[h] = struct{}{}
	return true
}

func (s *httpServer) untrack(h *h1Session) {
	s.sessMu.Lock()
	delete(s.sessions, h)
	s.sessMu.Unlock()
}

// drainFirstGrace is how long a drain lets a connection accepted before it send its first
// request. A client sends it right after connecting, so it is usually on its way; closing such
// a connection would make the client see an EOF it cannot tell from a failure (during a binary
// upgrade, say), where nginx serves that request. Bounded, so a silent connection holds the
// drain no longer than this.
const drainFirstGrace = time.Second

// closeSessions closes the idle HTTP/1 sessions (all of them when force) and the parked
// connections, and reports how many are left. A busy session finishes its request and then
// closes (draining is set); one still waiting for its first request has drainFirstGrace.
func (s *httpServer) closeSessions(force bool) int {
	s.sessMu.Lock()
	if !s.draining.Load() {
		s.drainBy.Store(time.Now().Add(drainFirstGrace).UnixNano()) // before draining: readers see both
	}
	s.draining.Store(true)
	for h := range s.sessions {
		if h.state.CompareAndSwap(sessIdle, sessClosed) {
			h.c.SetReadDeadline(time.Now()) // wakes its wait; it sees it was closed
		} else if force {
			h.abort()
		} else if h.state.Load() == sessFresh {
			// Its wait may run to the header timeout: bring it to the grace. Should its first
			// request begin meanwhile, the head read gets this deadline too, still a bound.
			h.c.SetReadDeadline(s.firstBy())
		}
	}
	n := len(s.sessions)
	s.sessMu.Unlock()
	// Parked after draining was set, a connection unparks itself (park); parked before, it is
	// here. One being woken right now is tracked again, or refused by track, shortly.
	if p := s.poller(false); p != nil {
		if force {
			p.ExpireAll()
		} else {
			p.ExpireExcept(func(h park.Handler) bool {
				ph, ok := h.(*parkedH1)
				return ok && ph.first
			}, s.firstBy())
		}
		n += p.Len()
	}
	return n
}

// firstBy is when a drained connection's wait for its first request ends; zero when not
// draining.
func (s *httpServer) firstBy() time.Time {
	if !s.draining.Load() {
		return time.Time{}
	}
	return time.Unix(0, s.drainBy.Load())
}

// poller is the server's parking poller, started when start is set and none runs yet; nil
// when parking is unavailable.
func (s *httpServer) poller(start bool) *park.Poller {
	p, err := s.parking.Get(s.ctx, start)
	if err != nil {
		s.log.Warn("idle connections keep their goroutines: parking unavailable", "err", err)
	}
	return p
}

// parkedH1 is an idle HTTP/1 connection while parked: all it keeps of its session.
type parkedH1 struct {
	srv    *httpServer
	c      net.Conn
	done   func()
	client netip.AddrPort
	first  bool
}

var parkedPool = sync.Pool{New: func() any { return new(parkedH1) }}

// Wake serves the connection again on the goroutine the poller started.
func (p *parkedH1) Wake() {
	srv, c, done, client, first := p.srv, p.c, p.done, p.client, p.first
	*p = parkedH1{}
	parkedPool.Put(p)
	srv.runH1(c, done, client, first, true)
}

// Expire closes the connection: idle timeout, drain or shutdown.
func (p *parkedH1) Expire() {
	c, done := p.c, p.done
	*p = parkedH1{}
	parkedPool.Put(p)
	c.Close()
	done()
}

// park hands the idle session's connection to the poller until its next request or until
// (zero: no deadline); false when it cannot park (the session keeps the connection). The
// session must hold no buffered bytes: for TLS, the last Read timed out with nothing, so the
// rest of any record tls.Conn holds must still arrive on the socket.
func (srv *httpServer) park(s *h1Session, done func(), first bool, until time.Time) bool {
	raw := s.raw
	if s.tls != nil {
		tc, ok := s.tls.NetConn().(*net.TCPConn)
		if !ok {
			return false // below TLS a PROXY wrapper may buffer bytes the socket no longer shows
		}
		raw, _ = tc.SyscallConn()
	}
	if raw == nil || srv.isDraining() {
		return false
	}
	p := srv.poller(true)
	if p == nil {
		return false
	}
	pc := parkedPool.Get().(*parkedH1)
	*pc = parkedH1{srv: srv, c: s.c, done: done, client: s.client, first: first}
	// Untracked first: once parked, the connection may wake on another goroutine at once,
	// and a forced close must not find it through this session any more.
	srv.untrack(s)
	t, err := p.Park(raw, until, pc)
	if err != nil {
		*pc = parkedH1{}
		parkedPool.Put(pc)
		if !srv.track(s) {
			s.state.Store(sessClosed) // draining: the caller closes instead of waiting
		}
		return false
	}
	if srv.isDraining() && p.Unpark(t) {
		// Drain began meanwhile and may have looked at the parked set before this one joined.
		if first {
			// Its grace for a first request is waited out on the session's goroutine.
			*pc = parkedH1{}
			parkedPool.Put(pc)
			if !srv.track(s) {
				s.state.Store(sessClosed) // Close began: the caller closes instead of waiting
			}
			return false
		}
		pc.Expire()
	}
	return true
}

func (s *httpServer) isDraining() bool { return s.draining.Load() }

// Refused implements door.Server: HTTP listeners log requests, not refused connections.
func (s *httpServer) Refused(*door.Generation, string, error, net.Conn, time.Time) {}

// Drain implements door.Server: keep-alive connections close after their request, idle ones
// at once; HTTP/2 connections get GOAWAY naming their last stream and close once it is done.
func (s *httpServer) Drain(ctx context.Context) error {
	h2done := make(chan struct{})
	go func() {
		defer close(h2done)
		if g := s.h2.Load(); g != nil {
			g.srv.Shutdown(ctx)
		}
	}()
	defer func() { <-h2done }()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for s.closeSessions(false) > 0 {
		select {
		case <-ctx.Done():
			s.closeSessions(true)
			return ctx.Err()
		case <-tick.C:
		}
	}
	return nil
}

// Close implements door.Server.
func (s *httpServer) Close() {
	s.cancel()
	s.closeSessions(true)
	if p := s.poller(false); p != nil {
		p.Stop() // expires what is parked; s.ctx is done, so no poller starts again
	}
	if g := s.h2.Load(); g != nil {
		g.srv.Close()
	}
	s.wg.Wait()
}
