package configs

import (
	"strconv"
	"strings"
	"time"
)

// Default values. They are applied by applyDefaults only; README.md lists them.
const (
	DefaultStateDir        = "state"
	DefaultShutdownTimeout = "30s"
	// A new sticky-cookie key each week; the old one verifies for a week more, the longest
	// stickiness duration ALB allows, so no cookie outlives the key that signed it.
	DefaultStickyKeyRotation = "168h"
	DefaultStickyKeyOverlap  = "168h"
	DefaultLogLevel          = "info"
	// DefaultLogFormat "auto" is text when the process log (stderr) is a terminal, for a person
	// reading it, and JSON lines otherwise (journald, files, collectors).
	DefaultLogFormat           = "auto"
	DefaultKeyType             = "ecdsa-p256"
	DefaultAuthorityValidity   = "87600h" // 10 years
	DefaultCertificateLifetime = "2160h"  // 90 days
	DefaultPKCS11Sessions      = 8
	DefaultAdminAuth           = "required"
	DefaultAuditLogName        = "audit.log" // under state_dir
	DefaultDataKeyCacheMaxAge  = "5m"        // applies once data_key_cache_max_uses > 0
	DefaultAlgorithm           = RoundRobin
	DefaultDeregistrationDelay = "30s"
	DefaultConnectTimeout      = "5s"
	DefaultResponseTimeout     = "60s"
	DefaultTargetReadTimeout   = "60s" // as nginx's proxy_read_timeout
	DefaultMaxIdleConns        = 1024
	DefaultMaxInFlight         = 0 // unlimited: a cap is the operator's estimate of what a target takes
	DefaultStickinessDuration  = "24h"
	DefaultHCInterval          = "5s"
	DefaultHCTimeout           = "2s"
	DefaultHCHealthy           = 3
	DefaultHCUnhealthy         = 2
	DefaultHCPath              = "/"
	DefaultHCMatcher           = "200-399"
	DefaultHCGRPCPath          = "/grpc.health.v1.Health/Check" // with grpc_code: the standard health service
	DefaultIdleTimeout         = "60s"
	DefaultNetworkIdleTimeout  = "350s"
	DefaultHeaderTimeout       = "10s"
	DefaultClientBodyTimeout   = "60s" // as nginx's client_body_timeout
	DefaultSendTimeout         = "60s" // as nginx's send_timeout
	// DefaultMinTransferRate (bytes per second) is the slowest a request body or a response may
	// average once its first timeout has passed: a client trickling a byte per timeout interval
	// is cut after about a timeout's length instead of never. 1 KiB/s is far below any real
	// client (a 2G link does ~5 KiB/s), so only deliberate trickles meet it.
	DefaultMinTransferRate       = 1024
	DefaultMaxHeaderBytes        = 65536
	DefaultXFF                   = "append"
	DefaultDesyncMitigation      = "defensive"
	DefaultTLSPolicy             = "recommended"
	DefaultALPNPolicy            = "None"
	DefaultTSIGAlgorithm         = "hmac-sha256"
	DefaultDNSPropagationTimeout = "2m"
	DefaultDNSRecordTTL          = 60 // seconds, for the _acme-challenge TXT record
	DefaultFleetPrefix           = "/fulcrum/"
	DefaultFleetLeaseTTL         = "10s"
	// A redirect keeps each part of the request it does not set, as ALB's do.
	DefaultRedirectProtocol = "#{protocol}"
	DefaultRedirectHost     = "#{host}"
	DefaultRedirectPort     = "#{port}"
	DefaultRedirectPath     = "/#{path}"
	DefaultRedirectQuery    = "#{query}"
	// A fixed response with a body and no content type is text, as ALB answers; with the charset.
	DefaultFixedContentType = "text/plain; charset=utf-8"
)

