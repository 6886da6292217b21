// Package porttest hands tests loopback addresses to put listeners on.
package porttest

import (
	"net"
	"sync"
	"testing"
)

var handedOut sync.Map

// Unused returns a loopback address (host "127.0.0.1" or "::1") whose port the kernel just gave
// out and this test process never handed out before: released ports come back quickly, and a
// test that builds a config with two listeners on one port is refused (they "overlap").
func Unused(t testing.TB, network, host string) string {
	t.Helper()
	for range 100 {
		ln, err := net.Listen(network, net.JoinHostPort(host, "0"))
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if _, seen := handedOut.LoadOrStore(addr, true); !seen {
			return addr
		}
	}
	t.Fatal("no unused loopback port after 100 tries")
	return ""
}
