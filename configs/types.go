// Package configs is Fulcrum's configuration: the TOML schema of SPEC section 4 as plain data,
// strict loading, defaults in one place and validation that reports every problem in one run.
//
// Exported fields are exactly what the operator typed. Parsed forms (durations, prefixes,
// compiled patterns, matcher ranges) are unexported and set once by validation; read them
// through the accessor methods. Nothing in this package opens a socket or starts a goroutine.
package configs

import (
	"net/netip"
	"time"
)

// Config is one configuration file.
type Config struct {
	Server       Server        `toml:"server"`
	Keystore     Keystore      `toml:"keystore"`
	Authorities  []Authority   `toml:"authorities"`
	Certificates []Certificate `toml:"certificates"`
	TargetGroups []TargetGroup `toml:"target_groups"`
	Listeners    []Listener    `toml:"listeners"`
	Fleet        *Fleet        `toml:"fleet"` // nil: a single node, nothing shared

	// File is the path the configuration was loaded from ("" when loaded from bytes).
	File string `toml:"-"`
	dir  string // directory relative paths resolve against

	// Lookup tables set by Validate (nil before): name -> index.
	groupIdx, certIdx, authIdx map[string]int
}

// Server holds process-wide settings.
type Server struct {
	Admin            string `toml:"admin"`              // "host:port" of the admin endpoint; "" disables
	AdminAllowPublic bool   `toml:"admin_allow_public"` // allow a non-loopback admin address
	StateDir         string `toml:"state_dir"`
	ShutdownTimeout  string `toml:"shutdown_timeout"`
	AccessLog        string `toml:"access_log"` // "", "stdout", "stderr" or a file path
	LogLevel         string `toml:"log_level"`  // debug | info | warn | error
	LogFormat        string `toml:"log_format"` // process log: auto | text | json

	// AdminAuth is "required" (callers authenticate with AdminTokens or a client certificate
	// from AdminClientCA; unauthenticated callers get only /healthz and /readyz) or "none"
	// (no authentication, every caller is key_admin; loopback addresses only).
	AdminAuth string `toml:"admin_auth"`
	// AdminTLSCertificate names a [[certificates]] entry: the admin endpoint then speaks HTTPS.
	AdminTLSCertificate string `toml:"admin_tls_certificate"`
	// AdminClientCA is a PEM file of the authority whose client certificates the admin endpoint
	// accepts (mTLS); needs AdminTLSCertificate.
	AdminClientCA string        `toml:"admin_client_ca"`
	AdminTokens   []AdminToken  `toml:"admin_tokens"`
	AdminClients  []AdminClient `toml:"admin_clients"`
	// AuditLog is the JSON-lines file of admin writes and key events.
	AuditLog string `toml:"audit_log"`
	// StickyKeyRotation is how often a new sticky-cookie signing key is made (the keys live in
	// the keystore, sealed like certificate keys); StickyKeyOverlap is how long a replaced key
	// still verifies, so the cookies it signed keep their binding.
	StickyKeyRotation string `toml:"sticky_key_rotation"`
	StickyKeyOverlap  string `toml:"sticky_key_overlap"`

	shutdownTimeout   time.Duration
	stickyKeyRotation time.Duration
	stickyKeyOverlap  time.Duration
}

// The admin roles, from least to most privileged. Each includes the ones before it.
const (
	RoleViewer   = "viewer"    // read status, metrics, certificates, keys
	RoleOperator = "operator"  // reload, renew
	RoleKeyAdmin = "key_admin" // import keys, schedule and cancel deletion, rotate the master key
)

// AdminToken is a bearer token an admin caller presents. Only its SHA-256 is kept in memory.
type AdminToken struct {
	Name   string `toml:"name"`   // the caller's identity in the audit log
	Secret string `toml:"secret"` // "env:NAME" or "file:PATH" holding the token
	Role   string `toml:"role"`
}

// AdminClient maps a client certificate (issued by admin_client_ca) to a role.
type AdminClient struct {
	CommonName string `toml:"common_name"` // subject CN of the client certificate
	Role       string `toml:"role"`
}

// Keystore says where private keys are generated and used.
type Keystore struct {
	Type        string `toml:"type"`         // software | pkcs11
	MasterKey   string `toml:"master_key"`   // software: "file:PATH" or "env:NAME"
	Module      string `toml:"module"`       // pkcs11: path of the PKCS#11 module
	TokenLabel  string `toml:"token_label"`  // pkcs11: token chosen by label, never by slot
	Pin         string `toml:"pin"`          // pkcs11: "env:NAME" or "file:PATH"
	MaxSessions int    `toml:"max_sessions"` // pkcs11: session pool size

	// Software keystore data-key caching: one data key seals (and, once unwrapped, opens) several
	// keys, for at most DataKeyCacheMaxAge and DataKeyCacheMaxUses. Off when MaxUses is 0.
	DataKeyCacheMaxAge  string `toml:"data_key_cache_max_age"`
	DataKeyCacheMaxUses int    `toml:"data_key_cache_max_uses"`

	dataKeyCacheMaxAge time.Duration
}

