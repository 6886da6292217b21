package observe

import (
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/fulcrum-lb/fulcrum/listener"
)

// blockingWriter blocks every Write until release is closed: a stuck disk.
type blockingWriter struct {
	release chan struct{}
	mu      sync.Mutex
	lines   int
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	<-w.release
	w.mu.Lock()
	w.lines += strings.Count(string(p), "\n")
	w.mu.Unlock()
	return len(p), nil
}

// TestAccessLogNeverBlocks: with the writer stuck, requests do not wait: lines beyond the queue
// are dropped and counted, and every line is either written or counted as dropped.
func TestAccessLogNeverBlocks(t *testing.T) {
	bw := &blockingWriter{release: make(chan struct{})}
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	a, err := newAccessLog(bw, "", dropped, 64)
	if err != nil {
		t.Fatal(err)
	}
	rec := &listener.RequestRecord{Listener: "web", Time: time.Now(), Status: 200, Method: "GET", URI: "/", Proto: "HTTP/1.1",
		Client: netip.MustParseAddrPort("127.0.0.1:1"), UserAgent: strings.Repeat("u", 300)}
	const n = 20000
	t0 := time.Now()
	for range n {
		a.write(rec)
	}
	if took := time.Since(t0); took > 5*time.Second {
		t.Fatalf("%d writes with a stuck writer took %v", n, took)
	}
	var m dto.Metric
	dropped.Write(&m)
	if m.GetCounter().GetValue() == 0 {
		t.Fatal("nothing dropped with a stuck writer and a 64-line queue")
	}
	close(bw.release)
	a.close()
	dropped.Write(&m)
	if got := bw.lines + int(m.GetCounter().GetValue()); got != n {
		t.Fatalf("written %d + dropped %v = %d, want %d", bw.lines, m.GetCounter().GetValue(), got, n)
	}
}

// TestAccessLogDirectoryCreated: the demo's access log (configs/state/access.log) is in a
// directory a fresh clone does not have; it is created as state_dir is.
func TestAccessLogDirectoryCreated(t *testing.T) {
	path := t.TempDir() + "/state/sub/access.log"
	a, err := newAccessLog(nil, path, nil, 8)
	if err != nil {
		t.Fatalf("access log in a missing directory: %v", err)
	}
	a.close()
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
}
