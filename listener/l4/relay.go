package l4

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/inbound"
	"github.com/fulcrum-lb/fulcrum/listener/park"
)

// parkGrace is how long a direction waits for bytes on its own goroutine before it parks: a
// stream in use never waits that long between bursts.
const parkGrace = 50 * time.Millisecond

// The relay moves bytes both ways until both directions saw EOF, one failed, or nothing moved
// for the idle timeout.
//
// Zero copy: when both ends of a direction are *net.TCPConn, the direction waits for data
// without a pipe and then calls (*net.TCPConn).ReadFrom on exactly the queued bytes, which the
// runtime turns into splice(2) through a pooled pipe (spliceReady: an idle stream pins no pipe).
// The copy is invisible until it returns, so idle detection works on coarse return points
// instead of per-read bookkeeping:
//   - each direction arms a read deadline one tick ahead on its source; when it fires the copy
//     returns with the bytes it moved, the direction records progress and re-arms (a read
//     timeout inside splice leaves the pipe empty, so resuming loses nothing);
//   - no write deadline is ever set while a copy may resume: a write timeout inside splice
//     would drop the bytes still in the pipe;
//   - a per-connection watchdog closes both ends when no direction reported progress for
//     IdleTimeout+tick: this catches both directions blocked writing to peers that do not read.
//     A direction that is writing very slowly reports progress after each pipe-full (1 MiB)
//     pumped, so a stream slower than ~1 MiB per IdleTimeout counts as idle.
//
// An idle connection therefore closes between IdleTimeout and IdleTimeout+tick after its last
// byte (tick = IdleTimeout/8, at most 30s).
//
// Parking: a direction whose source carried nothing for parkGrace (and whose source is a
// socket, or TLS straight over one) gives its source to the Handler's parking poller and ends
// its goroutine, returning any copy buffer first; bytes or EOF on the source start a fresh
// goroutine that carries on. An idle relay then holds no goroutine at all, and no timer either:
// the direction that parks second drops the watchdog and parks with the relay's idle deadline,
// which the poller enforces; a direction that wakes arms a new watchdog.

var errIdle = errors.New("l4: idle timeout")

// spliceCopies counts entries into the TCP->TCP ReadFrom branch (tests check the zero-copy
// branch is taken; strace shows the kernel then uses splice).
var spliceCopies atomic.Uint64

type relay struct {
	idle, tick time.Duration
	last       atomic.Int64 // monotonic nanoseconds (since epoch) of the last observed progress
	aborted    atomic.Bool
	idleClosed atomic.Bool
	client     net.Conn                   // as accepted (TLS in ModeTLS): abort closes it; halves[1].src is the upstream
	watchdog   atomic.Pointer[time.Timer] // nil while both directions are parked

	parker *park.Poller // nil: directions wait on their goroutines
	mu     sync.Mutex   // guards the halves' parked/ticket against abort
	halves [2]half      // client->upstream, upstream->client
	// running counts the directions still going; the atomic decrement orders each
	// direction's writes before end.
	running atomic.Int32
	end     relayEnd
}

// relayEnd is told once, by the direction that ends last, what moved (up is
// client->upstream).
type relayEnd interface {
	relayEnded(up, down int64, idle bool, err error)
}

// relayEpoch is the origin of relay.last: one for the process, so relays do not store their own.
var relayEpoch = time.Now()

func (r *relay) now() int64 { return int64(time.Since(relayEpoch)) }

// abort closes both ends so every blocked copy returns, and ends the parked directions.
func (r *relay) abort() {
	if !r.aborted.CompareAndSwap(false, true) {
		return
	}
	var taken [2]*half
	r.mu.Lock()
	for i := range r.halves {
		if h := &r.halves[i]; h.parked && r.parker.Unpark(h.ticket) {
			h.parked = false
			taken[i] = h
		}
	}
	r.mu.Unlock()
	r.client.Close()
	r.halves[1].src.Close() // the upstream
	for _, h := range taken {
		if h != nil {
			h.end(nil)
		}
	}
}

func (r *relay) watch() {
	if r.aborted.Load() {
		return
	}
	quiet := time.Duration(r.now() - r.last.Load())
	if quiet >= r.idle+r.tick {
		r.idleClosed.Store(true)
		r.abort()
		return
	}
	if t := r.watchdog.Load(); t != nil {
		t.Reset(r.idle + r.tick - quiet)
	}
}

// other is the opposite direction of h.
func (r *relay) other(h *half) *half {
	if h == &r.halves[0] {
		return &r.halves[1]
	}
	return &r.halves[0]
}

