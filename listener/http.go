package listener

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/h1"
	"github.com/fulcrum-lb/fulcrum/router"
)

// httpState is one generation of an HTTP listener: everything a request needs, built once per
// configuration and swapped atomically on reload. A request loads it once and keeps it.
type httpState struct {
	cfg     *configs.Listener
	table   *router.Table
	actions [][]*groupProxy // by router rule ID: the proxies of the action's groups, in action order
	trusted []netip.Prefix  // trusted_forwarders, matched against the client (after PROXY)
	tlsOn   bool
	xff     h1.XFFMode // xff, parsed once
	proto   string     // X-Forwarded-Proto
	port    string     // X-Forwarded-Port
	// The same two as header values, shared by every request of the generation so that setting
	// them costs no allocation. Read-only; cap == len, so an append elsewhere copies.
	protoHdr, portHdr []string
	desync            desync.Mode
	obs               Observer
	// acme answers pending HTTP-01 challenges (the certificate manager outlives generations).
	acme interface {
		HandleHTTPChallenge(http.ResponseWriter, *http.Request) bool
	}
}

// groupProxy is the reverse proxy of one target group within one listener generation.
type groupProxy struct {
	group *backends.Group
	rp    *httputil.ReverseProxy
}

// reqInfo is what one request carries through the proxy. It is pooled: a request borrows one in
// ServeHTTP and returns it when the response is written.
type reqInfo struct {
	st           *httpState
	rule         *router.Rule
	group        *backends.Group
	target       *backends.Target
	client       netip.AddrPort
	trusted      bool            // the client is in trusted_forwarders: its forwarding headers are believed
	closeAfter   bool            // desync: forward, then close both connections
	body         *bodyWatcher    // the client's request body, nil when there is none
	resp         *releaseBody    // the target's response body, nil when there is none
	cancel       func()          // cancels the exchange with the target (target_read_timeout)
	clientCtx    context.Context // the client request's own context
	reason       string          // error reason for the access log
	requestID    string
	start        time.Time
	targetAddr   string
	requestDur   time.Duration // until the request was first sent to a target
	targetDur    time.Duration // from sending to the target's response headers
	targetStatus int           // what the target answered, 0 when it did not
	actions      Actions
	redirectURL  string
}

type ctxKey struct{}

var reqInfoPool = sync.Pool{New: func() any { return new(reqInfo) }}

func infoOf(r *http.Request) *reqInfo {
	ri, _ := r.Context().Value(ctxKey{}).(*reqInfo)
	return ri
}

// errNoTarget means no healthy target: the client gets 503 without any dial.
var errNoTarget = errors.New("no healthy target")

// errOverCap means the targets picked were at the group's max_in_flight: 503 without any dial.
var errOverCap = errors.New("targets at max_in_flight")

// ServeHTTP is the per-request entry point of every HTTP listener.
func (st *httpState) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ri := reqInfoPool.Get().(*reqInfo)
	*ri = reqInfo{st: st, start: time.Now()}
	defer reqInfoPool.Put(ri)

	ri.client = clientAddrPort(r.RemoteAddr)
	ri.trusted = inPrefixes(st.trusted, ri.client.Addr())
	sw := acquireStatusWriter(w)
	defer releaseStatusWriter(sw)
	sw.pace = newPace(st.cfg.SendTimeoutDuration(), st.cfg.MinTransferRate)

	// A response the proxy aborts mid-way (a target that stalls or dies mid-body, a client
	// that stops reading) ends in panic(http.ErrAbortHandler), which closes the client's
	// connection or resets its stream. It is still a request: log and count it on the way out.
	aborted := true
	defer func() {
		if aborted {
			ri.reason = abortReason(ri, sw)
			if st.obs != nil {
				st.observe(r, ri, sw)
			}
		}
	}()
	st.serve(sw, r, ri)
	aborted = false
	if st.obs != nil {
		st.observe(r, ri, sw)
	}
}

// abortReason says why a response was aborted after it began.
func abortReason(ri *reqInfo, sw *statusWriter) string {
	switch {
	case ri.resp != nil && ri.resp.stalled.Load():
		return "target_read_timeout"
	case ri.resp != nil && ri.resp.failed:
		return "target_closed_mid_body"
	case sw.werr != nil && errors.Is(sw.werr, os.ErrDeadlineExceeded):
		return "send_timeout"
	case sw.werr != nil:
		return "client_closed"
	case ri.reason != "":
		return ri.reason
	}
	return "response_aborted"
}

