package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// requiredRole is the role an admin route needs; "" means anyone (health probes). Routes not
// listed need viewer to read and operator to write, so a route added without thought is
// never public.
func requiredRole(method, pattern string) string {
	switch pattern {
	case "GET /healthz", "GET /readyz":
		return ""
	}
	if strings.Contains(pattern, "/admin/keys") || strings.Contains(pattern, "/admin/keystore") {
		if method == http.MethodGet || method == http.MethodHead {
			return configs.RoleViewer
		}
		return configs.RoleKeyAdmin
	}
	if method == http.MethodGet || method == http.MethodHead {
		return configs.RoleViewer
	}
	return configs.RoleOperator
}

// keyAudited: the keystore writes these routes' audit lines itself (with the caller).
func keyAudited(pattern string) bool {
	return strings.Contains(pattern, " /admin/keys/") || strings.Contains(pattern, " /admin/keystore/")
}

// guardAdmin authenticates every admin request, enforces the route's role and writes the audit
// line of every write and every refusal.
func (d *daemon) guardAdmin(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, pattern := mux.Handler(r)
		need := requiredRole(r.Method, pattern)
		if need == "" && pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		if need == "" {
			need = configs.RoleViewer // unknown path: authenticate before saying 404
		}
		c, bad := d.auth.identify(r)
		action := r.Method + " " + r.URL.Path
		object := patternName(pattern, r.URL.Path)
		deny := func(status int, msg string) {
			d.audit.write(auditLine{Identity: c.Identity, Role: c.Role, Action: action, Object: object,
				Result: "denied", Error: msg, Remote: r.RemoteAddr})
			if status == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="fulcrum-admin"`)
			}
			writeJSON(w, status, map[string]any{"ok": false, "error": msg})
		}
		switch {
		case bad != "":
			deny(http.StatusUnauthorized, bad)
			return
		case c.Role == "":
			msg := "authentication required: present a bearer token (Authorization: Bearer ...) or a client certificate"
			if d.auth.open() {
				msg = "the admin endpoint has no credentials configured: only /healthz and /readyz answer (configure [[server.admin_tokens]] or admin_client_ca, or admin_auth = \"none\" on loopback)"
			}
			deny(http.StatusUnauthorized, msg)
			return
		case roleRank(c.Role) < roleRank(need):
			deny(http.StatusForbidden, fmt.Sprintf("%s has role %s; %s needs %s", c.Identity, c.Role, r.Method+" "+r.URL.Path, need))
			return
		}
		r = r.WithContext(keystore.WithActor(r.Context(), c.Identity, c.Role))
		if r.Method == http.MethodGet || r.Method == http.MethodHead || keyAudited(pattern) {
			mux.ServeHTTP(w, r)
			return
		}
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		mux.ServeHTTP(sw, r)
		l := auditLine{Identity: c.Identity, Role: c.Role, Action: action, Object: object, Result: "ok", Remote: r.RemoteAddr}
		if sw.status >= 400 {
			l.Result, l.Error = "error", http.StatusText(sw.status)
		}
		d.audit.write(l)
	})
}

// patternName is the {name} segment of path under pattern ("" when the route has none): the
// guard runs before the mux has matched, so PathValue is not set yet.
func patternName(pattern, path string) string {
	_, pp, ok := strings.Cut(pattern, " ")
	if !ok {
		pp = pattern
	}
	ps, us := strings.Split(pp, "/"), strings.Split(path, "/")
	for i, seg := range ps {
		if seg == "{name}" && i < len(us) {
			return us[i]
		}
	}
	return ""
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

// managed is the keystore's administration, or nil when the keystore is not the managed one.
func (d *daemon) managed() *keystore.Managed {
	m, _ := d.rt.Certs().Keystore().(*keystore.Managed)
	return m
}

// registerKeyRoutes adds the key administration API (fulcrum keys ...).
func registerKeyRoutes(mux *http.ServeMux, d *daemon) {
	fail := func(w http.ResponseWriter, status int, err error) {
		writeJSON(w, status, map[string]any{"ok": false, "error": err.Error()})
	}
	statusOf := func(err error) int {
		var inUse *keystore.InUseError
		switch {
		case errors.As(err, &inUse), errors.Is(err, keystore.ErrPendingDeletion):
			return http.StatusConflict
		case errors.Is(err, keystore.ErrNotFound):
			return http.StatusNotFound
		}
		return http.StatusBadRequest
	}
	usedBy := func(name string) string { return d.rt.Certs().KeyUsers()[name] }
	body := func(r *http.Request, v any) error {
		b, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			return err
		}
		if len(b) == 0 {
			return nil
		}
		if err := json.Unmarshal(b, v); err != nil {
			return fmt.Errorf("request body: %w", err)
		}
		return nil
	}
	mux.HandleFunc("GET /admin/keys", func(w http.ResponseWriter, r *http.Request) {
		list, err := d.managed().List(r.Context())
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		users := d.rt.Certs().KeyUsers()
		for i := range list {
			list[i].UsedBy = users[list[i].Name]
		}
		writeJSON(w, http.StatusOK, list)
	})
	mux.HandleFunc("POST /admin/keys/{name}/schedule-deletion", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Days int `json:"days"`
		}
		if err := body(r, &req); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		if req.Days == 0 {
			req.Days = keystore.DefaultDeletionDays
		}
		when, err := d.managed().ScheduleDeletion(r.Context(), r.PathValue("name"), req.Days, usedBy)
		if err != nil {
			fail(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "name": r.PathValue("name"), "deletion_date": when})
	})
	mux.HandleFunc("POST /admin/keys/{name}/cancel-deletion", func(w http.ResponseWriter, r *http.Request) {
		if err := d.managed().CancelDeletion(r.Context(), r.PathValue("name")); err != nil {
			fail(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "name": r.PathValue("name")})
	})
	mux.HandleFunc("POST /admin/keys/{name}/import-params", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			KeyType string `json:"key_type"`
		}
		if err := body(r, &req); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		if req.KeyType == "" { // the API's default is the configuration's
			req.KeyType = configs.DefaultKeyType
		}
		p, err := d.managed().ImportParams(r.Context(), r.PathValue("name"), keystore.KeyType(req.KeyType))
		if err != nil {
			fail(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, p)
	})
	mux.HandleFunc("POST /admin/keystore/rotate-master-key", func(w http.ResponseWriter, r *http.Request) {
		id, err := d.managed().RotateMasterKey(r.Context())
		if err != nil {
			fail(w, http.StatusConflict, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "master_key_id": id})
	})
	mux.HandleFunc("POST /admin/keys/{name}/import", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Wrapped     []byte `json:"wrapped"` // base64 in JSON
			ImportToken string `json:"import_token"`
		}
		if err := body(r, &req); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		if err := d.managed().ImportWrapped(r.Context(), r.PathValue("name"), req.Wrapped, req.ImportToken); err != nil {
			fail(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "name": r.PathValue("name"), "location": d.managed().Describe()})
	})
}
