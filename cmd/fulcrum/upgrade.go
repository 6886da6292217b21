package main

// Binary upgrade without a dropped connection, as nginx (USR2) and HAProxy (-x) do it:
//
//  1. SIGUSR2 to the running process. It starts the binary now on disk (os.Executable: the
//     path it was started from, even when that file has been replaced since) with the same
//     arguments, and gives it one end of a Unix socket pair as fd 3 ($FULCRUM_UPGRADE_FD).
//  2. Over that socket it sends one message: a JSON list naming each listening socket (role,
//     listener name, configured and bound address) and the sockets themselves (SCM_RIGHTS).
//     Reloads wait until the upgrade is over, so the list cannot change meanwhile.
//  3. The new process loads the configuration file as it is now, serves the sockets whose
//     address its configuration still has (by configured address, else by bound address),
//     binds new addresses, closes the sockets it no longer wants, tells systemd it is the main
//     process (MAINPID= with READY=1) and then answers "ready" on the socket.
//  4. The old process then stops accepting (the sockets live on in the new one: the kernel
//     queue of pending connections is shared, nothing is refused), finishes its requests,
//     WebSockets and TCP relays within server.shutdown_timeout, and exits 0 — without
//     STOPPING=1, which systemd would take for the service stopping.
//
// If the new process fails (bad configuration, a binary that does not start, no answer within
// upgradeTimeout), the old one logs why and keeps serving; the new one exits without having
// told systemd anything.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// upgradeFDEnv names, in a process started by a binary upgrade, its end of the hand-over socket.
const upgradeFDEnv = "FULCRUM_UPGRADE_FD"

// upgradeTimeout bounds how long the old process waits for the new one to be serving: loading
// the configuration, opening the keystore, binding new addresses.
const upgradeTimeout = 2 * time.Minute

// maxHandover is how many sockets one message carries (the kernel's SCM_MAX_FD is 253).
const maxHandover = 250

// handedSocket describes one socket of the hand-over message, in the order of the fds.
type handedSocket struct {
	Role    string `json:"role"`           // "listener" or "admin"
	Name    string `json:"name,omitempty"` // the listener's name
	Address string `json:"address"`        // as configured
	Bound   string `json:"bound"`          // as bound
}

// handover is the old process's message.
type handover struct {
	PID     int            `json:"pid"`
	Sockets []handedSocket `json:"sockets"`
}

// upgradeReply is the new process's answer.
type upgradeReply struct {
	PID   int    `json:"pid"`
	Ready bool   `json:"ready"`
	Error string `json:"error,omitempty"`
}

// fileListener is a listening socket whose descriptor can be duplicated (*net.TCPListener).
type fileListener interface {
	File() (*os.File, error)
}

