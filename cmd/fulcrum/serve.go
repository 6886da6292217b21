package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener"
)

func cmdRun(args []string, stdout, stderr io.Writer) int {
	_, path, ok := configFlag("run", args, stderr, nil)
	if !ok {
		return 2
	}
	cfg, err := configs.LoadFile(path)
	if err != nil {
		printConfigError(stderr, err)
		return 1
	}
	log := newLogger(stderr, cfg.Server.LogLevel)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := startDaemon(ctx, path, cfg, log)
	if err != nil {
		log.Error("start failed", "err", err)
		return 1
	}
	log.Info("fulcrum started", "version", versionString(), "config", path, "listeners", d.rt.Addrs())

	hup := make(chan os.Signal, 1)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(hup)
	defer signal.Stop(usr1)
	for {
		select {
		case <-hup:
			d.reload("SIGHUP")
		case <-usr1:
			d.reopenLogs()
		case <-ctx.Done():
			budget := d.rt.Config().Server.ShutdownTimeoutDuration()
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

func newLogger(w io.Writer, level string) *slog.Logger {
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
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l}))
}

// daemon is the running process: the runtime, the admin server and the observers.
type daemon struct {
	path  string
	log   *slog.Logger
	rt    *listener.Runtime
	obs   *observer
	admin *adminServer
}

func startDaemon(ctx context.Context, path string, cfg *configs.Config, log *slog.Logger) (*daemon, error) {
	obs, err := newObserver(cfg, log)
	if err != nil {
		return nil, err
	}
	rt, err := listener.Start(ctx, cfg, listener.Options{Log: log, Observer: obs})
	if err != nil {
		obs.Close()
		return nil, err
	}
	d := &daemon{path: path, log: log, rt: rt, obs: obs}
	obs.attach(rt)
	if cfg.Server.Admin != "" {
		if d.admin, err = startAdmin(cfg.Server.Admin, d); err != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			rt.Shutdown(sctx)
			obs.Close()
			return nil, err
		}
	}
	return d, nil
}

// reload loads the file again and applies it; a bad file changes nothing.
func (d *daemon) reload(trigger string) (*listener.Changes, error) {
	t0 := time.Now()
	cfg, err := configs.LoadFile(d.path)
	if err == nil {
		var ch *listener.Changes
		old := d.rt.Config()
		d.obs.bind(cfg) // before the swap, so the new generation's first requests are counted
		ch, err = d.rt.Reload(context.Background(), cfg)
		if err != nil {
			d.obs.bind(old)
		}
		if err == nil {
			d.obs.reloaded(true)
			d.log.Info("reloaded", "trigger", trigger, "took", time.Since(t0), "added", ch.Added, "removed", ch.Removed, "updated", ch.Updated)
			return ch, nil
		}
	}
	d.obs.reloaded(false)
	d.log.Error("reload refused; the running configuration keeps serving", "trigger", trigger,
		"err", strings.ReplaceAll(err.Error(), "\n", "; "))
	return nil, err
}

func (d *daemon) reopenLogs() {
	if err := d.obs.reopen(); err != nil {
		d.log.Error("reopen access log", "err", err)
		return
	}
	d.log.Info("access log reopened")
}

func (d *daemon) shutdown(ctx context.Context) error {
	err := d.rt.Shutdown(ctx)
	if d.admin != nil {
		d.admin.Close()
	}
	d.obs.Close()
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}
