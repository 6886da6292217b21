// Package certs is Fulcrum's certificate manager: the keystore (PKCS#11 or the sealed software
// keystore), private authorities, the certificate lifecycle (issue, import, renew), SNI
// selection and TLS policies.
//
// certmagic keeps the certificate cache and its name index; the lifecycle is ours because
// certmagic cannot manage a certificate whose key stays in an HSM (it PEM-encodes keys). Our
// loop generates the key in the keystore, builds the CSR with the keystore signer, calls the
// issuer, stores the certificate with a key reference (never key material) and installs it
// with CacheUnmanagedTLSCertificate, removing the old hash after the new one is in.
package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
	"go.uber.org/zap"
)

// ExpiryWarning is how long before expiry imported (and failing) certificates are warned about.
const ExpiryWarning = 45 * 24 * time.Hour

const tagPrefix = "fulcrum/"

// Manager owns the keystore, the certificate cache and every certificate's renewal loop.
type Manager struct {
	log      *slog.Logger
	ks       keystore.Keystore
	stateDir string
	prefix   string // per-state-dir key-name prefix so several instances can share one token
	cache    *certmagic.Cache
	cmcfg    *certmagic.Config

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex // control plane: Reconcile, Renew, Import, Close
	closed bool
	cfg    atomic.Pointer[configs.Config]
	snap   atomic.Pointer[snapshot]

	tickets ticketKeys
	sticky  stickyRing // sticky-cookie keys without a fleet
	fleet   *fleetNode // nil without [fleet]

	chal      challenges    // pending ACME challenges, answered by the listeners
	acmeStart chan struct{} // closed by StartACME
	acmeOnce  sync.Once
	acctMu    sync.Mutex // account keys are shared by certificates: find-or-generate once
}

// snapshot is one immutable generation of authorities and certificates.
type snapshot struct {
	auths map[string]*Authority
	certs map[string]*entry
}

// entry is one configured certificate. cur is what handshakes serve; it is replaced atomically.
type entry struct {
	name     string
	spec     configs.Certificate
	kind     string // "issued", "acme", "imported" (cert_file) or "stored" (imported into state by Import)
	usage    Usage
	kt       keystore.KeyType
	lifetime time.Duration
	auth     *Authority
	acme     *acmeIssuer

	cur      atomic.Pointer[tls.Certificate] // nil while an ACME certificate is pending
	failures atomic.Int64

	mu       sync.Mutex // serialises renewals
	meta     sync.Mutex // gen, keyName, location for readers that must not wait for a renewal
	hash     string     // certmagic cache hash of cur
	gen      int
	keyName  string
	location string

	ready     chan struct{} // closed when cur is first set
	readyOnce sync.Once

	kick   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}
}

// NewManager opens the keystore, loads or creates the authorities and loads, issues or imports
// every certificate. Background loops run until Close (or until ctx is cancelled).
func NewManager(ctx context.Context, cfg *configs.Config, log *slog.Logger) (*Manager, error) {
	if log == nil {
		log = slog.Default()
	}
	stateDir := cfg.Resolve(cfg.Server.StateDir)
	if err := os.MkdirAll(filepath.Join(stateDir, "certificates"), 0o700); err != nil {
		return nil, fmt.Errorf("certs: state dir: %w", err)
	}
	prefix, err := instancePrefix(stateDir)
	if err != nil {
		return nil, err
	}
	blobs := fleetBlobs(cfg)
	ks, err := keystore.Open(ctx, cfg.Keystore, keystore.Options{StateDir: stateDir, Resolve: cfg.Resolve, Log: log, Blobs: blobs})
	if err != nil {
		return nil, err
	}
	fl, err := openFleet(ctx, cfg, stateDir, ks, blobs, log)
	if err != nil {
		ks.Close()
		return nil, err
	}
	if fl != nil {
		prefix = fl.keyPrefix
	}
	m := &Manager{log: log, ks: ks, stateDir: stateDir, prefix: prefix, acmeStart: make(chan struct{}), fleet: fl}
	m.ctx, m.cancel = context.WithCancel(context.WithoutCancel(ctx))
	m.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert: func(certmagic.Certificate) (*certmagic.Config, error) { return m.cmcfg, nil },
		Logger:           zap.NewNop(),
	})
	// certmagic must never reach the network on its own: explicit issuer, no OCSP, no ARI,
	// no on-demand issuance, storage under our state dir.
	m.cmcfg = certmagic.New(m.cache, certmagic.Config{
		Issuers: []certmagic.Issuer{refuseIssuer{}},
		OCSP:    certmagic.OCSPConfig{DisableStapling: true},
		Storage: &certmagic.FileStorage{Path: filepath.Join(stateDir, "certmagic")},
		Logger:  zap.NewNop(),
	})
	m.cmcfg.DisableARI = true
	m.tickets.init()
	m.startFleetSecrets(ctx)

	snap, fresh, err := m.prepare(ctx, cfg, nil)
	if err != nil {
		m.cache.Stop()
		m.closeFleet()
		ks.Close()
		m.cancel()
		return nil, err
	}
	m.cfg.Store(cfg)
	m.commit(snap, fresh, nil)
	m.watchFleet()
	if fl == nil { // a fleet shares one sticky-cookie key (StickyKey)
		next, err := m.refreshSticky(ctx, time.Now())
		if err != nil {
			m.Close()
			return nil, err
		}
		m.wg.Add(1)
		go m.rotateSticky(next)
	}

	m.wg.Add(2)
	go m.every(TicketRotation, m.rotateTickets)
	go m.every(12*time.Hour, m.warnExpiries) // twice a day
	// Stop when the caller's context ends, too.
	go func() {
		select {
		case <-ctx.Done():
			m.Close()
		case <-m.ctx.Done():
		}
	}()
	return m, nil
}

