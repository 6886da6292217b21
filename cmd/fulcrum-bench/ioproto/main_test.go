package main

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	stdtls "crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lesismal/nbio/nbhttp"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener/h1"
)

// origin is a raw HTTP/1.1 server framing requests with the engine's parser: it records each
// request head and body it reads and answers 200 "ok". If the proxy framed a message differently
// from how it forwards it, the origin would see a different number of requests or bodies.
type origin struct {
	ln    net.Listener
	mu    sync.Mutex
	conns int
	reqs  []seen
	wg    sync.WaitGroup
}

type seen struct {
	method, target string
	fields         map[string][]string
	body           string
	framing        h1.Framing
}

func startOrigin(t *testing.T) *origin {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &origin{ln: ln}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			o.mu.Lock()
			o.conns++
			o.mu.Unlock()
			o.wg.Add(1)
			go func() { defer o.wg.Done(); o.serve(c) }()
		}
	}()
	t.Cleanup(func() { ln.Close(); o.wg.Wait() })
	return o
}

func (o *origin) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 64<<10)
	var r h1.Request
	var buf []byte
	for {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		for {
			err := r.Parse(buf, 64<<10)
			if err == nil {
				break
			}
			if !errors.Is(err, h1.ErrIncomplete) {
				return
			}
			b, err := br.ReadByte()
			if err != nil {
				return
			}
			buf = append(buf, b)
		}
		s := seen{method: string(r.Method), target: string(r.Target), fields: map[string][]string{}, framing: r.Framing}
		for _, f := range r.Fields {
			k := strings.ToLower(string(f.Name))
			s.fields[k] = append(s.fields[k], string(h1.TrimOWS(f.Value)))
		}
		if r.Unframeable != h1.Frameable {
			s.fields["x-origin-verdict"] = []string{r.Unframeable.String()}
		}
		buf = buf[:0]
		switch r.Framing {
		case h1.Sized:
			b := make([]byte, r.ContentLength)
			if _, err := io.ReadFull(br, b); err != nil {
				return
			}
			s.body = string(b)
		case h1.Chunked:
			var body bytes.Buffer
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					return
				}
				size, ok := chunkSize([]byte(line))
				if !ok {
					return
				}
				if size == 0 {
					for { // trailers, then the empty line
						l, err := br.ReadString('\n')
						if err != nil {
							return
						}
						if l == "\r\n" {
							break
						}
					}
					break
				}
				if _, err := io.CopyN(&body, br, int64(size)); err != nil {
					return
				}
				if l, err := br.ReadString('\n'); err != nil || l != "\r\n" {
					return
				}
			}
			s.body = body.String()
		}
		o.mu.Lock()
		o.reqs = append(o.reqs, s)
		o.mu.Unlock()
		answer := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
		if s.method == "HEAD" {
			answer = answer[:len(answer)-2]
		}
		if _, err := io.WriteString(c, answer); err != nil {
			return
		}
	}
}

func (o *origin) take() (reqs []seen, conns int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	reqs, o.reqs = o.reqs, nil
	return reqs, o.conns
}

func writeCert(t *testing.T) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

type fixture struct {
	o           *origin
	http, https string
}

