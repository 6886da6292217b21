package backends

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1Transport is the HTTP/1.1 client to http and https targets: keep-alive connections pooled
// per target, each request written and its response read on the caller's goroutine.
//
// Why not http.Transport: it runs a reader and a writer goroutine per connection and hands every
// request and response between them and the caller through channels, selects and per-request
// contexts. Under a proxy's load those handoffs cost more CPU than the I/O. On one core (the
// shared bench: wrk and h2load against an nginx origin, medians of 3 interleaved runs) this
// client took Fulcrum from 16.6k to 20.0k requests per CPU-second over HTTP/1.1, 14.5k to 20.7k
// over HTTPS, and 7.8k to 12.1k over h2 fronts.
//
// What it leaves to the standard transport (fallback), which handles them well and rarely:
// protocol upgrades (WebSocket: the response body becomes the raw stream) and Expect:
// 100-continue (the body waits for the target's interim answer).
type h1Transport struct {
	fallback *http.Transport
	dial     func(ctx context.Context, network, addr string) (net.Conn, error)
	scheme   string      // "http", or "https" with tlsConf
	tlsConf  *tls.Config // https: the group's client TLS, offering http/1.1 only
	tlsLimit time.Duration

	responseTimeout time.Duration // for the response head, as http.Transport.ResponseHeaderTimeout
	idleTimeout     time.Duration // an idle connection is closed after this
	maxIdle         int           // idle connections kept per target
	probeAfter      time.Duration // an idle connection older than this is checked before reuse

	hosts sync.Map // target address -> *h1Host
}

// syncBodyMax is the largest request body written before the response is read, on the caller's
// goroutine. The kernels take it whether or not the target reads (Linux defaults: 16 KiB of
// send buffer here, 128 KiB of receive buffer there), so a target that answers without reading
// cannot stall the write. Larger or unsized bodies are written by a goroutine while the response
// is read, as http.Transport does.
const syncBodyMax = 16 << 10

// probeAfter default: a target that closes idle keep-alive connections does so after seconds
// (nginx 75 s, Node 5 s, Apache 5 s), so a connection used within the last second is alive
// without asking the kernel; an older one costs one non-blocking peek.
const defaultProbeAfter = time.Second

// newH1Transport builds the client; tlsConf nil means plain HTTP. Dial, TLS handshake, response
// and idle limits are the fallback transport's, so both behave alike.
func newH1Transport(fallback *http.Transport, tlsConf *tls.Config) *h1Transport {
	t := &h1Transport{
		fallback:        fallback,
		dial:            fallback.DialContext,
		scheme:          "http",
		tlsLimit:        fallback.TLSHandshakeTimeout,
		responseTimeout: fallback.ResponseHeaderTimeout,
		idleTimeout:     fallback.IdleConnTimeout,
		maxIdle:         fallback.MaxIdleConnsPerHost,
		probeAfter:      defaultProbeAfter,
	}
	if tlsConf != nil {
		t.scheme = "https"
		t.tlsConf = tlsConf.Clone()
		t.tlsConf.NextProtos = []string{"http/1.1"}
	}
	return t
}

// h1Host is the idle pool of one target. Its lock is held only to push or pop a connection.
type h1Host struct {
	t     *h1Transport
	addr  string
	tls   *tls.Config // https: with the server name to verify (the target's host unless set)
	mu    sync.Mutex
	idle  []*h1Conn   // oldest first; reuse takes the newest (warm, least likely closed)
	sweep *time.Timer // closes connections idle longer than idleTimeout; armed while any idle
	armed bool
}

type h1Conn struct {
	net.Conn
	host   *h1Host
	br     *bufio.Reader
	bw     *bufio.Writer
	idleAt time.Time
	reused bool
	tcp    *net.TCPConn    // plain TCP: the socket, for the engine's raw reads and writes
	rc     syscall.RawConn // and its RawConn (TargetConn.RawConn)
	noRaw  bool
}

var (
	errStale      = errors.New("idle connection closed by the target")
	errTooMany1xx = errors.New("too many 1xx informational responses")
)

