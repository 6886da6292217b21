package configtest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"syscall"
	"testing"
)

// Ports come from [firstPort, lastPort], below the kernel's ephemeral range (32768-60999 by
// default). A port that bind(":0") handed out and the test released is back in the ephemeral
// pool, where any other process's bind(":0") or outgoing connection may take it before the test
// binds it again; `go test ./...` runs packages as parallel processes, so that happened. Below
// the ephemeral range only an explicit bind can take a port, and other test processes pick at
// random among 12,000.
const firstPort, lastPort = 20000, 32000

var handedOut sync.Map

// Addr is a loopback address ("127.0.0.1:port") on a port that is free now: see AddrOn.
func Addr(t testing.TB) string {
	t.Helper()
	return AddrOn(t, "tcp", "127.0.0.1")
}

// AddrOn returns an address on host ("127.0.0.1" or "::1") on a port that is free now, lies
// outside the kernel's ephemeral range and that this test process never handed out before: a
// test that builds a config with two listeners on one port is refused (they "overlap").
func AddrOn(t testing.TB, network, host string) string {
	t.Helper()
	for range 1000 {
		addr := net.JoinHostPort(host, strconv.Itoa(firstPort+rand.IntN(lastPort-firstPort+1)))
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

// DeadAddr is a loopback address that refuses connections for the whole test: a socket bound to
// it but never listening, so the kernel answers SYN with RST and no other test (or process) can
// start listening there, as could happen on a port Addr released.
func DeadAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
}
