package listener

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestMaxInFlight: a target group's max_in_flight caps the requests a target has at once, for
// HTTP/1 and HTTP/2 clients alike; requests over the cap get 503 at once instead of queueing.
func TestMaxInFlight(t *testing.T) {
	dir := t.TempDir()
	var cur, peak atomic.Int64
	release := make(chan struct{})
	be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := cur.Add(1)
		defer cur.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		select {
		case <-release:
		case <-r.Context().Done():
		case <-time.After(20 * time.Second):
		}
		io.WriteString(w, "ok")
	}))
	t.Cleanup(be.Close)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
max_in_flight = 2
health_check = { disabled = true }
[[listeners]]
name = "app"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "web" }
`, hostOf(be), addr))
	startRuntime(t, cfg, nil)
	pool, _ := l7CAPool(t, dir, "internal")
	tlsConf := func(proto string) *tls.Config {
		return &tls.Config{RootCAs: pool, ServerName: "www.example.test", NextProtos: []string{proto}}
	}
	for _, tc := range []struct {
		name  string
		proto int
		rt    http.RoundTripper
	}{
		{"HTTP/1.1", 1, &http.Transport{TLSClientConfig: tlsConf("http/1.1"), MaxConnsPerHost: 0}},
		{"HTTP/2", 2, &http2.Transport{TLSClientConfig: tlsConf("h2")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := &http.Client{Transport: tc.rt, Timeout: 30 * time.Second}
			const n = 6
			codes := make(chan int, n)
			var wg sync.WaitGroup
			for range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					resp, err := cl.Get("https://" + addr + "/")
					if err != nil {
						codes <- 0
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.ProtoMajor != tc.proto {
						t.Errorf("served over %s", resp.Proto)
					}
					codes <- resp.StatusCode
				}()
			}
			// The requests over the cap are answered while the first two are still held.
			count := map[int]int{}
			for range n - 2 {
				select {
				case c := <-codes:
					count[c]++
				case <-time.After(20 * time.Second):
					t.Fatalf("over-cap requests not answered at once: %v so far", count)
				}
			}
			if count[http.StatusServiceUnavailable] != n-2 {
				t.Fatalf("answers while 2 were held: %v, want %d × 503", count, n-2)
			}
			// The two under the cap may still be on their way to the target.
			configtest.WaitFor(t, 20*time.Second, "both requests under the cap at the target", func() bool { return cur.Load() == 2 })
			release <- struct{}{} // let the two held ones finish
			release <- struct{}{}
			wg.Wait()
			close(codes)
			for c := range codes {
				count[c]++
			}
			if count[200] != 2 || peak.Load() > 2 {
				t.Fatalf("answers %v, target peak %d; want 2 × 200 and peak ≤ 2", count, peak.Load())
			}
		})
	}
}