// upgrade starts the binary on disk, hands it the listening sockets and returns its PID once it
// is serving them. On error the new process is gone and this one serves as before.
func (d *daemon) upgrade() (int, error) {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	exe, err := os.Executable()
	if err != nil {
		return 0, fmt.Errorf("binary upgrade: path of the binary: %w", err)
	}
	msg, files, err := d.handoverMessage()
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	if err != nil {
		return 0, err
	}
	// SOCK_SEQPACKET: one message is one read, with its descriptors; the peer's exit is EOF.
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("binary upgrade: socket pair: %w", err)
	}
	theirs := os.NewFile(uintptr(pair[1]), "upgrade-child")
	mineF := os.NewFile(uintptr(pair[0]), "upgrade-parent")
	fc, err := net.FileConn(mineF)
	mineF.Close()
	if err != nil {
		theirs.Close()
		return 0, fmt.Errorf("binary upgrade: socket pair: %w", err)
	}
	conn := fc.(*net.UnixConn)
	defer conn.Close()

	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{theirs} // fd 3
	cmd.Env = upgradeEnviron(os.Environ())
	err = cmd.Start()
	theirs.Close()
	if err != nil {
		return 0, fmt.Errorf("binary upgrade: start %s: %w", exe, err)
	}
	// The child is this process's to reap: on failure now, on success whenever it exits
	// (usually after this process, when it is reparented).
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fail := func(err error) (int, error) {
		cmd.Process.Kill() // only the process just started; a no-op once it has exited
		select {
		case werr := <-exited:
			if werr != nil {
				err = fmt.Errorf("%w (new process: %v)", err, werr)
			}
		case <-time.After(10 * time.Second):
		}
		return 0, err
	}

	body, _ := json.Marshal(msg)
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	if _, _, err := conn.WriteMsgUnix(body, unix.UnixRights(fds...), nil); err != nil {
		return fail(fmt.Errorf("binary upgrade: hand the sockets over: %w", err))
	}
	conn.SetReadDeadline(time.Now().Add(upgradeTimeout))
	buf := make([]byte, 64<<10)
	n, err := conn.Read(buf)
	if err != nil {
		return fail(fmt.Errorf("binary upgrade: no answer from the new process %d: %w", cmd.Process.Pid, err))
	}
	var rep upgradeReply
	if err := json.Unmarshal(buf[:n], &rep); err != nil {
		return fail(fmt.Errorf("binary upgrade: answer of the new process: %w", err))
	}
	if !rep.Ready {
		return fail(fmt.Errorf("binary upgrade: the new process %d did not start: %s", cmd.Process.Pid, rep.Error))
	}
	return cmd.Process.Pid, nil
}

// handoverMessage lists the listening sockets and duplicates their descriptors.
func (d *daemon) handoverMessage() (*handover, []*os.File, error) {
	msg := &handover{PID: os.Getpid()}
	var files []*os.File
	add := func(role, name, addr string, ln net.Listener) error {
		fl, ok := ln.(fileListener)
		if !ok {
			return fmt.Errorf("binary upgrade: %s socket %s (%T) cannot be handed over", role, addr, ln)
		}
		f, err := fl.File()
		if err != nil {
			return fmt.Errorf("binary upgrade: %s socket %s: %w", role, addr, err)
		}
		files = append(files, f)
		msg.Sockets = append(msg.Sockets, handedSocket{Role: role, Name: name, Address: addr, Bound: ln.Addr().String()})
		return nil
	}
	cfg := d.rt.Config()
	names := map[string]string{}
	for _, l := range cfg.Listeners {
		names[l.Address] = l.Name
	}
	for addr, ln := range d.rt.Sockets() {
		if err := add("listener", names[addr], addr, ln); err != nil {
			return nil, files, err
		}
	}
	if d.admin != nil {
		if err := add("admin", "", cfg.Server.Admin, d.admin.raw); err != nil {
			return nil, files, err
		}
	}
	if len(files) > maxHandover {
		return nil, files, fmt.Errorf("binary upgrade: %d sockets, at most %d can be handed over", len(files), maxHandover)
	}
	return msg, files, nil
}

// upgradeEnviron is the new process's environment: fd 3 is the hand-over socket, and
// WATCHDOG_PID (this process's PID) is dropped so that the new process, once main, keeps the
// systemd watchdog fed. NOTIFY_SOCKET stays: the new process reports to systemd.
func upgradeEnviron(env []string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if strings.HasPrefix(kv, upgradeFDEnv+"=") || strings.HasPrefix(kv, "WATCHDOG_PID=") {
			continue
		}
		out = append(out, kv)
	}
	return append(out, upgradeFDEnv+"=3")
}

// inheritance is what a process started by a binary upgrade received from its predecessor.
type inheritance struct {
	conn   *net.UnixConn
	parent int
	socks  []handedSocket
	lns    []net.Listener // by index of socks; nil once claimed or closed
}

