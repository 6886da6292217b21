// Package park keeps idle connections without a goroutine.
//
// A connection waiting for its next request (or a relay direction with nothing to move) would
// otherwise pin a goroutine whose stack the previous request grew, plus whatever that goroutine
// holds. Parked, it costs a slot here and the socket itself: the Poller watches its descriptor
// in an epoll instance of its own (one-shot, so a descriptor reports once), and when bytes or
// EOF arrive it calls the owner's Wake on a fresh goroutine. The Poller also enforces each
// parked connection's deadline (the idle timeout) by calling Expire.
//
// The epoll descriptor itself is registered with the Go runtime's poller, so the Poller's one
// goroutine waits in the runtime like any socket read, without holding an OS thread.
package park

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
)

// Handler is what owns a parked connection. Exactly one of Wake and Expire is called, once,
// unless Unpark took the connection back first.
type Handler interface {
	// Wake is called on a new goroutine when the descriptor is readable (bytes, EOF or an
	// error): the owner has the connection back.
	Wake()
	// Expire is called when the deadline passed or the Poller stopped: the owner must close
	// the connection. It runs on the Poller's goroutine (or Stop's caller) and must not block.
	Expire()
}

// Ticket names one parking, for Unpark.
type Ticket struct {
	slot int32
	gen  uint32
}

type slot struct {
	gen      uint32
	h        Handler // nil: free
	raw      syscall.RawConn
	deadline int64 // unix nanoseconds; 0 = none
}

// Poller parks connections. The zero value is not usable: use New.
type Poller struct {
	ep *os.File
	rc syscall.RawConn

	mu      sync.Mutex
	chunks  [][]slot // fixed-size chunks: growing never copies, and no doubled slack stays touched
	nslots  int32
	free    []int32
	n       int
	next    int64 // when the loop's wait ends for a sweep (unix ns); 0 = no wait bound
	stopped bool

	done chan struct{}
}

// sweepSlack coalesces deadline sweeps: a parked connection may outlive its deadline by this.
const sweepSlack = 50 * time.Millisecond

// New starts a Poller: one goroutine, stopped by Stop.
func New() (*Poller, error) {
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("park: epoll_create1: %w", err)
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("park: nonblocking epoll: %w", err)
	}
	// Non-blocking: os.NewFile registers it with the runtime poller, which reports it
	// readable when one of ours is.
	f := os.NewFile(uintptr(fd), "park-epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("park: epoll raw conn: %w", err)
	}
	p := &Poller{ep: f, rc: rc, done: make(chan struct{})}
	go p.loop()
	return p, nil
}

// ErrStopped is returned by Park once Stop began.
var ErrStopped = errors.New("park: poller stopped")

// Park hands the connection behind raw to the Poller until it is readable or deadline passes
// (zero: no deadline). On error the caller still owns the connection.
func (p *Poller) Park(raw syscall.RawConn, deadline time.Time, h Handler) (Ticket, error) {
	var dl int64
	if !deadline.IsZero() {
		dl = deadline.UnixNano()
	}
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return Ticket{}, ErrStopped
	}
	var i int32
	if k := len(p.free); k > 0 {
		i = p.free[k-1]
		p.free = p.free[:k-1]
	} else {
		i = p.nslots
		if int(i>>chunkShift) == len(p.chunks) {
			p.chunks = append(p.chunks, make([]slot, 1<<chunkShift))
		}
		p.nslots++
	}
	s := p.slot(i)
	s.gen++
	s.h, s.raw, s.deadline = h, raw, dl
	t := Ticket{slot: i, gen: s.gen}
	p.n++
	// Registered under the lock: an event for this slot is handled only after the slot is
	// complete, and Stop cannot run between the check above and the registration.
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: i, Pad: int32(t.gen)}
	if err := p.ctl(raw, syscall.EPOLL_CTL_ADD, &ev); err != nil {
		p.freeLocked(i)
		p.mu.Unlock()
		return Ticket{}, fmt.Errorf("park: epoll_ctl add: %w", err)
	}
	if dl != 0 && (p.next == 0 || dl < p.next) {
		// Under the lock, so a sweep planning a later wake-up cannot overwrite this one.
		p.next = dl
		p.ep.SetReadDeadline(time.Unix(0, dl))
	}
	p.mu.Unlock()
	return t, nil
}

// ctl runs epoll_ctl for the descriptor behind raw. Both descriptors are used through
// Control, which holds them open: a descriptor closed meanwhile is never confused with a
// newer one of the same number.
func (p *Poller) ctl(raw syscall.RawConn, op int, ev *syscall.EpollEvent) error {
	var cerr error
	err := raw.Control(func(fd uintptr) {
		err := p.rc.Control(func(efd uintptr) {
			cerr = syscall.EpollCtl(int(efd), op, int(fd), ev)
		})
		if cerr == nil {
			cerr = err
		}
	})
	if err != nil {
		return err
	}
	return cerr
}

// chunkShift sizes the slot chunks: 256 slots of 48 bytes.
const chunkShift = 8

func (p *Poller) slot(i int32) *slot {
	return &p.chunks[i>>chunkShift][i&(1<<chunkShift-1)]
}

