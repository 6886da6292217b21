package h2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

const (
	errCodeNo       = http2.ErrCodeNo
	errCodeProtocol = http2.ErrCodeProtocol
	errCodeCalm     = http2.ErrCodeEnhanceYourCalm
	maxWindow       = 1<<31 - 1
	// maxOut bounds the bytes queued for the writer: a DATA writer waits beyond it, so a client
	// that opens huge windows and then stops reading cannot make us buffer a response.
	maxOut = 256 << 10
	// maxControlOut bounds the queue when the reader wants to add a control answer (PING or
	// SETTINGS ACK, RST_STREAM): past it the client is not reading what it asks for.
	maxControlOut = 1 << 20
)

var clientPreface = []byte(http2.ClientPreface)

// conn is one HTTP/2 connection. The reader (serve's goroutine) owns frame decoding and
// maxClientID; everything else shared is guarded by mu.
type conn struct {
	srv *Server
	cfg *Config
	nc  net.Conn
	rf  *http2.Framer // reader's
	hb  *headerBlock  // reader's
	// reader's: where streams' request fields are kept (keepFields)
	slab []hpack.HeaderField

	mu      sync.Mutex
	out     bytes.Buffer  // frames queued for the writer
	wf      *http2.Framer // writes into out; used under mu
	hbuf    bytes.Buffer  // hpack scratch; under mu
	henc    *hpack.Encoder
	streams map[uint32]*Stream // open and half-closed streams
	sendWin int64              // connection send window (peer's receive window)
	// peer settings
	peerInitWin  int64
	peerMaxFrame uint32
	// our receive side
	recvWin     int64 // connection receive window left
	recvUnacked int64 // consumed bytes not yet returned with WINDOW_UPDATE
	// lifecycle
	goingAway  bool   // GOAWAY sent: no new streams
	lastStream uint32 // the id our GOAWAY named
	closing    bool   // no more frames; the writer flushes and closes
	closed     chan struct{}
	connWait   []*Stream     // streams waiting for connection window
	drained    chan struct{} // closed and replaced by the writer after a flush someone waits for
	drainWait  int

	maxClientID uint32 // reader only (read under mu by goAway)
	wake        chan struct{}
	writerDone  chan struct{}
	idle        *time.Timer

	// worker pool
	work     chan *Stream
	workers  int // reader only
	idleWk   atomic.Int32
	running  atomic.Int32 // handlers running, reset or not
	workerWG sync.WaitGroup

	// per-connection facts a bridge reads for every stream, computed once (see ConnInfo)
	infoOnce sync.Once
	info     ConnInfo

	// budgets
	resets, completed int
	ctlCount          int
	ctlStart          time.Time
}

