//go:build linux

package l4

import (
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"net"
	"os"
	"runtime"
	"testing"
	"time"
)

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(ents)
}

// TestIdleSpliceHoldsNoPipe: an idle spliced stream costs its two sockets and nothing else. A
// relay direction that waited inside splice(2) would pin a pipe (two more descriptors) per
// direction, so 10,000 idle connections would need 60,000 descriptors instead of 20,000.
func TestIdleSpliceHoldsNoPipe(t *testing.T) {
	// The target echoes with a user-space buffer: its own copy must not splice either.
	tg := startTarget(t, nil, func(c net.Conn) {
		b := make([]byte, 512)
		for {
			n, err := c.Read(b)
			if err != nil {
				return
			}
			if _, err := c.Write(b[:n]); err != nil {
				return
			}
		}
	})
	s := startServer(t, nil, mustState(t, Config{Dialer: &addrDialer{addr: tg.addr}}), Options{})
	settle := func() int { runtime.GC(); runtime.GC(); return openFDs(t) } // pooled pipes are closed by GC
	warm := dial(t, s.Addr().String())
	warm.Write([]byte("w"))
	warm.Read(make([]byte, 1))
	base := settle()
	const n = 40
	before := spliceCopies.Load()
	for range n {
		c := dial(t, s.Addr().String())
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 1)); err != nil { // both directions moved a burst
			t.Fatal(err)
		}
	}
	if spliceCopies.Load() == before {
		t.Fatal("the relay did not take the splice branch")
	}
	// Per connection: the client socket, the proxy's two sockets and the target's socket.
	want := base + 4*n + 4 // slack: a pooled pipe not yet collected
	configtest.WaitFor(t, 10*time.Second, "idle streams to hold no splice pipe", func() bool { return settle() <= want })
}
