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
	var done int64
	for {
		l, err := src.line(dst, maxChunkLine)
		if err != nil {
			return done, err
		}
		size, ok := chunkSize(l)
		if !ok {
			return done, ErrBadChunk
		}
		if size == 0 {
			return done, readTrailers(dst, src, trailer)
		}
		k, err := copySized(dst, src, int64(size))
		done += k
		if err != nil {
			return done, err
		}
		l, err = src.line(dst, 2)
		if err != nil || len(l) != 2 || l[0] != '\r' {
			return done, ErrBadChunk
		}
	}
}

// readTrailers reads the trailer section up to its final CRLF (bounded as copyTrailers is),
// handing each field to fn.
func readTrailers(dst *Writer, src *Reader, fn func(name, value []byte)) error {
	total := 0
	for {
		l, err := src.line(dst, maxChunkLine)
		if err != nil {
			return err
		}
		total += len(l)
		if total > maxTrailers || len(l) < 2 || l[len(l)-2] != '\r' {
			return ErrBadChunk
		}
		if len(l) == 2 {
			return nil
		}
		name, value, ok := cutColon(l[:len(l)-2])
		if !ok || !isToken(name) || !validValue(value) {
			return ErrBadChunk
		}
		fn(name, TrimOWS(value))
	}
}