func newConn(srv *Server, nc net.Conn) *conn {
	c := &conn{
		srv: srv, cfg: &srv.cfg, nc: nc,
		streams:      map[uint32]*Stream{},
		sendWin:      65535,
		peerInitWin:  65535,
		peerMaxFrame: 16384,
		recvWin:      int64(srv.cfg.ConnWindowSize),
		closed:       make(chan struct{}),
		wake:         make(chan struct{}, 1),
		writerDone:   make(chan struct{}),
		work:         make(chan *Stream, srv.cfg.MaxConcurrentStreams),
	}
	c.wf = http2.NewFramer(&c.out, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.rf = http2.NewFramer(nil, nc)
	c.rf.SetReuseFrames()
	c.rf.SetMaxReadFrameSize(srv.cfg.MaxFrameSize)
	// Header blocks are decoded here (headerBlock), not by the Framer (ReadMetaHeaders), so
	// that a stream's head costs no allocation beyond its Stream.
	c.hb = newHeaderBlock(srv.cfg.MaxHeaderListSize)
	return c
}

// serve runs the reader until the connection ends, then tears it down.
func (c *conn) serve() error {
	go c.writeLoop()
	err := c.readLoop()
	c.teardown()
	return err
}

func (c *conn) readLoop() error {
	nc := c.nc
	nc.SetReadDeadline(time.Now().Add(c.cfg.PrefaceTimeout))
	var pre [24]byte
	if _, err := io.ReadFull(nc, pre[:]); err != nil {
		return fmt.Errorf("h2: read client preface: %w", err)
	}
	if !bytes.Equal(pre[:], clientPreface) {
		c.connError(errCodeProtocol, "bad preface")
		return errors.New("h2: bad client preface")
	}
	c.mu.Lock()
	c.wf.WriteSettings(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.MaxConcurrentStreams},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: c.cfg.InitialWindowSize},
		http2.Setting{ID: http2.SettingMaxFrameSize, Val: c.cfg.MaxFrameSize},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: c.cfg.MaxHeaderListSize},
	)
	if d := c.cfg.ConnWindowSize - 65535; d > 0 {
		c.wf.WriteWindowUpdate(0, d)
	}
	c.signal()
	c.mu.Unlock()

	first := true
	for {
		f, err := c.rf.ReadFrame()
		if err != nil {
			var se http2.StreamError
			var ce http2.ConnectionError
			switch {
			case errors.As(err, &se):
				if first {
					c.connError(errCodeProtocol, "first frame")
					return err
				}
				c.streamError(se.StreamID, se.Code)
				continue
			case errors.As(err, &ce):
				c.connError(http2.ErrCode(ce), "")
				return err
			case errors.Is(err, http2.ErrFrameTooLarge):
				c.connError(http2.ErrCodeFrameSize, "")
				return err
			}
			c.mu.Lock()
			done := c.closing
			c.mu.Unlock()
			if done {
				return nil
			}
			return fmt.Errorf("h2: read frame: %w", err)
		}
		if first {
			sf, ok := f.(*http2.SettingsFrame)
			if !ok || sf.IsAck() {
				c.connError(errCodeProtocol, "expected SETTINGS")
				return errors.New("h2: first frame not SETTINGS")
			}
			first = false
			nc.SetReadDeadline(time.Time{})
			c.armIdle()
		}
		if err := c.process(f); err != nil {
			var se http2.StreamError
			var ce http2.ConnectionError
			switch {
			case errors.As(err, &se):
				c.streamError(se.StreamID, se.Code)
				continue
			case errors.As(err, &ce):
				c.connError(http2.ErrCode(ce), "")
				return err
			}
			return err
		}
	}
}

var errCalm = http2.ConnectionError(errCodeCalm)

// control counts a cheap frame the client makes us handle or answer; too many per second is a
// flood (PING, SETTINGS, empty DATA, PRIORITY, WINDOW_UPDATE floods).
func (c *conn) control() error {
	c.ctlCount++
	if c.ctlCount <= c.cfg.ControlBudget {
		return nil
	}
	now := time.Now()
	if now.Sub(c.ctlStart) > time.Second {
		c.ctlStart, c.ctlCount = now, 0
		return nil
	}
	return errCalm
}

func (c *conn) process(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.HeadersFrame:
		done, err := c.hb.begin(f)
		if !done || err != nil {
			return err
		}
		return c.onHeaders(c.hb.frame())
	case *http2.ContinuationFrame:
		// The Framer lets through only CONTINUATION frames of the open block.
		done, err := c.hb.more(f)
		if !done || err != nil {
			return err
		}
		return c.onHeaders(c.hb.frame())
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		if err := c.control(); err != nil {
			return err
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.out.Len() > maxControlOut {
			return errCalm
		}
		c.wf.WritePing(true, f.Data)
		c.signal()
		return nil
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return c.onReset(f)
	case *http2.PriorityFrame:
		if f.StreamDep == f.StreamID {
			return http2.StreamError{StreamID: f.StreamID, Code: errCodeProtocol}
		}
		return c.control()
	case *http2.GoAwayFrame:
		// The client will open no more streams: finish the open ones, then close.
		c.goAway(errCodeNo, false)
		return nil
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(errCodeProtocol)
	}
	return nil // unknown frame types are ignored (RFC 9113 section 4.1)
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if err := c.control(); err != nil {
		return err
	}
	if err := f.ForeachSetting(func(s http2.Setting) error { return s.Valid() }); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingHeaderTableSize:
			c.henc.SetMaxDynamicTableSizeLimit(s.Val)
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.peerInitWin
			c.peerInitWin = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > maxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				if delta > 0 {
					st.notify()
				}
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = s.Val
		}
		return nil
	})
	if err != nil {
		return err
	}
	if c.out.Len() > maxControlOut {
		return errCalm
	}
	c.wf.WriteSettingsAck()
	c.signal()
	return nil
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	if err := c.control(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		c.sendWin += int64(f.Increment)
		if c.sendWin > maxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		for _, s := range c.connWait {
			s.notify()
		}
		c.connWait = c.connWait[:0]
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		if f.StreamID > c.maxClientID {
			return http2.ConnectionError(errCodeProtocol) // idle stream
		}
		return nil // closed: ignore
	}
	s.sendWin += int64(f.Increment)
	if s.sendWin > maxWindow {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	s.notify()
	return nil
}

