package observe

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fulcrum-lb/fulcrum/certs/fleet"
	"github.com/fulcrum-lb/fulcrum/listener"
)

// runtimeCollector reads long-lived state at scrape time (targets, listeners, certificates, the
// keystore), so none of it costs anything on the request path.
type runtimeCollector struct {
	rt *listener.Runtime

	targetHealthy, targetInFlight, targetFailures *prometheus.Desc
	active, accepted, rejected, bytesIn, bytesOut *prometheus.Desc
	handshakes, l4Errors                          *prometheus.Desc
	certExpiry, certExpiring, certRenewFailures   *prometheus.Desc
	authorityKeyLost                              *prometheus.Desc
	signs, signErrors, signSeconds, rebuilds      *prometheus.Desc
	dekHits, dekMisses                            *prometheus.Desc
}

func newRuntimeCollector(rt *listener.Runtime) *runtimeCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &runtimeCollector{
		rt:                rt,
		targetHealthy:     d("fulcrum_target_healthy", "1 when the target is in rotation (health checks and passive ejection).", "target_group", "target"),
		targetInFlight:    d("fulcrum_target_in_flight", "Requests or connections in flight to the target.", "target_group", "target"),
		targetFailures:    d("fulcrum_target_failures_total", "Failed requests, dials and health checks of the target.", "target_group", "target"),
		active:            d("fulcrum_active_connections", "Client connections open now.", "listener"),
		accepted:          d("fulcrum_connections_total", "Client connections accepted.", "listener"),
		rejected:          d("fulcrum_connections_rejected_total", "Client connections closed at accept: over max_connections, or PROXY protocol required and the peer is not a trusted proxy.", "listener", "reason"),
		bytesIn:           d("fulcrum_tcp_bytes_in_total", "Bytes from clients to targets on layer-4 listeners.", "listener"),
		bytesOut:          d("fulcrum_tcp_bytes_out_total", "Bytes from targets to clients on layer-4 listeners.", "listener"),
		handshakes:        d("fulcrum_tls_handshakes_total", "TLS handshakes on HTTPS listeners by result (ok, failed) and resumption.", "listener", "result", "resumed"),
		l4Errors:          d("fulcrum_tcp_errors_total", "Layer-4 connection failures by kind.", "listener", "kind"),
		certExpiry:        d("fulcrum_certificate_expiry_seconds", "Seconds until the certificate's not-after.", "certificate"),
		certExpiring:      d("fulcrum_certificate_expiry_warning", "1 when the certificate is within 45 days of its not-after and nothing is about to renew it (imported, or renewals failing).", "certificate"),
		certRenewFailures: d("fulcrum_certificate_renewal_failures", "Consecutive failed renewals of the certificate.", "certificate"),
		authorityKeyLost:  d("fulcrum_authority_key_lost", "1 when the authority's key is gone from the keystore: its certificates keep serving, it issues and renews nothing.", "authority"),
		signs:             d("fulcrum_keystore_signs_total", "Signatures made with keystore keys (TLS handshakes, issuance).", "keystore"),
		signErrors:        d("fulcrum_keystore_sign_errors_total", "Failed keystore signatures (HSM outage, lost session).", "keystore"),
		signSeconds:       d("fulcrum_keystore_sign_seconds_total", "Time spent signing in the keystore.", "keystore"),
		rebuilds:          d("fulcrum_keystore_rebuilds_total", "PKCS#11 context rebuilds after a lost session or token.", "keystore"),
		dekHits:           d("fulcrum_keystore_data_key_cache_hits_total", "Software keystore: seals and unseals that reused a cached data key (data_key_cache_max_uses).", "keystore"),
		dekMisses:         d("fulcrum_keystore_data_key_cache_misses_total", "Software keystore with data-key caching: seals and unseals that needed a new or unwrapped data key.", "keystore"),
	}
}

func (c *runtimeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.targetHealthy, c.targetInFlight, c.targetFailures, c.active, c.accepted, c.rejected,
		c.bytesIn, c.bytesOut, c.handshakes, c.l4Errors, c.certExpiry, c.certExpiring, c.certRenewFailures, c.authorityKeyLost,
		c.signs, c.signErrors, c.signSeconds, c.rebuilds, c.dekHits, c.dekMisses} {
		ch <- d
	}
}

