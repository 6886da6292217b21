package listener

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener/h2"
)

// TestH2ResetFreesStalledWorker: a client that resets its streams while their target is stalled
// gets its workers back at once. Every worker of the connection is taken by a stream whose
// target stalls (before its response head, or in the middle of its body); the client resets
// them all; a follow-up request on the same connection must be answered while the stalled
// target still stalls, long before response_timeout or target_read_timeout could free a worker.
// The reset exchanges' target connections must be closed, not pooled: the target sees each of
// its stalled requests end.
func TestH2ResetFreesStalledWorker(t *testing.T) {
	// head, body: the direct path stalls before the response head or inside the body; upload:
	// a request with a body, served through the net/http bridge.
	for _, where := range []string{"head", "body", "upload"} {
		t.Run(where, func(t *testing.T) {
			dir := t.TempDir()
			const streams = h2.DefaultMaxConcurrentStreams // the listener's workers per connection
			var arrived, ended atomic.Int64
			allIn := make(chan struct{})
			allOut := make(chan struct{})
			stop := make(chan struct{})
			tgt := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/ok" {
					w.Write([]byte("ok"))
					return
				}
				if where != "head" {
					w.Header().Set("Content-Length", fmt.Sprint(1<<20))
					w.Write(make([]byte, 1024))
					w.(http.Flusher).Flush()
				}
				if arrived.Add(1) == streams {
					close(allIn)
				}
				defer func() {
					if ended.Add(1) == streams {
						close(allOut)
					}
				}()
				select { // stalled until the proxy closes the connection, or the test ends
				case <-r.Context().Done():
				case <-stop:
				}
			}))
			t.Cleanup(tgt.Close)
			t.Cleanup(func() { close(stop) })
			addr := configtest.Addr(t)
			cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
response_timeout = "60s"
target_read_timeout = "60s"
health_check = { disabled = true }

[[listeners]]
name = "app"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "web" }
`, hostOf(tgt), addr))
			startRuntime(t, cfg, nil)
			pool, _ := l7CAPool(t, dir, "internal")
			c, fr := l7H2Conn(t, addr, pool)
			defer c.Close()
			fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
			c.SetDeadline(time.Now().Add(30 * time.Second)) // a bound for a broken run, not a timing

			var hb bytes.Buffer
			enc := hpack.NewEncoder(&hb)
			request := func(id uint32, path string) {
				t.Helper()
				upload := where == "upload" && path != "/ok"
				hb.Reset()
				for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":authority", "www.example.test"}, {":path", path}} {
					enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
				}
				if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndStream: !upload, EndHeaders: true}); err != nil {
					t.Fatal(err)
				}
				if upload {
					if err := fr.WriteData(id, true, []byte("x")); err != nil {
						t.Fatal(err)
					}
				}
			}
			// Frames are read on this goroutine only; the server's SETTINGS is acknowledged so
			// it keeps talking to us.
			readUntil := func(done func(f http2.Frame) bool) {
				t.Helper()
				for {
					f, err := fr.ReadFrame()
					if err != nil {
						t.Fatalf("reading frames: %v", err)
					}
					if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
						fr.WriteSettingsAck()
					}
					if ga, ok := f.(*http2.GoAwayFrame); ok {
						t.Fatalf("GOAWAY %v", ga.ErrCode)
					}
					if done(f) {
						return
					}
				}
			}

			for i := uint32(0); i < streams; i++ {
				request(2*i+1, "/stall")
			}
			// Every worker is now held by a stalled exchange once the target holds them all.
			select {
			case <-allIn:
			case <-time.After(20 * time.Second):
				t.Fatalf("the target saw %d of %d requests", arrived.Load(), streams)
			}
			for i := uint32(0); i < streams; i++ {
				if err := fr.WriteRSTStream(2*i+1, http2.ErrCodeCancel); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			const okID = 2*streams + 1
			request(okID, "/ok")
			status := ""
			readUntil(func(f http2.Frame) bool {
				if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == okID {
					status = h.PseudoValue("status")
					return true
				}
				if r, ok := f.(*http2.RSTStreamFrame); ok && r.StreamID == okID {
					t.Fatalf("follow-up stream reset: %v", r.ErrCode)
				}
				return false
			})
			took := time.Since(start)
			t.Logf("follow-up answered %s after %v", status, took)
			if status != "200" {
				t.Fatalf("follow-up status %q, want 200", status)
			}
			// The stalled exchanges end at the target too: their connections were closed, not
			// kept for reuse (a pooled one would still be waiting on its stalled handler).
			select {
			case <-allOut:
			case <-time.After(10 * time.Second):
				t.Fatalf("the target still holds %d of %d reset requests", streams-ended.Load(), streams)
			}
		})
	}
}
