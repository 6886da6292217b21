package main

// fulcrum-bench peers: Fulcrum side by side with nginx and HAProxy on the same machine.
//
// Method (the same for every proxy, so the figures compare):
//   - each proxy runs alone on one core (taskset -c 1) with one worker or thread: nginx
//     `worker_processes 1`, HAProxy `nbthread 1`, Fulcrum GOMAXPROCS=1; the origin (nginx, one
//     worker, `return 200` with a 100-byte body) and the load generators share the other core;
//   - the same TLS for everyone: TLS 1.3, TLS_AES_128_GCM_SHA256 on the OpenSSL peers (what Go
//     picks), an ECDSA P-256 certificate generated at start from a throw-away authority;
//   - kept-alive upstream connections, X-Forwarded-For added, no access logs;
//   - interleaved: for each scenario, repetition 1 runs every proxy, then repetition 2 …; each
//     run starts the proxy fresh, warms up, measures, and stops it by its PID;
//   - the figure that carries over between runs on a shared machine is requests per second of
//     CPU the proxy actually got (its utime+stime over the measurement, children included), not
//     requests per second.
//
// Scenarios: h1 (wrk, 64 keep-alive connections), tls (the same over HTTPS), h2 (h2load, 16
// connections x 32 streams over TLS), rate (hey at a fixed 3,000 req/s: proxy CPU per request),
// idle and idle-tls (N served keep-alive connections held open: proxy PSS per connection, from
// /proc/PID/smaps_rollup).

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"embed"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

//go:embed peers/*.conf peers/*.cfg peers/*.toml
var peerTemplates embed.FS

// allScenarios in the order they run and are reported.
var allScenarios = []string{"h1", "tls", "h2", "rate", "idle", "idle-tls"}

// peerOrder is the column order; "fulcrum" is always last.
var peerOrder = []string{"nginx", "haproxy", "fulcrum"}

type peersOptions struct {
	fulcrum             string
	peers, only         []string
	reps                int
	duration, warmup    time.Duration
	conns               int
	rate                int
	idleConns           int
	proxyCPU, otherCPUs string
	keep                bool
	log                 io.Writer     // progress lines (stderr)
	settle              time.Duration // idle: wait before each memory sample
}

