// Command ioproto is a PROTOTYPE, kept only to reproduce the I/O-model comparison in the README
// ("How it works" / "Choosing the I/O model"). It is not Fulcrum and is not shipped: it is the
// event-loop alternative (b) to Fulcrum's goroutine-per-connection engine (a), built on
// github.com/lesismal/nbio (epoll loop, non-blocking sockets) with nbio's TLS extension (a
// non-blocking fork of crypto/tls), doing the same work per request as the bench asks of every
// peer: HTTP/1.1 keep-alive proxying to one origin with X-Forwarded-For, -Proto, -Port and
// X-Request-Id added, upstream connections pooled and reused.
//
// It parses with Fulcrum's own listener/h1 parser and head writers (one parser: the framing
// guarantees are the engine's, not nbio's), so the comparison isolates the I/O model: one epoll
// loop goroutine runs every client and upstream connection, callbacks parse the bytes nbio hands
// over and write without blocking; nothing waits in a goroutine per connection.
//
// Left out on purpose (a prototype): routing rules, health checks, timeouts, access logs,
// metrics, mitigation modes (it forwards what the parser can frame and refuses the rest with 400,
// like monitor mode), upgrades, write backpressure (nbio queues without bound), graceful close.
// Upstream connections are dialled blocking from the loop when the pool is empty (loopback, at
// pool fill only).
//
//	ioproto -http 127.0.0.1:8080 -https 127.0.0.1:8443 -origin 127.0.0.1:9000 -cert c.pem -key k.pem
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"

	"github.com/lesismal/llib/std/crypto/tls"
	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/mempool"

	"github.com/fulcrum-lb/fulcrum/listener/h1"
)

// Config is what the prototype serves.
type Config struct {
	HTTP, HTTPS string // listen addresses ("" = off)
	Origin      string // host:port of the plain-HTTP origin
	Cert, Key   string // PEM files for HTTPS
	MaxHead     int    // largest request or response head
}

func main() {
	var cfg Config
	flag.StringVar(&cfg.HTTP, "http", "127.0.0.1:8080", "plain HTTP/1.1 listen address")
	flag.StringVar(&cfg.HTTPS, "https", "", "HTTPS listen address (needs -cert and -key)")
	flag.StringVar(&cfg.Origin, "origin", "127.0.0.1:9000", "origin host:port (plain HTTP/1.1)")
	flag.StringVar(&cfg.Cert, "cert", "", "certificate PEM")
	flag.StringVar(&cfg.Key, "key", "", "private key PEM")
	flag.IntVar(&cfg.MaxHead, "max-head", 64<<10, "largest head in bytes")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	p, err := Start(cfg)
	if err != nil {
		log.Fatal(err)
	}
	<-ctx.Done()
	p.Stop()
}

// Proxy is one nbio engine with ONE poller. OnData runs on the loop goroutine, but nbio runs
// OnOpen on its acceptor goroutine and OnClose on a goroutine of its own (Engine.Async), so the
// state below is guarded by mu; it is uncontended but at accept and close.
type Proxy struct {
	mu        sync.Mutex
	cfg       Config
	ports     map[int]bool // local ports of our listeners (tells accepted from dialled)
	eng       *nbio.Engine
	tlsCfg    *tls.Config
	httpsPort int

	idle    []*upstream // pooled upstream connections
	req     h1.Request  // the head being parsed: only used within one callback, so one per loop
	wbuf    []byte      // what one callback sends (head + first body bytes in one write)
	plain   []byte      // decrypted bytes of one TLS read
	freeBuf [][]byte    // carry-over buffers of idle connections go back here
}

