// Package backends holds Fulcrum's target groups: targets with atomic counters kept in a
// long-lived Registry (so health, counters and in-flight survive reloads), lock-free balancing
// policies, active and passive health checking, one HTTP transport per group, and the layer-4
// dialer that writes PROXY headers and wraps TLS.
//
// Lifetime: one Registry per process. Each configuration generation calls Registry.Build, which
// acquires references on the targets and transports it uses, and calls Set.Release once the
// generation is retired. A target whose last reference is released keeps its health checks (and
// its state, should it come back) for the group's deregistration_delay, then is forgotten.
//
// Health model: a newly registered target is treated as healthy until its active checks prove
// otherwise (unhealthy_threshold consecutive failures). ALB starts targets "initial" and routes
// nothing to them until they pass; we route at once so a fresh start or a reload never has a
// window with no targets, and rely on passive ejection plus the caller's retry on another target
// to cover a target that is in fact down. slow_start still ramps new targets gently.
package backends

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

const (
	// Passive health: this many consecutive failures eject a target for the cool-down, which
	// doubles on each ejection that follows without a success in between, up to maxEjection.
	defaultEjectFailures = 5
	defaultEjectCooldown = 10 * time.Second
	maxEjection          = 5 * time.Minute
)

// TLSProvider is what only the certificate manager knows about a group's client TLS: the
// private authorities and the managed client certificates (checked against the configuration
// being built). clientTLS builds everything else.
type TLSProvider interface {
	// AuthorityCert is the CA certificate of a private authority.
	AuthorityCert(name string) (*x509.Certificate, error)
	// ClientCertificate is the handshake callback that presents a managed certificate (its
	// current version at each handshake).
	ClientCertificate(name string) (func(*tls.CertificateRequestInfo) (*tls.Certificate, error), error)
}

// Option configures a Registry.
type Option func(*Registry)

// StickyKeys supplies the sticky-cookie HMAC keys: the one that signs new cookies, and every one
// a cookie may still be signed with (the signing key included). The certificate manager keeps
// them sealed in the keystore and rotates them with an overlap; the call is on the request path,
// so it must not lock or allocate.
type StickyKeys interface {
	StickyKeys() (sign []byte, verify [][]byte)
}

// WithStickyKeys takes the sticky-cookie keys from src, so cookies stay valid across restarts
// and key rotations. Without it (or WithStickyKey) the key is random per process.
func WithStickyKeys(src StickyKeys) Option {
	return func(r *Registry) { r.sticky = src }
}

// WithStickyKey derives one fixed sticky-cookie key from key, shared by several Fulcrum
// instances holding the same key (a fleet).
func WithStickyKey(key []byte) Option {
	return func(r *Registry) {
		m := hmac.New(sha256.New, key)
		m.Write([]byte("fulcrum sticky cookie v1"))
		r.sticky = fixedKey(m.Sum(nil))
	}
}

// fixedKey is one key that signs and verifies.
type fixedKey []byte

func (k fixedKey) StickyKeys() ([]byte, [][]byte) { return k, [][]byte{k} }

// withPassiveHealth sets how many consecutive failures eject a target and for how long (the
// cool-down doubles on repeated ejections). failures <= 0 disables passive ejection.
func withPassiveHealth(failures int, cooldown time.Duration) Option {
	return func(r *Registry) {
		r.ejectFailures = int32(failures)
		if cooldown > 0 {
			r.ejectCooldown = cooldown
		}
	}
}

// Registry is the long-lived home of targets and transports. It is safe for concurrent use.
type Registry struct {
	log    *slog.Logger
	sticky StickyKeys

	ejectFailures int32
	ejectCooldown time.Duration

	base  time.Time           // monotonic origin of now()
	clock func() int64        // test hook; nil = real monotonic clock
	epoch atomic.Uint64       // bumped on every health change; groups rebuild their snapshot
	ctx   context.Context     // cancelled by Close; parent of every checker
	stop  context.CancelFunc  // cancels ctx
	wg    sync.WaitGroup      // checkers
	mu    sync.Mutex          // guards the maps and reference counts below
	tgts  map[string]*Target  // by key: group protocol | address | health-check fingerprint (see buildGroup)
	trans map[string]*poolRef // by group name + transport fingerprint
	dead  bool

	openConns sync.Map // address -> *atomic.Int64, open HTTP connections (least_connections)
}

