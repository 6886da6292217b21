package h2

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

type streamState uint8

const (
	stateIdle streamState = iota
	stateOpen
	stateHalfClosedRemote // the client sent END_STREAM
	stateHalfClosedLocal  // we sent END_STREAM, the client's body is still coming
	stateClosed
)

var (
	errStreamReset = errors.New("h2: stream reset")
	errConnClosed  = errors.New("h2: connection closed")
	errStalled     = errors.New("h2: client did not open its flow-control window in time")
	errSlowBody    = errors.New("h2: request body paused longer than the body timeout")
	errEnded       = errors.New("h2: response already ended")
	errNoHead      = errors.New("h2: response head not written")
)

// Stream is one request and its response. Request fields are set before the Handler runs and
// are read-only. Response methods must be called from one goroutine (the handler's).
type Stream struct {
	// Request head. Header holds the regular fields (lower-case names) in arrival order.
	Method, Scheme, Authority, Path string
	Protocol                        string // :protocol (extended CONNECT); empty otherwise
	Header                          []hpack.HeaderField
	ContentLength                   int64 // -1 when not announced

	c  *conn
	id uint32

	// guarded by c.mu
	state     streamState
	err       error // why the stream ended early (reset, connection closed)
	sendWin   int64
	recvWin   int64
	recvAck   int64 // consumed, not yet announced
	received  int64
	rbuf      []byte
	eof       bool
	abandoned bool // the handler will not read the body any more
	trailers  []hpack.HeaderField
	cancel    context.CancelFunc
	ctx       context.Context
	wake      chan struct{}
	intr      interface{ SetReadDeadline(time.Time) error } // see SetInterrupt

	// aborted: reset or its connection closed (closeStreamLocked), set before the interrupt's
	// deadline moves; read without the lock by Closed, which a handler may call per read.
	aborted atomic.Bool

	// handler-side
	headDone, ended bool
	hasBody         bool
}

// ID is the stream identifier.
func (s *Stream) ID() uint32 { return s.id }

// NetConn is the client connection the stream arrived on (a *tls.Conn over TLS).
func (s *Stream) NetConn() net.Conn { return s.c.nc }

// ConnInfo is what every stream of a connection shares: computed once per connection, read-only.
type ConnInfo struct {
	RemoteAddr string
	TLS        *tls.ConnectionState // nil without TLS
}

// ConnInfo returns the stream's connection facts; the TLS state is copied once per connection,
// not per request.
func (s *Stream) ConnInfo() *ConnInfo {
	c := s.c
	c.infoOnce.Do(func() {
		c.info.RemoteAddr = c.nc.RemoteAddr().String()
		if tc, ok := c.nc.(*tls.Conn); ok {
			cs := tc.ConnectionState()
			c.info.TLS = &cs
		}
	})
	return &c.info
}

// SetInterrupt names a connection (a target's) whose read deadline is moved to the past when the
// stream is reset or its connection closes, so a handler blocked reading it returns at once
// without a context per stream. nil clears it; clear it before the connection is reused. A
// handler that sets the connection's deadline itself must check Closed after doing so.
func (s *Stream) SetInterrupt(d interface{ SetReadDeadline(time.Time) error }) {
	s.c.mu.Lock()
	s.intr = d
	s.c.mu.Unlock()
}

// Closed reports whether the stream was reset or its connection closed. It takes no lock: a
// handler that sets its target connection's read deadline before every read checks it after
// each (see SetInterrupt), and the connection's workers would otherwise contend on its mutex.
func (s *Stream) Closed() bool { return s.aborted.Load() }

// Context is cancelled when the stream is reset or its connection closes. It is created on
// first use.
func (s *Stream) Context() context.Context {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.ctx == nil {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		if s.state == stateClosed && s.err != nil {
			s.cancel()
		}
	}
	return s.ctx
}

// waitChanLocked returns the channel notify wakes the handler with, made on the handler's first
// wait: most streams (a GET answered at once) never wait and never need one. Called with c.mu
// held, before the handler lets go of it to wait, so no notify can fall between.
func (s *Stream) waitChanLocked() chan struct{} {
	if s.wake == nil {
		s.wake = make(chan struct{}, 1)
	}
	return s.wake
}

