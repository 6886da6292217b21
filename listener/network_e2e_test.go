package listener

// End-to-end tests of the layer-4 listeners (network tcp/tls, classic tcp/ssl) through the full
// runtime: real PROXY-protocol peers (nginx, HAProxy, curl) checking our outbound and inbound
// headers, a strict PROXY v2 decoder checking every byte we send, SNI routing of TLS
// pass-through, TLS offload and re-encryption, reloads that keep streams, and draining.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// ---------------------------------------------------------------------------------------------
// Addresses and peers

// haveIPv6 reports whether ::1 can be bound on this machine.
func haveIPv6() bool {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// peerBinary finds an interoperability peer (nginx, haproxy, curl). Missing, it skips the test
// on a developer machine and fails it in CI, where `make test` installs it.
func peerBinary(t testing.TB, name string) string {
	t.Helper()
	if p := lookPeer(name); p != "" {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is not installed (CI must install it: see make test)", name)
	}
	t.Skipf("%s is not installed", name)
	return ""
}

// lookPeer is the path of name, on PATH or in the sbin directories a non-root PATH may lack.
func lookPeer(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, d := range []string{"/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"} {
		if p := filepath.Join(d, name); isExecutable(p) {
			return p
		}
	}
	return ""
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// startPeer runs an external server in dir until the test ends, and returns once addr accepts
// connections. The process is stopped by its own PID.
func startPeer(t testing.TB, dir, addr, bin string, args ...string) {
	t.Helper()
	logPath := filepath.Join(dir, "peer.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	// No readiness signal from the peer but its socket: poll it, bounded.
	for i := 0; ; i++ {
		select {
		case <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("%s exited at start:\n%s", bin, b)
		default:
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		if i >= 200 {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("%s did not listen on %s within 10 s: %v\n%s", bin, addr, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startNginxPP runs nginx with an HTTP server that requires a PROXY header and answers
// "$proxy_protocol_addr $proxy_protocol_port".
func startNginxPP(t testing.TB) string {
	t.Helper()
	bin := peerBinary(t, "nginx")
	dir := t.TempDir()
	addr := configtest.Addr(t)
	conf := fmt.Sprintf(`master_process off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 256; }
http {
	access_log off;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen %[2]s proxy_protocol;
		default_type text/plain;
		location / { return 200 "$proxy_protocol_addr $proxy_protocol_port"; }
	}
}
`, dir, addr)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	startPeer(t, dir, addr, bin, "-c", path, "-p", dir, "-e", filepath.Join(dir, "error.log"), "-g", "daemon off;")
	return addr
}

// startHAProxyPP runs HAProxy with a frontend that requires a PROXY header (accept-proxy) and
// answers "%[src] %[src_port]".
func startHAProxyPP(t testing.TB) string {
	t.Helper()
	bin := peerBinary(t, "haproxy")
	dir := t.TempDir()
	addr := configtest.Addr(t)
	conf := fmt.Sprintf(`global
	pidfile %s/haproxy.pid
defaults
	mode http
	timeout connect 5s
	timeout client 10s
	timeout server 10s
frontend fe
	bind %s accept-proxy
	http-request return status 200 content-type text/plain lf-string "%%[src] %%[src_port]"
`, dir, addr)
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	startPeer(t, dir, addr, bin, "-f", path, "-db")
	return addr
}

// ---------------------------------------------------------------------------------------------
// Strict PROXY protocol decoders (HAProxy and nginx are lenient; these are not)

const pp2Signature = "\r\n\r\n\x00\r\nQUIT\n"

type pp2TLV struct {
	Type  byte
	Value []byte
}

// pp2Header is a decoded PROXY v2 header.
type pp2Header struct {
	Family   byte // 0x11 TCP over IPv4, 0x21 TCP over IPv6
	Src, Dst netip.AddrPort
	TLVs     []pp2TLV
	Raw      []byte
}

// readPP2 reads one PROXY v2 header with the PROXY command for TCP over IPv4 or IPv6. Every
// length must add up exactly; TLVs must be well formed.
func readPP2(r io.Reader) (*pp2Header, error) {
	fixed := make([]byte, 16)
	if _, err := io.ReadFull(r, fixed); err != nil {
		return nil, fmt.Errorf("v2 fixed part: %w", err)
	}
	if string(fixed[:12]) != pp2Signature {
		return nil, fmt.Errorf("v2 signature %q", fixed[:12])
	}
	if fixed[12] != 0x21 {
		return nil, fmt.Errorf("v2 version/command 0x%02x, want 0x21 (v2, PROXY)", fixed[12])
	}
	h := &pp2Header{Family: fixed[13]}
	body := make([]byte, binary.BigEndian.Uint16(fixed[14:]))
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("v2 body of %d bytes: %w", len(body), err)
	}
	h.Raw = append(fixed, body...)
	var alen int
	switch h.Family {
	case 0x11:
		alen = 12
	case 0x21:
		alen = 36
	default:
		return nil, fmt.Errorf("v2 family/transport 0x%02x, want 0x11 or 0x21", h.Family)
	}
	if len(body) < alen {
		return nil, fmt.Errorf("v2 length %d shorter than the addresses (%d)", len(body), alen)
	}
	al := alen/2 - 2
	src, _ := netip.AddrFromSlice(body[:al])
	dst, _ := netip.AddrFromSlice(body[al : 2*al])
	h.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(body[2*al:]))
	h.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(body[2*al+2:]))
	tlvs, err := parseTLVs(body[alen:])
	if err != nil {
		return nil, err
	}
	h.TLVs = tlvs
	return h, nil
}

func parseTLVs(b []byte) ([]pp2TLV, error) {
	var out []pp2TLV
	for len(b) > 0 {
		if len(b) < 3 {
			return nil, fmt.Errorf("v2 TLV: %d trailing bytes", len(b))
		}
		n := int(binary.BigEndian.Uint16(b[1:3]))
		if len(b)-3 < n {
			return nil, fmt.Errorf("v2 TLV 0x%02x: length %d exceeds the %d bytes left", b[0], n, len(b)-3)
		}
		out = append(out, pp2TLV{Type: b[0], Value: b[3 : 3+n]})
		b = b[3+n:]
	}
	return out, nil
}

// pp2SSL is the decoded PP2_TYPE_SSL value.
type pp2SSL struct {
	Client byte
	Verify uint32
	Subs   []pp2TLV
}

func parseSSLTLV(v []byte) (*pp2SSL, error) {
	if len(v) < 5 {
		return nil, fmt.Errorf("SSL TLV of %d bytes, want >= 5", len(v))
	}
	subs, err := parseTLVs(v[5:])
	if err != nil {
		return nil, fmt.Errorf("SSL sub-TLVs: %w", err)
	}
	return &pp2SSL{Client: v[0], Verify: binary.BigEndian.Uint32(v[1:5]), Subs: subs}, nil
}

// pp2Expect is what a v2 header must say: exactly these TLVs (no others, no duplicates).
type pp2Expect struct {
	Src, Dst  netip.AddrPort
	ALPN, SNI string // "" = TLV absent
	SSL       bool   // the SSL TLV is present
	Client    byte
	Verified  bool // verify == 0
	Version   string
	Cipher    string
}

// check compares every field of h with e.
func (h *pp2Header) check(e pp2Expect) error {
	var errs []error
	fam := byte(0x11)
	if e.Src.Addr().Is6() {
		fam = 0x21
	}
	if h.Family != fam {
		errs = append(errs, fmt.Errorf("family 0x%02x, want 0x%02x", h.Family, fam))
	}
	if h.Src != e.Src {
		errs = append(errs, fmt.Errorf("source %v, want %v", h.Src, e.Src))
	}
	if h.Dst != e.Dst {
		errs = append(errs, fmt.Errorf("destination %v, want %v", h.Dst, e.Dst))
	}
	seen := map[byte]bool{}
	for _, tlv := range h.TLVs {
		if seen[tlv.Type] {
			errs = append(errs, fmt.Errorf("duplicate TLV 0x%02x", tlv.Type))
		}
		seen[tlv.Type] = true
		switch tlv.Type {
		case 0x01:
			if string(tlv.Value) != e.ALPN {
				errs = append(errs, fmt.Errorf("ALPN TLV %q, want %q", tlv.Value, e.ALPN))
			}
		case 0x02:
			if string(tlv.Value) != e.SNI {
				errs = append(errs, fmt.Errorf("authority TLV %q, want %q", tlv.Value, e.SNI))
			}
		case 0x20:
			if !e.SSL {
				errs = append(errs, errors.New("unexpected SSL TLV"))
				continue
			}
			ssl, err := parseSSLTLV(tlv.Value)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if ssl.Client != e.Client {
				errs = append(errs, fmt.Errorf("SSL client flags 0x%02x, want 0x%02x", ssl.Client, e.Client))
			}
			if (ssl.Verify == 0) != e.Verified {
				errs = append(errs, fmt.Errorf("SSL verify %d, want verified=%v (0 iff a client certificate was verified)", ssl.Verify, e.Verified))
			}
			subSeen := map[byte]bool{}
			for _, s := range ssl.Subs {
				if subSeen[s.Type] {
					errs = append(errs, fmt.Errorf("duplicate SSL sub-TLV 0x%02x", s.Type))
				}
				subSeen[s.Type] = true
				switch s.Type {
				case 0x21:
					if string(s.Value) != e.Version {
						errs = append(errs, fmt.Errorf("SSL version sub-TLV %q, want %q", s.Value, e.Version))
					}
				case 0x23:
					if string(s.Value) != e.Cipher {
						errs = append(errs, fmt.Errorf("SSL cipher sub-TLV %q, want %q", s.Value, e.Cipher))
					}
				default:
					errs = append(errs, fmt.Errorf("unexpected SSL sub-TLV 0x%02x %q", s.Type, s.Value))
				}
			}
			if !subSeen[0x21] || !subSeen[0x23] {
				errs = append(errs, fmt.Errorf("SSL sub-TLVs version (0x21) and cipher (0x23) required, got %v", subSeen))
			}
		default:
			errs = append(errs, fmt.Errorf("unexpected TLV 0x%02x %q", tlv.Type, tlv.Value))
		}
	}
	if e.ALPN != "" && !seen[0x01] {
		errs = append(errs, errors.New("ALPN TLV missing"))
	}
	if e.SNI != "" && !seen[0x02] {
		errs = append(errs, errors.New("authority TLV missing"))
	}
	if e.SSL && !seen[0x20] {
		errs = append(errs, errors.New("SSL TLV missing"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w\nheader: % x", err, h.Raw)
	}
	return nil
}

// readPP1 reads one PROXY v1 header strictly: "PROXY TCP4|TCP6 src dst sport dport\r\n" with
// canonical addresses and ports, at most 107 bytes.
func readPP1(r *bufio.Reader) (src, dst netip.AddrPort, err error) {
	var line []byte
	for len(line) < 107 {
		b, err := r.ReadByte()
		if err != nil {
			return src, dst, fmt.Errorf("v1 header: %w", err)
		}
		line = append(line, b)
		if bytes.HasSuffix(line, []byte("\r\n")) {
			break
		}
	}
	if !bytes.HasSuffix(line, []byte("\r\n")) {
		return src, dst, fmt.Errorf("v1 header longer than 107 bytes: %q", line)
	}
	f := strings.Split(strings.TrimSuffix(string(line), "\r\n"), " ")
	if len(f) != 6 || f[0] != "PROXY" || (f[1] != "TCP4" && f[1] != "TCP6") {
		return src, dst, fmt.Errorf("v1 header %q", line)
	}
	var ap [2]netip.AddrPort
	for i := range 2 {
		a, err := netip.ParseAddr(f[2+i])
		if err != nil || a.String() != f[2+i] || a.Is4() != (f[1] == "TCP4") || a.Zone() != "" {
			return src, dst, fmt.Errorf("v1 header address %q (%s): not canonical", f[2+i], f[1])
		}
		p, err := strconv.Atoi(f[4+i])
		if err != nil || p < 0 || p > 65535 || strconv.Itoa(p) != f[4+i] {
			return src, dst, fmt.Errorf("v1 header port %q", f[4+i])
		}
		ap[i] = netip.AddrPortFrom(a, uint16(p))
	}
	return ap[0], ap[1], nil
}

// ppSeen is what the strict back end decoded from one connection.
type ppSeen struct {
	v2       *pp2Header
	src, dst netip.AddrPort
	err      error
}

// ppBackend is a plain TCP back end that decodes a PROXY header of the given version strictly,
// reports it on the returned channel, then answers one HTTP request with "SRC-IP SRC-PORT" from
// the header (the same answer the nginx and HAProxy peers give).
func ppBackend(t testing.TB, version int) (string, chan ppSeen) {
	t.Helper()
	seen := make(chan ppSeen, 64)
	addr := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		br := bufio.NewReader(c)
		var s ppSeen
		if version == 1 {
			s.src, s.dst, s.err = readPP1(br)
		} else {
			s.v2, s.err = readPP2(br)
			if s.v2 != nil {
				s.src, s.dst = s.v2.Src, s.v2.Dst
			}
		}
		select {
		case seen <- s:
		default: // the test is not reading: never block a back end
		}
		if s.err != nil {
			return
		}
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		body := fmt.Sprintf("%s %d", s.src.Addr(), s.src.Port())
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
	})
	return addr, seen
}

func nextSeen(t testing.TB, ch chan ppSeen) ppSeen {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("the back end saw no connection")
		return ppSeen{}
	}
}

func drainSeen(ch chan ppSeen) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}

// ---------------------------------------------------------------------------------------------
// Plain and TLS back ends, clients

// serveTCP accepts on addr until the test ends and runs handle for each connection (closed
// afterwards, with a 30 s deadline so nothing outlives a stuck test).
func serveTCP(t testing.TB, addr string, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return serveListener(t, ln, handle)
}

func serveListener(t testing.TB, ln net.Listener, handle func(net.Conn)) string {
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					c.Close()
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
				}()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// lineEcho answers each line with "NAME:line".
func lineEcho(name string) func(net.Conn) {
	return func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if _, err := io.WriteString(c, name+":"+line); err != nil {
				return
			}
		}
	}
}

// tlsEchoBackend is a TLS back end that echoes lines prefixed with its name; cert is read at
// each handshake (it may be set after the back end starts).
func tlsEchoBackend(t testing.TB, name string, cert *atomic.Pointer[tls.Certificate]) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		if c := cert.Load(); c != nil {
			return c, nil
		}
		return nil, errors.New("no certificate yet")
	}}
	return serveListener(t, tls.NewListener(ln, cfg), lineEcho(name))
}