// observe hands the finished request to metrics and the access log.
func (st *httpState) observe(r *http.Request, ri *reqInfo, sw *statusWriter) {
	rec := recordPool.Get().(*RequestRecord)
	*rec = RequestRecord{
		Listener:        st.cfg.Name,
		Time:            ri.start,
		Duration:        time.Since(ri.start),
		RequestDuration: ri.requestDur,
		TargetDuration:  ri.targetDur,
		TargetStatus:    ri.targetStatus,
		Client:          ri.client,
		Target:          ri.targetAddr,
		Status:          sw.status,
		BytesIn:         ri.bytesIn(r),
		BytesOut:        sw.written,
		Method:          r.Method,
		URI:             r.RequestURI,
		Proto:           r.Proto,
		Host:            r.Host,
		UserAgent:       r.UserAgent(),
		RequestID:       ri.requestID,
		Reason:          ri.reason,
		RulePriority:    -1,
		Actions:         ri.actions,
		RedirectURL:     ri.redirectURL,
	}
	if ri.group != nil {
		rec.Group = ri.group.Name()
	}
	if ri.rule != nil {
		rec.RulePriority = ri.rule.Priority
	}
	if cs, ok := connTLS(r); ok {
		rec.TLSVersion, rec.Cipher, rec.SNI = cs.Version, cs.CipherSuite, cs.ServerName
	}
	st.obs.Request(rec)
	recordPool.Put(rec)
}

func (st *httpState) serve(w *statusWriter, r *http.Request, ri *reqInfo) {

	// ACME HTTP-01 answers come before any rule, redirect or fixed response (CAs follow
	// redirects to https, so HTTPS listeners answer too). Idle cost: ~2 ns, 0 allocs.
	if st.acme != nil && st.acme.HandleHTTPChallenge(w, r) {
		return
	}
	rule := st.table.MatchHTTP(r, r.Host, ri.client.Addr())
	ri.rule = rule
	a := rule.Action
	switch a.Kind {
	case router.ActionFixedResponse:
		if rule.ResponseHeaders != nil {
			rule.ResponseHeaders.Apply(w.Header())
		}
		ri.actions = ActionsFixedResponse
		a.WriteFixed(w)
	case router.ActionRedirect:
		if rule.ResponseHeaders != nil {
			rule.ResponseHeaders.Apply(w.Header())
		}
		ri.actions, ri.redirectURL = ActionsRedirect, a.RedirectLocation(r, r.Host, st.tlsOn, st.port)
		w.Header().Set("Location", ri.redirectURL)
		w.WriteHeader(a.RedirectStatus())
	default:
		ri.actions = ActionsForward
		proxies := st.actions[rule.ID]
		i := 0
		if len(proxies) > 1 {
			i = a.PickGroup(rand.Uint64())
		}
		gp := proxies[i]
		ri.group = gp.group
		// The proxy works on a shallow copy: net/http must keep seeing its own body type on r,
		// or after an early answer it drains up to 256 KiB of an unwanted upload before replying
		// instead of closing the connection.
		ri.clientCtx = r.Context()
		ctx := context.WithValue(r.Context(), ctxKey{}, ri)
		if gp.group.Config().TargetReadTimeoutDuration() > 0 {
			// target_read_timeout ends a stalled response by cancelling the exchange (closing
			// the body under a pending read is not safe with every transport).
			var cancel context.CancelFunc
			ctx, cancel = context.WithCancel(ctx)
			defer cancel()
			ri.cancel = cancel
		}
		out := r.WithContext(ctx)
		if r.Body != nil && r.Body != http.NoBody {
			bw := &bodyWatcher{ReadCloser: r.Body, pace: newPace(st.cfg.ClientBodyTimeoutDuration(), st.cfg.MinTransferRate)}
			ri.body = bw
			out.Body = bw
		}
		gp.rp.ServeHTTP(w, out)
	}
}

// newGroupProxy builds the reverse proxy of one group for one listener generation.
func (st *httpState) newGroupProxy(g *backends.Group) *groupProxy {
	scheme := "http"
	if g.Config().Protocol == "https" {
		scheme = "https"
	}
	if st.protoHdr == nil { // built once per generation, before it serves (runtime.buildHTTPState)
		st.protoHdr = []string{st.proto}
		st.portHdr = []string{st.port}
	}
	gp := &groupProxy{group: g}
	gp.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = scheme
			pr.Out.URL.Host = "target.invalid" // the transport sets the picked target
			pr.Out.Host = pr.In.Host           // ALB forwards the client's Host
			st.rewrite(pr)
		},
		Transport:      &pickTransport{group: g},
		ModifyResponse: st.modifyResponse,
		ErrorHandler:   st.errorHandler,
		BufferPool:     bufferPool{},
		ErrorLog:       discardLog,
	}
	return gp
}

