package h2

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// seedFrames returns a well-formed opening: SETTINGS and one request with a body.
func seedFrames() []byte {
	var b bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "a"}, {Name: ":path", Value: "/"}, {Name: "content-length", Value: "3"}} {
		enc.WriteField(f)
	}
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true})
	fr.WriteData(1, true, []byte("abc"))
	fr.WritePing(false, [8]byte{})
	fr.WriteRSTStream(3, http2.ErrCodeCancel)
	return b.Bytes()
}

// FuzzConn feeds arbitrary frames (after the client preface) to a connection: it must never
// panic and must always end when the client goes away.
func FuzzConn(f *testing.F) {
	f.Add(seedFrames())
	f.Add([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0})
	f.Add(append(seedFrames(), 0, 0, 8, 9, 0, 0, 0, 0, 1))
	srv := NewServer(Config{PrefaceTimeout: time.Second, SendTimeout: time.Second, IdleTimeout: time.Second}, echoHandler)
	f.Fuzz(func(t *testing.T, data []byte) {
		s, c := net.Pipe()
		go io.Copy(io.Discard, c)
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.ServeConn(context.Background(), s)
		}()
		c.SetWriteDeadline(time.Now().Add(2 * time.Second))
		c.Write([]byte(http2.ClientPreface))
		c.Write(data)
		c.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection did not end after the client closed")
		}
	})
}
