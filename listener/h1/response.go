package h1

import (
	"bytes"
	"errors"
	"strconv"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/router"
)

// ErrBadResponse: a target's response head we cannot frame or forward faithfully (502).
var ErrBadResponse = errors.New("h1: malformed response head from target")

// Response is one parsed response head from a target; slices point into the buffer given to
// Parse. Reused like Request.
type Response struct {
	Status int
	Reason []byte // the reason phrase as sent
	Minor  int
	Fields []desync.Field // Kind is unused (KindOther)

	Framing       Framing
	ContentLength int64
	Close         bool // the target closes after this response
	HeadLen       int

	connTokens [][]byte
}

// Parse parses the response head at the start of b; head is a HEAD request's (no body whatever
// the fields say). Errors as Request.Parse, plus ErrBadResponse.
func (r *Response) Parse(b []byte, max int, head bool) error {
	end, err := headLen(b, max, ErrBadResponse)
	if err != nil {
		return err
	}
	fields, tokens := r.Fields[:0], r.connTokens[:0]
	clear(r.Fields[:cap(r.Fields)])
	*r = Response{Fields: fields, connTokens: tokens, HeadLen: end}
	line, _, rest := nextLine(b[:end])
	// HTTP/1.x SP 3DIGIT [SP reason]
	if len(line) < 12 || string(line[:7]) != "HTTP/1." || line[7] < '0' || line[7] > '9' || line[8] != ' ' {
		return ErrBadResponse
	}
	r.Minor = min(int(line[7]-'0'), 1)
	code := line[9:12]
	if code[0] < '1' || code[0] > '5' || code[1] < '0' || code[1] > '9' || code[2] < '0' || code[2] > '9' {
		return ErrBadResponse
	}
	r.Status = int(code[0]-'0')*100 + int(code[1]-'0')*10 + int(code[2]-'0')
	if len(line) > 12 {
		if line[12] != ' ' {
			return ErrBadResponse
		}
		r.Reason = line[13:]
	}
	te, cl := 0, false
	var n uint64
	for len(rest) > 0 {
		line, _, rest = nextLine(rest)
		if len(line) == 0 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok || !isToken(name) || !validValue(value) {
			return ErrBadResponse // obs-fold, no colon, bad name, CR/NUL in a value
		}
		f := desync.Field{Name: name, Value: value}
		switch {
		case equalFold(name, "transfer-encoding"):
			te++
			if !chunkedFinal(value) {
				te = 99 // not chunked last: the body runs until close (RFC 9112 6.3)
			}
		case equalFold(name, "content-length"):
			v, ok := parseContentLength(value)
			if !ok || cl && v != n {
				return ErrBadResponse
			}
			cl, n = true, v
		case equalFold(name, "connection"):
			forEachToken(value, func(tok []byte) {
				if equalFold(tok, "close") {
					r.Close = true
				}
				r.connTokens = append(r.connTokens, tok)
			})
		}
		r.Fields = append(r.Fields, f)
	}
	if r.Minor == 0 && !hasToken(r.connTokens, "keep-alive") {
		r.Close = true
	}
	switch {
	case head || r.Status < 200 || r.Status == 204 || r.Status == 304:
		r.Framing = NoBody
	case te == 1 && r.Minor == 1:
		r.Framing = Chunked
	case te > 0:
		r.Framing, r.Close = UntilClose, true
	case cl:
		r.Framing, r.ContentLength = Sized, int64(n)
		if n == 0 {
			r.Framing = NoBody
		}
	default:
		r.Framing, r.Close = UntilClose, true
	}
	return nil
}

func hasToken(toks [][]byte, s string) bool {
	for _, t := range toks {
		if equalFold(t, s) {
			return true
		}
	}
	return false
}

// ResponseOut is what the proxy changes in a response head it passes to a client.
type ResponseOut struct {
	Ops    *router.HeaderOps
	Extra  []router.HeaderValue // added (Set-Cookie for stickiness)
	Close  bool                 // the client connection closes after this response
	Minor  int                  // the client's HTTP/1 minor version
	Head   bool                 // a HEAD request: framing fields pass, no body follows
	Switch []byte               // for 101: the Upgrade value
}

// AppendResponseHead writes the head of r for the client: status line, the target's fields but
// hop-by-hop ones and those the rule removes or sets, the rule's set/add, Extra, and framing.
// It returns the framing the client gets (an HTTP/1.0 client gets chunked bodies unchunked, and
// then the connection closes).
func (o *ResponseOut) AppendResponseHead(dst []byte, r *Response) ([]byte, Framing) {
	dst = append(dst, "HTTP/1.1 "...)
	if o.Minor == 0 {
		dst[len(dst)-2] = '0'
	}
	dst = strconv.AppendInt(dst, int64(r.Status), 10)
	dst = append(dst, ' ')
	dst = append(dst, r.Reason...)
	dst = append(dst, '\r', '\n')
	framing := r.Framing
	if framing == Chunked && o.Minor == 0 {
		framing, o.Close = UntilClose, true
	}
	if framing == UntilClose {
		o.Close = true
	}
	for i := range r.Fields {
		f := &r.Fields[i]
		if !o.keep(f.Name, r.connTokens, r.Status) {
			continue
		}
		dst = AppendField(dst, f.Name, TrimOWS(f.Value))
	}
	dst = AppendOps(dst, o.Ops)
	dst = appendValues(dst, o.Extra)
	dst = appendFraming(dst, framing, r.ContentLength)
	if framing == NoBody && r.Status >= 200 && r.Status != 204 && r.Status != 304 && !o.Head {
		dst = append(dst, "Content-Length: 0\r\n"...)
	}
	switch {
	case r.Status == 101:
		dst = append(dst, "Connection: upgrade\r\n"...)
		dst = AppendField(dst, "Upgrade", o.Switch)
	case o.Close:
		dst = append(dst, "Connection: close\r\n"...)
	case o.Minor == 0:
		dst = append(dst, "Connection: keep-alive\r\n"...)
	}
	return append(dst, '\r', '\n'), framing
}

func (o *ResponseOut) keep(name []byte, connTokens [][]byte, status int) bool {
	switch {
	case equalFold(name, "connection"), equalFold(name, "keep-alive"), equalFold(name, "proxy-connection"),
		equalFold(name, "transfer-encoding"), equalFold(name, "upgrade"), equalFold(name, "te"):
		return false
	case equalFold(name, "content-length"):
		return o.Head || status == 304 // otherwise regenerated from the framing
	}
	return !overridden(name, connTokens, o.Ops)
}

// Value returns the first value of field name (trimmed), nil when absent.
func (r *Response) Value(name string) []byte {
	for k := range r.Fields {
		if equalFold(r.Fields[k].Name, name) {
			return TrimOWS(r.Fields[k].Value)
		}
	}
	return nil
}

// HeaderValue serves header lookups by name (router.Headers, backends.HeaderValues).
func (r *Response) HeaderValue(name string, i int) (string, bool) {
	for k := range r.Fields {
		if equalFold(r.Fields[k].Name, name) {
			if i == 0 {
				return Str(TrimOWS(r.Fields[k].Value)), true
			}
			i--
		}
	}
	return "", false
}
