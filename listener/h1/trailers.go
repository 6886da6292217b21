package h1

// Chunked bodies relayed to a peer that does not speak chunked framing (an HTTP/2 client) but can
// carry the trailer section in another form (a final HEADERS frame). CopyBody drops trailers when
// it unwraps chunks (an HTTP/1.0 client has nowhere to put them); this keeps them.

// CopyChunkedTrailers copies a chunked body from src to dst without its chunk framing, as
// CopyBody(dst, src, Chunked, 0, UntilClose) does, and calls trailer for each field of the
// trailer section, in order. The framing is checked as strictly as CopyBody checks it (a
// malformed trailer line is ErrBadChunk). name and value view src's buffer and are valid only
// during the call; value has its surrounding whitespace trimmed. It returns the body bytes
// copied.
func CopyChunkedTrailers(dst *Writer, src *Reader, trailer func(name, value []byte)) (int64, error) {
	return copyChunked(dst, src, false, trailer)
}