// leaf is a server certificate for names from ca, its chain holding ca.
func leaf(t testing.TB, ca *configtest.CA, names ...string) *tls.Certificate {
	t.Helper()
	c := ca.Issue(t, names, x509.ExtKeyUsageServerAuth)
	return &c
}

// authorityLeaf has the runtime's authority sign a fresh key for names.
func authorityLeaf(t testing.TB, rt *Runtime, authority string, usage certs.Usage, names ...string) *tls.Certificate {
	t.Helper()
	a := rt.Certs().Authority(authority)
	if a == nil {
		t.Fatalf("authority %q not loaded", authority)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := a.Sign(&key.PublicKey, names, time.Hour, usage)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// dialFrom opens a TCP connection to addr from the loopback address src (port chosen by the
// kernel), with a deadline for the whole exchange.
func dialFrom(t testing.TB, src, addr string) (net.Conn, error) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(15 * time.Second))
	return c, nil
}

// exchange describes one HTTP request through a listener.
type exchange struct {
	src    string      // client source address
	addr   string      // listener address
	pre    []byte      // written before anything else (an inbound PROXY header)
	tls    *tls.Config // client TLS over the connection (after pre)
	local  netip.AddrPort
	state  *tls.ConnectionState
	body   string
	status int
}

// do sends "GET /" and reads the response.
func (x *exchange) do(t testing.TB) error {
	t.Helper()
	raw, err := dialFrom(t, x.src, x.addr)
	if err != nil {
		return err
	}
	defer raw.Close()
	x.local = raw.LocalAddr().(*net.TCPAddr).AddrPort()
	x.local = netip.AddrPortFrom(x.local.Addr().Unmap(), x.local.Port())
	if len(x.pre) > 0 {
		if _, err := raw.Write(x.pre); err != nil {
			return err
		}
	}
	var c net.Conn = raw
	if x.tls != nil {
		tc := tls.Client(raw, x.tls)
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("client TLS handshake: %w", err)
		}
		cs := tc.ConnectionState()
		x.state = &cs
		c = tc
	}
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: e2e.test\r\nConnection: close\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return fmt.Errorf("response: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("response body: %w", err)
	}
	x.status, x.body = resp.StatusCode, string(b)
	return nil
}

