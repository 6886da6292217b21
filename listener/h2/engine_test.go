package h2

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawClient speaks HTTP/2 frame by frame over TLS, for what no well-behaved client would send.
type rawClient struct {
	t    testing.TB
	conn *tls.Conn
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
	mu   sync.Mutex // writes
}

func dialRaw(t testing.TB, addr string, settings ...http2.Setting) *rawClient {
	t.Helper()
	c, err := tls.Dial("tcp", addr, clientTLS())
	if err != nil {
		t.Fatal(err)
	}
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q", p)
	}
	t.Cleanup(func() { c.Close() })
	rc := &rawClient{t: t, conn: c}
	rc.fr = http2.NewFramer(c, c)
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	rc.fr.MaxHeaderListSize = 1 << 20
	rc.enc = hpack.NewEncoder(&rc.hbuf)
	if _, err := c.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	return rc
}

// headers encodes a GET (or the given method) for path.
func (rc *rawClient) headers(method, path string, extra ...hpack.HeaderField) []byte {
	rc.hbuf.Reset()
	for _, f := range append([]hpack.HeaderField{
		{Name: ":method", Value: method}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "example.test"}, {Name: ":path", Value: path},
	}, extra...) {
		rc.enc.WriteField(f)
	}
	return append([]byte(nil), rc.hbuf.Bytes()...)
}

// readUntil reads frames until fn says stop or the connection ends; it returns the error that
// ended the connection (nil when fn stopped).
func (rc *rawClient) readUntil(timeout time.Duration, fn func(http2.Frame) bool) error {
	rc.conn.SetReadDeadline(time.Now().Add(timeout))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			return err
		}
		if fn(f) {
			return nil
		}
	}
}

// goAwayCode waits for the server's GOAWAY and the connection's end, and returns its code.
func (rc *rawClient) goAwayCode(timeout time.Duration) (http2.ErrCode, bool) {
	var code http2.ErrCode
	got := false
	rc.readUntil(timeout, func(f http2.Frame) bool {
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			code, got = ga.ErrCode, true
		}
		return false
	})
	return code, got
}

func h2Client() *http.Client {
	return &http.Client{Transport: &http2.Transport{TLSClientConfig: clientTLS()}, Timeout: 5 * time.Second}
}

func TestGetAndEcho(t *testing.T) {
	ts := startServer(t, Config{}, echoHandler)
	cl := h2Client()
	big := bytes.Repeat([]byte("0123456789abcdef"), 256<<10/16*5) // 1.25 MiB: past every window
	tests := []struct {
		name   string
		method string
		body   []byte
		want   []byte
	}{
		{"get", "GET", nil, []byte("hello from h2\n")},
		{"small post", "POST", []byte("ping"), []byte("ping")},
		{"post past the windows", "POST", big, big},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var body io.Reader
			if tc.body != nil {
				body = bytes.NewReader(tc.body)
			}
			req, _ := http.NewRequest(tc.method, "https://"+ts.addr+"/x", body)
			resp, err := cl.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || !bytes.Equal(got, tc.want) {
				t.Fatalf("status %d err %v, %d bytes (want %d)", resp.StatusCode, err, len(got), len(tc.want))
			}
		})
	}
}