// rewrite sets the forwarded headers, the request id and the rule's header operations.
// ReverseProxy has already removed hop-by-hop headers (including those named in Connection)
// and the inbound X-Forwarded-* headers, so nothing a client sends can remove ours.
func (st *httpState) rewrite(pr *httputil.ProxyRequest) {
	ri := infoOf(pr.In)
	h := pr.Out.Header
	if !ri.trusted || st.cfg.DropInvalidHeaderFields {
		screenHeaders(h, ri.trusted, st.cfg.DropInvalidHeaderFields)
	}
	if ca := st.cfg.ClientAuth; ca != nil && (ca.Mode == clientAuthPass || ca.Mode == clientAuthVer) {
		if cs, ok := connTLS(pr.In); ok {
			setClientCertHeaders(h, ca.Mode, cs)
		}
	}
	client := clientIP(pr.In.RemoteAddr, ri.client)
	prior := pr.In.Header.Values("X-Forwarded-For")
	switch st.xff {
	case h1.XFFRemove:
		h.Del("X-Forwarded-For")
	case h1.XFFPreserve:
		// ALB preserve: send the header unchanged. We believe it only from a trusted peer; from
		// anyone else the chain would be a forgery, so the target gets the peer alone.
		if ri.trusted {
			if len(prior) > 0 {
				h["X-Forwarded-For"] = prior
			}
		} else {
			h.Set("X-Forwarded-For", client)
		}
	default: // append
		if ri.trusted && len(prior) > 0 {
			h.Set("X-Forwarded-For", strings.Join(prior, ", ")+", "+client)
		} else {
			h.Set("X-Forwarded-For", client)
		}
	}
	if ri.trusted {
		// ReverseProxy removed Forwarded for everyone; a trusted forwarder's chain is kept, as
		// its X-Forwarded-For is.
		if fwd := pr.In.Header["Forwarded"]; len(fwd) > 0 {
			h["Forwarded"] = fwd
		}
	}
	h["X-Forwarded-Proto"] = st.protoHdr
	h["X-Forwarded-Port"] = st.portHdr

	id := ""
	if ri.trusted {
		id = pr.In.Header.Get("X-Request-Id")
	}
	if id == "" || len(id) > 200 {
		id = newRequestID()
	}
	ri.requestID = id
	h.Set("X-Request-Id", id)

	if ops := ri.rule.RequestHeaders; ops != nil {
		ops.Apply(h)
	}
	if ri.closeAfter {
		pr.Out.Close = true // the target connection is not reused after an ambiguous request
	}
}

func (st *httpState) modifyResponse(resp *http.Response) error {
	ri := infoOf(resp.Request)
	if ri == nil {
		return nil
	}
	if ops := ri.rule.ResponseHeaders; ops != nil {
		ops.Apply(resp.Header)
	}
	if ri.group != nil && ri.target != nil {
		ri.group.SetSticky(resp.Header, ri.target)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The connection becomes a WebSocket (or other upgraded) stream: no more HTTP heads.
		if dc := desync.ConnFromContext(resp.Request.Context()); dc != nil {
			dc.StopSniffing()
		}
	}
	return nil
}

// errorHandler maps proxy errors to statuses a user can tell apart.
func (st *httpState) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	ri := infoOf(r)
	status := http.StatusBadGateway
	reason := "target_error"
	var ne net.Error
	switch {
	case errors.Is(err, errNoTarget):
		status, reason = http.StatusServiceUnavailable, "no_healthy_target"
	case errors.Is(err, errOverCap):
		status, reason = http.StatusServiceUnavailable, "max_in_flight"
	case ri != nil && ri.body.slow():
		status, reason = http.StatusRequestTimeout, "client_body_timeout"
	case ri != nil && ri.body.failed():
		status, reason = http.StatusBadRequest, "client_body_error"
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away; nobody reads the answer. 499 is nginx's word for it.
		status, reason = 499, "client_closed"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		status, reason = http.StatusGatewayTimeout, "target_timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		reason = "target_refused"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		reason = "target_closed"
	}
	if ri != nil {
		ri.reason = reason
	}
	if status == 499 {
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if status == http.StatusBadRequest || status == http.StatusRequestTimeout {
		w.Header().Set("Connection", "close")
	}
	w.WriteHeader(status)
	fmt.Fprintf(w, "%d %s\n", status, http.StatusText(status))
}