// Start listens and runs the loop until Stop.
func Start(cfg Config) (*Proxy, error) {
	if cfg.MaxHead <= 0 {
		cfg.MaxHead = 64 << 10
	}
	p := &Proxy{cfg: cfg, wbuf: make([]byte, 0, 64<<10), plain: make([]byte, 32<<10)}
	var addrs []string
	if cfg.HTTP != "" {
		addrs = append(addrs, cfg.HTTP)
	}
	if cfg.HTTPS != "" {
		cert, err := tls.LoadX509KeyPair(cfg.Cert, cfg.Key)
		if err != nil {
			return nil, fmt.Errorf("load certificate: %w", err)
		}
		p.tlsCfg = &tls.Config{
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS13,
			NextProtos:   []string{"http/1.1"},
		}
		addrs = append(addrs, cfg.HTTPS)
	}
	p.eng = nbio.NewEngine(nbio.Config{
		Network: "tcp",
		Addrs:   addrs,
		NPoller: 1,
		// The poller's read buffer is shared by all connections (nbio reads into it and hands
		// the bytes to OnData); 64 KiB reads whole pipelines and large bodies at once.
		ReadBufferSize: 64 << 10,
	})
	p.ports = map[int]bool{}
	for _, a := range addrs {
		_, port, _ := net.SplitHostPort(a)
		n, _ := strconv.Atoi(port)
		p.ports[n] = true
	}
	if cfg.HTTPS != "" {
		_, port, _ := net.SplitHostPort(cfg.HTTPS)
		p.httpsPort, _ = strconv.Atoi(port)
	}
	p.eng.OnOpen(p.onOpen)
	p.eng.OnData(p.onData)
	p.eng.OnClose(p.onClose)
	if err := p.eng.Start(); err != nil {
		return nil, fmt.Errorf("start event loop: %w", err)
	}
	return p, nil
}

// Stop closes the listeners and every connection.
func (p *Proxy) Stop() { p.eng.Stop() }

func (p *Proxy) getBuf() []byte {
	if n := len(p.freeBuf); n > 0 {
		b := p.freeBuf[n-1]
		p.freeBuf = p.freeBuf[:n-1]
		return b[:0]
	}
	return make([]byte, 0, 4096)
}

func (p *Proxy) putBuf(b []byte) {
	if cap(b) == 0 || cap(b) > 64<<10 {
		return
	}
	p.freeBuf = append(p.freeBuf, b[:0])
}

// onOpen runs on the acceptor goroutine for accepted connections (and on the loop, under mu,
// for the upstream connections borrow adds: those have an ephemeral local port and are skipped).
func (p *Proxy) onOpen(c *nbio.Conn) {
	la, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok || !p.ports[la.Port] {
		return
	}
	cl := p.newClient(c)
	p.mu.Lock()
	c.SetSession(cl)
	p.mu.Unlock()
}

func (p *Proxy) onData(c *nbio.Conn, data []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch s := c.Session().(type) {
	case *upstream:
		s.onData(data)
	case *client:
		s.feed(data)
	}
}

func (p *Proxy) onClose(c *nbio.Conn, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch s := c.Session().(type) {
	case *upstream:
		s.onClose()
	case *client:
		s.onClose()
	}
}

func (p *Proxy) newClient(c *nbio.Conn) *client {
	cl := &client{p: p, c: c}
	cl.out.Proto, cl.out.Port = "http", ""
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		cl.out.Client = ta.AddrPort().Addr()
	}
	if la, ok := c.LocalAddr().(*net.TCPAddr); ok {
		cl.out.Port = strconv.Itoa(la.Port)
		if p.tlsCfg != nil && la.Port == p.httpsPort {
			cl.out.Proto = "https"
			cl.tls = tls.NewConn(c, p.tlsCfg, false, true, mempool.DefaultMemPool)
		}
	}
	return cl
}

// borrow returns a pooled upstream connection, or dials one (blocking: loopback, pool fill only).
func (p *Proxy) borrow() (*upstream, error) {
	for n := len(p.idle); n > 0; n = len(p.idle) {
		u := p.idle[n-1]
		p.idle = p.idle[:n-1]
		if !u.dead {
			return u, nil
		}
	}
	nc, err := net.Dial("tcp", p.cfg.Origin)
	if err != nil {
		return nil, fmt.Errorf("dial origin: %w", err)
	}
	c, err := p.eng.AddConn(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("add origin connection to the loop: %w", err)
	}
	u := &upstream{p: p, c: c}
	c.SetSession(u)
	return u, nil
}