// connCounter is the open-connection counter of an address (created on first use, kept for
// the registry's life: one small counter per address ever configured).
func (r *Registry) connCounter(address string) *atomic.Int64 {
	if c, ok := r.openConns.Load(address); ok {
		return c.(*atomic.Int64)
	}
	c, _ := r.openConns.LoadOrStore(address, new(atomic.Int64))
	return c.(*atomic.Int64)
}

// countingDial wraps an HTTP transport's dial so each connection counts as open against its
// address until it is closed.
func (r *Registry) countingDial(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		tc, ok := c.(*net.TCPConn)
		if err != nil || !ok {
			return c, err
		}
		ctr := r.connCounter(addr)
		ctr.Add(1)
		return &countedConn{TCPConn: tc, ctr: ctr}, nil
	}
}

// countedConn is a target connection that leaves its address's open count when closed. It
// embeds the *net.TCPConn so that SyscallConn (the idle-connection peek) and ReadFrom still work.
type countedConn struct {
	*net.TCPConn
	ctr    *atomic.Int64
	closed atomic.Bool
}

// RawTCP says reads and writes go straight to the socket, so a body may be spliced from it.
func (c *countedConn) RawTCP() *net.TCPConn { return c.TCPConn }

func (c *countedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.ctr.Add(-1)
	}
	return c.TCPConn.Close()
}

// NewRegistry returns an empty registry. log may be nil.
func NewRegistry(log *slog.Logger, opts ...Option) *Registry {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Registry{
		log:           log,
		ejectFailures: defaultEjectFailures,
		ejectCooldown: defaultEjectCooldown,
		base:          time.Now(),
		ctx:           ctx,
		stop:          cancel,
		tgts:          map[string]*Target{},
		trans:         map[string]*poolRef{},
	}
	for _, o := range opts {
		o(r)
	}
	if r.sticky == nil {
		k := make(fixedKey, 32)
		if _, err := rand.Read(k); err != nil {
			panic("backends: crypto/rand failed: " + err.Error()) // never happens on Linux
		}
		r.sticky = k
	}
	return r
}

// now is a monotonic nanosecond clock (cheap, no allocation).
func (r *Registry) now() int64 {
	if r.clock != nil {
		return r.clock()
	}
	return int64(time.Since(r.base))
}

// Close stops every health checker and waits for them. Sets built earlier keep answering Pick
// with the last known health; their transports are closed.
func (r *Registry) Close() {
	r.mu.Lock()
	r.dead = true
	for _, p := range r.trans {
		p.rt.CloseIdleConnections()
	}
	r.mu.Unlock()
	r.stop()
	r.wg.Wait()
}

// Targets reports every target the registry holds (including draining ones), sorted by group
// protocol and address, for the admin API.
func (r *Registry) Targets() []TargetStatus {
	r.mu.Lock()
	out := make([]TargetStatus, 0, len(r.tgts))
	for _, t := range r.tgts {
		st := t.statusLocked()
		out = append(out, st)
	}
	r.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Address != out[j].Address {
			return out[i].Address < out[j].Address
		}
		return out[i].Protocol < out[j].Protocol
	})
	return out
}

// Set is one generation's target groups.
type Set struct {
	reg      *Registry
	groups   map[string]*Group
	list     []*Group
	released atomic.Bool
}

// Group returns the named group, or nil.
func (s *Set) Group(name string) *Group { return s.groups[name] }

// Groups returns the groups in configuration order.
func (s *Set) Groups() []*Group { return s.list }