func (p *Poller) freeLocked(i int32) {
	s := p.slot(i)
	s.h, s.raw, s.deadline = nil, nil, 0
	p.free = append(p.free, i)
	p.n--
}

// take removes a parked connection from its slot if t still names it; the caller then owns
// the connection (and its deregistration).
func (p *Poller) take(t Ticket) (Handler, syscall.RawConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t.slot < 0 || t.slot >= p.nslots {
		return nil, nil
	}
	s := p.slot(t.slot)
	if s.gen != t.gen || s.h == nil {
		return nil, nil
	}
	h, raw := s.h, s.raw
	p.freeLocked(t.slot)
	return h, raw
}

// deregister removes the descriptor from the epoll set (a one-shot event only disarms it).
func (p *Poller) deregister(raw syscall.RawConn) {
	p.ctl(raw, syscall.EPOLL_CTL_DEL, &syscall.EpollEvent{})
}

// Unpark takes the connection back before the Poller woke or expired it: true means the
// caller owns it again and neither Wake nor Expire will be called.
func (p *Poller) Unpark(t Ticket) bool {
	h, raw := p.take(t)
	if h == nil {
		return false
	}
	p.deregister(raw)
	return true
}

// Len is the number of parked connections.
func (p *Poller) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// ExpireAll expires every parked connection now (drain) and reports how many it expired.
func (p *Poller) ExpireAll() int {
	return p.expire(func(*slot) bool { return true })
}

// ExpireExcept expires every parked connection now but those keep selects, whose deadline is
// brought forward to by (if later): a drain that closes idle keep-alive connections at once but
// gives a connection accepted a moment ago a short grace for its first request.
func (p *Poller) ExpireExcept(keep func(Handler) bool, by time.Time) int {
	dl := by.UnixNano()
	n := p.expire(func(s *slot) bool {
		if !keep(s.h) {
			return true
		}
		if s.deadline == 0 || s.deadline > dl {
			s.deadline = dl
		}
		return false
	})
	p.mu.Lock()
	if !p.stopped && p.n > 0 && (p.next == 0 || dl < p.next) {
		p.next = dl
		p.ep.SetReadDeadline(time.Unix(0, dl))
	}
	p.mu.Unlock()
	return n
}

// expire takes the parked connections match selects, deregisters them and calls Expire.
func (p *Poller) expire(match func(*slot) bool) int {
	var hs []Handler
	var raws []syscall.RawConn
	p.mu.Lock()
	for i := range p.nslots {
		s := p.slot(i)
		if s.h != nil && match(s) {
			hs = append(hs, s.h)
			raws = append(raws, s.raw)
			p.freeLocked(int32(i))
		}
	}
	p.mu.Unlock()
	for i, h := range hs {
		p.deregister(raws[i])
		h.Expire()
	}
	return len(hs)
}

// Stop ends the Poller: it expires every parked connection and waits for its goroutine.
// Park fails from now on.
func (p *Poller) Stop() {
	p.mu.Lock()
	if !p.stopped {
		p.stopped = true
		p.ep.SetReadDeadline(time.Unix(1, 0)) // wakes the loop, which sees stopped
	}
	p.mu.Unlock()
	<-p.done
}

func (p *Poller) loop() {
	defer close(p.done)
	defer func() {
		p.ExpireAll()
		p.ep.Close()
	}()
	events := make([]syscall.EpollEvent, 128)
	for {
		var n int
		var werr error
		err := p.rc.Read(func(fd uintptr) bool {
			n, werr = syscall.EpollWait(int(fd), events, 0)
			if werr == syscall.EINTR {
				n, werr = 0, nil
				return true
			}
			return n > 0 || werr != nil // none ready: wait in the runtime poller
		})
		p.mu.Lock()
		stopped := p.stopped
		p.mu.Unlock()
		if stopped {
			return
		}
		switch {
		case err == nil && werr == nil:
			for _, ev := range events[:n] {
				if h, raw := p.take(Ticket{slot: ev.Fd, gen: uint32(ev.Pad)}); h != nil {
					p.deregister(raw)
					go h.Wake()
				}
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
			p.sweep()
		default:
			// The epoll descriptor failed: nothing can be watched any more. Expire
			// everything (the deferred ExpireAll) and refuse new parkings.
			p.mu.Lock()
			p.stopped = true
			p.mu.Unlock()
			return
		}
	}
}

// sweep expires the connections whose deadline passed and plans the next sweep.
func (p *Poller) sweep() {
	now := time.Now().UnixNano()
	p.expire(func(s *slot) bool { return s.deadline != 0 && s.deadline <= now })
	p.mu.Lock()
	var next int64
	for i := range p.nslots {
		if s := p.slot(i); s.h != nil && s.deadline != 0 && (next == 0 || s.deadline < next) {
			next = s.deadline
		}
	}
	if next != 0 && next < now+int64(sweepSlack) {
		next = now + int64(sweepSlack)
	}
	p.next = next
	switch {
	case p.stopped: // Stop's deadline stands
	case next == 0:
		p.ep.SetReadDeadline(time.Time{})
	default:
		p.ep.SetReadDeadline(time.Unix(0, next))
	}
	p.mu.Unlock()
}
