package listener

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/door"
	"github.com/fulcrum-lb/fulcrum/listener/h1"
	"github.com/fulcrum-lb/fulcrum/listener/inbound"
	"github.com/fulcrum-lb/fulcrum/listener/l4"
	"github.com/fulcrum-lb/fulcrum/router"
)

// Options are the runtime's long-lived collaborators.
type Options struct {
	Log      *slog.Logger
	Observer Observer // nil: no metrics or access log
	// Certs and Registry outlive the runtime's generations; the caller creates them, and
	// closes them after Shutdown.
	Certs    *certs.Manager
	Registry *backends.Registry
	// ListenConfig opens new sockets; the zero value is fine.
	ListenConfig net.ListenConfig
	// Inherited are listening sockets handed over by a previous process, by configured
	// address. A listener whose address is here serves on it instead of opening a socket;
	// sockets no listener takes are closed once the first configuration is applied.
	Inherited map[string]net.Listener
}

// Runtime runs every listener of a configuration and applies new configurations live:
// build generation N+1 beside N, commit it by storing each kept listener's generation, then
// retire what N alone held. Long-lived state (sockets, target health, certificates) survives
// reloads.
type Runtime struct {
	mu        sync.Mutex // serializes Reload and Shutdown; never taken on the request path
	log       *slog.Logger
	obs       Observer
	lc        net.ListenConfig
	reg       *backends.Registry
	cm        *certs.Manager
	inherited map[string]net.Listener // until the first apply takes what it needs
	cfg       atomic.Pointer[configs.Config]
	set       *backends.Set
	listeners map[string]*door.Listener // by configured address

	ready atomic.Bool
	bg    sync.WaitGroup // retiring listeners, servers and generations
}

// Changes says what a reload did, for the log and the admin API.
type Changes struct {
	Added   []string `json:"added"`
	Removed []string `json:"removed"`
	Updated []string `json:"updated"`
}

// Start runs every listener of cfg with the certificate manager and the target registry of
// opts.
func Start(ctx context.Context, cfg *configs.Config, opts Options) (*Runtime, error) {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	if opts.Certs == nil || opts.Registry == nil {
		return nil, errors.New("listener: Start needs Options.Certs and Options.Registry")
	}
	rt := &Runtime{
		log:       log,
		obs:       opts.Observer,
		lc:        opts.ListenConfig,
		reg:       opts.Registry,
		cm:        opts.Certs,
		inherited: maps.Clone(opts.Inherited),
		listeners: map[string]*door.Listener{},
	}
	_, err := rt.apply(ctx, cfg)
	for _, ln := range rt.inherited {
		ln.Close() // no listener of this configuration wants it
	}
	rt.inherited = nil
	if err != nil {
		return nil, err
	}
	// ACME orders start only now: HTTP-01 and TLS-ALPN-01 challenges are answered by the
	// listeners just bound.
	rt.cm.StartACME()
	rt.ready.Store(true)
	return rt, nil
}

// Config is the configuration being served.
func (rt *Runtime) Config() *configs.Config { return rt.cfg.Load() }

// Ready reports whether every listener is bound and a configuration is loaded.
func (rt *Runtime) Ready() bool { return rt.ready.Load() }

// Registry gives the admin API the targets and their health.
func (rt *Runtime) Registry() *backends.Registry { return rt.reg }

// Certs gives the admin API and the CLI the certificate manager.
func (rt *Runtime) Certs() *certs.Manager { return rt.cm }

// Reload applies cfg. On any error nothing changes and the running generation keeps serving.
func (rt *Runtime) Reload(ctx context.Context, cfg *configs.Config) (*Changes, error) {
	return rt.apply(ctx, cfg)
}

// serverTLSSource builds a listener's TLS configuration (the pending certificates of a reload).
type serverTLSSource interface {
	ServerTLS(l *configs.Listener) (*tls.Config, error)
}

// build makes the next generation of one listener without touching anything that serves;
// prev is the running generation at the same address, if any. This switch is the one place
// that knows the kinds of listener.
func (rt *Runtime) build(cfg *configs.Config, lc *configs.Listener, set *backends.Set, tlsSrc serverTLSSource, prev *door.Generation) (*door.Generation, error) {
	if lc.Layer7() {
		return rt.buildHTTP(lc, set, tlsSrc, prev, cfg.Server.ShutdownTimeoutDuration())
	}
	return rt.buildL4(lc, set, tlsSrc, prev)
}

// serverOf returns prev's Server when it is of kind S, so a generation of the same kind keeps
// serving with it.
func serverOf[S door.Server](prev *door.Generation) (S, bool) {
	var zero S
	if prev == nil {
		return zero, false
	}
	s, ok := prev.Server.(S)
	return s, ok
}

