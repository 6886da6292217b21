package inbound

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

var trustedLoopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}

// result is what the test server learned about one accepted connection.
type result struct {
	remote  string
	local   string
	payload string
	tlvs    []proxyproto.TLV
	err     error
}

// startServer accepts on a wrapped listener; each connection's goroutine runs Handshake and
// reads the payload until EOF (bounded by a deadline), then reports.
func startServer(t *testing.T, cfg Config) (addr string, results <-chan result, accepted <-chan struct{}) {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := Wrap(raw, cfg)
	out := make(chan result, 16)
	acc := make(chan struct{}, 16)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			acc <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				var r result
				if r.err = Handshake(c); r.err == nil {
					r.remote = c.RemoteAddr().String()
					r.local = c.LocalAddr().String()
					r.tlvs, r.err = TLVs(c)
					_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
					b, err := io.ReadAll(io.LimitReader(c, 1<<20))
					r.payload = string(b)
					if r.err == nil {
						r.err = err
					}
				}
				out <- r
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return raw.Addr().String(), out, acc
}

func dialFrom(t *testing.T, src, addr string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 2 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func wait[T any](t *testing.T, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatal("timed out")
		panic("unreachable")
	}
}

func header(t *testing.T, version byte, src, dst string, tlvs []proxyproto.TLV) []byte {
	t.Helper()
	s, d := net.TCPAddrFromAddrPort(netip.MustParseAddrPort(src)), net.TCPAddrFromAddrPort(netip.MustParseAddrPort(dst))
	h := proxyproto.HeaderProxyFromAddrs(version, s, d)
	if tlvs != nil {
		if err := h.SetTLVs(tlvs); err != nil {
			t.Fatal(err)
		}
	}
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestHeaders(t *testing.T) {
	addr, results, _ := startServer(t, Config{Trusted: trustedLoopback, Required: true, HeaderTimeout: 2 * time.Second})
	tlvs := []proxyproto.TLV{{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("www.example.test")}}
	long := strings.Repeat("x", 3*ReadBufferSize) // payload past the header buffer
	cases := []struct {
		name       string
		hdr        []byte
		wantRemote string
		wantLocal  string
		wantTLVs   int
	}{
		{"v1 ipv4", header(t, 1, "192.0.2.10:4711", "198.51.100.1:443", nil), "192.0.2.10:4711", "198.51.100.1:443", 0},
		{"v1 ipv6", header(t, 1, "[2001:db8::10]:4711", "[2001:db8::1]:443", nil), "[2001:db8::10]:4711", "[2001:db8::1]:443", 0},
		{"v2 ipv4", header(t, 2, "192.0.2.11:5000", "198.51.100.1:443", nil), "192.0.2.11:5000", "198.51.100.1:443", 0},
		{"v2 ipv6 tlv", header(t, 2, "[2001:db8::11]:5001", "[2001:db8::1]:443", tlvs), "[2001:db8::11]:5001", "[2001:db8::1]:443", 1},
	}
	for _, tc := range cases {
		for _, payload := range []string{"", "hello", long} {
			t.Run(fmt.Sprintf("%s/%d", tc.name, len(payload)), func(t *testing.T) {
				c := dialFrom(t, "127.0.0.1", addr)
				// Header and payload in one write: the payload lands in the header buffer.
				if _, err := c.Write(append(append([]byte{}, tc.hdr...), payload...)); err != nil {
					t.Fatal(err)
				}
				c.CloseWrite()
				r := wait(t, results)
				if r.err != nil {
					t.Fatal(r.err)
				}
				if r.remote != tc.wantRemote || r.local != tc.wantLocal {
					t.Errorf("remote %s local %s, want %s %s", r.remote, r.local, tc.wantRemote, tc.wantLocal)
				}
				if r.payload != payload {
					t.Errorf("payload %d bytes, want %d", len(r.payload), len(payload))
				}
				if len(r.tlvs) != tc.wantTLVs {
					t.Errorf("tlvs %v, want %d", r.tlvs, tc.wantTLVs)
				}
			})
		}
	}
}

func TestLocalCommandKeepsSocketAddress(t *testing.T) {
	addr, results, _ := startServer(t, Config{Trusted: trustedLoopback, Required: true})
	c := dialFrom(t, "127.0.0.1", addr)
	h := &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	if _, err := h.WriteTo(c); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	r := wait(t, results)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.remote != c.LocalAddr().String() {
		t.Errorf("remote %s, want socket peer %s", r.remote, c.LocalAddr())
	}
}

func TestRefused(t *testing.T) {
	addr, results, _ := startServer(t, Config{Trusted: trustedLoopback, Required: true, HeaderTimeout: 2 * time.Second})
	udp := &proxyproto.Header{Version: 2, Command: proxyproto.PROXY, TransportProtocol: proxyproto.UDPv4,
		SourceAddr: &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1}, DestinationAddr: &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 2}}
	udpBytes, err := udp.Format()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		data []byte
		want error
	}{
		{"missing header", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), proxyproto.ErrNoProxyProtocol},
		{"udp transport", udpBytes, ErrBadTransport},
		{"truncated v1", []byte("PROXY TCP4 192.0.2.1"), nil},
		{"garbage v2", append(append([]byte{}, proxyproto.SIGV2...), 0x21, 0x11, 0xff, 0xff), nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dialFrom(t, "127.0.0.1", addr)
			c.Write(tc.data)
			c.CloseWrite()
			r := wait(t, results)
			if r.err == nil {
				t.Fatalf("accepted: %+v", r)
			}
			if tc.want != nil && !errors.Is(r.err, tc.want) {
				t.Fatalf("err %v, want %v", r.err, tc.want)
			}
		})
	}
}

