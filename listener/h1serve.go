package listener

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/h1"
	"github.com/fulcrum-lb/fulcrum/router"
)

// The HTTP/1 engine: one goroutine per client connection reads a head, classifies, routes,
// picks, writes to the target, reads the response head, rewrites it and writes it with the first
// body bytes in one write. Between requests a connection holds no buffer: it waits for
// readability on the socket itself (plain TCP) and takes pooled buffers only when bytes arrive.

// session states, for Shutdown: an idle session may be woken and closed; an active one finishes
// its request and closes.
const (
	sessIdle int32 = iota
	sessActive
	sessClosed
	sessFresh // idle before its first request: a drain leaves it its grace (drainFirstGrace)
)

// h1Session is one client connection. Pooled: a warm session serves a request without
// allocating.
type h1Session struct {
	srv    *httpServer
	c      net.Conn
	raw    syscall.RawConn // plain TCP only: wait for readability without a buffer
	tls    *tls.Conn
	client netip.AddrPort
	state  atomic.Int32

	rd   h1.Reader
	wr   h1.Writer
	req  h1.Request
	resp h1.Response
	out  h1.Outgoing
	rout h1.ResponseOut
	tr   h1.Reader // the target's side of the exchange
	tw   h1.Writer
	// Raw system calls for plain TCP sockets (h1.Raw), one per reader and writer; their
	// callbacks are made once per pooled session.
	rawRd, rawWr, rawTr, rawTw h1.Raw
	path                       []byte // the decoded path, for routing
	rec                        RequestRecord

	extra [1]router.HeaderValue // Set-Cookie for stickiness

	upload chan error            // the running upload's result (exchange), nil when none
	linger bool                  // the client may still be sending: close with lingerClose
	tmu    sync.Mutex            // guards tconn (per session: contended only by a forced close)
	tconn  net.Conn              // the target connection in use, for abort
	held   heldTarget            // acquired for the exchange in progress; released once (heldTarget.release)
	peek   func(fd uintptr) bool // waitReadable's poller callback, made once per pooled session

	waitFor   time.Duration // waitReadable's limit, armed by peek when the read finds nothing
	waitArmed bool
}

var sessionPool = sync.Pool{New: func() any { return new(h1Session) }}

// serveH1 serves c until it closes or parks, on the connection's goroutine. done is the door's:
// it is called once c is closed, whether by this goroutine or by a parked connection's end.
func (srv *httpServer) serveH1(c net.Conn, done func()) {
	var client netip.AddrPort
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil { // the PROXY header's client
		client = ap
	}
	srv.runH1(c, done, client, true, false)
}

// parkGrace is how long a connection waits for its next request on its own goroutine before
// it parks (park package): long enough that a keep-alive client under load never parks, short
// enough that idle connections soon stop holding a goroutine and a grown stack.
const parkGrace = 50 * time.Millisecond

// runH1 serves c until it closes (then closes it and calls done) or parks. first: no request
// was read yet. woken: the connection comes back from parking, with bytes (or EOF) to read.
func (srv *httpServer) runH1(c net.Conn, done func(), client netip.AddrPort, first, woken bool) {
	s := sessionPool.Get().(*h1Session)
	s.srv, s.c = srv, c
	s.state.Store(sessActive)
	s.tls, _ = c.(*tls.Conn)
	if tc, ok := c.(*net.TCPConn); ok {
		s.raw, _ = tc.SyscallConn()
	}
	s.client = client
	if s.raw != nil {
		tc := c.(*net.TCPConn) // s.raw is set for plain TCP only
		s.rawRd.Set(tc, s.raw)
		s.rawWr.Set(tc, s.raw)
		s.rd.ResetRaw(&s.rawRd)
		s.wr.ResetRaw(&s.rawWr)
	} else {
		s.rd.Reset(c)
		s.wr.Reset(c)
	}
	if !srv.track(s) {
		c.Close()
		s.release()
		done()
		return
	}
	parked := false
	defer func() {
		if s.linger && !parked {
			s.lingerClose() // still tracked: a forced close cuts it short
		}
		srv.untrack(s)
		if !parked {
			c.Close()
			done()
		}
		s.release()
	}()
	for {
		st := srv.state.Load()
		cfg := st.cfg
		if len(s.rd.Buffered()) == 0 && !woken {
			// Idle: give the buffers back and wait for the next request without one.
			s.rd.Release()
			s.wr.Release()
			wait := cfg.IdleTimeoutDuration()
			idle := sessIdle
			if first {
				wait = cfg.HeaderTimeoutDuration()
				idle = sessFresh
				if by := srv.firstBy(); !by.IsZero() {
					// Draining: the first request may still come, within the grace.
					if left := time.Until(by); wait <= 0 || left < wait {
						wait = left
					}
					if wait <= 0 {
						return
					}
				}
			}
			if !s.state.CompareAndSwap(sessActive, idle) {
				return
			}
			var until time.Time
			grace := wait
			tryPark := wait <= 0 || wait > 2*parkGrace
			if tryPark {
				grace = parkGrace
				if wait > 0 {
					until = time.Now().Add(wait)
				}
			}
			ok, timedOut := s.waitReadable(grace)
			if timedOut && tryPark {
				// Nothing came within the grace: park, unless Drain took the session.
				if !s.state.CompareAndSwap(idle, sessActive) {
					return
				}
				if srv.park(s, done, first, until) {
					parked = true
					return
				}
				// Not parkable (or parking failed): wait out the rest here.
				if !s.state.CompareAndSwap(sessActive, idle) {
					return
				}
				if by := srv.firstBy(); first && !by.IsZero() && (until.IsZero() || by.Before(until)) {
					until = by // a drain began meanwhile: park refused, the grace applies
				}
				rest := time.Duration(0)
				if !until.IsZero() {
					if rest = time.Until(until); rest <= 0 {
						return
					}
				}
				ok, _ = s.waitReadable(rest)
			}
			if !s.state.CompareAndSwap(idle, sessActive) || !ok {
				return // Drain closed it, or the idle timeout passed, or the client left
			}
			st = srv.state.Load()
		}
		woken = false
		if !s.serveOne(st, first) {
			return
		}
		first = false
	}
}

