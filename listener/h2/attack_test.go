package h2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// heapWatch samples the live heap while an attack runs and reports the peak growth over the
// heap before it.
type heapWatch struct {
	base, peak uint64
	stop       chan struct{}
	done       sync.WaitGroup
}

func watchHeap() *heapWatch {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	w := &heapWatch{base: ms.HeapAlloc, peak: ms.HeapAlloc, stop: make(chan struct{})}
	w.done.Add(1)
	go func() {
		defer w.done.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				w.peak = max(w.peak, ms.HeapAlloc)
			}
		}
	}()
	return w
}

// growth stops sampling and returns the peak heap growth in bytes.
func (w *heapWatch) growth() uint64 {
	close(w.stop)
	w.done.Wait()
	return w.peak - w.base
}

// flood writes frames from fn on its own goroutine (buffered), so that the test can read the
// server's answer meanwhile; it stops at the first write error (the server closed).
func (rc *rawClient) flood(fn func(fr *http2.Framer) error) <-chan error {
	done := make(chan error, 1)
	go func() {
		bw := bufio.NewWriterSize(rc.conn, 64<<10)
		fr := http2.NewFramer(bw, nil)
		rc.mu.Lock()
		defer rc.mu.Unlock()
		err := fn(fr)
		if err == nil {
			err = bw.Flush()
		}
		done <- err
	}()
	return done
}

// target counts what a slow target would see: requests at once and in total.
type target struct {
	cur, peak, total atomic.Int64
	hold             time.Duration
}

func (tg *target) ServeH2(s *Stream) {
	n := tg.cur.Add(1)
	for {
		p := tg.peak.Load()
		if n <= p || tg.peak.CompareAndSwap(p, n) {
			break
		}
	}
	tg.total.Add(1)
	defer tg.cur.Add(-1)
	t := time.NewTimer(tg.hold)
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.Context().Done(): // the proxy aborts the target request when the client resets
	}
	s.WriteHead(200, nil, true)
}

// Rapid reset (CVE-2023-44487): 20,000 HEADERS+RST_STREAM pairs on one connection against a
// target that takes 2 s, each reset at once (batch 1) or after a batch of 200 was opened (so
// handlers are running when the resets come). The client is told ENHANCE_YOUR_CALM past the
// reset budget; the target never sees more than MaxConcurrentStreams at once nor more than the
// budget allows in total.
func TestRapidReset(t *testing.T) {
	for _, batch := range []int{1, 200} {
		t.Run(fmt.Sprintf("batch %d", batch), func(t *testing.T) {
			tg := &target{hold: 2 * time.Second}
			ts := startServer(t, Config{SendTimeout: 5 * time.Second}, tg)
			eff := ts.srv.Config()
			heap := watchHeap()
			rc := dialRaw(t, ts.addr)
			block := rc.headers("GET", "/slow")
			sent := 0
			floodErr := rc.flood(func(fr *http2.Framer) error {
				for i := 0; i < 20000; i += batch {
					for j := i; j < i+batch; j++ {
						if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*j + 1), BlockFragment: block, EndStream: true, EndHeaders: true}); err != nil {
							return err
						}
					}
					for j := i; j < i+batch; j++ {
						if err := fr.WriteRSTStream(uint32(2*j+1), http2.ErrCodeCancel); err != nil {
							return err
						}
						sent++
					}
				}
				return nil
			})
			code, got := rc.goAwayCode(30 * time.Second)
			<-floodErr
			grew := heap.growth()
			if !got || code != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("after %d pairs: GOAWAY %v (got %v), want ENHANCE_YOUR_CALM", sent, code, got)
			}
			if p := tg.peak.Load(); p > int64(eff.MaxConcurrentStreams) {
				t.Errorf("target saw %d requests at once, limit %d", p, eff.MaxConcurrentStreams)
			}
			bound := int64(eff.ResetBudget) + int64(eff.MaxConcurrentStreams)
			if n := tg.total.Load(); n > bound {
				t.Errorf("target saw %d requests in total, bound %d", n, bound)
			}
			if grew > 64<<20 {
				t.Errorf("heap grew %d MiB during the attack", grew>>20)
			}
			t.Logf("pairs sent %d, target peak %d total %d, heap +%d KiB, stats %+v", sent, tg.peak.Load(), tg.total.Load(), grew>>10, ts.srv.Stats())
		})
	}
}

