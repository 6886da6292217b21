package listener

import (
	"crypto/tls"
	"encoding/hex"
	"encoding/pem"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// The headers that carry a client certificate to targets, named as an AWS Application Load
// Balancer names them so that back ends written for ALB mutual TLS work unchanged: the whole
// chain in passthrough mode, the verified leaf's details in verify mode.
const (
	mtlsPrefix     = "X-Amzn-Mtls-Clientcert"
	mtlsChain      = "X-Amzn-Mtls-Clientcert"               // passthrough: URL-encoded PEM, leaf first
	mtlsSerial     = "X-Amzn-Mtls-Clientcert-Serial-Number" // verify: hex
	mtlsIssuer     = "X-Amzn-Mtls-Clientcert-Issuer"        // verify: RFC 2253
	mtlsSubject    = "X-Amzn-Mtls-Clientcert-Subject"       // verify: RFC 2253
	mtlsValidity   = "X-Amzn-Mtls-Clientcert-Validity"      // verify: NotBefore=RFC3339;NotAfter=RFC3339
	mtlsLeaf       = "X-Amzn-Mtls-Clientcert-Leaf"          // verify: URL-encoded PEM
	clientAuthPass = "passthrough"
	clientAuthVer  = "verify"
)

// screenHeaders runs once over the outgoing request's header names. Unless the client is in
// trusted_forwarders (the address a PROXY header gave, else the peer: whoever wrote these
// headers), it removes what only a proxy may say about a client: client-certificate headers
// (only this listener's own TLS handshake may say what certificate a client presented), and
// X-Real-IP and Forwarded, which targets read as the client's address. With
// drop_invalid_header_fields it also removes fields whose names are not letters, digits and
// hyphens (ALB's rule), such as "X_Forwarded_For", which some servers read as X-Forwarded-For.
func screenHeaders(h http.Header, trusted, dropInvalid bool) {
	for k := range h {
		switch {
		case dropInvalid && !validHeaderName(k):
			delete(h, k)
		case !trusted && (strings.HasPrefix(k, mtlsPrefix) || k == "X-Real-Ip" || k == "Forwarded"):
			delete(h, k)
		}
	}
}

// validHeaderName reports whether name matches ^[A-Za-z0-9-]+$.
func validHeaderName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// connTLS is the TLS state of the request's client connection; false over plain HTTP. HTTP/2
// requests carry it; HTTP/1 requests over TLS come through the desync sniffer, which keeps it.
// It returns a copy rather than a pointer so that the common case allocates nothing.
func connTLS(r *http.Request) (tls.ConnectionState, bool) {
	if r.TLS != nil {
		return *r.TLS, true
	}
	if dc := desync.ConnFromContext(r.Context()); dc != nil {
		return dc.ConnectionState()
	}
	return tls.ConnectionState{}, false
}

// setClientCertHeaders passes the client's certificate to the target as the listener's
// client_auth mode says: the whole chain (passthrough, unverified: the target must verify it) or
// the verified leaf and its details (verify). Nothing is set when the client sent none.
func setClientCertHeaders(h http.Header, mode string, cs tls.ConnectionState) {
	if len(cs.PeerCertificates) == 0 {
		return
	}
	switch mode {
	case clientAuthPass:
		var b strings.Builder
		for _, c := range cs.PeerCertificates {
			b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
		}
		h[mtlsChain] = []string{url.PathEscape(b.String())}
	case clientAuthVer:
		leaf := cs.PeerCertificates[0]
		h[mtlsSerial] = []string{strings.ToUpper(hex.EncodeToString(leaf.SerialNumber.Bytes()))}
		h[mtlsIssuer] = []string{leaf.Issuer.String()}
		h[mtlsSubject] = []string{leaf.Subject.String()}
		h[mtlsValidity] = []string{"NotBefore=" + leaf.NotBefore.UTC().Format(time.RFC3339) + ";NotAfter=" + leaf.NotAfter.UTC().Format(time.RFC3339)}
		h[mtlsLeaf] = []string{url.PathEscape(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})))}
	}
}