// Build builds one generation's groups from cfg, acquiring references on the targets and
// transports they use. On error nothing is acquired. tlsp may be nil.
func (r *Registry) Build(cfg *configs.Config, tlsp TLSProvider) (*Set, error) {
	s := &Set{reg: r, groups: make(map[string]*Group, len(cfg.TargetGroups))}
	var errs []error
	for i := range cfg.TargetGroups {
		gc := &cfg.TargetGroups[i]
		if _, dup := s.groups[gc.Name]; dup {
			errs = append(errs, fmt.Errorf("target group %q: defined twice", gc.Name))
			continue
		}
		g, err := r.buildGroup(cfg, gc, tlsp)
		if err != nil {
			errs = append(errs, fmt.Errorf("target group %q: %w", gc.Name, err))
			continue
		}
		s.groups[gc.Name] = g
		s.list = append(s.list, g)
	}
	if len(errs) > 0 {
		s.releaseNow()
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// Release drops the generation's references. Call it once the generation is retired (no new
// requests use it). A target no other generation holds keeps its health checks for the group's
// deregistration_delay; in-flight requests holding the *Target are unaffected either way.
func (s *Set) Release() {
	if !s.released.CompareAndSwap(false, true) {
		return
	}
	for _, g := range s.list {
		g.release(g.dereg)
	}
}

// releaseNow undoes a failed Build without delays.
func (s *Set) releaseNow() {
	s.released.Store(true)
	for _, g := range s.list {
		g.release(0)
	}
}

// acquireTarget returns the target for key, creating it (and its checker) when new. tlsConf (nil
// for plain groups) is the group's client TLS: it is in place before the checker starts, or the
// first TLS check would run without the group's verification.
func (r *Registry) acquireTarget(key string, spec targetSpec, group string, tlsConf *tls.Config) *Target {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.tgts[key]
	fresh := t == nil
	if fresh {
		t = newTarget(r, key, spec)
		r.tgts[key] = t
	}
	if tlsConf != nil {
		t.tlsConf.Store(tlsConf) // the latest generation's
	}
	if fresh && !r.dead {
		t.startChecker()
	}
	t.refs++
	if t.groups == nil {
		t.groups = map[string]int{}
	}
	t.groups[group]++
	return t
}

// releaseTarget drops one reference after delay.
func (r *Registry) releaseTarget(t *Target, group string, delay time.Duration) {
	r.mu.Lock()
	t.refs--
	if t.groups[group]--; t.groups[group] <= 0 {
		delete(t.groups, group)
	}
	t.pending++
	r.mu.Unlock()
	if delay <= 0 {
		r.settle(t)
		return
	}
	time.AfterFunc(delay, func() { r.settle(t) })
}

// settle ends one delayed release; the last one stops the checker and forgets the target.
func (r *Registry) settle(t *Target) {
	r.mu.Lock()
	t.pending--
	drop := t.refs == 0 && t.pending == 0 && r.tgts[t.key] == t
	if drop {
		delete(r.tgts, t.key)
	}
	r.mu.Unlock()
	if drop {
		t.stopChecker()
	}
}

// poolRef is a transport shared by every generation whose group config is unchanged, so idle
// keep-alive connections survive reloads.
type poolRef struct {
	key  string
	rt   roundTripCloser
	refs int
}

// roundTripCloser is what a group needs of its HTTP client: http.Transport or h1Transport.
type roundTripCloser interface {
	http.RoundTripper
	CloseIdleConnections()
}

func (r *Registry) acquireTransport(key string, mk func() roundTripCloser) *poolRef {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.trans[key]
	if p == nil {
		p = &poolRef{key: key, rt: mk()}
		r.trans[key] = p
	}
	p.refs++
	return p
}

func (r *Registry) releaseTransport(p *poolRef, delay time.Duration) {
	done := func() {
		r.mu.Lock()
		p.refs--
		drop := p.refs == 0 && r.trans[p.key] == p
		if drop {
			delete(r.trans, p.key)
		}
		r.mu.Unlock()
		if drop {
			// In-flight requests finish; their connections then idle out (IdleConnTimeout).
			p.rt.CloseIdleConnections()
		}
	}
	if delay <= 0 {
		done()
		return
	}
	time.AfterFunc(delay, done)
}

// bump tells every group that some target's health changed.
func (r *Registry) bump() { r.epoch.Add(1) }
