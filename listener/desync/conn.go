package desync

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"sync"
)

// Why a raw-head sniffer: Go's HTTP/1 server rewrites requests before a
// handler sees them, and four corpus families cannot be recovered afterwards:
//   - Content-Length together with Transfer-Encoding: chunked (Go deletes CL),
//   - duplicate identical Content-Length fields (Go keeps one),
//   - Transfer-Encoding on HTTP/1.0 (Go deletes and ignores it),
//   - obs-fold continuation lines (Go joins them into the previous value),
// plus bare-LF line ends. Conn sees the plaintext bytes as the server reads
// them, cuts them into requests the same way Go frames them (head, then a
// Content-Length or chunked body), and queues each complete header block
// until Classify takes it for the matching request.

// obsFoldTier is the tier of a request with obs-fold (a header continuation
// line). RFC 9112 lets a server either reject obs-fold with 400 or replace it
// with SP; Go replaces. The corpus marks every folded header Severe (a CR or
// LF inside a value), so Fulcrum rejects folding rather than forwarding it.
const obsFoldTier = Severe

// maxChunkLine mirrors net/http's limit on a chunk-size line.
const maxChunkLine = 4096

type sniffState uint8

const (
	stHead sniffState = iota
	stBody
	stChunkLine
	stChunkData
	stChunkCRLF
	stTrailer
	stLost    // out of step with the server: stop recording
	stStopped // StopSniffing was called (hijacked / upgraded connection)
)

// Conn wraps the plaintext side of a client connection and records the raw
// header block of every HTTP/1 request read through it. Give it to the
// http.Server (listener Accept) and set Server.ConnContext to ConnContext.
// The recorded head of a request is released when Classify runs for it.
//
// It keeps at most maxHead bytes of a single head and at most 2*maxHead of
// queued heads (pipelining); beyond that it stops recording and the following
// requests classify as Ambiguous/UnverifiedRequest (the connection is closed
// after them in defensive mode).
type Conn struct {
	net.Conn
	maxHead int

	mu    sync.Mutex
	state sniffState
	buf   []byte // queued complete heads, then the head being read
	ends  []int  // end offsets (in buf) of the complete heads
	// head scanning
	headStart int  // start of the head being read, in buf
	lineLen   int  // bytes of the current line seen so far (without '\n')
	lastCR    bool // last byte of the current line so far was '\r'
	lines     int  // complete lines in the head being read
	// body framing
	remaining uint64 // Content-Length or chunk bytes left to skip
	line      []byte // chunk-size or trailer line being read
	crlf      int    // bytes of the chunk-closing CRLF seen
	trailerN  int    // trailer bytes seen
}

// NewConn wraps c. maxHeaderBytes is the server's MaxHeaderBytes (0 means
// http.DefaultMaxHeaderBytes); the sniffer allows the same 4 KiB of slack Go
// does.
func NewConn(c net.Conn, maxHeaderBytes int) *Conn {
	if maxHeaderBytes <= 0 {
		maxHeaderBytes = http.DefaultMaxHeaderBytes
	}
	return &Conn{Conn: c, maxHead: maxHeaderBytes + 4096}
}

// NetConn returns the wrapped connection.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// ConnectionState returns the TLS state when the wrapped connection is a
// *tls.Conn. http.Server only fills Request.TLS for a *tls.Conn it accepted
// itself, so a handler serving a wrapped TLS connection reads it from here.
func (c *Conn) ConnectionState() (tls.ConnectionState, bool) {
	if t, ok := c.Conn.(*tls.Conn); ok {
		return t.ConnectionState(), true
	}
	return tls.ConnectionState{}, false
}

// StopSniffing stops recording (call it after hijacking the connection for a
// protocol switch such as WebSocket: the bytes that follow are not HTTP/1).
// Classify falls back to the parsed request afterwards.
func (c *Conn) StopSniffing() {
	c.mu.Lock()
	c.state = stStopped
	c.buf, c.ends, c.line = nil, nil, nil
	c.mu.Unlock()
}

