// Package h1 is Fulcrum's HTTP/1 engine: a request-head parser that classifies the desync tier in
// the same pass, the outgoing and response head writers, and body framing. It is built for
// proxying: a head is parsed once into slices of the connection's read buffer (no header map, no
// strings), what is classified is exactly what is routed and forwarded, and nothing is allocated
// per request once a connection's pooled structures are warm.
package h1

import (
	"bytes"
	"errors"
	"unsafe"

	"golang.org/x/net/http/httpguts"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// Framing is how a message body is delimited.
type Framing uint8

const (
	// NoBody: the message ends with its head.
	NoBody Framing = iota
	// Sized: Content-Length bytes follow.
	Sized
	// Chunked: chunked transfer coding, then trailers.
	Chunked
	// UntilClose: a response body that ends when the target closes (never a request).
	UntilClose
)

// Parse errors. ErrIncomplete is not an error of the request: read more and parse again.
var (
	ErrIncomplete = errors.New("h1: incomplete head")
	// ErrHeadTooLarge: no complete head within the limit (431).
	ErrHeadTooLarge = errors.New("h1: request head too large")
	// ErrMalformed: not an HTTP/1 request head at all (400 and close in every mode).
	ErrMalformed = errors.New("h1: malformed request head")
)

// Unframeable reasons: a request the engine cannot delimit or cannot forward faithfully. It is
// answered 400 (or as Status says) and the connection closed, whatever the mitigation mode:
// "monitor forwards everything but what cannot be framed".
type Unframeable uint8

const (
	Frameable Unframeable = iota
	// BadTransferEncoding: a Transfer-Encoding whose final coding is not chunked, or unknown.
	BadTransferEncoding
	// BadContentLength: not a number, or several that differ.
	BadContentLength
	// BadVersion: not HTTP/1.0 or HTTP/1.x (0.9 and garbage cannot be forwarded as HTTP/1.1).
	BadVersion
	// BadTarget: no request target, or one that is neither origin-, absolute- nor asterisk-form.
	BadTarget
	// BadMethod: the method is not a token (a target would split the line elsewhere).
	BadMethod
	// BadHost: no Host on HTTP/1.1, several, or one with control characters (RFC 9112 3.2).
	BadHost
)

var unframeableNames = [...]string{"", "bad_transfer_encoding", "bad_content_length", "bad_version", "bad_target", "bad_method", "bad_host"}

func (u Unframeable) String() string { return unframeableNames[u] }

// Request is one parsed request head. Every slice points into the buffer given to Parse, which
// must not change while the Request is in use. A Request is reused: Parse resets it and keeps the
// capacity of its slices, so a warm one parses without allocating.
type Request struct {
	Method, Target, Version []byte
	// Path is the target's path as received (escaped), Query the part after '?' (without it).
	// For an absolute-form target they are those of the URI, and its authority is AuthorityHost.
	Path, Query   []byte
	AuthorityHost []byte
	// Host is the request's host: the absolute-form authority, else the first Host field (trimmed).
	Host []byte
	// Minor is the HTTP/1 minor version (0 or 1; 1.2-1.9 read as 1).
	Minor int
	// Fields are the header lines in order (names and values untrimmed; see Field).
	Fields []desync.Field

	Tier   desync.Tier
	Reason desync.Reason

	Framing       Framing
	ContentLength int64
	Unframeable   Unframeable

	// From Connection (and the version): the client asked to close; the client asked to upgrade
	// (Connection: upgrade and an Upgrade field); Expect: 100-continue.
	Close, Upgrade, Expect100 bool
	// HostCount is how many Host fields arrived (RFC 9112: exactly one on HTTP/1.1).
	HostCount int

	// HeadLen is the length of the head in the buffer, the empty line included.
	HeadLen int

	// connTokens are the Connection field's tokens: fields they name are hop-by-hop.
	connTokens [][]byte
	cls        desync.Classifier
}

// Parse parses the request head at the start of b. It returns ErrIncomplete when b holds no
// complete head yet (and is shorter than max), ErrHeadTooLarge when no head ends within max bytes,
// ErrMalformed when the bytes are not a request head. On success the head is r.HeadLen bytes and
// the body, if any, follows it in b.
func (r *Request) Parse(b []byte, max int) error {
	end, err := headLen(b, max, ErrHeadTooLarge)
	if err != nil {
		return err
	}
	r.reset()
	head := b[:end]
	r.HeadLen = end
	c := &r.cls
	c.Reset()
	line, crlf, rest := nextLine(head)
	if len(line) == 0 {
		return ErrMalformed // an empty request line: net/http answers 400 too
	}
	r.Method, r.Target, r.Version = c.RequestLine(line, crlf)
	for len(rest) > 0 {
		line, crlf, rest = nextLine(rest)
		c.LineEnd(crlf)
		if len(line) == 0 {
			c.Terminated()
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			c.Fold()
			continue
		}
		f := c.Field(line)
		r.Fields = append(r.Fields, f)
		r.noteField(&f)
	}
	r.Tier, r.Reason = c.Finish(r.Method, r.Target, r.Version, r.Fields)
	r.frame()
	return nil
}

func (r *Request) reset() {
	fields, tokens := r.Fields[:0], r.connTokens[:0]
	clear(r.Fields[:cap(r.Fields)]) // drop references into the previous buffer
	*r = Request{Fields: fields, connTokens: tokens}
}

// headLen is the length of the head at the start of b: ErrIncomplete while it may still end
// within max bytes, tooLarge once it cannot.
func headLen(b []byte, max int, tooLarge error) (int, error) {
	end := headEnd(b)
	switch {
	case end > max, end < 0 && len(b) >= max:
		return 0, tooLarge
	case end < 0:
		return 0, ErrIncomplete
	}
	return end, nil
}

// headEnd returns the length of the head at the start of b (through its empty line), or -1.
// Lines end in LF; a CR before it is part of the line end.
func headEnd(b []byte) int {
	for i := 0; ; {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return -1
		}
		j += i
		if i > 0 && (j == i || j == i+1 && b[i] == '\r') {
			return j + 1
		}
		i = j + 1
	}
}

