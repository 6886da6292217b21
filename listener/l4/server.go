package l4

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/door"
	"github.com/fulcrum-lb/fulcrum/listener/inbound"
	"github.com/fulcrum-lb/fulcrum/listener/park"
)

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

// Stats are an engine's counters since NewHandler.
type Stats struct {
	BytesIn         uint64 // client -> target
	BytesOut        uint64 // target -> client
	HandshakeErrors uint64 // ClientHello peek failed (TLS handshakes are the front door's)
	DialErrors      uint64 // no target or every attempt failed
	IdleClosed      uint64
}

// Handler is the layer-4 engine of one listener: it serves the connections its door.Listener
// accepted and prepared (PROXY header read, TLS terminated for ModeTLS), each under the State of
// the generation it was accepted in. It implements door.Server.
type Handler struct {
	opt Options
	log *slog.Logger

	ctx    context.Context // canceled by Close: aborts dials in progress
	cancel context.CancelFunc

	bytesIn, bytesOut, handshakeErrs, dialErrs, idleClosed atomic.Uint64

	// Idle relay directions parked without a goroutine (relay.go), started on first use.
	parking park.Lazy
}

// poller is the engine's parking poller, started on first use; nil when parking is
// unavailable or the engine is closed.
func (h *Handler) poller() *park.Poller {
	p, err := h.parking.Get(h.ctx, true)
	if err != nil {
		h.log.Warn("idle relays keep their goroutines: parking unavailable", "err", err)
	}
	return p
}

// NewHandler returns an engine; it runs nothing until connections arrive.
func NewHandler(opt Options) *Handler {
	log := opt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Handler{opt: opt, log: log.With("listener", opt.Name), ctx: ctx, cancel: cancel}
}

// Stats returns a snapshot of the engine's counters (the connection counters are the
// door.Listener's).
func (h *Handler) Stats() Stats {
	return Stats{
		BytesIn: h.bytesIn.Load(), BytesOut: h.bytesOut.Load(),
		HandshakeErrors: h.handshakeErrs.Load(), DialErrors: h.dialErrs.Load(), IdleClosed: h.idleClosed.Load(),
	}
}

// Commit implements door.Server: the State travels with each connection's generation.
func (h *Handler) Commit(*door.Generation) {}

// Drain implements door.Server: a stream has no requests to finish early; the listener waits
// for the streams themselves.
func (h *Handler) Drain(context.Context) error { return nil }

// Close aborts dials in progress and ends the relays whose directions are all parked (a
// shutdown that ran out of time cuts the others by closing their sockets).
func (h *Handler) Close() {
	h.cancel()
	if p, _ := h.parking.Get(h.ctx, false); p != nil {
		p.Stop() // expires every parked direction, which aborts its relay
	}
}

// Refused reports a connection the front door gave up on to the connection log.
func (h *Handler) Refused(_ *door.Generation, stage string, err error, c net.Conn, start time.Time) {
	if h.opt.OnConn == nil {
		return
	}
	info := ConnInfo{Start: start, Duration: time.Since(start), Err: err, Reason: stage}
	info.Meta.Client, _ = inbound.AddrPort(inbound.Socket(c).RemoteAddr())
	info.Meta.Local, _ = inbound.AddrPort(inbound.Socket(c).LocalAddr())
	h.opt.OnConn(info)
}

// ServeConn implements door.Server for a generation whose State is a *State.
func (h *Handler) ServeConn(c net.Conn, g *door.Generation, done func()) {
	h.serve(c, g.State.(*State), done)
}

// l4conn is one connection from accept to close: what its end needs, and its relay, in one
// allocation (an idle relayed connection keeps nothing else of its own but its two sockets).
// What only the end knows (outcome, duration, target address) is not kept here but put
// together by cleanup: every idle relay pays for each byte of this struct (TestIdleMemory).
type l4conn struct {
	h        *Handler
	c        net.Conn
	meta     ConnMeta
	start    time.Time
	replayed int64 // ClientHello bytes replayed to the target (ModeSNI), part of BytesIn
	untrack  func()
	upstream net.Conn
	done     func()  // the dialer's: the target's connection ended
	peekBuf  *[]byte // holds the peeked ClientHello until it is replayed
	relaying bool    // the relay owns the connection and runs cleanup when it ends
	r        relay
}