// receiveHandover reads the predecessor's sockets when this process was started by a binary
// upgrade; nil, nil otherwise.
func receiveHandover() (*inheritance, error) {
	v := os.Getenv(upgradeFDEnv)
	if v == "" {
		return nil, nil
	}
	os.Unsetenv(upgradeFDEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: not a file descriptor", upgradeFDEnv, v)
	}
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "upgrade")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("binary upgrade: hand-over socket: %w", err)
	}
	conn, ok := fc.(*net.UnixConn)
	if !ok {
		fc.Close()
		return nil, fmt.Errorf("binary upgrade: fd %d is not a Unix socket", fd)
	}
	in := &inheritance{conn: conn}
	buf := make([]byte, 1<<20)
	oob := make([]byte, unix.CmsgSpace(maxHandover*4))
	conn.SetReadDeadline(time.Now().Add(upgradeTimeout))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	conn.SetReadDeadline(time.Time{})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("binary upgrade: read the hand-over: %w", err)
	}
	var fds []int
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	for _, m := range cmsgs {
		rights, rerr := unix.ParseUnixRights(&m)
		if rerr == nil {
			fds = append(fds, rights...)
		}
	}
	var msg handover
	if err == nil {
		err = json.Unmarshal(buf[:n], &msg)
	}
	if err == nil && len(msg.Sockets) != len(fds) {
		err = fmt.Errorf("%d sockets named, %d received", len(msg.Sockets), len(fds))
	}
	if err != nil {
		for _, fd := range fds {
			unix.Close(fd)
		}
		in.fail(err)
		return nil, fmt.Errorf("binary upgrade: hand-over message: %w", err)
	}
	in.parent, in.socks = msg.PID, msg.Sockets
	in.lns = make([]net.Listener, len(fds))
	for i, fd := range fds {
		unix.CloseOnExec(fd)
		f := os.NewFile(uintptr(fd), msg.Sockets[i].Address)
		ln, lerr := net.FileListener(f) // duplicates fd
		f.Close()
		if lerr != nil {
			err = errors.Join(err, fmt.Errorf("%s socket %s: %w", msg.Sockets[i].Role, msg.Sockets[i].Address, lerr))
			continue
		}
		in.lns[i] = ln
	}
	if err != nil {
		in.closeRest()
		in.fail(err)
		return nil, fmt.Errorf("binary upgrade: %w", err)
	}
	return in, nil
}

// claim takes the socket of role for an address of the new configuration: the one configured
// with that address, else the one bound to it ("localhost:80" then, "127.0.0.1:80" now).
func (in *inheritance) claim(role, addr string) net.Listener {
	if in == nil || addr == "" {
		return nil
	}
	for _, byBound := range []bool{false, true} {
		for i, s := range in.socks {
			if in.lns[i] == nil || s.Role != role {
				continue
			}
			if (!byBound && s.Address == addr) || (byBound && s.Bound == addr) {
				ln := in.lns[i]
				in.lns[i] = nil
				return ln
			}
		}
	}
	return nil
}

// listeners claims the sockets of cfg's listeners, by configured address.
func (in *inheritance) listeners(cfg *configs.Config) map[string]net.Listener {
	if in == nil {
		return nil
	}
	m := map[string]net.Listener{}
	for _, l := range cfg.Listeners {
		if ln := in.claim("listener", l.Address); ln != nil {
			m[l.Address] = ln
		}
	}
	return m
}

// closeRest closes the sockets the new configuration does not use (listeners it no longer has,
// an admin endpoint that moved). The old process still serves on its own descriptors until it
// stops accepting; then the kernel closes those sockets.
func (in *inheritance) closeRest() {
	if in == nil {
		return
	}
	for i, ln := range in.lns {
		if ln != nil {
			ln.Close()
			in.lns[i] = nil
		}
	}
}

// ready tells the old process that this one is serving; it stops accepting then.
func (in *inheritance) ready() error {
	defer in.conn.Close()
	b, _ := json.Marshal(upgradeReply{PID: os.Getpid(), Ready: true})
	if _, err := in.conn.Write(b); err != nil {
		return fmt.Errorf("binary upgrade: tell the old process %d: %w", in.parent, err)
	}
	return nil
}

// fail tells the old process why this one does not take over; it keeps serving.
func (in *inheritance) fail(err error) {
	b, _ := json.Marshal(upgradeReply{PID: os.Getpid(), Error: err.Error()})
	in.conn.Write(b)
	in.conn.Close()
}