func (c *conn) onReset(f *http2.RSTStreamFrame) error {
	c.srv.stats.ClientResets.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.streams[f.StreamID]
	if s == nil {
		if f.StreamID > c.maxClientID {
			return http2.ConnectionError(errCodeProtocol) // idle stream
		}
		return nil
	}
	c.resets++
	c.closeStreamLocked(s, errStreamReset)
	if c.resets-c.completed/4 > c.cfg.ResetBudget {
		return errCalm // rapid reset (CVE-2023-44487)
	}
	return nil
}

// connection-specific fields (RFC 9113 section 8.2.2) make a request malformed.
func connectionSpecific(name string) bool {
	switch name {
	case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
		return true
	}
	return false
}

func (c *conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 == 0 {
		return http2.ConnectionError(errCodeProtocol)
	}
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		defer c.mu.Unlock()
		return c.onTrailersLocked(s, f)
	}
	c.mu.Unlock()
	if id <= c.maxClientID {
		return http2.ConnectionError(errCodeProtocol)
	}
	if f.HasPriority() && f.Priority.StreamDep == id {
		c.setMaxClientID(id)
		return http2.StreamError{StreamID: id, Code: errCodeProtocol}
	}
	c.mu.Lock()
	going := c.goingAway
	c.mu.Unlock()
	if going {
		return nil // after our GOAWAY: not processed, the client retries elsewhere
	}
	c.setMaxClientID(id)

	s := &Stream{c: c, id: id, ContentLength: -1}
	if f.Truncated {
		c.srv.stats.HeaderListTooLarges.Add(1)
		c.mu.Lock()
		defer c.mu.Unlock()
		c.writeHeadLocked(id, 431, nil, true)
		if !f.StreamEnded() {
			c.wf.WriteRSTStream(id, errCodeNo)
		}
		c.signal()
		return nil
	}
	if err := s.parseRequest(f); err != nil {
		return err
	}
	c.mu.Lock()
	if len(c.streams) >= int(c.cfg.MaxConcurrentStreams) || len(c.work) == cap(c.work) {
		c.mu.Unlock()
		c.srv.stats.RefusedStreams.Add(1)
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeRefusedStream}
	}
	s.state = stateOpen
	s.hasBody = !f.StreamEnded()
	if f.StreamEnded() {
		s.state = stateHalfClosedRemote
		s.eof = true
		if s.ContentLength > 0 {
			c.mu.Unlock()
			return http2.StreamError{StreamID: id, Code: errCodeProtocol}
		}
	}
	s.sendWin = c.peerInitWin
	s.recvWin = int64(c.cfg.InitialWindowSize)
	if len(c.streams) == 0 {
		c.idle.Stop()
	}
	c.streams[id] = s
	c.mu.Unlock()
	c.srv.stats.Streams.Add(1)

	c.work <- s // never blocks: checked against cap above, and only the reader sends
	// More queued than idle workers: one more long-lived worker, up to the stream limit.
	if len(c.work) > int(c.idleWk.Load()) && c.workers < int(c.cfg.MaxConcurrentStreams) {
		c.workers++
		c.workerWG.Add(1)
		go c.worker()
	}
	return nil
}

func (c *conn) setMaxClientID(id uint32) {
	c.mu.Lock()
	c.maxClientID = id
	c.mu.Unlock()
}

func (c *conn) onTrailersLocked(s *Stream, f *http2.MetaHeadersFrame) error {
	if s.state != stateOpen {
		return http2.StreamError{StreamID: s.id, Code: http2.ErrCodeStreamClosed}
	}
	if !f.StreamEnded() {
		return http2.StreamError{StreamID: s.id, Code: errCodeProtocol}
	}
	if len(f.PseudoFields()) > 0 || f.Truncated {
		return http2.StreamError{StreamID: s.id, Code: errCodeProtocol}
	}
	if s.ContentLength >= 0 && s.received != s.ContentLength {
		return http2.StreamError{StreamID: s.id, Code: errCodeProtocol}
	}
	s.trailers = c.keepFields(f.RegularFields())
	s.eof = true
	c.remoteClosedLocked(s)
	s.notify()
	return nil
}