// pickTransport picks the target for each request, counts it in flight until the response body
// is closed, reports passive health, and retries a request that never reached a target (a
// refused dial, no body sent) once on another target.
type pickTransport struct {
	group *backends.Group
}

func (t *pickTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ri := infoOf(req)
	g := t.group
	target := g.StickyTarget(req)
	if target == nil {
		target = g.Pick(ri.client.Addr(), nil)
	}
	if target == nil {
		return nil, errNoTarget
	}
	rt := g.Transport()
	limit := g.MaxInFlight()
	for attempt := 0; ; attempt++ {
		if !target.TryAcquire(limit) {
			// At its max_in_flight: one other target, else 503 at once rather than a pile-up.
			next := g.Pick(ri.client.Addr(), target)
			if next == nil || next == target || !next.TryAcquire(limit) {
				return nil, errOverCap
			}
			target = next
		}
		req.URL.Host = target.Addr()
		ri.target, ri.targetAddr = target, target.Addr()
		t0 := time.Now()
		if attempt == 0 {
			ri.requestDur = t0.Sub(ri.start)
		}
		resp, err := rt.RoundTrip(req)
		ri.targetDur = time.Since(t0)
		if err == nil {
			ri.targetStatus = resp.StatusCode
			target.ReportSuccess()
			resp.Body = wrapBody(resp.Body, target, ri, g.Config().TargetReadTimeoutDuration())
			return resp, nil
		}
		target.Release()
		if ri.body.failed() || req.Context().Err() != nil {
			return nil, err // the client's fault, not the target's
		}
		target.ReportFailure()
		if attempt == 0 && neverSent(err) && (req.Body == nil || req.Body == http.NoBody) {
			if next := g.Pick(ri.client.Addr(), target); next != nil && next != target {
				target = next
				continue
			}
		}
		return nil, err
	}
}

// neverSent reports whether err means the request never left us: the dial failed.
func neverSent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// releaseBody releases the target's in-flight slot when the response body is done, and bounds
// each wait for the target's next bytes by target_read_timeout: a target that stalls mid-body
// has its body closed under the read, which fails the copy, so the client's connection is
// aborted (never a cut-short response presented as complete). A read that fails because of the
// target (stall, reset, close before the end) is a failure for passive health.
type releaseBody struct {
	io.ReadCloser
	once   sync.Once
	target *backends.Target

	timeout time.Duration
	timer   *time.Timer     // armed only while a read waits on the target
	cancel  func()          // ends the exchange when the timer fires
	client  context.Context // the client's request: a read failing because it ended is not the target's fault
	stalled atomic.Bool     // the timer fired
	failed  bool            // a read failed for the target's reasons (reported once)
}

func (b *releaseBody) Read(p []byte) (int, error) {
	if b.timeout > 0 {
		if b.timer == nil {
			b.timer = time.AfterFunc(b.timeout, b.stall)
		} else {
			b.timer.Reset(b.timeout)
		}
	}
	n, err := b.ReadCloser.Read(p)
	if b.timer != nil {
		b.timer.Stop()
	}
	if err != nil && err != io.EOF && !b.failed && (b.stalled.Load() || b.client == nil || b.client.Err() == nil) {
		b.failed = true
		b.target.ReportFailure()
	}
	return n, err
}

// stall runs on the timer's goroutine: cancelling the exchange makes the pending read fail.
func (b *releaseBody) stall() {
	b.stalled.Store(true)
	b.cancel()
}

func (b *releaseBody) Close() error {
	if b.timer != nil {
		b.timer.Stop()
	}
	err := b.ReadCloser.Close()
	b.once.Do(b.target.Release)
	return err
}

// releaseRWBody keeps an upgraded (101) body writable, as ReverseProxy requires for WebSockets.
type releaseRWBody struct {
	releaseBody
	w io.Writer
}

func (b *releaseRWBody) Write(p []byte) (int, error) { return b.w.Write(p) }