// Keystore is the manager's keystore (its Stats feed the metrics).
func (m *Manager) Keystore() keystore.Keystore { return m.ks }

// Authority returns a configured authority, or nil.
func (m *Manager) Authority(name string) *Authority { return m.snap.Load().auths[name] }

// Reconcile applies a reloaded configuration: new certificates are issued or loaded and
// removed ones retired. Everything new is built first; on any failure nothing changes.
func (m *Manager) Reconcile(cfg *configs.Config) error {
	p, err := m.Prepare(cfg)
	if err != nil {
		return err
	}
	return p.Commit()
}

// Pending is a certificate configuration built by Prepare and not yet serving. A reload checks
// everything else against it (listeners' certificates, target groups' trust and client
// certificates) and commits only when the whole configuration is good, so a reload refused at
// any step leaves the served certificates as they were.
type Pending struct {
	m     *Manager
	cfg   *configs.Config
	snap  *snapshot
	fresh []*entry
	old   *snapshot
}

// Prepare builds cfg's certificates (issuing or loading new ones) without touching anything
// served. Commit or drop the result; dropping it changes nothing (keys and certificates it
// issued stay in the keystore and state dir, where the next Prepare finds them).
func (m *Manager) Prepare(cfg *configs.Config) (*Pending, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errors.New("certs: manager closed")
	}
	old := m.cfg.Load()
	if !reflect.DeepEqual(old.Keystore, cfg.Keystore) {
		return nil, errors.New("certs: changing [keystore] needs a restart")
	}
	if !reflect.DeepEqual(old.Fleet, cfg.Fleet) {
		return nil, errors.New("certs: changing [fleet] needs a restart")
	}
	if cfg.Resolve(cfg.Server.StateDir) != m.stateDir {
		return nil, errors.New("certs: changing server.state_dir needs a restart")
	}
	oldSnap := m.snap.Load()
	snap, fresh, err := m.prepare(m.ctx, cfg, oldSnap)
	if err != nil {
		return nil, err
	}
	return &Pending{m: m, cfg: cfg, snap: snap, fresh: fresh, old: oldSnap}, nil
}

// ServerTLS is Manager.ServerTLS checked against the pending certificates.
func (p *Pending) ServerTLS(l *configs.Listener) (*tls.Config, error) {
	return p.m.serverTLS(p.cfg, p.snap, l)
}

// AuthorityCert is Manager.AuthorityCert checked against the pending configuration (with
// ClientCertificate, a backends.TLSProvider).
func (p *Pending) AuthorityCert(name string) (*x509.Certificate, error) {
	return authorityCert(p.snap, name)
}

// ClientCertificate is Manager.ClientCertificate checked against the pending configuration.
func (p *Pending) ClientCertificate(name string) (func(*tls.CertificateRequestInfo) (*tls.Certificate, error), error) {
	return p.m.clientCertificate(p.snap, name)
}

