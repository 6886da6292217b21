package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/mholt/acmez/v3"
	"github.com/mholt/acmez/v3/acme"
)

// ACME issuance. certmagic's ACMEIssuer is not used: it keeps the account key as PEM in its
// storage, runs its own challenge listeners and consults ARI. acmez (certmagic's own ACME
// client) is driven directly instead: the account key is generated in the keystore (in the
// HSM with type = "pkcs11"), the CSR is signed by the certificate's keystore key, and the
// challenges are answered by Fulcrum's own listeners through the manager (HTTP-01 with
// HandleHTTPChallenge, TLS-ALPN-01 in the TLS configurations ServerTLS returns).

// httpChallengePrefix is the path under which HTTP-01 challenges are served.
const httpChallengePrefix = "/.well-known/acme-challenge/"

// ACME retry pacing: failed validations count against the CA's rate limits (Let's Encrypt
// allows 5 per account, hostname and hour), so retries start slow and back off to hours.
const (
	acmeRetryMin = 30 * time.Second
	acmeRetryMax = 6 * time.Hour
)

// acmeIssuer is a certmagic.Issuer that obtains a certificate from an ACME server for a CSR
// signed by a keystore key. One per configured certificate; certificates with the same
// directory and e-mail share the ACME account (its key name is derived from both).
type acmeIssuer struct {
	m         *Manager
	directory string
	email     string
	eab       *acme.EAB // external account binding, when the CA requires one
	client    *acmez.Client

	mu      sync.Mutex
	account *acme.Account // registered (or found again) on first use
}

func (m *Manager) newACMEIssuer(cfg *configs.Config, c configs.Certificate) (*acmeIssuer, error) {
	for _, d := range c.Domains {
		if strings.HasPrefix(d, "*.") && c.ACMEDNS == nil {
			return nil, fmt.Errorf("acme: %s: wildcard names need the DNS-01 challenge: configure acme_dns", d)
		}
	}
	roots, err := x509.SystemCertPool()
	if err != nil || roots == nil {
		roots = x509.NewCertPool()
	}
	if c.ACMECAFile != "" {
		p := cfg.Resolve(c.ACMECAFile)
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("acme_ca_file: %w", err)
		}
		if !roots.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("acme_ca_file %s: no PEM certificates", p)
		}
	}
	var tr http.RoundTripper = &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		TLSClientConfig:       &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	iss := &acmeIssuer{m: m, directory: c.ACME, email: c.ACMEEmail}
	if c.ACMEEABKeyID != "" {
		mac, err := keystore.ReadSecret(c.ACMEEABMACKey, cfg.Resolve)
		if err != nil {
			return nil, fmt.Errorf("acme_eab_mac_key: %w", err)
		}
		// CAs hand MAC keys out as base64url, some with padding or in standard base64;
		// acmez wants unpadded base64url.
		mac = strings.TrimRight(strings.NewReplacer("+", "-", "/", "_").Replace(mac), "=")
		if _, err := base64.RawURLEncoding.DecodeString(mac); err != nil || mac == "" {
			return nil, fmt.Errorf("acme_eab_mac_key: not a base64 MAC key")
		}
		iss.eab = &acme.EAB{KeyID: c.ACMEEABKeyID, MACKey: mac}
	}
	iss.client = &acmez.Client{
		Client: &acme.Client{
			Directory:   c.ACME,
			HTTPClient:  &http.Client{Transport: noARI{tr, c.ACME}, Timeout: 2 * time.Minute},
			UserAgent:   "fulcrum",
			PollTimeout: 3 * time.Minute,
			Logger:      m.log.With("acme", c.ACME),
		},
		ChallengeSolvers: map[string]acmez.Solver{
			acme.ChallengeTypeHTTP01:    httpSolver{&m.chal},
			acme.ChallengeTypeTLSALPN01: alpnSolver{&m.chal},
		},
	}
	m.fleetSolvers(iss.client)
	if c.ACMEDNS != nil {
		// DNS-01 alone: it proves wildcards and works whether or not the CA reaches our
		// listeners, and an operator who configured DNS expects DNS to be used.
		solver, err := newDNSSolver(cfg, c.ACMEDNS)
		if err != nil {
			return nil, err
		}
		iss.client.ChallengeSolvers = map[string]acmez.Solver{acme.ChallengeTypeDNS01: solver}
	}
	return iss, nil
}

// IssuerKey names the ACME directory; stored certificates are reused only for the same one.
func (a *acmeIssuer) IssuerKey() string { return "acme:" + a.directory }

