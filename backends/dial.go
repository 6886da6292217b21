package backends

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"
)

// errNotLayer4 is returned by Dial on an http/https group.
var errNotLayer4 = errors.New("backends: Dial needs a tcp or tls target group")

// Dial connects to t for a tcp/tls group within connect_timeout: it writes the group's PROXY header
// (v1 or v2; pi nil means "no client": UNKNOWN / LOCAL) as the very first bytes in one write, then
// for tls groups performs the TLS handshake with the group's verification. For a tcp group the
// result is the *net.TCPConn itself, so io.Copy between two TCP connections can splice.
//
// Dial reports connect and handshake failures to passive health (ReportFailure) and a completed
// connection as a success. A failed Dial sent no client byte, so the caller may retry elsewhere.
func (g *Group) Dial(ctx context.Context, t *Target, pi *ProxyInfo) (net.Conn, error) {
	if g.proto != "tcp" && g.proto != "tls" {
		return nil, errNotLayer4
	}
	ctx, cancel := context.WithTimeout(ctx, g.connect)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", t.spec.address)
	if err != nil {
		if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			t.ReportFailure()
		}
		return nil, fmt.Errorf("dial target %s: %w", t.spec.address, err)
	}
	if g.proxyProto != "" {
		var buf [256]byte
		hdr := buf[:0]
		if g.proxyProto == "v1" {
			hdr = appendProxyV1(hdr, pi)
		} else if hdr, err = appendProxyV2(hdr, pi); err != nil {
			c.Close()
			return nil, fmt.Errorf("target %s: %w", t.spec.address, err)
		}
		if dl, ok := ctx.Deadline(); ok {
			_ = c.SetWriteDeadline(dl)
		}
		if _, err := c.Write(hdr); err != nil {
			c.Close()
			t.ReportFailure()
			return nil, fmt.Errorf("target %s: write PROXY header: %w", t.spec.address, err)
		}
		_ = c.SetWriteDeadline(noDeadline)
	}
	if g.proto == "tcp" {
		t.ReportSuccess()
		return c, nil // *net.TCPConn, unwrapped
	}
	cfg := g.tlsConf
	if cfg == nil {
		cfg = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		host, _, _ := net.SplitHostPort(t.spec.address)
		cfg.ServerName = host
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		t.ReportFailure()
		return nil, fmt.Errorf("target %s: tls handshake: %w", t.spec.address, err)
	}
	t.ReportSuccess()
	return tc, nil
}

var noDeadline time.Time
