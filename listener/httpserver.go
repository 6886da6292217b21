package listener

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/inbound"
)

var discardLog = log.New(discardWriter{}, "", 0)

type discardWriter struct{}

func (discardWriter) Write(p []byte) (int, error) { return len(p), nil }

// HTTPListener serves one HTTP or HTTPS listener. It owns its listening socket for its whole
// life; reloads swap the request state (httpState) atomically, and when a server-level setting
// changes (timeouts, header limit, HTTP/2) a new http.Server takes over the same socket while the
// old one drains. One accept loop hands each connection to whichever server is current, so no
// connection is ever refused during a reload.
type HTTPListener struct {
	name string
	sock net.Listener
	log  *slog.Logger

	state  atomic.Pointer[httpState]
	server atomic.Pointer[serverGen]
	front  atomic.Pointer[frontDoor] // PROXY protocol and TLS for new connections

	stats httpStats

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // accept loop and retired servers' drains
}

// httpStats are a listener's connection counters, read by the metrics collector at scrape time.
type httpStats struct {
	active, accepted          atomic.Int64
	handshakes, handshakeErrs atomic.Uint64
	resumed                   atomic.Uint64
	rejected                  rejections
}

// rejections count connections closed at accept, before any byte was read.
type rejections struct {
	maxConns  atomic.Uint64 // over max_connections
	untrusted atomic.Uint64 // PROXY protocol required, peer outside trusted_proxies
}

func (r *rejections) snapshot() Rejections {
	return Rejections{MaxConnections: r.maxConns.Load(), UntrustedProxy: r.untrusted.Load()}
}

// Rejections is a snapshot of a listener's connections closed at accept.
type Rejections struct {
	MaxConnections uint64 // over max_connections
	UntrustedProxy uint64 // PROXY protocol required and the peer is not a trusted proxy
}

// HTTPStats is a snapshot of an HTTP listener's counters.
type HTTPStats struct {
	Active, Accepted                     int64
	Handshakes, HandshakeErrors, Resumed uint64
	Rejected                             Rejections
}

// Stats returns the listener's counters.
func (l *HTTPListener) Stats() HTTPStats {
	return HTTPStats{
		Active: l.stats.active.Load(), Accepted: l.stats.accepted.Load(),
		Handshakes: l.stats.handshakes.Load(), HandshakeErrors: l.stats.handshakeErrs.Load(),
		Resumed: l.stats.resumed.Load(), Rejected: l.stats.rejected.snapshot(),
	}
}

// connState counts open connections. It runs on net/http's goroutines and must not call
// RemoteAddr (that would read a PROXY header on the accept path).
func (l *HTTPListener) connState(_ net.Conn, s http.ConnState) {
	switch s {
	case http.StateNew:
		l.stats.active.Add(1)
		l.stats.accepted.Add(1)
	case http.StateHijacked, http.StateClosed:
		l.stats.active.Add(-1)
	}
}

// frontDoor is how a freshly accepted connection is prepared before HTTP sees it.
type frontDoor struct {
	layer *inbound.Layer // inbound PROXY protocol; nil = none
	tls   *tls.Config    // nil = plain HTTP

	handshakeTimeout time.Duration
	maxHeaderBytes   int
	maxConns         int // max_connections; 0 = unlimited
}

// serverGen is one http.Server and the channel-fed listener it serves.
type serverGen struct {
	key string // the server-level settings it was built with
	srv *http.Server
	ln  *chanListener
}

// newHTTPListener starts serving st on sock.
func newHTTPListener(sock net.Listener, st *httpState, fd *frontDoor, shutdownBudget time.Duration, log *slog.Logger) *HTTPListener {
	ctx, cancel := context.WithCancel(context.Background())
	l := &HTTPListener{name: st.cfg.Name, sock: sock, log: log, ctx: ctx, cancel: cancel}
	l.state.Store(st)
	l.front.Store(fd)
	l.installServer(st, shutdownBudget)
	l.wg.Add(1)
	go l.acceptLoop()
	return l
}

// update swaps in a new generation. In-flight requests finish on the generation they loaded.
func (l *HTTPListener) update(st *httpState, fd *frontDoor, shutdownBudget time.Duration) {
	l.name = st.cfg.Name // guarded by the runtime's reload lock, like every reader of name
	l.state.Store(st)
	l.front.Store(fd)
	if cur := l.server.Load(); cur == nil || cur.key != serverKey(st) {
		l.installServer(st, shutdownBudget)
	}
}

func serverKey(st *httpState) string {
	c := st.cfg
	return fmt.Sprintf("%s|%v|%v|%d|%v|%s", c.Protocol, c.IdleTimeoutDuration(), c.HeaderTimeoutDuration(),
		c.MaxHeaderBytes, c.HTTP2Enabled(), c.Style)
}

