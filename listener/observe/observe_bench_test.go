package observe

import (
	"log/slog"
	"net/netip"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener"
)

// BenchmarkObserve is the request-path cost of metrics and of the access log (including the
// writer goroutine's encoding, amortized: with GOMAXPROCS=1 it shares the core).
func benchRecord() listener.RequestRecord {
	return listener.RequestRecord{Listener: "web", Time: time.Now(), Duration: 1234 * time.Microsecond, RequestDuration: 20 * time.Microsecond, TargetDuration: time.Millisecond, TargetStatus: 200,
		Client: netip.MustParseAddrPort("127.0.0.1:54321"), Target: "127.0.0.1:9101", Group: "echo", Status: 200, BytesOut: 100,
		Method: "GET", URI: "/bytes/100", Proto: "HTTP/1.1", Host: "127.0.0.1:8080", UserAgent: "wrk/4.1.0",
		TLSVersion: 0x0304, Cipher: 0x1301, SNI: "localhost", RequestID: "0123456789abcdef0123456789abcdef"}
}

func BenchmarkObserve(b *testing.B) {
	rec := benchRecord()
	// Each iteration yields, as a server's request goroutines do when they block on the network:
	// that is when the access-log writer gets to run.
	for _, tc := range []struct{ name, log string }{{"metrics", ""}, {"metrics+accesslog", "file"}} {
		b.Run(tc.name, func(b *testing.B) {
			dir := b.TempDir()
			c := configs.Config{
				Listeners: []configs.Listener{{Name: "web", Style: "application", Protocol: "http", Address: "127.0.0.1:8080",
					DefaultAction: &configs.Action{Forward: configs.Forward{{Group: "echo", Weight: 1}}}}},
				TargetGroups: []configs.TargetGroup{{Name: "echo", Protocol: "http", Targets: []configs.Target{{Address: "127.0.0.1:9101"}}}},
			}
			if tc.log != "" {
				c.Server.AccessLog = filepath.Join(dir, "access.log")
			}
			o, err := New(configtest.Must(dir, c), slog.New(slog.DiscardHandler))
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				r := rec
				o.Request(&r)
				runtime.Gosched()
			}
			o.Close() // drains the queue: the writer's work is inside the measurement
			b.StopTimer()
			var m dto.Metric
			o.logDropped.Write(&m)
			b.ReportMetric(m.GetCounter().GetValue(), "dropped")
		})
	}
}

// BenchmarkAppendEntry is the writer's formatting cost per access-log line.
func BenchmarkAppendEntry(b *testing.B) {
	rec := benchRecord()
	line := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		line = appendEntry(line[:0], &rec)
	}
}
