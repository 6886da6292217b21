package h1

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

type corpusCase struct {
	File    string `json:"file"`
	Name    string `json:"name"`
	Method  string `json:"method"`
	URI     string `json:"uri"`
	Version string `json:"version"`
	Headers []struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	} `json:"headers"`
	Expected struct {
		Tier   string `json:"tier"`
		Reason string `json:"reason"`
	} `json:"expected"`
}

func loadCorpus(t testing.TB) []corpusCase {
	t.Helper()
	b, err := os.ReadFile("../desync/testdata/corpus.json")
	if err != nil {
		t.Fatalf("read corpus: %v", err)
	}
	var cs []corpusCase
	if err := json.Unmarshal(b, &cs); err != nil {
		t.Fatalf("decode corpus: %v", err)
	}
	if len(cs) < 150 {
		t.Fatalf("corpus has %d cases", len(cs))
	}
	return cs
}

func (c *corpusCase) head(host string) []byte {
	var b strings.Builder
	b.WriteString(c.Method + " " + c.URI + " " + c.Version + "\r\n")
	if host != "" {
		b.WriteString("Host: " + host + "\r\n")
	}
	for _, h := range c.Headers {
		b.WriteString(h.Name + ": " + h.Value + "\r\n")
	}
	b.WriteString("\r\n")
	return []byte(b.String())
}

// Every corpus case is parsed and classified by the engine's parser exactly as desync.ClassifyRaw
// classifies the same bytes (the corpus's own expectations are checked there), with and without
// a Host line: one classifier.
func TestCorpusClassifiesAsDesync(t *testing.T) {
	var r Request
	for _, c := range loadCorpus(t) {
		for _, host := range []string{"", "example.test"} {
			head := c.head(host)
			if err := r.Parse(head, 1<<20); err != nil {
				t.Errorf("%s / %q: parse: %v", c.File, c.Name, err)
				continue
			}
			wantT, wantR := desync.ClassifyRaw(head)
			if r.Tier != wantT || r.Reason != wantR {
				t.Errorf("%s / %q (host %q): got %v/%v, desync says %v/%v", c.File, c.Name, host, r.Tier, r.Reason, wantT, wantR)
			}
			if host == "" {
				et, _ := desync.ParseTier(c.Expected.Tier)
				if r.Tier != et && r.Reason != desync.ReasonMultilineHeader && r.Reason != desync.ReasonMissingHeaderColon &&
					r.Reason != desync.ReasonNonCrLfLineTermination && r.Reason != desync.ReasonSpaceInUri && r.Reason != desync.ReasonAmbiguousUri {
					t.Errorf("%s / %q: tier %v, corpus says %v", c.File, c.Name, r.Tier, et)
				}
			}
			if r.HeadLen > len(head) || head[r.HeadLen-1] != '\n' {
				t.Errorf("%s / %q: head %d of %d bytes", c.File, c.Name, r.HeadLen, len(head))
			}
		}
	}
}

