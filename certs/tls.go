package certs

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// Session-ticket keys: a new key encrypts the tickets issued after each TicketRotation, and a
// key is kept for decryption until every ticket it encrypted has outlived TicketLifetime.
//
// TicketLifetime is what Go's TLS 1.3 server advertises in every NewSessionTicket (fixed at
// seven days; crypto/tls has no setting for it), so it is what a ticket must be honoured for:
// keys used to be dropped after 12-24 hours while tickets claimed seven days. It is also the
// retention Go uses for its own automatic ticket keys. TLS 1.2 tickets carry no lifetime hint.
const (
	TicketRotation = 12 * time.Hour
	TicketLifetime = 7 * 24 * time.Hour
	// ticketKeysKept is the current key plus enough previous ones that a ticket issued at the
	// very end of its key's turn still decrypts TicketLifetime later.
	ticketKeysKept = 1 + int((TicketLifetime+TicketRotation-1)/TicketRotation)
)

var (
	errNoCertificate = errors.New("certs: no certificate for this listener")
	errACMEOnly      = errors.New("certs: acme-tls/1 is served only during a TLS-ALPN-01 validation")
)

// Cipher suites by policy. TLS 1.3 suites are not configurable in Go and are all AEAD.
var (
	suitesRecommended = []uint16{
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
		tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
		tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
		tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
	}
	suitesCompatible = append(append([]uint16(nil), suitesRecommended...),
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA,
		tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA,
		tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
		tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA,
		tls.TLS_RSA_WITH_AES_128_GCM_SHA256,
		tls.TLS_RSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_RSA_WITH_AES_128_CBC_SHA,
		tls.TLS_RSA_WITH_AES_256_CBC_SHA,
	)
)

// ServerTLS returns the listener's TLS configuration: its policy, SNI among ONLY its
// certificates (exact name, then wildcard, then its first certificate), rotated session
// tickets and client authentication. The caller sets NextProtos.
func (m *Manager) ServerTLS(l *configs.Listener) (*tls.Config, error) {
	return m.serverTLS(m.cfg.Load(), m.snap.Load(), l)
}

// serverTLS builds ServerTLS, checked against snap (the served certificates or pending ones);
// the configuration it returns reads the served ones at each handshake.
func (m *Manager) serverTLS(cfg *configs.Config, snap *snapshot, l *configs.Listener) (*tls.Config, error) {
	if len(l.Certificates) == 0 {
		return nil, fmt.Errorf("certs: listener %s has no certificates", l.Name)
	}
	names := append([]string(nil), l.Certificates...)
	set := make(map[string]struct{}, len(names))
	for _, n := range names {
		if snap.certs[n] == nil {
			return nil, fmt.Errorf("certs: listener %s: unknown certificate %q", l.Name, n)
		}
		set[n] = struct{}{}
	}
	tc := &tls.Config{
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return m.pick(names, set, hello)
		},
		// TLS-ALPN-01 validation needs acme-tls/1 negotiated, which the listener's NextProtos
		// never list: such hellos get their own small config (or are refused). A caller that
		// wraps this hook must keep the NextProtos of the configs it returns.
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			if onlyACMETLS(hello) {
				return m.acmeConfigFor(hello)
			}
			return nil, nil
		},
	}
	switch l.TLSPolicy {
	case "", "recommended":
		tc.MinVersion = tls.VersionTLS12
		tc.CipherSuites = suitesRecommended
	case "tls13":
		tc.MinVersion = tls.VersionTLS13
	case "compatible":
		tc.MinVersion = tls.VersionTLS10
		tc.CipherSuites = suitesCompatible
	default:
		return nil, fmt.Errorf("certs: listener %s: unknown tls_policy %q", l.Name, l.TLSPolicy)
	}
	// Tickets are encrypted under per-listener keys derived from the rotating secrets, so a
	// ticket from one listener never resumes on another (different certificates or mTLS).
	holder := m.tickets.holder(l.Name)
	tc.WrapSession = holder.EncryptTicket
	tc.UnwrapSession = holder.DecryptTicket

	if ca := l.ClientAuth; ca != nil {
		switch ca.Mode {
		case "", "off":
		case "verify":
			pool, err := trustPool(cfg, snap, ca.Authority, ca.CAFile)
			if err != nil {
				return nil, fmt.Errorf("certs: listener %s client_auth: %w", l.Name, err)
			}
			if pool == nil {
				return nil, fmt.Errorf("certs: listener %s: client_auth verify needs authority or ca_file", l.Name)
			}
			tc.ClientCAs = pool
			tc.ClientAuth = tls.RequireAndVerifyClientCert
		case "passthrough":
			// The chain is handed to the back end in headers; verification is theirs.
			tc.ClientAuth = tls.RequestClientCert
		default:
			return nil, fmt.Errorf("certs: listener %s: unknown client_auth mode %q", l.Name, ca.Mode)
		}
	}
	return tc, nil
}

