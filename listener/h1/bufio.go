package h1

import (
	"errors"
	"io"
	"strconv"
	"sync"
	"time"
)

// Buffers are pooled by size class and held only while bytes are in flight: a connection waiting
// for its next request holds none (Release), which is most of what an idle connection costs.
var (
	pool4k  = sync.Pool{New: func() any { b := make([]byte, 4<<10); return &b }}
	pool16k = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}
	pool64k = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}
)

func getBuf(n int) *[]byte {
	switch {
	case n <= 4<<10:
		return pool4k.Get().(*[]byte)
	case n <= 16<<10:
		return pool16k.Get().(*[]byte)
	case n <= 64<<10:
		return pool64k.Get().(*[]byte)
	}
	b := make([]byte, n)
	return &b
}

func putBuf(p *[]byte) {
	switch cap(*p) {
	case 4 << 10:
		pool4k.Put(p)
	case 16 << 10:
		pool16k.Put(p)
	case 64 << 10:
		pool64k.Put(p)
	}
}

// Reader buffers one connection's input. Its buffer comes from a pool on the first read and goes
// back on Release once nothing is buffered.
type Reader struct {
	rd   io.Reader
	bp   *[]byte
	r, w int
	err  error

	// frozen bytes at the start of the buffer are never moved nor overwritten: the head of the
	// request being served, which its parsed slices (and the strings viewing them) point into.
	frozen int
	old    *[]byte // a buffer outgrown while frozen: still viewed, pooled again at Unfreeze

	// Per-read timeout (client_body_timeout, target_read_timeout): set before each read.
	dl      interface{ SetReadDeadline(time.Time) error }
	timeout time.Duration
	pace    pace
}

// pace is min_transfer_rate: after its first timeout-worth of time a transfer must average
// rate bytes/s; the deadline is min(last I/O + timeout, start + timeout + bytes/rate).
type pace struct {
	start time.Time
	bytes int64
	rate  int64
}

// newPace starts a transfer's pace; the clock is read only when a minimum rate applies, the
// one case that needs the start (clearing a timeout reads none).
func newPace(d time.Duration, rate int) pace {
	if d <= 0 || rate <= 0 {
		return pace{}
	}
	return pace{start: time.Now(), rate: int64(rate)}
}

func (p *pace) deadline(now time.Time, timeout time.Duration) time.Time {
	d := now.Add(timeout)
	if p.rate > 0 {
		if budget := p.start.Add(timeout + time.Duration(p.bytes*int64(time.Second)/p.rate)); budget.Before(d) {
			d = budget
		}
	}
	return d
}

// SetTimeout makes every following read wait at most d (0: no per-read deadline, leave the
// connection's deadline as it is), and the whole transfer average at least rate bytes/s after
// its first d (rate 0: no minimum).
func (b *Reader) SetTimeout(dl interface{ SetReadDeadline(time.Time) error }, d time.Duration, rate int) {
	b.dl, b.timeout = dl, d
	b.pace = newPace(d, rate)
}

// NewReader returns a reader over rd holding no buffer yet.
func NewReader(rd io.Reader) *Reader { return &Reader{rd: rd} }

// Reset points b at rd, dropping anything buffered.
func (b *Reader) Reset(rd io.Reader) {
	b.Unfreeze()
	if b.bp != nil {
		putBuf(b.bp)
	}
	*b = Reader{rd: rd}
}

// ResetRaw is Reset for a plain TCP socket read through raw (see Raw), which the caller owns
// and has Set to the socket's RawConn; deadlines are still set on the net.Conn.
func (b *Reader) ResetRaw(raw *Raw) {
	b.Reset(raw)
}

// Buffered returns the unread bytes (valid until the next Fill or Discard).
func (b *Reader) Buffered() []byte {
	if b.bp == nil {
		return nil
	}
	return (*b.bp)[b.r:b.w]
}

// Discard drops n buffered bytes.
func (b *Reader) Discard(n int) { b.r += n }

// Freeze keeps every byte before the read position where it is until Unfreeze: call it after
// discarding a parsed head whose slices are still in use.
func (b *Reader) Freeze() { b.frozen = b.r }