func addrPortString(ap netip.AddrPort) string { return fmt.Sprintf("%s %d", ap.Addr(), ap.Port()) }

func mustAddrPort(t testing.TB, s string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// ---------------------------------------------------------------------------------------------
// 1. Real peers verify our outbound PROXY headers

// TestPROXYHeadersVerifiedByPeers: through network tcp listeners (groups with proxy_protocol v1
// and v2) and classic tcp listeners (proxy_protocol = true: v1), nginx and HAProxy back ends
// report the client's real address and port, for IPv4 (two source addresses) and IPv6.
func TestPROXYHeadersVerifiedByPeers(t *testing.T) {
	type peer struct{ name, addr string }
	var peers []peer
	for _, p := range []struct {
		name  string
		start func(testing.TB) string
	}{{"nginx", startNginxPP}, {"haproxy", startHAProxyPP}} {
		// One missing peer (outside CI) skips its cases, not the other's.
		if lookPeer(p.name) == "" && os.Getenv("CI") == "" {
			t.Logf("%s is not installed: its cases are skipped", p.name)
			continue
		}
		peers = append(peers, peer{p.name, p.start(t)})
	}
	if len(peers) == 0 {
		t.Skip("neither nginx nor haproxy is installed")
	}
	v6 := haveIPv6()
	families := []string{"ipv4"}
	if v6 {
		families = append(families, "ipv6")
	}
	dir := t.TempDir()
	text := header(dir)
	listeners := map[string]string{} // name -> address
	for _, p := range peers {
		for _, v := range []string{"v1", "v2"} {
			text += fmt.Sprintf(`
[[target_groups]]
name = "%s-%s"
protocol = "tcp"
targets = [%q]
proxy_protocol = %q
health_check = { disabled = true }
`, p.name, v, p.addr, v)
		}
		for _, fam := range families {
			for _, kind := range []string{"network-v1", "network-v2", "classic"} {
				name := fmt.Sprintf("%s-%s-%s", p.name, kind, fam)
				addr := configtest.Addr(t)
				if fam == "ipv6" {
					addr = configtest.AddrOn(t, "tcp6", "::1")
				}
				listeners[name] = addr
				if kind == "classic" {
					text += fmt.Sprintf(`
[[listeners]]
name = %q
style = "classic"
protocol = "tcp"
address = %q
backend_protocol = "tcp"
instances = [%q]
proxy_protocol = true
`, name, addr, p.addr)
				} else {
					text += fmt.Sprintf(`
[[listeners]]
name = %q
style = "network"
protocol = "tcp"
address = %q
forward = "%s-%s"
`, name, addr, p.name, strings.TrimPrefix(kind, "network-"))
				}
			}
		}
	}
	startRuntime(t, loadConfig(t, dir, text), nil)

	for _, p := range peers {
		for _, fam := range families {
			sources := []string{"127.0.0.1", "127.0.0.2"}
			if fam == "ipv6" {
				sources = []string{"::1"}
			}
			for _, kind := range []string{"network-v1", "network-v2", "classic"} {
				name := fmt.Sprintf("%s-%s-%s", p.name, kind, fam)
				for _, src := range sources {
					t.Run(name+"/from="+src, func(t *testing.T) {
						x := &exchange{src: src, addr: listeners[name]}
						if err := x.do(t); err != nil {
							t.Fatal(err)
						}
						if x.status != 200 || x.body != addrPortString(x.local) {
							t.Fatalf("%s answered %d %q, want 200 %q (the client's own address)", p.name, x.status, x.body, addrPortString(x.local))
						}
					})
				}
			}
		}
	}
}

// ---------------------------------------------------------------------------------------------
// 1b. A strict decoder checks every byte of the v2 header, TLVs included

// opensslCipher is the OpenSSL spelling of the suites our policies allow (what HAProxy puts in
// PP2_SUBTYPE_SSL_CIPHER); TLS 1.3 names are the IANA ones.
var opensslCipher = map[uint16]string{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256:       "ECDHE-ECDSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384:       "ECDHE-ECDSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256:         "ECDHE-RSA-AES128-GCM-SHA256",
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384:         "ECDHE-RSA-AES256-GCM-SHA384",
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256: "ECDHE-ECDSA-CHACHA20-POLY1305",
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256:   "ECDHE-RSA-CHACHA20-POLY1305",
	tls.TLS_AES_128_GCM_SHA256:                        "TLS_AES_128_GCM_SHA256",
	tls.TLS_AES_256_GCM_SHA384:                        "TLS_AES_256_GCM_SHA384",
	tls.TLS_CHACHA20_POLY1305_SHA256:                  "TLS_CHACHA20_POLY1305_SHA256",
}

var opensslVersion = map[uint16]string{tls.VersionTLS12: "TLSv1.2", tls.VersionTLS13: "TLSv1.3"}

// TestTLSListenerPROXYv2Strict: a network tls listener terminating TLS with an authority-issued
// certificate forwards to a tcp group with proxy_protocol v2; a strict decoder checks the
// signature, version/command, family, addresses, ports and the TLVs ALPN, authority (SNI) and
// SSL (client flags, verify, version and cipher sub-TLVs). tcp listeners (v4, v6) send the
// same header without TLVs.
func TestTLSListenerPROXYv2Strict(t *testing.T) {
	dir := t.TempDir()
	be, seen := ppBackend(t, 2)
	tlsAddr, mtlsAddr, tcpAddr := configtest.Addr(t), configtest.Addr(t), configtest.Addr(t)
	tcp6Addr := ""
	if haveIPv6() {
		tcp6Addr = configtest.AddrOn(t, "tcp6", "::1")
	}
	text := header(dir) + fmt.Sprintf(`
[[authorities]]
name = "internal"

[[certificates]]
name = "edge"
domains = ["edge.example.test"]
authority = "internal"

[[target_groups]]
name = "raw"
protocol = "tcp"
targets = [%q]
proxy_protocol = "v2"
health_check = { disabled = true }

[[listeners]]
name = "tls-edge"
style = "network"
protocol = "tls"
address = %q
certificates = ["edge"]
alpn_policy = "HTTP2Preferred"
forward = "raw"

[[listeners]]
name = "tls-mtls"
style = "network"
protocol = "tls"
address = %q
certificates = ["edge"]
client_auth = { mode = "verify", authority = "internal" }
forward = "raw"

[[listeners]]
name = "tcp4"
style = "network"
protocol = "tcp"
address = %q
forward = "raw"
`, be, tlsAddr, mtlsAddr, tcpAddr)
	if tcp6Addr != "" {
		text += fmt.Sprintf(`
[[listeners]]
name = "tcp6"
style = "network"
protocol = "tcp"
address = %q
forward = "raw"
`, tcp6Addr)
	}
	rt := startRuntime(t, loadConfig(t, dir, text), nil)
	roots := rt.Certs().Authority("internal").Pool()
	clientCert := authorityLeaf(t, rt, "internal", certs.UsageClient, "client.example.test")

	cases := []struct {
		name     string
		addr     string
		src      string
		tls      *tls.Config
		alpn     string
		verified bool
	}{
		{name: "tls13-h2", addr: tlsAddr, src: "127.0.0.1", alpn: "h2",
			tls: &tls.Config{ServerName: "edge.example.test", RootCAs: roots, NextProtos: []string{"h2", "http/1.1"}}},
		{name: "tls13-http1-from-127.0.0.2", addr: tlsAddr, src: "127.0.0.2", alpn: "http/1.1",
			tls: &tls.Config{ServerName: "edge.example.test", RootCAs: roots, NextProtos: []string{"http/1.1"}}},
		{name: "tls12-no-alpn", addr: tlsAddr, src: "127.0.0.1",
			tls: &tls.Config{ServerName: "edge.example.test", RootCAs: roots, MaxVersion: tls.VersionTLS12}},
		{name: "mtls-verified-client", addr: mtlsAddr, src: "127.0.0.1", verified: true,
			tls: &tls.Config{ServerName: "edge.example.test", RootCAs: roots, Certificates: []tls.Certificate{*clientCert}}},
		{name: "tcp-ipv4", addr: tcpAddr, src: "127.0.0.3"},
		{name: "tcp-ipv6", addr: tcp6Addr, src: "::1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.addr == "" {
				t.Skip("no IPv6 loopback")
			}
			drainSeen(seen)
			x := &exchange{src: tc.src, addr: tc.addr, tls: tc.tls}
			if err := x.do(t); err != nil {
				t.Fatal(err)
			}
			s := nextSeen(t, seen)
			if s.err != nil {
				t.Fatalf("strict decoder: %v", s.err)
			}
			want := pp2Expect{Src: x.local, Dst: mustAddrPort(t, tc.addr)}
			if cs := x.state; cs != nil {
				want.SNI = "edge.example.test"
				want.ALPN = tc.alpn
				if cs.NegotiatedProtocol != tc.alpn {
					t.Fatalf("client negotiated ALPN %q, want %q", cs.NegotiatedProtocol, tc.alpn)
				}
				want.SSL = true
				want.Client = 0x01 // PP2_CLIENT_SSL
				if tc.verified {
					want.Client |= 0x02 | 0x04 // PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
				}
				want.Verified = tc.verified
				want.Version = opensslVersion[cs.Version]
				want.Cipher = opensslCipher[cs.CipherSuite]
				if want.Version == "" || want.Cipher == "" {
					t.Fatalf("test table lacks version 0x%04x or cipher 0x%04x", cs.Version, cs.CipherSuite)
				}
			}
			if err := s.v2.check(want); err != nil {
				t.Fatal(err)
			}
			// The stream behind the header is intact: the back end answered the request.
			if x.status != 200 || x.body != addrPortString(x.local) {
				t.Fatalf("back end answered %d %q, want 200 %q", x.status, x.body, addrPortString(x.local))
			}
		})
	}
}