func TestParseFraming(t *testing.T) {
	cases := []struct {
		head    string
		framing Framing
		n       int64
		unfr    Unframeable
		tier    desync.Tier
	}{
		{"GET / HTTP/1.1\r\nHost: a\r\n\r\n", NoBody, 0, Frameable, desync.Compliant},
		{"POST /x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", Sized, 5, Frameable, desync.Compliant},
		{"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Chunked, 0, Frameable, desync.Compliant},
		{"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", Chunked, 0, Frameable, desync.Ambiguous},
		{"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", Sized, 3, Frameable, desync.Ambiguous},
		{"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", NoBody, 0, BadContentLength, desync.Severe},
		{"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", NoBody, 0, BadTransferEncoding, desync.Compliant},
		{"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", NoBody, 0, Frameable, desync.Ambiguous},
		{"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", Sized, 2, Frameable, desync.Ambiguous},
		{"POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n", NoBody, 0, Frameable, desync.Ambiguous},
		{"GET / HTTP/1.1\r\n\r\n", NoBody, 0, BadHost, desync.Compliant},
		{"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", NoBody, 0, BadHost, desync.Compliant},
		{"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", NoBody, 0, BadTarget, desync.Compliant},
		{"GET http://h.test:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n", NoBody, 0, Frameable, desync.Compliant},
		{"GET / HTTP/2.0\r\nHost: a\r\n\r\n", NoBody, 0, BadVersion, desync.Severe},
		{"GET /\r\n\r\n", NoBody, 0, BadVersion, desync.Acceptable},
		{"GET / HTTP/1.1\nHost: a\n\n", NoBody, 0, Frameable, desync.Acceptable},
		{"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", NoBody, 0, Frameable, desync.Severe},
	}
	var r Request
	for _, c := range cases {
		if err := r.Parse([]byte(c.head), 8192); err != nil {
			t.Errorf("%q: %v", c.head, err)
			continue
		}
		if r.Framing != c.framing || r.ContentLength != c.n || r.Unframeable != c.unfr || r.Tier != c.tier {
			t.Errorf("%q: framing %v n %d unframeable %v tier %v/%v; want %v %d %v %v", c.head, r.Framing, r.ContentLength,
				r.Unframeable, r.Tier, r.Reason, c.framing, c.n, c.unfr, c.tier)
		}
	}
	if err := r.Parse([]byte("GET http://h.test:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n"), 8192); err != nil ||
		string(r.Host) != "h.test:8080" || string(r.Path) != "/p" || string(r.Query) != "q" {
		t.Errorf("absolute form: host %q path %q query %q err %v", r.Host, r.Path, r.Query, err)
	}
}

func TestParseIncompleteAndTooLarge(t *testing.T) {
	var r Request
	full := []byte("GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + strings.Repeat("v", 100) + "\r\n\r\n")
	for i := 0; i < len(full); i++ {
		if err := r.Parse(full[:i], 1<<20); err != ErrIncomplete {
			t.Fatalf("prefix %d: %v, want incomplete", i, err)
		}
	}
	if err := r.Parse(full, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := r.Parse(full[:60], 50); err != ErrHeadTooLarge {
		t.Fatalf("oversized incomplete: %v", err)
	}
	if err := r.Parse(full, 50); err != ErrHeadTooLarge {
		t.Fatalf("oversized complete: %v", err)
	}
	if err := r.Parse([]byte("\r\nGET / HTTP/1.1\r\n\r\n"), 100); err != ErrMalformed {
		t.Fatalf("empty request line: %v", err)
	}
}

// netHTTPAccepts is what net/http's server does with a head: http.ReadRequest plus the server's
// own checks (HTTP/1 only, Host present once on HTTP/1.1).
func netHTTPAccepts(head []byte) (*http.Request, bool) {
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
	if err != nil || req.ProtoMajor != 1 {
		return nil, false
	}
	// ReadRequest moved Host to req.Host (and refused several); the server refuses a missing
	// one on HTTP/1.1 and an invalid one always.
	hostLine := bytes.Contains(bytes.ToLower(head), []byte("\nhost:"))
	if req.ProtoAtLeast(1, 1) && req.Host == "" && !hostLine || !httpguts.ValidHostHeader(req.Host) {
		return nil, false
	}
	return req, true
}

// differential compares the engine's parse with net/http's on the same bytes. Where both accept,
// method, target, version, fields and body framing agree; where one refuses, the tier (or a
// refusal the engine documents, see Unframeable) explains it.
func differential(t *testing.T, head []byte) {
	var r Request
	err := r.Parse(head, 1<<20)
	if err == ErrIncomplete {
		return
	}
	req, stdOK := netHTTPAccepts(head)
	oursOK := err == nil && r.Unframeable == Frameable
	switch {
	case oursOK && stdOK:
		if string(r.Method) != req.Method || string(r.Target) != req.RequestURI || string(r.Version) != req.Proto {
			t.Fatalf("%q: request line %q %q %q vs net/http %q %q %q", head, r.Method, r.Target, r.Version, req.Method, req.RequestURI, req.Proto)
		}
		std := req.TransferEncoding
		switch r.Framing {
		case Chunked:
			if len(std) != 1 || std[0] != "chunked" {
				t.Fatalf("%q: chunked, net/http says TE %q CL %d", head, std, req.ContentLength)
			}
		case Sized:
			if len(std) != 0 || req.ContentLength != r.ContentLength {
				if r.Tier == desync.Compliant {
					t.Fatalf("%q: length %d, net/http says TE %q CL %d", head, r.ContentLength, std, req.ContentLength)
				}
			}
		case NoBody:
			if len(std) != 0 || req.ContentLength > 0 {
				t.Fatalf("%q: no body, net/http says TE %q CL %d", head, std, req.ContentLength)
			}
		}
		if r.Tier != desync.Compliant {
			return // folding, bare LF, look-alikes: net/http may normalise what we classify
		}
		// Same fields: every one of ours, trimmed, in order per name.
		got := http.Header{}
		for _, f := range r.Fields {
			k := http.CanonicalHeaderKey(string(f.Name))
			got[k] = append(got[k], string(TrimOWS(f.Value)))
		}
		want := req.Header.Clone()
		if len(req.TransferEncoding) > 0 {
			want["Transfer-Encoding"] = req.TransferEncoding
			delete(got, "Content-Length") // net/http drops it under chunked (tier Ambiguous anyway)
		}
		if r.AuthorityHost == nil {
			want["Host"] = []string{req.Host}
			if req.Host == "" && got["Host"] == nil {
				delete(want, "Host")
			}
		} else {
			delete(got, "Host") // the authority is the host; the field is replaced when forwarding
		}
		for k, v := range want {
			if strings.Join(got[k], "\x00") != strings.Join(v, "\x00") {
				t.Fatalf("%q: field %s = %q, net/http %q", head, k, got[k], v)
			}
		}
		for k := range got {
			if _, ok := want[k]; !ok {
				t.Fatalf("%q: field %s only in ours", head, k)
			}
		}
	case oursOK && !stdOK:
		if r.Tier == desync.Compliant {
			t.Fatalf("%q: we accept a compliant request net/http refuses", head)
		}
	case !oursOK && stdOK:
		if err == nil && r.Tier == desync.Compliant {
			switch r.Unframeable {
			case BadTarget, BadHost:
				// net/http routes an authority or a malformed absolute URI we refuse to
				// forward; both are refusals a target cannot misread.
				return
			}
		}
		if err != nil || r.Tier == desync.Compliant {
			t.Fatalf("%q: we refuse (%v, %v) what net/http accepts, tier %v", head, err, r.Unframeable, r.Tier)
		}
	}
}

func seeds() [][]byte {
	s := [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
		[]byte("POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\n"),
		[]byte("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"),
		[]byte("GET http://x.test/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
		[]byte("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
		[]byte("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
	}
	return s
}

func TestDifferentialCorpus(t *testing.T) {
	for _, c := range loadCorpus(t) {
		differential(t, c.head("example.test"))
	}
	for _, s := range seeds() {
		differential(t, s)
	}
}

func FuzzDifferential(f *testing.F) {
	for _, s := range seeds() {
		f.Add(s)
	}
	for _, c := range loadCorpus(f) {
		f.Add(c.head("example.test"))
	}
	f.Fuzz(func(t *testing.T, head []byte) {
		differential(t, head)
	})
}

// FuzzParse: any bytes, never a panic, slices always inside the head, framing consistent.
func FuzzParse(f *testing.F) {
	for _, s := range seeds() {
		f.Add(s, uint16(64))
	}
	f.Fuzz(func(t *testing.T, b []byte, max uint16) {
		var r Request
		err := r.Parse(b, int(max)+1)
		if err != nil {
			return
		}
		if r.HeadLen > len(b) || r.HeadLen > int(max)+1 {
			t.Fatalf("head %d beyond %d/%d", r.HeadLen, len(b), max)
		}
		if r.Framing == Sized && r.ContentLength <= 0 || r.Framing == UntilClose {
			t.Fatalf("framing %v n %d", r.Framing, r.ContentLength)
		}
		var o Outgoing
		o.SetRequestID(nil)
		out := o.AppendForwardHead(nil, &r)
		if r.Unframeable == Frameable {
			var back Request
			if err := back.Parse(out, 1<<20); err != nil || back.Unframeable != Frameable || back.Framing != r.Framing {
				t.Fatalf("forwarded head %q does not parse back: %v %v", out, err, back.Unframeable)
			}
		}
	})
}