// applyDefaults fills every setting the operator left out, in place, and synthesizes the target
// groups and actions of classic listeners. It is idempotent: running it on its own output changes
// nothing. Defaults go only where a setting applies (no tls_policy on a plain listener), so that
// validation can still tell a misplaced setting from a default.
func applyDefaults(c *Config) {
	s := &c.Server
	def(&s.StateDir, DefaultStateDir)
	def(&s.ShutdownTimeout, DefaultShutdownTimeout)
	def(&s.StickyKeyRotation, DefaultStickyKeyRotation)
	def(&s.StickyKeyOverlap, DefaultStickyKeyOverlap)
	def(&s.LogLevel, DefaultLogLevel)
	def(&s.LogFormat, DefaultLogFormat)
	def(&s.AdminAuth, DefaultAdminAuth)
	def(&s.AuditLog, strings.TrimSuffix(s.StateDir, "/")+"/"+DefaultAuditLogName)

	k := &c.Keystore
	def(&k.Type, "software")
	switch k.Type {
	case "software":
		def(&k.MasterKey, "file:"+strings.TrimSuffix(s.StateDir, "/")+"/master.key")
		if k.DataKeyCacheMaxUses > 0 {
			def(&k.DataKeyCacheMaxAge, DefaultDataKeyCacheMaxAge)
		}
	case "pkcs11":
		def(&k.MaxSessions, DefaultPKCS11Sessions)
	}

	applyFleetDefaults(c)

	for i := range c.Authorities {
		a := &c.Authorities[i]
		def(&a.CommonName, a.Name)
		def(&a.KeyType, DefaultKeyType)
		def(&a.Validity, DefaultAuthorityValidity)
	}
	for i := range c.Certificates {
		ct := &c.Certificates[i]
		if ct.CertFile == "" && ct.KeyFile == "" && !ct.Imported {
			def(&ct.KeyType, DefaultKeyType)
		}
		if ct.Authority != "" {
			def(&ct.Lifetime, DefaultCertificateLifetime)
		}
		if d := ct.ACMEDNS; d != nil {
			def(&d.TSIGAlgorithm, DefaultTSIGAlgorithm)
			def(&d.PropagationTimeout, DefaultDNSPropagationTimeout)
			def(&d.TTL, DefaultDNSRecordTTL)
		}
	}

	// Forget what an earlier run synthesized, then synthesize afresh from the listeners.
	groups := c.TargetGroups[:0:0]
	for _, g := range c.TargetGroups {
		if !g.synth {
			groups = append(groups, g)
		}
	}
	for i := range c.Listeners {
		l := &c.Listeners[i]
		if l.synthesized {
			l.DefaultAction, l.Forward, l.synthesized = nil, nil, false
		}
		listenerDefaults(l)
		if l.Style == "classic" {
			groups = append(groups, classicGroup(l))
			fw := Forward{{Group: ClassicGroupName(l.Name), Weight: 1, weightSet: true}}
			if l.DefaultAction == nil && l.Forward == nil && len(l.Rules) == 0 {
				if l.Layer7() {
					l.DefaultAction = &Action{Forward: fw}
				} else {
					l.Forward = fw
				}
				l.synthesized = true
			}
		}
	}
	c.TargetGroups = groups

	for i := range c.TargetGroups {
		groupDefaults(&c.TargetGroups[i])
	}
}

func listenerDefaults(l *Listener) {
	if l.Style == "classic" {
		switch l.Protocol {
		case "http", "https":
			def(&l.BackendProtocol, "http")
		case "tcp", "ssl":
			def(&l.BackendProtocol, "tcp")
		}
		def(&l.Algorithm, DefaultAlgorithm)
		targetDefaults(l.Instances)
	}
	if l.Layer7() {
		def(&l.XFF, DefaultXFF)
		def(&l.DesyncMitigation, DefaultDesyncMitigation)
		def(&l.HeaderTimeout, DefaultHeaderTimeout)
		def(&l.ClientBodyTimeout, DefaultClientBodyTimeout)
		def(&l.SendTimeout, DefaultSendTimeout)
		def(&l.MaxHeaderBytes, DefaultMaxHeaderBytes)
		def(&l.MinTransferRate, DefaultMinTransferRate)
	}
	if l.TLSTerminated() {
		def(&l.TLSPolicy, DefaultTLSPolicy)
	}
	if l.Style == "network" && l.Protocol == "tls" {
		def(&l.ALPNPolicy, DefaultALPNPolicy)
	}
	if l.Style == "network" {
		def(&l.IdleTimeout, DefaultNetworkIdleTimeout)
	} else {
		def(&l.IdleTimeout, DefaultIdleTimeout)
	}
	if l.ClientAuth == nil {
		l.ClientAuth = &ClientAuth{}
	}
	def(&l.ClientAuth.Mode, "off")
	if l.DefaultAction != nil {
		forwardDefaults(l.DefaultAction.Forward)
		redirectDefaults(l.DefaultAction.Redirect)
		fixedDefaults(l.DefaultAction.FixedResponse)
	}
	forwardDefaults(l.Forward)
	for i := range l.Rules {
		forwardDefaults(l.Rules[i].Forward)
		redirectDefaults(l.Rules[i].Redirect)
		fixedDefaults(l.Rules[i].FixedResponse)
	}
}

func fixedDefaults(f *FixedResponse) {
	if f != nil && f.Body != "" {
		def(&f.ContentType, DefaultFixedContentType)
	}
}

func redirectDefaults(r *Redirect) {
	if r == nil {
		return
	}
	def(&r.Protocol, DefaultRedirectProtocol)
	def(&r.Host, DefaultRedirectHost)
	if r.Port == nil {
		r.Port = DefaultRedirectPort
	}
	def(&r.Path, DefaultRedirectPath)
	def(&r.Query, DefaultRedirectQuery)
}