// Unfreeze lets the buffer move again (the head is no longer used).
func (b *Reader) Unfreeze() {
	b.frozen = 0
	if b.old != nil {
		putBuf(b.old)
		b.old = nil
	}
}

// Release returns the buffer to its pool when nothing is buffered.
func (b *Reader) Release() {
	if b.bp != nil && b.r == b.w && b.frozen == 0 && b.old == nil {
		putBuf(b.bp)
		b.bp, b.r, b.w = nil, 0, 0
	}
}

// Fill reads once more from the connection, keeping what is buffered; the buffer grows (up to
// max) when it is full. It returns io.EOF or the read error once nothing more can come.
func (b *Reader) Fill(limit int) error {
	if b.err != nil {
		return b.err
	}
	if b.bp == nil {
		b.bp, b.r, b.w = getBuf(4<<10), 0, 0
	}
	buf := *b.bp
	if b.r > b.frozen && b.w == len(buf) || b.r == b.w {
		n := copy(buf[b.frozen:], buf[b.r:b.w])
		b.r, b.w = b.frozen, b.frozen+n
	}
	if b.w == len(buf) {
		if len(buf) >= limit && b.frozen == 0 {
			return errFull
		}
		nb := getBuf(max(min(len(buf)*4, limit), 4<<10))
		n := copy(*nb, buf[b.r:b.w])
		if b.frozen > 0 {
			// The head stays viewed where it is: keep its buffer out of the pool meanwhile.
			if b.old != nil {
				putBuf(b.bp) // cannot happen twice for a head: the new buffer has room
			} else {
				b.old = b.bp
			}
			b.frozen = 0
		} else {
			putBuf(b.bp)
		}
		b.bp, b.r, b.w = nb, 0, n
		buf = *nb
	}
	if b.timeout > 0 {
		b.dl.SetReadDeadline(b.pace.deadline(time.Now(), b.timeout))
	}
	n, err := b.rd.Read(buf[b.w:])
	b.w += n
	b.pace.bytes += int64(n)
	if err != nil {
		var te interface{ Timeout() bool }
		if errors.As(err, &te) && te.Timeout() {
			return err // a deadline is not the end: the caller may wait again
		}
		b.err = err
		if n > 0 {
			return nil
		}
		return err
	}
	return nil
}

var errFull = errors.New("h1: buffer full")

// Space returns the free room after the buffered bytes, taking a pooled buffer if none is held,
// for a caller that reads the connection itself (a non-blocking read in a poller callback);
// Advance then accounts for what it read. Empty when the buffer is full (use Fill).
func (b *Reader) Space() []byte {
	if b.bp == nil {
		b.bp, b.r, b.w = getBuf(4<<10), 0, 0
	}
	if b.r == b.w && b.frozen == 0 {
		b.r, b.w = 0, 0
	}
	return (*b.bp)[b.w:]
}

// Advance records n bytes read into Space (err: the read's error; n == 0 with no error is
// EOF), as Fill would have.
func (b *Reader) Advance(n int, err error) {
	if n > 0 {
		b.w += n
		b.pace.bytes += int64(n)
	}
	switch {
	case err != nil:
		b.err = err
	case n == 0:
		b.err = io.EOF
	}
}

// Err is the sticky read error, nil while the connection is readable.
func (b *Reader) Err() error { return b.err }

// Writer buffers one connection's output: heads and small bodies leave in one write.
type Writer struct {
	wr  io.Writer
	bp  *[]byte
	n   int
	err error

	// Per-write timeout (send_timeout): set before each write.
	dl      interface{ SetWriteDeadline(time.Time) error }
	timeout time.Duration
	pace    pace
	written int64 // bytes written through
}

// SetTimeout makes every following write wait at most d (0: leave the deadline as it is), and
// the whole transfer average at least rate bytes/s after its first d (rate 0: no minimum).
func (w *Writer) SetTimeout(dl interface{ SetWriteDeadline(time.Time) error }, d time.Duration, rate int) {
	w.dl, w.timeout = dl, d
	w.pace = newPace(d, rate)
}

// Written is how many bytes reached the connection since Reset or ResetCount.
func (w *Writer) Written() int64 { return w.written }

// ResetCount zeroes Written.
func (w *Writer) ResetCount() { w.written = 0 }

