package listener

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
	"github.com/fulcrum-lb/fulcrum/listener/inbound"
	"github.com/fulcrum-lb/fulcrum/listener/l4"
	"github.com/fulcrum-lb/fulcrum/router"
)

// Options are the runtime's long-lived collaborators.
type Options struct {
	Log      *slog.Logger
	Observer Observer // nil: no metrics or access log
	// ListenConfig opens new sockets; the zero value is fine.
	ListenConfig net.ListenConfig
}

// Runtime runs every listener of a configuration and applies new configurations live:
// build generation N+1 beside N, commit it by swapping each kept listener's state, then retire
// what N alone held. Long-lived state (sockets, target health, certificates) survives reloads.
type Runtime struct {
	mu   sync.Mutex // serializes Reload and Shutdown; never taken on the request path
	log  *slog.Logger
	obs  Observer
	lc   net.ListenConfig
	reg  *backends.Registry
	cm   *certs.Manager
	cfg  atomic.Pointer[configs.Config]
	set  *backends.Set
	http map[string]*HTTPListener // by address
	l4   map[string]*L4Listener   // by address

	ready atomic.Bool
	bg    sync.WaitGroup // retiring listeners and generations
}

// Changes says what a reload did, for the log and the admin API.
type Changes struct {
	Added   []string `json:"added"`
	Removed []string `json:"removed"`
	Updated []string `json:"updated"`
}

// Start builds the certificate manager, the target registry and every listener of cfg.
func Start(ctx context.Context, cfg *configs.Config, opts Options) (*Runtime, error) {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	cm, err := certs.NewManager(ctx, cfg, log)
	if err != nil {
		return nil, fmt.Errorf("certificate manager: %w", err)
	}
	rt := &Runtime{
		log:  log,
		obs:  opts.Observer,
		lc:   opts.ListenConfig,
		reg:  backends.NewRegistry(log),
		cm:   cm,
		http: map[string]*HTTPListener{},
		l4:   map[string]*L4Listener{},
	}
	if _, err := rt.apply(ctx, cfg); err != nil {
		rt.reg.Close()
		cm.Close()
		return nil, err
	}
	// ACME orders start only now: HTTP-01 and TLS-ALPN-01 challenges are answered by the
	// listeners just bound.
	cm.StartACME()
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

// plan is one listener of the next generation before it is committed.
type plan struct {
	cfg    *configs.Listener
	httpSt *httpState
	l4St   *l4State
	fd     *frontDoor
	keepH  *HTTPListener
	keepL4 *L4Listener
	sock   net.Listener // newly opened
}

func (rt *Runtime) apply(ctx context.Context, cfg *configs.Config) (*Changes, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()

	// Certificates are prepared, not applied: target groups and listeners are checked against
	// the pending set, which serves only once everything else has been built.
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
		p, err := rt.plan(&cfg.Listeners[i], set, pending)
		if err != nil {
			errs = append(errs, fmt.Errorf("listeners[%d] (%q): %w", i, cfg.Listeners[i].Name, err))
			continue
		}
		plans = append(plans, p)
	}
	// Open the sockets of new addresses last, so a failure above opens nothing.
	if len(errs) == 0 {
		for _, p := range plans {
			if p.keepH != nil || p.keepL4 != nil {
				continue
			}
			if _, busy := rt.occupied(p.cfg.Address); busy {
				continue // the address changes kind (HTTP <-> L4): opened at commit, after the old one closes
			}
			ln, err := rt.lc.Listen(ctx, "tcp", p.cfg.Address)
			if err != nil {
				errs = append(errs, fmt.Errorf("listeners (%q): listen on %s: %w", p.cfg.Name, p.cfg.Address, err))
				break
			}
			p.sock = ln
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
	keptH, keptL4 := map[string]bool{}, map[string]bool{}
	for _, p := range plans {
		switch {
		case p.keepH != nil:
			p.keepH.update(p.httpSt, p.fd, budget)
			keptH[p.cfg.Address] = true
			ch.Updated = append(ch.Updated, p.cfg.Name)
		case p.keepL4 != nil:
			p.keepL4.update(p.l4St, p.cfg.Name)
			keptL4[p.cfg.Address] = true
			ch.Updated = append(ch.Updated, p.cfg.Name)
		}
	}
	for addr, l := range rt.http {
		if !keptH[addr] {
			delete(rt.http, addr)
			ch.Removed = append(ch.Removed, l.name)
			rt.retireListener(l.Shutdown, budget, p0(plans, addr))
		}
	}
	for addr, l := range rt.l4 {
		if !keptL4[addr] {
			delete(rt.l4, addr)
			ch.Removed = append(ch.Removed, l.name)
			rt.retireListener(l.Shutdown, budget, p0(plans, addr))
		}
	}
	for _, p := range plans {
		if p.keepH != nil || p.keepL4 != nil {
			continue
		}
		if p.sock == nil { // an address that changed kind: the old listener was closed just above
			ln, err := rt.lc.Listen(ctx, "tcp", p.cfg.Address)
			if err != nil {
				rt.log.Error("listen after kind change", "listener", p.cfg.Name, "address", p.cfg.Address, "err", err)
				continue
			}
			p.sock = ln
		}
		if p.httpSt != nil {
			rt.http[p.cfg.Address] = newHTTPListener(p.sock, p.httpSt, p.fd, budget, rt.log)
		} else {
			rt.l4[p.cfg.Address] = newL4Listener(p.sock, p.l4St, rt.log, p.cfg.Name, rt.obs)
		}
		ch.Added = append(ch.Added, p.cfg.Name)
	}
	old := rt.set
	rt.set = set
	rt.cfg.Store(cfg)
	if old != nil {
		// Requests that loaded the old generation still hold its groups; Release honours each
		// group's deregistration delay before targets stop being checked.
		rt.bg.Add(1)
		go func() { defer rt.bg.Done(); old.Release() }()
	}
	sort.Strings(ch.Added)
	sort.Strings(ch.Removed)
	sort.Strings(ch.Updated)
	return ch, nil
}

// p0 reports whether a listener of the next generation takes over addr, in which case the old
// listener must close synchronously before the new socket opens.
func p0(plans []*plan, addr string) bool {
	for _, p := range plans {
		if p.cfg.Address == addr && p.sock == nil && p.keepH == nil && p.keepL4 == nil {
			return true
		}
	}
	return false
}

func (rt *Runtime) retireListener(shutdown func(context.Context) error, budget time.Duration, sync bool) {
	stop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), budget)
		defer cancel()
		shutdown(ctx)
	}
	if sync {
		stop()
		return
	}
	rt.bg.Add(1)
	go func() { defer rt.bg.Done(); stop() }()
}