func (s *h1Session) release() {
	s.rd.Reset(nil)
	s.wr.Reset(nil)
	s.tr.Reset(nil)
	s.tw.Reset(nil)
	s.rawRd.Set(nil, nil)
	s.rawWr.Set(nil, nil)
	s.rawTr.Set(nil, nil)
	s.rawTw.Set(nil, nil)
	s.srv, s.c, s.raw, s.tls = nil, nil, nil, nil
	s.linger = false
	s.rec = RequestRecord{}
	s.out = h1.Outgoing{}
	s.rout = h1.ResponseOut{}
	sessionPool.Put(s)
}

// waitReadable waits up to d (0: no limit) for bytes (or EOF) from the client; timedOut when
// d passed with nothing. Over plain TCP it holds no buffer while it waits; otherwise (TLS,
// PROXY wrappers) it reads into a pooled buffer.
func (s *h1Session) waitReadable(d time.Duration) (ok, timedOut bool) {
	// Let the other ready connections run first: on a loaded server the client's next
	// request has most often arrived meanwhile, and the read below finds it at once instead
	// of failing with EAGAIN and waiting for the poller (a syscall and a park saved per
	// request); on a quiet one there is nothing to run and this costs a few dozen ns.
	runtime.Gosched()
	if s.raw != nil {
		// Read (non-blocking) into a pooled buffer: bytes or EOF end the wait; on EAGAIN the
		// buffer goes back to its pool before the goroutine waits for the poller, so a waiting
		// connection holds none. Trying the read first (rather than trusting one readiness
		// edge) finds bytes that arrived before the wait began, and a busy connection's next
		// request costs one read, not a peek and a read.
		// The wait's deadline is armed only when the read finds nothing, once per wait: under
		// load the next request is mostly there already, and the head's own deadline follows.
		s.waitFor, s.waitArmed = d, false
		if s.peek == nil {
			s.peek = func(fd uintptr) bool {
				p := s.rd.Space()
				if len(p) == 0 {
					return true // bytes are buffered already
				}
				for {
					// Raw: a non-blocking read need not tell the scheduler (see h1.Raw).
					n, e := h1.Recv(fd, p)
					var err error
					if e != 0 {
						err = e
					}
					switch err {
					case syscall.EINTR:
						continue
					case syscall.EAGAIN:
						s.rd.Release()
						if !s.waitArmed {
							s.waitArmed = true
							s.armRead(s.waitFor)
						}
						return false
					case nil:
					default:
						n = 0
						err = os.NewSyscallError("read", err)
					}
					s.rd.Advance(int(n), err)
					return true
				}
			}
		}
		err := s.raw.Read(s.peek)
		if err != nil && !s.waitArmed && isTimeout(err) {
			// The read never ran: a deadline the last request left (its head's, its body's)
			// had passed. Arm this wait's and try again.
			s.waitArmed = true
			s.armRead(d)
			err = s.raw.Read(s.peek)
		}
		return err == nil, err != nil && isTimeout(err)
	}
	s.armRead(d)
	err := s.rd.Fill(4 << 10)
	if len(s.rd.Buffered()) > 0 {
		return true, false
	}
	if err != nil && isTimeout(err) {
		s.rd.Release() // nothing read: the buffer goes back before the connection parks
		return false, true
	}
	return err == nil, false
}

// armRead makes the client connection's reads wait at most d (0: no limit).
func (s *h1Session) armRead(d time.Duration) {
	if d > 0 {
		s.c.SetReadDeadline(time.Now().Add(d))
	} else {
		s.c.SetReadDeadline(time.Time{})
	}
}

// Lingering close: how long to wait for each further read, and for all of them. Shorter than
// nginx's lingering_timeout and lingering_time (5 s, 30 s): what it is for, the rest of an
// upload already on its way, arrives within a round trip or two; a client that keeps sending
// slowly (a slow-body attack) gains at most lingerTime (TestSlowClients bounds them).
const (
	lingerTimeout = time.Second
	lingerTime    = 2 * time.Second
)