func (w *Writer) write(p []byte) (int, error) {
	if w.timeout > 0 {
		w.dl.SetWriteDeadline(w.pace.deadline(time.Now(), w.timeout))
	}
	n, err := w.wr.Write(p)
	w.written += int64(n)
	w.pace.bytes += int64(n)
	if err != nil {
		w.err = err
	}
	return n, err
}

// NewWriter returns a writer over wr holding no buffer yet.
func NewWriter(wr io.Writer) *Writer { return &Writer{wr: wr} }

// Reset points w at wr, dropping anything buffered.
func (w *Writer) Reset(wr io.Writer) {
	if w.bp != nil {
		putBuf(w.bp)
	}
	*w = Writer{wr: wr}
}

// ResetRaw is Reset for a plain TCP socket written through raw (see Raw).
func (w *Writer) ResetRaw(raw *Raw) {
	w.Reset(raw)
}

// Conn is what the writer writes to.
func (w *Writer) Conn() io.Writer { return w.wr }

// Buf returns the buffer to append to; call Commit with the result.
func (w *Writer) Buf() []byte {
	if w.bp == nil {
		w.bp = getBuf(4 << 10)
	}
	return (*w.bp)[:w.n]
}

// Commit takes b (from Buf, appended to) as the buffered output. If the append outgrew the pooled
// buffer, b is kept as is (it is garbage after the next Flush).
func (w *Writer) Commit(b []byte) {
	if cap(b) != cap(*w.bp) || &b[:1][0] != &(*w.bp)[:1][0] {
		// Outgrown: write it now rather than keep an unpooled buffer.
		w.n = 0
		if w.err == nil {
			w.write(b)
		}
		return
	}
	w.n = len(b)
}

// Write buffers p, writing through when it is large.
func (w *Writer) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	b := w.Buf()
	if len(b)+len(p) <= cap(b) {
		w.n += copy((*w.bp)[w.n:cap(b)], p)
		return len(p), nil
	}
	if w.n > 0 && len(b)+len(p) <= 2*cap(b) {
		// Fill up and flush: one write of a full buffer, the rest buffered.
		k := copy((*w.bp)[w.n:cap(b)], p)
		w.n += k
		if err := w.Flush(); err != nil {
			return 0, err
		}
		w.n = copy(*w.bp, p[k:])
		return len(p), nil
	}
	if err := w.Flush(); err != nil {
		return 0, err
	}
	return w.write(p)
}

// Flush writes what is buffered.
func (w *Writer) Flush() error {
	if w.err != nil {
		return w.err
	}
	if w.n == 0 {
		return nil
	}
	_, err := w.write((*w.bp)[:w.n])
	w.n = 0
	return err
}

// Release returns the buffer to its pool when nothing is buffered.
func (w *Writer) Release() {
	if w.bp != nil && w.n == 0 {
		putBuf(w.bp)
		w.bp = nil
	}
}

// Buffered is how many bytes wait for Flush.
func (w *Writer) Buffered() int { return w.n }

// Err is the sticky write error.
func (w *Writer) Err() error { return w.err }

// Body errors.
var (
	// ErrBadChunk: malformed chunked framing (400 from a client, 502 from a target).
	ErrBadChunk = errors.New("h1: malformed chunked body")
	// ErrShortBody: the peer closed before the body ended.
	ErrShortBody = errors.New("h1: body ended early")
)

const maxChunkLine = 4096 // as net/http
const maxTrailers = 16 << 10

// CopyBody copies a body framed as framing (n bytes for Sized) from src to dst. out is the
// framing dst gets: the same, or UntilClose for a chunked body given to an HTTP/1.0 peer (the
// chunks are unwrapped, trailers dropped). Output is flushed before every read that has to wait,
// so bytes never sit in a buffer while the proxy waits for more (backpressure both ways: a slow
// reader stalls the writes, which stall the reads). It returns the body bytes copied.
func CopyBody(dst *Writer, src *Reader, framing Framing, n int64, out Framing) (int64, error) {
	switch framing {
	case NoBody:
		return 0, nil
	case Sized:
		return copySized(dst, src, n)
	case Chunked:
		return copyChunked(dst, src, out == Chunked, nil)
	default:
		return copySized(dst, src, -1)
	}
}

