package backends

import (
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
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// clientTLS is the one builder of a group's client TLS, used by its HTTP transport, by L4
// re-encryption and by TLS health checks alike. It returns the configuration and a fingerprint
// of everything it was built from (part of the transport and target keys, so an unchanged group
// keeps its pooled connections and its targets' health across reloads).
//
// Trust comes from tls.authority (the certificate manager's private CA), tls.ca_file, or the
// system roots. Pins are SHA-256 digests of a SubjectPublicKeyInfo. With pins and neither
// authority nor ca_file, the chain is not verified and the leaf's key must match a pin (ELB
// Classic back-end authentication: a self-signed target is fine). With a CA and pins, the chain
// must verify and some certificate of the verified chain must match a pin.
func clientTLS(cfg *configs.Config, g *configs.TargetGroup, tlsp TLSProvider) (*tls.Config, string, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	bt := g.TLS
	if bt == nil {
		return c, "system", nil
	}
	if (bt.Authority != "" || bt.ClientCertificate != "") && tlsp == nil {
		return nil, "", errors.New("tls: authority and client_certificate need the certificate manager")
	}
	fp := sha256.New()
	fmt.Fprintf(fp, "%s|%v|%q|%s|", bt.ServerName, bt.InsecureSkipVerify, bt.PinPublicKeys, bt.ClientCertificate)
	c.ServerName = bt.ServerName
	switch {
	case bt.Authority != "":
		ca, err := tlsp.AuthorityCert(bt.Authority)
		if err != nil {
			return nil, "", fmt.Errorf("tls.authority: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		c.RootCAs.AddCert(ca)
		fp.Write(ca.Raw)
	case bt.CAFile != "":
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
	if pins := bt.Pins(); len(pins) > 0 {
		leafOnly := c.RootCAs == nil
		if leafOnly {
			// Standard verification is replaced by the pin check below.
			c.InsecureSkipVerify = true //nolint:gosec // verified by VerifyConnection
		}
		c.VerifyConnection = func(cs tls.ConnectionState) error { return checkPins(pins, cs, leafOnly) }
	} else if bt.InsecureSkipVerify {
		c.InsecureSkipVerify = true //nolint:gosec // explicit operator opt-out (lab use)
	}
	if name := bt.ClientCertificate; name != "" {
		get, err := tlsp.ClientCertificate(name)
		if err != nil {
			return nil, "", fmt.Errorf("tls.client_certificate: %w", err)
		}
		c.GetClientCertificate = get
	}
	return c, hex.EncodeToString(fp.Sum(nil)), nil
}

// pinOf returns the "sha256/BASE64" pin of a certificate's public key.
func pinOf(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256/" + base64.StdEncoding.EncodeToString(sum[:])
}

var errPinMismatch = errors.New("tls: back-end public key matches no pin_public_keys entry")

func checkPins(pins [][32]byte, cs tls.ConnectionState, leafOnly bool) error {
	match := func(c *x509.Certificate) bool {
		sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
		for _, p := range pins {
			if p == sum {
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
		g.response, gc.MaxIdleConns, tlsFP)
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
		DialContext:           g.reg.countingDial(d.DialContext),
		MaxIdleConns:          0, // no global cap; the per-host cap below bounds each target
		MaxIdleConnsPerHost:   g.cfg.MaxIdleConns,
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
