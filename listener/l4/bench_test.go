package l4

import (
	"crypto/tls"
	"io"
	"net"
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

const benchChunk = 64 << 20 // bytes per op

// sink reads everything and answers one byte per benchChunk received, so the client can
// time delivery to the target rather than to its own send buffer.
func sink(c net.Conn) {
	var got int64
	buf := make([]byte, 256<<10)
	for {
		n, err := c.Read(buf)
		got += int64(n)
		for got >= benchChunk {
			got -= benchChunk
			if _, err := c.Write([]byte{1}); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func pump(b *testing.B, c net.Conn) {
	b.Helper()
	payload := make([]byte, 1<<20)
	ack := make([]byte, 1)
	b.SetBytes(benchChunk)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		for sent := 0; sent < benchChunk; sent += len(payload) {
			if _, err := c.Write(payload); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := io.ReadFull(c, ack); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
}

func BenchmarkDirect(b *testing.B) {
	tg := startTarget(b, nil, sink)
	c, err := net.Dial("tcp", tg.addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	pump(b, c)
}

// BenchmarkRelaySplice: plain TCP on both sides, the zero-copy path.
func BenchmarkRelaySplice(b *testing.B) {
	tg := startTarget(b, nil, sink)
	s := startServer(b, nil, mustState(b, Config{Dialer: &addrDialer{addr: tg.addr}}), Options{})
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	pump(b, c)
}

// BenchmarkRelayTLSOffload: TLS from the client, terminated by the listener, plain to the
// target (the buffered path).
func BenchmarkRelayTLSOffload(b *testing.B) {
	ca := configtest.NewCA(b, "l4 test CA")
	tg := startTarget(b, nil, sink)
	s := startServer(b, nil, mustState(b, Config{Mode: ModeTLS, Dialer: &addrDialer{addr: tg.addr},
		TLS: &tls.Config{Certificates: []tls.Certificate{leaf(b, ca, "bench.test")}}}), Options{})
	raw, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	c := tls.Client(raw, &tls.Config{ServerName: "bench.test", RootCAs: ca.Pool()})
	defer c.Close()
	if err := c.Handshake(); err != nil {
		b.Fatal(err)
	}
	pump(b, c)
}