// copySized copies n bytes (n < 0: until EOF).
func copySized(dst *Writer, src *Reader, n int64) (int64, error) {
	var done int64
	for n < 0 || done < n {
		buf := src.Buffered()
		if len(buf) == 0 {
			if err := dst.Flush(); err != nil {
				return done, err
			}
			if n >= 0 {
				// Nothing buffered either way: a large rest goes socket to socket.
				if m, ok, err := spliceBody(dst, src, n-done); ok {
					done += m
					if err != nil {
						return done, err
					}
					continue
				}
			}
			if err := src.Fill(64 << 10); err != nil {
				if n < 0 && err == io.EOF {
					return done, nil
				}
				if err == io.EOF {
					err = ErrShortBody
				}
				return done, err
			}
			continue
		}
		if n >= 0 && int64(len(buf)) > n-done {
			buf = buf[:n-done]
		}
		if _, err := dst.Write(buf); err != nil {
			return done, err
		}
		src.Discard(len(buf))
		done += int64(len(buf))
	}
	return done, nil
}

// line returns the next line of src including its LF, at most max bytes.
func (b *Reader) line(dst *Writer, max int) ([]byte, error) {
	for {
		buf := b.Buffered()
		for i, c := range buf {
			if c == '\n' {
				if i+1 > max {
					return nil, ErrBadChunk
				}
				b.Discard(i + 1)
				return buf[:i+1], nil
			}
		}
		if len(buf) >= max {
			return nil, ErrBadChunk
		}
		if dst != nil {
			if err := dst.Flush(); err != nil {
				return nil, err
			}
		}
		if err := b.Fill(64 << 10); err != nil {
			if err == io.EOF {
				err = ErrShortBody
			}
			return nil, err
		}
	}
}

// copyChunked relays a chunked body, re-encoding each chunk's size line (extensions dropped) and
// checking every byte of framing as strictly as the head: sizes in hex, CRLF everywhere. With
// chunked false the chunks are unwrapped. trailer, when not nil, gets each trailer field.
func copyChunked(dst *Writer, src *Reader, chunked bool, trailer func(name, value []byte)) (int64, error) {
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
			return done, copyTrailers(dst, src, chunked, trailer)
		}
		if chunked {
			b := dst.Buf()
			b = strconv.AppendUint(b, size, 16)
			b = append(b, '\r', '\n')
			dst.Commit(b)
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
		if chunked {
			dst.Write(crlf)
		}
	}
}

var crlf = []byte("\r\n")

// chunkSize parses "HEX[;ext]\r\n".
func chunkSize(l []byte) (uint64, bool) {
	if len(l) < 3 || l[len(l)-2] != '\r' {
		return 0, false
	}
	l = l[:len(l)-2]
	for i, c := range l {
		if c == ';' {
			l = TrimOWS(l[:i])
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

// copyTrailers reads the trailer section up to its final CRLF, relaying it when chunked and
// handing each field to trailer when not nil; a malformed field is ErrBadChunk.
func copyTrailers(dst *Writer, src *Reader, chunked bool, trailer func(name, value []byte)) error {
	if chunked {
		dst.Write([]byte("0\r\n"))
	}
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
			if chunked {
				dst.Write(crlf)
			}
			return nil
		}
		name, value, ok := cutColon(l[:len(l)-2])
		if !ok || !isToken(name) || !validValue(value) {
			return ErrBadChunk
		}
		if chunked {
			dst.Write(l)
		}
		if trailer != nil {
			trailer(name, TrimOWS(value))
		}
	}
}

func cutColon(b []byte) (name, value []byte, ok bool) {
	for i, c := range b {
		if c == ':' {
			return b[:i], b[i+1:], true
		}
	}
	return b, nil, false
}

// FirstChunkReady checks the first chunk-size line of a chunked body at the start of b: complete
// says whether the line is all there (else read more), ok whether it is well formed.
func FirstChunkReady(b []byte) (ok, complete bool) {
	for i, c := range b {
		if c == '\n' {
			_, ok := chunkSize(b[:i+1])
			return ok, true
		}
		if i >= maxChunkLine {
			return false, true
		}
	}
	return false, len(b) > maxChunkLine
}