// Commit makes the pending certificates the served ones and retires what only the old
// configuration held. It fails if another configuration was committed since Prepare.
func (p *Pending) Commit() error {
	m := p.m
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("certs: manager closed")
	}
	if m.snap.Load() != p.old {
		return errors.New("certs: another configuration was committed since this one was prepared")
	}
	m.cfg.Store(p.cfg)
	m.commit(p.snap, p.fresh, p.old)
	return nil
}

// prepare builds a snapshot for cfg, reusing unchanged authorities and certificates of old.
// It returns the entries that are new (to install and start) and touches nothing served.
func (m *Manager) prepare(ctx context.Context, cfg *configs.Config, old *snapshot) (*snapshot, []*entry, error) {
	s := &snapshot{auths: map[string]*Authority{}, certs: map[string]*entry{}}
	var errs []error
	for _, a := range cfg.Authorities {
		if old != nil {
			// Reused as long as its key is as it was: still there for a usable authority (a key
			// deleted from the token since shows here, at the reload), still missing for a lost
			// one (a restored key makes it usable again).
			if oa := old.auths[a.Name]; oa != nil && oa.Cert.Subject.CommonName == commonName(a) && oa.keyIntact(ctx, m.ks) == (oa.lost == nil) {
				s.auths[a.Name] = oa
				continue
			}
		}
		auth, created, err := m.loadOrCreateAuthority(ctx, a)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		switch {
		case created:
			m.log.Info("created authority", "authority", a.Name, "key", m.ks.Describe(), "not_after", auth.Cert.NotAfter)
		case auth.lost != nil:
			m.log.Error("authority key lost: its certificates keep serving, it issues and renews nothing", "authority", a.Name, "err", auth.lost)
		}
		s.auths[a.Name] = auth
	}
	if len(errs) > 0 {
		return nil, nil, errors.Join(errs...)
	}
	clientNames := map[string]bool{}
	for _, g := range cfg.TargetGroups {
		if g.TLS != nil && g.TLS.ClientCertificate != "" {
			clientNames[g.TLS.ClientCertificate] = true
		}
	}
	for _, l := range cfg.Listeners {
		for _, n := range l.Certificates {
			if cfg.Cert(n) == nil {
				errs = append(errs, fmt.Errorf("certs: listener %s: unknown certificate %q", l.Name, n))
			}
		}
	}
	var fresh []*entry
	for _, c := range cfg.Certificates {
		e := &entry{name: c.Name, spec: c, usage: UsageServer, ready: make(chan struct{}), kt: keystore.KeyType(c.KeyType)}
		if clientNames[c.Name] {
			e.usage |= UsageClient
		}
		e.lifetime = c.LifetimeDuration()
		switch {
		case c.CertFile != "":
			e.kind = "imported"
		case c.Authority != "":
			e.kind = "issued"
			e.auth = s.auths[c.Authority]
			if e.auth == nil {
				errs = append(errs, fmt.Errorf("certs: certificate %s: unknown authority %q", c.Name, c.Authority))
				continue
			}
		case c.ACME != "":
			e.kind = "acme"
		default:
			e.kind = "stored" // imported into the state dir with Import
		}
		if old != nil {
			if oe := old.certs[c.Name]; oe != nil && reflect.DeepEqual(oe.spec, c) && oe.auth == e.auth && oe.usage == e.usage && oe.kind == e.kind {
				s.certs[c.Name] = oe
				continue
			}
		}
		if e.kind == "acme" {
			iss, err := m.newACMEIssuer(cfg, c)
			if err != nil {
				errs = append(errs, fmt.Errorf("certs: certificate %s: %w", c.Name, err))
				continue
			}
			e.acme = iss
		}
		if err := m.load(ctx, cfg, e); err != nil {
			errs = append(errs, fmt.Errorf("certs: certificate %s: %w", c.Name, err))
			continue
		}
		s.certs[c.Name] = e
		fresh = append(fresh, e)
	}
	if len(errs) > 0 {
		return nil, nil, errors.Join(errs...)
	}
	return s, fresh, nil
}

// commit installs the fresh entries, publishes the snapshot and retires what old alone held.
func (m *Manager) commit(s *snapshot, fresh []*entry, old *snapshot) {
	for _, e := range fresh {
		if e.cur.Load() == nil {
			continue // ACME certificate pending: its loop obtains it
		}
		if err := m.install(e, e.cur.Load()); err != nil {
			m.log.Error("certificate cache", "certificate", e.name, "err", err)
		}
	}
	m.snap.Store(s)
	for _, e := range fresh {
		if e.renewable() {
			m.startRenewal(e)
		}
	}
	if old == nil {
		return
	}
	for name, oe := range old.certs {
		if s.certs[name] == oe {
			continue
		}
		m.stopRenewal(oe)
		oe.mu.Lock()
		if oe.hash != "" {
			m.cache.Remove([]string{oe.hash})
		}
		oe.mu.Unlock()
	}
}

