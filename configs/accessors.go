package configs

import (
	"net/netip"
	"path/filepath"
	"strings"
	"time"
)

// The accessors below return the parsed forms that Validate sets once. Reading them on a
// configuration that was not validated returns zero values.

// ShutdownTimeoutDuration is the drain budget on SIGTERM.
func (s *Server) ShutdownTimeoutDuration() time.Duration { return s.shutdownTimeout }

// StickyKeyRotationDuration is how often a new sticky-cookie key starts signing.
func (s *Server) StickyKeyRotationDuration() time.Duration { return s.stickyKeyRotation }

// StickyKeyOverlapDuration is how long a replaced sticky-cookie key still verifies.
func (s *Server) StickyKeyOverlapDuration() time.Duration { return s.stickyKeyOverlap }

// ValidityDuration is the authority certificate's validity.
func (a *Authority) ValidityDuration() time.Duration { return a.validity }

// LifetimeDuration is the lifetime of certificates issued by a private authority.
func (c *Certificate) LifetimeDuration() time.Duration { return c.lifetime }

// SlowStartDuration, DeregistrationDelayDuration, ConnectTimeoutDuration and
// ResponseTimeoutDuration are the group's parsed durations.
func (g *TargetGroup) SlowStartDuration() time.Duration           { return g.slowStart }
func (g *TargetGroup) DeregistrationDelayDuration() time.Duration { return g.deregistrationDelay }
func (g *TargetGroup) ConnectTimeoutDuration() time.Duration      { return g.connectTimeout }
func (g *TargetGroup) ResponseTimeoutDuration() time.Duration     { return g.responseTimeout }

// TargetReadTimeoutDuration is the longest a target may leave a response body without sending
// a byte (http/https groups); then the response is aborted, never presented as complete.
func (g *TargetGroup) TargetReadTimeoutDuration() time.Duration { return g.targetReadTimeout }

// Pins are the decoded pin_public_keys: SHA-256 digests of SubjectPublicKeyInfo.
func (t *BackendTLS) Pins() [][32]byte { return t.pins }

// DurationValue is the stickiness cookie lifetime.
func (s *Stickiness) DurationValue() time.Duration { return s.duration }

// IntervalDuration and TimeoutDuration are the health check's parsed durations.
func (h *HealthCheck) IntervalDuration() time.Duration { return h.interval }
func (h *HealthCheck) TimeoutDuration() time.Duration  { return h.timeout }

// Matches reports whether an HTTP status satisfies the health check's matcher.
func (h *HealthCheck) Matches(status int) bool {
	for _, r := range h.matcher {
		if status >= r.Lo && status <= r.Hi {
			return true
		}
	}
	return false
}

// PortValue is the redirect port after validation: "" (keep), "#{port}" or digits.
func (r *Redirect) PortValue() string { return r.port }

// SourcePrefixes are the rule's parsed source_ips.
func (r *Rule) SourcePrefixes() []netip.Prefix { return r.sourceIPs }

// Action returns the rule's action as an Action value.
func (r *Rule) Action() Action {
	return Action{Forward: r.Forward, Redirect: r.Redirect, FixedResponse: r.FixedResponse}
}

// TrustedPrefixes are the listener's parsed trusted_proxies: the peers that may send a PROXY
// header.
func (l *Listener) TrustedPrefixes() []netip.Prefix { return l.trustedProxies }

// ForwarderPrefixes are the listener's parsed trusted_forwarders: the client addresses (from the
// PROXY header when there is one, else the peer) whose X-Forwarded-For, X-Request-Id, X-Real-IP,
// Forwarded and client-certificate headers are believed. Empty means none.
func (l *Listener) ForwarderPrefixes() []netip.Prefix { return l.trustedForwarders }

// ClientBodyTimeoutDuration is the longest a client may leave a request body without sending a
// byte; SendTimeoutDuration the longest a write to a client may wait. MinTransferRate (bytes
// per second) then bounds a whole body or response: it must end by start + timeout +
// bytes/MinTransferRate as well.
func (l *Listener) ClientBodyTimeoutDuration() time.Duration { return l.clientBodyTimeout }
func (l *Listener) SendTimeoutDuration() time.Duration       { return l.sendTimeout }

// IdleTimeoutDuration and HeaderTimeoutDuration are the listener's parsed timeouts. On a network
// listener (no header_timeout key) HeaderTimeoutDuration is the default header_timeout, which
// bounds its TLS handshake or ClientHello peek.
func (l *Listener) IdleTimeoutDuration() time.Duration   { return l.idleTimeout }
func (l *Listener) HeaderTimeoutDuration() time.Duration { return l.headerTimeout }

// HTTP2Enabled reports whether the listener offers HTTP/2 (ALPN h2); application https only.
func (l *Listener) HTTP2Enabled() bool {
	return l.Style == "application" && l.Protocol == "https" && (l.HTTP2 == nil || *l.HTTP2)
}