func (c *conn) onData(f *http2.DataFrame) error {
	id := f.StreamID
	n := int64(f.Length)
	c.mu.Lock()
	defer c.mu.Unlock()
	// Connection flow control counts every DATA frame, whatever its stream's state.
	if n > c.recvWin {
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	c.recvWin -= n
	s := c.streams[id]
	if s == nil || s.state != stateOpen {
		c.creditConnLocked(n)
		if s == nil && id > c.maxClientID {
			return http2.ConnectionError(errCodeProtocol) // idle stream
		}
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	}
	if n > s.recvWin {
		c.creditConnLocked(n)
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	}
	s.recvWin -= n
	data := f.Data()
	if pad := n - int64(len(data)); pad > 0 {
		c.creditConnLocked(pad) // padding is never read by anyone
		s.recvWin += pad
	}
	s.received += int64(len(data))
	if s.ContentLength >= 0 && (s.received > s.ContentLength || f.StreamEnded() && s.received != s.ContentLength) {
		c.creditConnLocked(int64(len(data)))
		return http2.StreamError{StreamID: id, Code: errCodeProtocol}
	}
	if len(data) > 0 {
		if s.abandoned {
			c.creditConnLocked(int64(len(data)))
		} else {
			s.rbuf = append(s.rbuf, data...)
		}
	} else if !f.StreamEnded() {
		c.mu.Unlock()
		err := c.control() // empty DATA flood
		c.mu.Lock()
		if err != nil {
			return err
		}
	}
	if f.StreamEnded() {
		s.eof = true
		c.remoteClosedLocked(s)
	}
	s.notify()
	return nil
}

// remoteClosedLocked records the client's END_STREAM.
func (c *conn) remoteClosedLocked(s *Stream) {
	if s.state == stateHalfClosedLocal {
		c.forgetLocked(s)
		return
	}
	s.state = stateHalfClosedRemote
}

// creditConnLocked returns n consumed bytes to the connection receive window, announcing them
// in batches.
func (c *conn) creditConnLocked(n int64) {
	c.recvUnacked += n
	if c.recvUnacked >= int64(c.cfg.ConnWindowSize)/4 && !c.closing {
		c.wf.WriteWindowUpdate(0, uint32(c.recvUnacked))
		c.recvWin += c.recvUnacked
		c.recvUnacked = 0
		c.signal()
	}
}

// streamError resets one stream and keeps the connection.
func (c *conn) streamError(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	if s := c.streams[id]; s != nil {
		c.closeStreamLocked(s, errStreamReset)
	}
	c.wf.WriteRSTStream(id, code)
	c.signal()
}

// connError sends GOAWAY with code and closes the connection after the writer flushed it.
func (c *conn) connError(code http2.ErrCode, _ string) {
	switch code {
	case errCodeCalm:
		c.srv.stats.CalmGoAways.Add(1)
	case errCodeNo:
	default:
		c.srv.stats.ProtocolGoAways.Add(1)
	}
	c.goAway(code, true)
}

// goAway sends GOAWAY naming the last stream we accepted. With now, the connection closes as
// soon as the frame is written; otherwise open streams finish first.
func (c *conn) goAway(code http2.ErrCode, now bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	if !c.goingAway || now {
		c.goingAway = true
		c.lastStream = c.maxClientID
		c.wf.WriteGoAway(c.maxClientID, code, nil)
	}
	if now || len(c.streams) == 0 {
		c.closing = true
	}
	c.signal()
}

// signal wakes the writer. Called with mu held or not.
func (c *conn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// armIdle starts the idle timer once the connection is established.
func (c *conn) armIdle() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.idle = time.AfterFunc(c.cfg.IdleTimeout, func() {
		c.mu.Lock()
		idle := len(c.streams) == 0
		c.mu.Unlock()
		if idle {
			c.goAway(errCodeNo, false)
		}
	})
}

// writeLoop writes what the reader and the workers queued. It yields once before each drain
// so that every runnable worker gets to add its frames first: one TLS write then carries many
// streams' responses.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	var buf []byte
	for {
		<-c.wake
		runtime.Gosched()
		c.mu.Lock()
		buf = append(buf[:0], c.out.Bytes()...)
		c.out.Reset()
		closing := c.closing
		if c.drainWait > 0 && c.drained != nil {
			close(c.drained)
			c.drained = nil
			c.drainWait = 0
		}
		c.mu.Unlock()
		if len(buf) > 0 {
			c.nc.SetWriteDeadline(time.Now().Add(c.cfg.SendTimeout))
			if _, err := c.nc.Write(buf); err != nil {
				c.fail()
				return
			}
		}
		if closing {
			c.mu.Lock()
			empty := c.out.Len() == 0
			c.mu.Unlock()
			if empty {
				c.nc.Close() // ends the reader's read
				return
			}
			c.signal()
		}
		if cap(buf) > 64<<10 {
			buf = nil // do not keep a burst's buffer for the connection's life
		}
	}
}