// Issue runs an ACME order for the CSR's names and returns the chain (leaf first).
func (a *acmeIssuer) Issue(ctx context.Context, csr *x509.CertificateRequest) (*certmagic.IssuedCertificate, error) {
	acct, err := a.ensureAccount(ctx)
	if err != nil {
		return nil, err
	}
	params, err := acmez.OrderParametersFromCSR(acct, csr)
	if err != nil {
		return nil, fmt.Errorf("acme order: %w", err)
	}
	chains, err := a.client.ObtainCertificate(ctx, params)
	if err != nil {
		return nil, fmt.Errorf("acme %s: %w", a.directory, err)
	}
	if len(chains) == 0 || len(chains[0].ChainPEM) == 0 {
		return nil, fmt.Errorf("acme %s: no certificate chain returned", a.directory)
	}
	return &certmagic.IssuedCertificate{Certificate: chains[0].ChainPEM}, nil
}

// ensureAccount finds or creates the account key in the keystore and registers it. newAccount
// with a known key returns the existing account (RFC 8555 §7.3.1), so nothing but the key
// needs to be kept.
func (a *acmeIssuer) ensureAccount(ctx context.Context) (acme.Account, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.account != nil {
		return *a.account, nil
	}
	keyName := a.m.acmeAccountKey(a.directory, a.email)
	signer, err := a.m.accountKey(ctx, keyName)
	if err != nil {
		return acme.Account{}, fmt.Errorf("acme account key %s in %s: %w", keyName, a.m.ks.Describe(), err)
	}
	acct := acme.Account{TermsOfServiceAgreed: true, PrivateKey: jwsSigner{signer}}
	if a.email != "" {
		acct.Contact = []string{"mailto:" + a.email}
	}
	if a.eab != nil {
		// Sent with every newAccount: for a key already registered the CA returns the
		// existing account, bound when it was created.
		if err := acct.SetExternalAccountBinding(ctx, a.client.Client, *a.eab); err != nil {
			return acme.Account{}, fmt.Errorf("acme %s: external account binding: %w", a.directory, err)
		}
	}
	acct, err = a.client.NewAccount(ctx, acct)
	if err != nil {
		return acme.Account{}, fmt.Errorf("acme %s: account: %w", a.directory, err)
	}
	a.account = &acct
	return acct, nil
}

// noARI hides the directory's renewalInfo entry from acmez, which otherwise fetches ACME
// Renewal Information after every download: renewal is timed by our own loop from the
// certificate's validity, and nothing reaches the network unless we ask for it.
type noARI struct {
	rt        http.RoundTripper
	directory string
}

func (n noARI) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := n.rt.RoundTrip(req)
	if err != nil || req.Method != http.MethodGet || req.URL.String() != n.directory || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("acme directory: %w", err)
	}
	var dir map[string]json.RawMessage
	if json.Unmarshal(body, &dir) == nil {
		if _, ok := dir["renewalInfo"]; ok {
			delete(dir, "renewalInfo")
			if b, err := json.Marshal(dir); err == nil {
				body = b
			}
		}
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	resp.ContentLength = int64(len(body))
	resp.Header.Del("Content-Length")
	return resp, nil
}

// acmeAccountKey names the account key: one account per directory and e-mail.
func (m *Manager) acmeAccountKey(directory, email string) string {
	sum := sha256.Sum256([]byte(directory + "\x00" + email))
	return m.prefix + "acme-account-" + hex.EncodeToString(sum[:8])
}

// jwsSigner adapts a keystore signer to JWS: ES256/ES384 signatures are the fixed-width
// concatenation r||s (RFC 7518 §3.4), while crypto.Signer (and PKCS#11 through crypto11)
// returns ASN.1 DER. acmez only converts for *ecdsa.PrivateKey.
type jwsSigner struct{ crypto.Signer }

func (j jwsSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := j.Signer.Sign(r, digest, opts)
	if err != nil {
		return nil, err
	}
	pub, ok := j.Public().(*ecdsa.PublicKey)
	if !ok {
		return sig, nil
	}
	var rs struct{ R, S *big.Int }
	if rest, err := asn1.Unmarshal(sig, &rs); err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("acme account signature: not ASN.1 ECDSA: %v", err)
	}
	size := (pub.Curve.Params().BitSize + 7) / 8
	out := make([]byte, 2*size)
	rs.R.FillBytes(out[:size])
	rs.S.FillBytes(out[size:])
	return out, nil
}

// challenges holds the pending ACME challenges the listeners answer. pending lets the HTTP
// hook return at once (one atomic load) when nothing is being validated.
type challenges struct {
	pending atomic.Int64
	mu      sync.RWMutex
	http    map[string]acme.Challenge   // by token
	alpn    map[string]*tls.Certificate // by lower-case identifier (SNI)
}

func (c *challenges) putHTTP(ch acme.Challenge) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.http == nil {
		c.http = map[string]acme.Challenge{}
	}
	if _, dup := c.http[ch.Token]; !dup {
		c.pending.Add(1)
	}
	c.http[ch.Token] = ch
}