// half is one direction.
type half struct {
	r   *relay
	src net.Conn
	dst net.Conn
	// viaWrapper: src is a PROXY-protocol conn whose buffer may hold client bytes; read once
	// through it (with a buffer >= inbound.ReadBufferSize), then read its socket directly.
	viaWrapper bool
	counter    *atomic.Uint64
	moved      int64

	err    error           // why the direction ended; read by the relay's finish
	bp     *[]byte         // the copy buffer (user-space copies), nil while splicing or parked
	parked bool            // under r.mu
	ticket park.Ticket     // under r.mu, valid while parked
	noPark bool            // parking failed once: wait on the goroutine from now on
	raw    syscall.RawConn // src's socket, for parking (src no longer changes once it parks)
}

// serve runs the direction on the calling goroutine until it ends or parks.
func (h *half) serve() {
	if ended, err := h.run(); ended {
		h.end(err)
	}
}

func (h *half) end(err error) {
	if h.bp != nil {
		bufPool.Put(h.bp)
		h.bp = nil
	}
	h.err = err
	h.r.finish()
}

// finish is called once by each direction as it ends; the last one ends the relay.
func (r *relay) finish() {
	if r.running.Add(-1) != 0 {
		return
	}
	r.aborted.Store(true) // the watchdog must neither act nor re-arm from now on
	if t := r.watchdog.Load(); t != nil {
		t.Stop()
	}
	up, down := &r.halves[0], &r.halves[1]
	r.end.relayEnded(up.moved, down.moved, r.idleClosed.Load(), errors.Join(up.err, down.err))
}

// Wake implements park.Handler: the source has bytes or EOF.
func (h *half) Wake() {
	r := h.r
	r.mu.Lock()
	h.parked = false
	if r.watchdog.Load() == nil && !r.aborted.Load() {
		// Both were parked: a running direction needs the watchdog again (it may block
		// writing to a peer that does not read, where no deadline of ours would fire).
		quiet := time.Duration(r.now() - r.last.Load())
		r.watchdog.Store(time.AfterFunc(max(r.idle+r.tick-quiet, 0), r.watch))
	}
	r.mu.Unlock()
	h.serve()
}

// Expire implements park.Handler: the relay's idle deadline passed while this direction was
// parked, or the poller stopped (the Handler closes).
func (h *half) Expire() {
	r := h.r
	r.mu.Lock()
	h.parked = false
	r.mu.Unlock()
	if time.Duration(r.now()-r.last.Load()) >= r.idle+r.tick {
		r.idleClosed.Store(true)
	} else if h.park() {
		// Not idle: the other direction woke and moved bytes after this one parked with the
		// deadline. Parked again (without it while the other runs); a stopped poller refuses.
		return
	}
	r.abort()
	h.end(nil)
}

