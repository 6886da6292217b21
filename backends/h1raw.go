package backends

import (
	"bufio"
	"context"
	"net"
	"syscall"
	"time"
)

// H1Pool is a group's keep-alive pool of HTTP/1.1 connections to its targets, for an engine that
// writes request heads and reads responses itself (the listener's HTTP/1 engine): it borrows a
// connection, exchanges one request on it on its own goroutine, and gives it back or closes it.
// It shares the pool, the dialer, TLS to targets and the idle limits with the group's transport.
type H1Pool struct{ t *h1Transport }

// H1Pool returns the group's pool; ok is false for groups that speak HTTP/2 to their targets
// (and for tcp/tls groups), which only have Transport.
func (g *Group) H1Pool() (H1Pool, bool) {
	if g.pool == nil {
		return H1Pool{}, false
	}
	t, ok := g.pool.rt.(*h1Transport)
	return H1Pool{t}, ok
}

// ResponseTimeout is how long a target may take to send a response head after the request.
func (p H1Pool) ResponseTimeout() time.Duration { return p.t.responseTimeout }

// TargetConn is one borrowed connection. It is a small value: borrowing allocates nothing once
// the pool is warm.
type TargetConn struct{ pc *h1Conn }

// Get borrows a connection to addr: an idle one that is still open (probed when probe is set, or
// when it has been idle a while), else a new one. fresh skips the idle ones (a retry after a
// stale connection).
func (p H1Pool) Get(ctx context.Context, addr string, fresh, probe bool) (TargetConn, error) {
	pc, err := p.t.host(addr).get(ctx, fresh, probe)
	if err != nil {
		return TargetConn{}, err
	}
	return TargetConn{pc}, nil
}

// Conn is the connection to read and write.
func (c TargetConn) Conn() net.Conn { return c.pc.Conn }

// RawConn is the connection's socket for raw reads and writes when it is plain TCP (made once
// per connection, so borrowing stays free of allocations); nil, nil for TLS. The connection may
// wrap its *net.TCPConn (the open-connection count), so the socket is found through RawTCP too.
func (c TargetConn) RawConn() (*net.TCPConn, syscall.RawConn) {
	pc := c.pc
	if pc.rc == nil && !pc.noRaw {
		switch tc := pc.Conn.(type) {
		case *net.TCPConn:
			pc.tcp = tc
		case interface{ RawTCP() *net.TCPConn }:
			pc.tcp = tc.RawTCP()
		}
		if pc.tcp != nil {
			pc.rc, _ = pc.tcp.SyscallConn()
		}
		pc.noRaw = pc.rc == nil
	}
	return pc.tcp, pc.rc
}

// Reused reports whether it came from the idle pool: a failure before the first response byte
// may then mean the target had closed it, and an idempotent request may go again on a new one.
func (c TargetConn) Reused() bool { return c.pc.reused }

// Valid reports whether c holds a connection.
func (c TargetConn) Valid() bool { return c.pc != nil }

// Done ends the borrowing: reuse gives the connection back to the idle pool (the whole response
// was read, the whole request sent, and nothing more arrived), otherwise it is closed.
func (c TargetConn) Done(reuse bool) {
	if reuse {
		c.pc.SetDeadline(time.Time{})
		c.pc.host.put(c.pc)
		return
	}
	c.pc.Close()
}

// buffers gives a connection used through RoundTrip its buffers on first use: a connection the
// engine borrows never needs them.
func (pc *h1Conn) buffers() {
	if pc.br == nil {
		pc.br = bufio.NewReaderSize(pc.Conn, 4<<10)
		pc.bw = bufio.NewWriterSize(pc.Conn, 4<<10)
	}
}
