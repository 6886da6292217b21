package listener

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener/inbound"
	"github.com/fulcrum-lb/fulcrum/listener/l4"
	"github.com/fulcrum-lb/fulcrum/router"
)

// L4Listener is a network or classic tcp/ssl listener: the l4 engine on a socket we own, with
// the inbound PROXY policy chosen per connection so that a reload can change it in place.
type L4Listener struct {
	name     string
	srv      *l4.Server
	layer    atomic.Pointer[inbound.Layer]
	maxConns atomic.Int64
	rejected rejections
	logName  atomic.Pointer[string] // name for the connection log (read on connection goroutines)
	done     sync.WaitGroup
}

// l4State is one generation of an L4 listener.
type l4State struct {
	state    *l4.State
	layer    *inbound.Layer
	maxConns int // max_connections; 0 = unlimited
}

func newL4Listener(sock net.Listener, st *l4State, log *slog.Logger, name string, obs Observer) *L4Listener {
	l := &L4Listener{name: name}
	l.logName.Store(&name)
	l.layer.Store(st.layer)
	l.maxConns.Store(int64(st.maxConns))
	opts := l4.Options{Name: name, Log: log}
	if co, ok := obs.(ConnObserver); ok {
		opts.OnConn = func(ci l4.ConnInfo) { l.observe(co, &ci) }
	}
	l.srv = l4.NewServer(&layeredListener{Listener: sock, layer: &l.layer, l: l}, st.state, opts)
	l.done.Add(1)
	go func() {
		defer l.done.Done()
		if err := l.srv.Serve(); err != nil && !errors.Is(err, l4.ErrServerClosed) {
			log.Error("listener stopped", "listener", name, "err", err)
		}
	}()
	return l
}

// observe hands a finished connection to the connection log.
func (l *L4Listener) observe(co ConnObserver, ci *l4.ConnInfo) {
	m := &ci.Meta
	co.Connection(&ConnRecord{
		Listener: *l.logName.Load(), Start: ci.Start, Duration: ci.Duration,
		Client: m.Client, Local: m.Local, Target: ci.Target, BytesIn: ci.BytesIn, BytesOut: ci.BytesOut,
		TLS: m.TLS, TLSVersion: m.TLSVersion, Cipher: m.CipherSuite, SNI: m.SNI, ALPN: m.ALPN, Reason: ci.Reason,
	})
}

func (l *L4Listener) update(st *l4State, name string) {
	l.name = name
	l.logName.Store(&name)
	l.layer.Store(st.layer)
	l.maxConns.Store(int64(st.maxConns))
	l.srv.Store(st.state)
}

// Shutdown stops accepting and lets streams finish until ctx ends, then closes them.
func (l *L4Listener) Shutdown(ctx context.Context) error {
	err := l.srv.Shutdown(ctx)
	l.done.Wait()
	return err
}

// Addr is the bound address.
func (l *L4Listener) Addr() net.Addr { return l.srv.Addr() }

// Stats are the listener's connection and byte counters.
func (l *L4Listener) Stats() l4.Stats { return l.srv.Stats() }

// Rejected counts the connections closed at accept.
func (l *L4Listener) Rejected() Rejections { return l.rejected.snapshot() }

// layeredListener applies the current inbound PROXY policy to each accepted connection.
type layeredListener struct {
	net.Listener
	layer *atomic.Pointer[inbound.Layer]
	l     *L4Listener
}

func (ll *layeredListener) Accept() (net.Conn, error) {
	for {
		c, err := ll.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if max := ll.l.maxConns.Load(); max > 0 && ll.l.srv.Stats().Active >= max {
			c.Close() // max_connections: shed at once rather than queue
			ll.l.rejected.maxConns.Add(1)
			continue
		}
		if c, err = ll.layer.Load().Conn(c); err == nil {
			return c, nil
		}
		ll.l.rejected.untrusted.Add(1) // an untrusted source, closed by the layer; keep accepting
	}
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

func (rt *Runtime) buildL4State(lc *configs.Listener, set *backends.Set, layer *inbound.Layer, tlsSrc serverTLSSource) (*l4State, error) {
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
	return &l4State{state: st, layer: layer}, nil
}
