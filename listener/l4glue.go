package listener

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener/door"
	"github.com/fulcrum-lb/fulcrum/listener/l4"
	"github.com/fulcrum-lb/fulcrum/router"
)

// l4Server is the layer-4 kind of listener (network tcp/tls, classic tcp/ssl): the l4 engine
// behind a door.Listener. Each generation's State is an *l4.State.
type l4Server struct {
	*l4.Handler
	name atomic.Pointer[string] // for the connection log (read on connection goroutines)
}

func newL4Server(name string, log *slog.Logger, obs Observer) *l4Server {
	s := &l4Server{}
	s.name.Store(&name)
	opts := l4.Options{Name: name, Log: log}
	if co, ok := obs.(ConnObserver); ok {
		opts.OnConn = func(ci l4.ConnInfo) { s.observe(co, &ci) }
	}
	s.Handler = l4.NewHandler(opts)
	return s
}

// Commit implements door.Server.
func (s *l4Server) Commit(g *door.Generation) { s.name.Store(&g.Name) }

// observe hands a finished connection to the connection log.
func (s *l4Server) observe(co ConnObserver, ci *l4.ConnInfo) {
	m := &ci.Meta
	co.Connection(&ConnRecord{
		Listener: *s.name.Load(), Start: ci.Start, Duration: ci.Duration,
		Client: m.Client, Local: m.Local, Target: ci.Target, BytesIn: ci.BytesIn, BytesOut: ci.BytesOut,
		TLS: m.TLS, TLSVersion: m.TLSVersion, Cipher: m.CipherSuite, SNI: m.SNI, ALPN: m.ALPN, Reason: ci.Reason,
	})
}

// l4Group adapts a backends group to the l4 balancer.
type l4Group struct{ g *backends.Group }

func (a l4Group) Pick(client netip.Addr, exclude *backends.Target) *backends.Target {
	return a.g.Pick(client, exclude)
}

func (a l4Group) Dial(ctx context.Context, t *backends.Target, m *l4.ConnMeta) (net.Conn, error) {
	return a.g.Dial(ctx, t, &backends.ProxyInfo{
		Src: m.Client, Dst: m.Local, ALPN: m.ALPN, SNI: m.SNI,
		TLSVersion: m.TLSVersion, Cipher: m.CipherSuite,
		ClientCertVerified: m.ClientCertVerified, HasTLS: m.TLS,
	})
}

// dialAttempts is one try plus one retry on another target when a dial fails before any
// client byte was sent (DESIGN: "A dial failure before any byte was sent tries the next target").
const dialAttempts = 2

// weightedDialer is a forward to several weighted target groups (NLB weighted target groups):
// each connection picks a group by weight, then a target within it.
type weightedDialer struct {
	action  *router.Action
	dialers []l4.Dialer // parallel to action.Groups
}

func (w *weightedDialer) DialFor(ctx context.Context, m *l4.ConnMeta) (net.Conn, func(), error) {
	return w.dialers[w.action.PickGroup(rand.Uint64())].DialFor(ctx, m)
}

// buildL4 builds the next generation of a layer-4 listener; prev is the running one at the
// same address, if any.
func (rt *Runtime) buildL4(lc *configs.Listener, set *backends.Set, tlsSrc serverTLSSource, prev *door.Generation) (*door.Generation, error) {
	table, err := router.Compile(lc)
	if err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	var connect time.Duration // the longest connect_timeout of the groups it may dial
	dialerFor := func(r *router.Rule) (l4.Dialer, error) {
		a := r.Action
		if a.Kind != router.ActionForward || len(a.Groups) == 0 {
			return nil, fmt.Errorf("rule %d: network rules can only forward", r.Priority)
		}
		ds := make([]l4.Dialer, len(a.Groups))
		for i, name := range a.Groups {
			g := set.Group(name)
			if g == nil {
				return nil, fmt.Errorf("target group %q is not defined", name)
			}
			connect = max(connect, g.Config().ConnectTimeoutDuration())
			ds[i] = l4.Balance[*backends.Target](l4Group{g}, dialAttempts)
		}
		if len(ds) == 1 {
			return ds[0], nil
		}
		return &weightedDialer{action: a, dialers: ds}, nil
	}
	rules := table.Rules()
	dialers := make([]l4.Dialer, len(rules))
	for _, r := range rules {
		if dialers[r.ID], err = dialerFor(r); err != nil {
			return nil, err
		}
	}
	c := l4.Config{
		Mode:             l4.ModeTCP,
		Dialer:           dialers[0],
		IdleTimeout:      lc.IdleTimeoutDuration(),
		HandshakeTimeout: lc.HeaderTimeoutDuration(),
		ConnectTimeout:   dialAttempts * connect,
	}
	switch {
	case lc.TLSTerminated():
		c.Mode = l4.ModeTLS
		if c.TLS, err = tlsSrc.ServerTLS(lc); err != nil {
			return nil, err
		}
		if c.ALPN, err = l4.ParseALPNPolicy(lc.ALPNPolicy); err != nil {
			return nil, err
		}
	case len(rules) > 1:
		// TLS pass-through routed on the ClientHello's server name.
		c.Mode = l4.ModeSNI
		c.Route = func(sni string) l4.Dialer { return dialers[table.MatchSNI(sni).ID] }
	}
	st, err := l4.NewState(c)
	if err != nil {
		return nil, err
	}
	srv, ok := serverOf[*l4Server](prev)
	if !ok {
		srv = newL4Server(lc.Name, rt.log, rt.obs)
	}
	return &door.Generation{Name: lc.Name, Front: rt.front(lc, st.TLS(), st.Config().HandshakeTimeout), Server: srv, State: st}, nil
}
