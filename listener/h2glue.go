package listener

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener/h2"
)

// h2Gen is the HTTP/2 server of one set of server-level settings (see serverKey); a reload that
// changes them installs a new one and retires the old with a GOAWAY.
type h2Gen struct {
	srv *h2.Server
}

// h2Config maps a listener's settings to the HTTP/2 engine's limits.
func h2Config(c *configs.Listener) h2.Config {
	cfg := h2.Config{
		MaxHeaderListSize: uint32(c.MaxHeaderBytes),
		IdleTimeout:       c.IdleTimeoutDuration(),
		PrefaceTimeout:    c.HeaderTimeoutDuration(),
	}
	if d := c.SendTimeoutDuration(); d > 0 {
		cfg.SendTimeout = d
	}
	if d := c.ClientBodyTimeoutDuration(); d > 0 {
		cfg.BodyTimeout = d
	}
	return cfg
}

func newH2Gen(c *configs.Listener, h h2.Handler) *h2Gen {
	return &h2Gen{srv: h2.NewServer(h2Config(c), h)}
}

// noConnect answers CONNECT with 501: the request core tunnels nothing over HTTP/2, and extended
// CONNECT (RFC 8441) is not offered (the engine never sends SETTINGS_ENABLE_CONNECT_PROTOCOL).
func noConnect(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodConnect {
			http.Error(w, "CONNECT is not supported over HTTP/2", http.StatusNotImplemented)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// serveH2 serves one connection that negotiated "h2" on the calling goroutine.
func serveH2(ctx context.Context, gen *h2Gen, c net.Conn) {
	gen.srv.ServeConn(ctx, c)
}

// retireH2 sends GOAWAY on the old server's connections and lets their streams finish within
// budget, then closes what is left.
func retireH2(ctx context.Context, old *h2Gen, budget time.Duration) {
	sctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	old.srv.Shutdown(sctx)
}
