//go:build !linux

package l4

import "net"

// spliceReady is a plain ReadFrom outside Linux (no splice, no pipes to pin); nil means EOF.
func spliceReady(dst, src *net.TCPConn) (n int64, eof bool, err error) {
	n, err = dst.ReadFrom(src)
	return n, err == nil, err
}