// parkable returns the socket a direction can park on: its source when that is a socket, or
// TLS straight over one; nil otherwise (a PROXY wrapper may buffer what the socket no longer
// shows).
func parkable(c net.Conn) syscall.RawConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// park hands the source to the poller; false when it cannot (the direction waits on).
func (h *half) park() bool {
	r := h.r
	if r.parker == nil || h.noPark || h.viaWrapper {
		h.noPark = true
		return false
	}
	if h.raw == nil {
		if h.raw = parkable(h.src); h.raw == nil {
			h.noPark = true
			return false
		}
	}
	raw := h.raw
	if h.bp != nil {
		bufPool.Put(h.bp) // a parked direction holds no buffer
		h.bp = nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.aborted.Load() {
		return false // the copy sees aborted and returns
	}
	// The second direction to park takes over the watchdog's job: it parks with the relay's
	// idle deadline and the timer goes, so an idle relay keeps none (TestIdleMemory).
	both := r.other(h).parked
	var deadline time.Time
	if both {
		deadline = relayEpoch.Add(time.Duration(r.last.Load()) + r.idle + r.tick)
	}
	t, err := r.parker.Park(raw, deadline, h)
	if err != nil {
		h.noPark = true
		return false
	}
	// Under r.mu: abort (which sets aborted before it locks) finds the ticket, and Wake waits
	// for it to be recorded before it clears parked.
	h.parked, h.ticket = true, t
	if both {
		if w := r.watchdog.Swap(nil); w != nil {
			w.Stop()
		}
	}
	return true
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// run copies src to dst until EOF (then half-closes dst), an error or idleness (ended), or
// until it parks (not ended: Wake carries on).
func (h *half) run() (ended bool, err error) {
	defer func() {
		if err != nil {
			h.r.abort()
		}
	}()
	for {
		wait := h.r.tick
		if h.r.parker != nil && !h.noPark && parkGrace < wait {
			wait = parkGrace
		}
		deadline := time.Now().Add(wait)
		if err := h.src.SetReadDeadline(deadline); err != nil {
			return true, err
		}
		var n int64
		var cerr error
		eof := false
		sr, okr := h.src.(*net.TCPConn)
		sw, okw := h.dst.(*net.TCPConn)
		if okr && okw && !h.viaWrapper {
			spliceCopies.Add(1)
			n, eof, cerr = spliceReady(sw, sr) // splice(2) of what is queued, see splice_linux.go
			if n > 0 {
				h.progress(n)
			}
		} else {
			if h.bp == nil {
				h.bp = bufPool.Get().(*[]byte)
			}
			n, eof, cerr = h.copyBuffered(*h.bp, deadline, wait)
			if h.viaWrapper && n > 0 {
				h.viaWrapper = false
				h.src = inbound.Socket(h.src) // nothing buffered any more: splice may follow
				if _, ok := h.dst.(*net.TCPConn); ok {
					bufPool.Put(h.bp) // splice from now on: an idle stream keeps no buffer
					h.bp = nil
				}
				continue
			}
		}
		if eof {
			closeWrite(h.dst)
			return true, nil
		}
		if h.r.aborted.Load() {
			return true, nil // the other direction or the watchdog ended the relay
		}
		if cerr == nil {
			continue // a burst moved (spliceReady): wait for the next one
		}
		if errors.Is(cerr, os.ErrDeadlineExceeded) {
			if time.Duration(h.r.now()-h.r.last.Load()) >= h.r.idle {
				h.r.idleClosed.Store(true)
				return true, errIdle
			}
			if n == 0 && h.park() {
				return false, nil
			}
			continue
		}
		return true, cerr
	}
}

func (h *half) progress(n int64) {
	h.moved += n
	h.counter.Add(uint64(n))
	h.r.last.Store(h.r.now())
}

// copyBuffered is the user-space copy (TLS on either side, or the first read through the
// PROXY layer). It returns on EOF, error, or after the first read when viaWrapper is set. The
// read deadline is refreshed at most once per half tick, and the shared counters are updated
// at the same points, so the per-read cost stays a clock read.
func (h *half) copyBuffered(buf []byte, deadline time.Time, wait time.Duration) (n int64, eof bool, err error) {
	if h.viaWrapper && len(buf) < inbound.ReadBufferSize {
		panic("l4: copy buffer smaller than the PROXY header buffer")
	}
	var pending int64
	defer func() {
		if pending > 0 {
			h.progress(pending)
		}
	}()
	refresh := deadline.Add(-wait / 2)
	for {
		nr, rerr := h.src.Read(buf)
		if nr > 0 {
			nw, werr := h.dst.Write(buf[:nr])
			n += int64(nw)
			pending += int64(nw)
			if werr != nil {
				return n, false, werr
			}
			if h.viaWrapper {
				return n, false, nil
			}
			if now := time.Now(); now.After(refresh) {
				h.progress(pending)
				pending = 0
				deadline = now.Add(wait)
				refresh = now.Add(wait / 2)
				if err := h.src.SetReadDeadline(deadline); err != nil {
					return n, false, err
				}
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return n, true, nil
			}
			return n, false, rerr
		}
	}
}

type closeWriter interface{ CloseWrite() error }

// closeWrite half-closes c: close_notify for TLS, then FIN on the socket below.
func closeWrite(c net.Conn) {
	switch v := c.(type) {
	case *tls.Conn:
		_ = v.CloseWrite()
		closeWrite(v.NetConn())
	case closeWriter:
		_ = v.CloseWrite()
	default:
		if s := inbound.Socket(c); s != c {
			closeWrite(s)
		}
	}
}

// startRelay runs both directions of r (the caller's, zero), each on a goroutine of its own,
// and returns at once; the direction that ends last tells end what moved.
//
// Neither direction runs on the goroutine that accepted and set up the connection: that one
// has grown its stack in the dial and the TLS handshake (8 KiB), and an idle relay would pin it
// for as long as the connection lives. Fresh goroutines need half that, and they park when the
// connection goes quiet.
func startRelay(r *relay, st *State, parker *park.Poller, client, clientSrc, upstream net.Conn, viaWrapper bool, in, out *atomic.Uint64,
	end relayEnd) {
	*r = relay{idle: st.cfg.IdleTimeout, tick: st.tick, client: client, parker: parker, end: end}
	r.last.Store(r.now())
	r.halves[0] = half{r: r, src: clientSrc, dst: upstream, viaWrapper: viaWrapper, counter: in}
	// Writes to the client go to the socket under the PROXY layer (the header is consumed).
	r.halves[1] = half{r: r, src: upstream, dst: inbound.Socket(client), counter: out}
	r.running.Store(2)
	r.watchdog.Store(time.AfterFunc(r.idle+r.tick, r.watch))
	go r.halves[0].serve()
	go r.halves[1].serve()
}