func (t *h1Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != t.scheme || req.Header["Upgrade"] != nil || req.Header["Expect"] != nil {
		return t.fallback.RoundTrip(req)
	}
	if err := validHeaders(req.Header); err != nil {
		closeReqBody(req)
		return nil, err
	}
	ctx := req.Context()
	if err := ctx.Err(); err != nil {
		// Already abandoned (an h2 stream reset at once): do not spend a pooled connection on it.
		closeReqBody(req)
		return nil, err
	}
	h := t.host(req.URL.Host)
	for retry := false; ; retry = true {
		pc, err := h.get(ctx, retry, hasBody(req))
		if err != nil {
			closeReqBody(req)
			return nil, err
		}
		pc.buffers()
		resp, err := t.exchange(ctx, pc, req)
		if err == nil {
			return resp, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		// A kept-alive connection the target had already closed: the request never reached it,
		// so it may go again, once, on a new connection (as http.Transport does). Not with a body:
		// part of it is gone.
		if !retry && errors.Is(err, errStale) && !hasBody(req) {
			continue
		}
		return nil, err
	}
}

// exchange writes req on pc and reads the response head. On error pc is closed.
func (t *h1Transport) exchange(ctx context.Context, pc *h1Conn, req *http.Request) (*http.Response, error) {
	stop := context.AfterFunc(ctx, func() { pc.Close() }) // a client that leaves aborts the exchange
	fail := func(err error) (*http.Response, error) {
		stop()
		pc.Close()
		return nil, err
	}
	var wrote chan error // nil: the request was written synchronously
	if !hasBody(req) || (req.ContentLength >= 0 && req.ContentLength <= syncBodyMax) {
		if err := writeRequest(pc, req); err != nil {
			if pc.reused && !hasBody(req) {
				err = fmt.Errorf("%w: %w", errStale, err)
			}
			return fail(err)
		}
	} else {
		// Owned by this exchange: it ends when the body is sent, the client's body fails, or the
		// connection is closed (early answer, error, cancel).
		wrote = make(chan error, 1)
		go func() {
			err := writeRequest(pc, req)
			if err != nil {
				pc.Close() // unblocks the response read
			}
			wrote <- err
		}()
	}
	if t.responseTimeout > 0 {
		pc.SetReadDeadline(time.Now().Add(t.responseTimeout))
	}
	resp, err := t.readResponse(ctx, pc, req)
	if err != nil {
		if wrote != nil {
			select {
			case werr := <-wrote:
				if werr != nil {
					err = werr // the root cause: a client body that failed, most often
				}
			default:
			}
		}
		return fail(err)
	}
	if t.responseTimeout > 0 {
		pc.SetReadDeadline(time.Time{})
	}
	reuse := !resp.Close && !req.Close
	if resp.Body == http.NoBody {
		finish(pc, stop, wrote, reuse)
		return resp, nil
	}
	resp.Body = &h1Body{rc: resp.Body, pc: pc, stop: stop, wrote: wrote, reuse: reuse}
	return resp, nil
}

func writeRequest(pc *h1Conn, req *http.Request) error {
	if err := req.Write(pc.bw); err != nil {
		return err
	}
	return pc.bw.Flush()
}

// readResponse reads the final response head, passing informational (1xx) ones to the
// request's trace, which ReverseProxy uses to forward them (103 Early Hints).
func (t *h1Transport) readResponse(ctx context.Context, pc *h1Conn, req *http.Request) (*http.Response, error) {
	if _, err := pc.br.Peek(1); err != nil {
		if pc.reused && isIdempotent(req) {
			err = fmt.Errorf("%w: %w", errStale, err)
		}
		return nil, err
	}
	for n := 0; ; n++ {
		resp, err := http.ReadResponse(pc.br, req)
		if err != nil {
			return nil, err
		}
		code := resp.StatusCode
		if code >= 200 || code == http.StatusSwitchingProtocols {
			if code == http.StatusSwitchingProtocols {
				return nil, errors.New("101 Switching Protocols to a request that asked no upgrade")
			}
			return resp, nil
		}
		if n == 5 {
			return nil, errTooMany1xx
		}
		if trace := httptrace.ContextClientTrace(ctx); trace != nil && trace.Got1xxResponse != nil {
			if err := trace.Got1xxResponse(code, textproto.MIMEHeader(resp.Header)); err != nil {
				return nil, err
			}
		}
	}
}

// finish ends an exchange: the connection goes back to the pool when both sides allow it, the
// cancel hook had not fired, the request body was fully sent and nothing more came; else it is
// closed.
func finish(pc *h1Conn, stop func() bool, wrote chan error, reuse bool) {
	// Bytes after the response are an answer nobody asked for: the connection is out of step.
	if reuse && stop() && sent(wrote) && pc.br.Buffered() == 0 {
		pc.host.put(pc)
		return
	}
	stop()
	pc.Close()
}

// sent reports whether an asynchronous body write ended well. Still running means the target
// answered before the upload ended: the connection cannot carry another request.
func sent(wrote chan error) bool {
	if wrote == nil {
		return true
	}
	select {
	case err := <-wrote:
		return err == nil
	default:
		return false
	}
}

// h1Body is a response body; its end decides the connection's fate.
type h1Body struct {
	rc    io.ReadCloser
	pc    *h1Conn
	stop  func() bool
	wrote chan error
	reuse bool
	done  bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	n, err := b.rc.Read(p)
	if err != nil {
		b.done = true
		finish(b.pc, b.stop, b.wrote, b.reuse && err == io.EOF)
	}
	return n, err
}

// Close before the end closes the connection. It never drains: the rest may be endless.
func (b *h1Body) Close() error {
	if !b.done {
		b.done = true
		b.stop()
		b.pc.Close()
	}
	return nil
}

func (t *h1Transport) host(addr string) *h1Host {
	if h, ok := t.hosts.Load(addr); ok {
		return h.(*h1Host)
	}
	nh := &h1Host{t: t, addr: addr}
	if t.tlsConf != nil {
		nh.tls = t.tlsConf
		if nh.tls.ServerName == "" {
			// As http.Transport: verify the name the target is addressed by.
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				host = addr
			}
			nh.tls = t.tlsConf.Clone()
			nh.tls.ServerName = host
		}
	}
	h, _ := t.hosts.LoadOrStore(addr, nh)
	return h.(*h1Host)
}

