package h1

import (
	"math/rand/v2"
	"net/netip"
	"strconv"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/router"
)

// XFFMode is the listener's X-Forwarded-For processing (ALB's names).
type XFFMode uint8

const (
	XFFAppend XFFMode = iota
	XFFPreserve
	XFFRemove
)

// ParseXFF maps the configuration spelling; "" is append.
func ParseXFF(s string) XFFMode {
	switch s {
	case "preserve":
		return XFFPreserve
	case "remove":
		return XFFRemove
	}
	return XFFAppend
}

// Outgoing is what the proxy writes into a request head it forwards, beyond the client's own
// fields. The listener part is set once per configuration generation; the request part per
// request. It is the request core shared by the HTTP/1 and HTTP/2 engines: both forward to
// targets over HTTP/1.1 and both filter the client's fields through Keep and end the head with
// AppendTail, so both forward the same bytes for the same request.
type Outgoing struct {
	// Listener generation.
	XFF         XFFMode
	DropInvalid bool   // drop_invalid_header_fields: names must be [A-Za-z0-9-]
	Proto, Port string // X-Forwarded-Proto, X-Forwarded-Port

	// Request.
	Trusted   bool       // the client's forwarding headers (XFF, X-Request-Id, ...) are believed
	Client    netip.Addr // the client, appended to X-Forwarded-For
	RequestID []byte     // the id to send (see SetRequestID); valid until the next request
	Ops       *router.HeaderOps
	Extra     []router.HeaderValue // set after Ops' removals (client-certificate headers)
	Close     bool                 // ask the target to close after this request

	idBuf [32]byte
}

// SetRequestID picks the request id: the client's when it is trusted and sane (1-200 visible
// characters), else a new random one. The result is in o.RequestID.
func (o *Outgoing) SetRequestID(fromClient []byte) {
	if o.Trusted && len(fromClient) > 0 && len(fromClient) <= 200 && visible(fromClient) {
		o.RequestID = fromClient
		return
	}
	const hex = "0123456789abcdef"
	a, b := rand.Uint64(), rand.Uint64() // runtime ChaCha8, seeded by the OS: unique, not secret
	for i := 0; i < 16; i++ {
		o.idBuf[i] = hex[a>>60]
		o.idBuf[16+i] = hex[b>>60]
		a <<= 4
		b <<= 4
	}
	o.RequestID = o.idBuf[:]
}

