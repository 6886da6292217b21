package backends

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

func BenchmarkPick(b *testing.B) {
	for _, alg := range []string{"round_robin", "least_outstanding_requests", "least_connections", "weighted_random", "source_ip_hash"} {
		for _, weighted := range []bool{false, true} {
			name := alg
			ws := []int{1, 1, 1, 1, 1, 1, 1, 1}
			if weighted {
				name += "/weighted"
				ws = []int{1, 2, 3, 4, 5, 6, 7, 8}
			}
			b.Run(name, func(b *testing.B) {
				r := NewRegistry(nil)
				defer r.Close()
				s, err := r.Build(conf(noHC("g", alg, ws...)), nil)
				if err != nil {
					b.Fatal(err)
				}
				g := s.Group("g")
				var n atomic.Uint32
				b.ReportAllocs()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					ip := clientIP(int(n.Add(1)))
					for pb.Next() {
						t := g.Pick(ip, nil)
						t.Acquire()
						t.Release()
					}
				})
			})
		}
	}
}

func TestPickDoesNotAllocate(t *testing.T) {
	for _, alg := range []string{"round_robin", "least_outstanding_requests", "least_connections", "weighted_random", "source_ip_hash"} {
		r := newReg(t)
		gc := noHC("g", alg, 1, 2, 3)
		gc.SlowStart = "1h" // ramping: the snapshot is rebuilt periodically, but not per pick
		g := build(t, r, conf(gc)).Group("g")
		ip := netip.MustParseAddr("192.0.2.1")
		if n := testing.AllocsPerRun(1000, func() { g.Pick(ip, g.Targets()[0]) }); n != 0 {
			t.Errorf("%s: Pick allocates %v per call", alg, n)
		}
	}
}

// BenchmarkRoundTrip compares the HTTP/1.1 client with http.Transport, the one it replaced, on
// the same keep-alive exchanges with a minimal target (a raw loop answering a fixed response),
// so the figure is mostly the client's own cost. Run on one core, as a proxy serves:
//
//	GOMAXPROCS=1 go test -bench RoundTrip -run '^$' ./backends
func BenchmarkRoundTrip(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"); err != nil {
						return
					}
				}
			}()
		}
	}()
	url := "http://" + ln.Addr().String() + "/bench"
	var d net.Dialer
	std := &http.Transport{DialContext: d.DialContext, MaxIdleConnsPerHost: 256, IdleConnTimeout: time.Minute,
		DisableCompression: true, ResponseHeaderTimeout: 30 * time.Second}
	defer std.CloseIdleConnections()
	h1 := newH1Transport(std, nil)
	defer h1.CloseIdleConnections()
	for _, c := range []struct {
		name string
		rt   http.RoundTripper
	}{{"h1client", h1}, {"http.Transport", std}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(16)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					req, _ := http.NewRequest("GET", url, nil)
					resp, err := c.rt.RoundTrip(req)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
		})
	}
}