func (rt *Runtime) occupied(addr string) (string, bool) {
	if _, ok := rt.http[addr]; ok {
		return "http", true
	}
	if _, ok := rt.l4[addr]; ok {
		return "l4", true
	}
	return "", false
}

// plan builds one listener's next state without touching anything that serves.
// serverTLSSource builds a listener's TLS configuration (the pending certificates of a reload).
type serverTLSSource interface {
	ServerTLS(l *configs.Listener) (*tls.Config, error)
}

func (rt *Runtime) plan(lc *configs.Listener, set *backends.Set, tlsSrc serverTLSSource) (*plan, error) {
	p := &plan{cfg: lc}
	layer := inbound.NewLayer(inbound.Config{Trusted: lc.TrustedPrefixes(), Required: lc.AcceptProxyProtocol})
	fd := &frontDoor{layer: layer, handshakeTimeout: lc.HeaderTimeoutDuration(), maxHeaderBytes: lc.MaxHeaderBytes, maxConns: lc.MaxConnections}
	if lc.Layer7() {
		st, err := rt.buildHTTPState(lc, set)
		if err != nil {
			return nil, err
		}
		if lc.TLSTerminated() {
			tc, err := tlsSrc.ServerTLS(lc)
			if err != nil {
				return nil, err
			}
			if lc.HTTP2Enabled() {
				tc.NextProtos = []string{"h2", "http/1.1"}
			} else {
				tc.NextProtos = []string{"http/1.1"}
			}
			fd.tls = tc
		}
		p.httpSt, p.fd = st, fd
		p.keepH = rt.http[lc.Address]
		return p, nil
	}
	st, err := rt.buildL4State(lc, set, layer, tlsSrc)
	if st != nil {
		st.maxConns = lc.MaxConnections
	}
	if err != nil {
		return nil, err
	}
	p.l4St = st
	p.keepL4 = rt.l4[lc.Address]
	return p, nil
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
// background work (health checks, certificate renewal).
func (rt *Runtime) Shutdown(ctx context.Context) error {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.ready.Store(false)
	var wg sync.WaitGroup
	for _, l := range rt.http {
		wg.Add(1)
		go func() { defer wg.Done(); l.Shutdown(ctx) }()
	}
	for _, l := range rt.l4 {
		wg.Add(1)
		go func() { defer wg.Done(); l.Shutdown(ctx) }()
	}
	wg.Wait()
	rt.http, rt.l4 = map[string]*HTTPListener{}, map[string]*L4Listener{}
	if rt.set != nil {
		rt.set.Release()
		rt.set = nil
	}
	rt.bg.Wait()
	rt.reg.Close()
	rt.cm.Close()
	return ctx.Err()
}

// ListenerStats is one listener's counters for the metrics collector.
type ListenerStats struct {
	Name string
	Kind string // "http" or "l4"
	HTTP HTTPStats
	L4   l4.Stats
	// Rejected is for both kinds (HTTP.Rejected repeats it for HTTP listeners).
	Rejected Rejections
}

// Stats returns every listener's counters.
func (rt *Runtime) Stats() []ListenerStats {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	out := make([]ListenerStats, 0, len(rt.http)+len(rt.l4))
	for _, l := range rt.http {
		hs := l.Stats()
		out = append(out, ListenerStats{Name: l.name, Kind: "http", HTTP: hs, Rejected: hs.Rejected})
	}
	for _, l := range rt.l4 {
		out = append(out, ListenerStats{Name: l.name, Kind: "l4", L4: l.Stats(), Rejected: l.Rejected()})
	}
	return out
}

// Addrs maps listener names to bound addresses (for tests that listen on port 0).
func (rt *Runtime) Addrs() map[string]string {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	m := map[string]string{}
	for _, l := range rt.http {
		m[l.name] = l.Addr().String()
	}
	for _, l := range rt.l4 {
		m[l.name] = l.Addr().String()
	}
	return m
}
