package backends

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"

	"github.com/fulcrum-lb/fulcrum/configs"
)

var (
	src4 = netip.MustParseAddrPort("192.0.2.10:51000")
	dst4 = netip.MustParseAddrPort("198.51.100.1:443")
	src6 = netip.MustParseAddrPort("[2001:db8::1]:51000")
	dst6 = netip.MustParseAddrPort("[2001:db8::2]:443")
)

func TestProxyV1(t *testing.T) {
	tests := []struct {
		name string
		pi   *ProxyInfo
		want string
	}{
		{"tcp4", &ProxyInfo{Src: src4, Dst: dst4}, "PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\n"},
		{"tcp6", &ProxyInfo{Src: src6, Dst: dst6}, "PROXY TCP6 2001:db8::1 2001:db8::2 51000 443\r\n"},
		{"4in6 unmapped", &ProxyInfo{Src: netip.MustParseAddrPort("[::ffff:192.0.2.10]:1"), Dst: netip.MustParseAddrPort("[::ffff:198.51.100.1]:2")},
			"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\r\n"},
		{"mixed families", &ProxyInfo{Src: src4, Dst: dst6}, "PROXY TCP6 ::ffff:192.0.2.10 2001:db8::2 51000 443\r\n"},
		{"nil", nil, "PROXY UNKNOWN\r\n"},
		{"no addresses", &ProxyInfo{}, "PROXY UNKNOWN\r\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := string(appendProxyV1(nil, tc.pi))
			if got != tc.want {
				t.Fatalf("got %q want %q", got, tc.want)
			}
			h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader([]byte(got))))
			if err != nil {
				t.Fatalf("go-proxyproto rejects it: %v", err)
			}
			if h.Version != 1 {
				t.Errorf("version %d", h.Version)
			}
		})
	}
}

func TestProxyV2Bytes(t *testing.T) {
	sig := []byte("\r\n\r\n\x00\r\nQUIT\n")
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	tests := []struct {
		name string
		pi   *ProxyInfo
		want []byte
	}{
		{"local", nil, cat(sig, []byte{0x20, 0x00, 0, 0})},
		{"tcp4 no tlv", &ProxyInfo{Src: src4, Dst: dst4}, cat(sig,
			[]byte{0x21, 0x11, 0, 12},
			[]byte{192, 0, 2, 10}, []byte{198, 51, 100, 1},
			[]byte{0xc7, 0x38}, []byte{0x01, 0xbb})},
		{"tcp6 no tlv", &ProxyInfo{Src: src6, Dst: dst6}, cat(sig,
			[]byte{0x21, 0x21, 0, 36},
			[]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
			[]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2},
			[]byte{0xc7, 0x38}, []byte{0x01, 0xbb})},
		{"unspec with alpn", &ProxyInfo{ALPN: "h2"}, cat(sig,
			[]byte{0x20, 0x00, 0, 5},
			[]byte{0x01, 0, 2}, []byte("h2"))},
		{"tcp4 all tlvs", &ProxyInfo{Src: src4, Dst: dst4, ALPN: "h2", SNI: "www.example.test",
			HasTLS: true, TLSVersion: tls.VersionTLS13, Cipher: tls.TLS_AES_128_GCM_SHA256, ClientCertVerified: true},
			cat(sig,
				[]byte{0x21, 0x11, 0, byte(12 + 5 + 19 + 3 + 5 + 10 + 25)},
				[]byte{192, 0, 2, 10}, []byte{198, 51, 100, 1}, []byte{0xc7, 0x38}, []byte{0x01, 0xbb},
				[]byte{0x01, 0, 2}, []byte("h2"),
				[]byte{0x02, 0, 16}, []byte("www.example.test"),
				[]byte{0x20, 0, 5 + 10 + 25},
				[]byte{0x07, 0, 0, 0, 0}, // client SSL|CERT_CONN|CERT_SESS, verify 0
				[]byte{0x21, 0, 7}, []byte("TLSv1.3"),
				[]byte{0x23, 0, 22}, []byte("TLS_AES_128_GCM_SHA256"))},
		{"tls 1.2 unverified", &ProxyInfo{Src: src4, Dst: dst4, HasTLS: true, TLSVersion: tls.VersionTLS12,
			Cipher: tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
			cat(sig,
				[]byte{0x21, 0x11, 0, byte(12 + 3 + 5 + 10 + 30)},
				[]byte{192, 0, 2, 10}, []byte{198, 51, 100, 1}, []byte{0xc7, 0x38}, []byte{0x01, 0xbb},
				[]byte{0x20, 0, 5 + 10 + 30},
				[]byte{0x01, 0, 0, 0, 1},
				[]byte{0x21, 0, 7}, []byte("TLSv1.2"),
				[]byte{0x23, 0, 27}, []byte("ECDHE-RSA-AES128-GCM-SHA256"))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := appendProxyV2([]byte("prefix"), tc.pi)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(got, []byte("prefix")) {
				t.Fatal("dst prefix lost")
			}
			got = got[len("prefix"):]
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("got\n% x\nwant\n% x", got, tc.want)
			}
			checkDecoded(t, got, tc.pi)
		})
	}
}

