package listener

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// forgedHeaders are what a client could send to pass itself off as someone else, or as having
// presented a client certificate.
var forgedHeaders = map[string]string{
	"X-Forwarded-For":        "198.51.100.66",
	"X-Request-Id":           "forged-request-id",
	"X-Real-IP":              "198.51.100.66",
	"Forwarded":              "for=198.51.100.66",
	"X-Amzn-Mtls-Clientcert": "forged",
}

// viaProxy sends one GET with forgedHeaders over a fresh connection from src, opened with a
// PROXY v1 header claiming client (none when client is ""), and decodes what the echo target saw.
func viaProxy(t *testing.T, src, addr, client string) echoReply {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b strings.Builder
	if client != "" {
		host, port, _ := net.SplitHostPort(addr)
		fmt.Fprintf(&b, "PROXY TCP4 %s %s 4242 %s\r\n", client, host, port)
	}
	b.WriteString("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
	for k, v := range forgedHeaders {
		b.WriteString(k + ": " + v + "\r\n")
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(c, b.String()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	var r echoReply
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestTrustFollowsClient: being allowed to send a PROXY header (trusted_proxies) says nothing
// about the client behind it. Forwarding headers are believed only from trusted_forwarders,
// matched against the client the PROXY header names; from anyone else X-Forwarded-For and
// X-Request-Id are replaced and X-Real-IP, Forwarded and client-certificate headers removed.
func TestTrustFollowsClient(t *testing.T) {
	dir := t.TempDir()
	be := backend(t, "be")
	ppAddr, ppFwdAddr, plainAddr := configtest.Addr(t), configtest.Addr(t), configtest.Addr(t)
	startRuntime(t, loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "nlb-behind"
style = "application"
protocol = "http"
address = %q
accept_proxy_protocol = true
trusted_proxies = ["127.0.0.0/8"]
default_action = { forward = "be" }

[[listeners]]
name = "nlb-behind-with-forwarder"
style = "application"
protocol = "http"
address = %q
accept_proxy_protocol = true
trusted_proxies = ["127.0.0.0/8"]
trusted_forwarders = ["203.0.113.9"]
default_action = { forward = "be" }

[[listeners]]
name = "legacy"
style = "application"
protocol = "http"
address = %q
trusted_proxies = ["127.0.0.1/32"]
default_action = { forward = "be" }
`, hostOf(be), ppAddr, ppFwdAddr, plainAddr)), nil)

	believed := func(t *testing.T, r echoReply, client string) {
		t.Helper()
		if got, want := r.header("X-Forwarded-For"), forgedHeaders["X-Forwarded-For"]+", "+client; got != want {
			t.Errorf("X-Forwarded-For %q, want %q", got, want)
		}
		for _, k := range []string{"X-Request-Id", "X-Real-IP", "Forwarded", "X-Amzn-Mtls-Clientcert"} {
			if got := r.header(k); got != forgedHeaders[k] {
				t.Errorf("%s %q, want the trusted client's %q", k, got, forgedHeaders[k])
			}
		}
	}
	refused := func(t *testing.T, r echoReply, client string) {
		t.Helper()
		if got := r.header("X-Forwarded-For"); got != client {
			t.Errorf("X-Forwarded-For %q, want the client alone %q", got, client)
		}
		if got := r.header("X-Request-Id"); got == "" || got == forgedHeaders["X-Request-Id"] {
			t.Errorf("X-Request-Id %q, want a fresh one", got)
		}
		for _, k := range []string{"X-Real-IP", "Forwarded", "X-Amzn-Mtls-Clientcert"} {
			if got := r.header(k); got != "" {
				t.Errorf("%s %q reached the target from an untrusted client", k, got)
			}
		}
	}

	// The defect: the PROXY header names an internal client inside trusted_proxies, which
	// used to make its forged headers believed.
	t.Run("PROXY sender trusted, client inside its range", func(t *testing.T) {
		refused(t, viaProxy(t, "127.0.0.1", ppAddr, "127.0.0.5"), "127.0.0.5")
	})
	t.Run("PROXY sender trusted, outside client", func(t *testing.T) {
		refused(t, viaProxy(t, "127.0.0.1", ppAddr, "192.0.2.10"), "192.0.2.10")
	})
	t.Run("trusted forwarder behind the PROXY sender", func(t *testing.T) {
		believed(t, viaProxy(t, "127.0.0.1", ppFwdAddr, "203.0.113.9"), "203.0.113.9")
	})
	t.Run("other client behind the same PROXY sender", func(t *testing.T) {
		refused(t, viaProxy(t, "127.0.0.1", ppFwdAddr, "203.0.113.10"), "203.0.113.10")
	})
	t.Run("no PROXY: trusted_proxies keeps its meaning", func(t *testing.T) {
		believed(t, viaProxy(t, "127.0.0.1", plainAddr, ""), "127.0.0.1")
	})
	t.Run("no PROXY: untrusted peer", func(t *testing.T) {
		refused(t, viaProxy(t, "127.0.0.2", plainAddr, ""), "127.0.0.2")
	})
}

// connLog records layer-4 connection-log lines.
type connLog struct {
	recs chan ConnRecord
}

func (*connLog) Request(*RequestRecord)                    {}
func (*connLog) Desync(string, desync.Tier, desync.Reason) {}
func (o *connLog) Connection(rec *ConnRecord)              { o.recs <- *rec }

// TestMissingProxyHeaderLogsPeer: a trusted peer that opens without the required PROXY header
// is closed, and its connection-log line names that peer (there is no other address to name).
func TestMissingProxyHeaderLogsPeer(t *testing.T) {
	dir := t.TempDir()
	raw, _ := ppBackend(t, 1)
	addr := configtest.Addr(t)
	obs := &connLog{recs: make(chan ConnRecord, 4)}
	startRuntime(t, loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "raw"
protocol = "tcp"
targets = [%q]
health_check = { disabled = true }

[[listeners]]
name = "tcp-pp"
style = "network"
protocol = "tcp"
address = %q
accept_proxy_protocol = true
trusted_proxies = ["127.0.0.0/8"]
forward = "raw"
`, raw, addr)), obs)

	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n") // no PROXY header
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection without its PROXY header got an answer")
	}
	select {
	case rec := <-obs.recs:
		if rec.Reason != "proxy_header" {
			t.Errorf("reason %q, want proxy_header", rec.Reason)
		}
		if rec.Client.String() != c.LocalAddr().String() {
			t.Errorf("client %v, want the peer %v", rec.Client, c.LocalAddr())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no connection-log line")
	}
}