// ---------------------------------------------------------------------------------------------
// client side

type client struct {
	p   *Proxy
	c   *nbio.Conn
	tls *tls.Conn // nil on plain HTTP

	buf  []byte // received bytes not consumed yet (nil while idle with nothing buffered)
	out  h1.Outgoing
	body framer // the request body being forwarded (inBody)
	up   *upstream

	inBody     bool
	minor      int
	headReq    bool // a HEAD request: the response has no body
	closeAfter bool
	dead       bool
}

// feed takes bytes from the connection: TLS records are decrypted first.
func (cl *client) feed(data []byte) {
	if cl.tls == nil {
		cl.onData(data)
		return
	}
	if _, err := cl.tls.Append(data); err != nil {
		cl.c.Close()
		return
	}
	for !cl.dead {
		n, err := cl.tls.Read(cl.p.plain)
		if err != nil {
			cl.c.Close()
			return
		}
		if n == 0 {
			return
		}
		cl.onData(cl.p.plain[:n])
	}
}

func (cl *client) onData(data []byte) {
	if cl.dead {
		return
	}
	in, owned := data, false
	if len(cl.buf) > 0 {
		cl.buf = append(cl.buf, data...)
		in, owned = cl.buf, true
	}
	n := cl.consume(in)
	cl.keep(in[n:], owned)
}

// keep stores what consume left (data handed by nbio is only valid during the callback) and gives
// the buffer back to the pool when nothing is left: an idle connection holds no buffer.
func (cl *client) keep(rest []byte, owned bool) {
	if cl.dead {
		return
	}
	switch {
	case len(rest) == 0:
		if cl.buf != nil {
			cl.p.putBuf(cl.buf)
			cl.buf = nil
		}
	case owned:
		cl.buf = cl.buf[:copy(cl.buf, rest)]
	default:
		if cl.buf == nil {
			cl.buf = cl.p.getBuf()
		}
		cl.buf = append(cl.buf[:0], rest...)
	}
}

// consume parses and forwards as much of in as it can and returns how many bytes it used.
// A pipelined request waits (unparsed) until the exchange before it is over.
func (cl *client) consume(in []byte) int {
	p := cl.p
	off := 0
	for !cl.dead && off < len(in) {
		if cl.inBody {
			p.wbuf = p.wbuf[:0]
			k, done, err := cl.body.feed(in[off:], &p.wbuf)
			off += k
			if len(p.wbuf) > 0 && cl.up != nil {
				cl.up.c.Write(p.wbuf)
			}
			if err != nil {
				cl.abort()
				return len(in)
			}
			if !done {
				return off
			}
			cl.inBody = false
			continue
		}
		if cl.up != nil {
			return off // pipelined: parse after the response
		}
		r := &p.req
		switch err := r.Parse(in[off:], p.cfg.MaxHead); {
		case errors.Is(err, h1.ErrIncomplete):
			return off
		case errors.Is(err, h1.ErrHeadTooLarge):
			cl.fail(431)
			return len(in)
		case err != nil:
			cl.fail(400)
			return len(in)
		}
		if r.Unframeable != h1.Frameable {
			// What cannot be framed is never forwarded, in any mode (the engine's rule).
			cl.fail(400)
			return len(in)
		}
		if r.Upgrade {
			cl.fail(501) // the prototype does not tunnel
			return len(in)
		}
		up, err := p.borrow()
		if err != nil {
			cl.fail(502)
			return len(in)
		}
		cl.minor, cl.headReq, cl.closeAfter = r.Minor, string(r.Method) == "HEAD", r.Close
		cl.out.SetRequestID(nil)
		p.wbuf = cl.out.AppendForwardHead(p.wbuf[:0], r)
		off += r.HeadLen
		cl.up, up.cl = up, cl
		up.start(cl.headReq)
		switch r.Framing {
		case h1.Sized:
			cl.body = framer{mode: h1.Sized, n: r.ContentLength, rechunk: true}
			cl.inBody = true
		case h1.Chunked:
			cl.body = framer{mode: h1.Chunked, rechunk: true}
			cl.inBody = true
		}
		if cl.inBody { // head and the first body bytes in one write
			k, done, ferr := cl.body.feed(in[off:], &p.wbuf)
			off += k
			if ferr != nil {
				cl.abort()
				return len(in)
			}
			cl.inBody = !done
		}
		up.c.Write(p.wbuf)
	}
	return off
}

