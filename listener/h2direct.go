package listener

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/h1"
	"github.com/fulcrum-lb/fulcrum/listener/h2"
	"github.com/fulcrum-lb/fulcrum/router"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The HTTP/2 streams' request core. A stream without a request body whose rule forwards to a
// group speaking HTTP/1.1 to its targets (the common case) is served here directly, on the
// engine's worker: routed on the decoded hpack fields (no header map, no http.Request), sent to
// a pooled target connection with the HTTP/1 engine's outgoing head (h1.Outgoing: the same
// forwarding headers, request id, rule operations and field screening), and answered from the
// parsed target response (h1.ResponseOut's filtering, then encoded straight to HPACK) with DATA
// from the target buffer. Everything else — uploads, fixed responses, redirects, ACME, CONNECT,
// groups that speak HTTP/2 or gRPC to their targets — goes through the net/http bridge
// (h2.HTTPHandler into httpState.ServeHTTP), decided before anything is sent.

// h2Handler is the HTTP/2 engine's handler for one listener.
type h2Handler struct {
	srv    *httpServer
	bridge h2.Handler
}

func newH2Handler(srv *httpServer) *h2Handler {
	return &h2Handler{srv: srv, bridge: h2.HTTPHandler(noConnect(http.HandlerFunc(srv.serveHTTP)))}
}

var h2ExchangePool = sync.Pool{New: func() any {
	x := new(h2Exchange)
	x.onTrailer = x.addTrailer // bound once: a method value made per stream would allocate
	return x
}}

// ServeH2 implements h2.Handler.
func (h *h2Handler) ServeH2(s *h2.Stream) {
	st := h.srv.state.Load()
	x := h2ExchangePool.Get().(*h2Exchange)
	direct := x.serve(st, s)
	x.release()
	h2ExchangePool.Put(x)
	if !direct {
		h.bridge.ServeH2(s)
	}
}

// h2Head serves lookups over a stream's fields (router.Headers, backends.HeaderValues).
type h2Head struct{ f []hpack.HeaderField }

func (h *h2Head) HeaderValue(name string, i int) (string, bool) {
	for k := range h.f {
		if strings.EqualFold(h.f[k].Name, name) {
			if i == 0 {
				return strings.TrimSpace(h.f[k].Value), true
			}
			i--
		}
	}
	return "", false
}

// h2Exchange is one direct stream's state, pooled: a warm one serves a stream without allocating.
type h2Exchange struct {
	s      *h2.Stream
	st     *httpState
	client netip.AddrPort
	hdr    h2Head
	path   []byte
	out    h1.Outgoing
	resp   h1.Response
	tr     h1.Reader
	tw     h1.Writer
	bw     h1.Writer // DATA frames to the client through the stream
	held   heldTarget
	rec    RequestRecord
	head   []byte
	fields []hpack.HeaderField
	extra  [1]router.HeaderValue

	// A chunked response's trailer section: lower-case names and values back to back in trail,
	// each field's name start, value start and end in trailAt.
	trail     []byte
	trailAt   []int
	onTrailer func(name, value []byte)

	dl   streamDeadline // the body reads' deadline setter (target_read_timeout)
	sent int64          // body bytes written to the stream directly, not through bw
}

// streamDeadline sets the target connection's read deadline before each body read (h1.Reader's
// per-read timeout) and then looks at the stream: a reset that moved the deadline to the past
// (SetInterrupt) just before this call is put back, instead of being overwritten with
// target_read_timeout from now, which would hold the worker (and the target's connection) for
// that long after the client left. The stream marks itself closed before it moves the
// deadline, so one of the two always comes last with the past deadline.
type streamDeadline struct {
	conn net.Conn
	s    *h2.Stream
}

func (d *streamDeadline) SetReadDeadline(t time.Time) error {
	err := d.conn.SetReadDeadline(t)
	if d.s.Closed() {
		return d.conn.SetReadDeadline(time.Unix(1, 0))
	}
	return err
}

func (x *h2Exchange) release() {
	x.tr.Reset(nil)
	x.tw.Reset(nil)
	x.bw.Reset(nil)
	x.s, x.st, x.held = nil, nil, heldTarget{}
	x.dl = streamDeadline{}
	x.sent = 0
	x.hdr.f = nil
	x.rec = RequestRecord{}
	x.out = h1.Outgoing{}
	clear(x.fields[:cap(x.fields)])
	x.fields = x.fields[:0]
	x.trail, x.trailAt = x.trail[:0], x.trailAt[:0]
}

