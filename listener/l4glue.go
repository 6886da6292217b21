package listener

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"

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

// buildL4 builds the next generation of a layer-4 listener; prev is the running one at the
// same address, if any.
func (rt *Runtime) buildL4(lc *configs.Listener, set *backends.Set, tlsSrc serverTLSSource, prev *door.Generation) (*door.Generation, error) {
	dialerFor := func(name string) (l4.Dialer, error) {
		g := set.Group(name)
		if g == nil {
			return nil, fmt.Errorf("target group %q is not defined", name)
		}
		return l4.Balance[*backends.Target](l4Group{g}, dialAttempts), nil
	}
	if len(lc.Forward) == 0 {
		return nil, errors.New("no forward target group")
	}
	def, err := dialerFor(lc.Forward[0].Group)
	if err != nil {
		return nil, err
	}
	c := l4.Config{
		Mode:             l4.ModeTCP,
		Dialer:           def,
		IdleTimeout:      lc.IdleTimeoutDuration(),
		HandshakeTimeout: lc.HeaderTimeoutDuration(),
	}
	if g := set.Group(lc.Forward[0].Group); g != nil {
		c.ConnectTimeout = dialAttempts * g.Config().ConnectTimeoutDuration()
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
	case len(lc.Rules) > 0:
		// TLS pass-through routed on the ClientHello's server name.
		c.Mode = l4.ModeSNI
		table, err := router.Compile(lc)
		if err != nil {
			return nil, fmt.Errorf("rules: %w", err)
		}
		rules := table.Rules()
		dialers := make([]l4.Dialer, len(rules))
		for _, r := range rules {
			if len(r.Action.Groups) == 0 {
				return nil, fmt.Errorf("rule %d: network rules can only forward", r.Priority)
			}
			if dialers[r.ID], err = dialerFor(r.Action.Groups[0]); err != nil {
				return nil, err
			}
		}
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