func visible(b []byte) bool {
	for _, c := range b {
		if c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// Keep reports whether a client field goes to the target unchanged. Everything the proxy
// regenerates (framing, forwarding headers), hop-by-hop fields, fields named by the rule's
// remove/set operations, and fields a target could misread (look-alike framing names, names that
// are not tokens, values with control characters, lines without a colon) stay behind.
// connTokens are the Connection field's tokens (HTTP/1; nil for HTTP/2).
func (o *Outgoing) Keep(f *desync.Field, connTokens [][]byte) bool {
	if f.NoColon || f.Kind != desync.KindOther || !isToken(f.Name) || !validValue(f.Value) {
		return false
	}
	name := f.Name
	if o.DropInvalid && !alnumDash(name) {
		return false
	}
	switch lower(name[0]) {
	case 'c':
		if equalFold(name, "connection") {
			return false
		}
	case 'k':
		if equalFold(name, "keep-alive") {
			return false
		}
	case 'p':
		if equalFold(name, "proxy-connection") || equalFold(name, "proxy-authenticate") || equalFold(name, "proxy-authorization") {
			return false
		}
	case 't':
		if equalFold(name, "te") {
			return false
		}
	case 'u':
		if equalFold(name, "upgrade") {
			return false // re-added for an upgrade request
		}
	case 'f':
		if !o.Trusted && equalFold(name, "forwarded") {
			return false
		}
	case 'x':
		if equalFold(name, "x-forwarded-for") || equalFold(name, "x-forwarded-proto") || equalFold(name, "x-forwarded-port") ||
			equalFold(name, "x-forwarded-host") || equalFold(name, "x-request-id") {
			return false
		}
		if !o.Trusted && (equalFold(name, "x-real-ip") || hasPrefixFold(name, "x-amzn-mtls-clientcert")) {
			return false
		}
	}
	return !overridden(name, connTokens, o.Ops)
}

// AppendRequestLine writes "METHOD target HTTP/1.1\r\n". The target is written in origin form
// (path and query); a space or control byte in it (classified, and forwarded when the mode allows)
// is percent-encoded so the target cannot split the line elsewhere.
func AppendRequestLine(dst, method, path, query []byte) []byte {
	dst = append(dst, method...)
	dst = append(dst, ' ')
	dst = appendTargetBytes(dst, path)
	if query != nil {
		dst = append(dst, '?')
		dst = appendTargetBytes(dst, query)
	}
	return append(dst, " HTTP/1.1\r\n"...)
}

func appendTargetBytes(dst, b []byte) []byte {
	const hex = "0123456789ABCDEF"
	for _, c := range b {
		if c <= ' ' || c == 0x7f {
			dst = append(dst, '%', hex[c>>4], hex[c&15])
			continue
		}
		dst = append(dst, c)
	}
	return dst
}

// AppendField writes "name: value\r\n".
func AppendField[N, V ~string | ~[]byte](dst []byte, name N, value V) []byte {
	dst = append(dst, name...)
	dst = append(dst, ':', ' ')
	dst = append(dst, value...)
	return append(dst, '\r', '\n')
}

// AppendOps writes a rule's set and add operations (ops may be nil).
func AppendOps(dst []byte, ops *router.HeaderOps) []byte {
	if ops == nil {
		return dst
	}
	dst = appendValues(dst, ops.Set)
	return appendValues(dst, ops.Add)
}

func appendValues(dst []byte, fields []router.HeaderValue) []byte {
	for _, kv := range fields {
		dst = AppendField(dst, kv.Name, kv.Value)
	}
	return dst
}

// appendFraming writes the field that frames a body of n bytes (Sized) or a chunked one;
// nothing for the other framings.
func appendFraming(dst []byte, framing Framing, n int64) []byte {
	switch framing {
	case Sized:
		dst = append(dst, "Content-Length: "...)
		dst = strconv.AppendInt(dst, n, 10)
		dst = append(dst, '\r', '\n')
	case Chunked:
		dst = append(dst, "Transfer-Encoding: chunked\r\n"...)
	}
	return dst
}

// AppendTail writes what the proxy adds after the client's kept fields: X-Forwarded-For (with the
// prior chain when believed), -Proto, -Port, X-Request-Id, the rule's set and add operations,
// Extra, and the framing and connection fields. priorXFF are the client's X-Forwarded-For
// values in order. framing and n describe the body that follows.
func (o *Outgoing) AppendTail(dst []byte, priorXFF [][]byte, framing Framing, n int64) []byte {
	if !o.opsTouch("X-Forwarded-For") {
		switch o.XFF {
		case XFFRemove:
		case XFFPreserve:
			// ALB preserve: the chain unchanged, believed only from a trusted client; from
			// anyone else it would be a forgery, so the target gets the client alone.
			if o.Trusted {
				for _, v := range priorXFF {
					dst = AppendField(dst, "X-Forwarded-For", v)
				}
			} else {
				dst = o.appendClientXFF(dst, nil)
			}
		default:
			if !o.Trusted {
				priorXFF = nil
			}
			dst = o.appendClientXFF(dst, priorXFF)
		}
	}
	if !o.opsTouch("X-Forwarded-Proto") {
		dst = AppendField(dst, "X-Forwarded-Proto", o.Proto)
	}
	if !o.opsTouch("X-Forwarded-Port") {
		dst = AppendField(dst, "X-Forwarded-Port", o.Port)
	}
	if !o.opsTouch("X-Request-Id") {
		dst = AppendField(dst, "X-Request-Id", o.RequestID)
	}
	dst = appendValues(dst, o.Extra)
	dst = AppendOps(dst, o.Ops)
	dst = appendFraming(dst, framing, n)
	if o.Close {
		dst = append(dst, "Connection: close\r\n"...)
	}
	return dst
}

// opsTouch: the rule removes or sets this field itself (set wins over ours, as before).
func (o *Outgoing) opsTouch(name string) bool {
	ops := o.Ops
	if ops == nil {
		return false
	}
	for _, k := range ops.Remove {
		if k == name {
			return true
		}
	}
	for _, kv := range ops.Set {
		if kv.Name == name {
			return true
		}
	}
	return false
}

func (o *Outgoing) appendClientXFF(dst []byte, prior [][]byte) []byte {
	dst = append(dst, "X-Forwarded-For: "...)
	for _, v := range prior {
		dst = append(dst, TrimOWS(v)...)
		dst = append(dst, ',', ' ')
	}
	dst = o.Client.Unmap().WithZone("").AppendTo(dst)
	return append(dst, '\r', '\n')
}

// AppendForwardHead writes the whole head forwarding r: request line, the client's kept fields,
// and the tail. Upgrade requests carry Connection: upgrade and the Upgrade field.
func (o *Outgoing) AppendForwardHead(dst []byte, r *Request) []byte {
	dst = AppendRequestLine(dst, r.Method, r.Path, r.Query)
	hostDone := false
	var xff [8][]byte
	prior := xff[:0]
	for i := range r.Fields {
		f := &r.Fields[i]
		if f.Kind == desync.KindOther && !f.NoColon && equalFold(f.Name, "x-forwarded-for") {
			if len(prior) < cap(prior) {
				prior = append(prior, TrimOWS(f.Value))
			}
			continue
		}
		if equalFold(f.Name, "host") {
			// Exactly one Host goes out: the request's host (absolute-form authority wins).
			if !hostDone {
				hostDone = true
				dst = AppendField(dst, "Host", r.Host)
			}
			continue
		}
		if o.Keep(f, r.connTokens) {
			dst = AppendField(dst, f.Name, TrimOWS(f.Value))
		}
	}
	if !hostDone { // HTTP/1.0 without a host: an empty Host, as RFC 9112 3.2 asks
		dst = AppendField(dst, "Host", r.Host)
	}
	dst = o.AppendTail(dst, prior, r.Framing, r.ContentLength)
	if r.Upgrade {
		if up := r.Value("upgrade"); up != nil {
			dst = append(dst, "Connection: upgrade\r\n"...)
			dst = AppendField(dst, "Upgrade", up)
		}
	}
	return append(dst, '\r', '\n')
}

func alnumDash(b []byte) bool {
	for _, c := range b {
		if !(c >= '0' && c <= '9' || c|0x20 >= 'a' && c|0x20 <= 'z' || c == '-') {
			return false
		}
	}
	return len(b) > 0
}

func hasPrefixFold(b []byte, prefix string) bool {
	return len(b) >= len(prefix) && equalFold(b[:len(prefix)], prefix)
}

func equalFoldBytes(a, b []byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if lower(a[i]) != lower(b[i]) {
			return false
		}
	}
	return true
}

// overridden reports whether a field is named by its message's Connection header (hop-by-hop) or
// removed or replaced by the rule's header operations: either way it is not copied through.
func overridden(name []byte, connTokens [][]byte, ops *router.HeaderOps) bool {
	for _, t := range connTokens {
		if equalFoldBytes(name, t) {
			return true
		}
	}
	if ops != nil {
		for _, k := range ops.Remove {
			if equalFold(name, k) {
				return true
			}
		}
		for _, kv := range ops.Set {
			if equalFold(name, kv.Name) {
				return true
			}
		}
	}
	return false
}
