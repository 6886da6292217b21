//go:build linux

package h1

import (
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A large plain body moves from one TCP socket to the other with splice(2) through a pipe: the
// kernel hands pages over, and the bytes never cross into user space (two copies saved per
// byte, and no 64 KiB buffer held by the connection while it streams).
//
// The engine does the splicing itself, on the sockets' pollers, rather than calling
// (*net.TCPConn).ReadFrom: ReadFrom's error does not say which side failed, and the engine
// must know (a client that stops reading is send_timeout or client_closed; a target that stops
// sending is target_read_timeout or a truncated body, and only the latter counts against the
// target). Each round is one splice in, under the source's per-read deadline, and the splices
// out that empty the pipe, under the destination's per-write deadline: the same per-operation
// timeouts and min_transfer_rate as the buffered copy, whose reads and writes are 64 KiB too.

const (
	// spliceMin: below this many body bytes still to come, the buffered copy is cheaper than
	// a pipe's extra system calls.
	spliceMin = 64 << 10
	// spliceRound is the most one round moves: the default pipe capacity, so the splice out
	// never waits on the pipe.
	spliceRound = 64 << 10
)

// spliced counts bytes moved by splice (tests check the zero-copy path is taken).
var spliced atomic.Int64

// Pipes are held only while bytes are in them: a body whose source is quiet waits for data
// without one (a slow upload or a stalled target pins no descriptors), and a pipe that has been
// emptied goes back at once. A few empty ones are kept for the next round; not in a sync.Pool,
// which would drop them without closing their descriptors. At most maxPipes are open at once
// (HAProxy's maxpipes): past that, bodies are copied through the buffers, so a flood of slow
// clients cannot turn every connection into three descriptors.
const (
	keptPipes = 8
	maxPipes  = 1024
)

var (
	pipes     = make(chan *pipe, keptPipes)
	openPipes atomic.Int64
)

type pipe struct{ r, w int }

// getPipe returns an empty pipe, or nil when maxPipes are open or the process is out of
// descriptors.
func getPipe() *pipe {
	select {
	case p := <-pipes:
		return p
	default:
	}
	if openPipes.Add(1) > maxPipes {
		openPipes.Add(-1)
		return nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		openPipes.Add(-1)
		return nil
	}
	return &pipe{r: fds[0], w: fds[1]}
}

// putPipe keeps an empty pipe for the next round; a pipe that still holds bytes is closed.
func putPipe(p *pipe, empty bool) {
	if empty {
		select {
		case pipes <- p:
			return
		default:
		}
	}
	unix.Close(p.r)
	unix.Close(p.w)
	openPipes.Add(-1)
}

// spliceBody moves up to n body bytes from src's connection to dst's with splice(2). ok is
// false when it moved nothing and cannot (not both plain TCP, bytes buffered on either side, a
// sticky error, no pipe to be had): the caller copies through the buffers instead. On failure
// the error is recorded where the buffered copy records it: dst.Err() for the destination
// (sticky, as a write error is), src.Err() for the source unless it is a timeout.
func spliceBody(dst *Writer, src *Reader, n int64) (moved int64, ok bool, err error) {
	if n < spliceMin || dst.n != 0 || src.r != src.w || dst.err != nil || src.err != nil {
		return 0, false, nil
	}
	dc, dok := plainTCP(dst.wr)
	sc, sok := plainTCP(src.rd)
	if !dok || !sok {
		return 0, false, nil
	}
	drc, err := dc.SyscallConn()
	if err != nil {
		return 0, false, nil
	}
	src2, err := sc.SyscallConn()
	if err != nil {
		return 0, false, nil
	}
	readErr := func(serr error) error {
		return &net.OpError{Op: "read", Net: "tcp", Source: sc.LocalAddr(), Addr: sc.RemoteAddr(), Err: os.NewSyscallError("splice", serr)}
	}

	for moved < n {
		if src.timeout > 0 {
			src.dl.SetReadDeadline(src.pace.deadline(time.Now(), src.timeout))
		}
		p := getPipe()
		if p == nil {
			return moved, moved > 0, nil // the rest through the buffers
		}
		// In: what the source has now, up to a round, without waiting.
		want := int(min(n-moved, spliceRound))
		var in int
		var serr error
		src2.Read(func(fd uintptr) bool {
			in, serr = spliceRetry(int(fd), p.w, want)
			return true
		})
		if serr == unix.EAGAIN {
			// Nothing yet: give the pipe back and wait for data without it.
			putPipe(p, true)
			eof, werr := waitData(src2)
			if werr == nil && eof {
				src.err = io.EOF
				return moved, true, ErrShortBody
			}
			if werr != nil {
				if !isTimeout(werr) {
					src.err = werr
				}
				return moved, true, werr
			}
			continue
		}
		if serr != nil {
			putPipe(p, true) // a failed splice in leaves the pipe as it was: empty
			rerr := readErr(serr)
			src.err = rerr
			return moved, true, rerr
		}
		if in == 0 {
			putPipe(p, true)
			src.err = io.EOF
			return moved, true, ErrShortBody
		}
		src.pace.bytes += int64(in)

		// Out: all of it, waiting for room under the write deadline.
		if dst.timeout > 0 {
			dst.dl.SetWriteDeadline(dst.pace.deadline(time.Now(), dst.timeout))
		}
		for inPipe := in; inPipe > 0; {
			var out int
			werr := drc.Write(func(fd uintptr) bool {
				out, serr = spliceRetry(p.r, int(fd), inPipe)
				return serr != unix.EAGAIN
			})
			if werr == nil && serr != nil {
				werr = &net.OpError{Op: "write", Net: "tcp", Source: dc.LocalAddr(), Addr: dc.RemoteAddr(), Err: os.NewSyscallError("splice", serr)}
			}
			if werr != nil {
				putPipe(p, false)
				dst.err = werr
				return moved, true, werr
			}
			inPipe -= out
			dst.written += int64(out)
			dst.pace.bytes += int64(out)
		}
		putPipe(p, true)
		moved += int64(in)
		spliced.Add(int64(in))
	}
	return moved, true, nil
}

// waitData blocks until c has bytes queued or is at EOF, under c's read deadline, with a
// non-blocking peek: no pipe and no buffer while the source is quiet.
func waitData(c syscall.RawConn) (eof bool, err error) {
	var serr error
	err = c.Read(func(fd uintptr) bool {
		var b [1]byte
		var n int
		for range 8 { // EINTR, bounded
			if n, _, serr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT); serr != syscall.EINTR {
				break
			}
		}
		if serr == syscall.EAGAIN {
			serr = nil
			return false // wait in the poller
		}
		eof = serr == nil && n == 0
		return true
	})
	if err == nil && serr != nil {
		err = &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("recvfrom", serr)}
	}
	return eof, err
}

// RawTCP is a connection wrapper whose reads and writes go straight to a TCP socket (one that
// counts or tracks, never one that buffers or transforms): splice may use the socket under it.
type RawTCP interface{ RawTCP() *net.TCPConn }

func plainTCP(v any) (*net.TCPConn, bool) {
	switch c := v.(type) {
	case *net.TCPConn:
		return c, true
	case RawTCP:
		return c.RawTCP(), true
	}
	return nil, false
}

// spliceRetry is one non-blocking splice(2), again on EINTR (bounded).
func spliceRetry(from, to, n int) (int, error) {
	for range 8 {
		m, err := unix.Splice(from, nil, to, nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if err != unix.EINTR {
			return int(m), err
		}
	}
	return 0, syscall.EINTR
}

func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}