// send writes to the client (encrypting on HTTPS).
func (cl *client) send(b []byte) {
	if len(b) == 0 || cl.dead {
		return
	}
	if cl.tls != nil {
		cl.tls.Write(b)
		return
	}
	cl.c.Write(b)
}

// fail answers status and closes.
func (cl *client) fail(status int) {
	var text string
	switch status {
	case 400:
		text = "Bad Request"
	case 431:
		text = "Request Header Fields Too Large"
	case 501:
		text = "Not Implemented"
	default:
		text = "Bad Gateway"
	}
	b := fmt.Appendf(nil, "HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", status, text)
	cl.send(b)
	cl.close()
}

// abort ends the client connection and the exchange's upstream connection (never reused: its
// message was cut).
func (cl *client) abort() {
	if u := cl.up; u != nil {
		u.cl = nil
		u.c.Close()
		cl.up = nil
	}
	cl.close()
}

func (cl *client) close() {
	if cl.dead {
		return
	}
	cl.dead = true
	cl.c.Close()
	if cl.buf != nil {
		cl.p.putBuf(cl.buf)
		cl.buf = nil
	}
}

func (cl *client) onClose() {
	cl.dead = true
	if u := cl.up; u != nil {
		u.cl = nil
		u.c.Close() // mid-exchange: the upstream connection is not reusable
		cl.up = nil
	}
	if cl.buf != nil {
		cl.p.putBuf(cl.buf)
		cl.buf = nil
	}
}

// done ends an exchange: answer complete. A pipelined request already buffered goes next.
func (cl *client) done() {
	cl.up = nil
	if cl.closeAfter {
		cl.close()
		return
	}
	if len(cl.buf) > 0 {
		n := cl.consume(cl.buf)
		cl.keep(cl.buf[n:], true)
	}
}

// ---------------------------------------------------------------------------------------------
// upstream side

type upstream struct {
	p  *Proxy
	c  *nbio.Conn
	cl *client // the exchange's client, nil while pooled

	buf      []byte
	resp     h1.Response
	rout     h1.ResponseOut
	body     framer
	headDone bool
	headReq  bool
	reuse    bool
	dead     bool
}

func (u *upstream) start(headReq bool) {
	u.headDone, u.headReq, u.reuse = false, headReq, false
}