// checkDecoded cross-checks a v2 header with go-proxyproto's strict decoder.
func checkDecoded(t *testing.T, hdr []byte, pi *ProxyInfo) {
	t.Helper()
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(hdr)))
	if err != nil {
		t.Fatalf("go-proxyproto rejects it: %v", err)
	}
	if _, _, _, ok := pi.addrs(); !ok {
		if h.Command != proxyproto.LOCAL {
			t.Errorf("command %v, want LOCAL", h.Command)
		}
		if pi == nil {
			return
		}
	}
	if src, dst, _, ok := pi.addrs(); ok {
		s, d, ok := h.TCPAddrs()
		unmap := func(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }
		if !ok || unmap(s.AddrPort()) != unmap(src) || unmap(d.AddrPort()) != unmap(dst) {
			t.Errorf("addresses %v %v, want %v %v", h.SourceAddr, h.DestinationAddr, src, dst)
		}
	}
	tlvs, err := h.TLVs()
	if err != nil {
		t.Fatalf("TLVs: %v", err)
	}
	var alpn, sni string
	for _, v := range tlvs {
		switch v.Type {
		case proxyproto.PP2_TYPE_ALPN:
			alpn = string(v.Value)
		case proxyproto.PP2_TYPE_AUTHORITY:
			sni = string(v.Value)
		}
	}
	if alpn != pi.ALPN || sni != pi.SNI {
		t.Errorf("ALPN %q SNI %q, want %q %q", alpn, sni, pi.ALPN, pi.SNI)
	}
	ssl, found := tlvparse.FindSSL(tlvs)
	if found != pi.HasTLS {
		t.Fatalf("SSL TLV present=%v, want %v", found, pi.HasTLS)
	}
	if !found {
		return
	}
	if !ssl.ClientSSL() || ssl.Verified() != pi.ClientCertVerified {
		t.Errorf("ssl client %#x verify %d", ssl.Client, ssl.Verify)
	}
	if v, _ := ssl.SSLVersion(); v != tlsVersionName(pi.TLSVersion) && (pi.TLSVersion != 0 || v != "unknown") {
		t.Errorf("version %q", v)
	}
	if c, _ := ssl.SSLCipher(); c != cipherName(pi.Cipher) {
		t.Errorf("cipher %q", c)
	}
}

func FuzzProxyV2(f *testing.F) {
	f.Add([]byte{192, 0, 2, 1}, []byte{10, 0, 0, 1}, uint16(1), uint16(2), "h2", "a.test", true, uint16(tls.VersionTLS13), uint16(tls.TLS_AES_256_GCM_SHA384), true)
	f.Add([]byte{}, []byte{}, uint16(0), uint16(0), "", "", false, uint16(0), uint16(0), false)
	f.Fuzz(func(t *testing.T, s, d []byte, sp, dp uint16, alpn, sni string, hasTLS bool, ver, cipher uint16, verified bool) {
		pi := &ProxyInfo{ALPN: alpn, SNI: sni, HasTLS: hasTLS, TLSVersion: ver, Cipher: cipher, ClientCertVerified: verified}
		if a, ok := netip.AddrFromSlice(s); ok {
			pi.Src = netip.AddrPortFrom(a, sp)
		}
		if a, ok := netip.AddrFromSlice(d); ok {
			pi.Dst = netip.AddrPortFrom(a, dp)
		}
		hdr, err := appendProxyV2(nil, pi)
		if err != nil {
			if len(alpn)+len(sni) < 60000 {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		if len(alpn) > 0xffff || len(sni) > 0xffff {
			return // truncated TLV values; length overflow reported elsewhere
		}
		checkDecoded(t, hdr, pi)
		v1 := appendProxyV1(nil, pi)
		if _, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(v1))); err != nil {
			t.Fatalf("v1 %q rejected: %v", v1, err)
		}
	})
}

