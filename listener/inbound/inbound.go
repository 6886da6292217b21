// Package inbound is the inbound PROXY protocol layer of a listener. It sits directly on the
// accepted sockets, below TLS and below HTTP, so every layer above sees the real client address
// in conn.RemoteAddr().
//
// Semantics (ELB accept_proxy_protocol): when a listener requires the PROXY protocol, a
// connection from outside the trusted prefixes is closed before anything is read from it, and a
// connection from a trusted prefix MUST open with a v1 or v2 header within HeaderTimeout. When a
// listener does not require it, no header is ever believed: Wrap returns the listener untouched
// and a header is just bytes (TLS or HTTP above will refuse them).
//
// The header is read lazily (go-proxyproto reads it on the first Read, Write, RemoteAddr or
// LocalAddr of the conn), so Accept never waits for a slow client. Callers must therefore not
// call RemoteAddr in their accept loop (for net/http: not in ConnContext or ConnState hooks);
// the per-connection goroutine is the place.
package inbound

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/pires/go-proxyproto"
)

// DefaultHeaderTimeout bounds how long a trusted peer may take to send its PROXY header.
const DefaultHeaderTimeout = 5 * time.Second

// ReadBufferSize is the size of the buffer the PROXY layer reads the header through. Bytes the
// client sent right behind the header may sit in it; see Socket.
const ReadBufferSize = 256

// Config is one listener's inbound PROXY protocol policy.
type Config struct {
	// Trusted are the sources allowed to send a header (trusted_proxies).
	Trusted []netip.Prefix
	// Required is accept_proxy_protocol: every connection must come from Trusted and open with
	// a header. False disables the layer.
	Required bool
	// HeaderTimeout bounds the header read; 0 means DefaultHeaderTimeout.
	HeaderTimeout time.Duration
}

// ErrUntrusted is wrapped by the policy error for a connection from outside Trusted (the
// connection is closed inside Accept, which keeps listening).
var ErrUntrusted = errors.New("inbound: PROXY protocol required and source is not a trusted proxy")

// ErrBadTransport is returned for a header whose PROXY command carries anything but TCP over
// IPv4 or IPv6: a stream listener has no use for UDP or Unix addresses.
var ErrBadTransport = errors.New("inbound: PROXY header transport is not TCP over IPv4/IPv6")

// Wrap returns ln with the inbound PROXY layer of cfg, or ln itself when cfg.Required is false.
// Closing the returned listener closes ln. With Required and no Trusted prefix every
// connection is refused (fail closed).
func Wrap(ln net.Listener, cfg Config) net.Listener {
	if !cfg.Required {
		return ln
	}
	timeout := cfg.HeaderTimeout
	if timeout <= 0 {
		timeout = DefaultHeaderTimeout
	}
	trusted := make([]netip.Prefix, len(cfg.Trusted))
	for i, p := range cfg.Trusted {
		// Compare unmapped addresses: a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
		trusted[i] = netip.PrefixFrom(p.Addr().Unmap(), unmappedBits(p)).Masked()
	}
	return &proxyproto.Listener{
		Listener:          ln,
		ConnPolicy:        policy(trusted),
		ValidateHeader:    validate,
		ReadHeaderTimeout: timeout,
		ReadBufferSize:    ReadBufferSize,
	}
}

func unmappedBits(p netip.Prefix) int {
	if p.Addr().Is4In6() {
		if b := p.Bits() - 96; b >= 0 {
			return b
		}
		return 0
	}
	return p.Bits()
}

// policy is REQUIRE for trusted sources and a connection-only rejection (closed inside Accept,
// which keeps listening) for everyone else.
func policy(trusted []netip.Prefix) proxyproto.ConnPolicyFunc {
	return func(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
		ap, ok := AddrPort(o.Upstream)
		if !ok {
			return proxyproto.REJECT, fmt.Errorf("%w: %w: unclassifiable source %v", proxyproto.ErrInvalidUpstream, ErrUntrusted, o.Upstream)
		}
		ip := ap.Addr()
		for _, p := range trusted {
			if p.Contains(ip) {
				return proxyproto.REQUIRE, nil
			}
		}
		return proxyproto.REJECT, fmt.Errorf("%w: %w: %v", proxyproto.ErrInvalidUpstream, ErrUntrusted, ip)
	}
}

// validate keeps LOCAL headers (a proxy's own health checks: the socket addresses stay) and
// PROXY headers for TCP over IPv4/IPv6 only.
func validate(h *proxyproto.Header) error {
	if h.Command.IsLocal() {
		return nil
	}
	switch h.TransportProtocol {
	case proxyproto.TCPv4, proxyproto.TCPv6:
	default:
		return ErrBadTransport
	}
	if _, ok := h.SourceAddr.(*net.TCPAddr); !ok {
		return ErrBadTransport
	}
	if _, ok := h.DestinationAddr.(*net.TCPAddr); !ok {
		return ErrBadTransport
	}
	return nil
}