func TestUntrustedSourceClosedAndAcceptContinues(t *testing.T) {
	addr, results, accepted := startServer(t, Config{Trusted: trustedLoopback, Required: true})
	hdr := header(t, 1, "192.0.2.10:4711", "198.51.100.1:443", nil)
	for _, src := range []string{"127.0.0.2", "127.0.0.2", "127.0.0.1"} {
		c := dialFrom(t, src, addr)
		c.Write(append(hdr, "ping"...))
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(make([]byte, 1))
		if src == "127.0.0.2" {
			// Closed by the server without a byte.
			if n != 0 || err == nil || errors.Is(err, errTimeout) || isTimeout(err) {
				t.Fatalf("untrusted read: n=%d err=%v", n, err)
			}
		}
	}
	// Only the trusted one reached the application.
	wait(t, accepted)
	r := wait(t, results)
	if r.err != nil || r.remote != "192.0.2.10:4711" || r.payload != "ping" {
		t.Fatalf("trusted: %+v", r)
	}
	select {
	case <-accepted:
		t.Fatal("an untrusted connection was handed to the application")
	default:
	}
}

var errTimeout = errors.New("timeout")

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestSlowHeaderDoesNotStallAccept(t *testing.T) {
	const timeout = 300 * time.Millisecond
	addr, results, accepted := startServer(t, Config{Trusted: trustedLoopback, Required: true, HeaderTimeout: timeout})
	start := time.Now()
	slow := dialFrom(t, "127.0.0.1", addr)
	slow.Write(proxyproto.SIGV2[:8]) // part of a v2 signature, then silence
	wait(t, accepted)

	fast := dialFrom(t, "127.0.0.1", addr)
	fast.Write(append(header(t, 2, "192.0.2.7:7", "198.51.100.1:443", nil), "fast"...))
	fast.CloseWrite()
	wait(t, accepted)
	r := wait(t, results)
	if r.err != nil || r.payload != "fast" {
		t.Fatalf("fast conn: %+v: %v", r, r.err)
	}
	if d := time.Since(start); d >= timeout {
		t.Fatalf("fast conn served after %v: stalled behind the slow header", d)
	}
	r = wait(t, results)
	if !errors.Is(r.err, proxyproto.ErrNoProxyProtocol) {
		t.Fatalf("slow conn: %v", r.err)
	}
	if d := time.Since(start); d < timeout || d > timeout+2*time.Second {
		t.Fatalf("slow conn closed after %v, want ≈%v", d, timeout)
	}
	// The server closed it.
	slow.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := slow.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("slow conn still open: %v", err)
	}
}

func TestNotRequiredIsUntouched(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if ln := Wrap(raw, Config{Trusted: trustedLoopback}); ln != raw {
		t.Fatalf("Wrap without Required returned %T", ln)
	}
}

