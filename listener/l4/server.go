package l4

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/inbound"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("l4: server closed")

// Options are a Server's long-lived settings.
type Options struct {
	Name string       // listener name, for logs
	Log  *slog.Logger // nil: discard
	// OnConn, if set, is called once per finished connection (access log, metrics). It runs on
	// the connection's goroutine after both ends are closed; it must not block for long.
	OnConn func(ConnInfo)
}

// ConnInfo is the record of one finished connection.
type ConnInfo struct {
	Meta     ConnMeta
	Start    time.Time
	Duration time.Duration
	BytesIn  int64  // client -> target
	BytesOut int64  // target -> client
	Target   string // upstream remote address, "" when no target was reached
	Err      error  // why it ended abnormally (nil for a clean close)
	Idle     bool   // closed by the idle timeout
	// Reason names the stage Err comes from, for logs: proxy_header, tls_handshake,
	// client_hello, dial, replay, idle_timeout or relay; "" for a clean close.
	Reason string
}

// Stats are a listener's counters since NewServer.
type Stats struct {
	Accepted        uint64
	Active          int64
	BytesIn         uint64 // client -> target
	BytesOut        uint64 // target -> client
	InboundErrors   uint64 // PROXY header refused or timed out
	HandshakeErrors uint64 // TLS handshake or ClientHello peek failed
	DialErrors      uint64 // no target or every attempt failed
	IdleClosed      uint64
}

// Server is one layer-4 listener.
type Server struct {
	ln    net.Listener
	opt   Options
	log   *slog.Logger
	state atomic.Pointer[State]

	ctx    context.Context // canceled by Close: aborts dials and handshakes in progress
	cancel context.CancelFunc

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	closing  bool
	serving  bool
	wg       sync.WaitGroup // connection goroutines
	serveEnd chan struct{}  // closed when Serve returns (nil until Serve starts)

	accepted, bytesIn, bytesOut          atomic.Uint64
	inboundErrs, handshakeErrs, dialErrs atomic.Uint64
	idleClosed                           atomic.Uint64
	active                               atomic.Int64
}

// NewServer returns a server for ln (already wrapped by inbound.Wrap when the listener
// accepts the PROXY protocol) serving generation st. The server owns ln.
func NewServer(ln net.Listener, st *State, opt Options) *Server {
	if st == nil {
		panic("l4: NewServer with a nil State")
	}
	log := opt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{ln: ln, opt: opt, log: log.With("listener", opt.Name), ctx: ctx, cancel: cancel,
		conns: make(map[net.Conn]struct{})}
	s.state.Store(st)
	return s
}

// Store makes st the generation for new connections and returns the previous one.
// Established connections keep the generation they started with.
func (s *Server) Store(st *State) *State {
	if st == nil {
		panic("l4: Store of a nil State")
	}
	return s.state.Swap(st)
}

// State returns the current generation.
func (s *Server) State() *State { return s.state.Load() }

// Addr is the listening address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	return Stats{
		Accepted: s.accepted.Load(), Active: s.active.Load(),
		BytesIn: s.bytesIn.Load(), BytesOut: s.bytesOut.Load(),
		InboundErrors: s.inboundErrs.Load(), HandshakeErrors: s.handshakeErrs.Load(),
		DialErrors: s.dialErrs.Load(), IdleClosed: s.idleClosed.Load(),
	}
}

// Serve accepts until Shutdown or Close (then returns ErrServerClosed) or a permanent accept
// error. It may be called once.
func (s *Server) Serve() error {
	s.mu.Lock()
	if s.serving {
		s.mu.Unlock()
		return errors.New("l4: Serve called twice")
	}
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.serving = true
	s.serveEnd = make(chan struct{})
	s.mu.Unlock()
	defer close(s.serveEnd)

	var backoff time.Duration
	for {
		c, err := s.ln.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				// EMFILE and friends: back off instead of spinning (as net/http does).
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "err", err, "delay", backoff)
				select {
				case <-time.After(backoff):
				case <-s.ctx.Done():
					return ErrServerClosed
				}
				continue
			}
			return fmt.Errorf("l4: accept on %s: %w", s.ln.Addr(), err)
		}
		backoff = 0
		if !s.track(c) {
			c.Close()
			return ErrServerClosed
		}
		s.accepted.Add(1)
		go s.handle(c)
	}
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.active.Add(1)
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.active.Add(-1)
	s.wg.Done()
}

// Shutdown stops accepting, waits for established connections to end on their own until ctx
// is done, then closes the rest and waits for their goroutines. It returns ctx.Err() when it
// had to cut connections.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopAccepting()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.closeConns()
		<-done
		return ctx.Err()
	}
}

// Close stops accepting and closes every connection now.
func (s *Server) Close() error {
	err := s.stopAccepting()
	s.closeConns()
	s.wg.Wait()
	return err
}

func (s *Server) stopAccepting() error {
	s.mu.Lock()
	already := s.closing
	s.closing = true
	end := s.serveEnd
	s.mu.Unlock()
	if already {
		return nil
	}
	err := s.ln.Close()
	if end != nil {
		<-end // no track after this: Serve has returned
	}
	return err
}

