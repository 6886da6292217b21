package l4

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"testing/iotest"
	"time"
)

// realHello captures the first flight of Go's TLS client for serverName.
func realHello(t testing.TB, serverName string, maxVersion uint16) []byte {
	t.Helper()
	cli, srv := net.Pipe()
	defer srv.Close()
	go func() {
		c := tls.Client(cli, &tls.Config{ServerName: serverName, InsecureSkipVerify: true, MaxVersion: maxVersion,
			NextProtos: []string{"h2", "http/1.1"}})
		c.Handshake()
		cli.Close()
	}()
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	raw, _, err := peekClientHello(srv, nil)
	if err != nil {
		t.Fatalf("peek %q: %v", serverName, err)
	}
	return raw
}

func TestPeekRealClientHello(t *testing.T) {
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, name := range []string{"www.example.test", "A-B_c.Example.TEST", ""} {
			raw := realHello(t, name, v)
			// Byte by byte: reassembly across reads.
			got, sni, err := peekClientHello(iotest.OneByteReader(bytes.NewReader(raw)), nil)
			if err != nil {
				t.Fatalf("%q: %v", name, err)
			}
			want := name
			if want != "" {
				want = string(bytes.ToLower([]byte(name)))
			}
			if sni != want || !bytes.Equal(got, raw) {
				t.Fatalf("%q: sni %q, %d/%d bytes", name, sni, len(got), len(raw))
			}
		}
	}
}

// split re-frames the handshake message of one record into records of n bytes.
func split(t *testing.T, rec []byte, n int) []byte {
	body := rec[5:]
	var out []byte
	for len(body) > 0 {
		k := min(n, len(body))
		out = append(out, 0x16, 3, 1, byte(k>>8), byte(k))
		out = append(out, body[:k]...)
		body = body[k:]
	}
	return out
}

func TestPeekClientHelloFraming(t *testing.T) {
	raw := realHello(t, "split.example.test", 0)
	fragmented := split(t, raw, 100)
	if _, sni, err := peekClientHello(bytes.NewReader(fragmented), nil); err != nil || sni != "split.example.test" {
		t.Fatalf("fragmented: %q %v", sni, err)
	}
	cases := []struct {
		name string
		in   []byte
		want error
	}{
		{"not tls", []byte("GET / HTTP/1.1\r\n"), ErrNotTLS},
		{"ssh", []byte("SSH-2.0-OpenSSH\r\n"), ErrNotTLS},
		{"wrong major", []byte{0x16, 2, 0, 0, 1, 1}, ErrNotTLS},
		{"alert record", []byte{0x15, 3, 1, 0, 2, 2, 40}, ErrNotTLS},
		{"empty record", []byte{0x16, 3, 1, 0, 0}, ErrBadHello},
		{"oversized record", []byte{0x16, 3, 1, 0x48, 0x01}, ErrBadHello},
		{"server hello", []byte{0x16, 3, 3, 0, 4, 2, 0, 0, 0}, ErrBadHello},
		{"huge hello", []byte{0x16, 3, 3, 0, 4, 1, 0xff, 0xff, 0xff}, ErrBadHello},
		{"truncated", raw[:len(raw)-1], io.ErrUnexpectedEOF},
		{"trailing message", append(append([]byte{0x16, 3, 1, 0, byte(len(raw) - 5 + 4)}, raw[5:]...), 14, 0, 0, 0), ErrBadHello},
		{"interleaved record", append(split(t, raw, 100)[:105:105], 0x17, 3, 3, 0, 1, 0), ErrBadHello},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, _, err := peekClientHello(bytes.NewReader(tc.in), nil)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if !bytes.Equal(got, tc.in) {
				t.Fatalf("returned %d of %d bytes for replay", len(got), len(tc.in))
			}
		})
	}
}

func TestParseClientHelloStrict(t *testing.T) {
	// hello builds a ClientHello body with the given extensions block.
	hello := func(exts []byte) []byte {
		b := []byte{3, 3}
		b = append(b, make([]byte, 32)...)
		b = append(b, 0)                // session id
		b = append(b, 0, 2, 0x13, 0x01) // cipher suites
		b = append(b, 1, 0)             // compression
		if exts != nil {
			b = append(b, byte(len(exts)>>8), byte(len(exts)))
			b = append(b, exts...)
		}
		return b
	}
	sniExt := func(names ...string) []byte {
		var list []byte
		for _, n := range names {
			list = append(list, 0, byte(len(n)>>8), byte(len(n)))
			list = append(list, n...)
		}
		data := append([]byte{byte(len(list) >> 8), byte(len(list))}, list...)
		return append([]byte{0, 0, byte(len(data) >> 8), byte(len(data))}, data...)
	}
	cases := []struct {
		name string
		in   []byte
		sni  string
		ok   bool
	}{
		{"no extensions", hello(nil), "", true},
		{"empty extensions", hello([]byte{}), "", true},
		{"sni", hello(sniExt("Www.Example.Test")), "www.example.test", true},
		{"two names", hello(sniExt("a.test", "b.test")), "", false},
		{"duplicate ext", hello(append(sniExt("a.test"), sniExt("a.test")...)), "", false},
		{"trailing dot", hello(sniExt("a.test.")), "", false},
		{"empty label", hello(sniExt("a..test")), "", false},
		{"bad char", hello(sniExt("a test")), "", false},
		{"nul", hello(sniExt("a\x00.test")), "", false},
		{"ext overrun", hello([]byte{0, 0, 0, 9, 0}), "", false},
		{"trailing bytes", append(hello(sniExt("a.test")), 0), "", false},
		{"odd suites", []byte{3, 3}, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sni, err := parseClientHello(tc.in)
			if (err == nil) != tc.ok || sni != tc.sni {
				t.Fatalf("sni %q err %v, want %q ok=%v", sni, err, tc.sni, tc.ok)
			}
		})
	}
}

func FuzzParseClientHello(f *testing.F) {
	// Real Go ClientHellos are in testdata/fuzz/FuzzParseClientHello (seeds must be
	// deterministic: generating them here would give each fuzz worker different seeds).
	f.Add([]byte{0x16, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		raw, sni, err := peekClientHello(iotest.HalfReader(bytes.NewReader(data)), nil)
		if len(raw) > len(data) || !bytes.Equal(raw, data[:len(raw)]) {
			t.Fatalf("replay bytes differ from input")
		}
		if err == nil {
			if sni != "" && !validHostName([]byte(sni)) {
				t.Fatalf("invalid name %q accepted", sni)
			}
			if sni != string(bytes.ToLower([]byte(sni))) {
				t.Fatalf("name %q not lower case", sni)
			}
		}
		// The body parser on its own, too.
		if len(data) > 4 {
			_, _ = parseClientHello(data[4:])
		}
	})
}