// Authority is a private certificate authority whose key lives in the keystore.
type Authority struct {
	Name       string `toml:"name"`
	CommonName string `toml:"common_name"`
	KeyType    string `toml:"key_type"`
	Validity   string `toml:"validity"`

	validity time.Duration
}

// ACMEDNS is where DNS-01 challenge records are written: an authoritative server that accepts
// RFC 2136 updates, signed with TSIG.
type ACMEDNS struct {
	Server string `toml:"server"` // "host:port" of the primary that takes updates
	// Zone the challenge records go in ("example.test"); found by asking Server for the SOA
	// of each name when empty.
	Zone          string `toml:"zone"`
	TSIGKey       string `toml:"tsig_key"`       // key name, as the server knows it
	TSIGSecret    string `toml:"tsig_secret"`    // "env:NAME" or "file:PATH" holding the base64 secret
	TSIGAlgorithm string `toml:"tsig_algorithm"` // hmac-sha256 (default) | hmac-sha384 | hmac-sha512
	TTL           int    `toml:"ttl"`            // of the challenge records, seconds (default 60)
	// PropagationTimeout bounds the wait for Server to answer with the record before the CA
	// is told to look (default "2m").
	PropagationTimeout string `toml:"propagation_timeout"`

	propagation time.Duration
}

// Certificate is a certificate the manager issues (authority or ACME) or imports.
type Certificate struct {
	Name       string   `toml:"name"`
	Domains    []string `toml:"domains"`
	Authority  string   `toml:"authority"`
	ACME       string   `toml:"acme"`         // ACME directory URL
	ACMEEmail  string   `toml:"acme_email"`   // account contact
	ACMECAFile string   `toml:"acme_ca_file"` // extra root to trust for the ACME server (private ACME)
	// External account binding (RFC 8555 §7.3.4), which CAs such as ZeroSSL, Google Trust
	// Services and private ACME servers require: the key id the CA gave, and its MAC key as a
	// secret reference ("env:NAME" or "file:PATH"; base64url, as CAs hand it out).
	ACMEEABKeyID  string `toml:"acme_eab_key_id"`
	ACMEEABMACKey string `toml:"acme_eab_mac_key"`
	// ACMEDNS answers the DNS-01 challenge through RFC 2136 dynamic updates (BIND, Knot,
	// PowerDNS ...), the only challenge that proves wildcard names. Set, it is the only
	// challenge used for this certificate.
	ACMEDNS  *ACMEDNS `toml:"acme_dns"`
	KeyType  string   `toml:"key_type"`
	Lifetime string   `toml:"lifetime"`
	CertFile string   `toml:"cert_file"` // imported from files
	KeyFile  string   `toml:"key_file"`  // imported from files
	// Imported: the certificate and key are imported into the keystore with
	// `fulcrum certs import NAME -cert F -key F` (the key is sealed there, never renewed).
	Imported bool `toml:"imported"`

	lifetime time.Duration
}

// Target is one back end of a target group. In TOML it is either "host:port" or
// { address = "host:port", weight = N }.
type Target struct {
	Address string `toml:"address"`
	Weight  int    `toml:"weight"`

	weightSet bool   // weight was written (so 0 means drained, not "default 1")
	bad       string // decoding problem, reported by validation with the element's position
	addr      netip.AddrPort
}

// TargetGroup is a pool of targets with one protocol and one balancing policy.
type TargetGroup struct {
	Name                string       `toml:"name"`
	Protocol            string       `toml:"protocol"` // http | https | tcp | tls
	Targets             []Target     `toml:"targets"`
	Algorithm           string       `toml:"algorithm"`
	SlowStart           string       `toml:"slow_start"`
	DeregistrationDelay string       `toml:"deregistration_delay"`
	HTTP2               bool         `toml:"http2"`
	ProxyProtocol       string       `toml:"proxy_protocol"`      // "", "v1", "v2"
	ConnectTimeout      string       `toml:"connect_timeout"`     // dial budget (default 5s)
	ResponseTimeout     string       `toml:"response_timeout"`    // time to response headers before 504 (default 60s)
	TargetReadTimeout   string       `toml:"target_read_timeout"` // between reads of a response body (default 60s)
	MaxIdleConns        int          `toml:"max_idle_conns"`      // idle keep-alive connections kept per target (default 1024)
	MaxInFlight         int          `toml:"max_in_flight"`       // requests at once per target; over it 503 (default 0 = unlimited)
	Stickiness          *Stickiness  `toml:"stickiness"`
	TLS                 *BackendTLS  `toml:"tls"`
	HealthCheck         *HealthCheck `toml:"health_check"`

	slowStart, deregistrationDelay, connectTimeout, responseTimeout time.Duration
	targetReadTimeout                                               time.Duration
	classic                                                         string // listener this group was synthesized for
	synth                                                           bool   // synthesized by applyDefaults (classic listener)
}

