package configs

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Validate applies defaults, synthesizes classic listeners' target groups, checks the whole
// configuration and sets the parsed forms the accessors return. It reports every problem at
// once as a *ValidationError. Problems of a configuration built in Go (not loaded from text)
// carry no line numbers. Validate is idempotent; Load calls it.
func (c *Config) Validate() error {
	return c.validate("")
}

func (c *Config) validate(raw string) error {
	v := &validator{c: c, raw: raw}
	applyDefaults(c)
	v.run()
	if len(v.probs) == 0 {
		return nil
	}
	sortProblems(v.probs)
	return &ValidationError{Problems: v.probs}
}

type validator struct {
	c     *Config
	raw   string // configuration text; "" when unknown
	idx   *lineIndex
	probs []*Problem
	quiet int // >0: drop problems (checks of synthesized groups whose inputs were already reported)

	groups map[string]*TargetGroup
	certs  map[string]*Certificate
	auths  map[string]*Authority
}

// scope is an object problems are reported against: "listeners[2]" named "legacy-ssl".
type scope struct {
	v    *validator
	path string
	name string
}

func (v *validator) line(path string) int {
	if v.raw == "" {
		return 0
	}
	if v.idx == nil {
		v.idx = buildLineIndex(v.raw)
	}
	return v.idx.lineOf(path)
}

// errf records a problem with field (relative to the scope, e.g. "rules[0].paths[1]").
// unique records x under its name in m, reporting a name that is invalid or already taken
// (the first of two duplicates keeps the name).
func unique[T any](v *validator, s scope, kind, name string, m map[string]*T, x *T) {
	if !v.name(s, name) {
		return
	}
	if _, dup := m[name]; dup {
		s.errf("name", "duplicate %s name %q: names must be unique", kind, name)
		return
	}
	m[name] = x
}

// setting is a key and whether the operator wrote it, for the "applies to" checks.
type setting struct {
	key string
	set bool
}

// misplaced reports each written setting when none of them applies here: "<key> <msg>". The
// checks of what applies where are tables of settings, one call per condition.
func (s scope) misplaced(applies bool, msg string, settings ...setting) {
	if applies {
		return
	}
	for _, f := range settings {
		if f.set {
			s.errf(f.key, "%s %s", f.key, msg)
		}
	}
}

func (s scope) errf(field, format string, args ...any) {
	if s.v.quiet > 0 {
		return
	}
	full := s.path
	switch {
	case field == "":
	case full == "":
		full = field
	case field[0] == '[':
		full += field
	default:
		full += "." + field
	}
	s.v.probs = append(s.v.probs, &Problem{
		File:    s.v.c.File,
		Line:    s.v.line(full),
		Path:    s.path,
		Name:    s.name,
		Field:   full,
		Message: fmt.Sprintf(format, args...),
	})
}

func (s scope) sub(rel string) scope {
	return scope{v: s.v, path: s.path + "." + rel, name: s.name}
}

func idx(field string, i int) string { return field + "[" + strconv.Itoa(i) + "]" }

func (v *validator) run() {
	c := v.c
	v.server(scope{v: v, path: "server"})
	v.keystore(scope{v: v, path: "keystore"})
	v.fleet(scope{v: v, path: "fleet"})

	v.auths = make(map[string]*Authority, len(c.Authorities))
	for i := range c.Authorities {
		a := &c.Authorities[i]
		unique(v, scope{v: v, path: idx("authorities", i), name: a.Name}, "authority", a.Name, v.auths, a)
	}
	v.certs = make(map[string]*Certificate, len(c.Certificates))
	for i := range c.Certificates {
		ct := &c.Certificates[i]
		unique(v, scope{v: v, path: idx("certificates", i), name: ct.Name}, "certificate", ct.Name, v.certs, ct)
	}
	v.groups = make(map[string]*TargetGroup, len(c.TargetGroups))
	for i := range c.TargetGroups {
		g := &c.TargetGroups[i]
		if g.synth {
			v.groups[g.Name] = g
			continue
		}
		unique(v, scope{v: v, path: idx("target_groups", i), name: g.Name}, "target group", g.Name, v.groups, g)
	}

	for i := range c.Authorities {
		v.authority(scope{v: v, path: idx("authorities", i), name: c.Authorities[i].Name}, &c.Authorities[i])
	}
	for i := range c.Certificates {
		v.certificate(scope{v: v, path: idx("certificates", i), name: c.Certificates[i].Name}, &c.Certificates[i])
	}
	v.adminRefs()

	listenerOK := make(map[string]bool, len(c.Listeners))
	names := make(map[string]*Listener, len(c.Listeners))
	binds := make(map[uint16][]bind, len(c.Listeners))
	prio := make(map[int]int)
	for i := range c.Listeners {
		l := &c.Listeners[i]
		s := scope{v: v, path: idx("listeners", i), name: l.Name}
		before := len(v.probs)
		unique(v, s, "listener", l.Name, names, l)
		v.listener(s, l, binds, prio)
		listenerOK[l.Name] = len(v.probs) == before
	}

	for i := range c.TargetGroups {
		g := &c.TargetGroups[i]
		if !g.synth {
			v.group(scope{v: v, path: idx("target_groups", i), name: g.Name}, g)
			continue
		}
		// A synthesized group's inputs were checked on the listener; check what the translation
		// produced (health check) against the listener, quietly if the listener already failed.
		li := -1
		for j := range c.Listeners {
			if c.Listeners[j].Name == g.classic && c.Listeners[j].Style == "classic" {
				li = j
				break
			}
		}
		if !listenerOK[g.classic] || li < 0 {
			v.quiet++
		}
		v.groupTimings(scope{v: v, path: idx("listeners", max(li, 0)), name: g.classic}, g, true)
		if !listenerOK[g.classic] || li < 0 {
			v.quiet--
		}
	}

	if len(v.probs) == 0 {
		c.groupIdx = indexByName(c.TargetGroups)
		c.certIdx = indexByName(c.Certificates)
		c.authIdx = indexByName(c.Authorities)
	}
}

// ---- server and keystore

var logLevels = []string{"debug", "info", "warn", "error"}

func (v *validator) server(s scope) {
	sv := &v.c.Server
	if sv.Admin != "" {
		host, _, ok := v.hostPort(s, "admin", sv.Admin, false)
		if ok && !sv.AdminAllowPublic {
			loop := host == "localhost"
			if a, err := netip.ParseAddr(host); err == nil && a.IsLoopback() {
				loop = true
			}
			if !loop {
				s.errf("admin", "admin %q is not a loopback address: the admin API can reload the configuration, so bind it to 127.0.0.1 or [::1], or set admin_allow_public = true behind your own access control", sv.Admin)
			}
		}
	}
	if strings.TrimSpace(sv.StateDir) == "" {
		s.errf("state_dir", "state_dir must not be blank")
	}
	sv.shutdownTimeout = v.duration(s, "shutdown_timeout", sv.ShutdownTimeout, true)
	sv.stickyKeyRotation = v.duration(s, "sticky_key_rotation", sv.StickyKeyRotation, true)
	sv.stickyKeyOverlap = v.duration(s, "sticky_key_overlap", sv.StickyKeyOverlap, true)
	switch al := sv.AccessLog; {
	case al == "" || al == "stdout" || al == "stderr":
	case al == "off" || al == "none" || al == "false" || al == "true" || al == "-":
		s.errf("access_log", "access_log %q is not a destination: use \"\" (off), \"stdout\", \"stderr\" or a file path", al)
	case strings.HasSuffix(al, "/") || strings.ContainsAny(al, "\x00\n\r"):
		s.errf("access_log", "access_log %q is not a file path: use \"\" (off), \"stdout\", \"stderr\" or a file path", al)
	}
	v.enum(s, "log_level", sv.LogLevel, logLevels...)
	v.enum(s, "log_format", sv.LogFormat, "auto", "text", "json")
	v.adminAuth(s)
}

