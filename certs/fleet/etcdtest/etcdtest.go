// Package etcdtest starts a real etcd cluster on loopback for a test (as httptest gives tests a
// server): member processes of the Debian etcd-server binary, never a mock. Only tests import it.
package etcdtest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Binary finds the etcd server binary, "" when it is not installed.
func Binary() string {
	for _, p := range []string{"/usr/bin/etcd", "/usr/local/bin/etcd"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("etcd"); err == nil {
		return p
	}
	return ""
}

// Need skips the test when etcd is not installed, except in CI (CI=true), where `make deps`
// installs etcd-server and a missing binary is a failure, not a skip.
func Need(t testing.TB) string {
	t.Helper()
	b := Binary()
	if b == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("etcd is not installed (make deps installs etcd-server)")
		}
		t.Skip("etcd is not installed (apt-get install etcd-server)")
	}
	return b
}

// Member is one etcd process.
type Member struct {
	Name       string
	ClientURL  string
	peerURL    string
	dir        string
	log        *bytes.Buffer
	mu         sync.Mutex
	cmd        *exec.Cmd
	done       chan struct{}
	cluster    *Cluster
	everJoined bool
}

// Cluster is n members that know each other.
type Cluster struct {
	t       testing.TB
	tls     *TLSFiles
	bin     string
	Members []*Member
	initial string
	launch  chan func() // run on the launcher thread
}

// launcher runs process starts on one locked OS thread that lives as long as the cluster:
// Pdeathsig (kill etcd if the test process dies) fires when the forking *thread* exits, and
// Go retires threads whose goroutine exited locked (as cgo callers such as PKCS#11 do).
func (c *Cluster) launcher(stop <-chan struct{}) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for {
		select {
		case f := <-c.launch:
			f()
		case <-stop:
			return
		}
	}
}

// TLSFiles make the members serve clients over TLS and require client certificates signed by
// CA (PEM files).
type TLSFiles struct{ CA, Cert, Key string }

// Start starts an n-member cluster and waits until it has a leader. The members are stopped
// when the test ends; their logs are printed if it failed.
func Start(t testing.TB, n int) *Cluster { return StartTLS(t, n, nil) }

// StartTLS is Start with TLS (and client-certificate authentication) for clients.
func StartTLS(t testing.TB, n int, tf *TLSFiles) *Cluster {
	t.Helper()
	bin := Need(t)
	c := &Cluster{t: t, bin: bin, launch: make(chan func()), tls: tf}
	stopLauncher := make(chan struct{})
	go c.launcher(stopLauncher)
	base := t.TempDir()
	var initial []string
	for i := range n {
		m := &Member{Name: fmt.Sprintf("m%d", i), dir: filepath.Join(base, fmt.Sprintf("m%d", i)), log: &bytes.Buffer{}, cluster: c}
		m.ClientURL = "http://" + freeAddr(t)
		if tf != nil {
			m.ClientURL = "https://" + strings.TrimPrefix(m.ClientURL, "http://")
		}
		m.peerURL = "http://" + freeAddr(t)
		initial = append(initial, m.Name+"="+m.peerURL)
		c.Members = append(c.Members, m)
	}
	c.initial = strings.Join(initial, ",")
	for _, m := range c.Members {
		if err := m.start(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, m := range c.Members {
			m.Stop()
		}
		close(stopLauncher)
		if t.Failed() {
			for _, m := range c.Members {
				m.mu.Lock()
				t.Logf("etcd %s log (tail):\n%s", m.Name, tail(m.log.String(), 3000))
				m.mu.Unlock()
			}
		}
	})
	c.WaitHealthy(t, 60*time.Second)
	return c
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// Endpoints are the members' client addresses ("127.0.0.1:port").
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, strings.TrimPrefix(strings.TrimPrefix(m.ClientURL, "http://"), "https://"))
	}
	return out
}

