package desync

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// request builds the *http.Request Go would hand a handler for a simple head.
func parsedFor(t testing.TB, head string) *http.Request {
	t.Helper()
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(head)))
	if err != nil {
		t.Fatalf("ReadRequest(%q): %v", head, err)
	}
	return r
}

func feedSplit(c *Conn, s string, step int) {
	for i := 0; i < len(s); i += step {
		j := min(i+step, len(s))
		c.feed([]byte(s[i:j]))
	}
}

// The sniffer follows Go's framing across bodies, chunk extensions, trailers
// and pipelined requests, whatever the read sizes.
func TestConnFramingPipelined(t *testing.T) {
	heads := []string{
		"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
		"PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
		"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
		"GET /d HTTP/1.1\r\nHost: x\r\n\r\n",
	}
	bodies := []string{
		"4;ext=1\r\nGET \r\n10\r\n/smuggled HTTP/1\r\n0\r\nX-Trailer: 1\r\n\r\n",
		"hello",
		"3\r\nabc\r\n0\r\n\r\n",
		"",
	}
	want := []Tier{Compliant, Compliant, Ambiguous, Compliant}
	var all string
	for i := range heads {
		all += heads[i] + bodies[i]
	}
	for _, step := range []int{1, 2, 3, 7, 64, len(all)} {
		c := NewConn(nil, 0)
		feedSplit(c, all, step)
		if c.state != stHead {
			t.Fatalf("step %d: state %v after all requests, want head", step, c.state)
		}
		for i, h := range heads {
			tier, why, ok := c.classifyRaw(parsedFor(t, h))
			if !ok || tier != want[i] {
				t.Errorf("step %d request %d: %v/%v ok=%v, want %v", step, i, tier, why, ok, want[i])
			}
		}
		if len(c.buf) != 0 || len(c.ends) != 0 {
			t.Errorf("step %d: %d bytes / %d heads left queued", step, len(c.buf), len(c.ends))
		}
	}
}

func TestConnLosesStepOnBadChunk(t *testing.T) {
	c := NewConn(nil, 0)
	head := "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
	feedSplit(c, head+"zz\r\n", 5)
	if c.state != stLost {
		t.Fatalf("state %v, want lost", c.state)
	}
	// The queued head was dropped too: nothing can be verified any more.
	if tier, why, _ := c.classifyRaw(parsedFor(t, head)); tier != Ambiguous || why != ReasonUnverifiedRequest {
		t.Fatalf("after losing step: %v/%v, want Ambiguous/UnverifiedRequest", tier, why)
	}
}

func TestConnHeadLimit(t *testing.T) {
	c := NewConn(nil, 100) // 100 + 4096 slack
	c.feed([]byte("GET / HTTP/1.1\r\nX: " + strings.Repeat("a", 5000)))
	if c.state != stLost || len(c.buf) != 0 {
		t.Fatalf("state %v buf %d, want lost and empty", c.state, len(c.buf))
	}
}

func TestConnMismatchedRequest(t *testing.T) {
	c := NewConn(nil, 0)
	c.feed([]byte("GET /one HTTP/1.1\r\nHost: x\r\n\r\n"))
	if tier, why, _ := c.classifyRaw(parsedFor(t, "GET /two HTTP/1.1\r\nHost: x\r\n\r\n")); tier != Ambiguous || why != ReasonUnverifiedRequest {
		t.Fatalf("got %v/%v, want Ambiguous/UnverifiedRequest", tier, why)
	}
}

func TestStopSniffingFallsBackToParsed(t *testing.T) {
	c := NewConn(nil, 0)
	c.StopSniffing()
	c.feed([]byte("GET / HTTP/1.1\r\n\r\n"))
	if _, _, ok := c.classifyRaw(parsedFor(t, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")); ok {
		t.Fatal("stopped sniffer still answered")
	}
}

// Documents why the sniffer exists: without it, Go's parser hides a
// Content-Length sent next to Transfer-Encoding: chunked.
func TestParsedOnlyLosesCLWithChunked(t *testing.T) {
	head := "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
	r := parsedFor(t, head)
	if tier, _ := ClassifyParsed(r); tier != Compliant {
		t.Fatalf("parsed-only tier %v; net/http changed, revisit the sniffer", tier)
	}
	if tier, why := ClassifyRaw([]byte(head)); tier != Ambiguous || why != ReasonBothTeClPresent {
		t.Fatalf("raw: %v/%v", tier, why)
	}
}

// A real server with TLS-less keep-alive: two pipelined requests in one
// write, the first smuggling-shaped (CL+TE), must each be classified from
// their own raw head.
func TestConnThroughServerPipelined(t *testing.T) {
	ts := startServer(t, Monitor)
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"+
		"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	for i, want := range []string{"Ambiguous", ""} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			if i == 1 {
				break // monitor closes after Ambiguous: the second is never read
			}
			t.Fatalf("response %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		if got := resp.Header.Get("X-Desync-Tier"); got != want && want != "" {
			t.Fatalf("response %d tier %q, want %q", i, got, want)
		}
	}
}

func TestConnContextUnwraps(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	c := NewConn(a, 0)
	wrapped := struct {
		net.Conn
		netConner
	}{c, netConner{c}}
	ctx := ConnContext(context.Background(), wrapped)
	if ConnFromContext(ctx) != c {
		t.Fatal("ConnContext did not find the Conn through NetConn")
	}
}

type netConner struct{ c net.Conn }

func (n netConner) NetConn() net.Conn { return n.c }

func TestDecideTable(t *testing.T) {
	type v = Verdict
	want := map[Mode][NumTiers]Verdict{
		Monitor:   {{}, {}, {CloseAfter: true}, {CloseAfter: true}},
		Defensive: {{}, {}, {CloseAfter: true}, {Block: true, CloseAfter: true}},
		Strictest: {{}, {Block: true, CloseAfter: true}, {Block: true, CloseAfter: true}, {Block: true, CloseAfter: true}},
	}
	for m, row := range want {
		for tier := Tier(0); tier < numTiers; tier++ {
			if got := Decide(m, tier); got != row[tier] {
				t.Errorf("Decide(%v,%v) = %+v, want %+v", m, tier, got, row[tier])
			}
		}
	}
	for _, s := range []string{"monitor", "Defensive", "", "STRICTEST"} {
		if _, err := ParseMode(s); err != nil {
			t.Errorf("ParseMode(%q): %v", s, err)
		}
	}
	if _, err := ParseMode("lenient"); err == nil {
		t.Error("ParseMode accepted an unknown mode")
	}
	_ = v{}
}