func TestDialTCPWithProxyV2(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		got <- b
	}()
	r := newReg(t)
	gc := configs.TargetGroup{Name: "db", Protocol: "tcp", ProxyProtocol: "v2",
		HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets:     []configs.Target{{Address: ln.Addr().String(), Weight: 1}}}
	g := build(t, r, conf(gc)).Group("db")
	pi := &ProxyInfo{Src: src4, Dst: dst4, ALPN: "postgresql"}
	c, err := g.Dial(context.Background(), g.Pick(netip.Addr{}, nil), pi)
	if err != nil {
		t.Fatal(err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		t.Fatalf("Dial returned %T, want *net.TCPConn", c)
	}
	_, _ = tc.Write([]byte("hello"))
	_ = tc.CloseWrite()
	b := <-got
	tc.Close()
	want, _ := appendProxyV2(nil, pi)
	want = append(want, "hello"...)
	if !bytes.Equal(b, want) {
		t.Fatalf("target read\n% x\nwant\n% x", b, want)
	}
	if g.Transport() != nil {
		t.Error("tcp group has an HTTP transport")
	}
}

func TestDialTLSWithProxyV1(t *testing.T) {
	p := newPKI(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		hdr  string
		data string
		err  error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReader(c)
		line, err := br.ReadString('\n') // the PROXY line precedes the ClientHello
		if err != nil {
			got <- result{err: err}
			return
		}
		tc := tls.Server(&bufConn{Conn: c, r: br}, p.serverTLS())
		data, err := io.ReadAll(io.LimitReader(tc, 4))
		got <- result{hdr: line, data: string(data), err: err}
	}()
	r := newReg(t)
	gc := configs.TargetGroup{Name: "tls", Protocol: "tls", ProxyProtocol: "v1",
		TLS:         &configs.BackendTLS{CAFile: p.caFile},
		HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets:     []configs.Target{{Address: ln.Addr().String(), Weight: 1}}}
	g := build(t, r, conf(gc)).Group("tls")
	c, err := g.Dial(context.Background(), g.Targets()[0], &ProxyInfo{Src: src4, Dst: dst4})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*tls.Conn); !ok {
		t.Fatalf("Dial returned %T, want *tls.Conn", c)
	}
	_, _ = c.Write([]byte("ping"))
	res := <-got
	if res.err != nil || res.hdr != "PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\n" || res.data != "ping" {
		t.Fatalf("target saw %+v", res)
	}
}

type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func TestDialFailureReportsPassive(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	address := ln.Addr().String()
	ln.Close() // nothing listens: connection refused
	r := newReg(t, withPassiveHealth(2, time.Minute))
	gc := configs.TargetGroup{Name: "db", Protocol: "tcp", HealthCheck: &configs.HealthCheck{Disabled: true},
		Targets: []configs.Target{{Address: address, Weight: 1}, {Address: "127.0.0.1:1", Weight: 1}}}
	g := build(t, r, conf(gc)).Group("db")
	tg := g.Targets()[0]
	for range 2 {
		if _, err := g.Dial(context.Background(), tg, nil); err == nil {
			t.Fatal("dial to a closed port succeeded")
		}
	}
	if tg.Healthy() {
		t.Error("refused dials did not eject the target")
	}
	if _, err := build(t, r, conf(httpsGroup("127.0.0.1:1", nil, false))).Group("secure").Dial(context.Background(), tg, nil); err != errNotLayer4 {
		t.Errorf("Dial on an https group: %v", err)
	}
}
