package main

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"

	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// caller is who made an admin request, as the audit log names them.
type caller struct {
	Identity string // "token:NAME", "cert:CN" or "anonymous"
	Role     string // "" when unauthenticated
}

// roleRank orders the roles: each includes what the ones below it may do, so an operator can
// read and a key_admin can also reload and renew.
func roleRank(role string) int {
	return slices.Index(configs.AdminRoles, role) + 1 // 0 for "" and unknown roles
}

// adminAuth decides who an admin caller is. Tokens are kept only as SHA-256 digests: the
// secrets are read once at start and dropped, so a memory dump shows no usable token.
type adminAuth struct {
	none    bool // admin_auth = "none": every caller is key_admin (loopback only)
	tokens  []tokenEntry
	clients map[string]string // client certificate CN -> role
	ca      *x509.CertPool    // nil: no client certificates
}

type tokenEntry struct {
	digest [32]byte
	name   string
	role   string
}

// minTokenBytes is the shortest admin token secret accepted (after trimming white space).
const minTokenBytes = 16

func newAdminAuth(cfg *configs.Config) (*adminAuth, error) {
	sv := cfg.Server
	a := &adminAuth{none: sv.AdminAuth == "none", clients: map[string]string{}}
	for _, t := range sv.AdminTokens {
		v, err := keystore.ReadSecret(t.Secret, cfg.Resolve)
		if err != nil {
			return nil, fmt.Errorf("admin token %s: %w", t.Name, err)
		}
		if len(v) < minTokenBytes {
			return nil, fmt.Errorf("admin token %s: the secret is %d bytes, want at least %d (e.g. openssl rand -hex 32)", t.Name, len(v), minTokenBytes)
		}
		a.tokens = append(a.tokens, tokenEntry{digest: sha256.Sum256([]byte(v)), name: t.Name, role: t.Role})
	}
	for _, c := range sv.AdminClients {
		a.clients[c.CommonName] = c.Role
	}
	if sv.AdminClientCA != "" {
		pem, err := os.ReadFile(cfg.Resolve(sv.AdminClientCA))
		if err != nil {
			return nil, fmt.Errorf("admin_client_ca: %w", err)
		}
		a.ca = x509.NewCertPool()
		if !a.ca.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("admin_client_ca %s: no PEM certificate in it", sv.AdminClientCA)
		}
	}
	return a, nil
}

// open reports whether nobody can authenticate: with admin_auth = "required" and no
// credentials, only /healthz and /readyz answer.
func (a *adminAuth) open() bool { return !a.none && len(a.tokens) == 0 && a.ca == nil }

// identify returns the caller and, when credentials were presented but are not valid, why.
// A client certificate has already been verified against admin_client_ca by the TLS stack.
func (a *adminAuth) identify(r *http.Request) (caller, string) {
	if a.none {
		return caller{Identity: "anonymous", Role: configs.RoleKeyAdmin}, ""
	}
	if h := r.Header.Get("Authorization"); h != "" {
		tok, ok := strings.CutPrefix(h, "Bearer ")
		if !ok {
			return caller{Identity: "anonymous"}, "Authorization is not a Bearer token"
		}
		d := sha256.Sum256([]byte(strings.TrimSpace(tok)))
		var found *tokenEntry
		for i := range a.tokens { // every entry compared, in constant time
			if subtle.ConstantTimeCompare(d[:], a.tokens[i].digest[:]) == 1 {
				found = &a.tokens[i]
			}
		}
		if found == nil {
			return caller{Identity: "anonymous"}, "bearer token is not one of the configured admin_tokens"
		}
		return caller{Identity: "token:" + found.name, Role: found.role}, ""
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		cn := r.TLS.VerifiedChains[0][0].Subject.CommonName
		role, ok := a.clients[cn]
		if !ok {
			return caller{Identity: "cert:" + cn}, "client certificate " + cn + " is not in admin_clients"
		}
		return caller{Identity: "cert:" + cn, Role: role}, ""
	}
	return caller{Identity: "anonymous"}, ""
}

// tlsConfig adds client-certificate verification to the admin endpoint's TLS configuration.
// Certificates are optional at the handshake (token callers use HTTPS too); a request without
// one is simply unauthenticated.
func (a *adminAuth) tlsConfig(tc *tls.Config) *tls.Config {
	tc = tc.Clone()
	if a.ca != nil {
		tc.ClientCAs = a.ca
		tc.ClientAuth = tls.VerifyClientCertIfGiven
	}
	tc.NextProtos = []string{"http/1.1"}
	return tc
}

// adminFiles: token secrets and the client authority must be readable at start, a token file
// long enough, and the audit log writable (preflight).
func (pf *preflighter) adminFiles() {
	sv := pf.cfg.Server
	for i, t := range sv.AdminTokens {
		path := fmt.Sprintf("server.admin_tokens[%d]", i)
		kind, file, _ := strings.Cut(t.Secret, ":")
		if kind != "file" || !pf.readable(path, t.Name, path+".secret", file) {
			continue // env: secrets are read at start, in the service's environment
		}
		if v, err := keystore.ReadSecret(t.Secret, pf.cfg.Resolve); err == nil && len(v) < minTokenBytes {
			pf.add(path, t.Name, path+".secret", file, "secret %s holds %d bytes, want at least %d (e.g. openssl rand -hex 32 > %s)", file, len(v), minTokenBytes, file)
		}
	}
	if sv.AdminClientCA != "" {
		pf.caFile("server", "", "server.admin_client_ca", sv.AdminClientCA)
	}
	pf.writable("server", "", "server.audit_log", sv.AuditLog)
}
