package certs

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/fleet"
	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/mholt/acmez/v3"
	"github.com/mholt/acmez/v3/acme"
)

// Fleet mode ([fleet]): the manager's state — certificate records, authority certificates,
// software-keystore blobs (sealed as on disk), ACME account keys, pending HTTP-01 challenges —
// lives in etcd through certs/fleet instead of the state dir, issuance and renewal of each
// certificate are serialised by a fleet-wide lock, and every node installs what another node
// stored as soon as its watch reports it. Session-ticket and sticky-cookie secrets come from
// sealed rings one node rotates.

// fleetNode is the manager's fleet membership.
type fleetNode struct {
	f         *fleet.Fleet
	st        *fleet.Storage
	sealer    *fleet.Sealer
	keyPrefix string // key names shared by the fleet (instead of the per-state-dir prefix)
	tickets   *fleet.SecretRing
	sticky    *fleet.SecretRing
}

// stickyRotation: cookie keys are never rotated (a rotation would end every stickiness).
const stickyRotation = 100 * 365 * 24 * time.Hour

// stateIO is where the manager keeps records: the state dir, or the fleet's storage.
type stateIO interface {
	readState(ctx context.Context, rel string) ([]byte, error)
	writeState(ctx context.Context, rel string, b []byte, perm os.FileMode) error
}

func certKey(name string) string { return "certificates/" + name + ".json" }

// readState reads rel ("certificates/NAME.json") from the state dir or the fleet; a missing
// record is an error wrapping fs.ErrNotExist either way.
func (m *Manager) readState(ctx context.Context, rel string) ([]byte, error) {
	if m.fleet != nil {
		return m.fleet.st.Load(ctx, rel)
	}
	return os.ReadFile(filepath.Join(m.stateDir, filepath.FromSlash(rel)))
}

func (m *Manager) writeState(ctx context.Context, rel string, b []byte, perm os.FileMode) error {
	if m.fleet != nil {
		return m.fleet.st.Store(ctx, rel, b)
	}
	p := filepath.Join(m.stateDir, filepath.FromSlash(rel))
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	return keystore.WriteFileAtomic(p, b, perm)
}

// lazyBlobs is the software keystore's blob store in fleet mode, bound once the fleet is
// open (the keystore is opened first: the client key for etcd may be in it).
type lazyBlobs struct{ st atomic.Pointer[fleet.Storage] }

var errFleetNotOpen = errors.New("certs: fleet storage not open yet")

func (l *lazyBlobs) Load(ctx context.Context, key string) ([]byte, error) {
	if s := l.st.Load(); s != nil {
		return s.Load(ctx, key)
	}
	return nil, errFleetNotOpen
}

func (l *lazyBlobs) Store(ctx context.Context, key string, v []byte) error {
	if s := l.st.Load(); s != nil {
		return s.Store(ctx, key, v)
	}
	return errFleetNotOpen
}

func (l *lazyBlobs) Delete(ctx context.Context, key string) error {
	if s := l.st.Load(); s != nil {
		return s.Delete(ctx, key)
	}
	return errFleetNotOpen
}

// List lets fulcrum keys list the keys in fleet mode.
func (l *lazyBlobs) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	if s := l.st.Load(); s != nil {
		return s.List(ctx, dir, recursive)
	}
	return nil, errFleetNotOpen
}

// fleetBlobs is the software keystore's blob store: nil (files) without a fleet or with an
// HSM, whose keys never leave it.
func fleetBlobs(cfg *configs.Config) keystore.Blobs {
	if cfg.Fleet == nil || (cfg.Keystore.Type != "" && cfg.Keystore.Type != "software") {
		return nil
	}
	return &lazyBlobs{}
}

