package conformance

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// The memory an idle connection costs a real Fulcrum process: thousands of connections that
// were each served (one request, or one byte both ways through a TCP relay) and then left
// open, while other connections keep carrying load. Measured as the growth of the process's
// proportional set size (what the side-by-side bench reports), per idle connection. Memory,
// not timing, is asserted; the bounds are the product's targets, which the parked design
// meets with room (about 2.6, 9 and 1-2 KiB in the bench) and the goroutine-per-connection
// design did not (16.8, 35.7 and 8.9).
//
// Not under the race detector (make test runs it in the memory step): the client side of
// 10,000 connections is too slow there, and Fulcrum is built without it anyway.

const (
	idleConnsWanted = 10000
	h1IdleBudgetKiB = 4.0
	tlsIdleBudget   = 15.0
	// The target: 4 KiB per idle relay. Parked relays measure 3.5-3.7 KiB here (4.1-4.2 while
	// they kept a watchdog timer and a fuller record): two sockets, for which the runtime keeps
	// ~0.57 KiB per descriptor off-heap, and ~1.5 KiB of live heap that the GC's headroom
	// doubles. Goroutines per relay cost 8.9+ KiB.
	tcpIdleBudget = 4.0
)

func TestIdleMemory(t *testing.T) {
	if raceEnabled {
		t.Skip("memory bounds run without the race detector (make test's memory step)")
	}
	if testing.Short() {
		t.Skip("opens 10,000 connections per kind")
	}
	n := raiseNoFile(t, 2*idleConnsWanted+1000)
	t.Run("h1", func(t *testing.T) { idleMemory(t, "http", n, h1IdleBudgetKiB) })
	// Fewer TLS connections: the handshakes dominate the test's time, not the per-connection
	// figure.
	t.Run("tls", func(t *testing.T) { idleMemory(t, "https", min(n, 5000), tlsIdleBudget) })
	t.Run("tcp", func(t *testing.T) { idleMemory(t, "tcp", n, tcpIdleBudget) })
}

// raiseNoFile raises this process's descriptor limit (Fulcrum inherits it) and returns how
// many idle connections fit: each takes a descriptor on both sides of every hop in this
// process (client and, for relays, target) and up to two in Fulcrum.
func raiseNoFile(t *testing.T, want uint64) int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max < want {
		up := syscall.Rlimit{Cur: want, Max: want} // root may raise the hard limit
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up) == nil {
			lim = up
		}
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	n := min(idleConnsWanted, int(lim.Cur-500)/2)
	if n < 1000 {
		t.Skipf("descriptor limit %d leaves room for only %d idle connections", lim.Cur, n)
	}
	return n
}

// pssKiB is the process's proportional set size.
func pssKiB(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "Pss:" {
			v, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatalf("no Pss line in smaps_rollup:\n%s", b)
	return 0
}

// echoTarget answers every byte it reads on a connection's first read with the same bytes,
// then (for the idle relays) holds the connection without a goroutine; load connections get
// a goroutine that echoes until EOF.
type echoTarget struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newEchoTarget(t *testing.T) *echoTarget {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &echoTarget{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				buf := make([]byte, 512)
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				n, err := c.Read(buf)
				if err != nil {
					c.Close()
					return
				}
				c.Write(buf[:n])
				if buf[0] == 'L' { // a load connection: echo on
					c.SetReadDeadline(time.Time{})
					io.Copy(c, c)
					c.Close()
					return
				}
				e.mu.Lock()
				e.conns = append(e.conns, c)
				e.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		e.mu.Lock()
		for _, c := range e.conns {
			c.Close()
		}
		e.mu.Unlock()
	})
	return e
}

// echoAll makes the held connections echo again (one goroutine each), for the check that idle
// relays still carry bytes.
func (e *echoTarget) echoAll() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range e.conns {
		c.SetReadDeadline(time.Time{})
		go io.Copy(c, c)
	}
}