// get returns an idle connection that is still open, or a new one (always new when fresh).
// A request with a body cannot be retried on a stale connection, so its connection is always
// peeked at: one non-blocking syscall.
func (h *h1Host) get(ctx context.Context, fresh, probe bool) (*h1Conn, error) {
	for !fresh {
		h.mu.Lock()
		n := len(h.idle)
		if n == 0 {
			h.mu.Unlock()
			break
		}
		pc := h.idle[n-1]
		h.idle[n-1] = nil
		h.idle = h.idle[:n-1]
		h.mu.Unlock()
		idle := time.Since(pc.idleAt)
		if idle < h.t.idleTimeout && ((!probe && idle < h.t.probeAfter) || peekOpen(pc.Conn)) {
			return pc, nil
		}
		pc.Close()
	}
	c, err := h.t.dial(ctx, "tcp", h.addr)
	if err != nil {
		return nil, err
	}
	if h.tls != nil {
		tc := tls.Client(c, h.tls)
		hctx, cancel := ctx, context.CancelFunc(func() {})
		if h.t.tlsLimit > 0 {
			hctx, cancel = context.WithTimeout(ctx, h.t.tlsLimit)
		}
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("tls handshake with %s: %w", h.addr, err)
		}
		c = tc
	}
	return &h1Conn{Conn: c, host: h}, nil
}

func (h *h1Host) put(pc *h1Conn) {
	pc.idleAt = time.Now()
	pc.reused = true
	h.mu.Lock()
	if len(h.idle) >= h.t.maxIdle {
		h.mu.Unlock()
		pc.Close()
		return
	}
	h.idle = append(h.idle, pc)
	if !h.armed {
		h.armed = true
		if h.sweep == nil {
			h.sweep = time.AfterFunc(h.t.idleTimeout, h.sweepIdle)
		} else {
			h.sweep.Reset(h.t.idleTimeout)
		}
	}
	h.mu.Unlock()
}

// sweepIdle closes the connections idle for idleTimeout and re-arms for the oldest left.
func (h *h1Host) sweepIdle() {
	now := time.Now()
	h.mu.Lock()
	i := 0
	for i < len(h.idle) && now.Sub(h.idle[i].idleAt) >= h.t.idleTimeout {
		i++
	}
	expired := make([]*h1Conn, i)
	copy(expired, h.idle[:i])
	h.idle = append(h.idle[:0], h.idle[i:]...)
	clear(h.idle[len(h.idle):cap(h.idle)])
	if len(h.idle) > 0 {
		h.sweep.Reset(h.t.idleTimeout - now.Sub(h.idle[0].idleAt))
	} else {
		h.armed = false
	}
	h.mu.Unlock()
	for _, pc := range expired {
		pc.Close()
	}
}

// CloseIdleConnections closes every idle connection; connections in use close or idle out later.
func (t *h1Transport) CloseIdleConnections() {
	t.hosts.Range(func(_, v any) bool {
		h := v.(*h1Host)
		h.mu.Lock()
		idle := h.idle
		h.idle = nil
		if h.armed {
			h.sweep.Stop()
			h.armed = false
		}
		h.mu.Unlock()
		for _, pc := range idle {
			pc.Close()
		}
		return true
	})
	t.fallback.CloseIdleConnections()
}

func hasBody(req *http.Request) bool { return req.Body != nil && req.Body != http.NoBody }

func closeReqBody(req *http.Request) {
	if hasBody(req) {
		req.Body.Close()
	}
}

// isIdempotent: a request that may be sent twice if the first copy may have been lost.
func isIdempotent(req *http.Request) bool {
	if hasBody(req) {
		return false
	}
	switch req.Method {
	case "GET", "HEAD", "OPTIONS", "TRACE":
		return true
	}
	return req.Header["Idempotency-Key"] != nil || req.Header["X-Idempotency-Key"] != nil
}

// validHeaders refuses what http.Transport refuses: a field a target would misparse.
func validHeaders(h http.Header) error {
	for k, vv := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Errorf("net/http: invalid header field name %q", k)
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return fmt.Errorf("net/http: invalid header field value for %q", k)
			}
		}
	}
	return nil
}
