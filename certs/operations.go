// operations.go: what an operator asks of the manager through the admin API and the CLI (wait,
// renew, import, export, list), as opposed to the lifecycle the manager runs by itself.

package certs

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// WaitCertificate waits until the named certificate is served (an ACME certificate is pending
// until its first order completes). It returns at once for every other certificate.
func (m *Manager) WaitCertificate(ctx context.Context, name string) error {
	e := m.snap.Load().certs[name]
	if e == nil {
		return fmt.Errorf("certs: unknown certificate %q", name)
	}
	select {
	case <-e.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("certs: waiting for %s: %w", name, ctx.Err())
	case <-m.ctx.Done():
		return errors.New("certs: manager closed")
	}
}

// Renew renews a certificate now (issued certificates only).
func (m *Manager) Renew(name string) error {
	e := m.snap.Load().certs[name]
	if e == nil {
		return fmt.Errorf("certs: unknown certificate %q", name)
	}
	if !e.renewable() {
		return fmt.Errorf("certs: %s is imported; imported certificates are never renewed", name)
	}
	if e.kind == "acme" && !m.acmeStarted() {
		return fmt.Errorf("certs: %s is an ACME certificate: only a running fulcrum (whose listeners answer the challenges) renews it", name)
	}
	return m.renew(m.ctx, e)
}