func (l *HTTPListener) installServer(st *httpState, shutdownBudget time.Duration) {
	c := st.cfg
	srv := &http.Server{
		Handler:           http.HandlerFunc(l.serveHTTP),
		ReadHeaderTimeout: c.HeaderTimeoutDuration(),
		IdleTimeout:       c.IdleTimeoutDuration(),
		MaxHeaderBytes:    c.MaxHeaderBytes,
		ErrorLog:          discardLog,
		ConnContext:       desync.ConnContext,
		ConnState:         l.connState,
		// TLS is terminated by our accept loop (tls.Server), so ServeTLS is not used; HTTP/2 is
		// selected through TLSNextProto after the handshake negotiated "h2".
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	if c.HTTP2Enabled() {
		h2 := &http2.Server{
			MaxConcurrentStreams:         250,
			IdleTimeout:                  c.IdleTimeoutDuration(),
			MaxUploadBufferPerConnection: 1 << 20,
			MaxReadFrameSize:             1 << 20,
		}
		srv.TLSNextProto = nil // ConfigureServer fills it
		if err := http2.ConfigureServer(srv, h2); err != nil {
			l.log.Error("configure HTTP/2", "listener", l.name, "err", err)
		}
	}
	gen := &serverGen{key: serverKey(st), srv: srv, ln: newChanListener(l.sock.Addr())}
	old := l.server.Swap(gen)
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		srv.Serve(gen.ln) // returns when gen.ln is closed
	}()
	if old != nil {
		l.retire(old, shutdownBudget)
	}
}

// retire stops an old server from getting connections and lets its requests finish.
func (l *HTTPListener) retire(old *serverGen, budget time.Duration) {
	old.ln.Close()
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		ctx, cancel := context.WithTimeout(l.ctx, budget)
		defer cancel()
		if err := old.srv.Shutdown(ctx); err != nil {
			old.srv.Close()
		}
	}()
}

func (l *HTTPListener) serveHTTP(w http.ResponseWriter, r *http.Request) {
	l.state.Load().ServeHTTP(w, r)
}

func (l *HTTPListener) acceptLoop() {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		c, err := l.sock.Accept()
		if err != nil {
			if l.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and similar: back off instead of spinning.
			backoff = min(max(backoff*2, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed", "listener", l.name, "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-l.ctx.Done():
				return
			}
			continue
		}
		backoff = 0
		fd := l.front.Load()
		if fd.maxConns > 0 && l.stats.active.Load() >= int64(fd.maxConns) {
			c.Close() // max_connections: shed at once rather than queue
			l.stats.rejected.maxConns.Add(1)
			continue
		}
		// The PROXY header is read lazily on first Read, under its own deadline, by the
		// connection's goroutine, so a slow upstream never stalls this loop.
		if c, err = fd.layer.Conn(c); err != nil {
			l.stats.rejected.untrusted.Add(1) // untrusted source: closed by the layer
			continue
		}
		if fd.tls == nil {
			l.deliver(desync.NewConn(c, fd.maxHeaderBytes))
			continue
		}
		// The handshake runs on its own goroutine under a deadline, so a slow client never
		// holds up the accept loop.
		l.wg.Add(1)
		go l.handshake(c, fd)
	}
}

// handshake terminates TLS, then hands HTTP/2 connections to the server as *tls.Conn (so
// net/http switches to HTTP/2 by ALPN) and HTTP/1 ones through the desync sniffer, which needs
// every raw request head.
func (l *HTTPListener) handshake(c net.Conn, fd *frontDoor) {
	defer l.wg.Done()
	tc := tls.Server(c, fd.tls)
	tc.SetDeadline(time.Now().Add(fd.handshakeTimeout))
	err := tc.HandshakeContext(l.ctx)
	if err != nil {
		l.stats.handshakeErrs.Add(1)
		tc.Close()
		return
	}
	tc.SetDeadline(time.Time{})
	cs := tc.ConnectionState()
	l.stats.handshakes.Add(1)
	if cs.DidResume {
		l.stats.resumed.Add(1)
	}
	if cs.NegotiatedProtocol == "h2" {
		l.deliver(tc)
		return
	}
	l.deliver(desync.NewConn(tc, fd.maxHeaderBytes))
}

// deliver hands c to the current server. A reload may retire the server we loaded between the
// load and the hand-off; then the new one takes the connection, so none is dropped.
func (l *HTTPListener) deliver(c net.Conn) {
	for l.ctx.Err() == nil {
		if l.server.Load().ln.deliver(c) {
			return
		}
	}
	c.Close()
}

// Shutdown stops accepting, lets requests finish until ctx ends, then closes what is left.
func (l *HTTPListener) Shutdown(ctx context.Context) error {
	l.cancel()
	l.sock.Close()
	gen := l.server.Load()
	gen.ln.Close()
	err := gen.srv.Shutdown(ctx)
	if err != nil {
		gen.srv.Close()
	}
	l.wg.Wait()
	return err
}

// Addr is the bound address (useful with port 0 in tests).
func (l *HTTPListener) Addr() net.Addr { return l.sock.Addr() }

// chanListener is a net.Listener fed by our accept loop.
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