func (c *runtimeCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	counter := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, l...)
	}
	seen := map[[2]string]bool{}
	for _, t := range c.rt.Registry().Targets() {
		for _, g := range t.Groups {
			key := [2]string{g, t.Address}
			if seen[key] { // the same address under two health-check settings: report it once
				continue
			}
			seen[key] = true
			healthy := 0.0
			if t.Healthy && !t.Ejected {
				healthy = 1
			}
			gauge(c.targetHealthy, healthy, g, t.Address)
			gauge(c.targetInFlight, float64(t.InFlight), g, t.Address)
			counter(c.targetFailures, float64(t.Failures), g, t.Address)
		}
	}
	for _, s := range c.rt.Stats() {
		counter(c.rejected, float64(s.Rejected.MaxConnections), s.Name, "max_connections")
		counter(c.rejected, float64(s.Rejected.UntrustedProxy), s.Name, "untrusted_proxy")
		gauge(c.active, float64(s.Active), s.Name)
		counter(c.accepted, float64(s.Accepted), s.Name)
		switch s.Kind {
		case "http":
			counter(c.handshakes, float64(s.Handshakes-s.Resumed), s.Name, "ok", "false")
			counter(c.handshakes, float64(s.Resumed), s.Name, "ok", "true")
			counter(c.handshakes, float64(s.HandshakeErrors), s.Name, "failed", "false")
		case "l4":
			counter(c.bytesIn, float64(s.L4.BytesIn), s.Name)
			counter(c.bytesOut, float64(s.L4.BytesOut), s.Name)
			counter(c.l4Errors, float64(s.InboundErrors), s.Name, "proxy_header")
			counter(c.l4Errors, float64(s.HandshakeErrors+s.L4.HandshakeErrors), s.Name, "handshake")
			counter(c.l4Errors, float64(s.L4.DialErrors), s.Name, "dial")
			counter(c.l4Errors, float64(s.L4.IdleClosed), s.Name, "idle_timeout")
		}
	}
	now := time.Now()
	for _, ci := range c.rt.Certs().List() {
		if !ci.Pending { // an ACME order not yet fulfilled has no not-after
			gauge(c.certExpiry, ci.NotAfter.Sub(now).Seconds(), ci.Name)
			gauge(c.certExpiring, b2f(ci.Expiring), ci.Name)
		}
		gauge(c.certRenewFailures, float64(ci.RenewFailures), ci.Name)
	}
	for _, ac := range c.rt.Config().Authorities {
		if a := c.rt.Certs().Authority(ac.Name); a != nil {
			gauge(c.authorityKeyLost, b2f(a.KeyLost() != nil), ac.Name)
		}
	}
	ks := c.rt.Certs().Keystore()
	st, name := ks.Stats(), ks.Describe()
	counter(c.signs, float64(st.Signs.Load()), name)
	counter(c.signErrors, float64(st.SignErrors.Load()), name)
	counter(c.signSeconds, float64(st.SignNanos.Load())/1e9, name)
	counter(c.rebuilds, float64(st.Rebuilds.Load()), name)
	counter(c.dekHits, float64(st.DataKeyCacheHits.Load()), name)
	counter(c.dekMisses, float64(st.DataKeyCacheMisses.Load()), name)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// fleetCollector exports the fleet storage's operations and failures (etcd unreachable shows
// as a rising error count while the node keeps serving).
type fleetCollector struct {
	rt       *listener.Runtime
	ops, err *prometheus.Desc
}

func newFleetCollector(rt *listener.Runtime) *fleetCollector {
	return &fleetCollector{
		rt:  rt,
		ops: prometheus.NewDesc("fulcrum_fleet_storage_operations_total", "Fleet storage operations on etcd by operation.", []string{"op"}, nil),
		err: prometheus.NewDesc("fulcrum_fleet_storage_errors_total", "Failed fleet storage operations on etcd by operation (etcd unreachable, timeouts).", []string{"op"}, nil),
	}
}

func (c *fleetCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.ops; ch <- c.err }

func (c *fleetCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.rt.Certs().FleetStats()
	if st == nil {
		return
	}
	for op, name := range fleet.OpNames {
		n, e := st.Count(fleet.Op(op))
		ch <- prometheus.MustNewConstMetric(c.ops, prometheus.CounterValue, float64(n), name)
		ch <- prometheus.MustNewConstMetric(c.err, prometheus.CounterValue, float64(e), name)
	}
}
