package conformance

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// echoHeaders answers with the request's headers as JSON.
func echoHeaders() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Target", "ok")
		json.NewEncoder(w).Encode(r.Header)
	})
}

// rawGet sends one GET with extra header lines from a given source address, optionally after
// a PROXY v1 header, and decodes the echoed headers (nil when the connection was refused).
func rawGet(t *testing.T, src, addr, proxyClient string, extra map[string]string) http.Header {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b strings.Builder
	if proxyClient != "" {
		host, port, _ := net.SplitHostPort(addr)
		fmt.Fprintf(&b, "PROXY TCP4 %s %s 5555 %s\r\n", proxyClient, host, port)
	}
	b.WriteString("GET /spoof HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
	for k, v := range extra {
		b.WriteString(k + ": " + v + "\r\n")
	}
	b.WriteString("\r\n")
	io.WriteString(c, b.String())
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var h http.Header
	json.NewDecoder(resp.Body).Decode(&h)
	return h
}

// TestSpoofing: forwarding headers are believed only from trusted_forwarders; PROXY headers
// only from trusted_proxies; a trusted PROXY sender does not make its clients trusted.
func TestSpoofing(t *testing.T) {
	tg := newTarget(t, echoHeaders())
	plain, pp := configtest.Addr(t), configtest.Addr(t)
	startFulcrum(t, fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "plain"
style = "application"
protocol = "http"
address = %q
trusted_proxies = ["127.0.0.1/32"]
default_action = { forward = "be" }

[[listeners]]
name = "behind-nlb"
style = "application"
protocol = "http"
address = %q
accept_proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]
trusted_forwarders = ["203.0.113.7"]
default_action = { forward = "be" }
`, tg.addr(), plain, pp))
	forged := map[string]string{
		"X-Forwarded-For": "198.51.100.1", "X-Real-IP": "198.51.100.1", "Forwarded": "for=198.51.100.1",
		"X-Request-Id": "forged-id", "X-Amzn-Mtls-Clientcert-Subject": "CN=admin",
	}
	untrusted := func(t *testing.T, h http.Header, client string) {
		t.Helper()
		if h == nil {
			t.Fatal("no answer")
		}
		if got := h.Get("X-Forwarded-For"); got != client {
			t.Errorf("X-Forwarded-For %q, want %q", got, client)
		}
		if h.Get("X-Request-Id") == "forged-id" {
			t.Error("forged X-Request-Id reached the target")
		}
		for _, k := range []string{"X-Real-Ip", "Forwarded", "X-Amzn-Mtls-Clientcert-Subject"} {
			if v := h.Get(k); v != "" {
				t.Errorf("%s %q reached the target from an untrusted client", k, v)
			}
		}
	}
	t.Run("untrusted peer", func(t *testing.T) { untrusted(t, rawGet(t, "127.0.0.2", plain, "", forged), "127.0.0.2") })
	t.Run("trusted peer", func(t *testing.T) {
		h := rawGet(t, "127.0.0.1", plain, "", forged)
		if got := h.Get("X-Forwarded-For"); got != "198.51.100.1, 127.0.0.1" {
			t.Errorf("X-Forwarded-For %q", got)
		}
		if h.Get("X-Request-Id") != "forged-id" {
			t.Error("a trusted forwarder's request id was replaced")
		}
	})
	t.Run("PROXY from untrusted peer", func(t *testing.T) {
		if h := rawGet(t, "127.0.0.2", pp, "203.0.113.7", forged); h != nil {
			t.Errorf("a PROXY header from an untrusted peer was served: %v", h)
		}
	})
	t.Run("trusted PROXY sender, untrusted client", func(t *testing.T) {
		untrusted(t, rawGet(t, "127.0.0.1", pp, "127.0.0.9", forged), "127.0.0.9")
	})
	t.Run("trusted PROXY sender, trusted client", func(t *testing.T) {
		h := rawGet(t, "127.0.0.1", pp, "203.0.113.7", forged)
		if got := h.Get("X-Forwarded-For"); got != "198.51.100.1, 203.0.113.7" {
			t.Errorf("X-Forwarded-For %q", got)
		}
	})
}

// TestSmugglingVariants: classic request-smuggling shapes beyond the corpus, each followed by a
// smuggled request; in defensive mode nothing smuggled may reach the target.
func TestSmugglingVariants(t *testing.T) {
	tg := newTarget(t, nil)
	addr := configtest.Addr(t)
	startFulcrum(t, fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %q
header_timeout = "3s"
client_body_timeout = "2s"
default_action = { forward = "be" }
`, tg.addr(), addr))
	smuggled := "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
	for _, v := range []struct{ name, req string }{
		{"CL.TE", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled},
		{"TE.CL", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n" + smuggled},
		{"TE obfuscated", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + smuggled},
		{"TE space before colon", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + smuggled},
		{"double CL", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n" + smuggled},
		{"folded TE", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + smuggled},
		{"bare LF", "POST / HTTP/1.1\nHost: x\nContent-Length: 0\nTransfer-Encoding: chunked\n\n0\n\n" + smuggled},
		{"chunk size overflow", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff1\r\nx\r\n0\r\n\r\n" + smuggled},
		{"chunk extension", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0;x\nGET /smuggled HTTP/1.1\r\n\r\n" + smuggled},
		{"NUL in header", "POST / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n" + smuggled},
		{"CR in header", "POST / HTTP/1.1\r\nHost: x\r\nX-A: a\rTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n" + smuggled},
		{"HTTP/1.0 TE", "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + smuggled},
	} {
		t.Run(v.name, func(t *testing.T) {
			tg.take()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(8 * time.Second))
			io.WriteString(c, v.req)
			io.Copy(io.Discard, c) // until Fulcrum closes (or the deadline)
			time.Sleep(100 * time.Millisecond)
			for _, r := range tg.take() {
				if r.URL.Path == "/smuggled" {
					t.Errorf("the smuggled request reached the target")
				}
				if r.Header.Get("Content-Length") != "" && len(r.TransferEncoding) > 0 {
					t.Errorf("target got both Content-Length and Transfer-Encoding")
				}
			}
		})
	}
}

// TestTargetFaults: what a client sees when its target misbehaves, and that nothing is ever a
// truncated 2xx presented as complete.
func TestTargetFaults(t *testing.T) {
	blackhole, _ := net.Listen("tcp", "127.0.0.1:0") // accepts, never answers
	t.Cleanup(func() { blackhole.Close() })
	var held []net.Conn
	var hmu sync.Mutex
	go func() {
		for {
			c, err := blackhole.Accept()
			if err != nil {
				return
			}
			hmu.Lock()
			held = append(held, c)
			hmu.Unlock()
		}
	}()
	t.Cleanup(func() {
		hmu.Lock()
		for _, c := range held {
			c.Close()
		}
		hmu.Unlock()
	})
	rawTarget := func(serve func(net.Conn)) string {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go serve(c)
			}
		}()
		return ln.Addr().String()
	}
	readReq := func(c net.Conn) { http.ReadRequest(bufio.NewReader(c)) }
	garbage := rawTarget(func(c net.Conn) { readReq(c); io.WriteString(c, "SSH-2.0-garbage\r\n\r\n"); c.Close() })
	reset := rawTarget(func(c net.Conn) {
		readReq(c)
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	})
	killed := rawTarget(func(c net.Conn) {
		readReq(c)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"+strings.Repeat("x", 1000))
		c.Close()
	})
	stall := rawTarget(func(c net.Conn) {
		readReq(c)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"+strings.Repeat("x", 1000))
		time.Sleep(20 * time.Second)
		c.Close()
	})
	cases := []struct {
		name, target string
		status       int    // 0: the client's connection is aborted
		reason       string // access-log error_reason
	}{
		{"black hole", blackhole.Addr().String(), 504, "target_timeout"},
		{"garbage", garbage, 502, ""},
		{"reset", reset, 502, ""},
		{"killed mid-body", killed, 0, "target_closed_mid_body"},
		{"stall mid-body", stall, 0, "target_read_timeout"},
	}
	cfg := ""
	addrs := map[string]string{}
	for i, c := range cases {
		addrs[c.name] = configtest.Addr(t)
		cfg += fmt.Sprintf(`
[[target_groups]]
name = "g%d"
protocol = "http"
targets = [%q]
response_timeout = "2s"
target_read_timeout = "2s"
health_check = { disabled = true }

[[listeners]]
name = "l%d"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "g%d" }
`, i, c.target, i, addrs[c.name], i)
	}
	p := startFulcrum(t, cfg)
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			cl := &http.Client{Timeout: 15 * time.Second}
			start := time.Now()
			resp, err := cl.Get("http://" + addrs[c.name] + "/fault")
			status := 0
			if err == nil {
				status = resp.StatusCode
				n, rerr := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if status/100 == 2 && rerr == nil && n != resp.ContentLength {
					t.Errorf("a truncated 2xx was presented as complete (%d of %d bytes)", n, resp.ContentLength)
				}
				if status/100 == 2 && rerr == nil {
					t.Errorf("a faulty target produced a complete 2xx")
				}
			}
			if c.status != 0 && status != c.status {
				t.Errorf("status %d (err %v), want %d", status, err, c.status)
			}
			if d := time.Since(start); d > 12*time.Second {
				t.Errorf("the client waited %v", d)
			}
			listener := fmt.Sprintf("l%d", i)
			e := p.waitLog(t, c.name, func(e logEntry) bool { return e.Listener == listener })
			if c.reason != "" && e.ErrorReason != c.reason {
				t.Errorf("logged error_reason %q, want %q", e.ErrorReason, c.reason)
			}
		})
	}
	t.Cleanup(func() {
		if n := p.metric("fulcrum_target_failures_total"); n < 3 {
			t.Errorf("fulcrum_target_failures_total = %v, want the faults counted", n)
		}
	})
}