// directPath reports whether p can be routed here as is: origin form, no control bytes, valid
// escapes. Anything else keeps the bridge's answer (its URL parser decides).
func directPath(p string) bool {
	if len(p) == 0 || p[0] != '/' || !h1.ValidEscapes(p) {
		return false
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c <= ' ' || c >= 0x7f || c == '#' {
			return false
		}
	}
	return true
}

// serve answers s directly and returns true, or returns false having sent nothing (the bridge
// serves it).
func (x *h2Exchange) serve(st *httpState, s *h2.Stream) bool {
	if s.Method == "CONNECT" || s.HasBody() || !directPath(s.Path) {
		return false
	}
	escaped, query := s.Path, ""
	hasQuery := false
	if i := strings.IndexByte(escaped, '?'); i >= 0 {
		escaped, query, hasQuery = escaped[:i], escaped[i+1:], true
	}
	if st.acme != nil && strings.HasPrefix(escaped, "/.well-known/acme-challenge/") {
		return false
	}
	host := s.Authority
	x.hdr.f = s.Header
	if host == "" {
		host, _ = x.hdr.HeaderValue("Host", 0)
	}
	x.path = h1.AppendUnescaped(x.path[:0], escaped)
	ci := s.ConnInfo()
	x.client = clientAddrPort(ci.RemoteAddr)
	m := router.Request{Method: s.Method, Host: host, Path: h1.Str(x.path), RawQuery: query, Header: &x.hdr}
	rule := st.table.Match(&m, x.client.Addr())
	if rule.Action.Kind == router.ActionFixedResponse || rule.Action.Kind == router.ActionRedirect {
		return false
	}
	proxies := st.actions[rule.ID]
	i := 0
	if len(proxies) > 1 {
		i = rule.Action.PickGroup(rand.Uint64())
	}
	g := proxies[i].group
	pool, ok := g.H1Pool()
	if !ok {
		return false
	}
	// From here on the stream is ours.
	x.s, x.st = s, st
	rec := &x.rec
	ua, _ := x.hdr.HeaderValue("User-Agent", 0)
	*rec = RequestRecord{
		Listener: st.cfg.Name, Time: time.Now(), Client: x.client, RulePriority: rule.Priority,
		Method: s.Method, URI: s.Path, Proto: "HTTP/2.0", Host: host, UserAgent: ua,
		Actions: ActionsForward, Group: g.Name(),
	}
	if cs := ci.TLS; cs != nil {
		rec.TLSVersion, rec.Cipher, rec.SNI = cs.Version, cs.CipherSuite, cs.ServerName
	}
	x.bw.Reset(s)
	x.forward(rule, g, pool, escaped, query, hasQuery, host)
	x.held.release()
	rec.Duration = time.Since(rec.Time)
	rec.BytesOut = x.bw.Written() + x.sent
	if st.obs != nil {
		st.obs.Request(rec)
	}
	return true
}

// forward picks a target and runs the exchange, retrying as the HTTP/1 engine does (attempts.run):
// a refused dial on another target, a reused connection the target had closed on a new one.
func (x *h2Exchange) forward(rule *router.Rule, g *backends.Group, pool backends.H1Pool, escaped, query string, hasQuery bool, host string) {
	rec := &x.rec
	st := x.st
	target := pickTarget(g, &x.hdr, x.client.Addr())
	if target == nil {
		rec.Reason = "no_healthy_target"
		x.errorResponse(503)
		return
	}
	o := &x.out
	setOutgoing(o, rec, st, rule, x.client.Addr(), &x.hdr)
	o.Extra = nil
	if mode := st.certMode(); mode != "" {
		if cs := x.s.ConnInfo().TLS; cs != nil {
			o.Extra = certFields(mode, *cs)
		}
	}
	a := attempts{rec: rec, held: &x.held, g: g, pool: pool, client: x.client.Addr()}
	err := a.run(target, func(target *backends.Target, tc backends.TargetConn) (retry bool) {
		return x.exchange(rule, g, target, tc, pool, escaped, query, hasQuery, host)
	})
	switch {
	case errors.Is(err, errAtLimit):
		rec.Reason = "max_in_flight"
		x.errorResponse(503)
	case err != nil:
		x.targetFailed(err)
	}
}