// Stickiness binds a client to a target.
type Stickiness struct {
	Type     string `toml:"type"` // lb_cookie | app_cookie | source_ip
	Duration string `toml:"duration"`
	Cookie   string `toml:"cookie"` // app_cookie: the application's cookie name

	duration time.Duration
}

// BackendTLS is how Fulcrum verifies (and authenticates to) TLS targets.
type BackendTLS struct {
	ServerName         string   `toml:"server_name"`
	Authority          string   `toml:"authority"`
	CAFile             string   `toml:"ca_file"`
	PinPublicKeys      []string `toml:"pin_public_keys"` // "sha256/BASE64" of the SubjectPublicKeyInfo
	ClientCertificate  string   `toml:"client_certificate"`
	InsecureSkipVerify bool     `toml:"insecure_skip_verify"` // explicit opt-out, for lab use only

	pins [][32]byte // PinPublicKeys decoded
}

// HealthCheck is an active health check.
type HealthCheck struct {
	Protocol           string `toml:"protocol"` // http | https | tcp | tls
	Path               string `toml:"path"`
	Port               int    `toml:"port"` // 0 = the target's port
	Interval           string `toml:"interval"`
	Timeout            string `toml:"timeout"`
	HealthyThreshold   int    `toml:"healthy_threshold"`
	UnhealthyThreshold int    `toml:"unhealthy_threshold"`
	Matcher            string `toml:"matcher"` // "200", "200-399", "200,204,300-399"
	// GRPCCode makes the check a gRPC call (ALB's Matcher.GrpcCode): "0", "0-99", "0,12".
	GRPCCode string `toml:"grpc_code"`
	Disabled bool   `toml:"disabled"`

	interval, timeout time.Duration
	matcher           []StatusRange
	grpcCodes         []StatusRange
}

// StatusRange is an inclusive range of HTTP status codes.
type StatusRange struct{ Lo, Hi int }

// ClassicHealthCheck is ELB Classic's health check: target = "PROTO:PORT[/path]".
type ClassicHealthCheck struct {
	Target             string `toml:"target"`
	Interval           string `toml:"interval"`
	Timeout            string `toml:"timeout"`
	HealthyThreshold   int    `toml:"healthy_threshold"`
	UnhealthyThreshold int    `toml:"unhealthy_threshold"`
}

// ClientAuth is mutual TLS on a listener.
type ClientAuth struct {
	Mode      string `toml:"mode"` // off | verify | passthrough
	Authority string `toml:"authority"`
	CAFile    string `toml:"ca_file"`
}

// HeaderOps rewrites headers.
type HeaderOps struct {
	Set    map[string]string `toml:"set"`
	Add    map[string]string `toml:"add"`
	Remove []string          `toml:"remove"`
}

// WeightedGroup is one target group of a forward action.
type WeightedGroup struct {
	Group  string `toml:"group"`
	Weight int    `toml:"weight"`

	weightSet bool   // weight was written (so 0 means "no traffic", not "default 1")
	bad       string // decoding problem, reported by validation with the element's position
}

// Forward is a forward action. In TOML it is either "group" or [{ group = "a", weight = 90 }, ...].
type Forward []WeightedGroup

// Balancing algorithms (target_groups.algorithm). Algorithms lists them; backends maps each to
// its policy by these constants, so a name is written once.
const (
	RoundRobin               = "round_robin"
	LeastOutstandingRequests = "least_outstanding_requests"
	WeightedRandom           = "weighted_random"
	LeastConnections         = "least_connections"
	SourceIPHash             = "source_ip_hash"
)

// Algorithms are the valid values of algorithm.
var Algorithms = []string{RoundRobin, LeastOutstandingRequests, WeightedRandom, LeastConnections, SourceIPHash}

// Stickiness types (target_groups.stickiness.type).
const (
	StickyLBCookie  = "lb_cookie"
	StickyAppCookie = "app_cookie"
	StickySourceIP  = "source_ip"
)

// StickinessTypes are the valid values of stickiness.type.
var StickinessTypes = []string{StickyLBCookie, StickyAppCookie, StickySourceIP}