// lingerClose prepares the close of a connection whose client may still be sending (its body
// was cut short when the target answered first; RFC 9112 section 9.6): the answer is out, so
// the write side is shut (close_notify over TLS, then FIN), and whatever still arrives is read
// and dropped until the client closes or goes quiet. Closing with unread bytes would make the
// kernel reset the connection: the client's pending writes fail (broken pipe) and the reset may
// discard the answer from its receive buffer before it is read.
func (s *h1Session) lingerClose() {
	s.rd.Reset(s.c) // drops what is buffered and the cut upload's sticky timeout
	if s.tls != nil {
		s.tls.CloseWrite()
		if cw, ok := s.tls.NetConn().(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	} else if cw, ok := s.c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	end := time.Now().Add(lingerTime)
	for {
		dl := time.Now().Add(lingerTimeout)
		if dl.After(end) {
			dl = end
		}
		s.c.SetReadDeadline(dl)
		s.rd.Discard(len(s.rd.Buffered()))
		if s.rd.Fill(64<<10) != nil {
			return
		}
	}
}

// readHead reads until a complete head is buffered and parses it. The head timeout runs from
// the first byte.
func (s *h1Session) readHead(st *httpState) error {
	cfg := st.cfg
	max := cfg.MaxHeaderBytes + 4096 // net/http's slack, kept so limits mean what they meant
	s.c.SetReadDeadline(time.Now().Add(cfg.HeaderTimeoutDuration()))
	scanned := 0
	for {
		buf := s.rd.Buffered()
		if len(buf) > 0 && (hasHeadEnd(buf, scanned) || buf[0] == '\n' || buf[0] == '\r') {
			err := s.req.Parse(buf, max)
			if err != h1.ErrIncomplete {
				return err
			}
		}
		if len(buf) >= max {
			return h1.ErrHeadTooLarge
		}
		scanned = max0(len(buf) - 3)
		if err := s.rd.Fill(max); err != nil {
			if len(s.rd.Buffered()) >= max {
				return h1.ErrHeadTooLarge
			}
			return err
		}
	}
}

func max0(n int) int {
	if n < 0 {
		return 0
	}
	return n
}

// hasHeadEnd reports whether b, from about from on, holds an empty line (a head's end): only
// the new bytes are scanned, so a head arriving a byte at a time costs linear time.
func hasHeadEnd(b []byte, from int) bool {
	b = b[from:]
	return bytes.Index(b, []byte("\n\r\n")) >= 0 || bytes.Index(b, []byte("\n\n")) >= 0
}

// serveOne reads and answers one request; false when the connection must close.
func (s *h1Session) serveOne(st *httpState, first bool) bool {
	start := time.Now()
	err := s.readHead(st)
	if err != nil {
		switch {
		case errors.Is(err, h1.ErrHeadTooLarge):
			s.simple(431, "request header too large", true)
		case errors.Is(err, h1.ErrMalformed):
			s.simple(400, "malformed request", true)
		case len(s.rd.Buffered()) > 0 && !isTimeout(err):
			// The client closed mid-head: nothing to answer.
		case len(s.rd.Buffered()) > 0:
			s.simple(408, "request timeout", true)
		}
		return false
	}
	r := &s.req
	rec := &s.rec
	*rec = RequestRecord{
		Listener: st.cfg.Name, Time: start, Client: s.client, RulePriority: -1,
		Method: h1.Str(r.Method), URI: h1.Str(r.Target), Proto: h1.Str(r.Version), Host: h1.Str(r.Host),
		UserAgent: h1.Str(r.Value("user-agent")),
	}
	if s.tls != nil {
		cs := s.tls.ConnectionState()
		rec.TLSVersion, rec.Cipher, rec.SNI = cs.Version, cs.CipherSuite, cs.ServerName
	}
	s.rd.Discard(r.HeadLen)
	s.rd.Freeze() // r and rec view the head until the request is done
	defer s.rd.Unfreeze()
	s.wr.ResetCount()
	keep := s.handle(st, r)
	rec.Duration = time.Since(start)
	rec.BytesOut = s.wr.Written()
	if st.obs != nil {
		st.obs.Request(rec)
	}
	return keep && !r.Close && !s.srv.isDraining()
}

// handle answers the parsed request r; false when the connection must close.
func (s *h1Session) handle(st *httpState, r *h1.Request) bool {
	rec := &s.rec
	rec.Classification, rec.ClassificationReason = r.Tier, r.Reason
	if st.obs != nil && r.Tier != desync.Compliant {
		st.obs.Desync(st.cfg.Name, r.Tier, r.Reason)
	}
	if r.Unframeable != h1.Frameable {
		rec.Reason = "bad_request:" + r.Unframeable.String()
		s.simple(400, "malformed request", true)
		return false
	}
	v := desync.Decide(st.desync, r.Tier)
	if v.Block {
		rec.Reason = "desync:" + r.Reason.String()
		s.simple(400, "request rejected: "+r.Reason.String(), true)
		return false
	}
	closeAfter := v.CloseAfter || r.Close

	// Route on the decoded path.
	s.path = r.AppendDecodedPath(s.path[:0])
	m := router.Request{Method: h1.Str(r.Method), Host: h1.Str(r.Host), Path: h1.Str(s.path), RawQuery: h1.Str(r.Query), Header: r}
	if st.acme != nil && bytes.HasPrefix(r.Path, []byte("/.well-known/acme-challenge/")) && s.acme(st, r) {
		return s.drainBody(r) && !closeAfter
	}
	rule := st.table.Match(&m, s.client.Addr())
	rec.RulePriority = rule.Priority
	a := rule.Action
	switch a.Kind {
	case router.ActionFixedResponse:
		rec.Actions = ActionsFixedResponse
		s.fixed(rule, a.Fixed, closeAfter)
		return s.drainBody(r) && !closeAfter
	case router.ActionRedirect:
		loc := a.RedirectLocationFor(h1.Str(r.Path), h1.Str(r.Query), h1.Str(r.Host), st.tlsOn, st.port)
		rec.Actions, rec.RedirectURL = ActionsRedirect, loc
		s.redirect(rule, a.RedirectStatus(), loc, closeAfter)
		return s.drainBody(r) && !closeAfter
	}
	rec.Actions = ActionsForward
	proxies := st.actions[rule.ID]
	i := 0
	if len(proxies) > 1 {
		i = a.PickGroup(rand.Uint64())
	}
	return s.forward(st, r, rule, proxies[i].group, closeAfter)
}

// drainBody reads and drops a request body nobody forwards, so the connection can carry the
// next request; a large or slow one closes the connection instead.
func (s *h1Session) drainBody(r *h1.Request) bool {
	switch r.Framing {
	case h1.NoBody:
		return true
	case h1.Sized:
		if buf := s.rd.Buffered(); int64(len(buf)) >= r.ContentLength {
			s.rd.Discard(int(r.ContentLength))
			return true
		}
	}
	return false
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// simple writes a small plain-text answer of our own.
func (s *h1Session) simple(status int, msg string, close bool) {
	s.rec.Status = status
	b := s.wr.Buf()
	b = appendStatusLine(b, status)
	b = append(b, "Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(msg)+len(strconv.Itoa(status))+len(http.StatusText(status))+4), 10)
	if close {
		b = append(b, "\r\nConnection: close"...)
	}
	b = append(b, "\r\n\r\n"...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	b = append(b, http.StatusText(status)...)
	b = append(b, ": "...)
	b = append(b, msg...)
	b = append(b, '\n')
	s.wr.Commit(b)
	s.wr.Flush()
}

func appendStatusLine(b []byte, status int) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	b = append(b, http.StatusText(status)...)
	return append(b, '\r', '\n')
}

func (s *h1Session) fixed(rule *router.Rule, f *router.FixedAction, close bool) {
	s.rec.Status = f.Status
	b := s.wr.Buf()
	b = appendStatusLine(b, f.Status)
	b = h1.AppendOps(b, rule.ResponseHeaders)
	if f.ContentType != "" {
		b = h1.AppendField(b, "Content-Type", f.ContentType)
	}
	b = h1.AppendField(b, "Content-Length", f.ContentLength)
	if close {
		b = append(b, "Connection: close\r\n"...)
	}
	b = append(b, '\r', '\n')
	if !bytes.Equal(s.req.Method, []byte("HEAD")) {
		b = append(b, f.Body...)
	}
	s.wr.Commit(b)
	s.wr.Flush()
}

func (s *h1Session) redirect(rule *router.Rule, status int, loc string, close bool) {
	s.rec.Status = status
	b := s.wr.Buf()
	b = appendStatusLine(b, status)
	b = h1.AppendOps(b, rule.ResponseHeaders)
	b = h1.AppendField(b, "Location", loc)
	b = append(b, "Content-Length: 0\r\n"...)
	if close {
		b = append(b, "Connection: close\r\n"...)
	}
	b = append(b, '\r', '\n')
	s.wr.Commit(b)
	s.wr.Flush()
}

// acme answers an HTTP-01 challenge through the certificate manager's http.Handler-style hook.
// Rare: it may allocate.
func (s *h1Session) acme(st *httpState, r *h1.Request) bool {
	hr, err := http.NewRequest(string(r.Method), "http://"+string(r.Host)+string(r.Path), nil)
	if err != nil {
		return false
	}
	hr.Host = string(r.Host)
	rw := &bufferedRW{h: http.Header{}}
	if !st.acme.HandleHTTPChallenge(rw, hr) {
		return false
	}
	if rw.status == 0 {
		rw.status = 200
	}
	s.rec.Status = rw.status
	b := s.wr.Buf()
	b = appendStatusLine(b, rw.status)
	for k, vs := range rw.h {
		for _, v := range vs {
			b = h1.AppendField(b, k, v)
		}
	}
	b = h1.AppendField(b, "Content-Length", strconv.Itoa(rw.body.Len()))
	b = append(b, '\r', '\n')
	s.wr.Commit(b)
	s.wr.Write(rw.body.Bytes())
	s.wr.Flush()
	return true
}

type bufferedRW struct {
	h      http.Header
	status int
	body   bytes.Buffer
}

func (w *bufferedRW) Header() http.Header { return w.h }
func (w *bufferedRW) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
}
func (w *bufferedRW) Write(p []byte) (int, error) { w.WriteHeader(200); return w.body.Write(p) }

// errClientBody marks a failure reading the client's body (400, never the target's fault).
var errClientBody = errors.New("client body")

// forward proxies r to a target of g; false when the connection must close.
func (s *h1Session) forward(st *httpState, r *h1.Request, rule *router.Rule, g *backends.Group, closeAfter bool) bool {
	rec := &s.rec
	rec.Group = g.Name()
	target := s.pick(r, g, closeAfter)
	if target == nil {
		return s.drainBody(r) && !closeAfter
	}
	// The outgoing head.
	o := &s.out
	setOutgoing(o, rec, st, rule, s.client.Addr(), r)
	// The client-certificate fields, for either path: a group that speaks HTTP/2 to its
	// targets (forwardStd) gets them as an HTTP/1.1 group does.
	o.Extra = nil
	if mode := st.certMode(); mode != "" && s.tls != nil {
		o.Extra = certFields(mode, s.tls.ConnectionState())
	}
	pool, ok := g.H1Pool()
	if !ok {
		return s.forwardStd(st, r, rule, g, target, closeAfter)
	}
	o.Close = closeAfter

	if r.Framing == h1.Chunked && !r.Expect100 && !s.primeChunked(st) {
		// A malformed first chunk size is answered here and never forwarded. Later chunks
		// stream; a bad one aborts the target connection mid-body, which is never reused.
		rec.Reason = "client_body_error"
		s.simple(400, "malformed request body", true)
		return false
	}
	keep := false
	a := attempts{rec: rec, held: &s.held, g: g, pool: pool, client: s.client.Addr(), hasBody: r.Framing != h1.NoBody}
	err := a.run(target, func(target *backends.Target, tc backends.TargetConn) (retry bool) {
		keep, retry = s.exchange(st, r, rule, g, target, tc, pool, closeAfter)
		return retry
	})
	switch {
	case err == nil:
		return keep
	case errors.Is(err, errAtLimit):
		rec.Reason = "max_in_flight"
		s.simple(503, "targets at their limit", closeAfter)
	case errors.Is(err, errNoTargetReachable):
		s.targetFailed(err, closeAfter)
		return false
	default:
		s.targetFailed(err, closeAfter)
	}
	return s.drainBody(r) && !closeAfter
}

// primeChunked reads until the first chunk-size line is buffered and checks it.
func (s *h1Session) primeChunked(st *httpState) bool {
	s.rd.SetTimeout(s.c, st.cfg.ClientBodyTimeoutDuration(), st.cfg.MinTransferRate)
	defer s.rd.SetTimeout(nil, 0, 0)
	for {
		ok, complete := h1.FirstChunkReady(s.rd.Buffered())
		if complete {
			return ok
		}
		if s.rd.Fill(64<<10) != nil {
			return false
		}
	}
}

// targetFailed answers a failed exchange before any response byte reached the client.
func (s *h1Session) targetFailed(err error, close bool) {
	status, reason := targetFailure(err)
	s.rec.Reason = reason
	s.simple(status, http.StatusText(status), close)
}

// exchange sends r on tc and relays the answer. keep: the client connection may carry another
// request; retry: nothing was sent or received and the request may go again on a new connection.
func (s *h1Session) exchange(st *httpState, r *h1.Request, rule *router.Rule, g *backends.Group, target *backends.Target,
	tc backends.TargetConn, pool backends.H1Pool, closeAfter bool) (keep, retry bool) {
	rec := &s.rec
	conn := tc.Conn()
	s.setTarget(conn)
	defer s.setTarget(nil)
	if tcp, rc := tc.RawConn(); rc != nil {
		s.rawTw.Set(tcp, rc)
		s.rawTr.Set(tcp, rc)
		s.tw.ResetRaw(&s.rawTw)
		s.tr.ResetRaw(&s.rawTr)
	} else {
		s.tw.Reset(conn)
		s.tr.Reset(conn)
	}
	defer s.tr.Release()
	b := s.tw.Buf()
	b = s.out.AppendForwardHead(b, r)

	// The body: a small one already here goes in the same write as the head; an upload the
	// client is still sending is copied by a goroutine while this one waits for the answer, so
	// a target answering early is relayed at once.
	bodyDone := true
	s.upload = nil
	buffered := s.rd.Buffered()
	inline := 0
	switch {
	case r.Framing == h1.NoBody:
	case r.Framing == h1.Sized && int64(len(buffered)) >= r.ContentLength && r.ContentLength <= 16<<10 && !r.Expect100:
		b = append(b, buffered[:r.ContentLength]...)
		inline = int(r.ContentLength)
	default:
		bodyDone = false
	}
	s.tw.Commit(b)
	if err := s.tw.Flush(); err != nil {
		tc.Done(false)
		// A kept-alive connection the target closed between the pool's peek and this write.
		// Going again is safe when not a byte of the request left (the write itself found the
		// connection reset: whatever the method, the target saw nothing), or when the request
		// is idempotent. A body sent in part is never sent again.
		if tc.Reused() && (s.tw.Written() == 0 || isIdempotent(r)) {
			return false, true
		}
		target.ReportFailure()
		s.targetFailed(err, closeAfter)
		return false, false
	}
	if inline > 0 {
		// Consumed only once written: a retry above finds the body still buffered.
		s.rd.Discard(inline)
		rec.BytesIn = r.ContentLength
	}
	startUpload := func() {
		s.upload = make(chan error, 1)
		s.rd.SetTimeout(s.c, st.cfg.ClientBodyTimeoutDuration(), st.cfg.MinTransferRate)
		go func() {
			n, err := h1.CopyBody(&s.tw, &s.rd, r.Framing, r.ContentLength, r.Framing)
			if err == nil {
				err = s.tw.Flush()
			} else if !errors.Is(err, s.tw.Err()) {
				err = errors.Join(errClientBody, err)
			}
			rec.BytesIn = n
			if err != nil {
				conn.Close() // the target must never take a cut body as complete
			}
			s.upload <- err
		}()
	}
	if !bodyDone && !r.Expect100 {
		startUpload()
	}
	// As in waitReadable: the target needs a moment to answer, which the other ready
	// connections use; the first read of the answer then rarely finds nothing.
	runtime.Gosched()
	// endUpload waits for the upload goroutine; cut makes it stop now (the answer came first).
	endUpload := func(cut bool) error {
		if s.upload == nil {
			return nil
		}
		if cut {
			s.c.SetReadDeadline(time.Now())
		}
		err := <-s.upload
		s.upload = nil
		s.rd.SetTimeout(nil, 0, 0)
		if cut {
			s.c.SetReadDeadline(time.Time{})
		}
		return err
	}

	// The response head (1xx answers relayed as they come).
	resp := &s.resp
	head := bytes.Equal(r.Method, []byte("HEAD"))
	var limit time.Time
	now := time.Now() // one clock read for both deadlines of the first wait
	if rt := pool.ResponseTimeout(); rt > 0 {
		limit = now.Add(rt)
	}
	got := false
	for n1xx := 0; ; {
		err := s.readResponseHead(conn, head, limit, s.upload == nil, now)
		now = time.Time{}
		if err != nil {
			uerr := endUpload(true)
			tc.Done(false)
			if errors.Is(err, errClientGone) {
				rec.Reason = "client_closed"
				return false, false
			}
			if uerr != nil && errors.Is(uerr, errClientBody) {
				if isTimeout(uerr) {
					rec.Reason = "client_body_timeout"
					s.simple(408, "request body timeout", true)
				} else {
					rec.Reason = "client_body_error"
					s.simple(400, "malformed request body", true)
				}
				return false, false
			}
			if !got && tc.Reused() && bodyDone && len(s.tr.Buffered()) == 0 && !isTimeout(err) && isIdempotent(r) {
				return false, true
			}
			target.ReportFailure()
			s.targetFailed(err, true)
			return false, false
		}
		got = true
		if resp.Status >= 200 || resp.Status == 101 {
			break
		}
		// Informational: relay, then keep reading (100 Continue starts a held-back upload).
		if n1xx++; n1xx > 5 {
			endUpload(true)
			tc.Done(false)
			target.ReportFailure()
			s.targetFailed(errors.New("too many 1xx responses"), true)
			return false, false
		}
		hb := s.wr.Buf()
		hb, _ = (&h1.ResponseOut{Minor: 1}).AppendResponseHead(hb, resp)
		s.tr.Discard(resp.HeadLen)
		if r.Minor == 1 {
			s.wr.Commit(hb)
			s.wr.Flush()
		}
		if resp.Status == 100 && !bodyDone && s.upload == nil {
			startUpload()
		}
	}
	conn.SetReadDeadline(time.Time{})
	s.tr.Discard(resp.HeadLen)
	target.ReportSuccess()
	rec.TargetStatus = resp.Status
	rec.Status = resp.Status
	if rt := g.Config().TargetReadTimeoutDuration(); rt > 0 {
		s.tr.SetTimeout(conn, rt, 0)
	}

	if resp.Status == 101 {
		if !r.Upgrade {
			endUpload(true)
			tc.Done(false)
			target.ReportFailure()
			s.targetFailed(errors.New("101 to a request that asked no upgrade"), true)
			return false, false
		}
		s.tunnel(rule, g, target, tc, r)
		return false, false
	}

	// If the upload has not finished, the answer came first: the client connection cannot carry
	// another request (its body is unread), and neither can the target's.
	uploading := !bodyDone && s.upload != nil
	if uploading {
		select {
		case err := <-s.upload:
			s.upload = nil
			s.rd.SetTimeout(nil, 0, 0)
			uploading = err != nil
		default:
		}
	}
	if !bodyDone && r.Expect100 && s.upload == nil {
		uploading = true // the target answered without asking for the body: never sent
	}
	close := closeAfter || uploading
	ro := &s.rout
	// Draining: the connection closes after this answer, and says so.
	*ro = h1.ResponseOut{Ops: rule.ResponseHeaders, Close: close || s.srv.isDraining(), Minor: r.Minor, Head: head}
	if c, ok := g.StickySetCookie(target, resp); ok {
		s.extra[0] = router.HeaderValue{Name: "Set-Cookie", Value: c}
		ro.Extra = s.extra[:]
	}
	s.wr.SetTimeout(s.c, st.cfg.SendTimeoutDuration(), st.cfg.MinTransferRate)
	defer s.wr.SetTimeout(nil, 0, 0)
	hb := s.wr.Buf()
	hb, framing := ro.AppendResponseHead(hb, resp)
	// The first body bytes in the same write as the head.
	if resp.Framing == h1.Sized {
		body := s.tr.Buffered()
		if int64(len(body)) > resp.ContentLength {
			body = body[:resp.ContentLength]
		}
		if len(hb)+len(body) <= cap(hb) {
			hb = append(hb, body...)
			s.tr.Discard(len(body))
			s.wr.Commit(hb)
			if rest := resp.ContentLength - int64(len(body)); rest > 0 {
				if _, err := h1.CopyBody(&s.wr, &s.tr, h1.Sized, rest, framing); err != nil {
					return s.bodyFailed(err, tc, target, endUpload)
				}
			}
		} else {
			s.wr.Commit(hb)
			if _, err := h1.CopyBody(&s.wr, &s.tr, h1.Sized, resp.ContentLength, framing); err != nil {
				return s.bodyFailed(err, tc, target, endUpload)
			}
		}
	} else {
		s.wr.Commit(hb)
		if _, err := h1.CopyBody(&s.wr, &s.tr, resp.Framing, resp.ContentLength, framing); err != nil {
			return s.bodyFailed(err, tc, target, endUpload)
		}
	}
	s.tr.SetTimeout(nil, 0, 0)
	// The target's part is over: it leaves the in-flight count before the client can see the
	// answer and send its next request (least_outstanding_requests sees a quiet target).
	s.held.release()
	if err := s.wr.Flush(); err != nil {
		rec.Reason = "client_closed"
		endUpload(true)
		tc.Done(false)
		return false, false
	}
	uerr := endUpload(uploading)
	// An answer that came before the end of the body leaves the client sending: the connection
	// closes, lingering (lingerClose) so that what still arrives does not reset it.
	s.linger = uploading
	reuse := !resp.Close && !closeAfter && !uploading && uerr == nil && len(s.tr.Buffered()) == 0 && resp.Framing != h1.UntilClose
	tc.Done(reuse)
	if uerr != nil && !uploading {
		return false, false
	}
	return !close && !ro.Close, false
}

// setTarget records the target connection in use, so a forced close can end the exchange.
func (s *h1Session) setTarget(c net.Conn) {
	s.tmu.Lock()
	s.tconn = c
	s.tmu.Unlock()
}

// abort closes the client connection and the target connection in use (forced shutdown).
func (s *h1Session) abort() {
	s.c.Close()
	s.tmu.Lock()
	if s.tconn != nil {
		s.tconn.Close()
	}
	s.tmu.Unlock()
}

// bodyFailed ends an exchange whose response body broke after its head was sent: the client
// connection is closed, so a cut body is never presented as complete.
func (s *h1Session) bodyFailed(err error, tc backends.TargetConn, target *backends.Target, endUpload func(bool) error) (bool, bool) {
	endUpload(true)
	tc.Done(false)
	switch {
	case s.wr.Err() != nil && isTimeout(s.wr.Err()):
		s.rec.Reason = "send_timeout"
	case s.wr.Err() != nil:
		s.rec.Reason = "client_closed"
	case isTimeout(err):
		s.rec.Reason = "target_read_timeout"
		target.ReportFailure()
	default:
		s.rec.Reason = "target_closed_mid_body"
		target.ReportFailure()
	}
	return false, false
}

// isIdempotent: r may be sent again (an idempotent method, and no body that may be cut).
func isIdempotent(r *h1.Request) bool {
	return r.Framing == h1.NoBody && isIdempotentMethod(h1.Str(r.Method))
}

// errClientGone: the client closed its connection while its request was at a target.
var errClientGone = errors.New("client closed the connection")

// clientCheck is how often a slow target's wait looks whether the client is still there.
const clientCheck = 250 * time.Millisecond

// readResponseHead reads and parses the target's next response head into s.resp, until limit
// (zero: none). While it waits, it looks every clientCheck whether the client left (watch; not
// while an upload reads the client), and then gives up, so the target's work is cancelled by
// the closed connection.
//
// now, when not zero, is the time to count the first wait from (the caller's clock read).
func (s *h1Session) readResponseHead(conn net.Conn, head bool, limit time.Time, watch bool, now time.Time) error {
	const max = 64 << 10
	for {
		if buf := s.tr.Buffered(); len(buf) > 0 {
			err := s.resp.Parse(buf, max, head)
			if err != h1.ErrIncomplete {
				return err
			}
		}
		next := limit
		if watch {
			if now.IsZero() {
				now = time.Now()
			}
			if n := now.Add(clientCheck); limit.IsZero() || n.Before(limit) {
				next = n
			}
			now = time.Time{}
		}
		conn.SetReadDeadline(next)
		err := s.tr.Fill(max)
		if err == nil {
			continue
		}
		if err == io.EOF {
			return io.ErrUnexpectedEOF
		}
		if !isTimeout(err) || next.Equal(limit) {
			return err
		}
		if s.clientGone() {
			return errClientGone
		}
	}
}

// clientGone peeks at the client's socket without blocking: EOF or a reset means it left.
func (s *h1Session) clientGone() bool {
	var nc net.Conn = s.c
	if s.tls != nil {
		nc = s.tls.NetConn()
	}
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	var one [1]byte
	rc.Read(func(fd uintptr) bool {
		n, _, e := syscall.Recvfrom(int(fd), one[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		gone = e == nil && n == 0 || e == syscall.ECONNRESET
		return true
	})
	return gone
}

// tunnel relays an upgraded connection (WebSocket) both ways until either side ends. The
// connection then belongs to the tunnel; it outlives reloads like any connection.
func (s *h1Session) tunnel(rule *router.Rule, g *backends.Group, target *backends.Target, tc backends.TargetConn, r *h1.Request) {
	resp := &s.resp
	ro := &s.rout
	*ro = h1.ResponseOut{Ops: rule.ResponseHeaders, Minor: 1, Switch: resp.Value("upgrade")}
	if c, ok := g.StickySetCookie(target, resp); ok {
		s.extra[0] = router.HeaderValue{Name: "Set-Cookie", Value: c}
		ro.Extra = s.extra[:]
	}
	hb := s.wr.Buf()
	hb, _ = ro.AppendResponseHead(hb, resp)
	hb = append(hb, s.tr.Buffered()...)
	s.tr.Discard(len(s.tr.Buffered()))
	s.wr.Commit(hb)
	conn := tc.Conn()
	if err := s.wr.Flush(); err != nil {
		tc.Done(false)
		return
	}
	if pending := s.rd.Buffered(); len(pending) > 0 {
		conn.Write(pending)
		s.rd.Discard(len(pending))
	}
	s.rd.Release()
	s.wr.Release()
	s.tr.Release()
	s.c.SetDeadline(time.Time{})
	done := make(chan struct{})
	go func() { // owned by this tunnel: ends when the target side ends, closing the client's
		defer close(done)
		copyConn(s.c, conn)
		closeWrite(s.c)
	}()
	copyConn(conn, s.c)
	closeWrite(conn)
	<-done
	tc.Done(false)
}

var tunnelBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func copyConn(dst, src net.Conn) {
	bp := tunnelBufs.Get().(*[]byte)
	io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
	tunnelBufs.Put(bp)
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}

// certFields are the client-certificate headers for the target (mutual TLS listeners).
func certFields(mode string, cs tls.ConnectionState) []router.HeaderValue {
	if len(cs.PeerCertificates) == 0 {
		return nil
	}
	h := http.Header{}
	setClientCertHeaders(h, mode, cs)
	out := make([]router.HeaderValue, 0, len(h))
	for k, vs := range h {
		for _, v := range vs {
			out = append(out, router.HeaderValue{Name: k, Value: v})
		}
	}
	return out
}

// forwardStd serves groups that speak HTTP/2 to their targets, through the group's standard
// transport. The outgoing head is the engine's own (forward prepared it), read back as an
// *http.Request.
func (s *h1Session) forwardStd(st *httpState, r *h1.Request, rule *router.Rule, g *backends.Group, target *backends.Target, closeAfter bool) bool {
	rec := &s.rec
	o := &s.out
	o.Close = false
	head := o.AppendForwardHead(nil, r)
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
	if err != nil {
		s.simple(400, "malformed request", true)
		return false
	}
	req.RequestURI = ""
	req.URL.Scheme = "http"
	if g.Protocol() == "https" {
		req.URL.Scheme = "https"
	}
	req.URL.Host = target.Addr()
	rec.Target = target.Addr()
	if r.Framing != h1.NoBody {
		pr, pw := io.Pipe()
		req.Body = pr
		req.ContentLength = r.ContentLength
		if r.Framing == h1.Chunked {
			req.ContentLength = -1
		}
		go func() { // owned by this request: ends with the body or the pipe's close
			tw := h1.NewWriter(pw)
			_, err := h1.CopyBody(tw, &s.rd, r.Framing, r.ContentLength, h1.UntilClose)
			if err == nil {
				err = tw.Flush()
			}
			pw.CloseWithError(err)
		}()
	}
	target.Acquire()
	defer target.Release()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req = req.WithContext(ctx)
	var stalled atomic.Bool
	rt := g.Config().TargetReadTimeoutDuration()
	var watchdog *time.Timer
	if rt > 0 {
		watchdog = time.AfterFunc(time.Hour, func() { stalled.Store(true); cancel() })
		defer watchdog.Stop()
	}
	s.setTarget(nil)
	t0 := time.Now()
	resp, err := g.Transport().RoundTrip(req)
	rec.TargetDuration = time.Since(t0)
	if err != nil {
		target.ReportFailure()
		s.targetFailed(err, true)
		return false
	}
	defer resp.Body.Close()
	target.ReportSuccess()
	rec.TargetStatus, rec.Status = resp.StatusCode, resp.StatusCode
	if ops := rule.ResponseHeaders; ops != nil {
		ops.Apply(resp.Header)
	}
	g.SetSticky(resp.Header, target)
	for _, k := range []string{"Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length"} {
		resp.Header.Del(k)
	}
	b := s.wr.Buf()
	b = appendStatusLine(b, resp.StatusCode)
	for k, vs := range resp.Header {
		for _, v := range vs {
			b = h1.AppendField(b, k, v)
		}
	}
	chunked := resp.ContentLength < 0 && r.Minor == 1
	switch {
	case resp.ContentLength >= 0:
		b = h1.AppendField(b, "Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	case chunked:
		b = append(b, "Transfer-Encoding: chunked\r\n"...)
	default:
		closeAfter = true
	}
	if closeAfter {
		b = append(b, "Connection: close\r\n"...)
	}
	b = append(b, '\r', '\n')
	s.wr.Commit(b)
	var werr error
	var body io.Reader = resp.Body
	if watchdog != nil {
		body = &watchedReader{r: resp.Body, t: watchdog, d: rt}
	}
	s.wr.SetTimeout(s.c, st.cfg.SendTimeoutDuration(), st.cfg.MinTransferRate)
	defer s.wr.SetTimeout(nil, 0, 0)
	if chunked {
		cw := &chunkWriter{w: &s.wr}
		_, werr = io.Copy(cw, body)
		if werr == nil {
			s.wr.Write([]byte("0\r\n\r\n"))
		}
	} else {
		_, werr = io.Copy(&s.wr, body)
	}
	if werr != nil || s.wr.Flush() != nil {
		switch {
		case s.wr.Err() != nil && isTimeout(s.wr.Err()):
			rec.Reason = "send_timeout"
		case s.wr.Err() != nil:
			rec.Reason = "client_closed"
		case stalled.Load():
			rec.Reason = "target_read_timeout"
			target.ReportFailure()
		default:
			rec.Reason = "target_closed_mid_body"
		}
		return false
	}
	return !closeAfter
}

// watchedReader re-arms a watchdog before each read: a target silent for d cancels the exchange.
type watchedReader struct {
	r io.Reader
	t *time.Timer
	d time.Duration
}

func (w *watchedReader) Read(p []byte) (int, error) {
	w.t.Reset(w.d)
	n, err := w.r.Read(p)
	w.t.Stop()
	return n, err
}

type chunkWriter struct{ w *h1.Writer }

func (c *chunkWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	b := c.w.Buf()
	b = strconv.AppendInt(b, int64(len(p)), 16)
	b = append(b, '\r', '\n')
	c.w.Commit(b)
	c.w.Write(p)
	_, err := c.w.Write([]byte("\r\n"))
	if err == nil {
		err = c.w.Flush()
	}
	return len(p), err
}

// pick chooses the request's target, its sticky cookie's first; with none healthy it answers 503
// and returns nil.
func (s *h1Session) pick(r *h1.Request, g *backends.Group, closeAfter bool) *backends.Target {
	target := pickTarget(g, r, s.client.Addr())
	if target == nil {
		s.rec.Reason = "no_healthy_target"
		s.simple(503, "no healthy target", closeAfter)
	}
	return target
}