// Read reads from the wrapped connection and records what passes.
func (c *Conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.mu.Lock()
		c.feed(p[:n])
		c.mu.Unlock()
	}
	return n, err
}

type connKey struct{}

// ConnContext is for http.Server.ConnContext: it makes the *Conn (if the
// accepted connection is one, directly or via NetConn() unwrapping) visible
// to Classify.
func ConnContext(ctx context.Context, nc net.Conn) context.Context {
	for i := 0; i < 4 && nc != nil; i++ {
		if c, ok := nc.(*Conn); ok {
			return context.WithValue(ctx, connKey{}, c)
		}
		u, ok := nc.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		nc = u.NetConn()
	}
	return ctx
}

// ConnFromContext returns the *Conn the request arrived on, or nil.
func ConnFromContext(ctx context.Context) *Conn {
	c, _ := ctx.Value(connKey{}).(*Conn)
	return c
}

func connFromContext(r *http.Request) *Conn { return ConnFromContext(r.Context()) }

func (c *Conn) lose() {
	c.state = stLost
	c.buf, c.ends, c.line = nil, nil, nil
	c.headStart, c.lineLen, c.lines, c.lastCR = 0, 0, 0, false
}

// feed advances the framing state machine over b (called with mu held).
func (c *Conn) feed(b []byte) {
	for len(b) > 0 {
		switch c.state {
		case stLost, stStopped:
			return
		case stHead:
			b = c.feedHead(b)
		case stBody, stChunkData:
			k := uint64(len(b))
			if k > c.remaining {
				k = c.remaining
			}
			b = b[k:]
			c.remaining -= k
			if c.remaining == 0 {
				if c.state == stBody {
					c.state = stHead
				} else {
					c.state, c.crlf = stChunkCRLF, 0
				}
			}
		case stChunkCRLF:
			want := byte('\r')
			if c.crlf == 1 {
				want = '\n'
			}
			if b[0] != want {
				c.lose() // net/http fails the body and closes
				return
			}
			b = b[1:]
			if c.crlf++; c.crlf == 2 {
				c.state, c.line = stChunkLine, c.line[:0]
			}
		case stChunkLine, stTrailer:
			i := bytes.IndexByte(b, '\n')
			seg := b
			if i >= 0 {
				seg = b[:i+1]
			}
			if len(c.line)+len(seg) > maxChunkLine {
				c.lose()
				return
			}
			c.line = append(c.line, seg...)
			b = b[len(seg):]
			if i < 0 {
				continue
			}
			if c.state == stChunkLine {
				c.chunkLine()
			} else {
				c.trailerLine()
			}
		}
	}
}

// chunkLine parses a complete chunk-size line as net/http does.
func (c *Conn) chunkLine() {
	l := c.line
	c.line = c.line[:0]
	if len(l) < 2 || l[len(l)-2] != '\r' || bytes.IndexByte(l, '\r') != len(l)-2 {
		c.lose()
		return
	}
	l = l[:len(l)-2]
	if k := bytes.IndexByte(l, ';'); k >= 0 {
		l = l[:k]
	}
	for len(l) > 0 && (l[len(l)-1] == ' ' || l[len(l)-1] == '\t') {
		l = l[:len(l)-1]
	}
	if len(l) == 0 || len(l) > 16 {
		c.lose()
		return
	}
	var n uint64
	for _, d := range l {
		switch {
		case d >= '0' && d <= '9':
			d -= '0'
		case d >= 'a' && d <= 'f':
			d -= 'a' - 10
		case d >= 'A' && d <= 'F':
			d -= 'A' - 10
		default:
			c.lose()
			return
		}
		n = n<<4 | uint64(d)
	}
	if n == 0 {
		c.state, c.trailerN = stTrailer, 0
		return
	}
	c.state, c.remaining = stChunkData, n
}

// trailerLine consumes trailer lines up to the empty line ending the body.
func (c *Conn) trailerLine() {
	l := c.line
	c.line = c.line[:0]
	first := c.trailerN == 0
	c.trailerN += len(l)
	if c.trailerN > maxChunkLine {
		c.lose()
		return
	}
	switch {
	case string(l) == "\r\n":
		c.state = stHead
	case first && string(l) == "\n":
		c.lose() // net/http wants CRLF here
	case string(l) == "\n":
		c.state = stHead
	}
}