// front is the front door of lc: PROXY policy, TLS (nil when the kind sees the bytes as sent),
// connection limit.
func (rt *Runtime) front(lc *configs.Listener, tc *tls.Config, handshake time.Duration) door.Front {
	return door.Front{
		Proxy:            inbound.NewLayer(inbound.Config{Trusted: lc.TrustedPrefixes(), Required: lc.AcceptProxyProtocol}),
		TLS:              tc,
		HandshakeTimeout: handshake,
		MaxConns:         lc.MaxConnections,
	}
}

// plan is one listener of the next generation before it is committed.
type plan struct {
	cfg  *configs.Listener
	gen  *door.Generation
	keep *door.Listener // the running listener at the address, nil for a new one
	sock net.Listener   // the new listener's socket
}

func (rt *Runtime) apply(ctx context.Context, cfg *configs.Config) (*Changes, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()

	// Build. Certificates are prepared, not applied: target groups and listeners are checked
	// against the pending set, which serves only once everything else has been built.
	pending, err := rt.cm.Prepare(cfg)
	if err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	set, err := rt.reg.Build(cfg, pending)
	if err != nil {
		return nil, fmt.Errorf("target groups: %w", err)
	}
	plans := make([]*plan, 0, len(cfg.Listeners))
	var errs []error
	for i := range cfg.Listeners {
		lc := &cfg.Listeners[i]
		p := &plan{cfg: lc, keep: rt.listeners[lc.Address]}
		var prev *door.Generation
		if p.keep != nil {
			prev = p.keep.Generation()
		}
		if p.gen, err = rt.build(cfg, lc, set, pending, prev); err != nil {
			errs = append(errs, fmt.Errorf("listeners[%d] (%q): %w", i, lc.Name, err))
			continue
		}
		plans = append(plans, p)
	}
	// New sockets open before the commit, so an address that cannot be bound fails the reload
	// and the running generation keeps serving.
	for i, p := range plans {
		if len(errs) > 0 {
			break
		}
		if p.keep != nil {
			continue
		}
		if p.sock, err = rt.listen(ctx, p.cfg.Address); err != nil {
			errs = append(errs, fmt.Errorf("listeners[%d] (%q): listen on %s: %w", i, p.cfg.Name, p.cfg.Address, err))
		}
	}
	if len(errs) == 0 {
		if err := pending.Commit(); err != nil {
			errs = append(errs, fmt.Errorf("certificates: %w", err))
		}
	}
	if len(errs) > 0 {
		for _, p := range plans {
			if p.sock != nil {
				p.sock.Close()
			}
		}
		set.Release()
		return nil, errors.Join(errs...)
	}

	// Commit.
	ch := &Changes{}
	budget := cfg.Server.ShutdownTimeoutDuration()
	next := make(map[string]*door.Listener, len(plans))
	for _, p := range plans {
		if p.keep == nil {
			next[p.cfg.Address] = door.New(p.sock, p.gen, rt.log)
			ch.Added = append(ch.Added, p.cfg.Name)
			continue
		}
		if old := p.keep.Store(p.gen); old.Server != p.gen.Server {
			// The listener changed kind: the old kind's connections finish on it.
			rt.background(func() { drain(old.Server, budget) })
		}
		next[p.cfg.Address] = p.keep
		ch.Updated = append(ch.Updated, p.cfg.Name)
	}
	// Release.
	for addr, l := range rt.listeners {
		if next[addr] != nil {
			continue
		}
		ch.Removed = append(ch.Removed, l.Generation().Name)
		l.StopAccepting() // the address is free when Reload returns
		rt.background(func() {
			ctx, cancel := context.WithTimeout(context.Background(), budget)
			defer cancel()
			l.Shutdown(ctx)
		})
	}
	rt.listeners = next
	old := rt.set
	rt.set = set
	rt.cfg.Store(cfg)
	if old != nil {
		// Requests that loaded the old generation still hold its groups; Release honours each
		// group's deregistration delay before targets stop being checked.
		rt.background(old.Release)
	}
	sort.Strings(ch.Added)
	sort.Strings(ch.Removed)
	sort.Strings(ch.Updated)
	return ch, nil
}

// listen opens the socket of a new listener, or takes the one a previous process handed over.
func (rt *Runtime) listen(ctx context.Context, addr string) (net.Listener, error) {
	if ln, ok := rt.inherited[addr]; ok {
		delete(rt.inherited, addr)
		return ln, nil
	}
	return rt.lc.Listen(ctx, "tcp", addr)
}