// errorResponse answers with one of our own short plain-text errors (as the bridge's).
func (x *h2Exchange) errorResponse(status int) {
	x.rec.Status = status
	b := x.head[:0]
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	b = append(b, http.StatusText(status)...)
	b = append(b, '\n')
	n := len(b)
	b = strconv.AppendInt(b, int64(n), 10)
	x.head = b
	x.fields = append(x.fields[:0],
		hpack.HeaderField{Name: "content-type", Value: "text/plain; charset=utf-8"},
		hpack.HeaderField{Name: "x-content-type-options", Value: "nosniff"},
		hpack.HeaderField{Name: "content-length", Value: h1.Str(b[n:])})
	if x.s.WriteHead(status, x.fields, false) == nil {
		x.bw.Write(b[:n])
		x.bw.Flush()
		x.s.WriteData(nil, true)
	}
}

// targetFailed maps a failed exchange (nothing sent to the client yet) to 502/504.
func (x *h2Exchange) targetFailed(err error) {
	status, reason := targetFailure(err)
	x.rec.Reason = reason
	x.errorResponse(status)
}

// exchange sends the request on tc and relays the answer; retry: nothing came back from a
// reused connection and the request may go again on a new one.
func (x *h2Exchange) exchange(rule *router.Rule, g *backends.Group, target *backends.Target,
	tc backends.TargetConn, pool backends.H1Pool, escaped, query string, hasQuery bool, host string) (retry bool) {
	rec := &x.rec
	s := x.s
	conn := tc.Conn()
	x.tw.Reset(conn)
	x.tr.Reset(conn)
	defer x.tr.Release()
	defer x.tw.Release()

	// The outgoing head: request line, the client's kept fields, Host, the tail.
	b := x.tw.Buf()
	var q []byte
	if hasQuery {
		q = strBytes(query)
		if q == nil {
			q = []byte{}
		}
	}
	b = h1.AppendRequestLine(b, strBytes(s.Method), strBytes(escaped), q)
	b = h1.AppendField(b, "Host", host)
	var xff [8][]byte
	prior := xff[:0]
	cookies := 0
	for i := range s.Header {
		hf := &s.Header[i]
		switch hf.Name {
		case "host":
			continue
		case "x-forwarded-for":
			if len(prior) < cap(prior) {
				prior = append(prior, h1.TrimOWS(strBytes(hf.Value)))
			}
			continue
		case "cookie":
			cookies++
			continue
		}
		f := desync.Field{Name: strBytes(hf.Name), Value: strBytes(hf.Value)}
		if x.out.Keep(&f, nil) {
			b = h1.AppendField(b, f.Name, h1.TrimOWS(f.Value))
		}
	}
	if cookies > 0 {
		// RFC 9113 section 8.2.3: split cookie fields are joined for HTTP/1.1.
		f := desync.Field{Name: []byte("Cookie")}
		if x.out.Keep(&f, nil) {
			b = append(b, "Cookie: "...)
			n := 0
			for i := range s.Header {
				if s.Header[i].Name == "cookie" {
					if n > 0 {
						b = append(b, "; "...)
					}
					b = append(b, s.Header[i].Value...)
					n++
				}
			}
			b = append(b, '\r', '\n')
		}
	}
	b = x.out.AppendTail(b, prior, h1.NoBody, 0)
	b = append(b, '\r', '\n')
	x.tw.Commit(b)
	if err := x.tw.Flush(); err != nil {
		tc.Done(false)
		if tc.Reused() {
			return true
		}
		target.ReportFailure()
		x.targetFailed(err)
		return false
	}

	// The target needs a moment to answer, which the connection's other ready workers (and
	// other connections) use to send their own requests: the first read of the answer then
	// rarely finds nothing, saving an EAGAIN read, a park and a poller wake-up per stream, as
	// the HTTP/1 engine does (h1serve.go). When nothing else is ready this returns at once.
	runtime.Gosched()

	// The response head; 1xx answers relayed as they come.
	s.SetInterrupt(conn)
	defer s.SetInterrupt(nil)
	head := s.Method == "HEAD"
	var limit time.Time
	if rt := pool.ResponseTimeout(); rt > 0 {
		limit = time.Now().Add(rt)
	}
	resp := &x.resp
	got := false
	for n1xx := 0; ; {
		err := x.readResponseHead(conn, head, limit)
		if err != nil {
			tc.Done(false)
			if errors.Is(err, errClientGone) {
				rec.Reason = "client_closed"
				return false
			}
			if !got && tc.Reused() && len(x.tr.Buffered()) == 0 && !isTimeout(err) && isIdempotentMethod(s.Method) {
				return true
			}
			target.ReportFailure()
			x.targetFailed(err)
			return false
		}
		got = true
		if resp.Status >= 200 || resp.Status == 101 {
			break
		}
		if n1xx++; n1xx > 5 || resp.Status == 100 {
			// No body was announced, so 100 Continue answers nothing we asked.
			if resp.Status == 100 && n1xx <= 5 {
				x.tr.Discard(resp.HeadLen)
				continue
			}
			tc.Done(false)
			target.ReportFailure()
			x.targetFailed(errors.New("too many 1xx responses"))
			return false
		}
		x.responseFields(rule, nil, head)
		s.WriteInformational(resp.Status, x.fields)
		x.tr.Discard(resp.HeadLen)
	}
	conn.SetReadDeadline(time.Time{})
	x.tr.Discard(resp.HeadLen)
	if resp.Status == 101 {
		// HTTP/2 upgrades nothing, and the request asked for no upgrade.
		tc.Done(false)
		target.ReportFailure()
		x.targetFailed(errors.New("101 to a request that asked no upgrade"))
		return false
	}
	target.ReportSuccess()
	rec.TargetStatus, rec.Status = resp.Status, resp.Status
	var extra []router.HeaderValue
	if c, ok := g.StickySetCookie(target, resp); ok {
		x.extra[0] = router.HeaderValue{Name: "Set-Cookie", Value: c}
		extra = x.extra[:]
	}
	x.responseFields(rule, extra, head)
	rt := g.Config().TargetReadTimeoutDuration()

	var err error
	switch body := x.tr.Buffered(); {
	case resp.Framing == h1.NoBody:
		err = s.WriteHead(resp.Status, x.fields, true)
	case resp.Framing == h1.Sized && int64(len(body)) >= resp.ContentLength:
		// The whole body is here: HEADERS and one DATA frame carrying END_STREAM in the same
		// turn of the writer, straight from the target buffer (no copy through bw, no empty
		// closing frame). WriteData splits what the windows or the frame size do not allow.
		body = body[:resp.ContentLength]
		if err = s.WriteHead(resp.Status, x.fields, false); err == nil {
			if err = s.WriteData(body, true); err == nil {
				x.sent = int64(len(body))
			}
			x.tr.Discard(len(body))
		}
	default:
		if err = s.WriteHead(resp.Status, x.fields, false); err != nil {
			break
		}
		if rt > 0 {
			x.dl = streamDeadline{conn: conn, s: s}
			x.tr.SetTimeout(&x.dl, rt, 0)
		}
		var cerr error
		if resp.Framing == h1.Chunked {
			// Unchunked into DATA frames; the trailer section is kept for a final HEADERS.
			_, cerr = h1.CopyChunkedTrailers(&x.bw, &x.tr, x.onTrailer)
		} else {
			_, cerr = h1.CopyBody(&x.bw, &x.tr, resp.Framing, resp.ContentLength, h1.UntilClose)
		}
		x.tr.SetTimeout(nil, 0, 0)
		if cerr == nil {
			cerr = x.bw.Flush()
		}
		if cerr != nil {
			tc.Done(false)
			switch {
			case x.bw.Err() != nil || s.Closed():
				rec.Reason = "client_closed"
			case isTimeout(cerr):
				rec.Reason = "target_read_timeout"
				target.ReportFailure()
			default:
				rec.Reason = "target_closed_mid_body"
				target.ReportFailure()
			}
			s.Reset(http2.ErrCodeCancel)
			return false
		}
		if len(x.trailAt) > 0 {
			err = s.WriteTrailers(x.trailerFields())
		} else {
			err = s.WriteData(nil, true)
		}
	}
	// The target's part is over: out of the in-flight count before the client sees the end.
	x.held.release()
	s.SetInterrupt(nil)
	if err != nil {
		rec.Reason = "client_closed"
		tc.Done(false)
		return false
	}
	// A reset that raced the end may have moved the connection's deadline: not reused then.
	tc.Done(!resp.Close && len(x.tr.Buffered()) == 0 && resp.Framing != h1.UntilClose && !s.Closed())
	return false
}

