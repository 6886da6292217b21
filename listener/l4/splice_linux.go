//go:build linux

package l4

import (
	"io"
	"net"
	"syscall"
	"unsafe"
)

// spliceReady moves what src has queued to dst with splice(2), without holding a splice pipe
// while src is quiet.
//
// The runtime's splice takes a pipe (two descriptors, up to 1 MiB of kernel buffer) from its
// pool for the whole of a ReadFrom call, including the time it waits for src to become
// readable. An unbounded ReadFrom on an idle stream therefore pins two pipes per connection
// (six descriptors instead of two): 10,000 idle connections would need 60,000 descriptors. So
// each round first waits for data with no pipe (the poller, under src's read deadline), asks
// the kernel how many bytes are queued (FIONREAD), and splices exactly that many: the splice
// never waits for more input, and the pipe goes back to the pool when the burst is moved. A
// round that waits on a slow dst still holds its pipe, which then holds data in flight.
func spliceReady(dst, src *net.TCPConn) (n int64, eof bool, err error) {
	avail, err := waitData(src)
	if err != nil {
		return 0, false, err
	}
	if avail == 0 {
		return 0, true, nil // readable with nothing queued: the peer's FIN
	}
	lr := io.LimitedReader{R: src, N: avail}
	n, err = dst.ReadFrom(&lr) // still splice(2): net unwraps an *io.LimitedReader
	return n, err == nil && lr.N > 0, err
}

// waitData blocks until c has bytes queued or is at EOF (0), under c's read deadline.
func waitData(c *net.TCPConn) (int64, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var avail int64
	var serr error
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		var n int
		var e error
		for range 8 { // EINTR: retry a few times; it does not happen with MSG_DONTWAIT in practice
			if n, _, e = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT); e != syscall.EINTR {
				break
			}
		}
		switch {
		case e == syscall.EAGAIN:
			return false // wait for readability in the poller
		case e != nil:
			serr = e
			return true
		case n == 0:
			avail = 0 // EOF
			return true
		}
		var q int32
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&q))); errno != 0 {
			serr = errno
			return true
		}
		avail = max(int64(q), 1)
		return true
	})
	if err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: serr}
	}
	return avail, nil
}