func (rt *Runtime) background(f func()) {
	rt.bg.Add(1)
	go func() { defer rt.bg.Done(); f() }()
}

// drain lets a retired Server finish its requests within budget, then closes it.
func drain(s door.Server, budget time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	s.Drain(ctx)
	s.Close()
}

// Sockets are the listening sockets by configured address (to hand over on upgrade). They stay
// the runtime's.
func (rt *Runtime) Sockets() map[string]net.Listener {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	m := make(map[string]net.Listener, len(rt.listeners))
	for addr, l := range rt.listeners {
		m[addr] = l.Socket()
	}
	return m
}

// buildHTTP builds the next generation of an HTTP listener.
func (rt *Runtime) buildHTTP(lc *configs.Listener, set *backends.Set, tlsSrc serverTLSSource, prev *door.Generation, budget time.Duration) (*door.Generation, error) {
	st, err := rt.buildHTTPState(lc, set)
	if err != nil {
		return nil, err
	}
	var tc *tls.Config
	if lc.TLSTerminated() {
		if tc, err = tlsSrc.ServerTLS(lc); err != nil {
			return nil, err
		}
		if lc.HTTP2Enabled() {
			tc.NextProtos = []string{"h2", "http/1.1"}
		} else {
			tc.NextProtos = []string{"http/1.1"}
		}
	}
	srv, ok := serverOf[*httpServer](prev)
	if !ok {
		srv = newHTTPServer(lc.Address, budget, rt.log)
	}
	return &door.Generation{Name: lc.Name, Front: rt.front(lc, tc, lc.HeaderTimeoutDuration()), Server: srv, State: st}, nil
}

func (rt *Runtime) buildHTTPState(lc *configs.Listener, set *backends.Set) (*httpState, error) {
	table, err := router.Compile(lc)
	if err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	mode, err := desync.ParseMode(lc.DesyncMitigation)
	if err != nil {
		return nil, err
	}
	st := &httpState{
		cfg:     lc,
		table:   table,
		trusted: lc.ForwarderPrefixes(), // trusted_forwarders, never the PROXY senders
		tlsOn:   lc.Protocol == "https",
		xff:     h1.ParseXFF(lc.XFF),
		proto:   lc.Protocol,
		port:    portOf(lc.Address),
		desync:  mode,
		obs:     rt.obs,
		acme:    rt.cm,
	}
	proxies := map[string]*groupProxy{}
	rules := table.Rules()
	st.actions = make([][]*groupProxy, len(rules))
	for _, r := range rules {
		if r.Action.Kind != router.ActionForward {
			continue
		}
		for _, name := range r.Action.Groups {
			gp := proxies[name]
			if gp == nil {
				g := set.Group(name)
				if g == nil {
					return nil, fmt.Errorf("target group %q is not defined", name)
				}
				gp = st.newGroupProxy(g)
				proxies[name] = gp
			}
			st.actions[r.ID] = append(st.actions[r.ID], gp)
		}
	}
	return st, nil
}

// Shutdown stops every listener, lets in-flight work finish until ctx ends, and stops the
// background work (health checks). The certificate manager and the registry stay the caller's.
func (rt *Runtime) Shutdown(ctx context.Context) error {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.ready.Store(false)
	var wg sync.WaitGroup
	for _, l := range rt.listeners {
		wg.Add(1)
		go func() { defer wg.Done(); l.Shutdown(ctx) }()
	}
	wg.Wait()
	rt.listeners = map[string]*door.Listener{}
	if rt.set != nil {
		rt.set.Release()
		rt.set = nil
	}
	rt.bg.Wait()
	return ctx.Err()
}

// ListenerStats is one listener's counters for the metrics collector.
type ListenerStats struct {
	Name string
	Kind string // "http" or "l4"
	door.Stats
	L4 l4.Stats // the layer-4 engine's counters (l4 listeners only)
}

// Stats returns every listener's counters.
func (rt *Runtime) Stats() []ListenerStats {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	out := make([]ListenerStats, 0, len(rt.listeners))
	for _, l := range rt.listeners {
		g := l.Generation()
		ls := ListenerStats{Name: g.Name, Kind: "http", Stats: l.Stats()}
		if s, ok := g.Server.(*l4Server); ok {
			ls.Kind, ls.L4 = "l4", s.Stats()
		}
		out = append(out, ls)
	}
	return out
}

// Addrs maps listener names to bound addresses.
func (rt *Runtime) Addrs() map[string]string {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	m := map[string]string{}
	for _, l := range rt.listeners {
		m[l.Generation().Name] = l.Addr().String()
	}
	return m
}