// notify wakes the stream's handler if it waits. Called with c.mu held.
func (s *Stream) notify() {
	if s.wake == nil {
		return
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// parseRequest checks the request head (RFC 9113 section 8.3) and fills the request fields.
func (s *Stream) parseRequest(f *http2.MetaHeadersFrame) error {
	bad := http2.StreamError{StreamID: f.StreamID, Code: errCodeProtocol}
	for _, hf := range f.PseudoFields() {
		switch hf.Name {
		case ":method":
			s.Method = hf.Value
		case ":scheme":
			s.Scheme = hf.Value
		case ":authority":
			s.Authority = hf.Value
		case ":path":
			s.Path = hf.Value
			if hf.Value == "" {
				return bad
			}
		case ":protocol":
			s.Protocol = hf.Value
		default:
			return bad // :status or unknown
		}
	}
	regular := f.RegularFields()
	for _, hf := range regular {
		if connectionSpecific(hf.Name) {
			return bad
		}
		switch hf.Name {
		case "te":
			if hf.Value != "trailers" {
				return bad
			}
		case "content-length":
			n, err := strconv.ParseUint(hf.Value, 10, 63)
			if err != nil || (s.ContentLength >= 0 && int64(n) != s.ContentLength) {
				return bad
			}
			s.ContentLength = int64(n)
		}
	}
	if s.Method == "" {
		return bad
	}
	if s.Method == "CONNECT" && s.Protocol == "" {
		if s.Scheme != "" || s.Path != "" || s.Authority == "" {
			return bad
		}
	} else {
		// :protocol needs SETTINGS_ENABLE_CONNECT_PROTOCOL, which we do not send.
		if s.Protocol != "" || s.Scheme == "" || s.Path == "" {
			return bad
		}
		if s.Path[0] != '/' && !(s.Path == "*" && s.Method == "OPTIONS") {
			if !strings.HasPrefix(s.Path, "http") { // absolute form is tolerated
				return bad
			}
		}
	}
	s.Header = s.c.keepFields(regular)
	return nil
}

// Read reads the request body. It returns io.EOF after the client's END_STREAM, and an error
// when the stream was reset or the connection closed, or when the client sent nothing for
// BodyTimeout (then the stream is reset with CANCEL, as client_body_timeout cuts an HTTP/1
// upload). Consumed bytes are returned to the client's windows.
func (s *Stream) Read(p []byte) (int, error) {
	c := s.c
	var timer waitTimer
	defer timer.stop()
	c.mu.Lock()
	for {
		if len(s.rbuf) > 0 {
			n := copy(p, s.rbuf)
			s.rbuf = s.rbuf[n:]
			if len(s.rbuf) == 0 {
				s.rbuf = s.rbuf[:0:0]
			}
			s.creditLocked(int64(n))
			c.mu.Unlock()
			return n, nil
		}
		if s.eof {
			c.mu.Unlock()
			return 0, io.EOF
		}
		if s.state == stateClosed {
			err := s.err
			c.mu.Unlock()
			if err == nil {
				err = errStreamReset
			}
			return 0, err
		}
		s.waitChanLocked()
		c.mu.Unlock()
		select {
		case <-s.wake:
			c.mu.Lock()
		case <-timer.after(c.cfg.BodyTimeout):
			c.srv.stats.SlowBodies.Add(1)
			s.resetTimedOut(errSlowBody)
			return 0, errSlowBody
		}
	}
}

// creditLocked returns n read bytes to the stream and connection windows.
func (s *Stream) creditLocked(n int64) {
	c := s.c
	c.creditConnLocked(n)
	if s.state != stateOpen || c.closing {
		return
	}
	s.recvAck += n
	if s.recvAck >= int64(c.cfg.InitialWindowSize)/2 {
		c.wf.WriteWindowUpdate(s.id, uint32(s.recvAck))
		s.recvWin += s.recvAck
		s.recvAck = 0
		c.signal()
	}
}

// HasBody reports whether the client announced a body (no END_STREAM on its HEADERS).
func (s *Stream) HasBody() bool { return s.hasBody }

// WriteInformational queues a 1xx head (103 Early Hints, 100 Continue); the final head follows.
func (s *Stream) WriteInformational(status int, fields []hpack.HeaderField) error {
	if s.headDone || status < 100 || status > 199 || status == 101 {
		return errEnded
	}
	return s.queueHead(status, fields, false)
}

// Trailers returns the request trailers, valid after Read returned io.EOF.
func (s *Stream) Trailers() []hpack.HeaderField {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.trailers
}

// WriteHead queues the response head. With end, the response has no body.
func (s *Stream) WriteHead(status int, fields []hpack.HeaderField, end bool) error {
	if s.headDone {
		return errEnded
	}
	err := s.queueHead(status, fields, end)
	s.headDone = err == nil
	return err
}

// queueHead queues a HEADERS frame (status 0: the trailer section) unless the stream can no
// longer be written; with end, it ends the response.
func (s *Stream) queueHead(status int, fields []hpack.HeaderField, end bool) error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := s.writableLocked(); err != nil {
		return err
	}
	c.writeHeadLocked(s.id, status, fields, end)
	if end {
		s.endLocked()
	}
	c.signal()
	return nil
}

func (s *Stream) writableLocked() error {
	if s.ended {
		return errEnded
	}
	if s.state == stateClosed || s.state == stateHalfClosedLocal {
		if s.err != nil {
			return s.err
		}
		return errStreamReset
	}
	if s.c.closing {
		return errConnClosed
	}
	return nil
}

// Write queues body bytes as DATA frames as the client's windows allow; it waits for window up
// to SendTimeout, then resets the stream.
func (s *Stream) Write(p []byte) (int, error) {
	return s.write(p, false)
}

// WriteData writes p and, with end, ends the response.
func (s *Stream) WriteData(p []byte, end bool) error {
	_, err := s.write(p, end)
	return err
}

func (s *Stream) write(p []byte, end bool) (int, error) {
	if !s.headDone {
		return 0, errNoHead
	}
	c := s.c
	written := 0
	var timer waitTimer
	defer timer.stop()
	c.mu.Lock()
	for {
		if err := s.writableLocked(); err != nil {
			c.mu.Unlock()
			return written, err
		}
		if len(p) == 0 {
			if end {
				c.wf.WriteData(s.id, true, nil)
				s.endLocked()
				c.signal()
			}
			c.mu.Unlock()
			return written, nil
		}
		n := min(int64(len(p)), s.sendWin, c.sendWin, int64(c.peerMaxFrame))
		if n > 0 && c.out.Len() < maxOut {
			last := end && int(n) == len(p)
			c.wf.WriteData(s.id, last, p[:n])
			s.sendWin -= n
			c.sendWin -= n
			p = p[n:]
			written += int(n)
			if last {
				s.endLocked()
			}
			c.signal()
			if last {
				c.mu.Unlock()
				return written, nil
			}
			continue
		}
		// Wait: for the stream's or the connection's window, or for the writer to drain.
		var ch <-chan struct{} = s.waitChanLocked()
		if n > 0 { // output full
			if c.drained == nil {
				c.drained = make(chan struct{})
			}
			c.drainWait++
			ch = c.drained
		} else if c.sendWin <= 0 {
			c.connWait = append(c.connWait, s)
		}
		c.mu.Unlock()
		select {
		case <-ch:
			c.mu.Lock()
		case <-timer.after(c.cfg.SendTimeout):
			c.srv.stats.StalledStreams.Add(1)
			s.resetTimedOut(errStalled)
			return written, errStalled
		}
	}
}

// WriteTrailers ends the response with trailer fields.
func (s *Stream) WriteTrailers(fields []hpack.HeaderField) error {
	if !s.headDone {
		return errNoHead
	}
	return s.queueHead(0, fields, true)
}

// endLocked records our END_STREAM.
func (s *Stream) endLocked() {
	s.ended = true
	c := s.c
	c.completed++
	switch s.state {
	case stateHalfClosedRemote:
		c.forgetLocked(s)
	case stateOpen:
		s.state = stateHalfClosedLocal
	}
}

// Reset resets the stream with code (CANCEL when the target failed mid-response, for example).
func (s *Stream) Reset(code http2.ErrCode) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.state == stateClosed || c.closing {
		return
	}
	c.wf.WriteRSTStream(s.id, code)
	c.closeStreamLocked(s, errStreamReset)
	c.signal()
}