// cleanup closes both ends and reports the connection; info holds its outcome (bytes moved,
// Err, Reason, Idle), cleanup adds the rest.
func (k *l4conn) cleanup(info ConnInfo) {
	if k.done != nil {
		k.done()
	}
	if k.peekBuf != nil {
		bufPool.Put(k.peekBuf)
	}
	if k.upstream != nil {
		if k.h.opt.OnConn != nil {
			info.Target = k.upstream.RemoteAddr().String()
		}
		k.upstream.Close()
	}
	k.c.Close()
	// Reported before untrack: a shutdown waits for untrack, and whoever shuts down (the
	// connection log's owner) must find every record already handed over.
	if k.h.opt.OnConn != nil {
		info.Meta, info.Start, info.Duration = k.meta, k.start, time.Since(k.start)
		info.BytesIn += k.replayed
		k.h.opt.OnConn(info)
	}
	k.untrack()
}

// relayEnded implements relayEnd.
func (k *l4conn) relayEnded(in, out int64, idle bool, err error) {
	info := ConnInfo{BytesIn: in, BytesOut: out, Idle: idle}
	switch {
	case idle:
		k.h.idleClosed.Add(1)
		if err == nil {
			err = errIdle
		}
		info.Reason = "idle_timeout"
	case err != nil:
		info.Reason = "relay"
	}
	info.Err = err
	k.cleanup(info)
}

// serve runs one prepared connection: dial, relay. c is a *tls.Conn in ModeTLS.
func (h *Handler) serve(c net.Conn, st *State, untrack func()) {
	k := &l4conn{h: h, c: c, start: time.Now(), untrack: untrack}
	var failure ConnInfo // why the connection ended before its relay began
	info := &failure
	defer func() {
		if !k.relaying {
			k.cleanup(failure)
		}
	}()
	cfg := &st.cfg
	meta := &k.meta
	meta.Client, _ = inbound.AddrPort(c.RemoteAddr())
	meta.Local, _ = inbound.AddrPort(c.LocalAddr())

	clientSrc := c // what the client->target direction reads
	viaWrapper := inbound.Socket(c) != c
	var replay []byte
	switch cfg.Mode {
	case ModeTCP:
	case ModeTLS:
		tc, ok := c.(*tls.Conn)
		if !ok {
			panic("l4: tls mode without a TLS front door")
		}
		cs := tc.ConnectionState()
		meta.TLS = true
		meta.SNI = cs.ServerName
		meta.ALPN = cs.NegotiatedProtocol
		meta.TLSVersion = cs.Version
		meta.CipherSuite = cs.CipherSuite
		meta.ClientCertVerified = len(cs.VerifiedChains) > 0
		viaWrapper = false
	case ModeSNI:
		_ = c.SetReadDeadline(time.Now().Add(cfg.HandshakeTimeout))
		k.peekBuf = bufPool.Get().(*[]byte)
		raw, sni, err := peekClientHello(c, (*k.peekBuf)[:0])
		_ = c.SetReadDeadline(time.Time{})
		if err != nil && !(errors.Is(err, ErrNotTLS) && len(raw) > 0) {
			h.handshakeErrs.Add(1)
			info.Err, info.Reason = fmt.Errorf("l4: peek ClientHello: %w", err), "client_hello"
			h.log.Debug("ClientHello peek failed", "client", meta.Client, "err", err)
			return
		}
		meta.SNI = sni
		// The peek read through the PROXY layer with a large buffer: it holds nothing now.
		clientSrc, viaWrapper = inbound.Socket(c), false
		replay = raw
	default:
		panic("l4: unreachable mode")
	}

	ctx, cancel := context.WithTimeout(h.ctx, cfg.ConnectTimeout)
	up, doneFn, err := st.route(meta.SNI).DialFor(ctx, meta)
	cancel()
	if err != nil {
		h.dialErrs.Add(1)
		info.Err, info.Reason = err, "dial"
		h.log.Debug("dial failed", "client", meta.Client, "err", err)
		return
	}
	k.done, k.upstream = doneFn, up
	if len(replay) > 0 {
		if _, err := up.Write(replay); err != nil {
			info.Err, info.Reason = fmt.Errorf("l4: replay ClientHello: %w", err), "replay"
			return
		}
		h.bytesIn.Add(uint64(len(replay)))
		k.replayed = int64(len(replay))
		replay = nil
		bufPool.Put(k.peekBuf)
		k.peekBuf = nil
	}
	k.relaying = true
	startRelay(&k.r, st, h.poller(), c, clientSrc, up, viaWrapper, &h.bytesIn, &h.bytesOut, k)
}
