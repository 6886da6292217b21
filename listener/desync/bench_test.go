package desync

import (
	"bufio"
	"net/http"
	"strings"
	"testing"
)

const benchHead = "GET /api/v1/items?id=42 HTTP/1.1\r\nHost: www.example.com\r\n" +
	"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0\r\n" +
	"Accept: text/html,application/xhtml+xml\r\nAccept-Encoding: gzip, deflate, br\r\n" +
	"Accept-Language: en-US,en;q=0.5\r\nCookie: session=abcdef0123456789\r\nConnection: keep-alive\r\n\r\n"

func benchRequest(b *testing.B) *http.Request {
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(benchHead)))
	if err != nil {
		b.Fatal(err)
	}
	return r
}

func BenchmarkClassifyParsed(b *testing.B) {
	r := benchRequest(b)
	b.ReportAllocs()
	for b.Loop() {
		if t, _ := ClassifyParsed(r); t != Compliant {
			b.Fatal(t)
		}
	}
}

// BenchmarkClassifyConn: the full per-request cost on a sniffed connection:
// recording the head as it is read, then Classify from the raw head.
func BenchmarkClassifyConn(b *testing.B) {
	r := benchRequest(b)
	c := NewConn(nil, 0)
	head := []byte(benchHead)
	b.ReportAllocs()
	b.SetBytes(int64(len(head)))
	for b.Loop() {
		c.mu.Lock()
		c.feed(head)
		c.mu.Unlock()
		if t, _, _ := c.classifyRaw(r); t != Compliant {
			b.Fatal(t)
		}
	}
}
