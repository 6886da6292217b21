package conformance

import (
	"bytes"
	"crypto/tls"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// h2conn opens a TLS connection with ALPN h2 and sends the client preface and SETTINGS.
func h2conn(t *testing.T, addr string) (*tls.Conn, *http2.Framer) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if c.ConnectionState().NegotiatedProtocol != "h2" {
		t.Fatal("no h2")
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(c, http2.ClientPreface)
	fr := http2.NewFramer(c, c)
	fr.WriteSettings()
	go io.Copy(io.Discard, c) // the server's frames are not the point; keep the window moving
	return c, fr
}

func headerBlock(path string, extra int) []byte {
	var b bytes.Buffer
	e := hpack.NewEncoder(&b)
	e.WriteField(hpack.HeaderField{Name: ":method", Value: "GET"})
	e.WriteField(hpack.HeaderField{Name: ":scheme", Value: "https"})
	e.WriteField(hpack.HeaderField{Name: ":authority", Value: "localhost"})
	e.WriteField(hpack.HeaderField{Name: ":path", Value: path})
	for i := 0; i < extra; i++ {
		e.WriteField(hpack.HeaderField{Name: "x-pad", Value: strings.Repeat("a", 100)})
	}
	return b.Bytes()
}

// TestHTTP2Floods: rapid reset, CONTINUATION flood, HPACK bomb and SETTINGS/PING floods against
// the process. After each the process still serves, its memory stays bounded, and the rapid
// reset did not become a flood of target requests.
func TestHTTP2Floods(t *testing.T) {
	tg := newTarget(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(50 * time.Millisecond) // a slow-ish target makes piled-up requests visible
		io.WriteString(w, "ok")
	}))
	addr := configtest.Addr(t)
	p := startFulcrum(t, tlsListeners(tg, map[string]string{"recommended": addr}))
	alive := func(t *testing.T) {
		t.Helper()
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		resp, err := c.Get("https://" + addr + "/alive")
		if err != nil {
			t.Fatalf("not serving after the attack: %v", err)
		}
		resp.Body.Close()
		if rss := p.rssKiB(); rss > 256<<10 {
			t.Errorf("RSS %d MiB after the attack", rss>>10)
		}
	}
	t.Run("rapid reset", func(t *testing.T) {
		tg.take()
		_, fr := h2conn(t, addr)
		const n = 5000
		blk := headerBlock("/reset", 0)
		for i := uint32(0); i < n; i++ {
			id := 2*i + 1
			if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: blk, EndStream: true, EndHeaders: true}) != nil {
				break
			}
			if fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				break
			}
		}
		time.Sleep(time.Second)
		got := tg.count()
		t.Logf("rapid reset: %d of %d reset streams reached the target", got, n)
		// A correct server caps concurrent streams and gives up on a connection that keeps
		// resetting: most reset streams never become target requests.
		if got > n/5 {
			t.Errorf("%d of %d reset streams reached the target", got, n)
		}
		alive(t)
	})
	t.Run("CONTINUATION flood", func(t *testing.T) {
		_, fr := h2conn(t, addr)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: headerBlock("/cont", 0)[:3], EndStream: true})
		pad := bytes.Repeat([]byte{0x40, 0x01, 'x', 0x01, 'y'}, 3000)
		for range 2000 {
			if fr.WriteContinuation(1, false, pad) != nil {
				break
			}
		}
		alive(t)
	})
	t.Run("HPACK bomb", func(t *testing.T) {
		_, fr := h2conn(t, addr)
		// One large entry in the dynamic table, then many references to it.
		var b bytes.Buffer
		e := hpack.NewEncoder(&b)
		e.SetMaxDynamicTableSizeLimit(4096)
		for _, f := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "https"}, {Name: ":authority", Value: "localhost"}, {Name: ":path", Value: "/bomb"}} {
			e.WriteField(f)
		}
		e.WriteField(hpack.HeaderField{Name: "x-bomb", Value: strings.Repeat("b", 4000)})
		blk := b.Bytes()
		for range 5000 {
			blk = append(blk, 0xbe) // indexed: the newest dynamic entry
		}
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk, EndStream: true, EndHeaders: true})
		time.Sleep(500 * time.Millisecond)
		alive(t)
	})
	t.Run("SETTINGS and PING flood", func(t *testing.T) {
		_, fr := h2conn(t, addr)
		for i := range 20000 {
			var err error
			if i%2 == 0 {
				err = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 65535})
			} else {
				err = fr.WritePing(false, [8]byte{byte(i)})
			}
			if err != nil {
				break
			}
		}
		alive(t)
	})
}
