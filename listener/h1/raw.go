package h1

import (
	"io"
	"net"
	"os"
	"syscall"
)

// Raw reads and writes a plain TCP socket with raw system calls, through its RawConn: the
// socket stays in the runtime's poller (deadlines, closing, waiting for readiness all work as
// for the net.Conn), but a read or write that does not block skips the scheduler's
// entersyscall/exitsyscall. A non-blocking socket's read or write never blocks, so the P need
// not be handed off; and a P that never sits in a syscall is never retaken by sysmon, which on
// a loaded host otherwise hands it to another thread (futex wake-ups, context switches) when a
// descheduled syscall outlasts its 20 µs tick. Two reads and two writes per proxied request go
// this way.
//
// A Raw belongs to one reader or one writer of a pooled session: its callbacks are made once
// (the first Set), so a warm session reads and writes without allocating.
type Raw struct {
	tc     *net.TCPConn
	rc     syscall.RawConn
	p      []byte
	n      int
	err    error
	rf, wf func(fd uintptr) bool
}

// Set points x at the socket tc and its RawConn rc (nil, nil: unset).
func (x *Raw) Set(tc *net.TCPConn, rc syscall.RawConn) {
	x.tc, x.rc = tc, rc
	if x.rf == nil {
		x.rf, x.wf = x.readFD, x.writeFD
	}
}

// RawTCP implements RawTCP: large bodies may still be spliced between the sockets.
func (x *Raw) RawTCP() *net.TCPConn { return x.tc }

// Read reads once into p, waiting for readability (under the connection's read deadline)
// when nothing is queued. 0, io.EOF when the peer closed.
func (x *Raw) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	x.p, x.n, x.err = p, 0, nil
	err := x.rc.Read(x.rf)
	n := x.n
	x.p = nil
	if err == nil {
		err = x.err
	}
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

func (x *Raw) readFD(fd uintptr) bool {
	for {
		n, e := Recv(fd, x.p)
		switch e {
		case 0:
			x.n = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // wait for readability
		default:
			x.err = os.NewSyscallError("read", e)
			return true
		}
	}
}

// Write writes all of p, waiting for writability (under the write deadline) as needed.
func (x *Raw) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	x.p, x.n, x.err = p, 0, nil
	err := x.rc.Write(x.wf)
	n := x.n
	x.p = nil
	if err == nil {
		err = x.err
	}
	return n, err
}

func (x *Raw) writeFD(fd uintptr) bool {
	for x.n < len(x.p) {
		n, e := send(fd, x.p[x.n:])
		switch e {
		case 0:
			x.n += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false // wait for room
		default:
			x.err = os.NewSyscallError("write", e)
			return true
		}
	}
	return true
}
