package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/certs"
	"golang.org/x/sys/unix"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener"
	"github.com/fulcrum-lb/fulcrum/listener/observe"
)

const runHelp = `Starts every listener of FILE and the admin endpoint, then serves until SIGTERM or SIGINT,
which stop accepting and drain open connections for up to server.shutdown_timeout.
SIGHUP reloads FILE (a bad file changes nothing and is logged); SIGUSR1 reopens the access log.
SIGUSR2 upgrades the binary: the binary now on disk is started with the same arguments, takes
over the listening sockets (no connection is refused) and, once it serves, this process stops
accepting, drains for up to server.shutdown_timeout and exits. If the new process cannot start,
this one keeps serving and logs why.
`

func cmdRun(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("run", "fulcrum [run] [-config] FILE", runHelp,
		"fulcrum run /etc/fulcrum/fulcrum.toml",
		"fulcrum -config configs/quickstart.toml",
		"kill -HUP $(pidof fulcrum)    # reload the file; a bad file changes nothing",
		"kill -USR2 <pid>              # binary upgrade (systemd: systemctl kill -s USR2 --kill-whom=main fulcrum)")
	path, cfg, code := loadOnlyConfig(fs, args, stdout, stderr)
	if cfg == nil {
		return code
	}
	log := newLogger(stderr, cfg.Server.LogLevel, cfg.Server.LogFormat)
	notify := newNotifier()
	sdNotify := func(lines ...string) {
		if err := notify.send(lines...); err != nil {
			log.Warn("systemd notification failed", "err", err)
		}
	}

	// Started by a binary upgrade: take the predecessor's sockets before anything binds.
	inh, err := receiveHandover()
	if err != nil {
		log.Error("start failed", "err", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := startDaemon(ctx, path, cfg, log, inh)
	inh.closeRest() // the sockets of listeners this configuration no longer has
	if err != nil {
		if inh != nil {
			// The predecessor keeps serving; systemd was told nothing.
			inh.fail(err)
		} else {
			sdNotify("STATUS=start failed: " + firstLine(err))
		}
		log.Error("start failed", "err", err)
		return 1
	}
	d.notify = sdNotify
	if inh != nil {
		log.Info("fulcrum started by a binary upgrade", "version", versionString(), "config", path, "listeners", d.rt.Addrs(), "predecessor", inh.parent)
	} else {
		log.Info("fulcrum started", "version", versionString(), "config", path, "listeners", d.rt.Addrs())
	}
	// startDaemon returns once every listener is bound and serving and the admin endpoint is up.
	// After a binary upgrade MAINPID= makes this process systemd's main process (NotifyAccess=all)
	// before the predecessor, told next, stops and exits.
	sdNotify("READY=1", "STATUS="+d.status(), fmt.Sprintf("MAINPID=%d", os.Getpid()))
	if inh != nil {
		if err := inh.ready(); err != nil {
			log.Warn("binary upgrade", "err", err)
		}
	}
	wctx, wstop := context.WithCancel(context.Background())
	defer wstop()
	go notify.runWatchdog(wctx, func(err error) { log.Warn("systemd watchdog", "err", err) })

	hup := make(chan os.Signal, 1)
	usr1 := make(chan os.Signal, 1)
	usr2 := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	signal.Notify(usr1, syscall.SIGUSR1)
	signal.Notify(usr2, syscall.SIGUSR2)
	defer signal.Stop(hup)
	defer signal.Stop(usr1)
	defer signal.Stop(usr2)
	for {
		select {
		case <-hup:
			d.reload("SIGHUP")
		case <-usr1:
			d.reopenLogs()
		case <-usr2:
			log.Info("binary upgrade: starting the binary on disk")
			pid, err := d.upgrade()
			if err != nil {
				log.Error("binary upgrade failed; this process keeps serving", "err", err)
				sdNotify("STATUS=binary upgrade failed, previous process serving: " + firstLine(err) + "; " + d.status())
				continue
			}
			// The new process is systemd's main process now: this one sends nothing more
			// (STOPPING=1 would read as the service stopping), and its watchdog stops.
			wstop()
			d.notify = nil
			if d.admin != nil {
				// First, so admin requests and scrapes go to the new process only.
				d.admin.Close()
				d.admin = nil
			}
			budget := d.rt.Config().Server.ShutdownTimeoutDuration()
			log.Info("binary upgrade: the new process serves; draining this one", "new_pid", pid, "budget", budget)
			sctx, cancel := context.WithTimeout(context.Background(), budget)
			err = d.shutdown(sctx)
			cancel()
			if err != nil {
				log.Warn("drain budget exhausted; closed what was left", "err", err)
			}
			log.Info("stopped after the binary upgrade", "new_pid", pid)
			return 0
		case <-ctx.Done():
			budget := d.rt.Config().Server.ShutdownTimeoutDuration()
			sdNotify("STOPPING=1", fmt.Sprintf("STATUS=draining for up to %s", budget))
			log.Info("draining", "budget", budget)
			sctx, cancel := context.WithTimeout(context.Background(), budget)
			err := d.shutdown(sctx)
			cancel()
			if err != nil {
				log.Warn("drain budget exhausted; closed what was left", "err", err)
			}
			log.Info("stopped")
			return 0
		}
	}
}

// newLogger makes the process log: text (key=value) or JSON lines, "auto" choosing text when w
// is a terminal. Durations are written as seconds (a float), not Go's nanosecond integers.
func newLogger(w io.Writer, level, format string) *slog.Logger {
	var l slog.Level
	switch strings.ToLower(level) {
	case "debug":
		l = slog.LevelDebug
	case "warn":
		l = slog.LevelWarn
	case "error":
		l = slog.LevelError
	default:
		l = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: l, ReplaceAttr: secondsAttr}
	if format == "text" || (format != "json" && isTerminal(w)) {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// secondsAttr writes a time.Duration as seconds under the same key.
func secondsAttr(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		return slog.Float64(a.Key, a.Value.Duration().Seconds())
	}
	return a
}

// isTerminal says whether w is a character device with a terminal line discipline.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// daemon is the running process: the runtime, the admin server and the observers.
type daemon struct {
	path  string
	log   *slog.Logger
	rt    *listener.Runtime
	obs   *observe.Observer
	admin *adminServer

	// notify tells systemd about state changes (no-op outside systemd; nil in tests that start
	// a daemon without cmdRun).
	notify func(lines ...string)

	auth     *adminAuth
	audit    *auditLog
	tlsAdmin *tls.Config // nil: the admin endpoint speaks plain HTTP

	reloadMu   sync.Mutex
	lastReload atomic.Pointer[reloadResult] // for GET /admin/reload/last
}

// inh is what a predecessor handed over on a binary upgrade (nil otherwise): listeners and the
// admin endpoint serve on its sockets where the addresses match.
func startDaemon(ctx context.Context, path string, cfg *configs.Config, log *slog.Logger, inh *inheritance) (*daemon, error) {
	obs, err := observe.New(cfg, log)
	if err != nil {
		return nil, err
	}
	cm, err := certs.NewManager(ctx, cfg, log)
	if err != nil {
		obs.Close()
		return nil, fmt.Errorf("certificate manager: %w", err)
	}
	// Sticky-cookie keys outlive the process: a fleet's one key for every node, or this node's
	// keys, sealed in the keystore and rotated with an overlap. (A fleet node that has not heard
	// from etcd yet keeps a random key until its restart, as before.)
	var regOpts []backends.Option
	if k := cm.StickyKey(); k != nil {
		regOpts = append(regOpts, backends.WithStickyKey(k))
	} else if sign, _ := cm.StickyKeys(); sign != nil {
		regOpts = append(regOpts, backends.WithStickyKeys(cm))
	}
	reg := backends.NewRegistry(log, regOpts...)
	opts := listener.Options{Log: log, Certs: cm, Registry: reg, Inherited: inh.listeners(cfg)}
	if cfg.Server.Admin != "" || cfg.Server.AccessLog != "" {
		// Nobody can read metrics without the admin endpoint, so with neither it nor an access
		// log the request path skips observation altogether (the "off" of fulcrum-bench).
		opts.Observer = obs
	}
	rt, err := listener.Start(ctx, cfg, opts)
	if err != nil {
		reg.Close()
		cm.Close()
		obs.Close()
		return nil, err
	}
	d := &daemon{path: path, log: log, rt: rt, obs: obs}
	obs.Attach(rt)
	if err := d.startAdminAuth(cfg); err != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		rt.Shutdown(sctx)
		obs.Close()
		d.audit.Close()
		return nil, err
	}
	if cfg.Server.Admin != "" {
		if d.admin, err = startAdmin(cfg.Server.Admin, cfg.Server.AdminAllowPublic, d, inh.claim("admin", cfg.Server.Admin)); err != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			rt.Shutdown(sctx)
			reg.Close()
			cm.Close()
			obs.Close()
			d.audit.Close()
			return nil, err
		}
	}
	return d, nil
}

// startAdminAuth opens the audit log (key events are audited even without an admin endpoint),
// reads the admin credentials and, with admin_tls_certificate, builds the endpoint's TLS.
func (d *daemon) startAdminAuth(cfg *configs.Config) error {
	var err error
	if d.audit, err = openAudit(cfg.Resolve(cfg.Server.AuditLog)); err != nil {
		return err
	}
	if m := d.managed(); m != nil {
		m.SetAudit(d.audit.keyEvent)
	}
	if d.auth, err = newAdminAuth(cfg); err != nil {
		return err
	}
	if cfg.Server.Admin == "" {
		return nil
	}
	if name := cfg.Server.AdminTLSCertificate; name != "" {
		tc, err := d.rt.Certs().ServerTLS(&configs.Listener{Name: "admin", Certificates: []string{name}})
		if err != nil {
			return fmt.Errorf("admin_tls_certificate: %w", err)
		}
		d.tlsAdmin = d.auth.tlsConfig(tc)
	}
	switch {
	case d.auth.none:
		d.log.Warn("admin endpoint without authentication (admin_auth = \"none\"): every local process may reload and administer keys", "admin", cfg.Server.Admin)
	case d.auth.open():
		d.log.Warn("admin endpoint has no credentials: only /healthz and /readyz answer. Configure [[server.admin_tokens]] (or admin_client_ca with [[server.admin_clients]]), or set admin_auth = \"none\" to keep an unauthenticated loopback endpoint", "admin", cfg.Server.Admin)
	}
	return nil
}

// reload loads the file again and applies it; a bad file changes nothing. Reloads are
// serialized (SIGHUP and the admin API may race) so the metrics bound match the generation served.
func (d *daemon) reload(trigger string) reloadResult {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	t0 := time.Now()
	res := reloadResult{Trigger: trigger, At: t0.UTC(), File: d.path}
	defer func() { d.lastReload.Store(&res) }()
	if trigger == "SIGHUP" { // admin API reloads are audited with their caller by the guard
		defer func() {
			l := auditLine{Identity: "signal:SIGHUP", Role: "system", Action: "reload", Object: d.path, Result: "ok"}
			if !res.OK {
				l.Result, l.Error = "error", strings.Join(res.Errors, "; ")
			}
			d.audit.write(l)
		}()
	}
	if d.notify != nil {
		d.notify("RELOADING=1", "MONOTONIC_USEC="+monotonicUsec(), "STATUS=reloading ("+trigger+")")
		defer func() {
			st := d.status()
			if !res.OK {
				st = "reload refused, previous configuration serving: " + strings.Join(res.Errors, "; ") + "; " + st
			}
			d.notify("READY=1", "STATUS="+st)
		}()
	}
	cfg, err := configs.LoadFile(d.path)
	if err == nil {
		old := d.rt.Config()
		d.obs.Bind(cfg) // before the swap, so the new generation's first requests are counted
		var ch *listener.Changes
		if ch, err = d.rt.Reload(context.Background(), cfg); err != nil {
			d.obs.Bind(old)
		} else {
			res.OK = true
			res.Changes = diffConfigs(old, cfg)
			res.Runtime = &runtimeDiff{Added: nonNil(ch.Added), Removed: nonNil(ch.Removed), Updated: nonNil(ch.Updated)}
		}
	}
	res.Took = time.Since(t0).Round(time.Microsecond).String()
	d.obs.Reloaded(res.OK)
	if res.OK {
		d.log.Info("reloaded", "trigger", trigger, "took", time.Since(t0), "changes", res.Changes.summary())
		if len(res.Changes.RestartRequired) > 0 {
			d.log.Warn("reloaded, but these settings take effect only after a restart", "settings", res.Changes.RestartRequired)
		}
		return res
	}
	for _, line := range strings.Split(err.Error(), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			res.Errors = append(res.Errors, line)
		}
	}
	d.log.Error("reload refused; the running configuration keeps serving", "trigger", trigger,
		"err", strings.Join(res.Errors, "; "))
	return res
}

// status is the one-line STATUS= systemd shows in `systemctl status`.
func (d *daemon) status() string {
	cfg := d.rt.Config()
	addrs := make([]string, 0, len(cfg.Listeners))
	for name, a := range d.rt.Addrs() {
		addrs = append(addrs, name+"="+a)
	}
	sort.Strings(addrs)
	return fmt.Sprintf("serving %d listeners (%s), %d target groups", len(addrs), strings.Join(addrs, " "), len(cfg.TargetGroups))
}

func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (d *daemon) reopenLogs() {
	if err := d.obs.Reopen(); err != nil {
		d.log.Error("reopen access log", "err", err)
		return
	}
	d.log.Info("access log reopened")
}

func (d *daemon) shutdown(ctx context.Context) error {
	err := d.rt.Shutdown(ctx)
	d.rt.Registry().Close()
	d.rt.Certs().Close()
	if d.admin != nil {
		d.admin.Close()
	}
	d.obs.Close()
	d.audit.Close()
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}