func (u *upstream) onData(data []byte) {
	cl := u.cl
	if cl == nil || u.dead {
		u.c.Close() // bytes nobody asked for: the connection cannot be trusted any more
		return
	}
	in, owned := data, false
	if len(u.buf) > 0 {
		u.buf = append(u.buf, data...)
		in, owned = u.buf, true
	}
	p := u.p
	p.wbuf = p.wbuf[:0]
	off := 0
	for !u.headDone {
		err := u.resp.Parse(in[off:], p.cfg.MaxHead, u.headReq)
		if errors.Is(err, h1.ErrIncomplete) {
			break
		}
		if err != nil {
			u.reuse = false
			u.cl = nil
			u.c.Close()
			cl.up = nil
			if len(p.wbuf) == 0 {
				cl.fail(502)
			} else {
				cl.send(p.wbuf)
				cl.close()
			}
			return
		}
		head := in[off : off+u.resp.HeadLen]
		off += u.resp.HeadLen
		if u.resp.Status < 200 && u.resp.Status != 101 { // 1xx: relayed, the final head follows
			p.wbuf = append(p.wbuf, head...)
			continue
		}
		u.rout = h1.ResponseOut{Close: cl.closeAfter, Minor: cl.minor, Head: u.headReq}
		var outFraming h1.Framing
		p.wbuf, outFraming = u.rout.AppendResponseHead(p.wbuf, &u.resp)
		cl.closeAfter = u.rout.Close
		u.reuse = !u.resp.Close
		u.headDone = true
		switch u.resp.Framing {
		case h1.Sized:
			u.body = framer{mode: h1.Sized, n: u.resp.ContentLength}
		case h1.Chunked:
			u.body = framer{mode: h1.Chunked, rechunk: outFraming == h1.Chunked}
		case h1.UntilClose:
			u.body = framer{mode: h1.UntilClose}
			u.reuse = false
		default:
			u.body = framer{mode: h1.NoBody}
		}
	}
	done := false
	if u.headDone {
		k, d, err := u.body.feed(in[off:], &p.wbuf)
		off += k
		if err != nil {
			cl.send(p.wbuf)
			u.reuse = false
			cl.abort()
			return
		}
		done = d
	}
	cl.send(p.wbuf)
	rest := in[off:]
	switch {
	case len(rest) == 0:
		if u.buf != nil {
			p.putBuf(u.buf)
			u.buf = nil
		}
	case owned:
		u.buf = u.buf[:copy(u.buf, rest)]
	default:
		if u.buf == nil {
			u.buf = p.getBuf()
		}
		u.buf = append(u.buf[:0], rest...)
	}
	if done {
		u.cl = nil
		if u.reuse && len(u.buf) == 0 {
			p.idle = append(p.idle, u)
		} else {
			u.dead = true
			u.c.Close()
		}
		cl.done()
	}
}

func (u *upstream) onClose() {
	u.dead = true
	if u.buf != nil {
		u.p.putBuf(u.buf)
		u.buf = nil
	}
	cl := u.cl
	if cl == nil {
		return // pooled: borrow skips it
	}
	u.cl = nil
	cl.up = nil
	switch {
	case u.headDone && u.body.mode == h1.UntilClose:
		cl.close() // the body ended with the connection, and so does the client's
	case !u.headDone:
		cl.fail(502)
	default:
		cl.close() // cut mid-body: the client must not take it for complete
	}
}

// ---------------------------------------------------------------------------------------------
// body framing, incremental (the engine's copyChunked and copySized do the same on a blocking
// reader): sizes in hex, CRLF everywhere, extensions dropped, trailer lines checked.

type framer struct {
	mode    h1.Framing
	n       int64 // Sized: bytes left; Chunked: bytes left in the current chunk
	st      uint8 // Chunked: chSize, chData, chCRLF, chTrailer
	trailer int   // bytes of trailers so far
	rechunk bool  // write chunk framing (false: an HTTP/1.0 client gets the data alone)
}

const (
	chSize = iota
	chData
	chCRLF
	chTrailer

	maxChunkLine = 4096
	maxTrailers  = 16 << 10
)

var errBadChunk = errors.New("bad chunked framing")

