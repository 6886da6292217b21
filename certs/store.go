// store.go: where certificates live between restarts. A certificate is state_dir/certificates/
// NAME.json (or the fleet's storage): its chain and a reference to its key in the keystore, never
// key material. Issuing writes one; loading checks that it still matches its configuration.

package certs

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/fulcrum-lb/fulcrum/certs/keystore"
)

// storedCert is state_dir/certificates/NAME.json: the chain and a key reference, never a key.
type storedCert struct {
	Name        string   `json:"name"`
	Kind        string   `json:"kind"`
	Generation  int      `json:"generation"`
	Key         string   `json:"key"`          // keystore key name
	KeyLocation string   `json:"key_location"` // keystore description
	KeyType     string   `json:"key_type"`
	Domains     []string `json:"domains"`
	Usage       Usage    `json:"usage"`
	Issuer      string   `json:"issuer"`
	Chain       string   `json:"chain"` // PEM certificates only
}

// setKey records the key behind cur. Writers hold e.mu (or own e exclusively).
func (e *entry) setKey(gen int, keyName, location string) {
	e.meta.Lock()
	e.gen, e.keyName, e.location = gen, keyName, location
	e.meta.Unlock()
}

// describeKey is where cur's key lives and its generation.
func (m *Manager) describeKey(e *entry) (string, int) {
	e.meta.Lock()
	defer e.meta.Unlock()
	return e.location, e.gen
}

// issuer is the certmagic.Issuer that signs e's CSRs.
func (e *entry) issuer() certmagic.Issuer {
	if e.kind == "acme" {
		return e.acme
	}
	return e.auth.Issuer(e.lifetime, e.usage)
}

func (m *Manager) storedMatches(e *entry, st *storedCert, leaf *x509.Certificate) bool {
	ok := st.Kind == e.kind &&
		slices.Equal(normDomains(st.Domains), normDomains(e.spec.Domains)) &&
		st.Issuer == e.issuer().IssuerKey() &&
		st.KeyType == string(e.kt) &&
		st.Usage == e.usage &&
		time.Now().Before(leaf.NotAfter)
	if e.kind == "issued" {
		ok = ok && chainsTo(leaf, e.auth)
	}
	return ok
}

func chainsTo(leaf *x509.Certificate, a *Authority) bool {
	return leaf.CheckSignatureFrom(a.Cert) == nil
}

// readStored loads state_dir/certificates/NAME.json and finds its key in the keystore.
func (m *Manager) readStored(ctx context.Context, name string) (*storedCert, *tls.Certificate, error) {
	b, err := m.readState(ctx, certKey(name))
	if err != nil {
		return nil, nil, err
	}
	var st storedCert
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", m.certPath(name), err)
	}
	chain, err := ParseChainPEM([]byte(st.Chain))
	if err != nil {
		return nil, nil, err
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, nil, err
	}
	signer, err := m.ks.Signer(ctx, st.Key)
	if err != nil {
		return nil, nil, err
	}
	if !publicKeysEqual(signer.Public(), leaf.PublicKey) {
		return nil, nil, fmt.Errorf("key %s does not match the stored certificate", st.Key)
	}
	return &st, &tls.Certificate{Certificate: chain, PrivateKey: signer, Leaf: leaf}, nil
}

func (m *Manager) certPath(name string) string {
	return filepath.Join(m.stateDir, "certificates", name+".json")
}

func (m *Manager) keyName(name string, gen int) string {
	return m.prefix + "cert-" + name + "-" + strconv.Itoa(gen)
}

// issue generates generation gen's key in the keystore, has the CSR signed and stores the
// result with a key reference.
func (m *Manager) issue(ctx context.Context, e *entry, gen int) (*tls.Certificate, *storedCert, error) {
	keyName := m.keyName(e.name, gen)
	signer, err := m.ks.Generate(ctx, keyName, e.kt)
	if err != nil {
		return nil, nil, err
	}
	fail := func(err error) (*tls.Certificate, *storedCert, error) {
		_ = m.ks.Delete(ctx, keyName)
		return nil, nil, err
	}
	req := &x509.CertificateRequest{}
	for _, d := range e.spec.Domains {
		if ip := net.ParseIP(d); ip != nil {
			req.IPAddresses = append(req.IPAddresses, ip)
		} else {
			req.DNSNames = append(req.DNSNames, strings.ToLower(d))
		}
	}
	if len(e.spec.Domains) > 0 && len(e.spec.Domains[0]) <= 64 {
		req.Subject = pkix.Name{CommonName: e.spec.Domains[0]}
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, req, signer)
	if err != nil {
		return fail(fmt.Errorf("csr signed by %s: %w", m.ks.Describe(), err))
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return fail(err)
	}
	issuer := e.issuer()
	ic, err := issuer.Issue(ctx, csr)
	if err != nil {
		return fail(fmt.Errorf("issue: %w", err))
	}
	chain, err := ParseChainPEM(ic.Certificate)
	if err != nil {
		return fail(err)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return fail(err)
	}
	if !publicKeysEqual(signer.Public(), leaf.PublicKey) {
		return fail(errors.New("issuer returned a certificate for another key"))
	}
	st := &storedCert{Name: e.name, Kind: e.kind, Generation: gen, Key: keyName, KeyLocation: m.ks.Describe() + ": " + keyName,
		KeyType: string(e.kt), Domains: e.spec.Domains, Usage: e.usage, Issuer: issuer.IssuerKey(), Chain: string(ic.Certificate)}
	if err := m.writeStored(st); err != nil {
		return fail(err)
	}
	m.log.Info("issued certificate", "certificate", e.name, "serial", serialHex(leaf), "not_after", leaf.NotAfter, "key", st.KeyLocation)
	return &tls.Certificate{Certificate: chain, PrivateKey: signer, Leaf: leaf}, st, nil
}

func (m *Manager) writeStored(st *storedCert) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := m.writeState(m.ctx, certKey(st.Name), b, 0o600); err != nil {
		return fmt.Errorf("store certificate %s: %w", st.Name, err)
	}
	return nil
}

func instancePrefix(stateDir string) (string, error) {
	p := filepath.Join(stateDir, "instance-id")
	if b, err := os.ReadFile(p); err == nil && len(strings.TrimSpace(string(b))) == 8 {
		return "f" + strings.TrimSpace(string(b)) + "-", nil
	}
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	id := hex.EncodeToString(b)
	if err := keystore.WriteFileAtomic(p, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("certs: instance id: %w", err)
	}
	return "f" + id + "-", nil
}

func serialHex(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	return hex.EncodeToString(c.SerialNumber.Bytes())
}

func normDomains(d []string) []string {
	out := make([]string, len(d))
	for i, s := range d {
		out[i] = strings.TrimSuffix(strings.ToLower(s), ".")
	}
	slices.Sort(out)
	return out
}