// readResponseHead reads and parses the target's next response head into x.resp, until limit
// (zero: none). A reset stream interrupts the read (SetInterrupt).
func (x *h2Exchange) readResponseHead(conn net.Conn, head bool, limit time.Time) error {
	const max = 64 << 10
	for {
		if buf := x.tr.Buffered(); len(buf) > 0 {
			err := x.resp.Parse(buf, max, head)
			if err != h1.ErrIncomplete {
				return err
			}
		}
		conn.SetReadDeadline(limit)
		if x.s.Closed() {
			return errClientGone
		}
		err := x.tr.Fill(max)
		if err == nil {
			continue
		}
		if x.s.Closed() {
			return errClientGone
		}
		if err == io.EOF {
			return io.ErrUnexpectedEOF
		}
		return err
	}
}

// responseFields fills x.fields with the response head for the client: the HTTP/1 engine's
// filtering (hop-by-hop fields, the rule's operations, Extra, Content-Length from the framing)
// written as an HTTP/1.1 head into a scratch buffer, then read back as lower-case HPACK fields
// that view the scratch buffer (valid until the next call).
func (x *h2Exchange) responseFields(rule *router.Rule, extra []router.HeaderValue, head bool) {
	ro := h1.ResponseOut{Ops: rule.ResponseHeaders, Extra: extra, Minor: 1, Head: head}
	b, _ := ro.AppendResponseHead(x.head[:0], &x.resp)
	x.head = b
	x.fields = x.fields[:0]
	// Skip the status line.
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		b = b[i+1:]
	}
	for len(b) > 2 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			break
		}
		line := b[:i-1] // without CRLF
		b = b[i+1:]
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			continue
		}
		name := line[:colon]
		for k, c := range name {
			if c >= 'A' && c <= 'Z' {
				name[k] = c + 'a' - 'A'
			}
		}
		switch string(name) {
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te":
			continue
		}
		x.fields = append(x.fields, hpack.HeaderField{Name: h1.Str(name), Value: h1.Str(line[colon+2:])})
	}
}

