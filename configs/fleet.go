package configs

import (
	"net/url"
	"os"
	"strings"
	"time"
)

// Fleet makes several Fulcrum nodes one: certificates, ACME accounts, authorities, sealed keys,
// renewal locks and session-ticket and sticky-cookie keys are shared through etcd. Without a
// [fleet] section (Fleet == nil) nothing changes and nothing connects anywhere.
type Fleet struct {
	Etcd   []string `toml:"etcd"`   // endpoints: "host:port" or "https://host:port"
	Prefix string   `toml:"prefix"` // every key lives under it; several fleets can share one etcd
	Node   string   `toml:"node"`   // this node's name in /admin/fleet and in lock values

	// TLS to etcd. ca_file turns TLS on; cert_file with key_file (or key, a key name in the
	// keystore, e.g. in the HSM) is the client certificate for etcd's client-cert auth.
	CAFile   string `toml:"ca_file"`
	CertFile string `toml:"cert_file"`
	KeyFile  string `toml:"key_file"`
	Key      string `toml:"key"`
	// ServerName overrides the name checked in etcd's certificate (default: the endpoint host).
	ServerName string `toml:"server_name"`

	// MasterKey seals what the fleet shares that is not a keystore key (session-ticket and
	// sticky-cookie secrets): "env:NAME" (base64 of 32 bytes) or "file:PATH". Default: the
	// software keystore's master_key, which every node of a fleet must be given anyway. A
	// pkcs11 keystore has no master key, so there it is required.
	MasterKey string `toml:"master_key"`

	// LeaseTTL is how long a crashed node's locks, leadership and heartbeat outlive it.
	LeaseTTL string `toml:"lease_ttl"`

	leaseTTL time.Duration
}

// LeaseTTLDuration is the parsed lease_ttl.
func (f *Fleet) LeaseTTLDuration() time.Duration { return f.leaseTTL }

// applyFleetDefaults fills the [fleet] settings the operator left out.
func applyFleetDefaults(c *Config) {
	f := c.Fleet
	if f == nil {
		return
	}
	def(&f.Prefix, DefaultFleetPrefix)
	if f.Node == "" {
		if h, err := os.Hostname(); err == nil {
			f.Node = h
		}
	}
	def(&f.LeaseTTL, DefaultFleetLeaseTTL)
	if c.Keystore.Type == "software" || c.Keystore.Type == "" {
		def(&f.MasterKey, c.Keystore.MasterKey)
	}
}

func (v *validator) fleet(s scope) {
	f := v.c.Fleet
	if f == nil {
		return
	}
	if len(f.Etcd) == 0 {
		s.errf("etcd", "a fleet needs etcd endpoints (etcd = [\"10.0.0.1:2379\", ...])")
	}
	for i, ep := range f.Etcd {
		field := idx("etcd", i)
		hostport := ep
		if strings.Contains(ep, "://") {
			u, err := url.Parse(ep)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
				s.errf(field, "etcd endpoint %q: want \"host:port\" or \"https://host:port\"", ep)
				continue
			}
			if u.Scheme == "https" && f.CAFile == "" {
				s.errf(field, "etcd endpoint %q is https but ca_file is not set", ep)
			}
			hostport = u.Host
		}
		v.hostPort(s, field, hostport, true)
	}
	if !strings.HasPrefix(f.Prefix, "/") || strings.ContainsAny(f.Prefix, "\x00\n\r") || strings.TrimRight(f.Prefix, "/") == "" {
		s.errf("prefix", "prefix %q must start with / and name something below the root (e.g. \"/fulcrum/prod/\")", f.Prefix)
	}
	if strings.TrimSpace(f.Node) == "" || strings.ContainsAny(f.Node, "/\x00\n\r ") || len(f.Node) > 128 {
		s.errf("node", "node %q must be a non-empty name of at most 128 characters without '/' or spaces (default: the host name)", f.Node)
	}
	if f.CertFile != "" && f.KeyFile == "" && f.Key == "" {
		s.errf("cert_file", "cert_file needs key_file or key (a key name in the keystore)")
	}
	if f.Key != "" && v.c.Keystore.Type == "software" {
		s.errf("key", "key names a key in a pkcs11 keystore; software-keystore keys live in the fleet's etcd themselves, so use key_file")
	}
	if f.KeyFile != "" && f.Key != "" {
		s.errf("key", "set key_file or key, not both")
	}
	if (f.KeyFile != "" || f.Key != "") && f.CertFile == "" {
		s.errf("cert_file", "a client key needs its cert_file")
	}
	if f.CertFile != "" && f.CAFile == "" {
		s.errf("ca_file", "a client certificate is only sent over TLS: set ca_file (etcd's CA)")
	}
	if f.MasterKey == "" {
		s.errf("master_key", "a fleet with a pkcs11 keystore needs master_key (\"env:NAME\" or \"file:PATH\", 32 bytes shared by every node) to seal session-ticket and cookie keys")
	} else {
		v.secret(s, "master_key", f.MasterKey)
	}
	f.leaseTTL = v.duration(s, "lease_ttl", f.LeaseTTL, true)
	if f.leaseTTL > 0 && (f.leaseTTL < 2*time.Second || f.leaseTTL > 10*time.Minute) {
		s.errf("lease_ttl", "lease_ttl %s is out of range 2s-10m (etcd's minimum lease is about 2s)", f.LeaseTTL)
	}
}