// ---------------------------------------------------------------------------------------------
// 2. Inbound PROXY protocol: curl --haproxy-protocol and hand-written headers

// TestAcceptProxyProtocol: listeners with accept_proxy_protocol and trusted_proxies =
// 127.0.0.1/32 believe a header from 127.0.0.1 (curl's, carrying its real address, and a
// hand-written one claiming 203.0.113.9), pass it on (X-Forwarded-For on an HTTP listener, the
// outbound PROXY header on a tcp listener) and close connections from 127.0.0.2.
func TestAcceptProxyProtocol(t *testing.T) {
	curl := peerBinary(t, "curl")
	dir := t.TempDir()
	web := backend(t, "web")
	raw, seen := ppBackend(t, 2)
	httpAddr, tcpAddr := configtest.Addr(t), configtest.Addr(t)
	text := header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[target_groups]]
name = "raw"
protocol = "tcp"
targets = [%q]
proxy_protocol = "v2"
health_check = { disabled = true }

[[listeners]]
name = "http-pp"
style = "application"
protocol = "http"
address = %q
accept_proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]
default_action = { forward = "web" }

[[listeners]]
name = "tcp-pp"
style = "network"
protocol = "tcp"
address = %q
accept_proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]
forward = "raw"
`, hostOf(web), raw, httpAddr, tcpAddr)
	rt := startRuntime(t, loadConfig(t, dir, text), nil)

	// runCurl returns curl's output and the address curl connected from (%{local_ip}/_port).
	runCurl := func(t *testing.T, iface, url string) (string, netip.AddrPort, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, curl, "-sS", "--max-time", "10", "--haproxy-protocol",
			"--interface", iface, "-w", "\n%{local_ip} %{local_port}", url).CombinedOutput()
		s := string(out)
		i := strings.LastIndexByte(s, '\n')
		if i < 0 {
			return s, netip.AddrPort{}, err
		}
		f := strings.Fields(s[i+1:])
		var local netip.AddrPort
		if len(f) == 2 {
			a, _ := netip.ParseAddr(f[0])
			p, _ := strconv.Atoi(f[1])
			local = netip.AddrPortFrom(a, uint16(p))
		}
		return s[:i], local, err
	}

	t.Run("curl/http/trusted", func(t *testing.T) {
		body, local, err := runCurl(t, "127.0.0.1", "http://"+httpAddr+"/")
		if err != nil {
			t.Fatalf("curl: %v\n%s", err, body)
		}
		var r echoReply
		if err := json.Unmarshal([]byte(body), &r); err != nil {
			t.Fatalf("echo reply: %v\n%s", err, body)
		}
		if got := r.header("X-Forwarded-For"); got != local.Addr().String() {
			t.Fatalf("X-Forwarded-For = %q, want %q", got, local.Addr())
		}
	})
	t.Run("curl/tcp/trusted", func(t *testing.T) {
		drainSeen(seen)
		body, local, err := runCurl(t, "127.0.0.1", "http://"+tcpAddr+"/")
		if err != nil {
			t.Fatalf("curl: %v\n%s", err, body)
		}
		s := nextSeen(t, seen)
		if s.err != nil {
			t.Fatal(s.err)
		}
		// curl's header names its real addresses; the outbound header repeats them.
		if err := s.v2.check(pp2Expect{Src: local, Dst: mustAddrPort(t, tcpAddr)}); err != nil {
			t.Fatal(err)
		}
		if body != addrPortString(local) {
			t.Fatalf("back end saw %q, want %q", body, addrPortString(local))
		}
	})
	for kind, l := range map[string]struct{ name, addr string }{"http": {"http-pp", httpAddr}, "tcp": {"tcp-pp", tcpAddr}} {
		t.Run("curl/untrusted/"+kind, func(t *testing.T) {
			before := rejectedOf(t, rt, l.name)
			body, _, err := runCurl(t, "127.0.0.2", "http://"+l.addr+"/")
			if err == nil {
				t.Fatalf("curl from an untrusted source succeeded: %q", body)
			}
			// Counted, for fulcrum_connections_rejected_total{reason="untrusted_proxy"}. The
			// accept loop counts right after closing, so curl may see the close first.
			configtest.WaitFor(t, 5*time.Second, "the untrusted connection counted", func() bool { return rejectedOf(t, rt, l.name).UntrustedProxy > before.UntrustedProxy })
			if after := rejectedOf(t, rt, l.name); after.UntrustedProxy != before.UntrustedProxy+1 {
				t.Fatalf("untrusted rejections %d -> %d, want exactly one more", before.UntrustedProxy, after.UntrustedProxy)
			}
		})
	}

	v1 := func(dst string) []byte {
		return []byte("PROXY TCP4 203.0.113.9 " + strings.Replace(dst, ":", " 4242 ", 1) + "\r\n")
	}
	// A v2 header by hand: PROXY, TCP over IPv6, 2001:db8::9 port 4242 -> 2001:db8::1 port 443.
	v2 := func() []byte {
		b := []byte(pp2Signature + "\x21\x21\x00\x24")
		b = append(b, netip.MustParseAddr("2001:db8::9").AsSlice()...)
		b = append(b, netip.MustParseAddr("2001:db8::1").AsSlice()...)
		return binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(b, 4242), 443)
	}

	t.Run("handwritten-v1/http", func(t *testing.T) {
		x := &exchange{src: "127.0.0.1", addr: httpAddr, pre: v1(httpAddr)}
		if err := x.do(t); err != nil {
			t.Fatal(err)
		}
		var r echoReply
		if err := json.Unmarshal([]byte(x.body), &r); err != nil {
			t.Fatalf("%d %q: %v", x.status, x.body, err)
		}
		if got := r.header("X-Forwarded-For"); got != "203.0.113.9" {
			t.Fatalf("X-Forwarded-For = %q, want 203.0.113.9", got)
		}
	})
	t.Run("handwritten-v1/tcp", func(t *testing.T) {
		drainSeen(seen)
		x := &exchange{src: "127.0.0.1", addr: tcpAddr, pre: []byte("PROXY TCP4 203.0.113.9 198.51.100.7 4242 443\r\n")}
		if err := x.do(t); err != nil {
			t.Fatal(err)
		}
		s := nextSeen(t, seen)
		if s.err != nil {
			t.Fatal(s.err)
		}
		want := pp2Expect{Src: netip.MustParseAddrPort("203.0.113.9:4242"), Dst: netip.MustParseAddrPort("198.51.100.7:443")}
		if err := s.v2.check(want); err != nil {
			t.Fatal(err)
		}
		if x.body != "203.0.113.9 4242" {
			t.Fatalf("back end answered %q", x.body)
		}
	})
	t.Run("handwritten-v2-ipv6/tcp", func(t *testing.T) {
		drainSeen(seen)
		x := &exchange{src: "127.0.0.1", addr: tcpAddr, pre: v2()}
		if err := x.do(t); err != nil {
			t.Fatal(err)
		}
		s := nextSeen(t, seen)
		if s.err != nil {
			t.Fatal(s.err)
		}
		want := pp2Expect{Src: netip.MustParseAddrPort("[2001:db8::9]:4242"), Dst: netip.MustParseAddrPort("[2001:db8::1]:443")}
		if err := s.v2.check(want); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("handwritten-v2-ipv6/http", func(t *testing.T) {
		x := &exchange{src: "127.0.0.1", addr: httpAddr, pre: v2()}
		if err := x.do(t); err != nil {
			t.Fatal(err)
		}
		var r echoReply
		if err := json.Unmarshal([]byte(x.body), &r); err != nil {
			t.Fatalf("%d %q: %v", x.status, x.body, err)
		}
		if got := r.header("X-Forwarded-For"); got != "2001:db8::9" {
			t.Fatalf("X-Forwarded-For = %q, want 2001:db8::9", got)
		}
	})
	for kind, addr := range map[string]string{"http": httpAddr, "tcp": tcpAddr} {
		// From an untrusted source the header is never believed: the connection is closed.
		t.Run("handwritten/untrusted/"+kind, func(t *testing.T) {
			x := &exchange{src: "127.0.0.2", addr: addr, pre: v1(addr)}
			if err := x.do(t); err == nil {
				t.Fatalf("untrusted source got %d %q", x.status, x.body)
			}
		})
		// A trusted source must send a header.
		t.Run("no-header/trusted/"+kind, func(t *testing.T) {
			x := &exchange{src: "127.0.0.1", addr: addr}
			if err := x.do(t); err == nil {
				t.Fatalf("a connection without a PROXY header got %d %q", x.status, x.body)
			}
		})
	}
}

// ---------------------------------------------------------------------------------------------
// 3. TLS pass-through routed on SNI

// TestSNIPassThroughRuntime: a network tcp listener with host rules routes TLS by the
// ClientHello's server name without terminating it; the client verifies the certificate of
// the back end it was routed to.
func TestSNIPassThroughRuntime(t *testing.T) {
	dir := t.TempDir()
	caA, caB := configtest.NewCA(t, "CA A"), configtest.NewCA(t, "CA B")
	var certA, certB atomic.Pointer[tls.Certificate]
	certA.Store(leaf(t, caA, "a.example.test", "*.wild.example.test"))
	certB.Store(leaf(t, caB, "b.example.test"))
	beA, beB := tlsEchoBackend(t, "A", &certA), tlsEchoBackend(t, "B", &certB)
	addr := configtest.Addr(t)
	text := header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "a"
protocol = "tcp"
targets = [%q]
health_check = { disabled = true }

[[target_groups]]
name = "b"
protocol = "tcp"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "sni"
style = "network"
protocol = "tcp"
address = %q
forward = "b"

[[listeners.rules]]
priority = 1
hosts = ["a.example.test"]
forward = "a"

[[listeners.rules]]
priority = 2
hosts = ["*.wild.example.test"]
forward = "a"
`, beA, beB, addr)
	startRuntime(t, loadConfig(t, dir, text), nil)

	talk := func(t *testing.T, cfg *tls.Config) (string, error) {
		raw, err := dialFrom(t, "127.0.0.1", addr)
		if err != nil {
			return "", err
		}
		defer raw.Close()
		c := tls.Client(raw, cfg)
		if err := c.Handshake(); err != nil {
			return "", err
		}
		if _, err := io.WriteString(c, "hello\n"); err != nil {
			return "", err
		}
		return bufio.NewReader(c).ReadString('\n')
	}
	cases := []struct {
		sni  string
		pool *x509.CertPool
		want string
	}{
		{"a.example.test", caA.Pool(), "A:hello\n"},
		{"A.Example.TEST", caA.Pool(), "A:hello\n"},
		{"x.wild.example.test", caA.Pool(), "A:hello\n"},
		{"b.example.test", caB.Pool(), "B:hello\n"},
	}
	for _, tc := range cases {
		t.Run(tc.sni, func(t *testing.T) {
			got, err := talk(t, &tls.Config{ServerName: tc.sni, RootCAs: tc.pool})
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	t.Run("no-sni-goes-to-default", func(t *testing.T) {
		// No ServerName: no SNI extension. Check the certificate by hand: it must be B's.
		got, err := talk(t, &tls.Config{InsecureSkipVerify: true, VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: caB.Pool(), DNSName: "b.example.test"})
			return err
		}})
		if err != nil || got != "B:hello\n" {
			t.Fatalf("got %q, %v; want B", got, err)
		}
	})
	t.Run("wrong-trust-fails", func(t *testing.T) {
		// Routed to A, so a client trusting only B's authority must refuse the certificate.
		_, err := talk(t, &tls.Config{ServerName: "a.example.test", RootCAs: caB.Pool()})
		var unknown x509.UnknownAuthorityError
		if !errors.As(err, &unknown) {
			t.Fatalf("err = %v, want x509.UnknownAuthorityError", err)
		}
	})
}

