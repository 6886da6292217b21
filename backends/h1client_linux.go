package backends

import (
	"crypto/tls"
	"net"
	"syscall"
)

// peekOpen reports whether an idle connection is still open and silent: a non-blocking peek
// finds nothing to read. EOF (the target closed it) or stray bytes both disqualify it.
func peekOpen(c net.Conn) bool {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn() // a close_notify alert is bytes too: closed either way
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	open := false
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		open = err == syscall.EAGAIN
		return true // never wait for readiness
	})
	return err == nil && open
}