// CONTINUATION flood (CVE-2024-27316): a header block that never ends. The connection is closed
// after a bounded number of bytes, the handler never runs, the heap stays bounded.
func TestContinuationFlood(t *testing.T) {
	var called atomic.Bool
	ts := startServer(t, Config{SendTimeout: 5 * time.Second}, HandlerFunc(func(s *Stream) { called.Store(true) }))
	heap := watchHeap()
	rc := dialRaw(t, ts.addr)
	// Literal fields without indexing: every byte sent decodes to a field byte.
	var frag strings.Builder
	enc := hpack.NewEncoder(&frag)
	for frag.Len() < 15<<10 {
		enc.WriteField(hpack.HeaderField{Name: "x-flood", Value: strings.Repeat("a", 200), Sensitive: true})
	}
	chunk := []byte(frag.String())
	var sentBytes int64
	floodErr := rc.flood(func(fr *http2.Framer) error {
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.headers("GET", "/")}); err != nil {
			return err
		}
		for range 64 << 10 { // up to 1 GiB: the server must stop us long before
			if err := fr.WriteContinuation(1, false, chunk); err != nil {
				return err
			}
			sentBytes += int64(len(chunk))
		}
		return nil
	})
	_, got := rc.goAwayCode(30 * time.Second)
	err := <-floodErr
	grew := heap.growth()
	if err == nil {
		t.Fatalf("the server read %d MiB of CONTINUATION without closing", sentBytes>>20)
	}
	if !got {
		t.Error("no GOAWAY before the close")
	}
	if called.Load() {
		t.Error("the handler ran for a header block that never ended")
	}
	if grew > 32<<20 {
		t.Errorf("heap grew %d MiB", grew>>20)
	}
	t.Logf("sent %d KiB before the close, heap +%d KiB", sentBytes>>10, grew>>10)
}

// HPACK bomb: one 4 KiB field in the dynamic table, then referenced thousands of times by
// one-byte indexes: a few KiB that decode to megabytes. The answer is 431, the handler never
// runs, the heap stays bounded.
func TestHPACKBomb(t *testing.T) {
	var called atomic.Bool
	ts := startServer(t, Config{}, HandlerFunc(func(s *Stream) { called.Store(true); s.WriteHead(200, nil, true) }))
	heap := watchHeap()
	rc := dialRaw(t, ts.addr)
	rc.hbuf.Reset()
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "example.test"}, {Name: ":path", Value: "/"}} {
		rc.enc.WriteField(f)
	}
	bomb := hpack.HeaderField{Name: "x-bomb", Value: strings.Repeat("b", 4000)}
	for range 4000 {
		rc.enc.WriteField(bomb) // indexed after the first: one or two bytes each
	}
	block := rc.hbuf.Bytes()
	if len(block) > 16<<10 {
		t.Fatalf("bomb block is %d bytes: the encoder did not index", len(block))
	}
	// Split into frames of at most 16 KiB.
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndStream: true, EndHeaders: true})
	status := ""
	rc.readUntil(10*time.Second, func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			status = f.PseudoValue("status")
			return true
		case *http2.RSTStreamFrame:
			status = "RST " + f.ErrCode.String()
			return true
		}
		return false
	})
	grew := heap.growth()
	if status != "431" && !strings.HasPrefix(status, "RST") {
		t.Fatalf("bomb answered %q, want 431 or RST_STREAM", status)
	}
	if called.Load() {
		t.Error("the handler ran for a 16 MB header list")
	}
	if grew > 32<<20 {
		t.Errorf("heap grew %d MiB", grew>>20)
	}
	t.Logf("%d-byte block answered %s, heap +%d KiB", len(block), status, grew>>10)
}