// finish runs after the handler returned: a response never ended is reset with code; a body
// the client is still sending after our END_STREAM is refused with RST_STREAM(NO_ERROR).
func (s *Stream) finish(code http2.ErrCode) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case s.state == stateClosed:
	case !s.ended:
		if !c.closing {
			c.wf.WriteRSTStream(s.id, code)
			c.signal()
		}
		c.closeStreamLocked(s, errStreamReset)
	case s.state == stateHalfClosedLocal:
		if !c.closing {
			c.wf.WriteRSTStream(s.id, errCodeNo)
			c.signal()
		}
		c.closeStreamLocked(s, errStreamReset)
	}
	if s.cancel != nil {
		s.cancel()
	}
}

// resetTimedOut resets the stream with CANCEL, unless it is closed already: a wait for the client
// ran out of time (err says which).
func (s *Stream) resetTimedOut(err error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.state != stateClosed && !c.closing {
		c.wf.WriteRSTStream(s.id, http2.ErrCodeCancel)
		c.closeStreamLocked(s, err)
		c.signal()
	}
}

// waitTimer bounds a call's waits together: started by the first wait, it runs on through
// the ones after it, so the limit is for the whole call, not for each wait.
type waitTimer struct{ t *time.Timer }

// after starts the timer for d on the first call and returns its channel.
func (w *waitTimer) after(d time.Duration) <-chan time.Time {
	if w.t == nil {
		w.t = time.NewTimer(d)
	}
	return w.t.C
}

func (w *waitTimer) stop() {
	if w.t != nil {
		w.t.Stop()
	}
}