// TestReloadUnderLoad: reloads, good and broken, while clients keep sending: no request fails.
func TestReloadUnderLoad(t *testing.T) {
	tg := newTarget(t, nil)
	tg2 := newTarget(t, nil)
	addr := configtest.Addr(t)
	cfg := func(targets string, extra string) string {
		return fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%s]
health_check = { disabled = true }

[[listeners]]
name = "l"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "be" }
%s`, targets, addr, extra)
	}
	one := fmt.Sprintf("%q", tg.addr())
	both := fmt.Sprintf("%q, %q", tg.addr(), tg2.addr())
	p := startFulcrum(t, cfg(one, ""))
	ctx, cancel := context.WithCancel(context.Background())
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
			for ctx.Err() == nil {
				resp, err := c.Get("http://" + addr + "/load")
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	for i := range 10 {
		time.Sleep(200 * time.Millisecond)
		switch i % 3 {
		case 0:
			p.reload(cfg(both, ""))
		case 1:
			p.reload(cfg(one, "\n[[listeners.rules]]\npriority = 1\npaths = [\"nope\"]\nforward = \"be\"\n")) // broken: refused
		case 2:
			p.reload(cfg(one, ""))
		}
	}
	time.Sleep(300 * time.Millisecond)
	cancel()
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d of %d requests failed during reloads (first: %v)", failed.Load(), failed.Load()+ok.Load(), firstErr.Load())
	}
	if ok.Load() < 100 {
		t.Fatalf("only %d requests completed during the reloads", ok.Load())
	}
	t.Logf("%d requests, none failed, across 10 reloads (3 broken)", ok.Load())
}