// Floods of frames that cost the server work and the client nothing: each ends in GOAWAY
// ENHANCE_YOUR_CALM with the heap bounded.
func TestControlFloods(t *testing.T) {
	tests := []struct {
		name  string
		frame func(fr *http2.Framer, i int) error
		open  bool // needs an open stream 1 first
	}{
		{"settings", func(fr *http2.Framer, i int) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 4096})
		}, false},
		{"ping", func(fr *http2.Framer, i int) error { return fr.WritePing(false, [8]byte{byte(i)}) }, false},
		{"empty data", func(fr *http2.Framer, i int) error { return fr.WriteData(1, false, nil) }, true},
		{"priority", func(fr *http2.Framer, i int) error {
			return fr.WritePriority(uint32(2*i+101), http2.PriorityParam{StreamDep: 1})
		}, false},
		{"window update", func(fr *http2.Framer, i int) error { return fr.WriteWindowUpdate(0, 1) }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, Config{SendTimeout: 5 * time.Second}, HandlerFunc(func(s *Stream) {
				<-s.Context().Done()
			}))
			heap := watchHeap()
			rc := dialRaw(t, ts.addr)
			block := rc.headers("POST", "/")
			floodErr := rc.flood(func(fr *http2.Framer) error {
				if tc.open {
					if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true}); err != nil {
						return err
					}
				}
				for i := range 100000 {
					if err := tc.frame(fr, i); err != nil {
						return err
					}
				}
				return nil
			})
			code, got := rc.goAwayCode(30 * time.Second)
			<-floodErr
			grew := heap.growth()
			if !got || code != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("GOAWAY %v (got %v), want ENHANCE_YOUR_CALM", code, got)
			}
			if grew > 32<<20 {
				t.Errorf("heap grew %d MiB", grew>>20)
			}
		})
	}
}

// A client that never opens its window: the response cannot be sent; after SendTimeout the
// stream is reset and the handler is released.
func TestWindowNeverOpened(t *testing.T) {
	writeErr := make(chan error, 1)
	ts := startServer(t, Config{SendTimeout: 300 * time.Millisecond}, HandlerFunc(func(s *Stream) {
		s.WriteHead(200, nil, false)
		_, err := s.Write(make([]byte, 64<<10))
		writeErr <- err
	}))
	rc := dialRaw(t, ts.addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.headers("GET", "/big"), EndStream: true, EndHeaders: true})
	var code http2.ErrCode = 99
	rc.readUntil(10*time.Second, func(f http2.Frame) bool {
		if r, ok := f.(*http2.RSTStreamFrame); ok && r.StreamID == 1 {
			code = r.ErrCode
			return true
		}
		return false
	})
	if code != http2.ErrCodeCancel {
		t.Fatalf("stream 1: RST_STREAM %v, want CANCEL", code)
	}
	select {
	case err := <-writeErr:
		if !errors.Is(err, errStalled) {
			t.Fatalf("handler's write returned %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler still blocked in Write")
	}
	if n := ts.srv.Stats().StalledStreams; n != 1 {
		t.Errorf("stalled streams %d", n)
	}
}

// A client that announces a body and never sends it: after BodyTimeout the handler's read fails
// and the stream is reset, so neither a worker nor a target connection is held.
func TestBodyNeverSent(t *testing.T) {
	readErr := make(chan error, 1)
	ts := startServer(t, Config{BodyTimeout: 300 * time.Millisecond}, HandlerFunc(func(s *Stream) {
		_, err := io.ReadAll(s)
		readErr <- err
	}))
	rc := dialRaw(t, ts.addr)
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.headers("POST", "/upload"), EndHeaders: true})
	rc.fr.WriteData(1, false, []byte("first bytes, then nothing"))
	var code http2.ErrCode = 99
	rc.readUntil(10*time.Second, func(f http2.Frame) bool {
		if r, ok := f.(*http2.RSTStreamFrame); ok && r.StreamID == 1 {
			code = r.ErrCode
			return true
		}
		return false
	})
	if code != http2.ErrCodeCancel {
		t.Fatalf("stream 1: RST_STREAM %v, want CANCEL", code)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, errSlowBody) {
			t.Fatalf("handler's read returned %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler still blocked in Read")
	}
	if n := ts.srv.Stats().SlowBodies; n != 1 {
		t.Errorf("slow bodies %d", n)
	}
}