// nextLine splits the first line off b: the line without its end, whether it ended in CRLF.
func nextLine(b []byte) (line []byte, crlf bool, rest []byte) {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return b, false, nil
	}
	line, rest = b[:i], b[i+1:]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		return line[:n-1], true, rest
	}
	return line, false, rest
}

// noteField records what the engine itself needs from a field.
func (r *Request) noteField(f *desync.Field) {
	name := f.Name
	switch {
	case equalFold(name, "host"):
		r.HostCount++
		if r.HostCount == 1 && r.AuthorityHost == nil {
			r.Host = TrimOWS(f.Value)
		}
	case equalFold(name, "connection"):
		forEachToken(f.Value, func(tok []byte) {
			switch {
			case equalFold(tok, "close"):
				r.Close = true
			case equalFold(tok, "upgrade"):
				r.Upgrade = true // confirmed below when an Upgrade field exists
			}
			r.connTokens = append(r.connTokens, tok)
		})
	case equalFold(name, "expect"):
		if equalFold(TrimOWS(f.Value), "100-continue") {
			r.Expect100 = true
		}
	}
}

// frame decides the body framing and what cannot be forwarded (RFC 9112 section 6.3), on the
// fields the classifier saw. Look-alike names never frame anything here (and are never forwarded).
func (r *Request) frame() {
	// The version: HTTP/1.0 or HTTP/1.x only.
	v := TrimOWS(r.Version)
	if len(v) != len(r.Version) {
		v = nil // whitespace around the version: net/http refuses it, and so do we
	}
	switch {
	case len(v) == 8 && string(v[:7]) == "HTTP/1." && v[7] >= '0' && v[7] <= '9':
		r.Minor = min(int(v[7]-'0'), 1)
	default:
		r.Unframeable = BadVersion
		return
	}
	if r.Minor == 0 && !r.hasConnToken("keep-alive") {
		r.Close = true
	}
	if len(r.Method) == 0 || !isToken(r.Method) {
		r.Unframeable = BadMethod
		return
	}
	if !r.splitTarget() {
		r.Unframeable = BadTarget
		return
	}
	if r.HostCount > 1 || r.HostCount == 0 && r.Minor == 1 && r.AuthorityHost == nil || !httpguts.ValidHostHeader(Str(r.Host)) {
		r.Unframeable = BadHost
		return
	}
	if r.Upgrade && !r.hasField("upgrade") {
		r.Upgrade = false
	}
	var te, cl bool
	var n uint64
	for i := range r.Fields {
		f := &r.Fields[i]
		switch f.Kind {
		case desync.KindTE:
			te = true
			if !chunkedFinal(f.Value) {
				r.Unframeable = BadTransferEncoding
				return
			}
		case desync.KindCL:
			v, ok := parseContentLength(f.Value)
			if !ok || cl && v != n {
				r.Unframeable = BadContentLength
				return
			}
			cl, n = true, v
		}
	}
	switch {
	case te:
		// One Transfer-Encoding field, "chunked": a second field would be a list "chunked,
		// chunked" or put a coding after chunked. Content-Length, if any, is ignored and never
		// forwarded.
		nTE := 0
		for i := range r.Fields {
			if r.Fields[i].Kind == desync.KindTE {
				nTE++
			}
		}
		if nTE > 1 {
			r.Unframeable = BadTransferEncoding
			return
		}
		if r.Minor == 0 {
			// RFC 9112 6.1: Transfer-Encoding on HTTP/1.0 is faulty framing (the classifier says
			// ambiguous: the connection closes after it). Framed as HTTP/1.0 defines, by
			// Content-Length alone, as net/http does; the field is never forwarded.
			if cl && n > 0 {
				r.Framing, r.ContentLength = Sized, int64(n)
			}
			return
		}
		r.Framing = Chunked
	case cl && n > 0:
		r.Framing, r.ContentLength = Sized, int64(n)
	}
}