func start(t *testing.T) *fixture {
	t.Helper()
	o := startOrigin(t)
	cert, key := writeCert(t)
	f := &fixture{o: o, http: configtest.Addr(t), https: configtest.Addr(t)}
	p, err := Start(Config{HTTP: f.http, HTTPS: f.https, Origin: o.ln.Addr().String(), Cert: cert, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return f
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

func readResponse(t *testing.T, br *bufio.Reader, method ...string) (int, string) {
	t.Helper()
	var req *http.Request
	if len(method) > 0 {
		req = &http.Request{Method: method[0]}
	}
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return resp.StatusCode, string(b)
}

// Keep-alive GETs over plain HTTP and over TLS 1.3 are proxied with the forwarding headers added,
// on one reused upstream connection.
func TestKeepAliveProxying(t *testing.T) {
	f := start(t)
	for _, tc := range []struct {
		name, proto string
		conn        func() net.Conn
	}{
		{"http", "http", func() net.Conn { return dial(t, f.http) }},
		{"https", "https", func() net.Conn {
			c := stdtls.Client(dial(t, f.https), &stdtls.Config{InsecureSkipVerify: true, MinVersion: stdtls.VersionTLS13, NextProtos: []string{"http/1.1"}})
			if err := c.Handshake(); err != nil {
				t.Fatalf("handshake: %v", err)
			}
			if p := c.ConnectionState().NegotiatedProtocol; p != "http/1.1" {
				t.Fatalf("ALPN %q", p)
			}
			return c
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.conn()
			br := bufio.NewReader(c)
			for i := range 50 {
				fmt.Fprintf(c, "GET /n/%d?q=1 HTTP/1.1\r\nHost: example.test\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n", i)
				if code, body := readResponse(t, br); code != 200 || body != "ok" {
					t.Fatalf("request %d: %d %q", i, code, body)
				}
			}
			reqs, _ := f.o.take()
			if len(reqs) != 50 {
				t.Fatalf("origin saw %d requests, want 50", len(reqs))
			}
			for i, r := range reqs {
				if r.target != fmt.Sprintf("/n/%d?q=1", i) || r.method != "GET" {
					t.Fatalf("request %d: %s %s", i, r.method, r.target)
				}
				// The client is not trusted: its X-Forwarded-For is replaced, not extended.
				if got := r.fields["x-forwarded-for"]; len(got) != 1 || got[0] != "127.0.0.1" {
					t.Fatalf("X-Forwarded-For %q", got)
				}
				if got := r.fields["x-forwarded-proto"]; len(got) != 1 || got[0] != tc.proto {
					t.Fatalf("X-Forwarded-Proto %q", got)
				}
				if len(r.fields["x-request-id"]) != 1 || len(r.fields["host"]) != 1 {
					t.Fatalf("fields %v", r.fields)
				}
			}
		})
	}
	if _, conns := f.o.take(); conns != 1 {
		t.Fatalf("origin accepted %d connections for 100 sequential requests, want 1 (reused)", conns)
	}
}

// Bodies are framed by the engine's rules on the way in (sized, chunked with extensions dropped,
// pipelined behind each other) and the origin, framing with the same parser, sees each once.
func TestBodiesAndPipelining(t *testing.T) {
	f := start(t)
	c := dial(t, f.http)
	br := bufio.NewReader(c)
	msgs := "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" +
		"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n" +
		"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
	// One byte at a time: every state of the incremental framers sees a split.
	for i := range len(msgs) {
		if _, err := c.Write([]byte{msgs[i]}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		if code, _ := readResponse(t, br); code != 200 {
			t.Fatalf("response %d: %d", i, code)
		}
	}
	reqs, _ := f.o.take()
	if len(reqs) != 3 || reqs[0].body != "hello" || reqs[1].body != "abcde" || reqs[1].framing != h1.Chunked || reqs[2].target != "/c" {
		t.Fatalf("origin saw %+v", reqs)
	}
	// Bad chunk framing: the exchange is cut (its head was already forwarded), the connection is closed and
	// nothing after it is taken as a request.
	c2 := dial(t, f.http)
	io.WriteString(c2, "POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 x\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
	if b, _ := io.ReadAll(c2); len(b) != 0 {
		t.Fatalf("bad chunk answered %q", b)
	}
	reqs, _ = f.o.take()
	for _, r := range reqs {
		if r.target == "/smuggled" {
			t.Fatal("a request after bad chunk framing reached the origin")
		}
	}
}

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
}

func loadCorpus(t *testing.T) []corpusCase {
	t.Helper()
	b, err := os.ReadFile("../../../listener/desync/testdata/corpus.json")
	if err != nil {
		t.Fatal(err)
	}
	var cs []corpusCase
	if err := json.Unmarshal(b, &cs); err != nil {
		t.Fatal(err)
	}
	if len(cs) != 159 {
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

// body is a body that fits the framing the engine's parser gives the head.
func body(r *h1.Request) string {
	switch r.Framing {
	case h1.Sized:
		return strings.Repeat("x", int(r.ContentLength))
	case h1.Chunked:
		return "5\r\nhello\r\n0\r\n\r\n"
	}
	return ""
}

// The desync corpus through the event loop: every case (with and without Host) is sent with the
// body its framing calls for and a pipelined GET /next behind it. What the engine's parser cannot
// frame is answered 400 and nothing reaches the origin; everything else reaches the origin
// exactly once, with a head the origin (same parser) frames the same way and classifies
// compliant, and /next arrives as the second request: the proxy and the origin agree on every
// message boundary.
func TestDesyncCorpus(t *testing.T) {
	f := start(t)
	var refused, forwarded int
	var r h1.Request
	for _, cs := range loadCorpus(t) {
		for _, host := range []string{"", "example.test"} {
			head := cs.head(host)
			err := r.Parse(head, 64<<10)
			refuse := err != nil || r.Unframeable != h1.Frameable || r.Upgrade
			wantFraming, wantBody, closes := h1.NoBody, "", false
			if !refuse {
				// Bytes after the head's empty line (a value that held CRLF CRLF) start the body.
				stream := string(head[r.HeadLen:]) + body(&r)
				wantFraming, closes = r.Framing, r.Close
				switch r.Framing {
				case h1.Sized:
					wantBody = stream[:r.ContentLength]
				case h1.Chunked:
					wantBody = "hello"
				}
			}
			msg := string(head)
			if !refuse {
				msg += body(&r)
			}
			msg += "GET /next HTTP/1.1\r\nHost: example.test\r\n\r\n"
			c := dial(t, f.http)
			io.WriteString(c, msg)
			br := bufio.NewReader(c)
			name := fmt.Sprintf("%s / %q (host %q)", cs.File, cs.Name, host)
			resp, err := http.ReadResponse(br, &http.Request{Method: cs.Method})
			if err != nil {
				t.Errorf("%s: read response: %v", name, err)
				c.Close()
				f.o.take()
				continue
			}
			io.Copy(io.Discard, resp.Body)
			code := resp.StatusCode
			if refuse {
				refused++
				if code != 400 && code != 501 {
					t.Errorf("%s: %d, want 400", name, code)
				}
				if b, _ := io.ReadAll(br); len(b) != 0 {
					t.Errorf("%s: more after the refusal: %q", name, b)
				}
			} else {
				forwarded++
				if code != 200 {
					t.Errorf("%s: %d, want 200", name, code)
				} else if closes { // HTTP/1.0 without keep-alive: one exchange, then close
					if b, _ := io.ReadAll(br); len(b) != 0 {
						t.Errorf("%s: more after a closing exchange: %q", name, b)
					}
				} else if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != 200 {
					t.Errorf("%s: /next: %v %v", name, resp, err)
				}
			}
			c.Close()
			reqs, _ := f.o.take()
			switch {
			case refuse && len(reqs) != 0:
				t.Errorf("%s: refused but the origin saw %d requests", name, len(reqs))
			case !refuse && len(reqs) != 2-btoi(closes):
				t.Errorf("%s: origin saw %d requests, want %d", name, len(reqs), 2-btoi(closes))
			case !refuse:
				got := reqs[0]
				if got.framing != wantFraming || got.body != wantBody {
					t.Errorf("%s: origin framed %v %q, proxy %v %q", name, got.framing, got.body, wantFraming, wantBody)
				}
				if v := got.fields["x-origin-verdict"]; v != nil {
					t.Errorf("%s: the origin cannot frame the forwarded head: %v", name, v)
				}
				if !closes && reqs[1].target != "/next" {
					t.Errorf("%s: second request %q", name, reqs[1].target)
				}
			}
		}
	}
	t.Logf("corpus: %d refused (400/501 and close), %d forwarded with the same framing at the origin", refused, forwarded)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// nbProcessor records what nbio's own HTTP parser (nbhttp) makes of a byte stream.
type nbProcessor struct {
	nbhttp.EmptyProcessor
	complete int
	body     []string
}

func (p *nbProcessor) OnBody(_ *nbhttp.Parser, b []byte) error {
	for len(p.body) <= p.complete {
		p.body = append(p.body, "")
	}
	p.body[p.complete] += string(b)
	return nil
}

func (p *nbProcessor) OnComplete(*nbhttp.Parser) { p.complete++ }

// What the library's own parser would have done with the corpus, had the prototype used it (as
// nbhttp's server does): the same streams as TestDesyncCorpus (Host present, so every refusal
// below is about framing or syntax, not the missing Host) through nbhttp.Parser. Cases where
// it takes a message the engine refuses, or frames it differently, are the ones a proxy built
// on it would forward or split differently from a strict origin. This documents the README's
// "framing strictness" figure; it fails if nbhttp becomes as strict (then revisit the README).
func TestNbhttpParserOnCorpus(t *testing.T) {
	var r h1.Request
	var takes, refuses, differs []string
	for _, cs := range loadCorpus(t) {
		head := cs.head("example.test")
		err := r.Parse(head, 64<<10)
		refuse := err != nil || r.Unframeable != h1.Frameable
		msg := string(head)
		if !refuse {
			msg += body(&r)
		}
		msg += "GET /next HTTP/1.1\r\nHost: example.test\r\n\r\n"
		p := &nbProcessor{}
		nerr := nbhttp.NewParser(nil, nil, p, false, nil).Parse([]byte(msg))
		name := fmt.Sprintf("%s / %q", cs.File, cs.Name)
		want := ""
		if !refuse && r.Framing != h1.NoBody {
			want = string(head[r.HeadLen:]) + body(&r)
			if r.Framing == h1.Sized {
				want = want[:r.ContentLength]
			} else {
				want = "hello"
			}
		}
		got := ""
		if len(p.body) > 0 {
			got = p.body[0]
		}
		switch {
		case refuse && p.complete > 0:
			takes = append(takes, fmt.Sprintf("%s (engine: %v)", name, r.Unframeable))
		case refuse:
		case nerr != nil && p.complete == 0:
			// Stricter than the engine: answered with an error before anything could classify,
			// count or log it (what the issue holds against net/http).
			refuses = append(refuses, fmt.Sprintf("%s (%v)", name, nerr))
		case p.complete != 2 || got != want:
			differs = append(differs, fmt.Sprintf("%s (%d messages, first body %d bytes, engine %d; %v)", name, p.complete, len(got), len(want), nerr))
		}
	}
	for _, s := range takes {
		t.Logf("takes a request the engine cannot frame: %s", s)
	}
	for _, s := range differs {
		t.Logf("frames a request differently: %s", s)
	}
	for _, s := range refuses {
		t.Logf("refuses before classification: %s", s)
	}
	t.Logf("corpus (159 cases, with Host): nbhttp takes %d requests the engine cannot frame, frames %d differently, refuses %d the engine frames and classifies",
		len(takes), len(differs), len(refuses))
	if len(takes)+len(differs) == 0 {
		t.Fatal("nbhttp agrees with the engine on the framing of the whole corpus: update the README's I/O model section")
	}
}
