package certs

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// Usage says what a leaf certificate is for; the bits select the extended key usages.
type Usage int

const (
	UsageServer Usage = 1 << iota // id-kp-serverAuth
	UsageClient                   // id-kp-clientAuth
)

// Authority is a private certificate authority whose key lives in the keystore. Only the CA
// certificate (never the key) is stored under state_dir/authorities/NAME.pem.
type Authority struct {
	Name     string
	Cert     *x509.Certificate
	CertPEM  []byte
	signer   crypto.Signer // nil when lost
	keyName  string
	validity time.Duration
	// lost (wrapping ErrAuthorityKeyLost) says the stored authority's key is gone from the
	// keystore: the authority still exists for what trusts it (its certificate, the leaves it
	// issued keep serving) but issues nothing until the key is back.
	lost error
}

// ErrAuthorityKeyLost: a stored, unexpired authority whose key is missing from the keystore.
var ErrAuthorityKeyLost = errors.New("authority key lost")

// KeyName is the name of the authority's key in the keystore.
func (a *Authority) KeyName() string { return a.keyName }

// KeyLost is nil for a usable authority; otherwise why it cannot issue (ErrAuthorityKeyLost).
func (a *Authority) KeyLost() error { return a.lost }

// keyIntact says whether a's key is still in ks and is the key of a's certificate.
func (a *Authority) keyIntact(ctx context.Context, ks keystore.Keystore) bool {
	_, err := authorityKey(ctx, ks, a.keyName, a.Cert)
	return err == nil
}

// authorityKey finds the key of the authority certificate c. A keystore that lists its keys
// (keystore.Managed) is asked first whether the key is there now: it may hold a signer found
// earlier for a key object that another program has deleted from the token since.
func authorityKey(ctx context.Context, ks keystore.Keystore, keyName string, c *x509.Certificate) (crypto.Signer, error) {
	if l, ok := ks.(interface {
		List(context.Context) ([]keystore.KeyInfo, error)
	}); ok {
		// A listing that fails (the token unreachable) says nothing: Signer decides then.
		if keys, err := l.List(ctx); err == nil && !slices.ContainsFunc(keys, func(k keystore.KeyInfo) bool { return k.Name == keyName }) {
			return nil, fmt.Errorf("keystore: %s: %w", keyName, keystore.ErrNotFound)
		}
	}
	s, err := ks.Signer(ctx, keyName)
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(s.Public(), c.PublicKey) {
		return nil, errors.New("not the key of the certificate")
	}
	return s, nil
}