// openFleet joins the fleet of cfg ([fleet]); nil without one. An unreachable etcd is not an
// error (the node serves what its cache holds and catches up); a master key that differs
// from the fleet's is.
func openFleet(ctx context.Context, cfg *configs.Config, stateDir string, ks keystore.Keystore, blobs keystore.Blobs, log *slog.Logger) (*fleetNode, error) {
	fc := cfg.Fleet
	if fc == nil {
		return nil, nil
	}
	tlsCfg, err := fleetTLS(ctx, cfg, ks)
	if err != nil {
		return nil, err
	}
	mk, err := keystore.MasterKey(fc.MasterKey, cfg.Resolve)
	if err != nil {
		return nil, fmt.Errorf("certs: fleet master_key: %w", err)
	}
	sealer, err := fleet.NewSealer(mk)
	clear(mk)
	if err != nil {
		return nil, err
	}
	ttl := fc.LeaseTTLDuration()
	f, err := fleet.Open(ctx, fleet.Options{Endpoints: fc.Etcd, TLS: tlsCfg, Prefix: fc.Prefix, Node: fc.Node, LeaseTTL: ttl,
		CacheDir: filepath.Join(stateDir, "fleet-cache"), Log: log})
	if err != nil {
		return nil, err
	}
	if err := f.CheckMasterKey(ctx, sealer); errors.Is(err, fleet.ErrMasterKeyMismatch) {
		f.Close()
		return nil, err
	} else if err != nil {
		log.Warn("etcd unreachable at start: serving from the fleet cache until it answers", "err", err)
	}
	sum := sha256.Sum256([]byte(strings.Trim(fc.Prefix, "/")))
	n := &fleetNode{f: f, st: f.Storage(), sealer: sealer, keyPrefix: "fl" + hex.EncodeToString(sum[:4]) + "-"}
	if lb, ok := blobs.(*lazyBlobs); ok {
		lb.st.Store(n.st)
	}
	log.Info("joined fleet", "node", fc.Node, "etcd", fc.Etcd, "prefix", fc.Prefix)
	return n, nil
}

