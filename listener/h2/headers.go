package h2

import (
	"errors"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// headerBlock decodes header blocks (a HEADERS frame and its CONTINUATION frames) for the
// connection's reader. It applies the checks of x/net's Framer.readMetaFrame (which the reader
// used before) in the same order with the same errors: field names lower-case tokens, values
// without CR/LF/NUL, pseudo-fields first, no unknown or repeated pseudo-field, the header list
// bounded while it is decoded (past MaxHeaderListSize the rest is decoded without being kept and
// the block is Truncated: 431), a fragment far beyond what is left of the bound ends the
// connection (CONTINUATION flood). Unlike readMetaFrame, which allocates a frame, a closure with
// its captured state and a growing field slice for every block, it keeps one decoder, one emit
// function and one scratch slice for the connection's life; fields a stream keeps are copied
// out (conn.keepFields).
type headerBlock struct {
	dec  *hpack.Decoder
	max  uint32 // MaxHeaderListSize
	open bool   // a block is being decoded (HEADERS seen, END_HEADERS not yet)

	// the block being decoded
	mh                       http2.MetaHeadersFrame // Fields is the scratch below
	fields                   []hpack.HeaderField
	headersLeft, trailerLeft uint32
	sawRegular               bool
	invalid                  error
}

var (
	errPseudoAfterRegular = errors.New("h2: pseudo header field after regular")
	errBadFieldName       = errors.New("h2: invalid header field name")
	errBadFieldValue      = errors.New("h2: invalid header field value")
	errBadPseudo          = errors.New("h2: invalid or repeated pseudo header field")
)

func newHeaderBlock(max uint32) *headerBlock {
	b := &headerBlock{max: max}
	b.dec = hpack.NewDecoder(4096, b.emit) // the emit function is bound once, here
	b.dec.SetMaxStringLength(int(max))
	return b
}

// begin starts the block of f and decodes its fragment; done: f ended the block.
func (b *headerBlock) begin(f *http2.HeadersFrame) (done bool, err error) {
	clear(b.fields)
	b.fields = b.fields[:0]
	b.mh = http2.MetaHeadersFrame{HeadersFrame: f}
	b.headersLeft, b.trailerLeft = b.max, b.max
	b.sawRegular, b.invalid = false, nil
	b.open = true
	b.dec.SetEmitEnabled(true)
	return b.feed(f.HeaderBlockFragment(), f.HeadersEnded())
}

// more decodes a CONTINUATION frame of the open block (the Framer has checked that it belongs
// to it: checkFrameOrder).
func (b *headerBlock) more(f *http2.ContinuationFrame) (done bool, err error) {
	if !b.open {
		return false, http2.ConnectionError(errCodeProtocol)
	}
	return b.feed(f.HeaderBlockFragment(), f.HeadersEnded())
}

func (b *headerBlock) feed(frag []byte, end bool) (bool, error) {
	// Far more than the list may still hold, or anything after the list is full: a flood.
	if int64(len(frag)) > 2*(int64(b.headersLeft)+int64(b.trailerLeft)) {
		b.open = false
		return false, http2.ConnectionError(errCodeProtocol)
	}
	// A CONTINUATION after an invalid field: its size is no longer tracked.
	if b.invalid != nil {
		b.open = false
		return false, http2.ConnectionError(errCodeProtocol)
	}
	if _, err := b.dec.Write(frag); err != nil {
		b.open = false
		return false, http2.ConnectionError(http2.ErrCodeCompression)
	}
	if !end {
		return false, nil
	}
	b.open = false
	if err := b.dec.Close(); err != nil {
		return false, http2.ConnectionError(http2.ErrCodeCompression)
	}
	if b.invalid != nil {
		return false, http2.StreamError{StreamID: b.mh.StreamID, Code: errCodeProtocol, Cause: b.invalid}
	}
	b.mh.Fields = b.fields
	if err := checkPseudos(b.mh.PseudoFields()); err != nil {
		return false, http2.StreamError{StreamID: b.mh.StreamID, Code: errCodeProtocol, Cause: err}
	}
	return true, nil
}

// frame is the decoded block, valid until the next begin: fields kept beyond must be copied.
func (b *headerBlock) frame() *http2.MetaHeadersFrame { return &b.mh }

// emit receives each decoded field (the decoder's emit function).
func (b *headerBlock) emit(hf hpack.HeaderField) {
	if !httpguts.ValidHeaderFieldValue(hf.Value) {
		b.invalid = errBadFieldValue
	}
	if strings.HasPrefix(hf.Name, ":") {
		if b.sawRegular {
			b.invalid = errPseudoAfterRegular
		}
	} else {
		b.sawRegular = true
		if !validWireName(hf.Name) {
			b.invalid = errBadFieldName
		}
	}
	if b.invalid != nil {
		b.dec.SetEmitEnabled(false)
		return
	}
	left, size := &b.headersLeft, hf.Size()
	if hf.Name == "trailer" {
		// As readMetaFrame: each name the Trailer field announces is charged as a field.
		n := uint32(strings.Count(hf.Value, ",") + 1)
		left, size = &b.trailerLeft, uint32(len(hf.Value))-n+1+n*hpack.HeaderField{}.Size()
	}
	if size > *left {
		b.dec.SetEmitEnabled(false)
		b.mh.Truncated = true
		b.headersLeft, b.trailerLeft = 0, 0
		return
	}
	*left -= size
	b.fields = append(b.fields, hf)
}

// validWireName: a token without upper-case letters (RFC 9113 section 8.2.1).
func validWireName(v string) bool {
	if len(v) == 0 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !httpguts.IsTokenRune(rune(c)) || 'A' <= c && c <= 'Z' {
			return false
		}
	}
	return true
}

// checkPseudos: known pseudo-fields only, none twice, not request and response ones mixed.
func checkPseudos(pf []hpack.HeaderField) error {
	var isRequest, isResponse bool
	for i, hf := range pf {
		switch hf.Name {
		case ":method", ":path", ":scheme", ":authority", ":protocol":
			isRequest = true
		case ":status":
			isResponse = true
		default:
			return errBadPseudo
		}
		for _, prev := range pf[:i] {
			if hf.Name == prev.Name {
				return errBadPseudo
			}
		}
	}
	if isRequest && isResponse {
		return errBadPseudo
	}
	return nil
}

// keepFields copies fields a stream keeps (its request head, its trailers) out of the block
// scratch into a slab shared by the connection's streams: one allocation per slab, not per
// stream. Each stream's slice is capped, so no append reaches a neighbour's fields. Reader only.
func (c *conn) keepFields(f []hpack.HeaderField) []hpack.HeaderField {
	if len(f) == 0 {
		return nil
	}
	if cap(c.slab)-len(c.slab) < len(f) {
		// Small: an idle connection keeps at most this much, and a slab is freed once the
		// streams viewing it are gone.
		c.slab = make([]hpack.HeaderField, 0, max(len(f), 64))
	}
	n := len(c.slab)
	c.slab = append(c.slab, f...)
	return c.slab[n:len(c.slab):len(c.slab)]
}