func TestTrustedPrefixForms(t *testing.T) {
	pol := policy([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32")})
	cases := []struct {
		addr string
		ok   bool
	}{
		{"10.1.2.3:1", true}, {"[::ffff:10.1.2.3]:1", true}, {"11.0.0.1:1", false},
		{"[2001:db8::5]:1", true}, {"[2001:db9::5]:1", false},
	}
	for _, tc := range cases {
		p, err := pol(proxyproto.ConnPolicyOptions{Upstream: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(tc.addr))})
		if got := err == nil && p == proxyproto.REQUIRE; got != tc.ok {
			t.Errorf("%s: policy %v err %v, want trusted=%v", tc.addr, p, err, tc.ok)
		}
		if err != nil && !errors.Is(err, proxyproto.ErrInvalidUpstream) {
			t.Errorf("%s: error %v must wrap ErrInvalidUpstream so Accept keeps listening", tc.addr, err)
		}
	}
	// A 4in6 trusted prefix matches plain IPv4 peers.
	w := Wrap(dummyListener{}, Config{Required: true, Trusted: []netip.Prefix{netip.MustParsePrefix("::ffff:10.0.0.0/104")}})
	p, err := w.(*proxyproto.Listener).ConnPolicy(proxyproto.ConnPolicyOptions{Upstream: &net.TCPAddr{IP: net.IPv4(10, 9, 9, 9), Port: 1}})
	if err != nil || p != proxyproto.REQUIRE {
		t.Errorf("4in6 prefix: %v %v", p, err)
	}
}

type dummyListener struct{ net.Listener }

// TestSocketAfterFirstRead pins the go-proxyproto buffering behaviour Socket documents.
func TestSocketAfterFirstRead(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := Wrap(raw, Config{Trusted: trustedLoopback, Required: true})
	defer ln.Close()
	for _, size := range []int{1, ReadBufferSize - 20, ReadBufferSize, 5000} {
		payload := bytes.Repeat([]byte("0123456789abcdef"), size/16+1)[:size]
		c := dialFrom(t, "127.0.0.1", raw.Addr().String())
		c.Write(append(header(t, 2, "192.0.2.1:1", "192.0.2.2:2", nil), payload...))
		c.CloseWrite()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if err := Handshake(s); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, ReadBufferSize)
		n, err := s.Read(buf)
		if err != nil || n == 0 {
			t.Fatal(n, err)
		}
		sock := Socket(s)
		if _, ok := sock.(*net.TCPConn); !ok {
			t.Fatalf("Socket returned %T", sock)
		}
		sock.SetReadDeadline(time.Now().Add(5 * time.Second))
		rest, err := io.ReadAll(sock)
		if err != nil {
			t.Fatal(err)
		}
		if got := append(buf[:n:n], rest...); !bytes.Equal(got, payload) {
			t.Fatalf("size %d: got %d bytes, mismatch", size, len(got))
		}
		s.Close()
	}
}

// TestCurlHAProxyProtocol is the real-peer check: curl writes the PROXY v1 header itself.
func TestCurlHAProxyProtocol(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl not installed")
	}
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := Wrap(raw, Config{Trusted: trustedLoopback, Required: true, HeaderTimeout: 2 * time.Second})
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "client=%s", r.RemoteAddr)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	go srv.Serve(ln)
	defer srv.Shutdown(context.Background())
	url := "http://" + raw.Addr().String() + "/"

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, curl, "-sS", "--max-time", "5", "--haproxy-protocol", url).CombinedOutput()
	if err != nil {
		t.Fatalf("trusted curl: %v: %s", err, out)
	}
	if !strings.HasPrefix(string(out), "client=127.0.0.1:") {
		t.Fatalf("trusted curl: %q", out)
	}
	// Without the header from a trusted source: refused.
	out, err = exec.CommandContext(ctx, curl, "-sS", "--max-time", "5", url).CombinedOutput()
	if err == nil {
		t.Fatalf("headerless curl served: %s", out)
	}
	// From an untrusted source, even with a header: closed before a byte.
	out, err = exec.CommandContext(ctx, curl, "-sS", "--max-time", "5", "--interface", "127.0.0.2", "--haproxy-protocol", url).CombinedOutput()
	if err == nil {
		t.Fatalf("untrusted curl served: %s", out)
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 28 { // 28 = timeout: must be closed, not stalled
		t.Fatalf("untrusted curl: %v: %s", err, out)
	}
}

// FuzzFirstBytes feeds arbitrary bytes as a trusted connection's first bytes: no panic, the
// header phase ends within the timeout, and at most a bounded amount is read.
func FuzzFirstBytes(f *testing.F) {
	f.Add([]byte("PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhello"))
	f.Add([]byte("PROXY TCP6 ::1 ::2 1 2\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add([]byte("PROXY TCP4 1.1.1.1 2.2.2.2 99999 2\r\n"))
	f.Add(append(append([]byte{}, proxyproto.SIGV2...), 0x21, 0x11, 0x00, 0x0c, 192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 2))
	f.Add(append(append([]byte{}, proxyproto.SIGV2...), 0x21, 0x21, 0xff, 0xff))
	f.Add(append(append([]byte{}, proxyproto.SIGV2...), 0x20, 0x00, 0x00, 0x00))
	f.Add([]byte("\x16\x03\x01\x00\x05hello"))
	f.Add([]byte{})

	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	ln := Wrap(raw, Config{Trusted: trustedLoopback, Required: true, HeaderTimeout: 500 * time.Millisecond})
	defer ln.Close()
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.Dial("tcp", raw.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		go func() {
			c.Write(data)
			c.(*net.TCPConn).CloseWrite()
		}()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		start := time.Now()
		err = Handshake(s)
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("header phase took %v", d)
		}
		if err != nil {
			return
		}
		_ = s.RemoteAddr().String()
		_ = s.LocalAddr().String()
		_, _ = TLVs(s)
		s.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _ := io.Copy(io.Discard, io.LimitReader(s, int64(len(data))+1))
		if n > int64(len(data)) {
			t.Fatalf("read %d bytes from %d sent", n, len(data))
		}
	})
}