// classicGroup translates a classic listener's instances, backend protocol, health check and
// back-end TLS into an ordinary target group.
func classicGroup(l *Listener) TargetGroup {
	g := TargetGroup{
		Name:      ClassicGroupName(l.Name),
		Protocol:  l.BackendProtocol,
		Targets:   append([]Target(nil), l.Instances...),
		Algorithm: l.Algorithm,
		TLS:       l.BackendTLS,
		classic:   l.Name,
		synth:     true,
	}
	if g.Protocol == "ssl" {
		g.Protocol = "tls"
	}
	if l.ProxyProtocol && !l.Layer7() {
		g.ProxyProtocol = "v1"
	}
	if h := l.HealthCheck; h != nil {
		hc := &HealthCheck{
			Interval:           h.Interval,
			Timeout:            h.Timeout,
			HealthyThreshold:   h.HealthyThreshold,
			UnhealthyThreshold: h.UnhealthyThreshold,
		}
		if proto, port, path, ok := parseClassicTarget(h.Target); ok {
			hc.Protocol, hc.Port, hc.Path = proto, port, path
		}
		g.HealthCheck = hc
	}
	return g
}

// parseClassicTarget splits ELB Classic's "PROTO:PORT[/path]" into a health-check protocol, port
// and path. "" is fine (the defaults apply).
func parseClassicTarget(s string) (proto string, port int, path string, ok bool) {
	if s == "" {
		return "", 0, "", true
	}
	p, rest, found := strings.Cut(s, ":")
	if !found {
		return "", 0, "", false
	}
	switch strings.ToUpper(p) {
	case "HTTP":
		proto = "http"
	case "HTTPS":
		proto = "https"
	case "TCP":
		proto = "tcp"
	case "SSL":
		proto = "tls"
	default:
		return "", 0, "", false
	}
	portStr := rest
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		portStr, path = rest[:i], rest[i:]
	}
	n, err := strconv.Atoi(portStr)
	if err != nil || n < 1 || n > 65535 || portStr[0] == '+' {
		return "", 0, "", false
	}
	if (proto == "tcp" || proto == "tls") && path != "" {
		return "", 0, "", false
	}
	return proto, n, path, true
}

// forwardersFromProxies reports whether an HTTP listener's trusted_forwarders default to its
// trusted_proxies. Without PROXY protocol the peer is the client, so trusted_proxies keeps the
// meaning it always had there: the peers whose forwarding headers are believed. With PROXY
// protocol the two addresses differ, and forwarding headers are believed from nobody unless
// trusted_forwarders names them (the default is none).
func forwardersFromProxies(l *Listener) bool {
	return l.TrustedForwarders == nil && !l.AcceptProxyProtocol
}

// defaultHCTimeout is the timeout of a health check that sets none: DefaultHCTimeout, or half
// the interval when that is shorter, so that an operator who sets only a short interval gets a
// timeout that fits it. (Validation applies it once the interval is parsed.)
func defaultHCTimeout(interval time.Duration) time.Duration {
	d, _ := time.ParseDuration(DefaultHCTimeout)
	return min(d, interval/2)
}

func groupDefaults(g *TargetGroup) {
	def(&g.Algorithm, DefaultAlgorithm)
	def(&g.DeregistrationDelay, DefaultDeregistrationDelay)
	def(&g.ConnectTimeout, DefaultConnectTimeout)
	if g.Protocol == "http" || g.Protocol == "https" {
		def(&g.ResponseTimeout, DefaultResponseTimeout)
		def(&g.TargetReadTimeout, DefaultTargetReadTimeout)
	}
	def(&g.MaxIdleConns, DefaultMaxIdleConns)
	def(&g.MaxInFlight, DefaultMaxInFlight)
	targetDefaults(g.Targets)
	if st := g.Stickiness; st != nil && (st.Type == StickyLBCookie || st.Type == StickyAppCookie) {
		def(&st.Duration, DefaultStickinessDuration)
	}
	if g.HealthCheck == nil {
		g.HealthCheck = &HealthCheck{}
	}
	h := g.HealthCheck
	def(&h.Protocol, g.Protocol)
	def(&h.Interval, DefaultHCInterval)
	def(&h.HealthyThreshold, DefaultHCHealthy)
	def(&h.UnhealthyThreshold, DefaultHCUnhealthy)
	if h.Protocol == "http" || h.Protocol == "https" {
		if h.GRPCCode != "" {
			def(&h.Path, DefaultHCGRPCPath)
		}
		def(&h.Path, DefaultHCPath)
		def(&h.Matcher, DefaultHCMatcher)
	}
}

// targetDefaults gives weight 1 to targets whose weight was not written.
func targetDefaults(ts []Target) {
	for i := range ts {
		if !ts[i].weightSet && ts[i].Weight == 0 && ts[i].bad == "" {
			ts[i].Weight = 1
		}
	}
}

func forwardDefaults(f Forward) {
	for i := range f {
		if !f[i].weightSet && f[i].Weight == 0 && f[i].bad == "" {
			f[i].Weight = 1
		}
	}
}

// def sets *p to v when it is unset (its zero value).
func def[T comparable](p *T, v T) {
	var unset T
	if *p == unset {
		*p = v
	}
}