// okTarget is a minimal HTTP target.
func okTarget(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	}), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func idleMemory(t *testing.T, kind string, n int, budgetKiB float64) {
	addr := configtest.Addr(t)
	var cfg string
	var tg *echoTarget
	switch kind {
	case "tcp":
		tg = newEchoTarget(t)
		cfg = fmt.Sprintf(`
[[target_groups]]
name = "echo"
protocol = "tcp"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "relay"
style = "network"
protocol = "tcp"
address = %q
forward = "echo"
idle_timeout = "300s"
`, tg.ln.Addr().String(), addr)
	default:
		tls := ""
		if kind == "https" {
			tls = `certificates = ["site"]` + "\n" + `tls_policy = "tls13"` + "\n" + `http2 = false`
		}
		cfg = fmt.Sprintf(`
[[authorities]]
name = "ca"
common_name = "Idle CA"

[[certificates]]
name = "site"
domains = ["localhost", "127.0.0.1"]
authority = "ca"

[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "web"
style = "application"
protocol = %q
address = %q
%s
idle_timeout = "300s"
default_action = { forward = "be" }
`, okTarget(t), kind, addr, tls)
	}
	// One core, as the side-by-side bench runs every proxy: the figures compare with its.
	t.Setenv("GOMAXPROCS", "1")
	p := startFulcrum(t, cfg)
	pid := p.cmd.Process.Pid

	tcfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, // loopback, own CA
		CurvePreferences: []tls.CurveID{tls.X25519}, NextProtos: []string{"http/1.1"}} // as the bench's idleconns
	open := func() (net.Conn, error) {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if kind == "https" {
			tc := tls.Client(c, tcfg)
			if err := tc.Handshake(); err != nil {
				c.Close()
				return nil, err
			}
			c = tc
		}
		return c, nil
	}
	// once makes c carry one exchange: a request and its whole response, or a byte each way.
	once := func(c net.Conn, load bool) error {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		defer c.SetDeadline(time.Time{})
		if kind == "tcp" {
			b := []byte{'x'}
			if load {
				b[0] = 'L'
			}
			if _, err := c.Write(b); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, b); err != nil {
				return err
			}
			return nil
		}
		if _, err := io.WriteString(c, "GET /idle HTTP/1.1\r\nHost: idle.test\r\n\r\n"); err != nil {
			return err
		}
		resp, err := http.ReadResponse(bufio.NewReaderSize(c, 1024), nil)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Close {
			return fmt.Errorf("status %d close=%v", resp.StatusCode, resp.Close)
		}
		return nil
	}

	// Warm up (pools, session caches, first handshakes), then the baseline.
	for range 16 {
		c, err := open()
		if err != nil {
			t.Fatal(err)
		}
		for range 20 {
			if err := once(c, true); err != nil {
				t.Fatalf("warm-up: %v", err)
			}
			if kind == "tcp" {
				break
			}
		}
		c.Close()
	}
	time.Sleep(time.Second) // let the warm-up connections end and settle, as the bench does
	base := pssKiB(t, pid)

	// Load on other connections for the whole measurement.
	stop := make(chan struct{})
	var loadOK, loadErr atomic.Int64
	var lwg sync.WaitGroup
	for range 4 {
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			c, err := open()
			if err != nil {
				loadErr.Add(1)
				return
			}
			defer c.Close()
			if kind == "tcp" && once(c, true) != nil {
				loadErr.Add(1)
				return
			}
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := once(c, false); err != nil {
					loadErr.Add(1)
					return
				}
				loadOK.Add(1)
			}
		}()
	}
	stopLoad := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		lwg.Wait()
	}
	defer stopLoad()

	// The idle connections, 64 dialers at a time like the bench's idleconns.
	conns := make([]net.Conn, n)
	var next, fails atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := open()
				if err == nil {
					if err = once(c, false); err != nil {
						c.Close()
					}
				}
				if err != nil {
					fails.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	if f := fails.Load(); f > 0 {
		t.Fatalf("%d of %d idle connections failed; first: %v", f, n, firstErr.Load())
	}
	// Idle connections park after a short grace; the bench samples 3 s after they are open.
	time.Sleep(2 * time.Second)
	after := pssKiB(t, pid)
	fds := p.openFDs()
	goroutines := p.metric("go_goroutines")
	heap, stacks := p.metric("go_memstats_heap_inuse_bytes"), p.metric("go_memstats_stack_inuse_bytes")
	stopLoad()
	if e := loadErr.Load(); e > 0 || loadOK.Load() == 0 {
		t.Fatalf("load connections: %d exchanges, %d failed", loadOK.Load(), e)
	}
	if fds < n {
		t.Fatalf("Fulcrum has %d descriptors open, fewer than the %d idle connections", fds, n)
	}

	// The idle connections still work: a sample of them carries another exchange.
	if tg != nil {
		tg.echoAll()
	}
	for i := 0; i < n; i += n / 100 {
		if err := once(conns[i], false); err != nil {
			t.Fatalf("idle connection %d after the measurement: %v", i, err)
		}
	}

	per := float64(after-base) / float64(n)
	t.Logf("%s: %d idle connections: PSS %d -> %d KiB, %.2f KiB per connection (budget %.1f); load carried %d exchanges meanwhile; "+
		"Fulcrum then had %.0f goroutines, %.1f MiB heap and %.1f MiB stacks in use",
		kind, n, base, after, per, budgetKiB, loadOK.Load(), goroutines, heap/(1<<20), stacks/(1<<20))
	if per > budgetKiB {
		t.Errorf("%s: %.2f KiB per idle connection, over the %.1f KiB budget", kind, per, budgetKiB)
	}
}
