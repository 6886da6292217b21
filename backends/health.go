package backends

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// hcSpec is a resolved active health check (defaults applied).
type hcSpec struct {
	enabled            bool
	protocol           string // http | https | tcp | tls
	path               string
	port               int
	interval, timeout  time.Duration
	healthy, unhealthy int
	cfg                *configs.HealthCheck  // for Matches
	grpc               []configs.StatusRange // grpc_code: a gRPC check when set
}

func (h hcSpec) String() string {
	if !h.enabled {
		return "disabled"
	}
	s := h.protocol
	if h.protocol == "http" || h.protocol == "https" {
		s += " " + h.path
	}
	if h.port != 0 {
		s += " port " + strconv.Itoa(h.port)
	}
	return s + " every " + h.interval.String()
}

// fingerprint is part of the target key: targets with different checks are different targets.
func (h hcSpec) fingerprint() string {
	if !h.enabled {
		return "off"
	}
	return fmt.Sprintf("%s|%s|%d|%s|%s|%d|%d|%v|%v", h.protocol, h.path, h.port, h.interval, h.timeout,
		h.healthy, h.unhealthy, h.cfg.MatcherRanges(), h.grpc)
}

// resolveHC is a group's validated health check (configs has applied every default, the
// group's protocol included).
func resolveHC(g *configs.TargetGroup) hcSpec {
	hc := g.HealthCheck
	if hc == nil || hc.Disabled {
		return hcSpec{}
	}
	return hcSpec{
		enabled: true, protocol: hc.Protocol, path: hc.Path, port: hc.Port,
		interval: hc.IntervalDuration(), timeout: hc.TimeoutDuration(),
		healthy: hc.HealthyThreshold, unhealthy: hc.UnhealthyThreshold,
		cfg: hc, grpc: hc.GRPCRanges(),
	}
}

func (h *hcSpec) matches(code int) bool { return h.cfg.Matches(code) }

// startChecker launches the target's checker goroutine (caller holds reg.mu).
func (t *Target) startChecker() {
	if !t.spec.hc.enabled {
		return
	}
	ctx, cancel := context.WithCancel(t.reg.ctx)
	t.cancel = cancel
	t.done = make(chan struct{})
	t.reg.wg.Add(1)
	go t.checkLoop(ctx, t.done)
}

// stopChecker stops the checker and waits for it (caller must not hold reg.mu).
func (t *Target) stopChecker() {
	t.reg.mu.Lock()
	cancel, done := t.cancel, t.done
	t.reg.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	<-done
}

func (t *Target) checkLoop(ctx context.Context, done chan struct{}) {
	defer t.reg.wg.Done()
	defer close(done)
	hc := &t.spec.hc
	var okRun, failRun int
	tick := time.NewTicker(hc.interval)
	defer tick.Stop()
	for {
		err := t.safeCheck(ctx)
		if ctx.Err() != nil {
			return
		}
		t.record(err, &okRun, &failRun)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// safeCheck runs one check and turns a panic into a failed check: a checker must never take the
// process down.
func (t *Target) safeCheck(ctx context.Context) (err error) {
	defer func() {
		if p := recover(); p != nil {
			t.reg.log.Error("health check panicked", "target", t.spec.address, "panic", p)
			err = fmt.Errorf("health check panicked: %v", p)
		}
	}()
	cctx, cancel := context.WithTimeout(ctx, t.spec.hc.timeout)
	defer cancel()
	return t.check(cctx)
}

// record applies one check's result. The verdict (decided) is published last, after the health
// it reports: a reader that sees a decided target must also see the state that decided it.
func (t *Target) record(err error, okRun, failRun *int) {
	hc := &t.spec.hc
	if err == nil {
		*okRun++
		*failRun = 0
		if *okRun < hc.healthy {
			return
		}
		if !t.activeUp.Load() {
			t.upSince.Store(t.reg.now())
			t.activeUp.Store(true)
			t.reg.bump()
			t.reg.log.Info("target healthy", "target", t.spec.address, "protocol", t.spec.protocol)
		}
		t.decided.Store(true)
		return
	}
	*failRun++
	*okRun = 0
	t.setReason(err.Error())
	if *failRun < hc.unhealthy {
		return
	}
	if t.activeUp.Load() {
		t.activeUp.Store(false)
		t.reg.bump()
		t.reg.log.Warn("target unhealthy", "target", t.spec.address, "protocol", t.spec.protocol,
			"reason", err.Error())
	}
	t.decided.Store(true)
}

// checkAddr is the address checks go to (health_check.port overrides the target's port).
func (t *Target) checkAddr() string {
	if t.spec.hc.port == 0 {
		return t.spec.address
	}
	host, _, err := net.SplitHostPort(t.spec.address)
	if err != nil {
		host = t.spec.address
	}
	return net.JoinHostPort(host, strconv.Itoa(t.spec.hc.port))
}

func (t *Target) check(ctx context.Context) error {
	hc := &t.spec.hc
	addr := t.checkAddr()
	var d net.Dialer
	switch hc.protocol {
	case "tcp":
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("tcp check: %w", err)
		}
		return c.Close()
	case "tls":
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("tls check: %w", err)
		}
		defer c.Close()
		tc := tls.Client(c, t.checkTLS(addr))
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("tls check: handshake: %w", err)
		}
		return nil
	default: // http, https
		if len(hc.grpc) > 0 {
			return t.checkGRPC(ctx, addr)
		}
		tr := &http.Transport{
			DialContext:       d.DialContext,
			DisableKeepAlives: true, // a check must prove a fresh connection works
			Proxy:             nil,
		}
		if hc.protocol == "https" {
			tr.TLSClientConfig = t.checkTLS(addr)
		}
		defer tr.CloseIdleConnections()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, hc.protocol+"://"+addr+hc.path, nil)
		if err != nil {
			return fmt.Errorf("%s check: %w", hc.protocol, err)
		}
		req.Header.Set("User-Agent", "Fulcrum-HealthChecker/1.0")
		resp, err := tr.RoundTrip(req)
		if err != nil {
			return fmt.Errorf("%s check: %w", hc.protocol, err)
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if !hc.matches(resp.StatusCode) {
			return fmt.Errorf("%s check: status %d does not match", hc.protocol, resp.StatusCode)
		}
		return nil
	}
}