// AdminRoles are the roles an admin caller may have, least privileged first.
var AdminRoles = []string{RoleViewer, RoleOperator, RoleKeyAdmin}

// adminAuth checks who may call the admin endpoint. References to certificates are checked
// in adminRefs, once the certificate names are known.
func (v *validator) adminAuth(s scope) {
	sv := &v.c.Server
	if v.enum(s, "admin_auth", sv.AdminAuth, "required", "none") && sv.AdminAuth == "none" && sv.Admin != "" {
		host, _, err := net.SplitHostPort(sv.Admin)
		loop := err == nil && host == "localhost"
		if a, perr := netip.ParseAddr(host); err == nil && perr == nil && a.IsLoopback() {
			loop = true
		}
		if !loop {
			s.errf("admin_auth", "admin_auth = \"none\" is allowed only on a loopback admin address, and admin is %q: configure admin_tokens or admin_client_ca instead", sv.Admin)
		}
	}
	if sv.AdminAuth == "none" && (len(sv.AdminTokens) > 0 || len(sv.AdminClients) > 0 || sv.AdminClientCA != "") {
		s.errf("admin_auth", "admin_auth = \"none\" ignores every credential, yet admin_tokens, admin_clients or admin_client_ca are set: remove admin_auth = \"none\" (authentication is then required) or the credentials")
	}
	if sv.AdminClientCA != "" && sv.AdminTLSCertificate == "" {
		s.errf("admin_client_ca", "admin_client_ca needs admin_tls_certificate: client certificates are only asked for over HTTPS")
	}
	if len(sv.AdminClients) > 0 && sv.AdminClientCA == "" {
		s.errf("admin_clients", "admin_clients needs admin_client_ca (the authority that issues the client certificates)")
	}
	if strings.TrimSpace(sv.AuditLog) == "" || strings.HasSuffix(sv.AuditLog, "/") || strings.ContainsAny(sv.AuditLog, "\x00\n\r") {
		s.errf("audit_log", "audit_log %q is not a file path", sv.AuditLog)
	}
	names := map[string]bool{}
	for i := range sv.AdminTokens {
		t := &sv.AdminTokens[i]
		ts := s.sub(idx("admin_tokens", i))
		ts.name = t.Name
		if v.name(ts, t.Name) {
			if names[t.Name] {
				ts.errf("name", "duplicate admin token name %q: the name is the caller's identity in the audit log", t.Name)
			}
			names[t.Name] = true
		}
		if t.Secret == "" {
			ts.errf("secret", "secret is required (\"env:NAME\" or \"file:PATH\" holding the token)")
		} else {
			v.secret(ts, "secret", t.Secret)
		}
		v.enum(ts, "role", t.Role, AdminRoles...)
	}
	cns := map[string]bool{}
	for i := range sv.AdminClients {
		c := &sv.AdminClients[i]
		cs := s.sub(idx("admin_clients", i))
		cs.name = c.CommonName
		if strings.TrimSpace(c.CommonName) == "" {
			cs.errf("common_name", "common_name is required (the subject CN of the client certificate)")
		} else if cns[c.CommonName] {
			cs.errf("common_name", "duplicate admin client %q", c.CommonName)
		}
		cns[c.CommonName] = true
		v.enum(cs, "role", c.Role, AdminRoles...)
	}
}

// adminRefs checks that admin_tls_certificate names a server certificate.
func (v *validator) adminRefs() {
	sv := &v.c.Server
	if sv.AdminTLSCertificate == "" {
		return
	}
	s := scope{v: v, path: "server"}
	if _, ok := v.certs[sv.AdminTLSCertificate]; !ok {
		s.errf("admin_tls_certificate", "admin_tls_certificate %q is not a [[certificates]] name", sv.AdminTLSCertificate)
	}
	if sv.Admin == "" {
		s.errf("admin_tls_certificate", "admin_tls_certificate is set but admin is not (the admin endpoint is off)")
	}
}

func (v *validator) keystore(s scope) {
	k := &v.c.Keystore
	if !v.enum(s, "type", k.Type, "software", "pkcs11") {
		return
	}
	switch k.Type {
	case "software":
		v.secret(s, "master_key", k.MasterKey)
		for _, f := range []struct{ key, val string }{{"module", k.Module}, {"token_label", k.TokenLabel}, {"pin", k.Pin}} {
			if f.val != "" {
				s.errf(f.key, "%s applies to a pkcs11 keystore, but type is \"software\" (set type = \"pkcs11\" or remove %s)", f.key, f.key)
			}
		}
		if k.MaxSessions != 0 {
			s.errf("max_sessions", "max_sessions applies to a pkcs11 keystore, but type is \"software\"")
		}
		if k.DataKeyCacheMaxUses < 0 || k.DataKeyCacheMaxUses > 1<<20 {
			s.errf("data_key_cache_max_uses", "data_key_cache_max_uses %d is out of range 0 (off)-1048576", k.DataKeyCacheMaxUses)
		}
		if k.DataKeyCacheMaxAge != "" {
			if k.DataKeyCacheMaxUses == 0 {
				s.errf("data_key_cache_max_age", "data_key_cache_max_age has no effect while data_key_cache_max_uses is 0 (caching off): set data_key_cache_max_uses too")
			}
			k.dataKeyCacheMaxAge = v.duration(s, "data_key_cache_max_age", k.DataKeyCacheMaxAge, true)
		}
	case "pkcs11":
		if k.Module == "" {
			s.errf("module", "a pkcs11 keystore needs module (the PKCS#11 library, e.g. \"/usr/lib/softhsm/libsofthsm2.so\")")
		}
		if k.TokenLabel == "" {
			s.errf("token_label", "a pkcs11 keystore needs token_label (tokens are chosen by label, never by slot)")
		}
		if k.Pin == "" {
			s.errf("pin", "a pkcs11 keystore needs pin (\"env:NAME\" or \"file:PATH\")")
		} else {
			v.secret(s, "pin", k.Pin)
		}
		if k.MasterKey != "" {
			s.errf("master_key", "master_key applies to the software keystore; with pkcs11 the keys stay in the HSM (remove master_key)")
		}
		switch {
		case k.MaxSessions == 1:
			s.errf("max_sessions", "max_sessions 1 leaves no session to sign with: the PKCS#11 library keeps one session for the login, so the pool needs at least 2")
		case k.MaxSessions < 2 || k.MaxSessions > 1024:
			s.errf("max_sessions", "max_sessions %d is out of range 2-1024", k.MaxSessions)
		}
		if k.DataKeyCacheMaxUses != 0 || k.DataKeyCacheMaxAge != "" {
			s.errf("data_key_cache_max_uses", "data-key caching applies to the software keystore; an HSM keeps its keys itself (remove data_key_cache_*)")
		}
	}
}

// secret checks that a secret is a reference, never inline.
func (v *validator) secret(s scope, field, val string) {
	kind, ref, _ := strings.Cut(val, ":")
	switch kind {
	case "env":
		if isEnvName(ref) {
			return
		}
	case "file":
		if strings.TrimSpace(ref) != "" {
			return
		}
	}
	s.errf(field, "%s must not be written inline: use \"env:NAME\" (an environment variable) or \"file:PATH\" (a file readable only by fulcrum)", field)
}