func (c *challenges) delHTTP(ch acme.Challenge) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.http[ch.Token]; ok {
		delete(c.http, ch.Token)
		c.pending.Add(-1)
	}
}

func (c *challenges) putALPN(name string, cert *tls.Certificate) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.alpn == nil {
		c.alpn = map[string]*tls.Certificate{}
	}
	c.alpn[name] = cert
}

func (c *challenges) delALPN(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.alpn, name)
}

func (c *challenges) alpnCert(name string) *tls.Certificate {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.alpn[name]
}

type httpSolver struct{ c *challenges }

func (s httpSolver) Present(_ context.Context, ch acme.Challenge) error { s.c.putHTTP(ch); return nil }
func (s httpSolver) CleanUp(_ context.Context, ch acme.Challenge) error { s.c.delHTTP(ch); return nil }

type alpnSolver struct{ c *challenges }

func (s alpnSolver) Present(_ context.Context, ch acme.Challenge) error {
	cert, err := acmez.TLSALPN01ChallengeCert(ch)
	if err != nil {
		return err
	}
	s.c.putALPN(alpnName(ch.Identifier), cert)
	return nil
}

func (s alpnSolver) CleanUp(_ context.Context, ch acme.Challenge) error {
	s.c.delALPN(alpnName(ch.Identifier))
	return nil
}

// alpnName is the SNI a TLS-ALPN-01 validation sends: the name, or for an IP identifier its
// reverse-DNS name (RFC 8738 §6).
func alpnName(id acme.Identifier) string {
	ip := net.ParseIP(id.Value)
	if id.Type != "ip" || ip == nil {
		return strings.ToLower(id.Value)
	}
	var b strings.Builder
	if v4 := ip.To4(); v4 != nil {
		for i := 3; i >= 0; i-- {
			b.WriteString(strconv.Itoa(int(v4[i])))
			b.WriteByte('.')
		}
		b.WriteString("in-addr.arpa")
		return b.String()
	}
	const hexDigits = "0123456789abcdef"
	for i := len(ip) - 1; i >= 0; i-- {
		b.WriteByte(hexDigits[ip[i]&0xf])
		b.WriteByte('.')
		b.WriteByte(hexDigits[ip[i]>>4])
		b.WriteByte('.')
	}
	b.WriteString("ip6.arpa")
	return b.String()
}

// HandleHTTPChallenge answers an ACME HTTP-01 validation request for a pending challenge and
// reports whether it did. Listeners call it first for every request (plain HTTP and HTTPS: CAs
// follow redirects to https) and stop when it returns true. It costs one atomic load when no
// challenge is pending; requests it does not answer go on to the routing rules untouched.
func (m *Manager) HandleHTTPChallenge(w http.ResponseWriter, r *http.Request) bool {
	if m.chal.pending.Load() == 0 && m.fleet == nil {
		return false
	}
	token, ok := strings.CutPrefix(r.URL.Path, httpChallengePrefix)
	if !ok || token == "" || (r.Method != http.MethodGet && r.Method != http.MethodHead) {
		return false
	}
	m.chal.mu.RLock()
	ch, ok := m.chal.http[token]
	m.chal.mu.RUnlock()
	if !ok && m.fleet != nil {
		// Another node's order: the CA may ask before this node's watch has delivered it.
		ch, ok = m.fleetChallenge(r.Context(), token)
	}
	if !ok {
		return false
	}
	// Only for the name being validated, so the token is not served on other virtual hosts.
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	if !strings.EqualFold(host, ch.Identifier.Value) {
		return false
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		io.WriteString(w, ch.KeyAuthorization)
	}
	return true
}

// StartACME lets ACME certificates be obtained and renewed. The runtime calls it once the
// listeners that answer challenges are bound; until then ACME certificates without a usable
// stored certificate stay pending (handshakes use the listener's other certificates). CLI
// commands never call it, so they never reach an ACME server. Safe to call more than once.
func (m *Manager) StartACME() {
	m.acmeOnce.Do(func() { close(m.acmeStart) })
}

func (m *Manager) acmeStarted() bool {
	select {
	case <-m.acmeStart:
		return true
	default:
		return false
	}
}

// acmeConfigFor answers TLS-ALPN-01 validation handshakes (RFC 8737): a hello offering only
// acme-tls/1 gets the pending challenge certificate with acme-tls/1 negotiated. Without a
// pending challenge for that name it is refused, so probes never cost a cache walk.
func (m *Manager) acmeConfigFor(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if cert := m.chal.alpnCert(normalizeSNI(hello.ServerName)); cert != nil {
		return &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{*cert},
			NextProtos:   []string{acmeTLS1},
		}, nil
	}
	return nil, errACMEOnly
}

const acmeTLS1 = "acme-tls/1"

func onlyACMETLS(hello *tls.ClientHelloInfo) bool {
	return len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == acmeTLS1
}