// checkTLS is the client TLS for a check: the latest generation's group config, or (for a check
// protocol the group does not use TLS for) unverified TLS, as ALB's https checks do not verify.
func (t *Target) checkTLS(addr string) *tls.Config {
	c := t.tlsConf.Load()
	if c == nil {
		return &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec // ALB https checks do not verify
	}
	c = c.Clone()
	if c.ServerName == "" {
		host, _, _ := net.SplitHostPort(addr)
		c.ServerName = host
	}
	return c
}

// grpcCheckBody is an empty message in gRPC's length-prefixed framing: an empty
// grpc.health.v1.HealthCheckRequest asks about the whole server.
var grpcCheckBody = []byte{0, 0, 0, 0, 0}

// checkGRPC calls the check path over HTTP/2 (h2c for http checks, h2 for https) and matches the
// grpc-status against grpc_code, as ALB does. For the standard health service the answer must
// also say SERVING: that service answers NOT_SERVING with status OK.
func (t *Target) checkGRPC(ctx context.Context, addr string) error {
	hc := &t.spec.hc
	var d net.Dialer
	tr := &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true, Proxy: nil}
	var p http.Protocols
	scheme := "http"
	if hc.protocol == "https" {
		scheme = "https"
		tr.TLSClientConfig = t.checkTLS(addr)
		tr.ForceAttemptHTTP2 = true
		p.SetHTTP2(true)
	} else {
		p.SetUnencryptedHTTP2(true)
	}
	tr.Protocols = &p
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, scheme+"://"+addr+hc.path, bytes.NewReader(grpcCheckBody))
	if err != nil {
		return fmt.Errorf("grpc check: %w", err)
	}
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	req.Header.Set("User-Agent", "Fulcrum-HealthChecker/1.0")
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return fmt.Errorf("grpc check: %w", err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("grpc check: HTTP status %d", resp.StatusCode)
	}
	gs := resp.Trailer.Get("Grpc-Status")
	if gs == "" {
		gs = resp.Header.Get("Grpc-Status") // a trailers-only answer
	}
	code, err := strconv.Atoi(gs)
	if err != nil {
		return fmt.Errorf("grpc check: no grpc-status in the answer")
	}
	ok := false
	for _, r := range hc.grpc {
		ok = ok || code >= r.Lo && code <= r.Hi
	}
	if !ok {
		return fmt.Errorf("grpc check: grpc-status %d does not match", code)
	}
	if code == 0 && hc.path == configs.DefaultHCGRPCPath && grpcServing(body) != 1 {
		return fmt.Errorf("grpc check: health service answered %d, not SERVING", grpcServing(body))
	}
	return nil
}

// grpcServing reads the status field of a length-prefixed grpc.health.v1.HealthCheckResponse
// (field 1, varint); 0 (UNKNOWN) when absent or malformed.
func grpcServing(b []byte) int {
	if len(b) < 7 || b[5] != 0x08 { // field 1, varint; the enum's values fit in one byte
		return 0
	}
	return int(b[6] & 0x7f)
}
