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

// pipes is a free list of empty pipes. Not a sync.Pool: a pipe is two descriptors, and a pool
// that drops an entry would leak them. Past its capacity a pipe is closed.
var pipes = make(chan *pipe, 256)

type pipe struct{ r, w int }

func getPipe() (*pipe, error) {
	select {
	case p := <-pipes:
		return p, nil
	default:
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	return &pipe{r: fds[0], w: fds[1]}, nil
}

// putPipe keeps an empty pipe for the next body; a pipe that still holds bytes is closed.
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
}

// spliceBody moves up to n body bytes from src's connection to dst's with splice(2). ok is
// false when it cannot (not both plain TCP, bytes buffered on either side, a sticky error, no
// descriptor for a pipe): the caller copies through the buffers instead. On failure the error
// is recorded where the buffered copy records it: dst.Err() for the destination (sticky, as a
// write error is), src.Err() for the source unless it is a timeout.
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
	p, err := getPipe()
	if err != nil {
		return 0, false, nil // out of descriptors: the buffered copy still works
	}
	inPipe := 0
	defer func() { putPipe(p, inPipe == 0) }()

	for moved < n {
		// In: what the source has, up to a round, waiting for it under the read deadline.
		if src.timeout > 0 {
			src.dl.SetReadDeadline(src.pace.deadline(time.Now(), src.timeout))
		}
		want := int(min(n-moved, spliceRound))
		var in int
		var serr error
		rerr := src2.Read(func(fd uintptr) bool {
			in, serr = spliceRetry(int(fd), p.w, want)
			return serr != unix.EAGAIN
		})
		if rerr == nil && serr != nil {
			rerr = &net.OpError{Op: "read", Net: "tcp", Source: sc.LocalAddr(), Addr: sc.RemoteAddr(), Err: os.NewSyscallError("splice", serr)}
		}
		if rerr != nil {
			if !isTimeout(rerr) {
				src.err = rerr
			}
			return moved, true, rerr
		}
		if in == 0 {
			src.err = io.EOF
			return moved, true, ErrShortBody
		}
		inPipe = in
		src.pace.bytes += int64(in)

		// Out: all of it, waiting for room under the write deadline.
		if dst.timeout > 0 {
			dst.dl.SetWriteDeadline(dst.pace.deadline(time.Now(), dst.timeout))
		}
		for inPipe > 0 {
			var out int
			werr := drc.Write(func(fd uintptr) bool {
				out, serr = spliceRetry(p.r, int(fd), inPipe)
				return serr != unix.EAGAIN
			})
			if werr == nil && serr != nil {
				werr = &net.OpError{Op: "write", Net: "tcp", Source: dc.LocalAddr(), Addr: dc.RemoteAddr(), Err: os.NewSyscallError("splice", serr)}
			}
			if werr != nil {
				dst.err = werr
				return moved, true, werr
			}
			inPipe -= out
			dst.written += int64(out)
			dst.pace.bytes += int64(out)
		}
		moved += int64(in)
		spliced.Add(int64(in))
	}
	return moved, true, nil
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