func (r *Request) hasConnToken(tok string) bool {
	for _, t := range r.connTokens {
		if equalFold(t, tok) {
			return true
		}
	}
	return false
}

func (r *Request) hasField(name string) bool {
	for i := range r.Fields {
		if equalFold(r.Fields[i].Name, name) {
			return true
		}
	}
	return false
}

// splitTarget splits the request target into path and query (and authority for absolute-form).
func (r *Request) splitTarget() bool {
	t := r.Target
	switch {
	case len(t) == 0:
		return false
	case t[0] == '/':
	case len(t) == 1 && t[0] == '*':
		r.Path = t
		return true
	default:
		// absolute-form: scheme "://" authority [path-abempty] ["?" query]
		i := bytes.Index(t, []byte("://"))
		if i <= 0 || !isScheme(t[:i]) {
			return false
		}
		rest := t[i+3:]
		j := bytes.IndexAny(rest, "/?")
		if j < 0 {
			j = len(rest)
		}
		auth := rest[:j]
		if k := bytes.LastIndexByte(auth, '@'); k >= 0 {
			auth = auth[k+1:] // userinfo is never forwarded nor routed on
		}
		if len(auth) == 0 {
			return false
		}
		r.AuthorityHost, r.Host = auth, auth
		t = rest[j:]
		if len(t) == 0 {
			r.Path = slash
			return true
		}
		if t[0] == '?' {
			r.Path, r.Query = slash, t[1:]
			return true
		}
	}
	if q := bytes.IndexByte(t, '?'); q >= 0 {
		r.Path, r.Query = t[:q], t[q+1:]
	} else {
		r.Path = t
	}
	return ValidEscapes(r.Path)
}

// ValidEscapes reports whether every '%' in p starts a two-digit hex escape (the router decodes
// the path; a path that cannot be decoded is refused, as net/http refuses it).
func ValidEscapes[S ~string | ~[]byte](p S) bool {
	for i := 0; i < len(p); i++ {
		if p[i] == '%' {
			if i+2 >= len(p) || unhex(p[i+1]) < 0 || unhex(p[i+2]) < 0 {
				return false
			}
			i += 2
		}
	}
	return true
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c|0x20 >= 'a' && c|0x20 <= 'f':
		return int(c|0x20-'a') + 10
	}
	return -1
}

