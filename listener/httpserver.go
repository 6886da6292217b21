package listener

import (
	"context"
	"crypto/tls"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/door"
)

var discardLog = log.New(discardWriter{}, "", 0)

type discardWriter struct{}

func (discardWriter) Write(p []byte) (int, error) { return len(p), nil }

// httpServer is the HTTP kind of listener (http, https): it serves the connections its
// door.Listener prepared with net/http's server. Reloads swap the request state (httpState)
// atomically, and when a server-level setting changes (timeouts, header limit, HTTP/2) a new
// http.Server takes over while the old one drains. ServeConn hands each connection to whichever
// server is current, so no connection is ever refused during a reload.
type httpServer struct {
	addr   net.Addr
	log    *slog.Logger
	budget time.Duration // how long a retired http.Server may drain

	name   atomic.Pointer[string]
	state  atomic.Pointer[httpState]
	server atomic.Pointer[serverGen]
	h2     atomic.Pointer[h2Gen] // HTTP/2 engine for ALPN "h2" connections; nil when http2 is off
	// done maps each connection handed to net/http to its door.Listener's done; net/http's
	// ConnState reports the end of the connection.
	done sync.Map

	ctx    context.Context // canceled by Close: retired servers stop draining
	cancel context.CancelFunc
	wg     sync.WaitGroup // servers and retired servers' drains
}

// serverGen is one http.Server and the channel-fed listener it serves.
type serverGen struct {
	key string // the server-level settings it was built with
	srv *http.Server
	ln  *chanListener
}

func newHTTPServer(addr string, budget time.Duration, log *slog.Logger) *httpServer {
	ctx, cancel := context.WithCancel(context.Background())
	return &httpServer{addr: configAddr(addr), log: log, budget: budget, ctx: ctx, cancel: cancel}
}

// configAddr is a listener's configured address as a net.Addr, for net/http's Listener.Addr.
type configAddr string

func (configAddr) Network() string  { return "tcp" }
func (a configAddr) String() string { return string(a) }

// Commit implements door.Server.
func (s *httpServer) Commit(g *door.Generation) {
	st := g.State.(*httpState)
	s.name.Store(&g.Name)
	s.state.Store(st)
	if cur := s.server.Load(); cur == nil || cur.key != serverKey(st) {
		s.installServer(st)
	}
}

func serverKey(st *httpState) string {
	c := st.cfg
	return fmt.Sprintf("%s|%v|%v|%d|%v|%s", c.Protocol, c.IdleTimeoutDuration(), c.HeaderTimeoutDuration(),
		c.MaxHeaderBytes, c.HTTP2Enabled(), c.Style)
}

func (s *httpServer) installServer(st *httpState) {
	c := st.cfg
	srv := &http.Server{
		Handler:           http.HandlerFunc(s.serveHTTP),
		ReadHeaderTimeout: c.HeaderTimeoutDuration(),
		IdleTimeout:       c.IdleTimeoutDuration(),
		MaxHeaderBytes:    c.MaxHeaderBytes,
		ErrorLog:          discardLog,
		ConnContext:       desync.ConnContext,
		ConnState:         s.connState,
		// TLS is terminated by the front door, so ServeTLS is not used; HTTP/2 connections
		// never reach net/http: our own engine (listener/h2) serves them in ServeConn.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	var newH2 *h2Gen
	if c.HTTP2Enabled() {
		newH2 = newH2Gen(c, http.HandlerFunc(s.serveHTTP))
	}
	if oldH2 := s.h2.Swap(newH2); oldH2 != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			retireH2(s.ctx, oldH2, s.budget)
		}()
	}
	gen := &serverGen{key: serverKey(st), srv: srv, ln: newChanListener(s.addr)}
	old := s.server.Swap(gen)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		srv.Serve(gen.ln) // returns when gen.ln is closed
	}()
	if old != nil {
		s.retire(old)
	}
}

// retire stops an old server from getting connections and lets its requests finish.
func (s *httpServer) retire(old *serverGen) {
	old.ln.Close()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(s.ctx, s.budget)
		defer cancel()
		if err := old.srv.Shutdown(ctx); err != nil {
			old.srv.Close()
		}
	}()
}

func (s *httpServer) serveHTTP(w http.ResponseWriter, r *http.Request) {
	s.state.Load().ServeHTTP(w, r)
}

// ServeConn implements door.Server: HTTP/2 connections are served here, on the connection's
// goroutine, by the h2 engine; HTTP/1 ones go to net/http through the desync sniffer, which
// needs every raw request head.
func (s *httpServer) ServeConn(c net.Conn, g *door.Generation, done func()) {
	if tc, ok := c.(*tls.Conn); ok && tc.ConnectionState().NegotiatedProtocol == "h2" {
		if gen := s.h2.Load(); gen != nil {
			serveH2(s.ctx, gen, c) // closes c
		} else {
			c.Close()
		}
		done()
		return
	}
	c = desync.NewConn(c, g.State.(*httpState).cfg.MaxHeaderBytes)
	s.done.Store(c, done)
	// A reload may retire the server we loaded between the load and the hand-off; then the new
	// one takes the connection, so none is dropped.
	for s.ctx.Err() == nil {
		if s.server.Load().ln.deliver(c) {
			return
		}
	}
	c.Close()
	s.finish(c)
}

// connState reports the end of a connection to its listener. It runs on net/http's goroutines
// and must not call RemoteAddr (that would read a PROXY header on the accept path).
func (s *httpServer) connState(c net.Conn, st http.ConnState) {
	switch st {
	case http.StateIdle:
		// A response's writes ran under send_timeout deadlines (statusWriter); the next
		// request's first write may come from net/http itself (100 Continue, an error answer).
		c.SetWriteDeadline(time.Time{})
	case http.StateHijacked, http.StateClosed:
		s.finish(c)
	}
}

func (s *httpServer) finish(c net.Conn) {
	if done, ok := s.done.LoadAndDelete(c); ok {
		done.(func())()
	}
}

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
	gen := s.server.Load()
	if gen == nil {
		return nil
	}
	gen.ln.Close()
	err := gen.srv.Shutdown(ctx)
	if err != nil {
		gen.srv.Close()
	}
	return err
}

// Close implements door.Server.
func (s *httpServer) Close() {
	s.cancel()
	if gen := s.server.Load(); gen != nil {
		gen.ln.Close()
		gen.srv.Close()
	}
	if g := s.h2.Load(); g != nil {
		g.srv.Close()
	}
	s.wg.Wait()
}

// chanListener is a net.Listener fed by ServeConn.
type chanListener struct {
	addr   net.Addr
	ch     chan net.Conn
	done   chan struct{}
	closed sync.Once
}

func newChanListener(addr net.Addr) *chanListener {
	return &chanListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

// deliver hands c to the server; false when this listener was closed meanwhile.
func (cl *chanListener) deliver(c net.Conn) bool {
	select {
	case cl.ch <- c:
		return true
	case <-cl.done:
		return false
	}
}

func (cl *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-cl.ch:
		return c, nil
	case <-cl.done:
		return nil, net.ErrClosed
	}
}

func (cl *chanListener) Close() error {
	cl.closed.Do(func() { close(cl.done) })
	return nil
}

func (cl *chanListener) Addr() net.Addr { return cl.addr }