// load fills e.cur: imported from files, or from the state dir, or freshly issued.
func (m *Manager) load(ctx context.Context, cfg *configs.Config, e *entry) error {
	switch e.kind {
	case "imported":
		// The key is kept in memory only; the operator's key file is the source of truth
		// (imported certificates are never renewed, as in ACM).
		tc, err := tls.LoadX509KeyPair(cfg.Resolve(e.spec.CertFile), cfg.Resolve(e.spec.KeyFile))
		if err != nil {
			return fmt.Errorf("import %s: %w", e.spec.CertFile, err)
		}
		e.location = "memory (imported from " + e.spec.KeyFile + ")"
		e.cur.Store(&tc)
		m.warnExpiry(e, tc.Leaf)
		return nil
	case "stored":
		st, tc, err := m.readStored(ctx, e.name)
		if err != nil {
			return fmt.Errorf("no certificate imported into the state dir (use the import command): %w", err)
		}
		e.gen, e.keyName, e.location = st.Generation, st.Key, m.ks.Describe()+": "+st.Key
		e.cur.Store(tc)
		m.warnExpiry(e, tc.Leaf)
		return nil
	}
	if st, tc, err := m.readStored(ctx, e.name); err == nil {
		if m.storedMatches(e, st, tc.Leaf) {
			e.gen, e.keyName, e.location = st.Generation, st.Key, st.KeyLocation
			e.cur.Store(tc)
			m.log.Info("reusing stored certificate", "certificate", e.name, "serial", serialHex(tc.Leaf), "not_after", tc.Leaf.NotAfter)
			return nil
		}
		e.gen = st.Generation
	} else if !errors.Is(err, os.ErrNotExist) {
		m.log.Warn("stored certificate unusable; issuing a new one", "certificate", e.name, "err", err)
		// Keep counting generations so new key names never collide with old ones.
		if b, rerr := m.readState(ctx, certKey(e.name)); rerr == nil {
			var st storedCert
			if json.Unmarshal(b, &st) == nil {
				e.gen = st.Generation
			}
		}
	}
	if e.kind == "acme" {
		// Obtained in the background by the renewal loop once StartACME is called: the
		// challenges are answered by listeners that are not bound yet, and a reload must not
		// wait for a CA.
		m.log.Info("ACME certificate pending", "certificate", e.name, "acme", e.spec.ACME)
		return nil
	}
	if m.fleet != nil {
		return m.fleetIssueFirst(ctx, e)
	}
	tc, st, err := m.issue(ctx, e, e.gen+1)
	if err != nil {
		return err
	}
	e.gen, e.keyName, e.location = st.Generation, st.Key, st.KeyLocation
	e.cur.Store(tc)
	return nil
}

// renewable: certificates the lifecycle loop renews (never imported ones).
func (e *entry) renewable() bool { return e.kind == "issued" || e.kind == "acme" }

// install puts tc into the certmagic cache (tagged with the certificate name) and removes the
// previous hash only after the new one is in, so no handshake ever finds nothing.
// Callers hold e.mu or own e exclusively.
func (m *Manager) install(e *entry, tc *tls.Certificate) error {
	hash, err := m.cmcfg.CacheUnmanagedTLSCertificate(m.ctx, *tc, []string{tagPrefix + e.name})
	if err != nil {
		return err
	}
	e.cur.Store(tc)
	e.readyOnce.Do(func() { close(e.ready) })
	if e.hash != "" && e.hash != hash {
		m.cache.Remove([]string{e.hash})
	}
	e.hash = hash
	return nil
}

func (m *Manager) startRenewal(e *entry) {
	ctx, cancel := context.WithCancel(m.ctx)
	e.cancel, e.done, e.kick = cancel, make(chan struct{}), make(chan struct{}, 1)
	m.wg.Add(1)
	go m.renewLoop(ctx, e)
}

func (m *Manager) stopRenewal(e *entry) {
	if e.cancel != nil {
		e.cancel()
		<-e.done
	}
}

// renewAt is when a third of the certificate's lifetime is left.
func renewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	return leaf.NotAfter.Add(-life / 3)
}

