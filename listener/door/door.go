// Package door is the part every listener shares, whatever it serves: the listening socket,
// the accept loop, the front door (connection limit, inbound PROXY protocol, TLS), connection
// tracking and graceful drain. What a listener serves is a Server — the HTTP engine, the layer-4
// relay — which gets connections the front door has already prepared.
//
// A Listener holds one atomic pointer to its current Generation: the name, the front door and
// the Server with its state for that generation. Each connection loads the pointer once, at
// accept, and keeps that generation to its end, so a reload never changes a connection under
// its feet.
package door

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/inbound"
)

// Front is how a freshly accepted connection is prepared before its Server sees it.
type Front struct {
	Proxy *inbound.Layer // inbound PROXY protocol; nil = none
	TLS   *tls.Config    // nil = the Server gets the connection as it is (plain or pass-through)
	// HandshakeTimeout bounds the TLS handshake (the PROXY header has its own, in Proxy).
	HandshakeTimeout time.Duration
	MaxConns         int // max_connections; 0 = unlimited
}

// Generation is one immutable generation of a listener.
type Generation struct {
	Name  string
	Front Front
	// Server serves this generation's connections. Generations of one kind usually share one
	// Server; a Server differs from the previous generation's when the listener changes kind
	// (or a kind chooses to start afresh), and then the runtime drains the old one.
	Server Server
	// State is the Server's state for this generation (what it routes with).
	State any
}

// Server serves the connections of one kind of listener. It is created without side effects;
// Commit starts whatever it needs.
type Server interface {
	// ServeConn takes over c, accepted under g and prepared by g.Front: the PROXY header read
	// (c.RemoteAddr is the client), and for a Front with TLS the handshake done (c is a
	// *tls.Conn). It is called on the connection's own goroutine and may serve the connection
	// there or hand it on; either way it must close c and then call done exactly once when it
	// is finished with c.
	ServeConn(c net.Conn, g *Generation, done func())
	// Refused is told about a connection the front door gave up on after accepting it (stage
	// "proxy_header" or "tls_handshake"), for the connection log; c is already closed.
	Refused(g *Generation, stage string, err error, c net.Conn, start time.Time)
	// Commit is called once g is the listener's generation (at start and at each reload whose
	// generation has this Server), under the runtime's reload lock.
	Commit(g *Generation)
	// Drain stops taking new requests on open connections and lets those in flight finish
	// until ctx ends. Connections themselves are the Listener's to wait for and to cut.
	Drain(ctx context.Context) error
	// Close stops whatever the Server runs (dials in progress, servers) at once.
	Close()
}

// Stats are a listener's connection counters, read at scrape time.
type Stats struct {
	Accepted        uint64
	Active          int64
	Handshakes      uint64 // TLS handshakes completed
	Resumed         uint64 // of which resumed a session
	HandshakeErrors uint64
	InboundErrors   uint64 // PROXY header refused or timed out
	Rejected        Rejections
}

// Rejections count connections closed at accept, before any byte was read.
type Rejections struct {
	MaxConnections uint64 // over max_connections
	UntrustedProxy uint64 // PROXY protocol required and the peer is not a trusted proxy
}

// Listener is one listening socket and the connections accepted on it.
type Listener struct {
	sock net.Listener
	log  *slog.Logger
	gen  atomic.Pointer[Generation]

	ctx    context.Context // canceled when the listener stops: aborts handshakes in progress
	cancel context.CancelFunc

	mu       sync.Mutex
	conns    map[net.Conn]struct{} // the raw sockets, so a drain that runs out can cut them
	closing  bool
	wg       sync.WaitGroup // connections
	loopDone chan struct{}

	accepted, handshakes, resumed, handshakeErrs, inboundErrs atomic.Uint64
	maxConnsRejected, untrusted                               atomic.Uint64
	active                                                    atomic.Int64
}

// New serves g on sock: it commits g to its Server and starts accepting. The Listener owns
// sock from now on.
func New(sock net.Listener, g *Generation, log *slog.Logger) *Listener {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &Listener{sock: sock, log: log, ctx: ctx, cancel: cancel,
		conns: map[net.Conn]struct{}{}, loopDone: make(chan struct{})}
	l.gen.Store(g)
	g.Server.Commit(g)
	go l.acceptLoop()
	return l
}

// Store makes g the generation for new connections and returns the previous one. When
// g.Server is not the previous generation's, the caller drains and closes the old Server.
func (l *Listener) Store(g *Generation) *Generation {
	old := l.gen.Swap(g)
	g.Server.Commit(g)
	return old
}

