package l4

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
	"github.com/fulcrum-lb/fulcrum/listener/door"
	"github.com/fulcrum-lb/fulcrum/listener/inbound"
)

// leaf is a certificate for names from ca, good for servers and clients alike.
func leaf(t testing.TB, ca *configtest.CA, names ...string) tls.Certificate {
	t.Helper()
	return ca.Issue(t, names, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
}

// target is a test back end; handler runs per connection.
type target struct {
	ln    net.Listener
	addr  string
	wg    sync.WaitGroup
	conns atomic.Int64
}

func startTarget(t testing.TB, ln net.Listener, handler func(net.Conn)) *target {
	t.Helper()
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	tg := &target{ln: ln, addr: ln.Addr().String()}
	tg.wg.Add(1)
	go func() {
		defer tg.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tg.conns.Add(1)
			tg.wg.Add(1)
			go func() {
				defer tg.wg.Done()
				defer c.Close()
				handler(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); tg.wg.Wait() })
	return tg
}

// echo copies until EOF, then half-closes: the reply to a half-close.
func echo(c net.Conn) {
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	io.Copy(c, c)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// addrDialer dials one address and records the metadata of every connection.
type addrDialer struct {
	addr  string
	mu    sync.Mutex
	metas []ConnMeta
	done  atomic.Int64
}

func (d *addrDialer) DialFor(ctx context.Context, m *ConnMeta) (net.Conn, func(), error) {
	d.mu.Lock()
	d.metas = append(d.metas, *m)
	d.mu.Unlock()
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, nil, err
	}
	return c, func() { d.done.Add(1) }, nil
}

func (d *addrDialer) lastMeta() ConnMeta {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.metas[len(d.metas)-1]
}

// mustState makes a State; zero timeouts get what configs gives a network listener.
func mustState(t testing.TB, c Config) *State {
	t.Helper()
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 350 * time.Second
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 10 * time.Second
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	st, err := NewState(c)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// testServer is a door.Listener serving one State with a Handler, as the runtime builds them.
type testServer struct {
	*door.Listener
	h *Handler
}

// testStats merges the listener's connection counters with the engine's.
type testStats struct {
	Stats
	Active          int64
	InboundErrors   uint64
	HandshakeErrors uint64 // TLS handshake (front door) or ClientHello peek (engine)
}

func (s *testServer) Stats() testStats {
	ls, hs := s.Listener.Stats(), s.h.Stats()
	return testStats{Stats: hs, Active: ls.Active, InboundErrors: ls.InboundErrors,
		HandshakeErrors: ls.HandshakeErrors + hs.HandshakeErrors}
}

func generation(st *State, h *Handler, proxy *inbound.Layer) *door.Generation {
	return &door.Generation{Name: "test", State: st, Server: h, Front: door.Front{
		Proxy: proxy, TLS: st.TLS(), HandshakeTimeout: st.Config().HandshakeTimeout}}
}

// Store makes st the generation for new connections and returns the previous State.
func (s *testServer) Store(st *State) *State {
	cur := s.Listener.Generation()
	return s.Listener.Store(generation(st, s.h, cur.Front.Proxy)).State.(*State)
}

// startServer serves st on a fresh loopback socket, behind proxy (nil: no PROXY protocol).
func startServer(t testing.TB, proxy *inbound.Layer, st *State, opt Options) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := NewHandler(opt)
	s := &testServer{Listener: door.New(ln, generation(st, h, proxy), opt.Log), h: h}
	t.Cleanup(func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // cut what is left at once
		s.Shutdown(ctx)
	})
	return s
}

func dial(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c.(*net.TCPConn)
}

func readAll(t testing.TB, r io.Reader) string {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}
