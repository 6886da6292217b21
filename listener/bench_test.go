package listener

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// The proxy benchmarks measure the whole data plane over loopback: a keep-alive client posts a
// small body, Fulcrum routes and proxies it, a minimal back end answers. BenchmarkDirectHTTP is
// the same client straight to the back end, so the difference is Fulcrum's cost. Run on one core
// for a per-core figure:
//
//	GOMAXPROCS=1 go test -bench 'Proxy|Direct' -run '^$' ./listener
//
// req/s is reported explicitly; allocs/op covers the client, Fulcrum and the back end together
// (all in this process), so compare it with the direct figure.

var benchBody = bytes.Repeat([]byte("x"), 64)

func benchBackend(b *testing.B) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte("ok\n"))
	}))
	b.Cleanup(s.Close)
	return s
}

func benchClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: 256, DisableCompression: true},
		Timeout:   10 * time.Second,
	}
}

// benchRequests sends b.N POSTs from parallel keep-alive clients and reports requests per second.
func benchRequests(b *testing.B, url string) {
	c := benchClient()
	defer c.CloseIdleConnections()
	// Warm the connection pools on both hops.
	for i := 0; i < 16; i++ {
		resp, err := c.Post(url, "text/plain", bytes.NewReader(benchBody))
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	b.ReportAllocs()
	b.SetParallelism(4) // 4 clients per P: keeps one core busy while others wait on loopback
	b.ResetTimer()
	t0 := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, _ := http.NewRequest("POST", url, bytes.NewReader(benchBody))
			req.Header.Set("Content-Type", "text/plain")
			resp, err := c.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(t0).Seconds(), "req/s")
}

func BenchmarkDirectHTTP(b *testing.B) {
	be := benchBackend(b)
	benchRequests(b, be.URL+"/bench")
}

func BenchmarkProxyHTTP(b *testing.B) {
	be := benchBackend(b)
	dir := b.TempDir()
	addr := freeAddr(b)
	cfg := loadConfig(b, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "bench"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
[[listeners.rules]]
priority = 10
hosts = ["api.example.test"]
forward = "web"
`, hostOf(be), addr))
	startRuntime(b, cfg, nil)
	benchRequests(b, "http://"+addr+"/bench")
}