// loadOrCreateAuthority reuses the stored CA certificate when its key is still in the keystore,
// otherwise generates a key in the keystore and self-signs a new CA certificate. A stored,
// unexpired certificate whose key is gone is returned as a lost authority (KeyLost), never
// replaced.
func loadOrCreateAuthority(ctx context.Context, ks keystore.Keystore, state stateIO, prefix string, a configs.Authority) (*Authority, bool, error) {
	validity := a.ValidityDuration()
	keyName := prefix + "ca-" + a.Name
	path := "authorities/" + a.Name + ".pem"
	if b, err := state.readState(ctx, path); err == nil {
		if c, err := parseCertPEM(b); err == nil && time.Now().Before(c.NotAfter) && c.Subject.CommonName == commonName(a) {
			s, err := authorityKey(ctx, ks, keyName, c)
			if err == nil {
				return &Authority{Name: a.Name, Cert: c, CertPEM: b, signer: s, keyName: keyName, validity: validity}, false, nil
			}
			// The authority exists and clients trust it, but its key is gone (or another key has
			// its name). A new authority would silently break every client that trusts this one:
			// keep this one without its key (what it issued keeps serving, it issues nothing),
			// and say how to choose deliberately.
			why := err.Error()
			lost := fmt.Errorf("%w: authority %s: its certificate (serial %x, valid until %s) is in %s but its key %s in %s is unusable (%s); it issues and renews nothing, and no new authority is created that clients trusting this one would reject: restore the key or token and reload, or remove %s and reload to start a new authority deliberately",
				ErrAuthorityKeyLost, a.Name, c.SerialNumber, c.NotAfter.UTC().Format(time.RFC3339), path, keyName, ks.Describe(), why, path)
			return &Authority{Name: a.Name, Cert: c, CertPEM: b, keyName: keyName, validity: validity, lost: lost}, false, nil
		}
	}
	s, err := ks.Generate(ctx, keyName, keystore.KeyType(a.KeyType))
	if err != nil {
		return nil, false, fmt.Errorf("authority %s: generate key: %w", a.Name, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, false, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName(a), Organization: []string{"Fulcrum"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		SubjectKeyId:          skid(s.Public()),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, s.Public(), s)
	if err != nil {
		return nil, false, fmt.Errorf("authority %s: self-sign through %s: %w", a.Name, ks.Describe(), err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, false, err
	}
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := state.writeState(ctx, path, pemBytes, 0o644); err != nil {
		return nil, false, fmt.Errorf("authority %s: store certificate: %w", a.Name, err)
	}
	return &Authority{Name: a.Name, Cert: c, CertPEM: pemBytes, signer: s, keyName: keyName, validity: validity}, true, nil
}

func commonName(a configs.Authority) string {
	if a.CommonName != "" {
		return a.CommonName
	}
	return "Fulcrum " + a.Name + " CA"
}

// Pool is a CertPool holding only this authority's certificate.
func (a *Authority) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(a.Cert)
	return p
}

// SignCSR checks the request's self-signature and signs its public key for its DNS names and
// IP addresses.
func (a *Authority) SignCSR(csr *x509.CertificateRequest, lifetime time.Duration, usage Usage) ([]byte, error) {
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("authority %s: csr signature: %w", a.Name, err)
	}
	domains := append([]string(nil), csr.DNSNames...)
	for _, ip := range csr.IPAddresses {
		domains = append(domains, ip.String())
	}
	return a.Sign(csr.PublicKey, domains, lifetime, usage)
}

// Sign issues a leaf certificate (DER) for pub. domains may hold DNS names, wildcards
// ("*.example.test") and IP addresses. Serials are 128 random bits.
func (a *Authority) Sign(pub crypto.PublicKey, domains []string, lifetime time.Duration, usage Usage) ([]byte, error) {
	if len(domains) == 0 {
		return nil, fmt.Errorf("authority %s: no domains", a.Name)
	}
	if a.lost != nil {
		return nil, a.lost
	}
	if lifetime <= 0 { // configs gives every issued certificate its lifetime
		return nil, fmt.Errorf("authority %s: lifetime %v: must be positive", a.Name, lifetime)
	}
	if usage == 0 {
		usage = UsageServer
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	// Back-date a little for clock skew, but never by more than a tenth of the lifetime so
	// that very short test lifetimes keep their renewal arithmetic.
	skew := min(5*time.Minute, lifetime/10)
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-skew),
		NotAfter:              now.Add(lifetime),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		AuthorityKeyId:        a.Cert.SubjectKeyId,
	}
	if _, isRSA := pub.(interface{ Size() int }); isRSA {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment // TLS 1.0-1.2 RSA key exchange
	}
	if tmpl.NotAfter.After(a.Cert.NotAfter) {
		tmpl.NotAfter = a.Cert.NotAfter
	}
	if usage&UsageServer != 0 {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if usage&UsageClient != 0 {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	for _, d := range domains {
		if ip := net.ParseIP(d); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, strings.ToLower(d))
		}
	}
	if len(domains[0]) <= 64 {
		tmpl.Subject.CommonName = domains[0]
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.Cert, pub, a.signer)
	if err != nil {
		return nil, fmt.Errorf("authority %s: sign: %w", a.Name, err)
	}
	return der, nil
}

// IssuerKey implements certmagic.Issuer.
func (a *Authority) IssuerKey() string { return "fulcrum-authority-" + a.Name }

// Issuer returns a certmagic.Issuer that signs with the given lifetime and usage.
func (a *Authority) Issuer(lifetime time.Duration, usage Usage) certmagic.Issuer {
	return &leafIssuer{a: a, lifetime: lifetime, usage: usage}
}

type leafIssuer struct {
	a        *Authority
	lifetime time.Duration
	usage    Usage
}

func (l *leafIssuer) IssuerKey() string { return l.a.IssuerKey() }

func (l *leafIssuer) Issue(ctx context.Context, csr *x509.CertificateRequest) (*certmagic.IssuedCertificate, error) {
	der, err := l.a.SignCSR(csr, l.lifetime, l.usage)
	if err != nil {
		return nil, err
	}
	chain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	chain = append(chain, l.a.CertPEM...)
	return &certmagic.IssuedCertificate{Certificate: chain}, nil
}

func randomSerial() (*big.Int, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	b[0] &= 0x7f // positive in DER without a leading zero byte
	b[0] |= 0x40 // never zero, always 16 bytes
	return new(big.Int).SetBytes(b), nil
}

func skid(pub crypto.PublicKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil
	}
	h := sha256.Sum256(der)
	return h[:20]
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

func parseCertPEM(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("no CERTIFICATE PEM block")
	}
	return x509.ParseCertificate(blk.Bytes)
}

// ParseChainPEM returns the DER of every CERTIFICATE block of b, other blocks skipped; an
// error when there is none.
func ParseChainPEM(b []byte) ([][]byte, error) {
	var out [][]byte
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type == "CERTIFICATE" {
			out = append(out, blk.Bytes)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no certificates in PEM")
	}
	return out, nil
}