// TLSTerminated reports whether the listener terminates TLS.
func (l *Listener) TLSTerminated() bool {
	return l.Protocol == "https" || l.Protocol == "tls" || l.Protocol == "ssl"
}

// Layer7 reports whether the listener speaks HTTP.
func (l *Listener) Layer7() bool { return l.Protocol == "http" || l.Protocol == "https" }

// Resolve makes a path from the configuration relative to the config file's directory.
func (c *Config) Resolve(p string) string {
	if p == "" || filepath.IsAbs(p) || c.dir == "" {
		return p
	}
	return filepath.Join(c.dir, p)
}

// Group returns the target group with the given name (including "@classic/NAME" groups), or nil.
func (c *Config) Group(name string) *TargetGroup { return byName(c.TargetGroups, c.groupIdx, name) }

// Cert returns the certificate with the given name, or nil.
func (c *Config) Cert(name string) *Certificate { return byName(c.Certificates, c.certIdx, name) }

// Authority returns the authority with the given name, or nil.
func (c *Config) Authority(name string) *Authority { return byName(c.Authorities, c.authIdx, name) }

// Listener returns the listener with the given name, or nil.
func (c *Config) Listener(name string) *Listener { return byName(c.Listeners, nil, name) }

// namedObject is a configuration object that others refer to by its name.
type namedObject interface{ name() string }

func (g *TargetGroup) name() string { return g.Name }
func (c *Certificate) name() string { return c.Name }
func (a *Authority) name() string   { return a.Name }
func (l *Listener) name() string    { return l.Name }

// byName returns the element of list called name, or nil. idx, when not nil, is list's index
// (indexByName), built once the configuration is valid; it is checked against list, which a
// caller may have changed since.
func byName[T any, P interface {
	*T
	namedObject
}](list []T, idx map[string]int, name string) *T {
	if idx != nil {
		if i, ok := idx[name]; ok && i < len(list) && P(&list[i]).name() == name {
			return &list[i]
		}
		return nil
	}
	for i := range list {
		if P(&list[i]).name() == name {
			return &list[i]
		}
	}
	return nil
}

// indexByName maps the names of list's elements to their positions.
func indexByName[T any, P interface {
	*T
	namedObject
}](list []T) map[string]int {
	idx := make(map[string]int, len(list))
	for i := range list {
		idx[P(&list[i]).name()] = i
	}
	return idx
}

// nameAt is the name of list's element i, "" when there is none.
func nameAt[T any, P interface {
	*T
	namedObject
}](list []T, i int) string {
	if i < len(list) {
		return P(&list[i]).name()
	}
	return ""
}

// Dir is the directory relative paths resolve against ("" when loaded without a file name).
func (c *Config) Dir() string { return c.dir }

// StateDirPath is server.state_dir resolved against the config file's directory.
func (c *Config) StateDirPath() string { return c.Resolve(c.Server.StateDir) }

// SecretRef splits a secret reference "env:NAME" or "file:PATH" (validated by Load). For "file"
// the path is resolved against the config file's directory. It reads nothing.
func (c *Config) SecretRef(s string) (kind, ref string) {
	kind, ref, _ = strings.Cut(s, ":")
	if kind == "file" {
		ref = c.Resolve(ref)
	}
	return kind, ref
}

// ClassicListener is the name of the classic listener this group was synthesized for ("" for
// groups written in the file).
func (g *TargetGroup) ClassicListener() string { return g.classic }

// AddrPort is the target's address when it is an IP literal (invalid for DNS names).
func (t *Target) AddrPort() netip.AddrPort { return t.addr }

// MatcherRanges are the health check's parsed matcher ranges (nil for tcp/tls checks).
func (h *HealthCheck) MatcherRanges() []StatusRange { return h.matcher }

// GRPCRanges are the parsed grpc_code ranges; nil when the check is not a gRPC check.
func (h *HealthCheck) GRPCRanges() []StatusRange { return h.grpcCodes }

// AddrPort is the listener's address when its host is an IP literal (invalid for "" or
// "localhost" hosts; listen on Address).
func (l *Listener) AddrPort() netip.AddrPort { return l.addr }

// Synthesized reports whether the listener's DefaultAction or Forward was set by Validate
// (classic listeners: forward to ClassicGroupName(l.Name)).
func (l *Listener) Synthesized() bool { return l.synthesized }

// ClassicGroupName is the name of the target group Validate synthesizes for a classic listener's
// instances. The "@" cannot appear in a user's group name, so it never collides.
func ClassicGroupName(listener string) string { return "@classic/" + listener }

// PropagationTimeoutDuration is PropagationTimeout, parsed (defaults applied by Validate).
func (d *ACMEDNS) PropagationTimeoutDuration() time.Duration { return d.propagation }

// DataKeyCacheMaxAgeDuration is DataKeyCacheMaxAge, parsed (0 when data-key caching is off).
func (k *Keystore) DataKeyCacheMaxAgeDuration() time.Duration { return k.dataKeyCacheMaxAge }
