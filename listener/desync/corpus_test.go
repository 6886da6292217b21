package desync

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"testing"
)

type corpusHeader struct {
	Name  string `json:"name"`
	Value string `json:"value"`
	Tier  string `json:"tier"`
}

type corpusCase struct {
	File     string         `json:"file"`
	Name     string         `json:"name"`
	Method   string         `json:"method"`
	URI      string         `json:"uri"`
	Version  string         `json:"version"`
	Headers  []corpusHeader `json:"headers"`
	Expected struct {
		Tier   string `json:"tier"`
		Reason string `json:"reason"`
	} `json:"expected"`
}

func loadCorpus(t testing.TB) []corpusCase {
	t.Helper()
	b, err := os.ReadFile("testdata/corpus.json")
	if err != nil {
		t.Fatalf("read corpus: %v", err)
	}
	var cs []corpusCase
	if err := json.Unmarshal(b, &cs); err != nil {
		t.Fatalf("decode corpus: %v", err)
	}
	if len(cs) < 150 {
		t.Fatalf("corpus has %d cases, want the full upstream set", len(cs))
	}
	return cs
}

func (c *corpusCase) want(t testing.TB) (Tier, Reason) {
	tier, ok1 := ParseTier(c.Expected.Tier)
	why, ok2 := ParseReason(c.Expected.Reason)
	if !ok1 || !ok2 {
		t.Fatalf("case %q: unknown expectation %q/%q", c.Name, c.Expected.Tier, c.Expected.Reason)
	}
	return tier, why
}

// rawHead builds the request head the way upstream's test harness does,
// optionally with a Host line first (net/http requires Host on HTTP/1.1).
func (c *corpusCase) rawHead(host string) string {
	var b strings.Builder
	b.WriteString(c.Method + " " + c.URI + " " + c.Version + "\r\n")
	if host != "" {
		b.WriteString("Host: " + host + "\r\n")
	}
	for _, h := range c.Headers {
		b.WriteString(h.Name + ": " + h.Value + "\r\n")
	}
	b.WriteString("\r\n")
	return b.String()
}

// parsedRequest builds the request upstream's "parsed" API would get: names
// and values as given, Transfer-Encoding left in the header map.
func (c *corpusCase) parsedRequest() *http.Request {
	r := &http.Request{Method: c.Method, RequestURI: c.URI, Proto: c.Version, Header: http.Header{}}
	r.ProtoMajor, r.ProtoMinor, _ = http.ParseHTTPVersion(c.Version)
	if r.ProtoMajor == 0 {
		r.ProtoMajor = 1 // unparseable versions are still HTTP/1 text here
	}
	for _, h := range c.Headers {
		r.Header[h.Name] = append(r.Header[h.Name], h.Value)
	}
	return r
}

// Raw analysis of the corpus: the tier must match; the reason too, except
// where upstream itself accepts a different raw reason (the raw text of some
// cases reads as obs-fold, a missing colon or bare LF).
func TestCorpusRaw(t *testing.T) {
	for _, c := range loadCorpus(t) {
		wantT, wantR := c.want(t)
		gotT, gotR := ClassifyRaw([]byte(c.rawHead("")))
		switch gotR {
		case ReasonMultilineHeader, ReasonMissingHeaderColon, ReasonNonCrLfLineTermination, ReasonSpaceInUri, ReasonAmbiguousUri:
			if gotT == Compliant {
				t.Errorf("%s / %q: raw got %v/%v, want %v/%v", c.File, c.Name, gotT, gotR, wantT, wantR)
			}
			continue
		}
		if gotT != wantT || gotR != wantR {
			t.Errorf("%s / %q: raw got %v/%v, want %v/%v", c.File, c.Name, gotT, gotR, wantT, wantR)
		}
	}
}

// Parsed analysis on upstream's parsed model (no Go parser involved).
func TestCorpusParsedModel(t *testing.T) {
	for _, c := range loadCorpus(t) {
		wantT, wantR := c.want(t)
		gotT, gotR := ClassifyParsed(c.parsedRequest())
		if gotT != wantT || gotR != wantR {
			t.Errorf("%s / %q: parsed got %v/%v, want %v/%v", c.File, c.Name, gotT, gotR, wantT, wantR)
		}
	}
}