// feedHead appends head bytes until the empty line; returns the rest of b.
func (c *Conn) feedHead(b []byte) []byte {
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			if !c.appendHead(b) {
				return nil
			}
			c.lineLen += len(b)
			c.lastCR = b[len(b)-1] == '\r'
			return nil
		}
		empty := c.lineLen+i == 0 || (c.lineLen+i == 1 && (i == 1 && b[0] == '\r' || i == 0 && c.lastCR))
		if !c.appendHead(b[:i+1]) {
			return nil
		}
		b = b[i+1:]
		c.lineLen, c.lastCR = 0, false
		if empty {
			// An empty first line is a malformed request for net/http
			// (it answers 400 and closes); it is queued all the same.
			c.completeHead()
			return b
		}
		c.lines++
	}
	return nil
}

func (c *Conn) appendHead(seg []byte) bool {
	if len(c.buf)-c.headStart+len(seg) > c.maxHead || len(c.buf)+len(seg) > 2*c.maxHead {
		c.lose()
		return false
	}
	c.buf = append(c.buf, seg...)
	return true
}

// completeHead queues the head just read and sets up body framing the way
// net/http frames a request.
func (c *Conn) completeHead() {
	head := c.buf[c.headStart:]
	c.ends = append(c.ends, len(c.buf))
	c.headStart = len(c.buf)
	c.lines = 0
	chunked, n, ok := bodyFraming(head)
	switch {
	case !ok:
		// Out of step from here on, but this head is complete and still belongs to the
		// request net/http is about to serve (it accepts a folded Content-Length or
		// Transfer-Encoding, joining the lines): keep it queued so that request is
		// classified from its bytes (obs-fold: severe) rather than as unverifiable.
		c.state = stLost
		c.line = nil
	case chunked:
		c.state, c.line = stChunkLine, c.line[:0]
	case n > 0:
		c.state, c.remaining = stBody, n
	default:
		c.state = stHead
	}
}

// lineIter walks the lines of a head: line without its "\n" (and without a
// trailing "\r"), and whether it ended in CRLF.
type lineIter struct {
	b   []byte
	pos int
}

func (it *lineIter) next() (line []byte, crlf, ok bool) {
	if it.pos >= len(it.b) {
		return nil, false, false
	}
	rest := it.b[it.pos:]
	i := bytes.IndexByte(rest, '\n')
	if i < 0 {
		it.pos = len(it.b)
		return rest, false, true
	}
	it.pos += i + 1
	line = rest[:i]
	if len(line) > 0 && line[len(line)-1] == '\r' {
		return line[:len(line)-1], true, true
	}
	return line, false, true
}

// bodyFraming decides the body framing of a raw head exactly as net/http
// would when it accepts the request: chunked when HTTP/1.1+ carries any
// Transfer-Encoding, else the first Content-Length, else no body. ok=false
// when the outcome cannot be predicted (net/http rejects such requests and
// closes the connection, or the connection is leaving HTTP/1).
func bodyFraming(head []byte) (chunked bool, n uint64, ok bool) {
	it := lineIter{b: head}
	reqLine, _, _ := it.next()
	method, rest, ok1 := bytes.Cut(reqLine, []byte(" "))
	_, proto, ok2 := bytes.Cut(rest, []byte(" "))
	if !ok1 || !ok2 {
		return false, 0, true // net/http: malformed request line, 400 + close
	}
	if string(method) == "PRI" {
		return false, 0, false // HTTP/2 prior knowledge: not HTTP/1 any more
	}
	http11 := len(proto) == 8 && string(proto[:7]) == "HTTP/1." && proto[7] >= '1' && proto[7] <= '9'
	var te, cl bool
	var clv []byte
	prevFraming := false
	for {
		line, _, more := it.next()
		if !more || len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			if prevFraming {
				return false, 0, false // folded CL/TE: net/http rejects
			}
			continue
		}
		prevFraming = false
		name, val, found := bytes.Cut(line, []byte(":"))
		if !found {
			continue
		}
		switch {
		case equalFoldASCII(name, "transfer-encoding"):
			te, prevFraming = true, true
		case equalFoldASCII(name, "content-length"):
			if !cl {
				cl, clv = true, trimOWS(val)
			}
			prevFraming = true
		}
	}
	if te && http11 {
		return true, 0, true
	}
	if cl {
		v, good := parseNum(clv)
		if !good || len(clv) == 0 || v > 1<<62 {
			return false, 0, false
		}
		return false, v, true
	}
	return false, 0, true
}