// Generation is the current generation.
func (l *Listener) Generation() *Generation { return l.gen.Load() }

// Addr is the bound address.
func (l *Listener) Addr() net.Addr { return l.sock.Addr() }

// Socket is the listening socket (for handing it to another process on upgrade).
func (l *Listener) Socket() net.Listener { return l.sock }

// Stats returns a snapshot of the counters.
func (l *Listener) Stats() Stats {
	return Stats{
		Accepted: l.accepted.Load(), Active: l.active.Load(),
		Handshakes: l.handshakes.Load(), Resumed: l.resumed.Load(), HandshakeErrors: l.handshakeErrs.Load(),
		InboundErrors: l.inboundErrs.Load(),
		Rejected:      Rejections{MaxConnections: l.maxConnsRejected.Load(), UntrustedProxy: l.untrusted.Load()},
	}
}

func (l *Listener) acceptLoop() {
	defer close(l.loopDone)
	var backoff time.Duration
	for {
		c, err := l.sock.Accept()
		if err != nil {
			if l.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and similar: back off instead of spinning.
			backoff = min(max(backoff*2, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed", "listener", l.gen.Load().Name, "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-l.ctx.Done():
				return
			}
			continue
		}
		backoff = 0
		g := l.gen.Load()
		// The one accept-time check of every kind.
		if g.Front.MaxConns > 0 && l.active.Load() >= int64(g.Front.MaxConns) {
			// max_connections: shed at once rather than queue. Counted before the close, so
			// whoever sees the close also sees the count.
			l.maxConnsRejected.Add(1)
			c.Close()
			continue
		}
		pc, err := g.Front.Proxy.Conn(c)
		if err != nil {
			l.untrusted.Add(1) // an untrusted source: counted, then closed
			c.Close()
			continue
		}
		if !l.track(c) {
			c.Close()
			return
		}
		l.accepted.Add(1)
		// The PROXY header and the TLS handshake are read on the connection's goroutine, under
		// their deadlines, so a slow client never stalls this loop.
		go l.handle(c, pc, g)
	}
}

func (l *Listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing {
		return false
	}
	l.conns[c] = struct{}{}
	l.wg.Add(1)
	l.active.Add(1)
	return true
}

func (l *Listener) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
	l.active.Add(-1)
	l.wg.Done()
}

// handle runs the front door for one connection and hands it to the generation's Server.
func (l *Listener) handle(raw, c net.Conn, g *Generation) {
	start := time.Now()
	var once atomic.Bool
	done := func() {
		if once.CompareAndSwap(false, true) {
			l.untrack(raw)
		}
	}
	if err := inbound.Handshake(c); err != nil {
		l.inboundErrs.Add(1)
		c.Close()
		g.Server.Refused(g, "proxy_header", err, c, start)
		done()
		return
	}
	if g.Front.TLS != nil {
		tc := tls.Server(c, g.Front.TLS)
		ctx, cancel := context.WithTimeout(l.ctx, g.Front.HandshakeTimeout)
		err := tc.HandshakeContext(ctx)
		cancel()
		if err != nil {
			l.handshakeErrs.Add(1)
			tc.Close()
			g.Server.Refused(g, "tls_handshake", err, c, start)
			done()
			return
		}
		l.handshakes.Add(1)
		if tc.ConnectionState().DidResume {
			l.resumed.Add(1)
		}
		c = tc
	}
	g.Server.ServeConn(c, g, done)
}

// StopAccepting closes the socket and returns once no connection can be accepted any more.
func (l *Listener) StopAccepting() {
	l.mu.Lock()
	already := l.closing
	l.closing = true
	l.mu.Unlock()
	if !already {
		l.sock.Close()
	}
	<-l.loopDone
}

// Shutdown stops accepting, drains the current Server, waits for the connections to end on
// their own until ctx is done, then cuts the rest and waits for them. It returns ctx.Err()
// when it had to cut connections.
func (l *Listener) Shutdown(ctx context.Context) error {
	l.StopAccepting()
	srv := l.gen.Load().Server
	srv.Drain(ctx)
	waited := make(chan struct{})
	go func() { l.wg.Wait(); close(waited) }()
	var err error
	select {
	case <-waited:
	case <-ctx.Done():
		err = ctx.Err()
		l.cancel()
		srv.Close()
		l.mu.Lock()
		for c := range l.conns {
			c.Close()
		}
		l.mu.Unlock()
		<-waited
	}
	l.cancel()
	srv.Close()
	return err
}
