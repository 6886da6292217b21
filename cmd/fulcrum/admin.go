package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// adminServer is the operator's endpoint: health, readiness, metrics, state and reload.
type adminServer struct {
	srv *http.Server
	ln  net.Listener
	wg  sync.WaitGroup
}

func startAdmin(addr string, d *daemon) (*adminServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin endpoint: listen on %s: %w", addr, err)
	}
	a := &adminServer{ln: ln, srv: &http.Server{
		Handler:           adminHandler(d),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          nil,
	}}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("admin endpoint stopped", "err", err)
		}
	}()
	return a, nil
}

func (a *adminServer) Addr() string { return a.ln.Addr().String() }

func (a *adminServer) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if a.srv.Shutdown(ctx) != nil {
		a.srv.Close()
	}
	a.wg.Wait()
}

func adminHandler(d *daemon) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !d.rt.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.obs.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /admin/targets", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.rt.Registry().Targets())
	})
	mux.HandleFunc("GET /admin/certificates", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.rt.Certs().List())
	})
	mux.HandleFunc("POST /admin/certificates/{name}/renew", func(w http.ResponseWriter, r *http.Request) {
		if err := d.rt.Certs().Renew(r.PathValue("name")); err != nil {
			writeJSON(w, http.StatusConflict, map[string]any{"ok": false, "error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true})
	})
	mux.HandleFunc("GET /admin/config", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, redacted(d.rt.Config()))
	})
	mux.HandleFunc("POST /admin/reload", func(w http.ResponseWriter, r *http.Request) {
		ch, err := d.reload("admin")
		if err != nil {
			writeJSON(w, http.StatusUnprocessableEntity, map[string]any{
				"ok": false, "errors": strings.Split(err.Error(), "\n"),
			})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "changes": ch})
	})
	return mux
}

// redacted is the configuration with secret references hidden. Secrets are never inline (only
// env:/file: references), but where they come from is still the operator's business.
func redacted(c *configs.Config) *configs.Config {
	cp := *c
	hide := func(s string) string {
		if s == "" {
			return ""
		}
		if i := strings.IndexByte(s, ':'); i > 0 {
			return s[:i+1] + "<redacted>"
		}
		return "<redacted>"
	}
	cp.Keystore.Pin = hide(cp.Keystore.Pin)
	cp.Keystore.MasterKey = hide(cp.Keystore.MasterKey)
	return &cp
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