// renewLoop renews e when a third of its lifetime is left, backing off on failures.
func (m *Manager) renewLoop(ctx context.Context, e *entry) {
	defer m.wg.Done()
	defer close(e.done)
	defer func() {
		if r := recover(); r != nil {
			m.log.Error("renewal loop panic", "certificate", e.name, "panic", r)
		}
	}()
	if e.kind == "acme" {
		select {
		case <-m.acmeStart:
		case <-ctx.Done():
			return
		}
	}
	backoff := time.Duration(0)
	for {
		next := time.Now() // pending: obtain now
		if tc := e.cur.Load(); tc != nil {
			next = renewAt(tc.Leaf)
		}
		if backoff > 0 {
			next = time.Now().Add(backoff)
		}
		t := time.NewTimer(time.Until(next))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-e.kick:
			t.Stop()
		case <-t.C:
		}
		if err := m.renewScheduled(ctx, e); err != nil {
			if ctx.Err() != nil {
				return
			}
			n := e.failures.Add(1)
			lo, hi := 500*time.Millisecond, 5*time.Minute
			if e.kind == "acme" {
				lo, hi = acmeRetryMin, acmeRetryMax
			}
			backoff = min(max(2*backoff, lo), hi)
			// Never back off past expiry by much: keep retrying at least every tenth of the lifetime.
			if tc := e.cur.Load(); tc != nil {
				lt := tc.Leaf
				backoff = min(backoff, max(lt.NotAfter.Sub(lt.NotBefore)/10, lo))
			}
			m.log.Error("renewal failed", "certificate", e.name, "failures", n, "retry_in", backoff, "err", err)
			continue
		}
		backoff = 0
	}
}

// renew issues generation gen+1, swaps it in and deletes generation gen-1's key (one previous
// generation is kept so handshakes that already picked the old certificate still sign).
func (m *Manager) renew(ctx context.Context, e *entry) error {
	if m.fleet != nil {
		return m.fleetRenew(ctx, e, true)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	tc, st, err := m.issue(ctx, e, e.gen+1)
	if err != nil {
		return err
	}
	if err := m.install(e, tc); err != nil {
		return err
	}
	prevGen := e.gen
	e.setKey(st.Generation, st.Key, st.KeyLocation)
	e.failures.Store(0)
	if prevGen >= 1 {
		if err := m.ks.Delete(ctx, m.keyName(e.name, prevGen-1)); err != nil {
			m.log.Warn("deleting an old key generation", "certificate", e.name, "err", err)
		}
	}
	return nil
}

// Close stops every background loop and releases the keystore. Safe to call twice.
func (m *Manager) Close() {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	m.cache.Stop()
	m.closeFleet()
	if err := m.ks.Close(); err != nil {
		m.log.Warn("closing keystore", "err", err)
	}
}

// every is a manager-owned goroutine (counted in m.wg) that calls f each period until the
// manager closes.
func (m *Manager) every(period time.Duration, f func()) {
	defer m.wg.Done()
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

// warnExpiries logs the certificates within ExpiryWarning of expiry.
func (m *Manager) warnExpiries() {
	for _, e := range m.snap.Load().certs {
		if tc := e.cur.Load(); tc != nil {
			m.warnExpiry(e, tc.Leaf)
		}
	}
}

func (m *Manager) warnExpiry(e *entry, leaf *x509.Certificate) {
	if leaf == nil {
		return
	}
	if e.expiring(leaf, time.Now()) {
		m.log.Warn("certificate expires soon", "certificate", e.name, "kind", e.kind, "not_after", leaf.NotAfter, "days_left", int(time.Until(leaf.NotAfter).Hours()/24))
	}
}

// expiring: leaf is within ExpiryWarning of its not-after and nothing is about to renew it
// (imported certificates are never renewed; others only warn once a renewal has failed).
func (e *entry) expiring(leaf *x509.Certificate, now time.Time) bool {
	return leaf.NotAfter.Sub(now) < ExpiryWarning && (!e.renewable() || e.failures.Load() > 0)
}

// refuseIssuer keeps certmagic from ever falling back to its default ACME issuer.
type refuseIssuer struct{}

func (refuseIssuer) IssuerKey() string { return "fulcrum-none" }

func (refuseIssuer) Issue(context.Context, *x509.CertificateRequest) (*certmagic.IssuedCertificate, error) {
	return nil, errors.New("certmagic issuance is disabled in Fulcrum")
}
