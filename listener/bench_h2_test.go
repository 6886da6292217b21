package listener

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// BenchmarkProxyH2 is BenchmarkProxyHTTP over HTTP/2 with TLS: each op is one GET stream through
// an https listener's HTTP/2 engine, routed on its HPACK fields, picked, forwarded to the raw
// HTTP/1.1 back end and recorded, on the direct path (h2direct.go). Each client keeps 8 streams
// in flight on its own connection, so the engine's writer coalesces as it does under h2load.
// The client indexes its header fields as h2load does and reads raw frame headers without
// decoding them; with crypto/tls under it, it allocates almost nothing, so allocs/op is
// Fulcrum's. Per core:
//
//	GOMAXPROCS=1 go test -bench ProxyH2 -run '^$' ./listener
func BenchmarkProxyH2(b *testing.B) {
	be := rawBackend(b)
	dir := b.TempDir()
	addr := configtest.Addr(b)
	cfg := loadConfig(b, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "bench"
style = "application"
protocol = "https"
address = %q
certificates = ["www", "api"]
default_action = { forward = "web" }
[[listeners.rules]]
priority = 10
hosts = ["api.example.test"]
forward = "web"
`, be, addr))
	obs := &benchObserver{}
	startRuntime(b, cfg, obs)
	pool, _ := l7CAPool(b, dir, "internal")
	tlsConf := &tls.Config{RootCAs: pool, ServerName: "api.example.test", NextProtos: []string{"h2"}}

	fields := []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "api.example.test"}, {Name: ":path", Value: "/bench"},
		{Name: "user-agent", Value: "bench"}, {Name: "x-forwarded-for", Value: "203.0.113.9"}}
	const depth = 8
	var failed atomic.Value

	// client runs one connection; next says whether to open another stream.
	client := func(next func() bool) (int, error) {
		c, err := tls.Dial("tcp", addr, tlsConf)
		if err != nil {
			return 0, fmt.Errorf("dial: %w", err)
		}
		defer c.Close()
		var out bytes.Buffer
		fr := http2.NewFramer(&out, nil)
		out.WriteString(http2.ClientPreface)
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
		fr.WriteWindowUpdate(0, 1<<30)
		if _, err := c.Write(out.Bytes()); err != nil {
			return 0, fmt.Errorf("preface: %w", err)
		}
		// Each request's header block is encoded as h2load's nghttp2 does, with incremental
		// indexing: from the second request on, every field is one index into the dynamic table.
		var block bytes.Buffer
		enc := hpack.NewEncoder(&block)
		hdr := make([]byte, 9, 256)
		ack := []byte{0, 0, 0, byte(http2.FrameSettings), byte(http2.FlagSettingsAck), 0, 0, 0, 0}
		rbuf := make([]byte, 64<<10)
		var fh [9]byte
		id, inflight, done := uint32(1), 0, 0
		for {
			for inflight < depth && next() {
				block.Reset()
				for _, f := range fields {
					enc.WriteField(f)
				}
				hdr = append(hdr[:9], block.Bytes()...)
				hdr[0], hdr[1], hdr[2] = byte(block.Len()>>16), byte(block.Len()>>8), byte(block.Len())
				hdr[3] = byte(http2.FrameHeaders)
				hdr[4] = byte(http2.FlagHeadersEndHeaders | http2.FlagHeadersEndStream)
				binary.BigEndian.PutUint32(hdr[5:9], id)
				if _, err := c.Write(hdr); err != nil {
					return done, fmt.Errorf("HEADERS: %w", err)
				}
				id += 2
				inflight++
			}
			if inflight == 0 {
				return done, nil
			}
			// Read frames until a stream ends.
			for ended := false; !ended; {
				if _, err := io.ReadFull(c, fh[:]); err != nil {
					return done, fmt.Errorf("frame: %w", err)
				}
				n := int(fh[0])<<16 | int(fh[1])<<8 | int(fh[2])
				if _, err := io.ReadFull(c, rbuf[:n]); err != nil {
					return done, fmt.Errorf("frame payload: %w", err)
				}
				switch http2.FrameType(fh[3]) {
				case http2.FrameSettings:
					if fh[4]&byte(http2.FlagSettingsAck) == 0 {
						c.Write(ack)
					}
				case http2.FrameHeaders:
					if fh[4]&byte(http2.FlagHeadersEndStream) != 0 {
						ended = true
					}
				case http2.FrameData:
					if fh[4]&byte(http2.FlagDataEndStream) != 0 {
						ended = true
					}
				case http2.FrameRSTStream, http2.FrameGoAway:
					return done, fmt.Errorf("frame type %v from the server", http2.FrameType(fh[3]))
				}
			}
			inflight--
			done++
		}
	}
	warm := 64
	if _, err := client(func() bool { warm--; return warm >= 0 }); err != nil {
		b.Fatalf("warm-up: %v", err)
	}
	before := obs.n.Load()
	b.ReportAllocs()
	b.SetParallelism(2) // 2 connections per P, 8 streams each
	b.ResetTimer()
	t0 := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		if _, err := client(pb.Next); err != nil {
			failed.Store(err)
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(t0).Seconds(), "req/s")
	b.StopTimer()
	if err := failed.Load(); err != nil {
		b.Fatal(err)
	}
	// Every stream was recorded. A record is taken just after its stream ends, so the last few
	// may still be on their way: wait for the count, bounded.
	for i := 0; obs.n.Load()-before < int64(b.N) && i < 500; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if got := obs.n.Load() - before; got != int64(b.N) {
		b.Fatalf("%d access-log records for %d streams", got, b.N)
	}
}