func parsePeersFlags(args []string, stderr io.Writer) (peersOptions, error) {
	fs := flag.NewFlagSet("fulcrum-bench peers", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o peersOptions
	var peers, only string
	fs.StringVar(&o.fulcrum, "fulcrum", "bin/fulcrum", "fulcrum binary")
	fs.StringVar(&peers, "peers", strings.Join(peerOrder, ","), "comma-separated proxies to run: nginx, haproxy, fulcrum")
	fs.StringVar(&only, "only", strings.Join(allScenarios, ","), "comma-separated scenarios: "+strings.Join(allScenarios, ", "))
	fs.IntVar(&o.reps, "reps", 1, "interleaved repetitions (medians are reported)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measured load per run")
	fs.DurationVar(&o.warmup, "warmup", 2*time.Second, "unmeasured load before each measurement")
	fs.IntVar(&o.conns, "conns", 64, "keep-alive connections for h1 and tls")
	fs.IntVar(&o.rate, "rate", 3000, "requests per second of the rate scenario (a multiple of 100)")
	fs.IntVar(&o.idleConns, "idle-conns", 0, "connections held open by idle and idle-tls (0: min(10000, (hard RLIMIT_NOFILE-200)/2))")
	fs.StringVar(&o.proxyCPU, "proxy-cpu", "1", "the core every proxy is pinned to")
	fs.StringVar(&o.otherCPUs, "other-cpus", "0", "cores of the origin and the load generators")
	fs.BoolVar(&o.keep, "keep", false, "keep the scratch directory (configurations, logs, tool output)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, `fulcrum-bench peers: Fulcrum side by side with nginx and HAProxy, each pinned to one core.

  fulcrum-bench peers [-only h1,tls,h2,rate,idle,idle-tls] [-peers nginx,haproxy,fulcrum] [-reps 3] [-duration 10s]

Needs nginx, haproxy, wrk, h2load (nghttp2-client), hey and taskset (make bench-peers installs
the Debian packages when missing). Prints markdown tables on stdout, progress on stderr.

`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q (see -help)", fs.Arg(0))
	}
	o.peers, o.only = splitList(peers), splitList(only)
	for _, p := range o.peers {
		if !slices.Contains(peerOrder, p) {
			return o, fmt.Errorf("-peers: unknown proxy %q (want nginx, haproxy, fulcrum)", p)
		}
	}
	for _, s := range o.only {
		if !slices.Contains(allScenarios, s) {
			return o, fmt.Errorf("-only: unknown scenario %q (want %s)", s, strings.Join(allScenarios, ", "))
		}
	}
	switch {
	case len(o.peers) == 0 || len(o.only) == 0:
		return o, errors.New("-peers and -only need at least one name")
	case o.reps < 1 || o.reps > 20:
		return o, errors.New("-reps must be 1..20")
	case o.duration < time.Second || o.duration > 2*time.Minute:
		return o, errors.New("-duration must be 1s..2m")
	case o.warmup < 0 || o.warmup > time.Minute:
		return o, errors.New("-warmup must be 0..1m")
	case o.conns < 1 || o.conns > 1000:
		return o, errors.New("-conns must be 1..1000")
	case o.rate < 100 || o.rate%100 != 0 || o.rate > 100000:
		return o, errors.New("-rate must be a multiple of 100 up to 100000")
	case o.idleConns < 0 || o.idleConns > 50000:
		return o, errors.New("-idle-conns must be 0..50000")
	}
	// Reorder into the report's column order, whatever order they were given in.
	var ordered []string
	for _, p := range peerOrder {
		if slices.Contains(o.peers, p) {
			ordered = append(ordered, p)
		}
	}
	o.peers = ordered
	return o, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" && !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// toolsFor names the programs a run needs, with the Debian package that has each.
func toolsFor(o peersOptions) map[string]string {
	need := map[string]string{"nginx": "nginx", "taskset": "util-linux"} // nginx is the origin too
	if slices.Contains(o.peers, "haproxy") {
		need["haproxy"] = "haproxy"
	}
	for _, s := range o.only {
		switch s {
		case "h1", "tls", "idle", "idle-tls": // idle warms the proxy up with wrk
			need["wrk"] = "wrk"
		case "h2":
			need["h2load"] = "nghttp2-client"
		case "rate":
			need["hey"] = "hey"
		}
	}
	return need
}

func checkTools(o peersOptions) error {
	var missing, pkgs []string
	for tool, pkg := range toolsFor(o) {
		if _, err := exec.LookPath(tool); err != nil {
			missing, pkgs = append(missing, tool), append(pkgs, pkg)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		slices.Sort(pkgs)
		return fmt.Errorf("not installed: %s (apt-get install %s, or make bench-peers, which installs them)",
			strings.Join(missing, ", "), strings.Join(slices.Compact(pkgs), " "))
	}
	if _, err := os.Stat(o.fulcrum); err != nil && slices.Contains(o.peers, "fulcrum") {
		return fmt.Errorf("fulcrum binary: %w (run `make build` or pass -fulcrum)", err)
	}
	return nil
}

// peerRun is the measurement of one scenario on one proxy in one repetition.
type peerRun struct {
	requests, errors int64
	rps              float64
	p99              time.Duration
	cpu              time.Duration // the proxy's CPU time during the measurement
	wall             time.Duration
	othersPct        float64 // % of the proxy's core taken by other processes during it
	kibPerConn       float64 // idle scenarios
	baseMiB, memMiB  float64
	open             int
}

// perCPUSecond is requests per second of proxy CPU.
func (r peerRun) perCPUSecond() float64 {
	if r.cpu <= 0 {
		return 0
	}
	return float64(r.requests-r.errors) / r.cpu.Seconds()
}

func (r peerRun) cpuPct() float64 {
	if r.wall <= 0 {
		return 0
	}
	return float64(r.cpu) / float64(r.wall) * 100
}

// usPerRequest is the proxy's CPU per request (the rate scenario).
func (r peerRun) usPerRequest() float64 {
	if r.requests <= 0 {
		return 0
	}
	return float64(r.cpu) / float64(r.requests) / float64(time.Microsecond)
}

// bench is one invocation: scratch directory, certificates, origin.
type bench struct {
	o          peersOptions
	dir        string
	cert, key  string // the leaf certificate and its key, PEM
	pem        string // both in one file (HAProxy)
	ca         *x509.CertPool
	originAddr string
	origin     *treeProc
	nofile     int
}

func runPeers(ctx context.Context, args []string, out, stderr io.Writer) error {
	o, err := parsePeersFlags(args, stderr)
	if err != nil {
		return err
	}
	o.log, o.settle = stderr, 2*time.Second
	_, err = runPeersWith(ctx, o, out)
	return err
}

// peerResults holds every run: scenario -> proxy -> repetitions.
type peerResults map[string]map[string][]peerRun

func runPeersWith(ctx context.Context, o peersOptions, out io.Writer) (peerResults, error) {
	if err := checkTools(o); err != nil {
		return nil, err
	}
	if runtime.NumCPU() < 2 {
		fmt.Fprintln(o.log, "note: fewer than 2 CPUs: nothing is pinned, and the figures are not per core")
		o.proxyCPU, o.otherCPUs = "", ""
	}
	b := &bench{o: o}
	b.nofile = hardNofile()
	if o.idleConns == 0 {
		// HAProxy reserves two descriptors per connection and refuses to start above the hard
		// limit, so the idle tests open as many as fits every proxy.
		b.o.idleConns = min(10000, (b.nofile-200)/2/100*100)
	}
	if b.o.idleConns < 1 {
		return nil, fmt.Errorf("hard RLIMIT_NOFILE %d leaves no room for idle connections", b.nofile)
	}
	o = b.o
	var err error
	if b.dir, err = os.MkdirTemp("", "fulcrum-bench-peers-"); err != nil {
		return nil, err
	}
	if o.keep {
		fmt.Fprintln(o.log, "scratch:", b.dir)
	} else {
		defer os.RemoveAll(b.dir)
	}
	if err := b.makeCerts(); err != nil {
		return nil, fmt.Errorf("test certificates: %w", err)
	}
	if err := b.startOrigin(ctx); err != nil {
		return nil, err
	}
	defer b.origin.stop()

	fmt.Fprintf(o.log, "fulcrum-bench peers: %s x %s, %d rep(s), %s per run (+%s warm-up), proxies on CPU %s, origin and load on CPU %s, %d idle connections\n",
		strings.Join(o.only, ","), strings.Join(o.peers, ","), o.reps, o.duration, o.warmup, o.proxyCPU, o.otherCPUs, o.idleConns)
	results := peerResults{}
	for _, sc := range o.only {
		results[sc] = map[string][]peerRun{}
		for rep := 1; rep <= o.reps; rep++ {
			for _, p := range o.peers {
				if err := ctx.Err(); err != nil {
					return results, err
				}
				r, err := b.runOne(ctx, sc, p, rep)
				if err != nil {
					return results, fmt.Errorf("%s on %s (rep %d): %w", sc, p, rep, err)
				}
				results[sc][p] = append(results[sc][p], r)
			}
		}
	}
	titles, tools := versions(o)
	writePeersReport(out, o, titles, tools, results)
	return results, nil
}

func hardNofile() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Max > 65536 {
		return 65536
	}
	return int(rl.Max)
}

// makeCerts writes a throw-away authority's ECDSA P-256 leaf for localhost and 127.0.0.1.
func (b *bench) makeCerts() error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fulcrum-bench CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	b.cert, b.key, b.pem = filepath.Join(b.dir, "server.crt"), filepath.Join(b.dir, "server.key"), filepath.Join(b.dir, "server.pem")
	for path, data := range map[string][]byte{b.cert: certPEM, b.key: keyPEM, b.pem: append(slices.Clone(certPEM), keyPEM...)} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return err
		}
	}
	b.ca = x509.NewCertPool()
	b.ca.AddCert(caCert)
	return nil
}

// render fills a template's @PLACEHOLDERS@ and writes it to dir.
func (b *bench) render(name, dir string, ports map[string]string) (string, error) {
	t, err := peerTemplates.ReadFile("peers/" + name)
	if err != nil {
		return "", err
	}
	repl := []string{
		"@RUN@", dir, "@CERT@", b.cert, "@KEY@", b.key, "@PEM@", b.pem,
		"@NOFILE@", strconv.Itoa(b.nofile), "@WORKER_CONNS@", strconv.Itoa(b.nofile - 100),
		"@MAXCONN@", strconv.Itoa(b.o.idleConns + 50), "@ORIGIN_PORT@", port(b.originAddr),
	}
	for k, v := range ports {
		repl = append(repl, k, v)
	}
	path := filepath.Join(dir, name)
	return path, os.WriteFile(path, []byte(strings.NewReplacer(repl...).Replace(string(t))), 0o600)
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

func (b *bench) startOrigin(ctx context.Context) error {
	dir := filepath.Join(b.dir, "origin")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	addrs, err := freeAddrs(1)
	if err != nil {
		return err
	}
	b.originAddr = addrs[0]
	conf, err := b.render("origin.nginx.conf", dir, nil)
	if err != nil {
		return err
	}
	p, err := startTree(ctx, b.o.otherCPUs, filepath.Join(dir, "nginx.log"), nil, "nginx", "-e", "stderr", "-p", dir, "-c", conf)
	if err != nil {
		return fmt.Errorf("origin: %w", err)
	}
	if err := waitGet(ctx, &http.Client{Timeout: 2 * time.Second}, "http://"+b.originAddr+"/", p, 15*time.Second); err != nil {
		p.stop()
		return fmt.Errorf("origin (nginx): %w\n%s", err, p.logTail())
	}
	b.origin = p
	return nil
}

// startPeer starts one proxy on the proxy core with fresh ports and waits until it forwards.
// The ports are picked free and released before the proxy binds them, so another process may
// take one in between: a proxy that exits at start is tried again (three times in all) on
// fresh ports.
func (b *bench) startPeer(ctx context.Context, name string, rep int, sc string) (*treeProc, string, string, error) {
	dir := filepath.Join(b.dir, fmt.Sprintf("%s-%s-%d", sc, name, rep))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, "", "", err
	}
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		var p *treeProc
		var httpAddr, httpsAddr string
		p, httpAddr, httpsAddr, err = b.startPeerIn(ctx, name, dir)
		if err == nil {
			return p, httpAddr, httpsAddr, nil
		}
		if !errors.Is(err, errExitedAtStart) {
			break
		}
		fmt.Fprintf(b.o.log, "%s exited at start (attempt %d), trying other ports\n", name, attempt)
	}
	return nil, "", "", err
}

var errExitedAtStart = errors.New("exited at start")

func (b *bench) startPeerIn(ctx context.Context, name, dir string) (*treeProc, string, string, error) {
	addrs, err := freeAddrs(2)
	if err != nil {
		return nil, "", "", err
	}
	ports := map[string]string{"@HTTP_PORT@": port(addrs[0]), "@HTTPS_PORT@": port(addrs[1])}
	var argv, env []string
	switch name {
	case "nginx":
		conf, err := b.render("nginx.conf", dir, ports)
		if err != nil {
			return nil, "", "", err
		}
		argv = []string{"nginx", "-e", "stderr", "-p", dir, "-c", conf}
	case "haproxy":
		conf, err := b.render("haproxy.cfg", dir, ports)
		if err != nil {
			return nil, "", "", err
		}
		argv = []string{"haproxy", "-db", "-f", conf}
	case "fulcrum":
		conf, err := b.render("fulcrum.toml", dir, ports)
		if err != nil {
			return nil, "", "", err
		}
		argv, env = []string{b.o.fulcrum, "run", conf}, []string{"GOMAXPROCS=1"}
	}
	p, err := startTree(ctx, b.o.proxyCPU, filepath.Join(dir, name+".log"), env, argv[0], argv[1:]...)
	if err != nil {
		return nil, "", "", err
	}
	c := b.client()
	for _, u := range []string{"http://" + addrs[0] + "/", "https://" + addrs[1] + "/"} {
		if err := waitGet(ctx, c, u, p, 30*time.Second); err != nil {
			exited := p.exited() != nil
			p.stop()
			if exited {
				err = fmt.Errorf("%w: %v", errExitedAtStart, err)
			}
			return nil, "", "", fmt.Errorf("%s did not start: %w\n%s", name, err, p.logTail())
		}
	}
	c.CloseIdleConnections()
	return p, addrs[0], addrs[1], nil
}

func (b *bench) tlsConfig() *tls.Config {
	return &tls.Config{RootCAs: b.ca, ServerName: "localhost", MinVersion: tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519}, NextProtos: []string{"http/1.1"}}
}

func (b *bench) client() *http.Client {
	return &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: b.tlsConfig()}}
}

func (b *bench) runOne(ctx context.Context, sc, name string, rep int) (peerRun, error) {
	p, httpAddr, httpsAddr, err := b.startPeer(ctx, name, rep, sc)
	if err != nil {
		return peerRun{}, err
	}
	defer p.stop()
	logf := filepath.Join(b.dir, fmt.Sprintf("%s-%s-%d", sc, name, rep), "load.txt")
	var r peerRun
	switch sc {
	case "h1", "tls":
		u := "http://" + httpAddr + "/"
		if sc == "tls" {
			u = "https://" + httpsAddr + "/"
		}
		load := func(d time.Duration, latency bool) []string {
			// --timeout 10s: on a loaded machine wrk's 2 s default counts slow answers as errors.
			a := []string{"wrk", "-t1", "-c" + strconv.Itoa(b.o.conns), "-d" + secs(d), "--timeout", "10s"}
			if latency {
				a = append(a, "--latency")
			}
			return append(a, u)
		}
		r, err = b.measure(ctx, p, load, parseWrkRun, logf)
	case "h2":
		u := "https://" + httpsAddr + "/"
		load := func(d time.Duration, _ bool) []string {
			return []string{"h2load", "-t1", "-c16", "-m32", "-D", secs(d), u}
		}
		r, err = b.measure(ctx, p, load, parseH2load, logf)
	case "rate":
		// hey's -q is per worker: rate/100 workers at 100 req/s each hold the total rate.
		u := "http://" + httpAddr + "/"
		load := func(d time.Duration, _ bool) []string {
			return []string{"hey", "-z", secs(d), "-c", strconv.Itoa(b.o.rate / 100), "-q", "100", u}
		}
		r, err = b.measure(ctx, p, load, parseHeyRun, logf)
	case "idle", "idle-tls":
		r, err = b.idle(ctx, p, httpAddr, httpsAddr, sc == "idle-tls")
	}
	if err != nil {
		return r, err
	}
	b.progress(sc, name, rep, r)
	return r, nil
}

func (b *bench) progress(sc, name string, rep int, r peerRun) {
	switch sc {
	case "idle", "idle-tls":
		fmt.Fprintf(b.o.log, "%-8s %-8s rep %d: %d open, PSS %.1f -> %.1f MiB, %.2f KiB/conn, %d failed\n", sc, name, rep, r.open, r.baseMiB, r.memMiB, r.kibPerConn, r.errors)
	case "rate":
		fmt.Fprintf(b.o.log, "%-8s %-8s rep %d: %.0f req/s, p99 %v, proxy CPU %.0f %%, %.1f µs/req, %d errors, others on the proxy core %.0f %%\n", sc, name, rep, r.rps, r.p99.Round(10*time.Microsecond), r.cpuPct(), r.usPerRequest(), r.errors, r.othersPct)
	default:
		fmt.Fprintf(b.o.log, "%-8s %-8s rep %d: %.0f req/s, p99 %v, proxy CPU %.0f %%, %.0f req per proxy CPU-s, %d errors, others on the proxy core %.0f %%\n", sc, name, rep, r.rps, r.p99.Round(10*time.Microsecond), r.cpuPct(), r.perCPUSecond(), r.errors, r.othersPct)
	}
}

func secs(d time.Duration) string {
	return strconv.Itoa(max(1, int(d.Round(time.Second)/time.Second))) + "s"
}

// measure warms up, then runs the load once more while the proxy's CPU time is sampled.
func (b *bench) measure(ctx context.Context, p *treeProc, load func(time.Duration, bool) []string, parse func(string) (peerRun, error), logf string) (peerRun, error) {
	if b.o.warmup >= time.Second {
		if _, err := b.loadgen(ctx, load(b.o.warmup, false)); err != nil {
			return peerRun{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	c0, core0, t0 := p.cpuTime(), coreTicks(b.o.proxyCPU), time.Now()
	out, err := b.loadgen(ctx, load(b.o.duration, true))
	c1, core1, t1 := p.cpuTime(), coreTicks(b.o.proxyCPU), time.Now()
	os.WriteFile(logf, []byte(out), 0o600)
	if err != nil {
		return peerRun{}, err
	}
	if err := p.exited(); err != nil {
		return peerRun{}, fmt.Errorf("the proxy %w\n%s", err, p.logTail())
	}
	r, err := parse(out)
	if err != nil {
		return r, err
	}
	r.cpu, r.wall = c1-c0, t1.Sub(t0)
	if core0 >= 0 && core1 >= 0 {
		busy := time.Duration(core1-core0) * time.Second / clockTicks
		r.othersPct = max(0, float64(busy-r.cpu)/float64(r.wall)*100)
	}
	return r, nil
}

// loadgen runs a load generator on the load core, bounded in time.
func (b *bench) loadgen(ctx context.Context, argv []string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, b.o.duration+b.o.warmup+60*time.Second)
	defer cancel()
	cmd := pinned(cctx, b.o.otherCPUs, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out), nil
}

// idle opens idleConns served keep-alive connections and reads the proxy's PSS before and after.
func (b *bench) idle(ctx context.Context, p *treeProc, httpAddr, httpsAddr string, useTLS bool) (peerRun, error) {
	addr, scheme := httpAddr, "http"
	if useTLS {
		addr, scheme = httpsAddr, "https"
	}
	// Warm up as the load scenarios do, so the baseline holds what serving allocates anyway.
	if _, err := b.loadgen(ctx, []string{"wrk", "-t1", "-c16", "-d1s", scheme + "://" + addr + "/"}); err != nil {
		return peerRun{}, fmt.Errorf("warm-up: %w", err)
	}
	if err := sleepCtx(ctx, b.o.settle/2); err != nil {
		return peerRun{}, err
	}
	base := p.pssKiB()
	var cfg *tls.Config
	if useTLS {
		cfg = b.tlsConfig()
	}
	conns, failed, firstErr := openIdle(ctx, addr, b.o.idleConns, cfg)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Let the proxy settle (buffers returned to pools, goroutines parked) before sampling.
	if err := sleepCtx(ctx, b.o.settle); err != nil {
		return peerRun{}, err
	}
	if err := p.exited(); err != nil {
		return peerRun{}, fmt.Errorf("the proxy %w\n%s", err, p.logTail())
	}
	mem := p.pssKiB()
	r := peerRun{open: len(conns), errors: int64(failed), baseMiB: float64(base) / 1024, memMiB: float64(mem) / 1024}
	if len(conns) == 0 {
		return r, fmt.Errorf("no idle connection could be opened: %v", firstErr)
	}
	r.kibPerConn = float64(mem-base) / float64(len(conns))
	return r, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// openIdle opens n connections, sends one GET on each and reads the whole answer, so each is a
// served keep-alive connection waiting for its next request. 64 dialers; each connection is
// bounded by a 20 s deadline.
func openIdle(ctx context.Context, addr string, n int, cfg *tls.Config) ([]net.Conn, int, error) {
	req := "GET / HTTP/1.1\r\nHost: " + addr + "\r\nUser-Agent: fulcrum-bench\r\n\r\n"
	conns := make([]net.Conn, n)
	var next, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := openOne(addr, cfg, req)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	open := slices.DeleteFunc(conns, func(c net.Conn) bool { return c == nil })
	err, _ := firstErr.Load().(error)
	return open, int(failed.Load()), err
}

func openOne(addr string, cfg *tls.Config, req string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if cfg != nil {
		tc := tls.Client(c, cfg)
		if err := tc.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		c = tc
	}
	if _, err := io.WriteString(c, req); err != nil {
		c.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(c, 1024), nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Close {
		c.Close()
		return nil, fmt.Errorf("status %d, close=%v", resp.StatusCode, resp.Close)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// treeProc is a process this program started (nginx's master, HAProxy, Fulcrum) counted with
// its children: nginx serves from a worker process.
type treeProc struct {
	*proc
	logPath string
	logf    *os.File
}

func startTree(ctx context.Context, cpus, logPath string, env []string, name string, args ...string) (*treeProc, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := pinned(ctx, cpus, name, args...)
	cmd.Env = append(os.Environ(), env...)
	// Cancelled (Ctrl-C): a SIGTERM lets nginx's master stop its worker too; SIGKILL would
	// leave the worker behind.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 15 * time.Second
	cmd.Stdout, cmd.Stderr = logf, logf
	p, err := startProc(cmd)
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return &treeProc{proc: p, logPath: logPath, logf: logf}, nil
}

func (t *treeProc) stop() {
	t.proc.stop()
	t.logf.Close()
}

func (t *treeProc) logTail() string {
	b, _ := os.ReadFile(t.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

func (t *treeProc) pids() []int {
	return descendants(t.cmd.Process.Pid)
}

func (t *treeProc) cpuTime() time.Duration {
	var sum time.Duration
	for _, pid := range t.pids() {
		sum += cpuTime(pid)
	}
	return sum
}

// pssKiB is the proportional set size of the process and its children, from smaps_rollup.
func (t *treeProc) pssKiB() int64 {
	var sum int64
	for _, pid := range t.pids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "Pss:" {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				sum += v
			}
		}
	}
	return sum
}

// descendants is pid and every process below it (from /proc/*/stat's parent field).
func descendants(root int) []int {
	ents, _ := os.ReadDir("/proc")
	children := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pid)
	}
	out := []int{root}
	for i := 0; i < len(out) && i < 1000; i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}

const clockTicks = 100 // USER_HZ on Linux

// coreTicks is the busy time of one core (user+nice+system+irq+softirq+steal) in clock ticks,
// or -1 when cpus is not a single core.
func coreTicks(cpus string) int64 {
	if _, err := strconv.Atoi(cpus); err != nil {
		return -1
	}
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 9 || f[0] != "cpu"+cpus {
			continue
		}
		var sum int64
		for _, i := range []int{1, 2, 3, 6, 7, 8} {
			v, _ := strconv.ParseInt(f[i], 10, 64)
			sum += v
		}
		return sum
	}
	return -1
}

// waitGet polls url until it answers 200, the process exits, or limit passes.
func waitGet(ctx context.Context, c *http.Client, url string, p *treeProc, limit time.Duration) error {
	late, err := pollGet(ctx, c, url, func(status int) bool { return status == http.StatusOK }, p.exited, 100*time.Millisecond, limit)
	if late {
		return fmt.Errorf("%s not answering 200 within %v: %w", url, limit, err)
	}
	return err
}

var (
	h2Finished = regexp.MustCompile(`(?m)^finished in ([\d.]+)(ms|s), ([\d.]+) req/s`)
	h2Requests = regexp.MustCompile(`(?m)^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout`)
	h2Status   = regexp.MustCompile(`(?m)^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx`)
	h2Proto    = regexp.MustCompile(`(?m)^Application protocol: (\S+)`)
)

func parseWrkRun(s string) (peerRun, error) { return parseRun("wrk", s, parseWrk) }

func parseHeyRun(s string) (peerRun, error) { return parseRun("hey", s, parseHey) }

// parseRun reads tool's output s with parse into a peer run, which must have made requests.
func parseRun(tool, s string, parse func(string) (result, error)) (peerRun, error) {
	res, err := parse(s)
	if err != nil {
		return peerRun{}, err
	}
	r := peerRun{requests: res.requests, errors: res.errors, rps: res.rps, p99: res.p99}
	if r.requests == 0 {
		return r, fmt.Errorf("%s made no request:\n%s", tool, s)
	}
	return r, nil
}

func parseH2load(s string) (peerRun, error) {
	var r peerRun
	m := h2Requests.FindStringSubmatch(s)
	f := h2Finished.FindStringSubmatch(s)
	if m == nil || f == nil {
		return r, fmt.Errorf("cannot read h2load output:\n%s", s)
	}
	n := func(x string) int64 { v, _ := strconv.ParseInt(x, 10, 64); return v }
	r.requests = n(m[3])
	r.errors = n(m[5]) + n(m[6]) + n(m[7])
	if st := h2Status.FindStringSubmatch(s); st != nil {
		r.errors += n(st[2]) + n(st[3]) + n(st[4])
	}
	if p := h2Proto.FindStringSubmatch(s); p == nil || p[1] != "h2" {
		return r, fmt.Errorf("h2load did not speak h2:\n%s", s)
	}
	r.rps, _ = strconv.ParseFloat(f[3], 64)
	if r.requests == 0 {
		return r, fmt.Errorf("h2load made no request:\n%s", s)
	}
	return r, nil
}

// versions names what ran: the column titles with the proxies' versions, and the tools.
func versions(o peersOptions) (map[string]string, string) {
	first := func(argv ...string) string {
		out, _ := exec.Command(argv[0], argv[1:]...).CombinedOutput()
		l, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return l
	}
	titles := maps.Clone(peerTitle)
	var tools []string
	if v, ok := strings.CutPrefix(first("nginx", "-v"), "nginx version: nginx/"); ok {
		titles["nginx"] = "nginx " + v
	}
	if f := strings.Fields(first("haproxy", "-v")); slices.Contains(o.peers, "haproxy") && len(f) >= 3 {
		v, _, _ := strings.Cut(f[2], "-")
		titles["haproxy"] = "HAProxy " + v
	}
	if slices.Contains(o.peers, "fulcrum") {
		tools = append(tools, first(o.fulcrum, "--version"))
	}
	if f := strings.Fields(first("wrk", "-v")); len(f) >= 2 {
		tools = append(tools, "wrk "+strings.TrimPrefix(f[1], "debian/"))
	}
	if s := first("h2load", "--version"); s != "" {
		tools = append(tools, s)
	}
	if s, err := exec.Command("dpkg-query", "-W", "-f=${Version}", "hey").Output(); err == nil {
		tools = append(tools, "hey "+string(s))
	}
	return titles, strings.Join(tools, "; ")
}

var peerTitle = map[string]string{"nginx": "nginx", "haproxy": "HAProxy", "fulcrum": "Fulcrum"}

// scenarioRow is how a scenario is reported: its label, the figure of a run, and which way is
// better.
type scenarioRow struct {
	label  func(o peersOptions) string
	value  func(r peerRun) float64
	higher bool
	format func(v float64) string
}

func kfmt(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%.1fk", v/1000)
	}
	return fmt.Sprintf("%.0f", v)
}

var scenarioRows = map[string]scenarioRow{
	"h1": {func(o peersOptions) string { return fmt.Sprintf("h1 keep-alive, %d conns", o.conns) },
		peerRun.perCPUSecond, true, kfmt},
	"tls": {func(o peersOptions) string { return fmt.Sprintf("HTTPS (TLS 1.3), %d conns", o.conns) },
		peerRun.perCPUSecond, true, kfmt},
	"h2": {func(peersOptions) string { return "h2, 16 conns x 32 streams" },
		peerRun.perCPUSecond, true, kfmt},
	"rate": {func(o peersOptions) string {
		return fmt.Sprintf("proxy CPU µs per request at %s req/s (hey)", thousands(o.rate))
	}, peerRun.usPerRequest, false, func(v float64) string { return fmt.Sprintf("%.1f", v) }},
	"idle": {func(o peersOptions) string {
		return fmt.Sprintf("KiB per idle keep-alive connection (%s)", thousands(o.idleConns))
	}, func(r peerRun) float64 { return r.kibPerConn }, false, func(v float64) string { return fmt.Sprintf("%.2f", v) }},
	"idle-tls": {func(o peersOptions) string {
		return fmt.Sprintf("KiB per idle TLS connection (%s)", thousands(o.idleConns))
	}, func(r peerRun) float64 { return r.kibPerConn }, false, func(v float64) string { return fmt.Sprintf("%.2f", v) }},
}

func thousands(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

func medianFloat(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return medianOf(xs)
}

// writePeersReport prints the summary table (as the README's) and the details.
func writePeersReport(out io.Writer, o peersOptions, titles map[string]string, tools string, results peerResults) {
	others := slices.DeleteFunc(slices.Clone(o.peers), func(p string) bool { return p == "fulcrum" })
	withRatio := slices.Contains(o.peers, "fulcrum") && len(others) > 0
	fmt.Fprintf(out, "Requests per second of proxy CPU (higher is better); proxy CPU per request at a fixed rate and KiB per idle connection (lower is better). Median of %d interleaved repetition(s), each proxy pinned to the same core.\n\n", o.reps)
	fmt.Fprint(out, "| scenario |")
	for _, p := range o.peers {
		fmt.Fprintf(out, " %s |", titles[p])
	}
	if withRatio {
		fmt.Fprint(out, " Fulcrum vs best |")
	}
	fmt.Fprint(out, "\n|---|")
	for range o.peers {
		fmt.Fprint(out, "---:|")
	}
	if withRatio {
		fmt.Fprint(out, "---:|")
	}
	fmt.Fprintln(out)
	for _, sc := range o.only {
		row := scenarioRows[sc]
		fmt.Fprintf(out, "| %s |", row.label(o))
		med := map[string]float64{}
		for _, p := range o.peers {
			var vs []float64
			for _, r := range results[sc][p] {
				vs = append(vs, row.value(r))
			}
			med[p] = medianFloat(vs)
			fmt.Fprintf(out, " %s |", row.format(med[p]))
		}
		if withRatio {
			// Paired: the ratio within each interleaved repetition, then the median of those,
			// which cancels the slow drift of a shared machine better than a ratio of medians.
			var ratios []float64
			for i := range results[sc]["fulcrum"] {
				rep := map[string]float64{}
				for _, p := range o.peers {
					if i < len(results[sc][p]) {
						rep[p] = row.value(results[sc][p][i])
					}
				}
				if v, ok := vsBest(row.higher, rep["fulcrum"], others, rep); ok {
					ratios = append(ratios, v)
				}
			}
			ratio := "—"
			if len(ratios) > 0 {
				ratio = fmt.Sprintf("%.2f", medianFloat(ratios))
			}
			fmt.Fprintf(out, " %s |", ratio)
		}
		fmt.Fprintln(out)
	}
	if withRatio {
		fmt.Fprintln(out, "\nFulcrum vs best: Fulcrum's figure against the best of the other proxies, so that above 1.00 Fulcrum does better on every row (Fulcrum ÷ best where higher is better, best ÷ Fulcrum where lower is better); taken within each repetition, then the median.")
	}

	var load, idle []string
	for _, sc := range o.only {
		for _, p := range o.peers {
			rs := results[sc][p]
			if len(rs) == 0 {
				continue
			}
			var a, b, c, d []float64
			var errs int64
			opened := 0
			for _, r := range rs {
				errs += r.errors
				opened = max(opened, r.open)
				if sc == "idle" || sc == "idle-tls" {
					a, b = append(a, r.baseMiB), append(b, r.memMiB)
				} else {
					a, b, c, d = append(a, r.rps), append(b, float64(r.p99)), append(c, r.cpuPct()), append(d, r.othersPct)
				}
			}
			if sc == "idle" || sc == "idle-tls" {
				idle = append(idle, fmt.Sprintf("| %s | %s | %.1f | %.1f | %s | %d |", sc, titles[p], medianFloat(a), medianFloat(b), thousands(opened), errs))
				continue
			}
			p99 := "-" // h2load reports no percentiles
			if v := medianFloat(b); v > 0 {
				p99 = time.Duration(v).Round(10 * time.Microsecond).String()
			}
			load = append(load, fmt.Sprintf("| %s | %s | %.0f | %s | %.0f | %.0f | %d |", sc, titles[p], medianFloat(a), p99, medianFloat(c), medianFloat(d), errs))
		}
	}
	if len(load) > 0 {
		fmt.Fprintln(out, "\nUnder load (medians; others % = CPU that other processes took on the proxy core during the measurement: the run's noise):")
		fmt.Fprintln(out, "\n| scenario | proxy | req/s | p99 | proxy CPU % | others % | errors |\n|---|---|---:|---:|---:|---:|---:|")
		fmt.Fprintln(out, strings.Join(load, "\n"))
	}
	if len(idle) > 0 {
		fmt.Fprintln(out, "\nIdle connections (PSS of the proxy and its children, /proc/PID/smaps_rollup, medians):")
		fmt.Fprintln(out, "\n| scenario | proxy | MiB before | MiB with the connections | connections open | failed |\n|---|---|---:|---:|---:|---:|")
		fmt.Fprintln(out, strings.Join(idle, "\n"))
	}
	pin := fmt.Sprintf("Proxies on CPU %s (one worker or thread; GOMAXPROCS=1 for Fulcrum); origin (nginx, one worker, `return 200` with a 100-byte body) and load generators on CPU %s", o.proxyCPU, o.otherCPUs)
	if o.proxyCPU == "" {
		pin = "Nothing pinned (fewer than 2 CPUs)"
	}
	fmt.Fprintf(out, "\n%s; %s per run after %s of warm-up. %s\n", pin, o.duration, o.warmup, tools)
}

// vsBest compares Fulcrum's figure with the best of the other proxies' (1 = as good, above 1
// better).
func vsBest(higher bool, ours float64, others []string, figs map[string]float64) (float64, bool) {
	best := -1.0
	for _, p := range others {
		if v := figs[p]; v > 0 && (best < 0 || (higher && v > best) || (!higher && v < best)) {
			best = v
		}
	}
	switch {
	case best <= 0 || ours <= 0:
		return 0, false
	case higher:
		return ours / best, true
	default:
		return best / ours, true
	}
}
