// Package porttest hands tests loopback addresses to put listeners on.
package porttest

import (
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"testing"
)

// Ports come from [first, last], below the kernel's ephemeral range (32768-60999 by default).
// A port that bind(":0") handed out and the test released is back in the ephemeral pool, where any
// other process's bind(":0") or outgoing connection may take it before the test binds it again;
// `go test ./...` runs packages as parallel processes, so that happened. Below the ephemeral range
// only an explicit bind can take a port, and other test processes pick at random among 12,000.
const first, last = 20000, 32000

var handedOut sync.Map

// Unused returns a loopback address (host "127.0.0.1" or "::1") on a port that is free now, lies
// outside the kernel's ephemeral range and that this test process never handed out before:
// a test that builds a config with two listeners on one port is refused (they "overlap").
func Unused(t testing.TB, network, host string) string {
	t.Helper()
	for range 1000 {
		addr := net.JoinHostPort(host, strconv.Itoa(first+rand.IntN(last-first+1)))
		if _, seen := handedOut.LoadOrStore(addr, true); seen {
			continue
		}
		ln, err := net.Listen(network, addr)
		if err != nil {
			continue // taken by someone else
		}
		ln.Close()
		return addr
	}
	t.Fatal("no unused loopback port after 1000 tries")
	return ""
}