// AddrPort converts a TCP address to an unmapped netip.AddrPort without allocating.
func AddrPort(a net.Addr) (netip.AddrPort, bool) {
	switch v := a.(type) {
	case *net.TCPAddr:
		ap := v.AddrPort()
		if !ap.IsValid() {
			return ap, false
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	case nil:
		return netip.AddrPort{}, false
	default:
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return ap, false
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	}
}

// unwrap finds the PROXY-protocol conn under c (looking through TLS).
func unwrap(c net.Conn) *proxyproto.Conn {
	for range 4 { // bounded: tls over proxyproto is the deepest stack we build
		switch v := c.(type) {
		case *proxyproto.Conn:
			return v
		case *tls.Conn:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// Handshake forces the PROXY header of c to be read (under the header timeout) and returns
// why the connection must be closed, or nil. It is a no-op for a connection without the
// layer. Call it in the connection's goroutine before using the connection's addresses.
func Handshake(c net.Conn) error {
	pc := unwrap(c)
	if pc == nil {
		return nil
	}
	// A zero-length Read runs header processing once and reports its error; after a good
	// header it returns 0, nil without touching the socket or the buffered bytes.
	if _, err := pc.Read(nil); err != nil {
		return fmt.Errorf("inbound: PROXY header from %v: %w", pc.Raw().RemoteAddr(), err)
	}
	return nil
}

// Header returns the PROXY header c arrived with (looking through TLS), or nil when the
// listener has no PROXY layer or the header was refused. It blocks until the header is read.
func Header(c net.Conn) *proxyproto.Header {
	pc := unwrap(c)
	if pc == nil {
		return nil
	}
	return pc.ProxyHeader()
}

// TLVs returns the v2 TLVs c's PROXY header carried (nil for v1, LOCAL, or no layer).
func TLVs(c net.Conn) ([]proxyproto.TLV, error) {
	h := Header(c)
	if h == nil {
		return nil, nil
	}
	tlvs, err := h.TLVs()
	if err != nil {
		return nil, fmt.Errorf("inbound: PROXY v2 TLVs: %w", err)
	}
	return tlvs, nil
}

// Socket returns the transport connection under a PROXY-protocol conn c (c itself
// otherwise), so a copier can hand concrete *net.TCPConn values to io.Copy and get splice(2).
//
// Writing to the socket is always equivalent to writing to c once Handshake returned nil.
// Reading is equivalent only after a Read on c with a buffer of at least ReadBufferSize bytes
// returned n > 0: the PROXY layer may hold bytes the client sent right behind the header, and
// such a Read returns all of them and drops the buffer (go-proxyproto v0.15.0 behaviour, pinned
// by TestSocketAfterFirstRead).
func Socket(c net.Conn) net.Conn {
	if pc, ok := c.(*proxyproto.Conn); ok {
		return pc.Raw()
	}
	return c
}

// Layer applies cfg to single connections. It is Wrap for accept loops that choose the policy
// per connection (a reload can change trusted_proxies or accept_proxy_protocol while the socket
// stays open). A nil *Layer passes connections through.
type Layer struct {
	trusted []netip.Prefix
	timeout time.Duration
}

// NewLayer returns the per-connection form of cfg, or nil when cfg.Required is false.
func NewLayer(cfg Config) *Layer {
	if !cfg.Required {
		return nil
	}
	l := &Layer{timeout: cfg.HeaderTimeout, trusted: make([]netip.Prefix, len(cfg.Trusted))}
	if l.timeout <= 0 {
		l.timeout = DefaultHeaderTimeout
	}
	for i, p := range cfg.Trusted {
		l.trusted[i] = netip.PrefixFrom(p.Addr().Unmap(), unmappedBits(p)).Masked()
	}
	return l
}

// Conn returns an error wrapping ErrUntrusted when c does not come from a trusted proxy (the
// caller closes c, after counting it, so a peer never sees the close before the count); otherwise it returns c behind the PROXY layer (the header is read lazily, on the
// connection's own goroutine, under the header timeout).
func (l *Layer) Conn(c net.Conn) (net.Conn, error) {
	if l == nil {
		return c, nil
	}
	pol, err := policy(l.trusted)(proxyproto.ConnPolicyOptions{Upstream: c.RemoteAddr(), Downstream: c.LocalAddr()})
	if err != nil || pol != proxyproto.REQUIRE {
		if err == nil {
			err = ErrUntrusted
		}
		return nil, err
	}
	return proxyproto.NewConn(c,
		proxyproto.WithPolicy(proxyproto.REQUIRE),
		proxyproto.ValidateHeader(validate),
		proxyproto.SetReadHeaderTimeout(l.timeout),
		proxyproto.WithBufferSize(ReadBufferSize),
	), nil
}