func (s *Server) closeConns() {
	s.cancel()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

// handle runs one connection: load the generation once, PROXY header, TLS or peek, dial,
// relay.
func (s *Server) handle(c net.Conn) {
	info := ConnInfo{Start: time.Now()}
	tracked := c
	var (
		upstream net.Conn
		done     func()  // the dialer's: the target's connection ended
		peekBuf  *[]byte // holds the peeked ClientHello until it is replayed
		relaying bool    // the relay owns the connection and runs cleanup when it ends
	)
	cleanup := func() {
		if done != nil {
			done()
		}
		if peekBuf != nil {
			bufPool.Put(peekBuf)
		}
		if upstream != nil {
			upstream.Close()
		}
		c.Close()
		// Reported before untrack: Shutdown waits for untrack, and whoever shuts down (the
		// connection log's owner) must find every record already handed over.
		if s.opt.OnConn != nil {
			info.Duration = time.Since(info.Start)
			s.opt.OnConn(info)
		}
		s.untrack(tracked)
	}
	defer func() {
		if !relaying {
			cleanup()
		}
	}()
	st := s.state.Load()
	cfg := &st.cfg
	meta := &info.Meta

	// The PROXY header (if the listener has the layer) is read here, on this goroutine.
	if err := inbound.Handshake(c); err != nil {
		s.inboundErrs.Add(1)
		info.Err, info.Reason = err, "proxy_header"
		// No header means no client address: the log names who connected, the peer.
		meta.Client, _ = inbound.AddrPort(inbound.Socket(c).RemoteAddr())
		meta.Local, _ = inbound.AddrPort(inbound.Socket(c).LocalAddr())
		s.log.Debug("inbound PROXY header refused", "err", err)
		return
	}
	meta.Client, _ = inbound.AddrPort(c.RemoteAddr())
	meta.Local, _ = inbound.AddrPort(c.LocalAddr())

	clientSrc := c // what the client->target direction reads
	viaWrapper := inbound.Socket(c) != c
	var replay []byte
	switch cfg.Mode {
	case ModeTCP:
	case ModeTLS:
		tc := tls.Server(c, st.tls)
		ctx, cancel := context.WithTimeout(s.ctx, cfg.HandshakeTimeout)
		err := tc.HandshakeContext(ctx)
		cancel()
		if err != nil {
			s.handshakeErrs.Add(1)
			info.Err, info.Reason = fmt.Errorf("l4: TLS handshake: %w", err), "tls_handshake"
			s.log.Debug("TLS handshake failed", "client", meta.Client, "err", err)
			return
		}
		cs := tc.ConnectionState()
		meta.TLS = true
		meta.SNI = cs.ServerName
		meta.ALPN = cs.NegotiatedProtocol
		meta.TLSVersion = cs.Version
		meta.CipherSuite = cs.CipherSuite
		meta.ClientCertVerified = len(cs.VerifiedChains) > 0
		c, clientSrc, viaWrapper = tc, tc, false
	case ModeSNI:
		_ = c.SetReadDeadline(time.Now().Add(cfg.HandshakeTimeout))
		peekBuf = bufPool.Get().(*[]byte)
		raw, sni, err := peekClientHello(c, (*peekBuf)[:0])
		_ = c.SetReadDeadline(time.Time{})
		if err != nil && !(errors.Is(err, ErrNotTLS) && len(raw) > 0) {
			s.handshakeErrs.Add(1)
			info.Err, info.Reason = fmt.Errorf("l4: peek ClientHello: %w", err), "client_hello"
			s.log.Debug("ClientHello peek failed", "client", meta.Client, "err", err)
			return
		}
		meta.SNI = sni
		// The peek read through the PROXY layer with a large buffer: it holds nothing now.
		clientSrc, viaWrapper = inbound.Socket(c), false
		replay = raw
	default:
		panic("l4: unreachable mode")
	}

	ctx, cancel := context.WithTimeout(s.ctx, cfg.ConnectTimeout)
	up, doneFn, err := st.route(meta.SNI).DialFor(ctx, meta)
	cancel()
	if err != nil {
		s.dialErrs.Add(1)
		info.Err, info.Reason = err, "dial"
		s.log.Debug("dial failed", "client", meta.Client, "err", err)
		return
	}
	done, upstream = doneFn, up
	info.Target = up.RemoteAddr().String()
	if len(replay) > 0 {
		if _, err := up.Write(replay); err != nil {
			info.Err, info.Reason = fmt.Errorf("l4: replay ClientHello: %w", err), "replay"
			return
		}
		s.bytesIn.Add(uint64(len(replay)))
		info.BytesIn += int64(len(replay))
		replay = nil
		bufPool.Put(peekBuf)
		peekBuf = nil
	}
	relaying = true
	startRelay(st, c, clientSrc, up, viaWrapper, &s.bytesIn, &s.bytesOut, func(in, out int64, idle bool, err error) {
		info.BytesIn += in
		info.BytesOut = out
		info.Idle = idle
		switch {
		case idle:
			s.idleClosed.Add(1)
			if err == nil {
				err = errIdle
			}
			info.Reason = "idle_timeout"
		case err != nil:
			info.Reason = "relay"
		}
		info.Err = err
		cleanup()
	})
}