// feed consumes the body's bytes at the start of b, appending what to send to *out. It returns
// how many bytes of b belong to the body so far and whether the body is complete. An incomplete
// line is left unconsumed (the caller keeps it and feeds it again with more).
func (f *framer) feed(b []byte, out *[]byte) (int, bool, error) {
	switch f.mode {
	case h1.NoBody:
		return 0, true, nil
	case h1.UntilClose:
		*out = append(*out, b...)
		return len(b), false, nil
	case h1.Sized:
		k := int(min(int64(len(b)), f.n))
		*out = append(*out, b[:k]...)
		f.n -= int64(k)
		return k, f.n == 0, nil
	}
	off := 0
	for {
		rest := b[off:]
		switch f.st {
		case chSize, chTrailer:
			i := indexLF(rest, maxChunkLine)
			if i == -2 {
				return off, false, errBadChunk
			}
			if i < 0 {
				return off, false, nil
			}
			line := rest[:i+1]
			off += i + 1
			if f.st == chTrailer {
				f.trailer += len(line)
				if f.trailer > maxTrailers || len(line) < 2 || line[len(line)-2] != '\r' {
					return off, false, errBadChunk
				}
				if f.rechunk {
					*out = append(*out, line...)
				}
				if len(line) == 2 {
					return off, true, nil
				}
				if !validTrailer(line[:len(line)-2]) {
					return off, false, errBadChunk
				}
				continue
			}
			size, ok := chunkSize(line)
			if !ok {
				return off, false, errBadChunk
			}
			if size == 0 {
				f.st = chTrailer
				if f.rechunk {
					*out = append(*out, '0', '\r', '\n')
				}
				continue
			}
			if f.rechunk {
				*out = strconv.AppendUint(*out, size, 16)
				*out = append(*out, '\r', '\n')
			}
			f.n, f.st = int64(size), chData
		case chData:
			k := int(min(int64(len(rest)), f.n))
			*out = append(*out, rest[:k]...)
			off += k
			f.n -= int64(k)
			if f.n > 0 {
				return off, false, nil
			}
			f.st = chCRLF
		case chCRLF:
			if len(rest) < 2 {
				if len(rest) == 1 && rest[0] != '\r' {
					return off, false, errBadChunk
				}
				return off, false, nil
			}
			if rest[0] != '\r' || rest[1] != '\n' {
				return off, false, errBadChunk
			}
			if f.rechunk {
				*out = append(*out, '\r', '\n')
			}
			off += 2
			f.st = chSize
		}
	}
}

// indexLF finds the LF ending a line of at most max bytes: -1 not yet there, -2 too long.
func indexLF(b []byte, max int) int {
	for i, c := range b {
		if c == '\n' {
			if i+1 > max {
				return -2
			}
			return i
		}
	}
	if len(b) >= max {
		return -2
	}
	return -1
}

// chunkSize parses "HEX[;ext]\r\n" as the engine does (at most 15 hex digits, no sign, no space
// before the extension but OWS).
func chunkSize(l []byte) (uint64, bool) {
	if len(l) < 3 || l[len(l)-2] != '\r' {
		return 0, false
	}
	l = l[:len(l)-2]
	for i, c := range l {
		if c == ';' {
			l = h1.TrimOWS(l[:i])
			break
		}
		if c == '\r' || c == '\n' || c == 0 {
			return 0, false
		}
	}
	if len(l) == 0 || len(l) > 15 {
		return 0, false
	}
	var n uint64
	for _, c := range l {
		var d byte
		switch {
		case c >= '0' && c <= '9':
			d = c - '0'
		case c|0x20 >= 'a' && c|0x20 <= 'f':
			d = c | 0x20 - 'a' + 10
		default:
			return 0, false
		}
		n = n<<4 | uint64(d)
	}
	return n, true
}

// validTrailer: "token: value" with no control characters but HTAB.
func validTrailer(l []byte) bool {
	colon := -1
	for i, c := range l {
		if c == ':' {
			colon = i
			break
		}
	}
	if colon <= 0 {
		return false
	}
	for _, c := range l[:colon] {
		if c <= ' ' || c >= 0x7f || c == '"' || c == '(' || c == ')' || c == ',' || c == '/' ||
			c == ';' || c == '<' || c == '=' || c == '>' || c == '?' || c == '@' || c == '[' ||
			c == '\\' || c == ']' || c == '{' || c == '}' {
			return false
		}
	}
	for _, c := range l[colon+1:] {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}
