package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// observer turns finished requests into Prometheus metrics and JSON access-log lines. Its request
// path takes no lock: metrics are pre-bound per listener and group when a configuration is
// applied, and log lines go to a bounded queue that drops (and counts) rather than blocks.
type observer struct {
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

func newObserver(cfg *configs.Config, log *slog.Logger) (*observer, error) {
	o := &observer{log: log, reg: prometheus.NewRegistry()}
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
	if o.access, err = openAccessLog(cfg.Server.AccessLog, o.logDropped); err != nil {
		return nil, err
	}
	o.bind(cfg)
	return o, nil
}

// attach registers the collectors that read the runtime (targets, certificates, connections).
func (o *observer) attach(rt *listener.Runtime) {
	o.reg.MustRegister(newRuntimeCollector(rt))
}

// bind pre-binds every series a configuration's requests can touch.
func (o *observer) bind(cfg *configs.Config) {
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

func (o *observer) Request(rec *listener.RequestRecord) {
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

func (o *observer) Desync(l string, tier desync.Tier, reason desync.Reason) {
	// Non-compliant requests are rare; the label lookup is fine here.
	o.desyncs.WithLabelValues(l, tier.String(), reason.String()).Inc()
}

func (o *observer) reloaded(ok bool) {
	if ok {
		o.reloads.WithLabelValues("success").Inc()
	} else {
		o.reloads.WithLabelValues("failure").Inc()
	}
}

func (o *observer) reopen() error {
	if o.access == nil {
		return nil
	}
	return o.access.reopen()
}

func (o *observer) Close() {
	if o.access != nil {
		o.access.close()
	}
}

// accessLog writes JSON lines from a bounded queue on its own goroutine.
type accessLog struct {
	path    string // "" for stdout/stderr
	w       io.Writer
	f       *os.File
	mu      sync.Mutex // guards w and f between the writer goroutine and reopen
	queue   chan accessEntry
	dropped prometheus.Counter
	cancel  context.CancelFunc
	done    chan struct{}
}

// accessEntry is the access-log line: the fields of an ALB access log.
type accessEntry struct {
	Time                  string  `json:"time"`
	Listener              string  `json:"listener"`
	Client                string  `json:"client"`
	Target                string  `json:"target"`
	TargetGroup           string  `json:"target_group"`
	RequestProcessingTime float64 `json:"request_processing_time"`
	TargetProcessingTime  float64 `json:"target_processing_time"`
	ResponseTime          float64 `json:"response_time"`
	Status                int     `json:"elb_status_code"`
	ReceivedBytes         int64   `json:"received_bytes"`
	SentBytes             int64   `json:"sent_bytes"`
	Request               string  `json:"request"`
	UserAgent             string  `json:"user_agent"`
	SSLProtocol           string  `json:"ssl_protocol"`
	SSLCipher             string  `json:"ssl_cipher"`
	SNI                   string  `json:"sni"`
	RulePriority          int     `json:"matched_rule_priority"`
	TraceID               string  `json:"trace_id"`
	ErrorReason           string  `json:"error_reason"`
}

func openAccessLog(dest string, dropped prometheus.Counter) (*accessLog, error) {
	a := &accessLog{queue: make(chan accessEntry, 8192), dropped: dropped, done: make(chan struct{})}
	switch dest {
	case "":
		return nil, nil
	case "stdout":
		a.w = os.Stdout
	case "stderr":
		a.w = os.Stderr
	default:
		a.path = dest
		if err := a.reopen(); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	go a.run(ctx)
	return a, nil
}

func (a *accessLog) write(rec *listener.RequestRecord) {
	e := accessEntry{
		Time:                  rec.Time.UTC().Format(time.RFC3339Nano),
		Listener:              rec.Listener,
		Client:                rec.Client.String(),
		Target:                rec.Target,
		TargetGroup:           rec.Group,
		RequestProcessingTime: 0,
		TargetProcessingTime:  rec.TargetDuration.Seconds(),
		ResponseTime:          rec.Duration.Seconds(),
		Status:                rec.Status,
		ReceivedBytes:         max(rec.BytesIn, 0),
		SentBytes:             rec.BytesOut,
		Request:               rec.Method + " " + rec.URI + " " + rec.Proto,
		UserAgent:             rec.UserAgent,
		SNI:                   rec.SNI,
		RulePriority:          rec.RulePriority,
		TraceID:               rec.RequestID,
		ErrorReason:           rec.Reason,
	}
	if rec.TLSVersion != 0 {
		e.SSLProtocol = tls.VersionName(rec.TLSVersion)
		e.SSLCipher = tls.CipherSuiteName(rec.Cipher)
	}
	select {
	case a.queue <- e:
	default:
		a.dropped.Inc()
	}
}

func (a *accessLog) run(ctx context.Context) {
	defer close(a.done)
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintln(os.Stderr, "access log writer stopped:", r)
		}
	}()
	var bw *bufio.Writer
	var cur io.Writer // what bw writes to; a file replaced by reopen is closed once flushed
	flush := time.NewTicker(200 * time.Millisecond)
	defer flush.Stop()
	write := func(e accessEntry) {
		a.mu.Lock()
		if cur != a.w || bw == nil {
			if bw != nil {
				bw.Flush()
				if f, ok := cur.(*os.File); ok && f != a.f && f != os.Stdout && f != os.Stderr {
					f.Close()
				}
			}
			cur = a.w
			bw = bufio.NewWriterSize(cur, 64<<10)
		}
		b, _ := json.Marshal(e)
		bw.Write(b)
		bw.WriteByte('\n')
		a.mu.Unlock()
	}
	for {
		select {
		case e := <-a.queue:
			write(e)
		case <-flush.C:
			a.mu.Lock()
			if bw != nil {
				bw.Flush()
			}
			a.mu.Unlock()
		case <-ctx.Done():
			for {
				select {
				case e := <-a.queue:
					write(e)
				default:
					a.mu.Lock()
					if bw != nil {
						bw.Flush()
					}
					a.mu.Unlock()
					return
				}
			}
		}
	}
}

// reopen opens the file again (logrotate moved it away and sends SIGUSR1).
func (a *accessLog) reopen() error {
	if a.path == "" {
		return nil
	}
	f, err := os.OpenFile(a.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open access log %s: %w", a.path, err)
	}
	a.mu.Lock()
	a.f, a.w = f, f // the writer flushes and closes the old file when it switches
	a.mu.Unlock()
	return nil
}

func (a *accessLog) close() {
	a.cancel()
	<-a.done
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.f != nil {
		a.f.Close()
	}
}