// ---------------------------------------------------------------------------------------------
// 4. Classic tcp and ssl listeners

// TestClassicL4Listeners: ssl -> tcp (offload), ssl -> ssl (re-encryption verified against a
// ca_file and against the runtime's authority; a wrong CA is refused), tcp -> tcp; a config
// that changes layer is refused.
func TestClassicL4Listeners(t *testing.T) {
	dir := t.TempDir()
	plain := serveTCP(t, "127.0.0.1:0", lineEcho("plain"))
	beCA, otherCA := configtest.NewCA(t, "back-end CA"), configtest.NewCA(t, "other CA")
	caFile := filepath.Join(dir, "be-ca.PEM")
	if err := os.WriteFile(caFile, beCA.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	var certCA, certAuth, certWrong atomic.Pointer[tls.Certificate]
	certCA.Store(leaf(t, beCA, "be.internal"))
	certWrong.Store(leaf(t, otherCA, "be.internal"))
	tlsCA := tlsEchoBackend(t, "tls-cafile", &certCA)
	tlsAuth := tlsEchoBackend(t, "tls-authority", &certAuth) // certificate issued once the authority exists
	tlsWrong := tlsEchoBackend(t, "tls-wrong", &certWrong)

	addrs := map[string]string{}
	for _, n := range []string{"ssl-tcp", "ssl-ssl-cafile", "ssl-ssl-authority", "ssl-ssl-wrong-ca", "tcp-tcp"} {
		addrs[n] = configtest.Addr(t)
	}
	port := func(a string) string { _, p, _ := net.SplitHostPort(a); return p }
	text := header(dir) + `
[[authorities]]
name = "internal"

[[certificates]]
name = "edge"
domains = ["edge.example.test"]
authority = "internal"
`
	classic := func(name, proto, backend, instance, extra string) {
		text += fmt.Sprintf(`
[[listeners]]
name = %q
style = "classic"
protocol = %q
address = %q
backend_protocol = %q
instances = [%q]
health_check = { target = "TCP:%s", interval = "30s" }
%s`, name, proto, addrs[name], backend, instance, port(instance), extra)
	}
	classic("ssl-tcp", "ssl", "tcp", plain, `certificates = ["edge"]`+"\n")
	classic("ssl-ssl-cafile", "ssl", "ssl", tlsCA, `certificates = ["edge"]`+"\n"+
		fmt.Sprintf(`backend_tls = { server_name = "be.internal", ca_file = %q }`, caFile)+"\n")
	classic("ssl-ssl-authority", "ssl", "ssl", tlsAuth, `certificates = ["edge"]`+"\n"+
		`backend_tls = { server_name = "be.internal", authority = "internal" }`+"\n")
	classic("ssl-ssl-wrong-ca", "ssl", "ssl", tlsWrong, `certificates = ["edge"]`+"\n"+
		fmt.Sprintf(`backend_tls = { server_name = "be.internal", ca_file = %q }`, caFile)+"\n")
	classic("tcp-tcp", "tcp", "tcp", plain, "")
	rt := startRuntime(t, loadConfig(t, dir, text), nil)
	certAuth.Store(authorityLeaf(t, rt, "internal", certs.UsageServer, "be.internal"))
	roots := rt.Certs().Authority("internal").Pool()

	talk := func(t *testing.T, name string, useTLS bool) (string, error) {
		raw, err := dialFrom(t, "127.0.0.1", addrs[name])
		if err != nil {
			return "", err
		}
		defer raw.Close()
		var c net.Conn = raw
		if useTLS {
			tc := tls.Client(raw, &tls.Config{ServerName: "edge.example.test", RootCAs: roots})
			if err := tc.Handshake(); err != nil {
				return "", fmt.Errorf("handshake with the listener: %w", err)
			}
			c = tc
		}
		r := bufio.NewReader(c)
		var out string
		for _, msg := range []string{"one\n", "two\n"} {
			if _, err := io.WriteString(c, msg); err != nil {
				return out, err
			}
			line, err := r.ReadString('\n')
			out += line
			if err != nil {
				return out, err
			}
		}
		return out, nil
	}
	for _, tc := range []struct {
		name   string
		tls    bool
		prefix string
	}{
		{"ssl-tcp", true, "plain"},
		{"ssl-ssl-cafile", true, "tls-cafile"},
		{"ssl-ssl-authority", true, "tls-authority"},
		{"tcp-tcp", false, "plain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := talk(t, tc.name, tc.tls)
			if want := tc.prefix + ":one\n" + tc.prefix + ":two\n"; err != nil || got != want {
				t.Fatalf("got %q, %v; want %q", got, err, want)
			}
		})
	}
	t.Run("ssl-ssl-wrong-ca", func(t *testing.T) {
		got, err := talk(t, "ssl-ssl-wrong-ca", true)
		if err == nil || got != "" {
			t.Fatalf("a back end outside the trusted CA was used: %q, %v", got, err)
		}
	})
	t.Run("layer-change-refused", func(t *testing.T) {
		_, err := configs.Load("layer.toml", []byte(header(dir)+`
[[listeners]]
name = "legacy"
style = "classic"
protocol = "ssl"
address = "127.0.0.1:9443"
certificates = ["edge"]
backend_protocol = "http"
instances = ["127.0.0.1:7001"]
`))
		if err == nil || !strings.Contains(err.Error(), "does not change OSI layer") {
			t.Fatalf("err = %v, want a refusal naming the OSI layer", err)
		}
	})
}

