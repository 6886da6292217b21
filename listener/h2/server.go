// Package h2 is the proxy's HTTP/2 server: the connection engine only, on x/net/http2's Framer
// and hpack. It knows nothing about routing or targets; a Handler serves each stream.
//
// Shape (measured in a spike, see DESIGN.md "The request path"): the connection's own goroutine
// reads and decodes frames; a bounded set of long-lived workers per connection runs the Handler
// for one stream at a time (no goroutine per stream); every frame a worker or the reader emits is
// appended to one output buffer under the connection's lock, and one writer goroutine per
// connection yields once (runtime.Gosched) and then writes everything queued in one TLS write, so
// many streams' responses share a system call.
//
// Attacks are bounded here, where they are cheap to see: client resets and control-frame floods
// are counted per connection and answered with GOAWAY ENHANCE_YOUR_CALM past a budget; handlers
// that are still running after their stream was reset keep counting against the worker limit, so
// a target never sees more than MaxConcurrentStreams requests at once from one connection; header
// lists are bounded while they are decoded; a client that never opens its window is cut after
// SendTimeout.
package h2

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Handler serves one stream. It runs on a connection's worker goroutine; it reads the request
// body from the Stream and writes the response to it. When it returns, a stream it did not end
// is reset.
type Handler interface {
	ServeH2(s *Stream)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(s *Stream)

// ServeH2 calls f(s).
func (f HandlerFunc) ServeH2(s *Stream) { f(s) }

// Config holds the limits of a Server. Zero values take the defaults below.
type Config struct {
	MaxConcurrentStreams uint32        // SETTINGS_MAX_CONCURRENT_STREAMS, and workers per connection (100)
	InitialWindowSize    uint32        // our per-stream receive window (256 KiB)
	ConnWindowSize       uint32        // our connection receive window (1 MiB)
	MaxFrameSize         uint32        // SETTINGS_MAX_FRAME_SIZE we accept (16 KiB)
	MaxHeaderListSize    uint32        // SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB); over it: 431
	PrefaceTimeout       time.Duration // for the client preface and first SETTINGS (10 s)
	IdleTimeout          time.Duration // a connection with no stream is closed after this (60 s)
	SendTimeout          time.Duration // a write or window stall longer than this cuts (60 s)
	BodyTimeout          time.Duration // a request body pausing longer than this resets the stream (60 s)
	ResetBudget          int           // client RST_STREAMs tolerated per connection beyond completed/4 (200)
	ControlBudget        int           // PING/SETTINGS/empty DATA/PRIORITY frames per second (1000)
}

// Defaults for Config's zero values.
const (
	DefaultMaxConcurrentStreams = 100
	DefaultInitialWindowSize    = 256 << 10
	DefaultConnWindowSize       = 1 << 20
	DefaultMaxFrameSize         = 16 << 10
	DefaultMaxHeaderListSize    = 64 << 10
	DefaultPrefaceTimeout       = 10 * time.Second
	DefaultIdleTimeout          = 60 * time.Second
	DefaultSendTimeout          = 60 * time.Second
	DefaultBodyTimeout          = 60 * time.Second
	DefaultResetBudget          = 200
	DefaultControlBudget        = 1000
)

func (c Config) withDefaults() Config {
	orDefault(&c.MaxConcurrentStreams, DefaultMaxConcurrentStreams)
	orDefault(&c.InitialWindowSize, DefaultInitialWindowSize)
	orDefault(&c.ConnWindowSize, DefaultConnWindowSize)
	orDefault(&c.MaxFrameSize, DefaultMaxFrameSize)
	orDefault(&c.MaxHeaderListSize, DefaultMaxHeaderListSize)
	c.MaxFrameSize = min(max(c.MaxFrameSize, 16<<10), 1<<24-1)
	c.InitialWindowSize = min(c.InitialWindowSize, 1<<31-1)
	c.ConnWindowSize = min(max(c.ConnWindowSize, 65535), 1<<31-1)
	orDefault(&c.PrefaceTimeout, DefaultPrefaceTimeout)
	orDefault(&c.IdleTimeout, DefaultIdleTimeout)
	orDefault(&c.SendTimeout, DefaultSendTimeout)
	orDefault(&c.BodyTimeout, DefaultBodyTimeout)
	orDefault(&c.ResetBudget, DefaultResetBudget)
	orDefault(&c.ControlBudget, DefaultControlBudget)
	return c
}

// orDefault sets *v to d when it is unset (zero, or for the signed settings, negative).
func orDefault[T ~int | ~int64 | ~uint32](v *T, d T) {
	if *v <= 0 {
		*v = d
	}
}

// Server serves HTTP/2 connections with one Handler. It tracks its connections so that Shutdown
// can send each a GOAWAY and wait for their streams.
type Server struct {
	cfg     Config
	handler Handler

	mu       sync.Mutex
	conns    map[*conn]struct{}
	shutdown bool

	stats Stats
}

// Stats are a server's counters (read with Snapshot).
type Stats struct {
	Conns, Streams      atomic.Uint64
	ClientResets        atomic.Uint64 // RST_STREAM frames from clients
	CalmGoAways         atomic.Uint64 // connections closed with ENHANCE_YOUR_CALM
	ProtocolGoAways     atomic.Uint64 // connections closed for another protocol error
	RefusedStreams      atomic.Uint64 // streams refused over MaxConcurrentStreams
	StalledStreams      atomic.Uint64 // streams reset after SendTimeout without window
	SlowBodies          atomic.Uint64 // streams reset after BodyTimeout without body bytes
	HeaderListTooLarges atomic.Uint64 // 431 answers
}

// StatsSnapshot is a copy of Stats.
type StatsSnapshot struct {
	Conns, Streams, ClientResets, CalmGoAways, ProtocolGoAways uint64
	RefusedStreams, StalledStreams, HeaderListTooLarges        uint64
	SlowBodies                                                 uint64
}

// NewServer returns a server for h with cfg's limits.
func NewServer(cfg Config, h Handler) *Server {
	return &Server{cfg: cfg.withDefaults(), handler: h, conns: map[*conn]struct{}{}}
}

// Config returns the effective configuration (defaults applied).
func (srv *Server) Config() Config { return srv.cfg }

// Stats returns the server's counters.
func (srv *Server) Stats() StatsSnapshot {
	s := &srv.stats
	return StatsSnapshot{
		Conns: s.Conns.Load(), Streams: s.Streams.Load(), ClientResets: s.ClientResets.Load(),
		CalmGoAways: s.CalmGoAways.Load(), ProtocolGoAways: s.ProtocolGoAways.Load(),
		RefusedStreams: s.RefusedStreams.Load(), StalledStreams: s.StalledStreams.Load(),
		HeaderListTooLarges: s.HeaderListTooLarges.Load(), SlowBodies: s.SlowBodies.Load(),
	}
}

// ErrServerClosed is returned by ServeConn after Shutdown.
var ErrServerClosed = errors.New("h2: server closed")

// ServeConn serves one connection (TLS already done, "h2" negotiated, or prior knowledge) on
// the calling goroutine until it closes. It returns after every worker of the connection has
// returned. nc is closed on return.
func (srv *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	c := newConn(srv, nc)
	srv.mu.Lock()
	if srv.shutdown {
		srv.mu.Unlock()
		nc.Close()
		return ErrServerClosed
	}
	srv.conns[c] = struct{}{}
	srv.mu.Unlock()
	srv.stats.Conns.Add(1)
	defer func() {
		srv.mu.Lock()
		delete(srv.conns, c)
		srv.mu.Unlock()
	}()
	stop := context.AfterFunc(ctx, func() { c.goAway(errCodeNo, false) })
	defer stop()
	return c.serve()
}

// Shutdown sends every connection a GOAWAY naming the last stream it will serve, lets those
// streams finish, and returns when all connections are closed or ctx ends; then it closes what
// is left.
func (srv *Server) Shutdown(ctx context.Context) error {
	srv.mu.Lock()
	srv.shutdown = true
	conns := make([]*conn, 0, len(srv.conns))
	for c := range srv.conns {
		conns = append(conns, c)
	}
	srv.mu.Unlock()
	for _, c := range conns {
		c.goAway(errCodeNo, false)
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		srv.mu.Lock()
		n := len(srv.conns)
		srv.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			srv.Close()
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// Close closes every connection at once.
func (srv *Server) Close() {
	srv.mu.Lock()
	srv.shutdown = true
	for c := range srv.conns {
		c.nc.Close()
	}
	srv.mu.Unlock()
}
