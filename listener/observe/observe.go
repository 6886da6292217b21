// Package observe turns what the listeners report (finished requests and layer-4 connections,
// desync classifications) into Prometheus metrics and JSON access-log lines, and reads the
// runtime's long-lived state at scrape time. cmd creates one Observer and hands it to the
// runtime as its observer; the request path takes no lock here.
package observe

import (
	"log/slog"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// Observer turns finished requests into Prometheus metrics and JSON access-log lines. Its request
// path takes no lock: metrics are pre-bound per listener and group when a configuration is
// applied, and log lines go to a bounded queue that drops (and counts) rather than blocks.
type Observer struct {
	log *slog.Logger
	reg *prometheus.Registry

	requests      *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	targetLatency *prometheus.HistogramVec
	bytesIn       *prometheus.CounterVec
	bytesOut      *prometheus.CounterVec
	desyncs       *prometheus.CounterVec
	reloads       *prometheus.CounterVec
	logDropped    prometheus.Counter

	bound atomic.Pointer[map[string]*listenerMetrics]

	access *accessLog
}

// listenerMetrics are one listener's pre-bound series.
type listenerMetrics struct {
	duration prometheus.Observer
	bytesIn  prometheus.Counter
	bytesOut prometheus.Counter
	groups   map[string]*[6]prometheus.Counter // requests by group and status class (index 0: no status)
	target   map[string]prometheus.Observer
}

// New builds the metrics and opens the configured access log.
func New(cfg *configs.Config, log *slog.Logger) (*Observer, error) {
	o := &Observer{log: log, reg: prometheus.NewRegistry()}
	o.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fulcrum_http_requests_total", Help: "HTTP requests answered, by listener, target group and status class.",
	}, []string{"listener", "target_group", "code"})
	o.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "fulcrum_http_request_duration_seconds", Help: "Time from request to last response byte.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	}, []string{"listener"})
	o.targetLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "fulcrum_target_response_seconds", Help: "Time from forwarding to the target's response headers.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	}, []string{"listener", "target_group"})
	o.bytesIn = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fulcrum_http_request_bytes_total", Help: "Request body bytes received.",
	}, []string{"listener"})
	o.bytesOut = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fulcrum_http_response_bytes_total", Help: "Response body bytes sent.",
	}, []string{"listener"})
	o.desyncs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fulcrum_desync_classifications_total", Help: "HTTP/1 requests that were not compliant, by tier and reason.",
	}, []string{"listener", "tier", "reason"})
	o.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fulcrum_config_reloads_total", Help: "Configuration reloads by result.",
	}, []string{"result"})
	o.logDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fulcrum_access_log_dropped_total", Help: "Access-log lines dropped because the writer fell behind.",
	})
	o.reg.MustRegister(o.requests, o.duration, o.targetLatency, o.bytesIn, o.bytesOut, o.desyncs,
		o.reloads, o.logDropped, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var err error
	if o.access, err = openAccessLog(cfg, o.logDropped); err != nil {
		return nil, err
	}
	o.Bind(cfg)
	return o, nil
}

// Attach registers the collectors that read the runtime (targets, certificates, connections).
func (o *Observer) Attach(rt *listener.Runtime) {
	o.reg.MustRegister(newRuntimeCollector(rt), newFleetCollector(rt))
}

// Bind pre-binds every series a configuration's requests can touch. Call it before a new
// generation serves, so that its first requests are counted.
func (o *Observer) Bind(cfg *configs.Config) {
	m := make(map[string]*listenerMetrics, len(cfg.Listeners))
	classes := [6]string{"none", "1xx", "2xx", "3xx", "4xx", "5xx"}
	for i := range cfg.Listeners {
		l := &cfg.Listeners[i]
		lm := &listenerMetrics{
			duration: o.duration.WithLabelValues(l.Name),
			bytesIn:  o.bytesIn.WithLabelValues(l.Name),
			bytesOut: o.bytesOut.WithLabelValues(l.Name),
			groups:   map[string]*[6]prometheus.Counter{},
			target:   map[string]prometheus.Observer{},
		}
		for _, g := range append(cfg.TargetGroups, configs.TargetGroup{}) { // "" = no group (fixed, redirect, rejected)
			var cs [6]prometheus.Counter
			for c, class := range classes {
				cs[c] = o.requests.WithLabelValues(l.Name, g.Name, class)
			}
			lm.groups[g.Name] = &cs
			lm.target[g.Name] = o.targetLatency.WithLabelValues(l.Name, g.Name)
		}
		m[l.Name] = lm
	}
	o.bound.Store(&m)
}

// Request records a finished request (listener.Observer).
func (o *Observer) Request(rec *listener.RequestRecord) {
	if lm := (*o.bound.Load())[rec.Listener]; lm != nil {
		lm.duration.Observe(rec.Duration.Seconds())
		if rec.BytesIn > 0 {
			lm.bytesIn.Add(float64(rec.BytesIn))
		}
		lm.bytesOut.Add(float64(rec.BytesOut))
		if cs := lm.groups[rec.Group]; cs != nil {
			class := rec.Status / 100
			if class < 1 || class > 5 {
				class = 0
			}
			cs[class].Inc()
		}
		if rec.Target != "" {
			if t := lm.target[rec.Group]; t != nil {
				t.Observe(rec.TargetDuration.Seconds())
			}
		}
	}
	if o.access != nil {
		o.access.write(rec)
	}
}

// Connection logs a finished layer-4 connection (listener.ConnObserver).
func (o *Observer) Connection(rec *listener.ConnRecord) {
	if o.access != nil {
		o.access.writeConn(rec)
	}
}

// Desync counts a non-compliant HTTP/1 request (listener.Observer).
func (o *Observer) Desync(l string, tier desync.Tier, reason desync.Reason) {
	// Non-compliant requests are rare; the label lookup is fine here.
	o.desyncs.WithLabelValues(l, tier.String(), reason.String()).Inc()
}

// Reloaded counts a configuration reload by result.
func (o *Observer) Reloaded(ok bool) {
	if ok {
		o.reloads.WithLabelValues("success").Inc()
	} else {
		o.reloads.WithLabelValues("failure").Inc()
	}
}

// Reopen opens the access-log file again (logrotate moved it away; SIGUSR1).
func (o *Observer) Reopen() error {
	if o.access == nil {
		return nil
	}
	return o.access.reopen()
}

// Close stops the access-log writer once it has written what is queued.
func (o *Observer) Close() {
	if o.access != nil {
		o.access.close()
	}
}

// Registry is what GET /metrics serves.
func (o *Observer) Registry() *prometheus.Registry { return o.reg }
