package l4

import (
	"errors"
	"io"
	"strings"
)

// ClientHello peeking for TLS pass-through with SNI routing. The bytes are read into a buffer,
// parsed here (a small strict parser: the stream is not ours to terminate, we only need the
// name) and replayed to the target untouched.

var (
	// ErrNotTLS: the stream does not start with a TLS handshake record; it is routed to the
	// default target with its bytes replayed.
	ErrNotTLS = errors.New("l4: stream does not start with a TLS handshake")
	// ErrBadHello: the stream starts like TLS but the ClientHello is malformed or too large.
	ErrBadHello = errors.New("l4: malformed TLS ClientHello")
)

const (
	maxRecordPayload = 16384 + 256 // TLSPlaintext limit, lenient by the compression allowance
	maxHelloMsg      = 64 << 10    // larger ClientHellos are refused
	maxPeekBytes     = maxHelloMsg + 5*(maxHelloMsg/16384+2) + 4096
)

// peekClientHello reads from r until the first handshake message (a ClientHello) is complete.
// It returns everything read (to replay; may extend past the hello) and the server name ("" if
// none). On ErrNotTLS the bytes read so far are returned for replay. buf is reused if large
// enough.
func peekClientHello(r io.Reader, buf []byte) (raw []byte, sni string, err error) {
	if cap(buf) < 4096 {
		buf = make([]byte, 0, 4096)
	}
	raw = buf[:0]
	for {
		if len(raw) == cap(raw) {
			if cap(raw) >= maxPeekBytes {
				return raw, "", ErrBadHello
			}
			grown := make([]byte, len(raw), min(2*cap(raw), maxPeekBytes))
			copy(grown, raw)
			raw = grown
		}
		n, rerr := r.Read(raw[len(raw):cap(raw)])
		raw = raw[:len(raw)+n]
		if n > 0 {
			msg, more, perr := helloFromRecords(raw)
			if perr != nil {
				return raw, "", perr
			}
			if !more {
				sni, err = parseClientHello(msg)
				return raw, sni, err
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				rerr = io.ErrUnexpectedEOF
			}
			return raw, "", rerr
		}
	}
}

// helloFromRecords reassembles the first handshake message from the TLS records at the start
// of raw. more reports that raw is a valid prefix that needs more bytes.
func helloFromRecords(raw []byte) (msg []byte, more bool, err error) {
	var hs []byte // reassembly, only when the hello spans records
	off := 0
	for {
		if len(raw)-off < 5 {
			if off == 0 && len(raw) > 0 && raw[0] != 0x16 {
				return nil, false, ErrNotTLS
			}
			if off == 0 && len(raw) > 1 && raw[1] != 3 {
				return nil, false, ErrNotTLS
			}
			return nil, true, nil
		}
		if raw[off] != 0x16 || raw[off+1] != 3 {
			if off == 0 {
				return nil, false, ErrNotTLS
			}
			return nil, false, ErrBadHello // a non-handshake record inside the hello
		}
		l := int(raw[off+3])<<8 | int(raw[off+4])
		if l == 0 || l > maxRecordPayload {
			return nil, false, ErrBadHello
		}
		if len(raw)-off-5 < l {
			return nil, true, nil
		}
		frag := raw[off+5 : off+5+l]
		off += 5 + l
		if hs == nil && off == 5+l {
			hs = frag[:len(frag):len(frag)] // first record: alias, append copies later
		} else {
			hs = append(hs, frag...)
		}
		if len(hs) >= 4 {
			if hs[0] != 1 { // client_hello
				return nil, false, ErrBadHello
			}
			ml := int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])
			if ml > maxHelloMsg {
				return nil, false, ErrBadHello
			}
			if len(hs) >= 4+ml {
				if len(hs) > 4+ml {
					// Another handshake message in the same flight before our reply: not
					// something a client does; refuse rather than guess.
					return nil, false, ErrBadHello
				}
				return hs[4:], false, nil
			}
		}
	}
}

// reader is a bounds-checked cursor; any short read sets bad.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) bytes(n int) []byte {
	if r.bad || n < 0 || n > len(r.b) {
		r.bad = true
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() int {
	v := r.bytes(1)
	if v == nil {
		return 0
	}
	return int(v[0])
}

func (r *reader) u16() int {
	v := r.bytes(2)
	if v == nil {
		return 0
	}
	return int(v[0])<<8 | int(v[1])
}

// vec reads a length-prefixed vector (prefix of size 1 or 2 bytes).
func (r *reader) vec(prefix int) reader {
	var n int
	if prefix == 1 {
		n = r.u8()
	} else {
		n = r.u16()
	}
	v := r.bytes(n)
	return reader{b: v, bad: r.bad}
}

const extServerName = 0

// parseClientHello returns the host_name of the server_name extension of a ClientHello body
// (RFC 8446 4.1.2, RFC 6066 3), strictly: every length must add up, no trailing bytes, no
// duplicate extensions, at most one host_name, and the name must be a plausible DNS name.
func parseClientHello(msg []byte) (string, error) {
	r := reader{b: msg}
	if v := r.u16(); v>>8 != 3 { // legacy_version 3.x
		return "", ErrBadHello
	}
	r.bytes(32) // random
	if sid := r.vec(1); len(sid.b) > 32 {
		return "", ErrBadHello
	}
	if cs := r.vec(2); len(cs.b) < 2 || len(cs.b)%2 != 0 {
		return "", ErrBadHello
	}
	if cm := r.vec(1); len(cm.b) < 1 {
		return "", ErrBadHello
	}
	if r.bad {
		return "", ErrBadHello
	}
	if len(r.b) == 0 { // no extensions (TLS 1.0-1.2 may omit them)
		return "", nil
	}
	exts := r.vec(2)
	if r.bad || len(r.b) != 0 {
		return "", ErrBadHello
	}
	var seen [8]uint16 // small fixed set for the common case; map beyond that
	nseen := 0
	var seenMore map[int]bool
	sni := ""
	for len(exts.b) > 0 && !exts.bad {
		typ := exts.u16()
		data := exts.vec(2)
		if exts.bad {
			break
		}
		dup := false
		for i := range nseen {
			if int(seen[i]) == typ {
				dup = true
			}
		}
		if nseen < len(seen) {
			seen[nseen] = uint16(typ)
			nseen++
		} else {
			if seenMore == nil {
				seenMore = map[int]bool{}
			}
			dup = dup || seenMore[typ]
			seenMore[typ] = true
		}
		if dup {
			return "", ErrBadHello
		}
		if typ != extServerName {
			continue
		}
		list := data.vec(2)
		if data.bad || len(data.b) != 0 || len(list.b) == 0 {
			return "", ErrBadHello
		}
		for len(list.b) > 0 && !list.bad {
			nameType := list.u8()
			name := list.vec(2)
			if list.bad {
				break
			}
			if nameType != 0 { // only host_name is defined
				continue
			}
			if sni != "" || !validHostName(name.b) {
				return "", ErrBadHello
			}
			sni = strings.ToLower(string(name.b))
		}
		if list.bad {
			return "", ErrBadHello
		}
	}
	if exts.bad {
		return "", ErrBadHello
	}
	return sni, nil
}

// validHostName accepts ASCII DNS names: labels of letters, digits, '-' and '_' (seen in the
// wild), 1..63 bytes each, 253 in all, no empty label and no trailing dot (RFC 6066).
func validHostName(b []byte) bool {
	if len(b) == 0 || len(b) > 253 {
		return false
	}
	label := 0
	for _, c := range b {
		switch {
		case c == '.':
			if label == 0 {
				return false
			}
			label = 0
			continue
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return label > 0
}