// ---------------------------------------------------------------------------------------------
// 5. Reload keeps established streams; shutdown drains

// stream is one long-lived line-echo connection through a listener.
type stream struct {
	c net.Conn
	r *bufio.Reader
}

func openStream(t testing.TB, addr string) *stream {
	t.Helper()
	c, err := dialFrom(t, "127.0.0.1", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &stream{c: c, r: bufio.NewReader(c)}
}

func (s *stream) say(msg string) (string, error) {
	if _, err := io.WriteString(s.c, msg+"\n"); err != nil {
		return "", err
	}
	line, err := s.r.ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

func (s *stream) expect(t testing.TB, msg, want string) {
	t.Helper()
	got, err := s.say(msg)
	if err != nil || got != want {
		t.Fatalf("stream: %q -> %q, %v; want %q", msg, got, err, want)
	}
}

// TestL4ReloadKeepsStreamsAndShutdownDrains: a stream opened before a reload that replaces the
// targets keeps its target; new connections go to the new target; Shutdown stops accepting,
// lets open streams finish, and returns as soon as they do.
func TestL4ReloadKeepsStreamsAndShutdownDrains(t *testing.T) {
	dir := t.TempDir()
	beA := serveTCP(t, "127.0.0.1:0", lineEcho("A"))
	beB := serveTCP(t, "127.0.0.1:0", lineEcho("B"))
	addr := configtest.Addr(t)
	cfg := func(target string) *configs.Config {
		return loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "g"
protocol = "tcp"
targets = [%q]
deregistration_delay = "0s"
health_check = { disabled = true }

[[listeners]]
name = "tcp"
style = "network"
protocol = "tcp"
address = %q
forward = "g"
`, target, addr))
	}
	rt := startRuntime(t, cfg(beA), nil)
	long := openStream(t, addr)
	long.expect(t, "1", "A:1")
	// A large burst on the same stream, so the relay is in its zero-copy loop when we reload.
	big := strings.Repeat("x", 1<<20)
	long.expect(t, big, "A:"+big)

	ch, err := rt.Reload(context.Background(), cfg(beB))
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	if len(ch.Updated) != 1 || ch.Updated[0] != "tcp" || len(ch.Added)+len(ch.Removed) != 0 {
		t.Fatalf("reload changes = %+v, want the listener updated in place", ch)
	}
	long.expect(t, "2", "A:2")
	fresh := openStream(t, addr)
	fresh.expect(t, "1", "B:1")
	// A second reload, back to A: both streams keep their targets.
	if _, err := rt.Reload(context.Background(), cfg(beA)); err != nil {
		t.Fatalf("reload: %v", err)
	}
	long.expect(t, "3", "A:3")
	fresh.expect(t, "2", "B:2")
	third := openStream(t, addr)
	third.expect(t, "1", "A:1")
	third.c.Close()

	// Shutdown drains: no new connections, established streams keep working until they end.
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		done <- rt.Shutdown(ctx)
	}()
	for i := 0; ; i++ { // the listening socket closes soon after Shutdown starts
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if i >= 200 {
			t.Fatal("the listener still accepts 10 s into Shutdown")
		}
		time.Sleep(50 * time.Millisecond)
	}
	long.expect(t, "4", "A:4")
	fresh.expect(t, "3", "B:3")
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) while streams were open", err)
	default:
	}
	long.c.Close()
	fresh.c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown after the streams ended: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the last stream closed")
	}
}

// TestL4ShutdownBudgetCutsStreams: when the drain budget ends, Shutdown closes what is left.
func TestL4ShutdownBudgetCutsStreams(t *testing.T) {
	dir := t.TempDir()
	be := serveTCP(t, "127.0.0.1:0", lineEcho("A"))
	addr := configtest.Addr(t)
	rt := startRuntime(t, loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "g"
protocol = "tcp"
targets = [%q]
deregistration_delay = "0s"
health_check = { disabled = true }

[[listeners]]
name = "tcp"
style = "network"
protocol = "tcp"
address = %q
forward = "g"
`, be, addr)), nil)
	s := openStream(t, addr)
	s.expect(t, "1", "A:1")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := rt.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want context.DeadlineExceeded", err)
	}
	s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := s.say("2"); err == nil {
		t.Fatal("the stream survived the end of the drain budget")
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the stream was left open after Shutdown")
	}
}