func wrapBody(body io.ReadCloser, t *backends.Target, ri *reqInfo, readTimeout time.Duration) io.ReadCloser {
	if rw, ok := body.(io.ReadWriteCloser); ok {
		// Upgraded (WebSocket): a long silence is normal; idle_timeout governs it.
		return &releaseRWBody{releaseBody: releaseBody{ReadCloser: rw, target: t}, w: rw}
	}
	b := &releaseBody{ReadCloser: body, target: t, client: ri.clientCtx}
	if ri.cancel != nil {
		b.timeout, b.cancel = readTimeout, ri.cancel
	}
	ri.resp = b
	return b
}

// bodyWatcher remembers a failed read of the client's body so the error maps to 400, not 502.
// It is not pooled and records into itself, atomically: the transport may still be reading the
// body after the handler returned (a target that answered before the upload ended), while the
// handler goroutine and the pooled reqInfo have moved on.
type bodyWatcher struct {
	io.ReadCloser
	bad, eof atomic.Bool
	read     atomic.Int64 // body bytes the target was sent (the transport reads on its own goroutine)

	// pace (client_body_timeout, min_transfer_rate) sets a read deadline through dl before
	// each read of the body: the HTTP/1 connection, or the HTTP/2 stream.
	pace     pace
	dl       interface{ SetReadDeadline(time.Time) error }
	timedOut atomic.Bool // a read failed on the pace's deadline

}

func (b *bodyWatcher) Read(p []byte) (int, error) {
	n, err := b.pacedRead(p)
	b.read.Add(int64(n))
	if err != nil && err != io.EOF {
		b.bad.Store(true)
	}
	return n, err
}

// pacedRead reads from the client under the pace's deadline. At the end of the body it clears
// the deadline: net/http then starts a background read on an HTTP/1 connection, which a
// leftover deadline would fail, cancelling the context of a later request.
func (b *bodyWatcher) pacedRead(p []byte) (int, error) {
	paced := b.pace.on() && b.dl != nil
	var t0 time.Time
	if paced {
		t0 = time.Now()
		b.dl.SetReadDeadline(b.pace.deadline(t0))
	}
	n, err := b.ReadCloser.Read(p)
	if paced {
		b.pace.done(n, time.Since(t0))
	}
	switch {
	case err == io.EOF:
		b.eof.Store(true)
		if paced {
			b.dl.SetReadDeadline(time.Time{})
		}
	case err != nil && paced && errors.Is(err, os.ErrDeadlineExceeded):
		b.timedOut.Store(true)
	}
	return n, err
}

func (b *bodyWatcher) failed() bool { return b != nil && b.bad.Load() }

func (b *bodyWatcher) slow() bool { return b != nil && b.timedOut.Load() }

// bytesIn is the request body bytes read: the Content-Length when the body was never read (a
// fixed response), 0 when there is neither.
func (ri *reqInfo) bytesIn(r *http.Request) int64 {
	if ri.body != nil {
		if n := ri.body.read.Load(); n > 0 {
			return n
		}
	}
	return max(r.ContentLength, 0)
}

func badRequest(w http.ResponseWriter, msg string) {
	w.Header().Set("Connection", "close")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusBadRequest)
	io.WriteString(w, "400 Bad Request: "+msg+"\n")
}

func newRequestID() string {
	var b [16]byte
	crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// clientIP is the client's address for X-Forwarded-For. It is the host part of RemoteAddr, which
// net formats canonically, so the common case is a substring and costs no allocation; an
// IPv4-mapped IPv6 peer is written as IPv4.
func clientIP(remote string, ap netip.AddrPort) string {
	a := ap.Addr()
	if !a.IsValid() || a.Is4In6() || a.Zone() != "" {
		return a.Unmap().String()
	}
	host := remote
	if i := strings.LastIndexByte(host, ':'); i > 0 {
		host = host[:i]
	}
	if len(host) > 1 && host[0] == '[' && host[len(host)-1] == ']' {
		host = host[1 : len(host)-1]
	}
	return host
}

// clientAddrPort parses a RemoteAddr without allocating ("ip:port" or "[ip6]:port").
func clientAddrPort(s string) netip.AddrPort {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}
	}
	return ap
}

func inPrefixes(ps []netip.Prefix, a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func portOf(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	if _, err := strconv.Atoi(p); err != nil {
		return ""
	}
	return p
}

// bufferPool lends ReverseProxy its 32 KiB copy buffers instead of allocating one per request.
type bufferPool struct{}

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *copyBuffers.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { copyBuffers.Put(&b) }
