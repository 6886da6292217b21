package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// adminServer is the operator's endpoint: health, readiness, metrics, state and reload.
type adminServer struct {
	srv *http.Server
	ln  net.Listener
	raw net.Listener // the TCP socket under ln, handed over on a binary upgrade
	wg  sync.WaitGroup
}

// startAdmin binds the admin endpoint. Validation already refuses a non-loopback address unless
// admin_allow_public is set; the bind checks again (the address actually bound, after "localhost"
// or an empty host were resolved), because the admin API can reload the configuration and a
// configuration that skipped Validate must not open it to the network by accident.
// inherited is the socket a previous process handed over on a binary upgrade, nil otherwise.
func startAdmin(addr string, allowPublic bool, d *daemon, inherited net.Listener) (*adminServer, error) {
	if !allowPublic {
		if err := checkLoopback(addr); err != nil {
			if inherited != nil {
				inherited.Close()
			}
			return nil, err
		}
	}
	ln := inherited
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("admin endpoint: listen on %s: %w", addr, err)
		}
	}
	raw := ln
	if !allowPublic {
		if err := checkLoopback(ln.Addr().String()); err != nil {
			ln.Close()
			return nil, err
		}
	}
	if d.tlsAdmin != nil {
		ln = tls.NewListener(ln, d.tlsAdmin)
	}
	a := &adminServer{ln: ln, raw: raw, srv: &http.Server{
		Handler:           d.guardAdmin(adminHandler(d)),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       60 * time.Second,
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

// checkLoopback refuses an admin address that is not a loopback IP ("localhost" is accepted
// before the bind; the bound address is checked again afterwards).
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("admin endpoint %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if a, err := netip.ParseAddr(host); err == nil && a.Unmap().IsLoopback() {
		return nil
	}
	return fmt.Errorf("admin endpoint %q is not a loopback address: refusing to bind it (set admin_allow_public = true to allow it)", addr)
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

// adminHandler is the admin API's routes; guardAdmin puts authentication and roles in front.
func adminHandler(d *daemon) *http.ServeMux {
	mux := http.NewServeMux()
	registerKeyRoutes(mux, d)
	registerStatusRoutes(mux, d)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !d.rt.Ready() {
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("not ready\n"))
			return
		}
		w.Write([]byte("ready\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.obs.Registry(), promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /admin/targets", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, targetsView(d.rt.Config(), d.rt.Registry().Targets()))
	})
	mux.HandleFunc("GET /admin/fleet", func(w http.ResponseWriter, r *http.Request) {
		code, v := fleetView(d, r)
		writeJSON(w, code, v)
	})
	mux.HandleFunc("GET /admin/certificates", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, certificatesView(d.rt.Certs().List(), time.Now()))
	})
	mux.HandleFunc("GET /admin/authorities", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, authoritiesView(d.rt.Config(), d.rt.Certs()))
	})
	mux.HandleFunc("POST /admin/certificates/{name}/renew", func(w http.ResponseWriter, r *http.Request) {
		if err := d.rt.Certs().Renew(r.PathValue("name")); err != nil {
			writeJSON(w, http.StatusConflict, map[string]any{"ok": false, "error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true})
	})
	mux.HandleFunc("GET /admin/config", func(w http.ResponseWriter, r *http.Request) {
		v, err := configView(d.rt.Config())
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, map[string]any{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, v)
	})
	// The last reload, whatever triggered it: a refused SIGHUP reload is otherwise only in the
	// log, and an operator (or a deploy pipeline) asks here whether the file took effect.
	mux.HandleFunc("GET /admin/reload/last", func(w http.ResponseWriter, r *http.Request) {
		res := d.lastReload.Load()
		if res == nil {
			writeJSON(w, http.StatusNotFound, map[string]any{"error": "no reload since start"})
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("POST /admin/reload", func(w http.ResponseWriter, r *http.Request) {
		res := d.reload("admin")
		status := http.StatusOK
		if !res.OK {
			status = http.StatusUnprocessableEntity
		}
		writeJSON(w, status, res)
	})
	return mux
}

// targetView is one target in /admin/targets. backends.TargetStatus has no JSON tags, so the
// admin API's shape is fixed here, where a rename in backends cannot change it silently.
type targetView struct {
	Address             string `json:"address"`
	ID                  string `json:"id"`
	State               string `json:"state"` // initial | healthy | unhealthy | ejected | draining
	Healthy             bool   `json:"healthy"`
	Ejected             bool   `json:"ejected"`
	Draining            bool   `json:"draining"`
	Reason              string `json:"reason"` // last failed check, "" if none failed yet
	InFlight            int64  `json:"in_flight"`
	Failures            uint64 `json:"failures"`
	ConsecutiveFailures int    `json:"consecutive_failures"`
	HealthCheck         string `json:"health_check"`
}

type groupView struct {
	Name      string       `json:"name"`
	Protocol  string       `json:"protocol"`
	Healthy   int          `json:"healthy"`
	Unhealthy int          `json:"unhealthy"`
	Targets   []targetView `json:"targets"`
}

type targetsResponse struct {
	Groups []groupView `json:"groups"`
	// Draining are targets no live generation names any more, kept for deregistration_delay.
	Draining []targetView `json:"draining"`
}

func newTargetView(s backends.TargetStatus) targetView {
	v := targetView{
		Address: s.Address, ID: s.ID, Healthy: s.Healthy, Ejected: s.Ejected, Draining: s.Draining,
		Reason: s.Reason, InFlight: s.InFlight, Failures: s.Failures,
		ConsecutiveFailures: s.ConsecutiveFailures, HealthCheck: s.HealthCheck,
	}
	switch {
	case s.Draining:
		v.State = "draining"
	case s.Ejected:
		v.State = "ejected"
	case s.Initial:
		// No verdict from the health checks yet: routed to, but not claimed healthy.
		v.State = "initial"
	case s.Healthy:
		v.State = "healthy"
	default:
		v.State = "unhealthy"
	}
	return v
}

// targetsView groups the registry's targets by the configuration's target groups, in
// configuration order.
func targetsView(cfg *configs.Config, sts []backends.TargetStatus) targetsResponse {
	out := targetsResponse{Groups: []groupView{}, Draining: []targetView{}}
	idx := map[string]int{}
	for _, g := range cfg.TargetGroups {
		idx[g.Name] = len(out.Groups)
		out.Groups = append(out.Groups, groupView{Name: g.Name, Protocol: g.Protocol, Targets: []targetView{}})
	}
	for _, s := range sts {
		v := newTargetView(s)
		placed := false
		for _, g := range s.Groups {
			i, ok := idx[g]
			if !ok {
				continue
			}
			gv := &out.Groups[i]
			gv.Targets = append(gv.Targets, v)
			if v.Healthy {
				gv.Healthy++
			} else {
				gv.Unhealthy++
			}
			placed = true
		}
		if !placed {
			out.Draining = append(out.Draining, v)
		}
	}
	return out
}

type certificateView struct {
	Name             string    `json:"name"`
	Kind             string    `json:"kind"` // issued | imported | stored
	Domains          []string  `json:"domains"`
	Issuer           string    `json:"issuer"`
	Serial           string    `json:"serial"`
	NotBefore        time.Time `json:"not_before"`
	NotAfter         time.Time `json:"not_after"`
	ExpiresInSeconds int64     `json:"expires_in_seconds"`
	RenewAt          string    `json:"renew_at"` // "" for imported certificates (never renewed)
	KeyLocation      string    `json:"key_location"`
	Generation       int       `json:"generation"`
	RenewFailures    int64     `json:"renew_failures"`
	ExpiryWarning    bool      `json:"expiry_warning"` // within 45 days and nothing is about to renew it
}

func certificatesView(list []certs.CertInfo, now time.Time) []certificateView {
	out := make([]certificateView, 0, len(list))
	for _, c := range list {
		v := certificateView{
			Name: c.Name, Kind: c.Kind, Domains: c.Domains, Issuer: c.Issuer, Serial: c.Serial,
			NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC(),
			ExpiresInSeconds: int64(c.NotAfter.Sub(now).Seconds()),
			KeyLocation:      c.KeyLocation, Generation: c.Generation, RenewFailures: c.RenewFailures,
			ExpiryWarning: c.Expiring,
		}
		if v.Domains == nil {
			v.Domains = []string{}
		}
		if !c.RenewAt.IsZero() {
			v.RenewAt = c.RenewAt.UTC().Format(time.RFC3339)
		}
		out = append(out, v)
	}
	return out
}

// configView is the running configuration with the keys of the configuration file (snake_case,
// as the operator wrote them) and secrets redacted. It goes through the TOML encoder so the names
// are the file's, then back into a generic map for JSON.
func configView(c *configs.Config) (map[string]any, error) {
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(redacted(c)); err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	m := map[string]any{}
	if _, err := toml.Decode(buf.String(), &m); err != nil {
		return nil, fmt.Errorf("re-read configuration: %w", err)
	}
	if c.File != "" {
		m["file"] = c.File
	}
	return m, nil
}

// redacted is the configuration with secrets hidden: the keystore's secret references (where a
// PIN or master key comes from is still the operator's business) and the values of header
// rewrites whose names look like credentials (an Authorization header set toward a target).
func redacted(c *configs.Config) *configs.Config {
	cp := *c
	cp.Keystore.Pin = hideRef(cp.Keystore.Pin)
	cp.Keystore.MasterKey = hideRef(cp.Keystore.MasterKey)
	cp.Server.AdminTokens = slices.Clone(c.Server.AdminTokens)
	for i := range cp.Server.AdminTokens {
		cp.Server.AdminTokens[i].Secret = hideRef(cp.Server.AdminTokens[i].Secret)
	}
	cp.Listeners = slices.Clone(c.Listeners)
	for i := range cp.Listeners {
		l := &cp.Listeners[i]
		l.RequestHeaders = redactOps(l.RequestHeaders)
		l.ResponseHeaders = redactOps(l.ResponseHeaders)
		l.Rules = slices.Clone(l.Rules)
		for j := range l.Rules {
			l.Rules[j].RequestHeaders = redactOps(l.Rules[j].RequestHeaders)
			l.Rules[j].ResponseHeaders = redactOps(l.Rules[j].ResponseHeaders)
		}
	}
	return &cp
}

func hideRef(s string) string {
	if s == "" {
		return ""
	}
	if i := strings.IndexByte(s, ':'); i > 0 {
		return s[:i+1] + "<redacted>"
	}
	return "<redacted>"
}

var secretHeaderWords = []string{"authorization", "cookie", "token", "secret", "password", "api-key", "apikey", "x-api-key", "auth"}

func secretHeader(name string) bool {
	n := strings.ToLower(name)
	for _, w := range secretHeaderWords {
		if strings.Contains(n, w) {
			return true
		}
	}
	return false
}

func redactOps(h *configs.HeaderOps) *configs.HeaderOps {
	if h == nil {
		return nil
	}
	cp := *h
	red := func(m map[string]string) map[string]string {
		if m == nil {
			return nil
		}
		out := make(map[string]string, len(m))
		for k, v := range m {
			if secretHeader(k) {
				v = "<redacted>"
			}
			out[k] = v
		}
		return out
	}
	cp.Set, cp.Add = red(h.Set), red(h.Add)
	return &cp
}

// reloadResult is what POST /admin/reload answers (and what SIGHUP logs).
type reloadResult struct {
	OK      bool         `json:"ok"`
	At      time.Time    `json:"at"`
	Trigger string       `json:"trigger"` // SIGHUP | admin
	File    string       `json:"file"`
	Took    string       `json:"took"`
	Changes *configDiff  `json:"changes,omitempty"`
	Errors  []string     `json:"errors,omitempty"` // one problem per element (file:line: path: message)
	Runtime *runtimeDiff `json:"runtime,omitempty"`
}

// runtimeDiff is what the listener runtime did with sockets (kept listeners are "updated").
type runtimeDiff struct {
	Added   []string `json:"added"`
	Removed []string `json:"removed"`
	Updated []string `json:"updated"`
}

// configDiff says, by name, what a reload changed in the configuration.
type configDiff struct {
	Listeners    nameDiff `json:"listeners"`
	TargetGroups nameDiff `json:"target_groups"`
	Certificates nameDiff `json:"certificates"`
	Authorities  nameDiff `json:"authorities"`
	Server       []string `json:"server"` // [server] and [keystore] keys that changed
	// RestartRequired lists changes a reload records but cannot apply to a running process.
	RestartRequired []string `json:"restart_required"`
}

type nameDiff struct {
	Added   []string `json:"added"`
	Removed []string `json:"removed"`
	Changed []string `json:"changed"`
}

func (n nameDiff) empty() bool { return len(n.Added)+len(n.Removed)+len(n.Changed) == 0 }

// diffByName compares two lists of named items by their exported (operator-written) fields.
func diffByName[T any](old, cur []T, name func(*T) string) nameDiff {
	d := nameDiff{Added: []string{}, Removed: []string{}, Changed: []string{}}
	om := map[string][]byte{}
	for i := range old {
		b, _ := json.Marshal(&old[i])
		om[name(&old[i])] = b
	}
	seen := map[string]bool{}
	for i := range cur {
		n := name(&cur[i])
		seen[n] = true
		b, _ := json.Marshal(&cur[i])
		prev, ok := om[n]
		switch {
		case !ok:
			d.Added = append(d.Added, n)
		case !bytes.Equal(prev, b):
			d.Changed = append(d.Changed, n)
		}
	}
	for i := range old {
		if n := name(&old[i]); !seen[n] {
			d.Removed = append(d.Removed, n)
		}
	}
	slices.Sort(d.Added)
	slices.Sort(d.Removed)
	slices.Sort(d.Changed)
	return d
}

func diffConfigs(old, cur *configs.Config) *configDiff {
	d := &configDiff{
		Listeners:    diffByName(old.Listeners, cur.Listeners, func(l *configs.Listener) string { return l.Name }),
		TargetGroups: diffByName(old.TargetGroups, cur.TargetGroups, func(g *configs.TargetGroup) string { return g.Name }),
		Certificates: diffByName(old.Certificates, cur.Certificates, func(c *configs.Certificate) string { return c.Name }),
		Authorities:  diffByName(old.Authorities, cur.Authorities, func(a *configs.Authority) string { return a.Name }),
		Server:       []string{}, RestartRequired: []string{},
	}
	os, cs := old.Server, cur.Server
	field := func(name string, changed, restart bool) {
		if changed {
			d.Server = append(d.Server, name)
			if restart {
				d.RestartRequired = append(d.RestartRequired, name)
			}
		}
	}
	field("server.admin", os.Admin != cs.Admin, true)
	field("server.admin_allow_public", os.AdminAllowPublic != cs.AdminAllowPublic, true)
	field("server.access_log", os.AccessLog != cs.AccessLog, true)
	field("server.log_level", os.LogLevel != cs.LogLevel, true)
	field("server.log_format", os.LogFormat != cs.LogFormat, true)
	field("server.state_dir", os.StateDir != cs.StateDir, false)
	field("server.shutdown_timeout", os.ShutdownTimeout != cs.ShutdownTimeout, false)
	ob, _ := json.Marshal(old.Keystore)
	cb, _ := json.Marshal(cur.Keystore)
	field("keystore", !bytes.Equal(ob, cb), false)
	return d
}

// summary is the one-line form of a diff for the log.
func (d *configDiff) summary() string {
	var parts []string
	add := func(kind string, n nameDiff) {
		if n.empty() {
			return
		}
		parts = append(parts, fmt.Sprintf("%s +%v -%v ~%v", kind, n.Added, n.Removed, n.Changed))
	}
	add("listeners", d.Listeners)
	add("target_groups", d.TargetGroups)
	add("certificates", d.Certificates)
	add("authorities", d.Authorities)
	if len(d.Server) > 0 {
		parts = append(parts, fmt.Sprintf("server %v", d.Server))
	}
	if len(parts) == 0 {
		return "no changes"
	}
	return strings.Join(parts, "; ")
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