// pick selects the certificate for a ClientHello among the listener's certificates.
func (m *Manager) pick(names []string, set map[string]struct{}, hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	// tls-alpn-01 hellos are answered by GetConfigForClient; without a pending challenge they
	// would otherwise cost a cache walk each.
	if onlyACMETLS(hello) {
		return nil, errACMEOnly
	}
	snap := m.snap.Load()
	if name := normalizeSNI(hello.ServerName); name != "" {
		// certmagic's index returns exact matches first, then wildcard candidates.
		for _, c := range m.cache.AllMatchingCertificates(name) {
			for _, tag := range c.Tags {
				n, ok := strings.CutPrefix(tag, tagPrefix)
				if !ok {
					continue
				}
				if _, mine := set[n]; !mine {
					continue
				}
				if e := snap.certs[n]; e != nil {
					if tc := e.cur.Load(); tc != nil {
						return tc, nil
					}
				}
			}
		}
	}
	// Unknown or absent SNI: the listener's first certificate, never an internal_error alert.
	for _, n := range names {
		if e := snap.certs[n]; e != nil {
			if tc := e.cur.Load(); tc != nil {
				return tc, nil
			}
		}
	}
	return nil, errNoCertificate
}

func normalizeSNI(s string) string {
	s = strings.TrimSuffix(s, ".")
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(s)
		}
	}
	return s
}

// trustPool is the authority's CA certificate (from snap) or the certificates in caFile
// (relative to cfg's file); nil if neither.
func trustPool(cfg *configs.Config, snap *snapshot, authority, caFile string) (*x509.CertPool, error) {
	switch {
	case authority != "":
		a := snap.auths[authority]
		if a == nil {
			return nil, fmt.Errorf("unknown authority %q", authority)
		}
		return a.Pool(), nil
	case caFile != "":
		p := caFile
		if cfg != nil {
			p = cfg.Resolve(caFile)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s: no certificates", p)
		}
		return pool, nil
	}
	return nil, nil
}

// AuthorityCert is the CA certificate of a private authority, for target groups that trust it
// (backends builds their client TLS; it satisfies backends.TLSProvider with ClientCertificate).
func (m *Manager) AuthorityCert(name string) (*x509.Certificate, error) {
	return authorityCert(m.snap.Load(), name)
}

// ClientCertificate is the handshake callback presenting the managed certificate name to a
// target that asks for one; it reads the served certificate at each handshake, so renewals apply.
func (m *Manager) ClientCertificate(name string) (func(*tls.CertificateRequestInfo) (*tls.Certificate, error), error) {
	return m.clientCertificate(m.snap.Load(), name)
}

func authorityCert(snap *snapshot, name string) (*x509.Certificate, error) {
	a := snap.auths[name]
	if a == nil {
		return nil, fmt.Errorf("certs: unknown authority %q", name)
	}
	return a.Cert, nil
}

func (m *Manager) clientCertificate(snap *snapshot, name string) (func(*tls.CertificateRequestInfo) (*tls.Certificate, error), error) {
	if snap.certs[name] == nil {
		return nil, fmt.Errorf("certs: unknown client certificate %q", name)
	}
	return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		if e := m.snap.Load().certs[name]; e != nil {
			if c := e.cur.Load(); c != nil {
				return c, nil
			}
		}
		return &tls.Certificate{}, nil // no certificate rather than a failed handshake
	}, nil
}

// ticketKeys holds the rotating ticket secrets (newest first) and one ticket-encryption
// holder Config per listener name; only the manager's rotation goroutine changes the secrets.
type ticketKeys struct {
	mu      sync.Mutex
	secrets [][32]byte
	holders map[string]*tls.Config
}

func (t *ticketKeys) init() {
	t.holders = map[string]*tls.Config{}
	t.secrets = [][32]byte{newSecret()}
}

func newSecret() [32]byte {
	var s [32]byte
	if _, err := rand.Read(s[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return s
}

func deriveTicketKeys(secrets [][32]byte, listener string) [][32]byte {
	out := make([][32]byte, len(secrets))
	for i, s := range secrets {
		h := hmac.New(sha256.New, s[:])
		h.Write([]byte("fulcrum session ticket/" + listener))
		copy(out[i][:], h.Sum(nil))
	}
	return out
}

func (t *ticketKeys) holder(listener string) *tls.Config {
	t.mu.Lock()
	defer t.mu.Unlock()
	if h := t.holders[listener]; h != nil {
		return h
	}
	h := &tls.Config{}
	h.SetSessionTicketKeys(deriveTicketKeys(t.secrets, listener))
	t.holders[listener] = h
	return h
}

func (t *ticketKeys) rotate() {
	t.mu.Lock()
	defer t.mu.Unlock()
	keep := min(len(t.secrets), ticketKeysKept-1)
	t.secrets = append([][32]byte{newSecret()}, t.secrets[:keep]...)
	for name, h := range t.holders {
		h.SetSessionTicketKeys(deriveTicketKeys(t.secrets, name))
	}
}

// rotateTickets rotates the session-ticket keys, every TicketRotation.
func (m *Manager) rotateTickets() {
	if m.fleet == nil { // a fleet's keys are rotated by its leader
		m.tickets.rotate()
	}
}

// RotateTicketKeys rotates now (tests, or an operator after a suspected key leak).
func (m *Manager) RotateTicketKeys() {
	if m.fleet != nil {
		m.fleetRotateTickets()
		return
	}
	m.tickets.rotate()
}