// Import stores an externally issued certificate and key: the key goes into the keystore
// (sealed, or created in the PKCS#11 token, never to leave it) and the chain into the state dir. A configured
// certificate of that name with neither authority, acme nor cert_file serves it, immediately
// if it is loaded.
func (m *Manager) Import(name string, certPEM, keyPEM []byte) error {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("certs: import %s: %w", name, err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return fmt.Errorf("certs: import %s: key is not a signer", name)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	gen := 1
	if st, _, err := m.readStored(m.ctx, name); err == nil {
		gen = st.Generation + 1
	}
	keyName := m.prefix + "import-" + name + "-" + strconv.Itoa(gen)
	ks, err := m.ks.Import(m.ctx, keyName, signer)
	if err != nil {
		return fmt.Errorf("certs: import %s into %s: %w", name, m.ks.Describe(), err)
	}
	var chainPEM []byte
	for _, der := range pair.Certificate {
		chainPEM = append(chainPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	st := &storedCert{Name: name, Kind: "imported", Generation: gen, Key: keyName, KeyLocation: m.ks.Describe() + ": " + keyName,
		Domains: pair.Leaf.DNSNames, Issuer: pair.Leaf.Issuer.String(), Chain: string(chainPEM)}
	if err := m.writeStored(st); err != nil {
		return err
	}
	if e := m.snap.Load().certs[name]; e != nil && e.kind == "stored" {
		e.mu.Lock()
		defer e.mu.Unlock()
		tc := &tls.Certificate{Certificate: pair.Certificate, PrivateKey: ks, Leaf: pair.Leaf}
		if err := m.install(e, tc); err != nil {
			return err
		}
		if e.keyName != "" && e.keyName != keyName {
			_ = m.ks.Delete(m.ctx, e.keyName)
		}
		e.setKey(gen, keyName, st.KeyLocation)
	}
	return nil
}

// ImportKeystoreKey stores an externally issued certificate for a key that is already in the
// keystore (one imported wrapped, with fulcrum keys import): the key is only referenced. A key
// pending deletion cannot back a new certificate. Unlike Import, replacing the certificate
// later never deletes the key: it is the operator's.
func (m *Manager) ImportKeystoreKey(name string, certPEM []byte, keyName string) error {
	chain, err := ParseChainPEM(certPEM)
	if err != nil {
		return fmt.Errorf("certs: import %s: %w", name, err)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return fmt.Errorf("certs: import %s: %w", name, err)
	}
	signer, err := m.ks.Signer(m.ctx, keyName)
	if err != nil {
		return fmt.Errorf("certs: import %s: key %s: %w", name, keyName, err)
	}
	if !publicKeysEqual(signer.Public(), leaf.PublicKey) {
		return fmt.Errorf("certs: import %s: the certificate is not for key %s", name, keyName)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	gen := 1
	if st, _, err := m.readStored(m.ctx, name); err == nil {
		gen = st.Generation + 1
	}
	var chainPEM []byte
	for _, der := range chain {
		chainPEM = append(chainPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	st := &storedCert{Name: name, Kind: "imported", Generation: gen, Key: keyName, KeyLocation: m.ks.Describe() + ": " + keyName,
		Domains: leaf.DNSNames, Issuer: leaf.Issuer.String(), Chain: string(chainPEM)}
	if err := m.writeStored(st); err != nil {
		return err
	}
	if e := m.snap.Load().certs[name]; e != nil && e.kind == "stored" {
		e.mu.Lock()
		defer e.mu.Unlock()
		if err := m.install(e, &tls.Certificate{Certificate: chain, PrivateKey: signer, Leaf: leaf}); err != nil {
			return err
		}
		e.setKey(gen, keyName, st.KeyLocation)
	}
	return nil
}

// Export returns the served chain as PEM. Keys are never exported.
func (m *Manager) Export(name string) ([]byte, error) {
	e := m.snap.Load().certs[name]
	if e == nil {
		return nil, fmt.Errorf("certs: unknown certificate %q", name)
	}
	tc := e.cur.Load()
	if tc == nil {
		return nil, fmt.Errorf("certs: %s is not issued yet (ACME pending)", name)
	}
	var out []byte
	for _, der := range tc.Certificate {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	return out, nil
}

// CertInfo describes a managed certificate for the CLI and the admin endpoint.
type CertInfo struct {
	Name          string
	Kind          string // issued | acme | imported | stored
	Domains       []string
	Issuer        string
	Serial        string // hex
	NotBefore     time.Time
	NotAfter      time.Time
	RenewAt       time.Time // zero for imported certificates
	KeyLocation   string
	Generation    int
	RenewFailures int64
	Pending       bool // ACME certificate not obtained yet: the certificate fields are empty
	// Expiring: within ExpiryWarning of not-after with nothing about to renew it (imported, or
	// its renewals failing). What the "certificate expires soon" warning says, as a flag.
	Expiring bool
}

// List describes every certificate, sorted by name.
func (m *Manager) List() []CertInfo {
	s := m.snap.Load()
	out := make([]CertInfo, 0, len(s.certs))
	for _, e := range s.certs {
		// Not under e.mu: a renewal holds it for the whole issuance (an ACME order can take
		// minutes), and List feeds the admin endpoint and metrics.
		tc := e.cur.Load()
		ci := CertInfo{Name: e.name, Kind: e.kind, RenewFailures: e.failures.Load()}
		if tc == nil {
			ci.Pending, ci.Domains, ci.Issuer = true, slices.Clone(e.spec.Domains), e.spec.ACME
			out = append(out, ci)
			continue
		}
		ci.Domains, ci.Issuer = slices.Clone(tc.Leaf.DNSNames), tc.Leaf.Issuer.CommonName
		ci.Serial, ci.NotBefore, ci.NotAfter = serialHex(tc.Leaf), tc.Leaf.NotBefore, tc.Leaf.NotAfter
		ci.KeyLocation, ci.Generation = m.describeKey(e)
		for _, ip := range tc.Leaf.IPAddresses {
			ci.Domains = append(ci.Domains, ip.String())
		}
		if e.renewable() {
			ci.RenewAt = renewAt(tc.Leaf)
		}
		ci.Expiring = e.expiring(tc.Leaf, time.Now())
		out = append(out, ci)
	}
	slices.SortFunc(out, func(a, b CertInfo) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// KeyUsers maps each keystore key that a served certificate or an authority uses to who uses
// it ("certificate NAME", "authority NAME"): such keys cannot be scheduled for deletion.
func (m *Manager) KeyUsers() map[string]string {
	s := m.snap.Load()
	out := make(map[string]string, len(s.certs)+len(s.auths))
	for _, a := range s.auths {
		out[a.keyName] = "authority " + a.Name
	}
	for _, e := range s.certs {
		e.meta.Lock()
		if e.keyName != "" {
			out[e.keyName] = "certificate " + e.name
		}
		e.meta.Unlock()
	}
	m.sticky.mu.Lock()
	for _, g := range m.sticky.gens {
		out[g.Key] = "sticky cookies"
	}
	m.sticky.mu.Unlock()
	return out
}