// fleetTLS is the TLS configuration for etcd: nil (plain) without ca_file.
func fleetTLS(ctx context.Context, cfg *configs.Config, ks keystore.Keystore) (*tls.Config, error) {
	fc := cfg.Fleet
	if fc.CAFile == "" {
		return nil, nil
	}
	b, err := os.ReadFile(cfg.Resolve(fc.CAFile))
	if err != nil {
		return nil, fmt.Errorf("certs: fleet ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("certs: fleet ca_file %s: no certificates", fc.CAFile)
	}
	tc := &tls.Config{RootCAs: pool, ServerName: fc.ServerName, MinVersion: tls.VersionTLS12}
	switch {
	case fc.CertFile != "" && fc.KeyFile != "":
		pair, err := tls.LoadX509KeyPair(cfg.Resolve(fc.CertFile), cfg.Resolve(fc.KeyFile))
		if err != nil {
			return nil, fmt.Errorf("certs: fleet client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{pair}
	case fc.CertFile != "" && fc.Key != "":
		pemBytes, err := os.ReadFile(cfg.Resolve(fc.CertFile))
		if err != nil {
			return nil, fmt.Errorf("certs: fleet cert_file: %w", err)
		}
		chain, err := ParseChainPEM(pemBytes)
		if err != nil {
			return nil, fmt.Errorf("certs: fleet cert_file: %w", err)
		}
		leaf, err := x509.ParseCertificate(chain[0])
		if err != nil {
			return nil, fmt.Errorf("certs: fleet cert_file: %w", err)
		}
		signer, err := ks.Signer(ctx, fc.Key)
		if err != nil {
			return nil, fmt.Errorf("certs: fleet client key %s in %s: %w", fc.Key, ks.Describe(), err)
		}
		if !publicKeysEqual(signer.Public(), leaf.PublicKey) {
			return nil, fmt.Errorf("certs: fleet client key %s does not match cert_file", fc.Key)
		}
		tc.Certificates = []tls.Certificate{{Certificate: chain, PrivateKey: signer, Leaf: leaf}}
	}
	return tc, nil
}

// startFleetSecrets makes the session-ticket keys the fleet's and fetches the sticky-cookie key.
// With etcd unreachable the node starts with its own keys and follows the fleet's once it answers.
func (m *Manager) startFleetSecrets(ctx context.Context) {
	n := m.fleet
	if n == nil {
		return
	}
	var err error
	n.tickets, err = n.f.Ring(ctx, "session-tickets", n.sealer, TicketRotation, ticketKeysKept, m.tickets.set)
	if err != nil {
		m.log.Warn("fleet session-ticket keys not available yet", "err", err)
	}
	n.sticky, err = n.f.Ring(ctx, "sticky-cookies", n.sealer, stickyRotation, 2, nil)
	if err != nil {
		m.log.Warn("fleet sticky-cookie key not available yet", "err", err)
	}
}

func (m *Manager) fleetRotateTickets() {
	if err := m.fleet.tickets.Rotate(m.ctx); err != nil {
		m.log.Error("rotating the fleet's session-ticket keys", "err", err)
	}
}

// set replaces the secrets with the fleet's (newest first).
func (t *ticketKeys) set(secrets [][32]byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.secrets = append([][32]byte(nil), secrets...)
	for name, h := range t.holders {
		h.SetSessionTicketKeys(deriveTicketKeys(t.secrets, name))
	}
}

// StickyKey is the fleet's sticky-cookie key (backends.WithStickyKey), so a cookie set by one
// node routes to the same target through any other; nil without a fleet (or before etcd first
// answered), when each process keeps its own.
func (m *Manager) StickyKey() []byte {
	if m.fleet == nil || m.fleet.sticky == nil {
		return nil
	}
	s := m.fleet.sticky.Secrets()
	if len(s) == 0 {
		return nil
	}
	k := s[len(s)-1] // the oldest: never rotated, but never let a rotation move it either
	return k[:]
}

// FleetStatus is what /admin/fleet shows; nil without a fleet.
func (m *Manager) FleetStatus(ctx context.Context) *fleet.Status {
	if m.fleet == nil {
		return nil
	}
	st := m.fleet.f.Status(ctx)
	return &st
}

// FleetStats are the fleet storage's operation counters; nil without a fleet.
func (m *Manager) FleetStats() *fleet.Stats {
	if m.fleet == nil {
		return nil
	}
	return &m.fleet.f.Stats
}

func (m *Manager) closeFleet() {
	if m.fleet != nil {
		m.fleet.f.Close()
	}
}

// fleetLock takes a fleet-wide lock, waiting while another node holds it (or etcd is away).
func (m *Manager) fleetLock(ctx context.Context, name string) (func(), error) {
	if err := m.fleet.st.Lock(ctx, name); err != nil {
		return nil, err
	}
	return func() {
		if err := m.fleet.st.Unlock(context.Background(), name); err != nil {
			m.log.Warn("fleet unlock", "lock", name, "err", err)
		}
	}, nil
}

// startupWait bounds how long a start (or a reload adding a certificate) waits for a fleet
// lock: long enough for a node that died holding it to lose its lease, short enough that an
// unreachable etcd with nothing cached is reported instead of hanging the start.
func (m *Manager) startupWait(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, max(30*time.Second, 3*m.fleet.f.LeaseTTL()))
}

// loadOrCreateAuthority is loadOrCreateAuthority on the manager's state; in a fleet, creating
// an authority happens under a lock so the fleet has one key and one chain.
func (m *Manager) loadOrCreateAuthority(ctx context.Context, a configs.Authority) (*Authority, bool, error) {
	if m.fleet != nil && !m.authorityStored(ctx, a) {
		ctx, cancel := m.startupWait(ctx)
		defer cancel()
		unlock, err := m.fleetLock(ctx, "authority-"+a.Name)
		if err != nil {
			return nil, false, fmt.Errorf("authority %s: %w", a.Name, err)
		}
		defer unlock()
	}
	return loadOrCreateAuthority(ctx, m.ks, m, m.prefix, a)
}

// authorityStored: the stored authority is usable as it is (no lock needed to load it).
func (m *Manager) authorityStored(ctx context.Context, a configs.Authority) bool {
	b, err := m.readState(ctx, "authorities/"+a.Name+".pem")
	if err != nil {
		return false
	}
	c, err := parseCertPEM(b)
	if err != nil || !time.Now().Before(c.NotAfter) || c.Subject.CommonName != commonName(a) {
		return false
	}
	s, err := m.ks.Signer(ctx, m.prefix+"ca-"+a.Name)
	return err == nil && publicKeysEqual(s.Public(), c.PublicKey)
}

// fleetIssueFirst issues e's first certificate unless another node did: under the fleet lock
// the stored record is read again.
func (m *Manager) fleetIssueFirst(ctx context.Context, e *entry) error {
	ctx, cancel := m.startupWait(ctx)
	defer cancel()
	unlock, err := m.fleetLock(ctx, "cert-"+e.name)
	if err != nil {
		return err
	}
	defer unlock()
	gen := e.gen
	if st, tc, err := m.readStored(ctx, e.name); err == nil {
		if m.storedMatches(e, st, tc.Leaf) {
			e.gen, e.keyName, e.location = st.Generation, st.Key, st.KeyLocation
			e.cur.Store(tc)
			return nil
		}
		gen = max(gen, st.Generation)
	}
	tc, st, err := m.issue(ctx, e, gen+1)
	if err != nil {
		return err
	}
	e.gen, e.keyName, e.location = st.Generation, st.Key, st.KeyLocation
	e.cur.Store(tc)
	return nil
}

// renewScheduled is the renewal loop's renewal: in a fleet, only if no other node renewed.
func (m *Manager) renewScheduled(ctx context.Context, e *entry) error {
	if m.fleet == nil {
		return m.renew(ctx, e)
	}
	return m.fleetRenew(ctx, e, false)
}

// fleetRenew renews e under the fleet lock. Unless forced, a certificate another node already
// renewed (or obtained) is installed instead of ordered again: one renewal for the fleet.
func (m *Manager) fleetRenew(ctx context.Context, e *entry, force bool) error {
	unlock, err := m.fleetLock(ctx, "cert-"+e.name)
	if err != nil {
		return err
	}
	defer unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	gen := e.gen
	st, tc, err := m.readStored(ctx, e.name)
	if err == nil {
		if !force && m.storedMatches(e, st, tc.Leaf) && time.Now().Before(renewAt(tc.Leaf)) {
			if st.Generation != gen || e.cur.Load() == nil {
				if err := m.install(e, tc); err != nil {
					return err
				}
				e.setKey(st.Generation, st.Key, st.KeyLocation)
			}
			e.failures.Store(0)
			return nil
		}
		gen = max(gen, st.Generation)
	} else if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, keystore.ErrNotFound) {
		return fmt.Errorf("reading the fleet's certificate: %w", err)
	}
	tc, st, err = m.issue(ctx, e, gen+1)
	if err != nil {
		return err
	}
	if err := m.install(e, tc); err != nil {
		return err
	}
	e.setKey(st.Generation, st.Key, st.KeyLocation)
	e.failures.Store(0)
	if old := st.Generation - 2; old >= 1 {
		if err := m.ks.Delete(ctx, m.keyName(e.name, old)); err != nil {
			m.log.Warn("deleting an old key generation", "certificate", e.name, "err", err)
		}
	}
	return nil
}

// watchFleet installs certificates other nodes store, and answers the HTTP-01 challenges
// another node's orders are waiting for.
func (m *Manager) watchFleet() {
	if m.fleet == nil {
		return
	}
	m.fleet.st.Watch(m.ctx, "certificates", func(key string) {
		snap := m.snap.Load()
		if key == "" {
			for _, e := range snap.certs {
				m.fleetAdopt(e)
			}
			return
		}
		name := strings.TrimSuffix(strings.TrimPrefix(key, "certificates/"), ".json")
		if e := snap.certs[name]; e != nil {
			m.fleetAdopt(e)
		}
	})
	m.fleet.st.Watch(m.ctx, "acme/challenges", func(key string) {
		if key == "" {
			return
		}
		token := strings.TrimPrefix(key, "acme/challenges/")
		b, err := m.fleet.st.Load(m.ctx, key)
		if errors.Is(err, fs.ErrNotExist) {
			m.chal.delHTTP(acme.Challenge{Token: token})
			return
		}
		var ch acme.Challenge
		if err == nil && json.Unmarshal(b, &ch) == nil && ch.Token == token {
			m.chal.putHTTP(ch)
		}
	})
}

// fleetAdopt installs e's stored certificate if it is newer than what e serves. A renewal in
// progress on this node (e.mu held) reads the store itself.
func (m *Manager) fleetAdopt(e *entry) {
	if e.kind == "imported" || !e.mu.TryLock() {
		return
	}
	defer e.mu.Unlock()
	st, tc, err := m.readStored(m.ctx, e.name)
	if err != nil {
		return
	}
	if e.kind != "stored" && !m.storedMatches(e, st, tc.Leaf) {
		return
	}
	if e.cur.Load() != nil && st.Generation <= e.gen {
		return
	}
	if err := m.install(e, tc); err != nil {
		m.log.Error("installing the fleet's certificate", "certificate", e.name, "err", err)
		return
	}
	e.setKey(st.Generation, st.Key, st.KeyLocation)
	e.failures.Store(0)
	m.log.Info("installed certificate from the fleet", "certificate", e.name, "serial", serialHex(tc.Leaf), "generation", st.Generation)
}

// accountKey finds or generates an ACME account key; in a fleet under a lock, so the fleet
// has one account per directory and e-mail.
func (m *Manager) accountKey(ctx context.Context, keyName string) (signer crypto.Signer, err error) {
	m.acctMu.Lock()
	defer m.acctMu.Unlock()
	signer, err = m.ks.Signer(ctx, keyName)
	if errors.Is(err, keystore.ErrNotFound) && m.fleet != nil {
		unlock, lerr := m.fleetLock(ctx, "acme-account")
		if lerr != nil {
			return nil, lerr
		}
		defer unlock()
		signer, err = m.ks.Signer(ctx, keyName)
	}
	if errors.Is(err, keystore.ErrNotFound) {
		signer, err = m.ks.Generate(ctx, keyName, keystore.ECDSAP256)
	}
	return signer, err
}

// fleetSolvers shares HTTP-01 challenges with the fleet (the CA may ask any node) and drops
// TLS-ALPN-01, whose challenge certificate only the ordering node holds. DNS-01 is left alone.
func (m *Manager) fleetSolvers(c *acmez.Client) {
	if m.fleet == nil {
		return
	}
	if _, ok := c.ChallengeSolvers[acme.ChallengeTypeHTTP01]; !ok {
		return
	}
	c.ChallengeSolvers = map[string]acmez.Solver{acme.ChallengeTypeHTTP01: fleetHTTPSolver{m}}
}

// fleetChallenge reads a challenge another node stored. Tokens are base64url of at least 128
// bits (RFC 8555 §8.3), so anything else is refused without asking etcd, and at most a few
// look-ups run at once: the path is public, and etcd is not for strangers to hammer.
func (m *Manager) fleetChallenge(ctx context.Context, token string) (acme.Challenge, bool) {
	if len(token) < 22 || len(token) > 128 || strings.Trim(token, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") != "" {
		return acme.Challenge{}, false
	}
	select {
	case challengeLookups <- struct{}{}:
		defer func() { <-challengeLookups }()
	default:
		return acme.Challenge{}, false
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	b, err := m.fleet.st.Load(ctx, "acme/challenges/"+token)
	var ch acme.Challenge
	if err != nil || json.Unmarshal(b, &ch) != nil || ch.Token != token {
		return acme.Challenge{}, false
	}
	return ch, true
}

var challengeLookups = make(chan struct{}, 4)

type fleetHTTPSolver struct{ m *Manager }

func (s fleetHTTPSolver) Present(ctx context.Context, ch acme.Challenge) error {
	s.m.chal.putHTTP(ch)
	b, err := json.Marshal(ch)
	if err != nil {
		return err
	}
	// The key authorization is what every node answers with; it is public (the CA fetches it
	// in the clear), so it is stored as it is.
	return s.m.fleet.st.Store(ctx, "acme/challenges/"+ch.Token, b)
}

func (s fleetHTTPSolver) CleanUp(ctx context.Context, ch acme.Challenge) error {
	s.m.chal.delHTTP(ch)
	return s.m.fleet.st.Delete(ctx, "acme/challenges/"+ch.Token)
}
