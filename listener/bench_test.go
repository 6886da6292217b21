package listener

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// The proxy benchmarks measure the whole data plane over loopback: keep-alive clients send a GET
// with X-Forwarded-For, Fulcrum routes, picks, forwards and records it, a minimal back end
// answers. Client and back end are raw sockets with fixed buffers that allocate nothing, so
// allocs/op is Fulcrum's own. BenchmarkDirectHTTP is the same client straight to the back end,
// so the difference in ns/op is Fulcrum's cost. Run on one core for a per-core figure:
//
//	GOMAXPROCS=1 go test -bench 'Proxy|Direct' -run '^$' ./listener

const benchResponse = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"

var benchResponseBytes = []byte(benchResponse)

// rawBackend answers every request head on a kept-alive connection with benchResponse.
func rawBackend(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				buf := make([]byte, 8<<10)
				n := 0
				for {
					k, err := c.Read(buf[n:])
					if err != nil {
						return
					}
					n += k
					for {
						i := bytes.Index(buf[:n], []byte("\r\n\r\n"))
						if i < 0 {
							break
						}
						if _, err := c.Write(benchResponseBytes); err != nil {
							return
						}
						n = copy(buf, buf[i+4:n])
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// rawRequests sends b.N requests from parallel keep-alive clients and reports requests per second.
func rawRequests(b *testing.B, addr, host string) {
	req := []byte("GET /bench HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: bench\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
	var failed atomic.Bool
	do := func(c net.Conn, br *bufio.Reader) bool {
		if _, err := c.Write(req); err != nil {
			return false
		}
		n := int64(-1)
		for {
			line, err := br.ReadSlice('\n')
			if err != nil {
				return false
			}
			if len(line) <= 2 {
				break
			}
			if v, ok := bytes.CutPrefix(line, []byte("Content-Length: ")); ok {
				n = 0
				for _, d := range bytes.TrimSpace(v) {
					n = n*10 + int64(d-'0')
				}
			}
		}
		if n < 0 {
			return false
		}
		_, err := br.Discard(int(n))
		return err == nil
	}
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		return c, bufio.NewReaderSize(c, 4<<10)
	}
	c, br := dial()
	for i := 0; i < 16; i++ { // warm the pools on both hops
		if !do(c, br) {
			b.Fatal("warm-up request failed")
		}
	}
	c.Close()
	b.ReportAllocs()
	b.SetParallelism(4) // 4 clients per P: keeps one core busy while others wait on loopback
	b.ResetTimer()
	t0 := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		c, br := dial()
		defer c.Close()
		for pb.Next() {
			if !do(c, br) {
				failed.Store(true)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(t0).Seconds(), "req/s")
	if failed.Load() {
		b.Error("a request failed")
	}
}

func BenchmarkDirectHTTP(b *testing.B) {
	rawRequests(b, rawBackend(b), "api.example.test")
}

// benchObserver takes every record as metrics would (reading its fields), without a log.
type benchObserver struct{ n, bytes atomic.Int64 }

func (o *benchObserver) Request(rec *RequestRecord) {
	o.n.Add(1)
	o.bytes.Add(rec.BytesOut + int64(len(rec.URI)+len(rec.Host)+len(rec.Target)))
}
func (o *benchObserver) Desync(string, desync.Tier, desync.Reason) {}

func BenchmarkProxyHTTP(b *testing.B) {
	be := rawBackend(b)
	dir := b.TempDir()
	addr := configtest.Addr(b)
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
`, be, addr))
	startRuntime(b, cfg, &benchObserver{})
	rawRequests(b, addr, "api.example.test")
}