func TestConcurrentStreamsOneConnection(t *testing.T) {
	ts := startServer(t, Config{}, echoHandler)
	cl := h2Client()
	var wg sync.WaitGroup
	// 90 at once: under the 100 streams a connection allows, so the client keeps one connection.
	errs := make(chan error, 270)
	for i := range 90 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 3 {
				msg := fmt.Sprintf("stream %d.%d", i, j)
				resp, err := cl.Post("https://"+ts.addr+"/", "text/plain", strings.NewReader(msg))
				if err != nil {
					errs <- err
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(b) != msg {
					errs <- fmt.Errorf("got %q want %q", b, msg)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if len(errs) > 0 {
		t.Logf("stats %+v", ts.srv.Stats())
	}
	for err := range errs {
		t.Error(err)
	}
	if n := ts.srv.Stats().Conns; n != 1 {
		t.Errorf("%d connections, want the 270 streams on 1", n)
	}
}

func TestTrailersBothWays(t *testing.T) {
	ts := startServer(t, Config{}, echoHandler)
	req, _ := http.NewRequest("POST", "https://"+ts.addr+"/", io.NopCloser(strings.NewReader("with trailers")))
	req.Trailer = http.Header{"Grpc-Status": {"0"}, "X-Sum": {"abc"}}
	req.ContentLength = -1
	resp, err := h2Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "with trailers" || resp.Trailer.Get("Grpc-Status") != "0" || resp.Trailer.Get("X-Sum") != "abc" {
		t.Fatalf("body %q trailers %v", b, resp.Trailer)
	}
}

// A shutdown sends GOAWAY naming the last stream; that stream completes, and a stream the client
// opens after it is never handled.
func TestGoAwayHonoursLastStream(t *testing.T) {
	release := make(chan struct{})
	var handled sync.Map
	ts := startServer(t, Config{}, HandlerFunc(func(s *Stream) {
		handled.Store(s.ID(), true)
		if s.Path == "/slow" {
			<-release
		}
		s.WriteHead(200, nil, false)
		s.WriteData([]byte("done"), true)
	}))
	rc := dialRaw(t, ts.addr)
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.headers("GET", "/slow"), EndStream: true, EndHeaders: true})
	// Wait until the handler holds stream 1.
	for i := 0; i < 500; i++ {
		if _, ok := handled.Load(uint32(1)); ok {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- ts.srv.Shutdown(ctx)
	}()
	var last uint32 = 99
	var body []byte
	ended := false
	err := rc.readUntil(10*time.Second, func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			last = f.LastStreamID
			// A stream opened after the GOAWAY: must be ignored.
			rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: rc.headers("GET", "/late"), EndStream: true, EndHeaders: true})
			close(release)
		case *http2.DataFrame:
			if f.StreamID == 1 {
				body = append(body, f.Data()...)
				ended = f.StreamEnded()
			}
		}
		return false
	})
	if last != 1 || string(body) != "done" || !ended {
		t.Fatalf("GOAWAY last=%d body %q ended %v (read ended with %v)", last, body, ended, err)
	}
	if _, ok := handled.Load(uint32(3)); ok {
		t.Fatal("stream 3, opened after GOAWAY(last=1), reached the handler")
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

func TestPingAndPriorityAnswered(t *testing.T) {
	ts := startServer(t, Config{}, echoHandler)
	rc := dialRaw(t, ts.addr)
	rc.fr.WritePriority(5, http2.PriorityParam{StreamDep: 3, Weight: 10})
	rc.fr.WritePing(false, [8]byte{1, 2, 3, 4, 5, 6, 7, 8})
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.headers("GET", "/"), EndStream: true, EndHeaders: true,
		Priority: http2.PriorityParam{StreamDep: 0, Weight: 200}})
	var ping, resp bool
	rc.readUntil(10*time.Second, func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.PingFrame:
			ping = f.IsAck() && f.Data == [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
		case *http2.DataFrame:
			resp = resp || f.StreamEnded()
		}
		return ping && resp
	})
	if !ping || !resp {
		t.Fatalf("ping ack %v, response %v", ping, resp)
	}
}

// CONNECT reaches the handler with :authority and no :path; it decides (the proxy answers 501).
func TestConnectReachesHandler(t *testing.T) {
	ts := startServer(t, Config{}, HandlerFunc(func(s *Stream) {
		if s.Method == "CONNECT" {
			s.WriteHead(501, nil, true)
			return
		}
		s.WriteHead(200, nil, true)
	}))
	rc := dialRaw(t, ts.addr)
	rc.hbuf.Reset()
	rc.enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	rc.enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "example.test:443"})
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.hbuf.Bytes(), EndHeaders: true})
	status := ""
	rc.readUntil(10*time.Second, func(f http2.Frame) bool {
		if h, ok := f.(*http2.MetaHeadersFrame); ok {
			status = h.PseudoValue("status")
			return true
		}
		return false
	})
	if status != "501" {
		t.Fatalf("CONNECT answered %q", status)
	}
}