func isEnvName(s string) bool {
	if s == "" || s[0] >= '0' && s[0] <= '9' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// ---- authorities and certificates

var keyTypes = []string{"ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"}

func (v *validator) authority(s scope, a *Authority) {
	v.enum(s, "key_type", a.KeyType, keyTypes...)
	a.validity = v.duration(s, "validity", a.Validity, true)
	if strings.TrimSpace(a.CommonName) == "" {
		s.errf("common_name", "common_name must not be blank")
	}
}

func (v *validator) certificate(s scope, ct *Certificate) {
	sources := 0
	if ct.Authority != "" {
		sources++
		if _, ok := v.auths[ct.Authority]; !ok {
			s.errf("authority", "authority %q is not defined%s: add an [[authorities]] entry with that name", ct.Authority, suggest(ct.Authority, v.auths))
		}
	}
	if ct.ACME != "" {
		sources++
		if !strings.HasPrefix(ct.ACME, "https://") && !strings.HasPrefix(ct.ACME, "http://") {
			s.errf("acme", "acme %q is not a directory URL (https://...)", ct.ACME)
		}
	}
	if ct.CertFile != "" || ct.KeyFile != "" {
		sources++
		if ct.CertFile == "" {
			s.errf("key_file", "key_file without cert_file: an imported certificate needs both")
		}
		if ct.KeyFile == "" {
			s.errf("cert_file", "cert_file without key_file: an imported certificate needs both")
		}
		if len(ct.Domains) > 0 {
			s.errf("domains", "an imported certificate takes its names from cert_file: remove domains")
		}
		if ct.KeyType != "" {
			s.errf("key_type", "an imported certificate's key type comes from key_file: remove key_type")
		}
	}
	if ct.Imported {
		sources++
		if len(ct.Domains) > 0 || ct.KeyType != "" {
			s.errf("imported", "an imported certificate takes its names and key type from what is imported: remove domains and key_type")
		}
	}
	if sources != 1 {
		s.errf("", "a certificate needs exactly one source: authority = \"NAME\", acme = \"URL\", cert_file + key_file, or imported = true (found %d)", sources)
	}
	if ct.ACME == "" {
		for _, f := range []struct {
			key string
			set bool
		}{{"acme_email", ct.ACMEEmail != ""}, {"acme_ca_file", ct.ACMECAFile != ""}, {"acme_eab_key_id", ct.ACMEEABKeyID != ""}, {"acme_eab_mac_key", ct.ACMEEABMACKey != ""}} {
			if f.set {
				s.errf(f.key, "%s applies only with acme = \"URL\"", f.key)
			}
		}
	}
	switch {
	case ct.ACME == "":
	case ct.ACMEEABKeyID != "" && ct.ACMEEABMACKey == "":
		s.errf("acme_eab_key_id", "acme_eab_key_id needs acme_eab_mac_key (the MAC key the CA gave with the key id, as \"env:NAME\" or \"file:PATH\")")
	case ct.ACMEEABKeyID == "" && ct.ACMEEABMACKey != "":
		s.errf("acme_eab_mac_key", "acme_eab_mac_key needs acme_eab_key_id (the key id the CA gave with the MAC key)")
	case ct.ACMEEABMACKey != "":
		v.secret(s, "acme_eab_mac_key", ct.ACMEEABMACKey)
	}
	if d := ct.ACMEDNS; d != nil {
		if ct.ACME == "" {
			s.errf("acme_dns", "acme_dns applies only with acme = \"URL\"")
		}
		v.hostPort(s, "acme_dns.server", d.Server, true)
		if d.Zone != "" && (!validDomain(strings.TrimSuffix(d.Zone, ".")) || strings.Contains(d.Zone, "*")) {
			s.errf("acme_dns.zone", "acme_dns.zone %q is not a DNS name", d.Zone)
		}
		switch {
		case d.TSIGKey != "" && d.TSIGSecret == "":
			s.errf("acme_dns.tsig_key", "acme_dns.tsig_key needs tsig_secret (\"env:NAME\" or \"file:PATH\" holding the base64 secret)")
		case d.TSIGKey == "" && d.TSIGSecret != "":
			s.errf("acme_dns.tsig_secret", "acme_dns.tsig_secret needs tsig_key (the key's name on the server)")
		case d.TSIGSecret != "":
			v.secret(s, "acme_dns.tsig_secret", d.TSIGSecret)
		}
		v.enum(s, "acme_dns.tsig_algorithm", d.TSIGAlgorithm, "hmac-sha256", "hmac-sha384", "hmac-sha512")
		if d.TTL < 1 || d.TTL > 86400 {
			s.errf("acme_dns.ttl", "acme_dns.ttl %d is out of range 1-86400 seconds", d.TTL)
		}
		d.propagation = v.duration(s, "acme_dns.propagation_timeout", d.PropagationTimeout, true)
	}
	if ct.Authority != "" || ct.ACME != "" {
		if len(ct.Domains) == 0 {
			s.errf("domains", "an issued certificate needs domains (e.g. [\"www.example.test\"])")
		}
		seen := make(map[string]bool, len(ct.Domains))
		for i, d := range ct.Domains {
			if !validDomain(d) {
				s.errf(idx("domains", i), "domains[%d] %q is not a DNS name, \"*.\" wildcard or IP address", i, d)
			} else if seen[strings.ToLower(d)] {
				s.errf(idx("domains", i), "domains[%d] %q is listed twice", i, d)
			}
			seen[strings.ToLower(d)] = true
		}
	}
	if ct.KeyType != "" {
		v.enum(s, "key_type", ct.KeyType, keyTypes...)
	}
	if ct.Lifetime != "" {
		if ct.Authority == "" {
			s.errf("lifetime", "lifetime applies to certificates issued by a private authority (ACME and imported certificates have the issuer's lifetime)")
		} else {
			ct.lifetime = v.duration(s, "lifetime", ct.Lifetime, true)
		}
	}
}

// validDomain accepts a DNS name, a "*." wildcard name or an IP address.
func validDomain(d string) bool {
	if _, err := netip.ParseAddr(d); err == nil {
		return true
	}
	d = strings.TrimPrefix(d, "*.")
	if d == "" || len(d) > 253 {
		return false
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// ---- target groups

func (v *validator) group(s scope, g *TargetGroup) {
	if !v.enum(s, "protocol", g.Protocol, "http", "https", "tcp", "tls") {
		return
	}
	l7 := g.Protocol == "http" || g.Protocol == "https"
	v.targets(s, "targets", g.Targets)
	v.enum(s, "algorithm", g.Algorithm, Algorithms...)
	s.misplaced(l7, fmt.Sprintf("applies to http and https groups, not %q", g.Protocol),
		setting{"http2", g.HTTP2}, setting{"response_timeout", g.ResponseTimeout != ""}, setting{"max_in_flight", g.MaxInFlight > 0})
	s.misplaced(l7, fmt.Sprintf("applies to http and https groups, not %q (network listeners use idle_timeout)", g.Protocol),
		setting{"target_read_timeout", g.TargetReadTimeout != ""})
	s.misplaced(!l7, fmt.Sprintf("applies to tcp and tls groups, not %q (HTTP groups get X-Forwarded-For)", g.Protocol),
		setting{"proxy_protocol", g.ProxyProtocol != ""})
	if g.ProxyProtocol != "" && !l7 {
		v.enum(s, "proxy_protocol", g.ProxyProtocol, "v1", "v2")
	}
	if g.MaxIdleConns < 0 {
		s.errf("max_idle_conns", "max_idle_conns %d must not be negative", g.MaxIdleConns)
	}
	if g.MaxInFlight < 0 {
		s.errf("max_in_flight", "max_in_flight %d must not be negative", g.MaxInFlight)
	}
	if st := g.Stickiness; st != nil {
		if v.enum(s, "stickiness.type", st.Type, StickinessTypes...) {
			switch {
			case st.Type != StickySourceIP && !l7:
				s.errf("stickiness.type", "stickiness type %q needs an http or https group (use \"source_ip\" for %s groups)", st.Type, g.Protocol)
			case st.Type == StickyAppCookie && !isToken(st.Cookie):
				s.errf("stickiness.cookie", "app_cookie stickiness needs cookie, the application's cookie name")
			case st.Type != StickyAppCookie && st.Cookie != "":
				s.errf("stickiness.cookie", "cookie applies to app_cookie stickiness only")
			}
			if st.Type == StickySourceIP {
				if st.Duration != "" {
					s.errf("stickiness.duration", "duration applies to cookie stickiness; source_ip stickiness lasts as long as the target is healthy")
				}
			} else {
				st.duration = v.duration(s, "stickiness.duration", st.Duration, true)
				if ov := v.c.Server.stickyKeyOverlap; ov > 0 && st.duration > ov {
					s.errf("stickiness.duration", "stickiness duration %q is longer than server.sticky_key_overlap %q: a cookie would outlive the key that signed it; raise sticky_key_overlap", st.Duration, v.c.Server.StickyKeyOverlap)
				}
			}
		}
	}
	if g.TLS != nil {
		if g.Protocol != "https" && g.Protocol != "tls" {
			s.errf("tls", "tls settings apply to https and tls groups, not %q (use protocol = \"https\" or \"tls\" for end-to-end encryption)", g.Protocol)
		} else {
			v.backendTLS(s, "tls", g.TLS)
		}
	}
	v.groupTimings(s, g, false)
}

// groupTimings parses the group's durations and checks its health check.
func (v *validator) groupTimings(s scope, g *TargetGroup, classic bool) {
	v.groupDurations(s, g, classic)
	h := g.HealthCheck
	if h == nil {
		return
	}
	const f = "health_check."
	if !classic {
		if !v.enum(s, f+"protocol", h.Protocol, "http", "https", "tcp", "tls") {
			return
		}
	}
	web := h.Protocol == "http" || h.Protocol == "https"
	if !classic {
		s.misplaced(web, fmt.Sprintf("applies to http and https health checks, not %q", h.Protocol),
			setting{f + "path", h.Path != ""}, setting{f + "matcher", h.Matcher != ""}, setting{f + "grpc_code", h.GRPCCode != ""})
		if web && !strings.HasPrefix(h.Path, "/") {
			s.errf(f+"path", "health_check.path %q must start with \"/\"", h.Path)
		}
		if h.Port < 0 || h.Port > 65535 {
			s.errf(f+"port", "health_check.port %d is out of range 1-65535 (0 = the target's port)", h.Port)
		}
		if web {
			m, err := ParseMatcher(h.Matcher)
			if err != nil {
				s.errf(f+"matcher", "health_check.matcher %q: %v (e.g. \"200\", \"200-399\" or \"200,204\")", h.Matcher, err)
			}
			h.matcher = m
		}
		if h.GRPCCode != "" && web {
			m, err := ParseGRPCCodes(h.GRPCCode)
			if err != nil {
				s.errf(f+"grpc_code", "health_check.grpc_code %q: %v (e.g. \"0\", \"0-99\" or \"0,12\")", h.GRPCCode, err)
			}
			h.grpcCodes = m
		}
	} else if web {
		h.matcher, _ = ParseMatcher(h.Matcher)
	}
	h.interval = v.duration(s, f+"interval", h.Interval, true)
	if h.Timeout == "" && h.interval > 0 {
		h.Timeout = defaultHCTimeout(h.interval).String()
	}
	h.timeout = v.duration(s, f+"timeout", h.Timeout, true)
	if h.interval > 0 && h.timeout > 0 && h.timeout >= h.interval {
		s.errf(f+"timeout", "health_check.timeout %q must be shorter than interval %q", h.Timeout, h.Interval)
	}
	if h.HealthyThreshold < 1 || h.HealthyThreshold > 100 {
		s.errf(f+"healthy_threshold", "health_check.healthy_threshold %d is out of range 1-100", h.HealthyThreshold)
	}
	if h.UnhealthyThreshold < 1 || h.UnhealthyThreshold > 100 {
		s.errf(f+"unhealthy_threshold", "health_check.unhealthy_threshold %d is out of range 1-100", h.UnhealthyThreshold)
	}
}

// groupDurations parses the group's durations.
func (v *validator) groupDurations(s scope, g *TargetGroup, classic bool) {
	if classic {
		// Synthesized from a classic listener: defaults only, never wrong.
		v.quiet++
		defer func() { v.quiet-- }()
	} else if g.SlowStart != "" {
		g.slowStart = v.duration(s, "slow_start", g.SlowStart, false)
	}
	g.deregistrationDelay = v.duration(s, "deregistration_delay", g.DeregistrationDelay, false)
	g.connectTimeout = v.duration(s, "connect_timeout", g.ConnectTimeout, true)
	if g.ResponseTimeout != "" {
		g.responseTimeout = v.duration(s, "response_timeout", g.ResponseTimeout, true)
	}
	if g.TargetReadTimeout != "" {
		g.targetReadTimeout = v.duration(s, "target_read_timeout", g.TargetReadTimeout, true)
	}
}

// ParseGRPCCodes parses a health check's grpc_code, "0", "0-99" or "0,12", into ranges of gRPC
// status codes 0-99 (as ALB's GrpcCode).
func ParseGRPCCodes(m string) ([]StatusRange, error) {
	return parseRanges(m, "gRPC code or range within 0-99", func(part string, lo, hi int) error {
		if lo < 0 || hi > 99 || lo > hi {
			return fmt.Errorf("%q is not a gRPC code or range within 0-99", part)
		}
		return nil
	})
}

// ParseMatcher parses a health-check matcher, "200", "200-399" or "200,204,300-399", into ranges
// of codes 200-599. Validate uses it.
func ParseMatcher(m string) ([]StatusRange, error) {
	return parseRanges(m, "status code or range", func(part string, lo, hi int) error {
		if lo < 200 || lo > 599 || hi < 200 || hi > 599 {
			return fmt.Errorf("%q is outside 200-599", part)
		}
		if lo > hi {
			return fmt.Errorf("range %q runs backwards", part)
		}
		return nil
	})
}

// parseRanges parses a comma-separated list of codes and lo-hi ranges. A part that is not one is
// "not a <what>"; check vets the numbers of one that is.
func parseRanges(m, what string, check func(part string, lo, hi int) error) ([]StatusRange, error) {
	if strings.TrimSpace(m) == "" {
		return nil, errors.New("must not be empty")
	}
	var out []StatusRange
	for _, part := range strings.Split(m, ",") {
		part = strings.TrimSpace(part)
		lo, hi, isRange := strings.Cut(part, "-")
		a, errA := strconv.Atoi(strings.TrimSpace(lo))
		b := a
		var errB error
		if isRange {
			b, errB = strconv.Atoi(strings.TrimSpace(hi))
		}
		if errA != nil || errB != nil || part == "" || part[0] == '+' {
			return nil, fmt.Errorf("%q is not a %s", part, what)
		}
		if err := check(part, a, b); err != nil {
			return nil, err
		}
		out = append(out, StatusRange{Lo: a, Hi: b})
	}
	return out, nil
}

// targets checks target addresses and weights (groups' targets or classic instances).
func (v *validator) targets(s scope, field string, ts []Target) {
	var seen map[string]int
	if len(ts) > 1 {
		seen = make(map[string]int, len(ts))
	}
	for i := range ts {
		t := &ts[i]
		f := idx(field, i)
		if t.bad != "" {
			s.errf(f, "%s: %s", f, t.bad)
			continue
		}
		if _, _, ok := v.hostPort(s, f, t.Address, true); ok {
			if ap, err := netip.ParseAddrPort(t.Address); err == nil {
				t.addr = ap
			}
		}
		if t.Weight < 0 || t.Weight > 1000 {
			s.errf(f, "%s weight %d is out of range 0-1000 (0 drains the target)", f, t.Weight)
		}
		if seen != nil {
			if j, dup := seen[t.Address]; dup {
				s.errf(f, "%s %q is already %s[%d]: list a target once and use weight", f, t.Address, field, j)
			}
			seen[t.Address] = i
		}
	}
}

func (v *validator) backendTLS(s scope, field string, t *BackendTLS) {
	if t.ServerName != "" && !validDomain(t.ServerName) {
		s.errf(field+".server_name", "%s.server_name %q is not a DNS name", field, t.ServerName)
	}
	if t.Authority != "" {
		if _, ok := v.auths[t.Authority]; !ok {
			s.errf(field+".authority", "%s.authority %q is not defined%s: add an [[authorities]] entry with that name", field, t.Authority, suggest(t.Authority, v.auths))
		}
	}
	if t.ClientCertificate != "" {
		if _, ok := v.certs[t.ClientCertificate]; !ok {
			s.errf(field+".client_certificate", "%s.client_certificate %q is not defined%s: add a [[certificates]] entry with that name", field, t.ClientCertificate, suggest(t.ClientCertificate, v.certs))
		}
	}
	t.pins = nil
	for i, p := range t.PinPublicKeys {
		b64, ok := strings.CutPrefix(p, "sha256/")
		raw, err := base64.StdEncoding.DecodeString(b64)
		if !ok || err != nil || len(raw) != 32 {
			s.errf(idx(field+".pin_public_keys", i), "%s.pin_public_keys[%d] %q is not \"sha256/BASE64\" of a SubjectPublicKeyInfo SHA-256 digest", field, i, p)
			continue
		}
		t.pins = append(t.pins, [32]byte(raw))
	}
	if t.InsecureSkipVerify && (t.Authority != "" || t.CAFile != "" || len(t.PinPublicKeys) > 0) {
		s.errf(field+".insecure_skip_verify", "%s.insecure_skip_verify contradicts authority, ca_file and pin_public_keys: remove one or the other", field)
	}
}

// ---- listeners

type bind struct {
	ip  netip.Addr // invalid = every address
	idx int
	raw string
}

var listenerProtocols = map[string][]string{
	"application": {"http", "https"},
	"network":     {"tcp", "tls"},
	"classic":     {"http", "https", "tcp", "ssl"},
}

func (v *validator) listener(s scope, l *Listener, binds map[uint16][]bind, prio map[int]int) {
	if !v.enum(s, "style", l.Style, "application", "network", "classic") {
		return
	}
	if !v.enum(s, "protocol", l.Protocol, listenerProtocols[l.Style]...) {
		return
	}
	v.bindAddress(s, l, binds)
	l7 := l.Layer7()
	tlsOn := l.TLSTerminated()

	// TLS
	if tlsOn {
		if len(l.Certificates) == 0 {
			s.errf("certificates", "protocol %q needs certificates (names of [[certificates]]; the first is the default for clients without SNI)", l.Protocol)
		}
		v.enum(s, "tls_policy", l.TLSPolicy, "recommended", "tls13", "compatible")
	} else if len(l.Certificates) > 0 {
		s.errf("certificates", "certificates apply to TLS listeners, not %q (use protocol = %q to terminate TLS)", l.Protocol, tlsName(l))
	}
	s.misplaced(tlsOn, fmt.Sprintf("applies to TLS listeners, not %q", l.Protocol), setting{"tls_policy", l.TLSPolicy != ""})
	seen := make(map[string]bool, len(l.Certificates))
	for i, name := range l.Certificates {
		if _, ok := v.certs[name]; !ok {
			s.errf(idx("certificates", i), "certificates[%d] %q is not defined%s: add a [[certificates]] entry with that name", i, name, suggest(name, v.certs))
		} else if seen[name] {
			s.errf(idx("certificates", i), "certificates[%d] %q is listed twice", i, name)
		}
		seen[name] = true
	}
	networkTLS := l.Style == "network" && l.Protocol == "tls"
	s.misplaced(networkTLS, "applies to network tls listeners (application https listeners use http2)", setting{"alpn_policy", l.ALPNPolicy != ""})
	if networkTLS {
		v.enum(s, "alpn_policy", l.ALPNPolicy, "HTTP1Only", "HTTP2Only", "HTTP2Optional", "HTTP2Preferred", "None")
	}
	s.misplaced(l.Style == "application" && l.Protocol == "https", "applies to application https listeners", setting{"http2", l.HTTP2 != nil})
	if ca := l.ClientAuth; ca != nil && v.enum(s, "client_auth.mode", ca.Mode, "off", "verify", "passthrough") {
		switch {
		case ca.Mode != "off" && !tlsOn:
			s.errf("client_auth.mode", "client_auth needs a TLS listener, not %q", l.Protocol)
		case ca.Mode == "verify" && ca.Authority == "" && ca.CAFile == "":
			s.errf("client_auth", "client_auth mode \"verify\" needs authority or ca_file to trust client certificates")
		case ca.Mode == "off" && (ca.Authority != "" || ca.CAFile != ""):
			s.errf("client_auth.mode", "client_auth has trust settings but mode is \"off\" (set mode = \"verify\" or remove them)")
		}
		if ca.Authority != "" {
			if _, ok := v.auths[ca.Authority]; !ok {
				s.errf("client_auth.authority", "client_auth.authority %q is not defined%s: add an [[authorities]] entry with that name", ca.Authority, suggest(ca.Authority, v.auths))
			}
		}
	}

	// client side
	l.trustedProxies = v.prefixes(s, "trusted_proxies", l.TrustedProxies)
	if l.AcceptProxyProtocol && len(l.TrustedProxies) == 0 {
		s.errf("accept_proxy_protocol", "accept_proxy_protocol needs trusted_proxies: a PROXY header is believed only from those CIDRs")
	}
	if l7 {
		v.enum(s, "xff", l.XFF, "append", "preserve", "remove")
		v.enum(s, "desync_mitigation", l.DesyncMitigation, "monitor", "defensive", "strictest")
		l.headerTimeout = v.duration(s, "header_timeout", l.HeaderTimeout, true)
		l.clientBodyTimeout = v.duration(s, "client_body_timeout", l.ClientBodyTimeout, true)
		l.sendTimeout = v.duration(s, "send_timeout", l.SendTimeout, true)
		if l.MaxHeaderBytes < 1024 || l.MaxHeaderBytes > 1<<24 {
			s.errf("max_header_bytes", "max_header_bytes %d is out of range 1024-16777216", l.MaxHeaderBytes)
		}
		if l.MinTransferRate < 1 || l.MinTransferRate > 1<<30 {
			s.errf("min_transfer_rate", "min_transfer_rate %d is out of range 1-1073741824 (bytes per second; it cannot be turned off, lower it instead)", l.MinTransferRate)
		}
		if forwardersFromProxies(l) {
			l.trustedForwarders = l.trustedProxies
		} else {
			l.trustedForwarders = v.prefixes(s, "trusted_forwarders", l.TrustedForwarders)
		}
	} else {
		// No header_timeout key here, but a TLS handshake or ClientHello peek still needs a
		// bound: the same default, given here so the runtime holds no default of its own.
		l.headerTimeout = v.duration(s, "header_timeout", DefaultHeaderTimeout, true)
	}
	s.misplaced(l7, fmt.Sprintf("applies to http and https listeners, not %q", l.Protocol),
		setting{"xff", l.XFF != ""}, setting{"desync_mitigation", l.DesyncMitigation != ""}, setting{"header_timeout", l.HeaderTimeout != ""},
		setting{"max_header_bytes", l.MaxHeaderBytes != 0}, setting{"drop_invalid_header_fields", l.DropInvalidHeaderFields},
		setting{"client_body_timeout", l.ClientBodyTimeout != ""}, setting{"send_timeout", l.SendTimeout != ""},
		setting{"min_transfer_rate", l.MinTransferRate != 0}, setting{"trusted_forwarders", l.TrustedForwarders != nil})
	l.idleTimeout = v.duration(s, "idle_timeout", l.IdleTimeout, true)
	if l.MaxConnections < 0 {
		s.errf("max_connections", "max_connections %d must not be negative (0 = unlimited)", l.MaxConnections)
	}

	s.misplaced(l.Style == "classic", fmt.Sprintf("applies to classic listeners; %s listeners use target groups", l.Style),
		setting{"backend_protocol", l.BackendProtocol != ""}, setting{"instances", l.Instances != nil}, setting{"proxy_protocol", l.ProxyProtocol},
		setting{"health_check", l.HealthCheck != nil}, setting{"backend_tls", l.BackendTLS != nil}, setting{"request_headers", l.RequestHeaders != nil},
		setting{"response_headers", l.ResponseHeaders != nil}, setting{"algorithm", l.Algorithm != ""})

	switch l.Style {
	case "application":
		if l.Forward != nil {
			s.errf("forward", "application listeners use default_action = { forward = \"GROUP\" }, not forward")
		}
		if l.DefaultAction == nil {
			s.errf("default_action", "an application listener needs default_action (forward, redirect or fixed_response)")
		} else {
			a := l.DefaultAction
			v.action(s, "default_action.", l, a.Forward, a.Redirect, a.FixedResponse)
		}
		v.rules(s, l, prio)
	case "network":
		if l.DefaultAction != nil {
			s.errf("default_action", "network listeners use forward = \"GROUP\", not default_action")
		}
		if l.Forward == nil {
			s.errf("forward", "a network listener needs forward (a tcp or tls target group)")
		} else {
			v.forward(s, "forward", l, l.Forward)
		}
		if len(l.Rules) > 0 {
			if l.Protocol != "tcp" {
				s.errf("rules", "rules on a network listener route TLS pass-through by SNI and need protocol \"tcp\", not %q", l.Protocol)
			} else {
				v.rules(s, l, prio)
			}
		}
	case "classic":
		v.classic(s, l)
	}
}

func tlsName(l *Listener) string {
	switch {
	case l.Style == "classic" && l.Protocol == "tcp":
		return "ssl"
	case l.Protocol == "tcp":
		return "tls"
	}
	return "https"
}

func (v *validator) bindAddress(s scope, l *Listener, binds map[uint16][]bind) {
	host, port, ok := v.hostPort(s, "address", l.Address, false)
	if !ok {
		return
	}
	var ip netip.Addr
	switch host {
	case "":
	case "localhost":
		ip = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	default:
		ip, _ = netip.ParseAddr(host)
		if ip.IsUnspecified() {
			ip = netip.Addr{}
		} else {
			l.addr = netip.AddrPortFrom(ip.Unmap(), port)
		}
	}
	for _, b := range binds[port] {
		if !b.ip.IsValid() || !ip.IsValid() || b.ip == ip {
			s.errf("address", "address %q overlaps listeners[%d] (%q, %q): two listeners cannot share a port on the same address", l.Address, b.idx, v.c.Listeners[b.idx].Name, b.raw)
			break
		}
	}
	binds[port] = append(binds[port], bind{ip: ip, idx: idxOf(s.path), raw: l.Address})
}

// idxOf returns N of "listeners[N]".
func idxOf(path string) int {
	i := strings.LastIndexByte(path, '[')
	n, _ := strconv.Atoi(strings.TrimSuffix(path[i+1:], "]"))
	return n
}

// hostPort checks "host:port". Targets may name a DNS host; listeners and the admin endpoint take
// an IP address, "localhost" or an empty host (every address).
func (v *validator) hostPort(s scope, field, val string, dns bool) (string, uint16, bool) {
	if val == "" {
		s.errf(field, "%s is required (\"host:port\")", field)
		return "", 0, false
	}
	host, p, err := net.SplitHostPort(val)
	if err != nil {
		s.errf(field, "%s %q is not \"host:port\" (IPv6 as \"[::1]:443\")", field, val)
		return "", 0, false
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 1 || n > 65535 || p[0] == '+' || p[0] == '0' {
		s.errf(field, "%s %q: port %q is not in 1-65535", field, val, p)
		return "", 0, false
	}
	if _, err := netip.ParseAddr(host); err != nil && host != "" && host != "localhost" {
		if !dns {
			s.errf(field, "%s %q: host must be an IP address, \"localhost\" or empty (every address)", field, val)
			return "", 0, false
		}
		if !validDomain(host) || strings.HasPrefix(host, "*.") {
			s.errf(field, "%s %q: host %q is not an IP address or DNS name", field, val, host)
			return "", 0, false
		}
	} else if host == "" && dns {
		s.errf(field, "%s %q needs a host", field, val)
		return "", 0, false
	}
	return host, uint16(n), true
}

func (v *validator) prefixes(s scope, field string, vals []string) []netip.Prefix {
	if len(vals) == 0 {
		return nil
	}
	out := make([]netip.Prefix, 0, len(vals))
	for i, c := range vals {
		if p, err := netip.ParsePrefix(c); err == nil {
			out = append(out, p.Masked())
		} else if a, err := netip.ParseAddr(c); err == nil {
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		} else {
			s.errf(idx(field, i), "%s[%d] %q is not a CIDR (\"192.0.2.0/24\") or IP address", field, i, c)
		}
	}
	return out
}

// classic checks what a classic listener adds: back-end protocol, instances, health check.
func (v *validator) classic(s scope, l *Listener) {
	if !l.synthesized {
		if l.DefaultAction != nil {
			s.errf("default_action", "classic listeners forward to their instances; default_action belongs to application listeners")
		}
		if l.Forward != nil {
			s.errf("forward", "classic listeners forward to their instances; forward belongs to network listeners")
		}
		if len(l.Rules) > 0 {
			s.errf("rules", "classic listeners have no rules (use an application listener)")
		}
	}
	l7 := l.Layer7()
	if v.enum(s, "backend_protocol", l.BackendProtocol, "http", "https", "tcp", "ssl") {
		bl7 := l.BackendProtocol == "http" || l.BackendProtocol == "https"
		if bl7 != l7 {
			use := "http or https"
			if !l7 {
				use = "tcp or ssl"
			}
			s.errf("backend_protocol", "backend_protocol %q cannot follow front protocol %q: a classic listener does not change OSI layer (use %s)", l.BackendProtocol, l.Protocol, use)
		}
		if l.BackendTLS != nil {
			if l.BackendProtocol != "https" && l.BackendProtocol != "ssl" {
				s.errf("backend_tls", "backend_tls applies to https and ssl back ends, not %q", l.BackendProtocol)
			} else {
				v.backendTLS(s, "backend_tls", l.BackendTLS)
			}
		}
	}
	v.targets(s, "instances", l.Instances)
	v.enum(s, "algorithm", l.Algorithm, Algorithms...)
	s.misplaced(!l7, "applies to tcp and ssl classic listeners (HTTP back ends get X-Forwarded-For)", setting{"proxy_protocol", l.ProxyProtocol})
	if h := l.HealthCheck; h != nil {
		if _, _, _, ok := parseClassicTarget(h.Target); !ok {
			s.errf("health_check.target", "health_check.target %q is not PROTOCOL:PORT[/path] (HTTP:80/ping, HTTPS:443/, TCP:7001 or SSL:443; a path only for HTTP and HTTPS)", h.Target)
		}
	}
	if l7 {
		v.headerOps(s, "request_headers", l.RequestHeaders)
		v.headerOps(s, "response_headers", l.ResponseHeaders)
	}
	s.misplaced(l7, "apply to http and https classic listeners", setting{"request_headers", l.RequestHeaders != nil}, setting{"response_headers", l.ResponseHeaders != nil})
}

// conditions are a rule's conditions, each written or not: the one list of their names. hosts
// comes first (the only one a network listener's rules take).
func (r *Rule) conditions() []setting {
	return []setting{{"hosts", len(r.Hosts) > 0}, {"paths", len(r.Paths) > 0}, {"methods", len(r.Methods) > 0},
		{"headers", len(r.Headers) > 0}, {"query", len(r.Query) > 0}, {"source_ips", len(r.SourceIPs) > 0}}
}

// rules checks an application listener's rules, or a network tcp listener's SNI rules.
func (v *validator) rules(s scope, l *Listener, prio map[int]int) {
	clear(prio)
	network := l.Style == "network"
	for i := range l.Rules {
		r := &l.Rules[i]
		rf := idx("rules", i)
		if r.Priority < 1 || r.Priority > 50000 {
			s.errf(rf+".priority", "rules[%d].priority %d is out of range 1-50000", i, r.Priority)
		} else if j, dup := prio[r.Priority]; dup {
			s.errf(rf+".priority", "rules[%d].priority %d is already used by rules[%d]: priorities are unique per listener", i, r.Priority, j)
		} else {
			prio[r.Priority] = i
		}
		rs := s.sub(rf)
		if network {
			if len(r.Hosts) == 0 {
				rs.errf("hosts", "a network listener's rule routes by SNI and needs hosts")
			}
			conds := r.conditions()
			rs.misplaced(false, "is not available on a network listener: its rules match hosts (SNI) and forward",
				append(conds[1:], setting{"redirect", r.Redirect != nil}, setting{"fixed_response", r.FixedResponse != nil},
					setting{"request_headers", r.RequestHeaders != nil}, setting{"response_headers", r.ResponseHeaders != nil})...)
			if r.Forward == nil {
				rs.errf("forward", "rule needs forward (a tcp target group)")
			} else {
				v.forward(rs, "forward", l, r.Forward)
			}
		} else {
			var names []string
			written := false
			for _, c := range r.conditions() {
				names = append(names, c.key)
				written = written || c.set
			}
			if !written {
				rs.errf("", "a rule needs at least one condition (%s or %s); use default_action for everything else",
					strings.Join(names[:len(names)-1], ", "), names[len(names)-1])
			}
			v.action(rs, "", l, r.Forward, r.Redirect, r.FixedResponse)
			v.headerOps(rs, "request_headers", r.RequestHeaders)
			v.headerOps(rs, "response_headers", r.ResponseHeaders)
		}
		for j, h := range r.Hosts {
			if !validHostPattern(h) {
				rs.errf(idx("hosts", j), "hosts[%d] %q is not a host pattern: use letters, digits, '-', '.', and the wildcards * and ? (no port, no scheme)", j, h)
			}
		}
		for j, p := range r.Paths {
			if !validPathPattern(p) {
				rs.errf(idx("paths", j), "paths[%d] %q must start with \"/\" (or be \"*\") and contain no spaces", j, p)
			}
		}
		for j, m := range r.Methods {
			if !isMethod(m) {
				rs.errf(idx("methods", j), "methods[%d] %q is not an HTTP method (upper case, e.g. \"GET\")", j, m)
			}
		}
		for _, k := range sortedKeys(r.Headers) {
			if !isToken(k) {
				rs.errf("headers", "headers key %q is not a header name", k)
			} else if len(r.Headers[k]) == 0 {
				rs.errf("headers."+k, "headers %q needs at least one value", k)
			}
		}
		for _, k := range sortedKeys(r.Query) {
			if len(r.Query[k]) == 0 {
				rs.errf("query."+k, "query %q needs at least one value", k)
			}
		}
		r.sourceIPs = v.prefixes(rs, "source_ips", r.SourceIPs)
	}
}

func sortedKeys(m map[string][]string) []string {
	if len(m) == 0 {
		return nil
	}
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// action checks that exactly one action is given and checks it. pre is "default_action." or "".
func (v *validator) action(s scope, pre string, l *Listener, fw Forward, rd *Redirect, fx *FixedResponse) {
	n := 0
	if fw != nil {
		n++
	}
	if rd != nil {
		n++
	}
	if fx != nil {
		n++
	}
	if n != 1 {
		what := "the rule"
		if pre != "" {
			what = "default_action"
		}
		if n == 0 {
			s.errf(strings.TrimSuffix(pre, "."), "%s needs one of forward, redirect or fixed_response", what)
		} else {
			s.errf(strings.TrimSuffix(pre, "."), "%s has %d actions: give exactly one of forward, redirect or fixed_response", what, n)
		}
	}
	if fw != nil {
		v.forward(s, pre+"forward", l, fw)
	}
	if rd != nil {
		v.redirect(s, pre+"redirect", rd)
	}
	if fx != nil {
		f := pre + "fixed_response"
		if fx.Status < 200 || fx.Status > 599 {
			s.errf(f+".status", "%s.status %d is not in 200-599", f, fx.Status)
		}
		if strings.ContainsAny(fx.ContentType, "\r\n") {
			s.errf(f+".content_type", "%s.content_type must be one line", f)
		}
		if len(fx.Body) > 1<<20 {
			s.errf(f+".body", "%s.body is %d bytes; the limit is 1 MiB", f, len(fx.Body))
		}
	}
}

// forward checks a forward's groups, their weights and their protocol against the listener.
func (v *validator) forward(s scope, field string, l *Listener, fw Forward) {
	if len(fw) == 0 {
		s.errf(field, "%s needs at least one target group", field)
		return
	}
	total, bad := 0, false
	var dup map[string]bool
	if len(fw) > 1 {
		dup = make(map[string]bool, len(fw))
	}
	for i, w := range fw {
		f := field
		if len(fw) > 1 {
			f = idx(field, i)
		}
		if w.bad != "" {
			s.errf(f, "%s %s", f, w.bad)
			bad = true
			continue
		}
		if w.Weight < 0 || w.Weight > 999 {
			s.errf(f, "%s weight %d is out of range 0-999", f, w.Weight)
		}
		total += max(w.Weight, 0)
		if w.Group == "" {
			s.errf(f, "%s needs group, a target group name", f)
			continue
		}
		if dup[w.Group] {
			s.errf(f, "%s: group %q is listed twice", f, w.Group)
		}
		if dup != nil {
			dup[w.Group] = true
		}
		g, ok := v.groups[w.Group]
		if !ok {
			s.errf(f, "%s: target group %q is not defined%s: add a [[target_groups]] entry with that name", f, w.Group, suggestGroup(w.Group, v.groups))
			continue
		}
		if g.synth && g.classic != l.Name {
			s.errf(f, "%s: %q is a classic listener's own group", f, w.Group)
			continue
		}
		switch {
		case l.Style == "application" && g.Protocol != "http" && g.Protocol != "https":
			s.errf(f, "%s: target group %q has protocol %q: application listeners forward to http or https groups", f, w.Group, g.Protocol)
		case l.Style == "network" && g.Protocol != "tcp" && g.Protocol != "tls":
			s.errf(f, "%s: target group %q has protocol %q: network listeners forward to tcp or tls groups", f, w.Group, g.Protocol)
		case l.Style == "network" && l.Protocol == "tcp" && g.Protocol == "tls":
			s.errf(f, "%s: target group %q has protocol \"tls\": a tcp listener passes bytes through, so forward to a tcp group (or terminate with protocol = \"tls\")", f, w.Group)
		}
	}
	if total == 0 && !bad {
		s.errf(field, "%s: every weight is 0, so no traffic could go anywhere (give one group a weight)", field)
	}
}

func (v *validator) redirect(s scope, f string, r *Redirect) {
	switch strings.ToUpper(r.Protocol) {
	case "", "HTTP", "HTTPS", "#{PROTOCOL}":
	default:
		s.errf(f+".protocol", "%s.protocol %q is not HTTP, HTTPS or #{protocol}", f, r.Protocol)
	}
	r.port = ""
	switch p := r.Port.(type) {
	case nil:
	case int64:
		if p < 1 || p > 65535 {
			s.errf(f+".port", "%s.port %d is not in 1-65535", f, p)
		} else {
			r.port = strconv.FormatInt(p, 10)
		}
	case int:
		if p < 1 || p > 65535 {
			s.errf(f+".port", "%s.port %d is not in 1-65535", f, p)
		} else {
			r.port = strconv.Itoa(p)
		}
	case string:
		n, err := strconv.Atoi(p)
		switch {
		case p == "#{port}":
			r.port = p
		case err != nil || n < 1 || n > 65535 || p[0] == '+' || p[0] == '0':
			s.errf(f+".port", "%s.port %q is not a port (1-65535) or \"#{port}\"", f, p)
		default:
			r.port = p
		}
	default:
		s.errf(f+".port", "%s.port must be a number or \"#{port}\"", f)
	}
	if strings.ContainsAny(r.Host, " /\t\r\n") {
		s.errf(f+".host", "%s.host %q is not a host name", f, r.Host)
	}
	if r.Path != "" && !strings.HasPrefix(r.Path, "/") {
		s.errf(f+".path", "%s.path %q must start with \"/\"", f, r.Path)
	}
	if strings.HasPrefix(r.Query, "?") {
		s.errf(f+".query", "%s.query %q must not start with \"?\"", f, r.Query)
	}
	switch r.Status {
	case 301, 302, 307, 308:
	case 0:
		s.errf(f+".status", "%s.status is required: 301, 302, 307 or 308", f)
	default:
		s.errf(f+".status", "%s.status %d is not 301, 302, 307 or 308", f, r.Status)
	}
	// A redirect to exactly the request's own parts (the defaults) sends the client back here
	// forever. An invalid port is left "" and counts as kept: its own error is reported above.
	keep := func(val, token string) bool { return val == "" || strings.EqualFold(val, token) }
	if keep(r.Protocol, DefaultRedirectProtocol) && keep(r.Host, DefaultRedirectHost) && keep(r.port, DefaultRedirectPort) &&
		keep(r.Path, DefaultRedirectPath) && keep(r.Query, DefaultRedirectQuery) {
		s.errf(f, "%s changes nothing and would loop: set at least one of protocol, host, port, path or query", f)
	}
}

func (v *validator) headerOps(s scope, f string, h *HeaderOps) {
	if h == nil {
		return
	}
	for _, m := range []struct {
		key string
		m   map[string]string
	}{{"set", h.Set}, {"add", h.Add}} {
		ks := make([]string, 0, len(m.m))
		for k := range m.m {
			ks = append(ks, k)
		}
		sort.Strings(ks)
		for _, k := range ks {
			if !isToken(k) {
				s.errf(f+"."+m.key, "%s.%s: %q is not a header name", f, m.key, k)
			} else if strings.ContainsAny(m.m[k], "\r\n\x00") {
				s.errf(f+"."+m.key, "%s.%s: value of %q must be one line", f, m.key, k)
			}
		}
	}
	for i, k := range h.Remove {
		if !isToken(k) {
			s.errf(idx(f+".remove", i), "%s.remove[%d] %q is not a header name", f, i, k)
		}
	}
}

// ---- small checks

// name checks an object's name: required; letters, digits, '.', '_', '-'; at most 64 bytes.
func (v *validator) name(s scope, n string) bool {
	if n == "" {
		s.errf("name", "name is required")
		return false
	}
	ok := len(n) <= 64
	for i := 0; i < len(n) && ok; i++ {
		c := n[i]
		ok = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
	}
	if !ok {
		s.errf("name", "name %q may use only letters, digits, '.', '_' and '-' (at most 64)", n)
	}
	return ok
}

// enum checks that val is one of allowed; "" is reported as missing.
func (v *validator) enum(s scope, field, val string, allowed ...string) bool {
	for _, a := range allowed {
		if val == a {
			return true
		}
	}
	list := strings.Join(allowed, ", ")
	if val == "" {
		s.errf(field, "%s is required: one of %s", field, list)
	} else {
		s.errf(field, "%s %q is not one of %s", field, val, list)
	}
	return false
}

// duration parses a Go duration; positive requires > 0, otherwise >= 0.
func (v *validator) duration(s scope, field, val string, positive bool) time.Duration {
	d, err := time.ParseDuration(val)
	switch {
	case err != nil:
		s.errf(field, "%s %q is not a duration (Go syntax, e.g. \"30s\", \"5m\", \"2h\")", field, val)
	case positive && d <= 0:
		s.errf(field, "%s %q must be greater than 0", field, val)
	case d < 0:
		s.errf(field, "%s %q must not be negative", field, val)
	default:
		return d
	}
	return 0
}

// validHostPattern: letters, digits, '-', '.', '*', '?'; no empty pattern.
func validHostPattern(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '*' || c == '?') {
			return false
		}
	}
	return true
}

func validPathPattern(p string) bool {
	if p == "*" {
		return true
	}
	if !strings.HasPrefix(p, "/") {
		return false
	}
	for i := 0; i < len(p); i++ {
		if p[i] <= ' ' || p[i] == 0x7f {
			return false
		}
	}
	return true
}

func isMethod(m string) bool {
	if m == "" || len(m) > 32 {
		return false
	}
	for i := 0; i < len(m); i++ {
		c := m[i]
		if !(c >= 'A' && c <= 'Z' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// isToken reports whether s is an RFC 9110 token (header and cookie names).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// suggest returns ` (did you mean "x"?)` for the closest name within edit distance 2.
func suggest[T any](name string, names map[string]T) string {
	best, bestD := "", 3
	for n := range names {
		if d := editDistance(name, n, 3); d < bestD || d == bestD && n < best {
			best, bestD = n, d
		}
	}
	if best == "" || bestD > 2 {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

func suggestGroup(name string, groups map[string]*TargetGroup) string {
	user := make(map[string]bool, len(groups))
	for n, g := range groups {
		if !g.synth {
			user[n] = true
		}
	}
	return suggest(name, user)
}

// editDistance is Levenshtein distance, giving up (returning limit) beyond limit.
func editDistance(a, b string, limit int) int {
	if d := len(a) - len(b); d > limit || -d > limit {
		return limit
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		rowMin := cur[0]
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			rowMin = min(rowMin, cur[j])
		}
		if rowMin >= limit {
			return limit
		}
		prev, cur = cur, prev
	}
	return min(prev[len(b)], limit)
}