// fail marks the connection dead after an I/O error: no more frames, everyone woken.
func (c *conn) fail() {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.nc.Close()
}

// teardown runs when the reader stops: every stream is reset, workers finish, the writer has
// flushed and closed the socket.
func (c *conn) teardown() {
	c.mu.Lock()
	if !c.closing {
		c.closing = true
	}
	for _, s := range c.streams {
		c.closeStreamLocked(s, errConnClosed)
	}
	if c.drained != nil {
		close(c.drained)
		c.drained = nil
	}
	if c.idle != nil {
		c.idle.Stop()
	}
	c.mu.Unlock()
	close(c.work)
	c.signal()
	select {
	case <-c.writerDone:
	case <-time.After(c.cfg.SendTimeout):
	}
	c.nc.Close()
	<-c.writerDone
	c.workerWG.Wait()
	close(c.closed)
}

// worker runs handlers for streams of this connection until it closes.
func (c *conn) worker() {
	defer c.workerWG.Done()
	for {
		c.idleWk.Add(1)
		s, ok := <-c.work
		c.idleWk.Add(-1)
		if !ok {
			return
		}
		c.mu.Lock()
		skip := s.state == stateClosed // reset while queued: the handler never sees it
		c.mu.Unlock()
		if skip {
			continue
		}
		c.running.Add(1)
		c.runHandler(s)
		c.running.Add(-1)
	}
}

func (c *conn) runHandler(s *Stream) {
	defer func() {
		if r := recover(); r != nil {
			s.finish(http2.ErrCodeInternal)
			return
		}
		s.finish(http2.ErrCodeInternal)
	}()
	c.srv.handler.ServeH2(s)
}

// closeStreamLocked ends s locally: waiters woken, context cancelled, unread body credited back.
func (c *conn) closeStreamLocked(s *Stream, err error) {
	if s.state == stateClosed {
		return
	}
	if s.err == nil {
		s.err = err
	}
	s.aborted.Store(true) // before the interrupt below: see Closed
	c.forgetLocked(s)
	if s.cancel != nil {
		s.cancel()
	}
	if s.intr != nil {
		s.intr.SetReadDeadline(time.Unix(1, 0))
	}
}

// forgetLocked removes a finished stream and credits its unread body to the connection.
func (c *conn) forgetLocked(s *Stream) {
	s.state = stateClosed
	delete(c.streams, s.id)
	if n := int64(len(s.rbuf)); n > 0 {
		s.rbuf = s.rbuf[:0]
		c.creditConnLocked(n)
	}
	s.rbuf = nil
	s.notify()
	if len(c.streams) == 0 {
		if c.goingAway {
			c.closing = true
			c.signal()
		} else if c.idle != nil && !c.closing {
			c.idle.Reset(c.cfg.IdleTimeout)
		}
	}
}

var statusText [600]string

func init() {
	for i := 100; i < 600; i++ {
		statusText[i] = strconv.Itoa(i)
	}
}

// writeHeadLocked encodes and queues a header block (HEADERS + CONTINUATION as the peer's frame
// size requires). status 0 writes trailers.
func (c *conn) writeHeadLocked(id uint32, status int, fields []hpack.HeaderField, end bool) {
	c.hbuf.Reset()
	if status > 0 {
		v := ""
		if status < len(statusText) {
			v = statusText[status]
		} else {
			v = strconv.Itoa(status)
		}
		c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: v})
	}
	for _, f := range fields {
		c.henc.WriteField(f)
	}
	block := c.hbuf.Bytes()
	max := int(c.peerMaxFrame)
	first := block
	if len(first) > max {
		first = first[:max]
	}
	block = block[len(first):]
	c.wf.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: end, EndHeaders: len(block) == 0})
	for len(block) > 0 {
		frag := block
		if len(frag) > max {
			frag = frag[:max]
		}
		block = block[len(frag):]
		c.wf.WriteContinuation(id, len(block) == 0, frag)
	}
}
