package backends

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"net/netip"
	"strconv"
)

// ProxyInfo is what the PROXY protocol header tells a target about the client's connection.
// HasTLS says the client connection was TLS terminated by Fulcrum; then TLSVersion, Cipher
// (crypto/tls constants) and ClientCertVerified describe it.
type ProxyInfo struct {
	Src, Dst           netip.AddrPort
	ALPN, SNI          string
	TLSVersion, Cipher uint16
	ClientCertVerified bool
	HasTLS             bool
}

// PROXY protocol v2 constants (haproxy proxy-protocol.txt, section 2.2).
const (
	pp2Sig = "\r\n\r\n\x00\r\nQUIT\n"

	pp2CmdLocal = 0x20
	pp2CmdProxy = 0x21

	pp2FamUnspec = 0x00
	pp2TCP4      = 0x11
	pp2TCP6      = 0x21

	pp2TypeALPN      = 0x01
	pp2TypeAuthority = 0x02
	pp2TypeSSL       = 0x20
	pp2SubSSLVersion = 0x21
	pp2SubSSLCipher  = 0x23

	pp2ClientSSL      = 0x01
	pp2ClientCertConn = 0x02
	pp2ClientCertSess = 0x04
)

var errPP2TooLong = errors.New("proxy protocol v2: header longer than 65535 bytes")

// addrs returns src and dst in one family (a v4/v6 mix becomes v4-mapped v6), or ok=false when
// either is missing.
func (pi *ProxyInfo) addrs() (src, dst netip.AddrPort, v4, ok bool) {
	if pi == nil || !pi.Src.IsValid() || !pi.Dst.IsValid() {
		return src, dst, false, false
	}
	s, d := pi.Src.Addr().Unmap(), pi.Dst.Addr().Unmap()
	if s.Is4() != d.Is4() {
		s, d = netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16())
	}
	return netip.AddrPortFrom(s, pi.Src.Port()), netip.AddrPortFrom(d, pi.Dst.Port()), s.Is4(), true
}

// appendProxyV1 appends a PROXY protocol v1 (text) header: "PROXY TCP4 src dst sport dport\r\n",
// TCP6 for IPv6, or "PROXY UNKNOWN\r\n" when pi is nil or lacks addresses.
func appendProxyV1(b []byte, pi *ProxyInfo) []byte {
	src, dst, v4, ok := pi.addrs()
	if !ok {
		return append(b, "PROXY UNKNOWN\r\n"...)
	}
	if v4 {
		b = append(b, "PROXY TCP4 "...)
	} else {
		b = append(b, "PROXY TCP6 "...)
	}
	b = src.Addr().AppendTo(b)
	b = append(b, ' ')
	b = dst.Addr().AppendTo(b)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(src.Port()), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(dst.Port()), 10)
	return append(b, "\r\n"...)
}

// appendProxyV2 appends a PROXY protocol v2 (binary) header. A nil pi gives the LOCAL command
// (health checks, no client); missing addresses give LOCAL with AF_UNSPEC plus TLVs. TLVs: ALPN and
// AUTHORITY (SNI) when set, and SSL (client bits, verify, version and cipher sub-TLVs) when HasTLS.
func appendProxyV2(b []byte, pi *ProxyInfo) ([]byte, error) {
	start := len(b)
	b = append(b, pp2Sig...)
	if pi == nil {
		return append(b, pp2CmdLocal, pp2FamUnspec, 0, 0), nil
	}
	src, dst, v4, ok := pi.addrs()
	if ok {
		b = append(b, pp2CmdProxy)
	} else {
		// PROXY with AF_UNSPEC may be rejected by receivers (go-proxyproto does); LOCAL tells
		// them to use the connection's own addresses, and still carries the TLVs.
		b = append(b, pp2CmdLocal)
	}
	switch {
	case !ok:
		b = append(b, pp2FamUnspec, 0, 0)
	case v4:
		b = append(b, pp2TCP4, 0, 0)
		s, d := src.Addr().As4(), dst.Addr().As4()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	default:
		b = append(b, pp2TCP6, 0, 0)
		s, d := src.Addr().As16(), dst.Addr().As16()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	}
	if ok {
		b = binary.BigEndian.AppendUint16(b, src.Port())
		b = binary.BigEndian.AppendUint16(b, dst.Port())
	}
	if pi.ALPN != "" {
		b = appendTLV(b, pp2TypeALPN, pi.ALPN)
	}
	if pi.SNI != "" {
		b = appendTLV(b, pp2TypeAuthority, pi.SNI)
	}
	if pi.HasTLS {
		b = append(b, pp2TypeSSL, 0, 0)
		ssl := len(b)
		client := byte(pp2ClientSSL)
		verify := uint32(1) // non-zero: no verified client certificate
		if pi.ClientCertVerified {
			client |= pp2ClientCertConn | pp2ClientCertSess
			verify = 0
		}
		b = append(b, client)
		b = binary.BigEndian.AppendUint32(b, verify)
		// The version sub-TLV is mandatory when PP2_CLIENT_SSL is set.
		v := tlsVersionName(pi.TLSVersion)
		if v == "" {
			v = "unknown"
		}
		b = appendTLV(b, pp2SubSSLVersion, v)
		if c := cipherName(pi.Cipher); c != "" {
			b = appendTLV(b, pp2SubSSLCipher, c)
		}
		n := len(b) - ssl
		if n > 0xffff {
			return b[:start], errPP2TooLong
		}
		binary.BigEndian.PutUint16(b[ssl-2:], uint16(n))
	}
	n := len(b) - start - 16
	if n > 0xffff {
		return b[:start], errPP2TooLong
	}
	binary.BigEndian.PutUint16(b[start+14:], uint16(n))
	return b, nil
}

func appendTLV(b []byte, typ byte, v string) []byte {
	if len(v) > 0xffff {
		v = v[:0xffff] // the whole header check reports the overflow
	}
	b = append(b, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

// tlsVersionName is the OpenSSL spelling HAProxy sends in PP2_SUBTYPE_SSL_VERSION.
func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS10:
		return "TLSv1"
	case tls.VersionTLS11:
		return "TLSv1.1"
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	case 0:
		return ""
	}
	return "0x" + strconv.FormatUint(uint64(v), 16)
}

// cipherName is the OpenSSL name (what HAProxy sends) for the AEAD suites Fulcrum's policies
// allow; other suites fall back to the IANA name. TLS 1.3 names are the same in both.
func cipherName(c uint16) string {
	switch c {
	case 0:
		return ""
	case tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256:
		return "ECDHE-ECDSA-AES128-GCM-SHA256"
	case tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384:
		return "ECDHE-ECDSA-AES256-GCM-SHA384"
	case tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256:
		return "ECDHE-RSA-AES128-GCM-SHA256"
	case tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384:
		return "ECDHE-RSA-AES256-GCM-SHA384"
	case tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256:
		return "ECDHE-ECDSA-CHACHA20-POLY1305"
	case tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256:
		return "ECDHE-RSA-CHACHA20-POLY1305"
	}
	return tls.CipherSuiteName(c)
}