// addTrailer keeps one field of a chunked response's trailer section (x.onTrailer), unless it
// may not be a trailer.
func (x *h2Exchange) addTrailer(name, value []byte) {
	start := len(x.trail)
	for _, c := range name {
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		x.trail = append(x.trail, c)
	}
	if !trailerAllowed(x.trail[start:]) {
		x.trail = x.trail[:start]
		return
	}
	mid := len(x.trail)
	x.trail = append(x.trail, value...)
	x.trailAt = append(x.trailAt, start, mid, len(x.trail))
}

// trailerFields is the kept trailer section as HPACK fields viewing x.trail (x.fields reused:
// the response head was encoded when it was queued).
func (x *h2Exchange) trailerFields() []hpack.HeaderField {
	x.fields = x.fields[:0]
	b := h1.Str(x.trail)
	for i := 0; i+2 < len(x.trailAt); i += 3 {
		a, m, e := x.trailAt[i], x.trailAt[i+1], x.trailAt[i+2]
		x.fields = append(x.fields, hpack.HeaderField{Name: b[a:m], Value: b[m:e]})
	}
	return x.fields
}

// trailerAllowed reports whether a trailer field (lower-case name) may be passed on in an
// HTTP/2 trailer section. Left out: connection-specific fields, which make an HTTP/2 field
// section malformed (RFC 9113 section 8.2.2), and the fields that cannot be processed after the
// content (RFC 9110 section 6.5.1: framing, routing, authentication, request modifiers,
// response controls, content format): the list net/http and x/net/http2's server refuse as
// trailers (httpguts.ValidTrailerHeader), plus upgrade.
func trailerAllowed(name []byte) bool {
	if len(name) >= 3 && string(name[:3]) == "if-" {
		return false
	}
	switch string(name) {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
		"trailer", "content-length", "content-range", "content-type", "content-encoding",
		"host", "authorization", "proxy-authorization", "proxy-authenticate", "www-authenticate",
		"realm", "expect", "max-forwards", "range", "cache-control", "pragma":
		return false
	}
	return true
}

// strBytes views s as bytes without copying, for the read-only h1 helpers. Never written to.
func strBytes(s string) []byte {
	if s == "" {
		return nil
	}
	return unsafe.Slice(unsafe.StringData(s), len(s))
}