// classifyRaw classifies r from its recorded head. ok=false means no raw
// data applies (sniffing stopped): use the parsed request.
func (c *Conn) classifyRaw(r *http.Request) (Tier, Reason, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stStopped {
		return 0, 0, false
	}
	if len(c.ends) == 0 {
		// Lost (overflow or out of step) or nothing recorded: unverifiable.
		return Ambiguous, ReasonUnverifiedRequest, true
	}
	end := c.ends[0]
	t, why := analyzeRaw(c.buf[:end], r)
	// Drop the head; keep queued heads and the partial one.
	k := copy(c.buf, c.buf[end:])
	c.buf = c.buf[:k]
	c.headStart -= end
	copy(c.ends, c.ends[1:])
	c.ends = c.ends[:len(c.ends)-1]
	for i := range c.ends {
		c.ends[i] -= end
	}
	if len(c.buf) == 0 && cap(c.buf) > 64<<10 {
		c.buf = nil // a huge head once should not pin memory for the connection's life
	}
	return t, why, true
}

// ClassifyRaw classifies a raw request head (request line, header lines and
// the empty line) on its own, e.g. for tools and fuzzing. The request line is
// split as upstream does (method up to the first space, version after the
// last one). It does not count.
func ClassifyRaw(head []byte) (Tier, Reason) {
	var c Classifier
	it := lineIter{b: head}
	reqLine, crlf, _ := it.next()
	method, uri, version := c.RequestLine(reqLine, crlf)
	var store [32]Field
	return c.Finish(method, uri, version, c.lines(&it, store[:0]))
}

// lines feeds the header lines of it to c and returns the fields.
func (c *Classifier) lines(it *lineIter, fields []Field) []Field {
	for {
		line, crlf, ok := it.next()
		if !ok {
			return fields
		}
		c.LineEnd(crlf)
		if len(line) == 0 {
			c.Terminated()
			return fields
		}
		if line[0] == ' ' || line[0] == '\t' {
			c.Fold()
			continue
		}
		fields = append(fields, c.Field(line))
	}
}

// lastToken splits off the last space-separated token of b, ignoring trailing
// non-token characters when looking for the space (upstream's last_token).
// partial reports that no space precedes the token.
func lastToken(b []byte) (before, tok []byte, partial bool) {
	if len(b) == 0 {
		return nil, nil, true
	}
	cur, skip := len(b)-1, true
	for cur > 0 && (b[cur] != ' ' || skip) {
		skip = skip && !tcharTable[b[cur]]
		cur--
	}
	begin := cur
	if b[cur] == ' ' {
		begin = cur + 1
	}
	if begin == 0 {
		return nil, b, true
	}
	return b[:begin-1], b[begin:], false
}

// analyzeRaw checks that the head belongs to r (same request line as Go
// parsed), then analyses it.
func analyzeRaw(head []byte, r *http.Request) (Tier, Reason) {
	it := lineIter{b: head}
	reqLine, crlf, _ := it.next()
	m, rest, ok1 := bytes.Cut(reqLine, []byte(" "))
	u, p, ok2 := bytes.Cut(rest, []byte(" "))
	if !ok1 || !ok2 || string(m) != r.Method || string(u) != r.RequestURI || string(p) != r.Proto {
		return Ambiguous, ReasonUnverifiedRequest
	}
	var c Classifier
	c.LineEnd(crlf)
	var store [32]Field
	return c.Finish(m, u, p, c.lines(&it, store[:0]))
}