// WaitHealthy waits until every running member reports health (a leader is elected).
func (c *Cluster) WaitHealthy(t testing.TB, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for _, m := range c.Members {
		if !m.Running() {
			continue
		}
		for {
			if m.healthy() {
				break
			}
			if time.Now().After(deadline) {
				m.mu.Lock()
				log := tail(m.log.String(), 2000)
				m.mu.Unlock()
				t.Fatalf("etcd member %s not healthy after %s; its log:\n%s", m.Name, limit, log)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (m *Member) healthy() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, m.ClientURL+"/health", nil)
	client := http.DefaultClient
	if tf := m.cluster.tls; tf != nil {
		pair, err := tls.LoadX509KeyPair(tf.Cert, tf.Key) // the server's pair is a client too
		if err != nil {
			return false
		}
		pool := x509.NewCertPool()
		if b, err := os.ReadFile(tf.CA); err == nil {
			pool.AppendCertsFromPEM(b)
		}
		client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}}}
		defer client.CloseIdleConnections()
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var b [256]byte
	k, _ := resp.Body.Read(b[:])
	return resp.StatusCode == 200 && bytes.Contains(b[:k], []byte(`"true"`))
}

func (m *Member) start() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return nil
	}
	state := "new"
	if m.everJoined {
		state = "existing"
	}
	var tlsArgs []string
	if tf := m.cluster.tls; tf != nil {
		tlsArgs = []string{"--cert-file", tf.Cert, "--key-file", tf.Key, "--trusted-ca-file", tf.CA, "--client-cert-auth"}
	}
	cmd := exec.Command(m.cluster.bin, append([]string{
		"--name", m.Name,
		"--data-dir", m.dir,
		"--listen-client-urls", m.ClientURL,
		"--advertise-client-urls", m.ClientURL,
		"--listen-peer-urls", m.peerURL,
		"--initial-advertise-peer-urls", m.peerURL,
		"--initial-cluster", m.cluster.initial,
		"--initial-cluster-state", state,
		"--initial-cluster-token", "fulcrum-test",
		// Fast elections on a loaded two-core machine: small ticks, but not so small that a
		// busy scheduler makes members think their leader died.
		"--heartbeat-interval", "100",
		"--election-timeout", "1000",
		"--log-level", "warn",
	}, tlsArgs...)...)
	cmd.Stdout = lockedWriter{m}
	cmd.Stderr = lockedWriter{m}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	errc := make(chan error, 1)
	m.cluster.launch <- func() { errc <- cmd.Start() }
	if err := <-errc; err != nil {
		return fmt.Errorf("start etcd %s: %w", m.Name, err)
	}
	m.everJoined = true
	m.cmd, m.done = cmd, make(chan struct{})
	done := m.done
	go func() { cmd.Wait(); close(done) }()
	return nil
}

type lockedWriter struct{ m *Member }

func (w lockedWriter) Write(p []byte) (int, error) {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	if w.m.log.Len() > 1<<20 {
		w.m.log.Reset()
	}
	return w.m.log.Write(p)
}

// Running reports whether the member process is up.
func (m *Member) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cmd != nil
}

// Kill stops the member with SIGKILL (a crash) and waits for it to exit.
func (m *Member) Kill() { m.signal(syscall.SIGKILL) }

// Stop stops the member with SIGTERM and waits for it to exit.
func (m *Member) Stop() { m.signal(syscall.SIGTERM) }

func (m *Member) signal(sig syscall.Signal) {
	m.mu.Lock()
	cmd, done := m.cmd, m.done
	m.cmd = nil
	m.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// Restart starts a stopped member again with its data.
func (m *Member) Restart() error { return m.start() }

// StopAll stops every member; StartAll starts them again and waits for a leader.
func (c *Cluster) StopAll() {
	for _, m := range c.Members {
		m.Stop()
	}
}

// StartAll restarts every stopped member and waits until the cluster is healthy.
func (c *Cluster) StartAll(t testing.TB) {
	t.Helper()
	for _, m := range c.Members {
		if err := m.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	c.WaitHealthy(t, 60*time.Second)
}

// freeAddr is a free loopback port below the kernel's ephemeral range (32768-60999), so that no
// other test process's bind(":0") or outgoing connection can take it between this check and etcd
// binding it; [15000, 20000) is apart from the range the listener tests' ports come from.
func freeAddr(t testing.TB) string {
	t.Helper()
	for range 1000 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(15000+rand.IntN(5000)))
		if _, seen := handedOut.LoadOrStore(addr, true); seen {
			continue
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		ln.Close()
		return addr
	}
	t.Fatal("no free loopback port for etcd after 1000 tries")
	return ""
}

// handedOut remembers the ports given to members, so a restarted cluster never reuses one.
var handedOut sync.Map
