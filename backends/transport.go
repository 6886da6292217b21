package backends

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// clientTLS returns the group's client TLS configuration and a fingerprint that changes when it
// does (part of the transport and target keys).
func clientTLS(cfg *configs.Config, g *configs.TargetGroup, tlsp TLSProvider) (*tls.Config, string, error) {
	if tlsp != nil {
		c, err := tlsp.ClientTLS(g)
		if err != nil {
			return nil, "", fmt.Errorf("client tls: %w", err)
		}
		if c != nil {
			// The provider returns the same pointer while nothing changed.
			return c, fmt.Sprintf("provider:%p", c), nil
		}
	}
	return FileClientTLS(cfg, g)
}

// FileClientTLS builds client TLS from the group's tls table without a certificate manager:
// ca_file (else the system roots), server_name, pin_public_keys and insecure_skip_verify. An
// authority or client_certificate needs the certificate manager (a TLSProvider).
//
// Pins are "sha256/BASE64" of a certificate's SubjectPublicKeyInfo. With pins alone (no ca_file),
// the chain is not verified and the leaf's key must match a pin (ELB Classic back-end
// authentication). With ca_file and pins, the chain must verify and some certificate of the
// verified chain must match a pin.
func FileClientTLS(cfg *configs.Config, g *configs.TargetGroup) (*tls.Config, string, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	bt := g.TLS
	if bt == nil {
		return c, "system", nil
	}
	if bt.Authority != "" || bt.ClientCertificate != "" {
		return nil, "", errors.New("tls: authority and client_certificate need the certificate manager")
	}
	fp := sha256.New()
	fmt.Fprintf(fp, "%s|%v|%q|", bt.ServerName, bt.InsecureSkipVerify, bt.PinPublicKeys)
	c.ServerName = bt.ServerName
	if bt.CAFile != "" {
		path := cfg.Resolve(bt.CAFile)
		pem, err := os.ReadFile(path)
		if err != nil {
			return nil, "", fmt.Errorf("tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, "", fmt.Errorf("tls.ca_file %s: no PEM certificates", path)
		}
		c.RootCAs = pool
		fp.Write(pem)
	}
	if len(bt.PinPublicKeys) > 0 {
		pins, err := parsePins(bt.PinPublicKeys)
		if err != nil {
			return nil, "", err
		}
		leafOnly := c.RootCAs == nil
		if leafOnly {
			// Standard verification is replaced by the pin check below.
			c.InsecureSkipVerify = true //nolint:gosec // verified by VerifyConnection
		}
		c.VerifyConnection = func(cs tls.ConnectionState) error { return checkPins(pins, cs, leafOnly) }
	} else if bt.InsecureSkipVerify {
		c.InsecureSkipVerify = true //nolint:gosec // explicit operator opt-out (lab use)
	}
	return c, "file:" + hex.EncodeToString(fp.Sum(nil)), nil
}

func parsePins(in []string) ([][]byte, error) {
	out := make([][]byte, 0, len(in))
	for i, p := range in {
		b64, ok := strings.CutPrefix(p, "sha256/")
		if !ok {
			return nil, fmt.Errorf("tls.pin_public_keys[%d] %q: want \"sha256/BASE64\"", i, p)
		}
		b, err := base64.StdEncoding.DecodeString(b64)
		if err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("tls.pin_public_keys[%d] %q: want base64 of a 32-byte SHA-256", i, p)
		}
		out = append(out, b)
	}
	return out, nil
}

// PinOf returns the "sha256/BASE64" pin of a certificate's public key.
func PinOf(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256/" + base64.StdEncoding.EncodeToString(sum[:])
}

var errPinMismatch = errors.New("tls: back-end public key matches no pin_public_keys entry")

func checkPins(pins [][]byte, cs tls.ConnectionState, leafOnly bool) error {
	match := func(c *x509.Certificate) bool {
		sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
		for _, p := range pins {
			if bytes.Equal(p, sum[:]) {
				return true
			}
		}
		return false
	}
	if leafOnly {
		if len(cs.PeerCertificates) > 0 && match(cs.PeerCertificates[0]) {
			return nil
		}
		return errPinMismatch
	}
	for _, chain := range cs.VerifiedChains {
		for _, c := range chain {
			if match(c) {
				return nil
			}
		}
	}
	return errPinMismatch
}

func (g *Group) transportKey(gc *configs.TargetGroup, tlsFP string) string {
	return fmt.Sprintf("%s|%s|h2=%v|%s|%s|%d|%s", gc.Name, gc.Protocol, gc.HTTP2, g.connect,
		g.response, intOr(gc.MaxIdleConns, defaultMaxIdleConns), tlsFP)
}

// newTransport builds the group's transport: Fulcrum's own HTTP/1.1 client (h1client.go), or
// the standard library's for HTTP/2. HTTP/2 uses its own support (Go
// 1.24+ http.Protocols): prior-knowledge h2c for http groups, ALPN h2 for https groups, so
// ResponseHeaderTimeout, the dialer and idle limits apply to both protocols alike.
func (g *Group) newTransport() roundTripCloser {
	std := g.stdTransport()
	if g.cfg.HTTP2 {
		return std
	}
	if g.proto == "https" {
		return newH1Transport(std, g.tlsConf)
	}
	return newH1Transport(std, nil)
}

func (g *Group) stdTransport() *http.Transport {
	d := &net.Dialer{Timeout: g.connect, KeepAlive: 30 * time.Second}
	t := &http.Transport{
		Proxy:                 nil, // never route back-end traffic through an environment proxy
		DialContext:           d.DialContext,
		MaxIdleConns:          0, // no global cap; the per-host cap below bounds each target
		MaxIdleConnsPerHost:   intOr(g.cfg.MaxIdleConns, defaultMaxIdleConns),
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   g.connect,
		ResponseHeaderTimeout: g.response,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,              // a proxy passes Accept-Encoding through untouched
		TLSClientConfig:       g.tlsConf.Clone(), // the transport adds "h2" to NextProtos in place
		ForceAttemptHTTP2:     false,
	}
	if g.cfg.HTTP2 {
		var p http.Protocols
		if g.proto == "http" {
			p.SetUnencryptedHTTP2(true)
		} else {
			p.SetHTTP1(true)
			p.SetHTTP2(true)
			t.ForceAttemptHTTP2 = true
		}
		t.Protocols = &p
	} else {
		var p http.Protocols
		p.SetHTTP1(true)
		t.Protocols = &p
	}
	return t
}
