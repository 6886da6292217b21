package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// notifier speaks systemd's sd_notify protocol (Type=notify services): datagrams of
// "KEY=VALUE\n" lines to the unix socket in $NOTIFY_SOCKET. It is a no-op when that variable is
// unset, so fulcrum behaves the same outside systemd. Implemented here (a dozen lines over a
// unixgram socket) rather than with a systemd library, to add no dependency.
type notifier struct {
	addr *net.UnixAddr // nil: not under systemd
	// watchdog is half of WATCHDOG_USEC (systemd's advice), 0 when no watchdog is asked for.
	watchdog time.Duration
}

// newNotifier reads NOTIFY_SOCKET (a path, or "@name" for the abstract namespace) and
// WATCHDOG_USEC/WATCHDOG_PID (the watchdog is for this process only when WATCHDOG_PID names
// another). The variables stay set: a binary upgrade's new process reports to systemd too.
func newNotifier() *notifier {
	n := &notifier{}
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock != "" {
		name := sock
		if strings.HasPrefix(name, "@") {
			name = "\x00" + name[1:]
		}
		n.addr = &net.UnixAddr{Name: name, Net: "unixgram"}
	}
	if us, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64); err == nil && us > 0 {
		pid := os.Getenv("WATCHDOG_PID")
		if pid == "" || pid == strconv.Itoa(os.Getpid()) {
			n.watchdog = time.Duration(us) * time.Microsecond / 2
		}
	}
	return n
}

// enabled says whether systemd listens.
func (n *notifier) enabled() bool { return n != nil && n.addr != nil }

// send sends one datagram of state lines ("READY=1", "STATUS=..."). Errors are returned for
// the caller to log; systemd gone away must never stop the load balancer.
func (n *notifier) send(lines ...string) error {
	if !n.enabled() {
		return nil
	}
	// A socket per message, as sd_notify(3) does: a handful of messages per reload, and systemd
	// may have re-created its socket since the last one.
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify to %s: %w", n.addr.Name, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(strings.Join(lines, "\n") + "\n")); err != nil {
		return fmt.Errorf("sd_notify %q: %w", strings.Join(lines, " "), err)
	}
	return nil
}

// monotonicUsec is CLOCK_MONOTONIC in microseconds, which systemd wants in MONOTONIC_USEC
// next to RELOADING=1 (Type=notify-reload) to tell this reload from an older one.
func monotonicUsec() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "0"
	}
	return strconv.FormatInt(ts.Sec*1_000_000+ts.Nsec/1_000, 10)
}

// runWatchdog pings systemd every half watchdog period until ctx ends. Its owner is cmdRun;
// it sends nothing when no watchdog was asked for.
func (n *notifier) runWatchdog(ctx context.Context, onErr func(error)) {
	if !n.enabled() || n.watchdog <= 0 {
		return
	}
	t := time.NewTicker(n.watchdog)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := n.send("WATCHDOG=1"); err != nil {
				onErr(err)
			}
		}
	}
}
