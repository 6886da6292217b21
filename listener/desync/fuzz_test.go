package desync

import (
	"net/http"
	"testing"
)

func FuzzClassify(f *testing.F) {
	for _, c := range loadCorpus(f) {
		for _, h := range c.Headers {
			f.Add(c.Method, c.URI, c.Version, h.Name, h.Value)
		}
	}
	f.Add("GET", "/", "HTTP/1.1", "Transfer-Encoding", "chunked")
	f.Fuzz(func(t *testing.T, method, uri, version, name, value string) {
		r := &http.Request{Method: method, RequestURI: uri, Proto: version, ProtoMajor: 1,
			Header: http.Header{name: {value, value}, "Content-Length": {value}}}
		if len(value)%2 == 0 {
			r.TransferEncoding = []string{value}
		}
		tier, why := ClassifyParsed(r)
		if tier >= numTiers || why >= numReasons {
			t.Fatalf("out of range %d/%d", tier, why)
		}
		if tier == Compliant && why != ReasonCompliant || tier != Compliant && why == ReasonCompliant {
			t.Fatalf("tier %v with reason %v", tier, why)
		}
		head := method + " " + uri + " " + version + "\r\n" + name + ": " + value + "\r\n\r\n"
		if tier, why := ClassifyRaw([]byte(head)); tier >= numTiers || why >= numReasons {
			t.Fatalf("raw out of range %d/%d", tier, why)
		}
	})
}

// FuzzConnFeed: arbitrary byte streams, cut at arbitrary points, never panic
// and never grow the sniffer past its bounds.
func FuzzConnFeed(f *testing.F) {
	f.Add([]byte("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"), uint8(3))
	f.Add([]byte("PUT / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.0\n\n"), uint8(1))
	f.Add([]byte("\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), uint8(7))
	f.Fuzz(func(t *testing.T, data []byte, step uint8) {
		c := NewConn(nil, 256)
		s := int(step) + 1
		for i := 0; i < len(data); i += s {
			c.feed(data[i:min(i+s, len(data))])
			if len(c.buf) > 2*c.maxHead || c.headStart > len(c.buf) {
				t.Fatalf("buf %d headStart %d beyond bounds", len(c.buf), c.headStart)
			}
		}
		for len(c.ends) > 0 {
			r := &http.Request{Method: "GET", RequestURI: "/", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
			if _, _, ok := c.classifyRaw(r); !ok {
				t.Fatal("queued head not classified")
			}
		}
	})
}
