// Package l4 is the layer-4 proxy engine of network (tcp, tls) and classic (tcp, ssl)
// listeners: accept, optional TLS termination or ClientHello peek for SNI routing, dial a
// target, then relay bytes both ways with half-close, idle timeouts and byte counters.
//
// A Handler is the engine behind a door.Listener, which owns the socket, the front door (PROXY
// header, TLS termination with State.TLS) and the connections; the per-generation part
// (targets, TLS configuration, timeouts) is a *State carried by the listener's generation. Each
// connection keeps the generation it was accepted in, so a reload never touches established
// streams.
package l4

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// Mode is what a listener does before dialing: a closed set, chosen in one switch (handle).
type Mode int

const (
	// ModeTCP forwards bytes untouched (network tcp, classic tcp).
	ModeTCP Mode = iota
	// ModeTLS terminates TLS with State.TLS (network tls, classic ssl).
	ModeTLS
	// ModeSNI forwards bytes untouched but routes on the ClientHello's server name (network tcp
	// with host rules: TLS pass-through).
	ModeSNI
)

func (m Mode) String() string {
	switch m {
	case ModeTCP:
		return "tcp"
	case ModeTLS:
		return "tls"
	case ModeSNI:
		return "sni"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ALPNPolicy is the NLB ALPN policy of a tls listener.
type ALPNPolicy int

const (
	ALPNNone ALPNPolicy = iota
	ALPNHTTP1Only
	ALPNHTTP2Only
	ALPNHTTP2Optional
	ALPNHTTP2Preferred
)

// ParseALPNPolicy maps the configuration names (NLB's) to a policy; "" is None.
func ParseALPNPolicy(s string) (ALPNPolicy, error) {
	switch s {
	case "", "None":
		return ALPNNone, nil
	case "HTTP1Only":
		return ALPNHTTP1Only, nil
	case "HTTP2Only":
		return ALPNHTTP2Only, nil
	case "HTTP2Optional":
		return ALPNHTTP2Optional, nil
	case "HTTP2Preferred":
		return ALPNHTTP2Preferred, nil
	}
	return ALPNNone, fmt.Errorf("l4: unknown alpn_policy %q (HTTP1Only, HTTP2Only, HTTP2Optional, HTTP2Preferred, None)", s)
}

// Protos is the server's ALPN preference list (nil: no ALPN extension in the ServerHello).
func (p ALPNPolicy) Protos() []string {
	switch p {
	case ALPNHTTP1Only:
		return []string{"http/1.1"}
	case ALPNHTTP2Only:
		return []string{"h2"}
	case ALPNHTTP2Optional:
		return []string{"http/1.1", "h2"}
	case ALPNHTTP2Preferred:
		return []string{"h2", "http/1.1"}
	}
	return nil
}

// ConnMeta describes one client connection; the dialer builds the outbound PROXY header
// (v2 TLVs: ALPN, authority = SNI, SSL with version and cipher) from it.
type ConnMeta struct {
	Client netip.AddrPort // the real client (after the inbound PROXY layer), unmapped
	Local  netip.AddrPort // the address the client connected to
	// TLS facts, set in ModeTLS (SNI also in ModeSNI, where the rest stays zero).
	TLS                bool
	SNI                string // lower case, as the client sent it
	ALPN               string // negotiated protocol
	TLSVersion         uint16
	CipherSuite        uint16
	ClientCertVerified bool // a client certificate was presented and verified
}

// Dialer connects one client connection to a target of one generation. Implementations pick
// the target, dial it, write any outbound PROXY header and wrap TLS for tls back ends. The
// returned done is called exactly once when the relay ends (release in-flight counters); it
// may be nil. A plain tcp back end should come back as a *net.TCPConn so splice(2) applies.
//
// Balance builds a Dialer from a target group with one retry on another target; most
// callers should use it rather than implement Dialer themselves.
type Dialer interface {
	DialFor(ctx context.Context, meta *ConnMeta) (conn net.Conn, done func(), err error)
}

// Config is the generation-specific part of a listener, turned into a State by NewState.
type Config struct {
	Mode Mode
	// Dialer is the default route (the listener's forward target group).
	Dialer Dialer
	// Route, for ModeSNI, returns the dialer for a server name ("" when the client sent none
	// or the stream is not TLS); nil from Route means Dialer.
	Route func(serverName string) Dialer
	// TLS is the server configuration for ModeTLS (certificates, policy, client auth). NewState
	// clones it and sets NextProtos from ALPN.
	TLS  *tls.Config
	ALPN ALPNPolicy
	// IdleTimeout closes a connection with no bytes in either direction (idle_timeout).
	IdleTimeout time.Duration
	// HandshakeTimeout bounds the TLS handshake or ClientHello peek (the listener's
	// header_timeout, from configs).
	HandshakeTimeout time.Duration
	// ConnectTimeout bounds DialFor, all attempts included (the groups' connect_timeout; the
	// dialer may have a shorter per-attempt timeout).
	ConnectTimeout time.Duration
}

// State is one immutable generation of a listener.
type State struct {
	cfg  Config
	tls  *tls.Config
	tick time.Duration // idle-check granularity, see relay
}

// NewState validates c and prepares a generation.
func NewState(c Config) (*State, error) {
	if c.Dialer == nil {
		return nil, errors.New("l4: state needs a Dialer")
	}
	if c.IdleTimeout <= 0 || c.ConnectTimeout <= 0 || c.HandshakeTimeout <= 0 {
		return nil, fmt.Errorf("l4: idle timeout %v, connect timeout %v and handshake timeout %v must be set (validated configuration)", c.IdleTimeout, c.ConnectTimeout, c.HandshakeTimeout)
	}
	s := &State{cfg: c, tick: idleTick(c.IdleTimeout)}
	switch c.Mode {
	case ModeTCP, ModeSNI:
	case ModeTLS:
		if c.TLS == nil {
			return nil, errors.New("l4: tls mode needs a TLS config")
		}
		s.tls = withALPN(c.TLS, c.ALPN.Protos())
	default:
		return nil, fmt.Errorf("l4: unknown mode %v", c.Mode)
	}
	return s, nil
}

// TLS is the configuration the front door terminates TLS with in ModeTLS (nil otherwise): the
// listener's, with the ALPN policy's protocols.
func (s *State) TLS() *tls.Config { return s.tls }

// Config returns the configuration the state was built from (with defaults applied).
func (s *State) Config() Config { return s.cfg }

// withALPN clones cfg with the policy's protocols. A GetConfigForClient hook (a certificate
// manager choosing per-SNI policies) is wrapped so its configs get the same protocols.
func withALPN(cfg *tls.Config, protos []string) *tls.Config {
	c := cfg.Clone()
	c.NextProtos = protos
	if inner := cfg.GetConfigForClient; inner != nil {
		c.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			got, err := inner(h)
			if err != nil || got == nil {
				return got, err
			}
			if len(got.NextProtos) == 1 && got.NextProtos[0] == "acme-tls/1" {
				return got, nil // a TLS-ALPN-01 challenge answer keeps its protocol
			}
			got = got.Clone() // never mutate the manager's config
			got.NextProtos = protos
			return got, nil
		}
	}
	return c
}

// idleTick is how often a quiet relay looks at the clock: an idle connection closes between
// IdleTimeout and IdleTimeout+tick after its last byte.
func idleTick(idle time.Duration) time.Duration {
	t := idle / 8
	if t < 5*time.Millisecond {
		t = 5 * time.Millisecond
	}
	if t > 30*time.Second {
		t = 30 * time.Second
	}
	return t
}

func (s *State) route(sni string) Dialer {
	if s.cfg.Mode == ModeSNI && s.cfg.Route != nil {
		if d := s.cfg.Route(sni); d != nil {
			return d
		}
	}
	return s.cfg.Dialer
}