// AppendDecodedPath appends the path with its escapes decoded (for routing).
func (r *Request) AppendDecodedPath(dst []byte) []byte {
	return AppendUnescaped(dst, r.Path)
}

// AppendUnescaped appends p with its escapes decoded; a '%' too near the end to start one is
// kept as it is (ValidEscapes refuses such a path first).
func AppendUnescaped[S ~string | ~[]byte](dst []byte, p S) []byte {
	for i := 0; i < len(p); i++ {
		if p[i] == '%' && i+2 < len(p) {
			dst = append(dst, byte(unhex(p[i+1])<<4|unhex(p[i+2])))
			i += 2
			continue
		}
		dst = append(dst, p[i])
	}
	return dst
}

var slash = []byte("/")

func isScheme(s []byte) bool {
	for i, c := range s {
		alpha := c|0x20 >= 'a' && c|0x20 <= 'z'
		if !alpha && (i == 0 || !(c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.')) {
			return false
		}
	}
	return len(s) > 0
}

// chunkedFinal reports whether a Transfer-Encoding value is exactly chunked. The engine
// forwards chunked bodies as chunked and nothing else: other codings (gzip, then chunked) would
// have to be passed through with a framing it cannot check, so they are refused, as net/http
// refuses them.
func chunkedFinal(v []byte) bool { return equalFold(TrimOWS(v), "chunked") }

// parseContentLength: digits only (surrounding whitespace allowed), at most 2^62.
func parseContentLength(v []byte) (uint64, bool) {
	v = TrimOWS(v)
	if len(v) == 0 || len(v) > 19 {
		return 0, false
	}
	var n uint64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
	}
	return n, n <= 1<<62
}

// forEachToken calls fn with each non-empty comma-separated element of v, trimmed.
func forEachToken(v []byte, fn func([]byte)) {
	for len(v) > 0 {
		var tok []byte
		if i := bytes.IndexByte(v, ','); i >= 0 {
			tok, v = v[:i], v[i+1:]
		} else {
			tok, v = v, nil
		}
		if tok = TrimOWS(tok); len(tok) > 0 {
			fn(tok)
		}
	}
}

// TrimOWS trims spaces and tabs at both ends.
func TrimOWS(v []byte) []byte {
	i, j := 0, len(v)
	for i < j && (v[i] == ' ' || v[i] == '\t') {
		i++
	}
	for i < j && (v[j-1] == ' ' || v[j-1] == '\t') {
		j--
	}
	return v[i:j]
}

// equalFold compares b with an ASCII string case-insensitively.
func equalFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		if lower(b[i]) != lower(s[i]) {
			return false
		}
	}
	return true
}

func lower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

var tokenTable = func() (t [256]bool) {
	for c := 0; c < 256; c++ {
		b := byte(c)
		t[c] = b >= '0' && b <= '9' || b|0x20 >= 'a' && b|0x20 <= 'z' || bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), b) >= 0
	}
	return
}()

func isToken(b []byte) bool {
	for _, c := range b {
		if !tokenTable[c] {
			return false
		}
	}
	return len(b) > 0
}

// validValue: no control characters but HTAB (obs-text allowed).
func validValue(b []byte) bool {
	for _, c := range b {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// Str views b as a string without copying. The string is valid only while b's bytes are: use it
// for matching and logging within the request, never keep it.
func Str(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

// HeaderValue serves router.Headers: the i-th value of the field name, trimmed.
func (r *Request) HeaderValue(name string, i int) (string, bool) {
	for k := range r.Fields {
		f := &r.Fields[k]
		if !f.NoColon && equalFold(f.Name, name) {
			if i == 0 {
				return Str(TrimOWS(f.Value)), true
			}
			i--
		}
	}
	return "", false
}

// Value returns the first value of field name (trimmed), nil when absent.
func (r *Request) Value(name string) []byte {
	for k := range r.Fields {
		f := &r.Fields[k]
		if !f.NoColon && equalFold(f.Name, name) {
			return TrimOWS(f.Value)
		}
	}
	return nil
}