// Redirect is an ALB redirect action; empty fields keep the request's value ("#{host}" etc. allowed).
type Redirect struct {
	Protocol string `toml:"protocol"`
	Host     string `toml:"host"`
	Port     any    `toml:"port"` // 443 or "#{port}"
	Path     string `toml:"path"`
	Query    string `toml:"query"`
	Status   int    `toml:"status"` // 301 | 302 | 307 | 308

	port string
}

// FixedResponse is an ALB fixed-response action.
type FixedResponse struct {
	Status      int    `toml:"status"`
	ContentType string `toml:"content_type"`
	Body        string `toml:"body"`
}

// Action is what a listener does with a request: exactly one of Forward, Redirect, FixedResponse.
type Action struct {
	Forward       Forward        `toml:"forward"`
	Redirect      *Redirect      `toml:"redirect"`
	FixedResponse *FixedResponse `toml:"fixed_response"`
}

// Rule is a listener rule: conditions (AND across, OR within) and one action.
type Rule struct {
	Priority  int                 `toml:"priority"`
	Hosts     []string            `toml:"hosts"`
	Paths     []string            `toml:"paths"`
	Methods   []string            `toml:"methods"`
	Headers   map[string][]string `toml:"headers"`
	Query     map[string][]string `toml:"query"`
	SourceIPs []string            `toml:"source_ips"`

	Forward       Forward        `toml:"forward"`
	Redirect      *Redirect      `toml:"redirect"`
	FixedResponse *FixedResponse `toml:"fixed_response"`

	RequestHeaders  *HeaderOps `toml:"request_headers"`
	ResponseHeaders *HeaderOps `toml:"response_headers"`

	sourceIPs []netip.Prefix
}

// Listener is one listening socket and what it does.
type Listener struct {
	Name     string `toml:"name"`
	Style    string `toml:"style"`    // application | network | classic
	Protocol string `toml:"protocol"` // http | https | tcp | tls | ssl
	Address  string `toml:"address"`

	Certificates []string    `toml:"certificates"`
	TLSPolicy    string      `toml:"tls_policy"` // recommended | tls13 | compatible
	ClientAuth   *ClientAuth `toml:"client_auth"`
	ALPNPolicy   string      `toml:"alpn_policy"` // network tls listeners (NLB names)
	HTTP2        *bool       `toml:"http2"`       // application https: default true

	TrustedProxies      []string `toml:"trusted_proxies"` // peers that may send a PROXY header
	AcceptProxyProtocol bool     `toml:"accept_proxy_protocol"`
	// TrustedForwarders are the clients (the address a PROXY header gave, else the peer) whose
	// forwarding headers are believed. nil = unset (see forwarderDefaults); [] = none.
	TrustedForwarders []string `toml:"trusted_forwarders"`

	XFF                     string `toml:"xff"`               // append | preserve | remove
	DesyncMitigation        string `toml:"desync_mitigation"` // monitor | defensive | strictest
	DropInvalidHeaderFields bool   `toml:"drop_invalid_header_fields"`
	IdleTimeout             string `toml:"idle_timeout"`
	HeaderTimeout           string `toml:"header_timeout"`      // time to read request headers (default 10s)
	ClientBodyTimeout       string `toml:"client_body_timeout"` // between reads of a request body (default 60s)
	SendTimeout             string `toml:"send_timeout"`        // between writes to a client (default 60s)
	MinTransferRate         int    `toml:"min_transfer_rate"`   // bytes/s a body or response must average (default 1024)
	MaxHeaderBytes          int    `toml:"max_header_bytes"`
	MaxConnections          int    `toml:"max_connections"` // 0 = unlimited

	// application
	DefaultAction *Action `toml:"default_action"`
	Rules         []Rule  `toml:"rules"`

	// network
	Forward Forward `toml:"forward"`

	// classic
	BackendProtocol string              `toml:"backend_protocol"`
	Instances       []Target            `toml:"instances"`
	ProxyProtocol   bool                `toml:"proxy_protocol"`
	HealthCheck     *ClassicHealthCheck `toml:"health_check"`
	BackendTLS      *BackendTLS         `toml:"backend_tls"`
	RequestHeaders  *HeaderOps          `toml:"request_headers"`
	ResponseHeaders *HeaderOps          `toml:"response_headers"`
	Algorithm       string              `toml:"algorithm"`

	trustedProxies             []netip.Prefix
	trustedForwarders          []netip.Prefix
	idleTimeout, headerTimeout time.Duration
	clientBodyTimeout          time.Duration
	sendTimeout                time.Duration
	addr                       netip.AddrPort
	synthesized                bool // DefaultAction / Forward were set by Validate (classic)
}
