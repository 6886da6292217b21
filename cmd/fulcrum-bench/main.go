// Command fulcrum-bench is Fulcrum's load-test recipe as a program: it starts sample back ends,
// starts Fulcrum pinned to one core with a generated configuration (plain HTTP, HTTPS with a
// certificate from the built-in authority, TCP pass-through), drives a fixed load through each
// listener with wrk or hey, and prints requests/s, p50/p99 and errors next to the same load sent
// straight to a back end. Everything stays on loopback and every run is bounded in time.
//
// It builds nothing: give it the binaries (make bench builds them first).
//
//	fulcrum-bench -fulcrum bin/fulcrum -echo bin/fulcrum-echo [-duration 10s] [-conns 64]
//	              [-loader auto|wrk|hey] [-observe on|off|both] [-reps 1] [-scenarios direct,http,https,tcp]
//
//	fulcrum-bench peers [-only h1,tls,h2,rate,idle,idle-tls] [-peers nginx,haproxy,fulcrum] [-reps 3] [-duration 10s]
//
// peers runs Fulcrum side by side with nginx and HAProxy, each pinned to the same core, and prints
// requests per proxy CPU-second and KiB per idle connection as markdown (peers.go; make bench-peers).
//
// -observe both runs two Fulcrums on the same core at the same time, one with metrics and access
// logs off and one with both on, each under its own copy of the load, and prints their ratio of
// requests/s and of CPU per request, to check that observation costs less than 5 %.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
)

type options struct {
	fulcrum, echoBin    string
	duration, warmup    time.Duration
	conns, backends     int
	loader, observe     string
	reps                int
	scenarios           []string
	path                string
	proxyCPU, otherCPUs string
	keep                bool
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "peers" {
		// Side by side with nginx and HAProxy (peers.go). Ctrl-C stops every process it started.
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := runPeers(ctx, os.Args[2:], os.Stdout, os.Stderr)
		stop()
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "fulcrum-bench peers:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "fulcrum-bench:", err)
		os.Exit(1)
	}
}

func run(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("fulcrum-bench", flag.ContinueOnError)
	var o options
	var scen string
	fs.StringVar(&o.fulcrum, "fulcrum", "bin/fulcrum", "fulcrum binary")
	fs.StringVar(&o.echoBin, "echo", "", "fulcrum-echo binary for the back ends (default: back ends in this process)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measured load per scenario")
	fs.DurationVar(&o.warmup, "warmup", 2*time.Second, "unmeasured load before each measurement")
	fs.IntVar(&o.conns, "conns", 64, "concurrent connections of the load generator")
	fs.IntVar(&o.backends, "backends", 3, "number of sample back ends")
	fs.StringVar(&o.loader, "loader", "auto", "load generator: wrk, hey or auto (wrk if installed)")
	fs.StringVar(&o.observe, "observe", "on", "metrics and access log: on, off or both (interleaved, with the ratio)")
	fs.IntVar(&o.reps, "reps", 1, "repetitions (medians are reported)")
	fs.StringVar(&scen, "scenarios", "direct,http,https,tcp", "comma-separated: direct, http, https, tcp")
	fs.StringVar(&o.path, "path", "/bytes/100", "request path (the echo back end answers /bytes/N with N bytes)")
	fs.StringVar(&o.proxyCPU, "proxy-cpu", "1", "CPU Fulcrum is pinned to (taskset -c), GOMAXPROCS=1; \"\" to not pin")
	fs.StringVar(&o.otherCPUs, "other-cpus", "0", "CPUs for the load generator and back ends; \"\" to not pin")
	fs.BoolVar(&o.keep, "keep", false, "keep the scratch directory (config, access log, Fulcrum's log)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.scenarios = strings.Split(scen, ",")
	if o.duration <= 0 || o.duration > 10*time.Minute || o.conns < 1 || o.reps < 1 || o.backends < 1 {
		return errors.New("-duration must be in (0, 10m], -conns, -reps and -backends at least 1")
	}
	if _, err := os.Stat(o.fulcrum); err != nil {
		return fmt.Errorf("fulcrum binary: %w (run `make build` or pass -fulcrum)", err)
	}
	var err error
	if o.loader, err = pickLoader(o.loader); err != nil {
		return err
	}
	if _, err := exec.LookPath("taskset"); err != nil || runtime.NumCPU() < 2 {
		fmt.Fprintln(out, "note: taskset missing or fewer than 2 CPUs: nothing is pinned")
		o.proxyCPU, o.otherCPUs = "", ""
	}

	scratch, err := os.MkdirTemp("", "fulcrum-bench-")
	if err != nil {
		return err
	}
	if o.keep {
		fmt.Fprintln(out, "scratch:", scratch)
	} else {
		defer os.RemoveAll(scratch)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()

	backs, err := startBackends(ctx, o, scratch)
	if err != nil {
		return err
	}
	defer backs.stop()

	modes := []string{o.observe}
	if o.observe == "both" {
		modes = []string{"off", "on"}
	} else if o.observe != "on" && o.observe != "off" {
		return fmt.Errorf("-observe %q: want on, off or both", o.observe)
	}

	fmt.Fprintf(out, "fulcrum-bench: %s, %d conns, %s per run (+%s warm-up), %d back ends, path %s, Fulcrum on CPU %q (GOMAXPROCS=1), load+back ends on CPU %q, %d rep(s)\n\n",
		o.loader, o.conns, o.duration, o.warmup, o.backends, o.path, o.proxyCPU, o.otherCPUs, o.reps)

	// With -observe both, the two Fulcrums run at the same time, pinned to the same core, each
	// under its own copy of the load: the kernel gives each half the core, so the one that spends
	// less CPU per request serves more, and whatever else the machine does at that moment hits
	// both alike. Measured one after the other, runs on a shared machine drift by ±25 %, far
	// more than the few per cent this comparison looks for.
	procs := map[string]*fulcrumProc{}
	defer func() {
		for _, fl := range procs {
			fl.stop()
		}
	}()
	for _, mode := range modes {
		dir := filepath.Join(scratch, "observe-"+mode) // own config, state and log per process
		if err := os.Mkdir(dir, 0o700); err != nil {
			return err
		}
		fl, err := startFulcrum(ctx, o, dir, backs.addrs, mode == "on")
		if err != nil {
			return err
		}
		procs[mode] = fl
	}
	results := map[string][]result{} // key: scenario/mode
	for rep := 0; rep < o.reps; rep++ {
		if slices.Contains(o.scenarios, "direct") {
			r, err := drive(ctx, o, "http://"+backs.addrs[0]+o.path, 0)
			if err != nil {
				return fmt.Errorf("direct: %w", err)
			}
			results["direct/-"] = append(results["direct/-"], r)
			fmt.Fprintf(os.Stderr, "rep %d direct: %s\n", rep+1, r)
		}
		for _, sc := range []string{"http", "https", "tcp"} {
			if !slices.Contains(o.scenarios, sc) {
				continue
			}
			rs, errs := make([]result, len(modes)), make([]error, len(modes))
			var wg sync.WaitGroup
			for i, mode := range modes {
				fl := procs[mode]
				wg.Go(func() { rs[i], errs[i] = drive(ctx, o, fl.urls[sc]+o.path, fl.p.cmd.Process.Pid) })
			}
			wg.Wait()
			for i, mode := range modes {
				if errs[i] != nil {
					return fmt.Errorf("%s (%s): %w", sc, mode, errs[i])
				}
				results[sc+"/"+mode] = append(results[sc+"/"+mode], rs[i])
				fmt.Fprintf(os.Stderr, "rep %d %s observe=%s: %s\n", rep+1, sc, mode, rs[i])
			}
		}
	}
	if fl := procs["on"]; fl != nil {
		if n, err := fl.countedRequests(); err == nil {
			fmt.Fprintf(os.Stderr, "fulcrum_http_requests_total of the observed Fulcrum (all listeners, with warm-ups) = %.0f\n", n)
		}
	}
	for mode, fl := range procs {
		delete(procs, mode)
		if err := fl.stop(); err != nil {
			return err
		}
	}
	report(out, o, modes, results)
	return nil
}

func pickLoader(want string) (string, error) {
	switch want {
	case "auto":
		for _, l := range []string{"wrk", "hey"} {
			if _, err := exec.LookPath(l); err == nil {
				return l, nil
			}
		}
		return "", errors.New("neither wrk nor hey is installed (apt-get install wrk hey)")
	case "wrk", "hey":
		if _, err := exec.LookPath(want); err != nil {
			return "", fmt.Errorf("%s is not installed", want)
		}
		return want, nil
	}
	return "", fmt.Errorf("-loader %q: want wrk, hey or auto", want)
}

// pinned prefixes a command with taskset when cpus is set.
func pinned(ctx context.Context, cpus string, name string, args ...string) *exec.Cmd {
	if cpus == "" {
		return exec.CommandContext(ctx, name, args...)
	}
	return exec.CommandContext(ctx, "taskset", append([]string{"-c", cpus, name}, args...)...)
}

// backends are the sample origins: fulcrum-echo processes, or echo servers in this process.
type backends struct {
	addrs []string
	stop  func()
}

func startBackends(ctx context.Context, o options, scratch string) (*backends, error) {
	b := &backends{}
	var stops []func()
	b.stop = func() {
		for _, s := range stops {
			s()
		}
	}
	addrs, err := freeAddrs(o.backends)
	if err != nil {
		return nil, err
	}
	alive := map[string]func() error{}
	for i, addr := range addrs {
		name := fmt.Sprintf("backend-%d", i+1)
		if o.echoBin != "" {
			cmd := pinned(ctx, o.otherCPUs, o.echoBin, "-listen", addr, "-name", name)
			logf, _ := os.Create(filepath.Join(scratch, name+".log"))
			cmd.Stdout, cmd.Stderr = logf, logf
			p, err := startProc(cmd)
			if err != nil {
				b.stop()
				return nil, fmt.Errorf("start %s: %w", o.echoBin, err)
			}
			alive[addr] = p.exited
			stops = append(stops, func() { p.stop(); logf.Close() })
		} else {
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				b.stop()
				return nil, err
			}
			srv := &http.Server{Handler: echo.Handler(name), ReadHeaderTimeout: 10 * time.Second}
			go srv.Serve(ln)
			stops = append(stops, func() { srv.Close() })
		}
		b.addrs = append(b.addrs, addr)
	}
	for _, a := range b.addrs {
		if err := waitHTTP(ctx, "http://"+a+"/healthz", alive[a], 10*time.Second); err != nil {
			b.stop()
			return nil, fmt.Errorf("back end %s: %w", a, err)
		}
	}
	return b, nil
}

// freeAddrs reserves n distinct loopback ports (all held open together, then released).
func freeAddrs(n int) ([]string, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	out := make([]string, 0, n)
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		out = append(out, ln.Addr().String())
	}
	return out, nil
}

// proc is a child process this program started; done is closed when it has exited.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func startProc(cmd *exec.Cmd) (*proc, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *proc) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("exited: %v", p.err)
	default:
		return nil
	}
}

// stop sends SIGTERM to the child (by its pid) and waits for it, SIGKILL after 15 s.
func (p *proc) stop() error {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	return p.err
}

func waitHTTP(ctx context.Context, url string, alive func() error, limit time.Duration) error {
	c := &http.Client{Timeout: 2 * time.Second}
	late, err := pollGet(ctx, c, url, func(status int) bool { return status < 500 }, alive, 50*time.Millisecond, limit)
	if late {
		return fmt.Errorf("not answering within %v: %w", limit, err)
	}
	return err
}

// pollGet GETs url every interval until accept takes an answer's status (nil), alive (when not
// nil) reports the server gone (its error), ctx ends, or limit passes: then late is set and err
// is the last attempt's failure, for the caller to name.
func pollGet(ctx context.Context, c *http.Client, url string, accept func(status int) bool, alive func() error, interval, limit time.Duration) (late bool, err error) {
	deadline := time.Now().Add(limit)
	for {
		resp, err := c.Get(url)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if accept(resp.StatusCode) {
				return false, nil
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		if alive != nil {
			if perr := alive(); perr != nil {
				return false, perr
			}
		}
		if time.Now().After(deadline) {
			return true, err
		}
		if err := sleepCtx(ctx, interval); err != nil {
			return false, err
		}
	}
}

// fulcrumProc is one Fulcrum process with its three listeners.
type fulcrumProc struct {
	p     *proc
	urls  map[string]string
	admin string
	logf  *os.File
}

func startFulcrum(ctx context.Context, o options, scratch string, targets []string, observe bool) (*fulcrumProc, error) {
	addrs, err := freeAddrs(4)
	if err != nil {
		return nil, err
	}
	httpAddr, httpsAddr, tcpAddr, adminAddr := addrs[0], addrs[1], addrs[2], addrs[3]
	admin, accessLog := "", ""
	if observe {
		admin, accessLog = adminAddr, filepath.Join(scratch, "access.log")
	}
	q := make([]string, len(targets))
	for i, t := range targets {
		q[i] = strconv.Quote(t)
	}
	cfg := fmt.Sprintf(`# generated by fulcrum-bench
[server]
admin = %q
state_dir = %q
shutdown_timeout = "5s"
access_log = %q
log_level = "warn"

[keystore]
type = "software"

[[authorities]]
name = "bench-ca"
common_name = "Fulcrum Bench CA"

[[certificates]]
name = "bench"
domains = ["localhost", "127.0.0.1"]
authority = "bench-ca"

[[target_groups]]
name = "web"
protocol = "http"
targets = [%s]

[[target_groups]]
name = "raw"
protocol = "tcp"
targets = [%s]

[[listeners]]
name = "http"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }

[[listeners]]
name = "https"
style = "application"
protocol = "https"
address = %q
certificates = ["bench"]
default_action = { forward = "web" }

[[listeners]]
name = "tcp"
style = "network"
protocol = "tcp"
address = %q
forward = "raw"
`, admin, filepath.Join(scratch, "state"), accessLog, strings.Join(q, ", "), strings.Join(q, ", "), httpAddr, httpsAddr, tcpAddr)
	path := filepath.Join(scratch, "fulcrum.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(scratch, "fulcrum.log"))
	if err != nil {
		return nil, err
	}
	cmd := pinned(ctx, o.proxyCPU, o.fulcrum, "-config", path)
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	cmd.Stdout, cmd.Stderr = logf, logf
	p, err := startProc(cmd)
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("start fulcrum: %w", err)
	}
	f := &fulcrumProc{p: p, logf: logf, admin: admin, urls: map[string]string{
		"http": "http://" + httpAddr, "https": "https://" + httpsAddr, "tcp": "http://" + tcpAddr,
	}}
	if err := waitHTTP(ctx, f.urls["http"]+"/healthz", p.exited, 30*time.Second); err != nil {
		f.stop()
		b, _ := os.ReadFile(logf.Name())
		return nil, fmt.Errorf("fulcrum did not start: %w\n%s", err, b)
	}
	return f, nil
}

func (f *fulcrumProc) stop() error {
	err := f.p.stop()
	f.logf.Close()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		b, _ := os.ReadFile(f.logf.Name())
		return fmt.Errorf("fulcrum exited with %v\n%s", err, b)
	}
	return nil
}

// countedRequests sums fulcrum_http_requests_total from /metrics.
func (f *fulcrumProc) countedRequests() (float64, error) {
	if f.admin == "" {
		return 0, errors.New("no admin endpoint")
	}
	resp, err := http.Get("http://" + f.admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "fulcrum_http_requests_total{") {
			fs := strings.Fields(l)
			v, _ := strconv.ParseFloat(fs[len(fs)-1], 64)
			sum += v
		}
	}
	return sum, sc.Err()
}

// result is one measured run.
type result struct {
	rps      float64
	p50, p99 time.Duration
	requests int64
	errors   int64
	detail   string
	// cpuPerReq and cpuPct are the proxy's CPU per request and its CPU use (% of one core).
	cpuPerReq time.Duration
	cpuPct    float64
}

func (r result) String() string {
	return fmt.Sprintf("%.0f req/s, p50 %v, p99 %v, %d requests, %d errors%s, proxy CPU %.0f %% %v/req", r.rps, r.p50, r.p99, r.requests, r.errors, r.detail, r.cpuPct, r.cpuPerReq)
}

// drive warms up, then measures one load run against url. pid is the proxy's (0 for direct):
// the CPU time it used during the measurement gives CPU per request, a figure that noise from
// other processes on a shared machine moves much less than requests/s.
func drive(ctx context.Context, o options, url string, pid int) (result, error) {
	if o.warmup > 0 {
		if _, err := load(ctx, o, url, o.warmup); err != nil {
			return result{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	c0 := cpuTime(pid)
	r, err := load(ctx, o, url, o.duration)
	if c1 := cpuTime(pid); err == nil && c0 > 0 && r.requests > 0 {
		r.cpuPerReq = (c1 - c0) / time.Duration(r.requests)
		r.cpuPct = float64(c1-c0) / float64(o.duration) * 100
	}
	return r, err
}

// cpuTime is the user+system CPU time of a process (Linux /proc; 0 when unknown).
func cpuTime(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')') // the command name may contain spaces
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // fields 14 and 15 of stat, in clock ticks
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / ticks
}

func load(ctx context.Context, o options, url string, d time.Duration) (result, error) {
	cctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	var cmd *exec.Cmd
	secs := strconv.Itoa(max(1, int(d.Round(time.Second)/time.Second)))
	if o.loader == "wrk" {
		cmd = pinned(cctx, o.otherCPUs, "wrk", "-t1", "-c"+strconv.Itoa(o.conns), "-d"+secs+"s", "--latency", url)
	} else {
		cmd = pinned(cctx, o.otherCPUs, "hey", "-z", secs+"s", "-c", strconv.Itoa(o.conns), url)
	}
	outb, err := cmd.CombinedOutput()
	if err != nil {
		return result{}, fmt.Errorf("%s: %w\n%s", o.loader, err, outb)
	}
	if o.loader == "wrk" {
		return parseWrk(string(outb))
	}
	return parseHey(string(outb))
}

var (
	wrkRPS     = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	wrkPct     = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$`)
	wrkTotal   = regexp.MustCompile(`(\d+) requests in`)
	wrkNon2xx  = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkSockErr = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	heyRPS     = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	heyPct     = regexp.MustCompile(`(?m)^\s+(50|99)%+ in ([\d.]+) secs`)
	heyStatus  = regexp.MustCompile(`\[(\d{3})\]\s+(\d+) responses`)
	heyErrLine = regexp.MustCompile(`(?m)^\s+\[(\d+)\]\s+Get .*$`)
)

// parseRate reads the requests per second and the 50th and 99th percentile latencies from
// tool's output s: rps matches the rate, pct each percentile (its number, then its value),
// and unit is the duration a percentile's value counts (from pct's match).
func parseRate(tool, s string, rps, pct *regexp.Regexp, unit func(match []string) time.Duration) (result, error) {
	var r result
	m := rps.FindStringSubmatch(s)
	if m == nil {
		return r, fmt.Errorf("cannot read %s output:\n%s", tool, s)
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	for _, p := range pct.FindAllStringSubmatch(s, -1) {
		v, _ := strconv.ParseFloat(p[2], 64)
		d := time.Duration(v * float64(unit(p)))
		if p[1] == "50" {
			r.p50 = d
		} else {
			r.p99 = d
		}
	}
	return r, nil
}

func parseWrk(s string) (result, error) {
	r, err := parseRate("wrk", s, wrkRPS, wrkPct, func(p []string) time.Duration {
		return map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second, "m": time.Minute}[p[3]]
	})
	if err != nil {
		return r, err
	}
	if m := wrkTotal.FindStringSubmatch(s); m != nil {
		r.requests, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := wrkNon2xx.FindStringSubmatch(s); m != nil {
		n, _ := strconv.ParseInt(m[1], 10, 64)
		r.errors += n
		r.detail += fmt.Sprintf(" (non-2xx/3xx %d)", n)
	}
	if m := wrkSockErr.FindStringSubmatch(s); m != nil {
		for _, x := range m[1:] {
			n, _ := strconv.ParseInt(x, 10, 64)
			r.errors += n
		}
		r.detail += " (" + strings.TrimSpace(m[0]) + ")"
	}
	return r, nil
}

func parseHey(s string) (result, error) {
	r, err := parseRate("hey", s, heyRPS, heyPct, func([]string) time.Duration { return time.Second })
	if err != nil {
		return r, err
	}
	for _, st := range heyStatus.FindAllStringSubmatch(s, -1) {
		n, _ := strconv.ParseInt(st[2], 10, 64)
		r.requests += n
		if code, _ := strconv.Atoi(st[1]); code >= 400 {
			r.errors += n
		}
	}
	if i := strings.Index(s, "Error distribution:"); i >= 0 {
		for _, e := range heyErrLine.FindAllStringSubmatch(s[i:], -1) {
			n, _ := strconv.ParseInt(e[1], 10, 64)
			r.errors += n
			r.requests += n
		}
	}
	return r, nil
}

func median(rs []result) result {
	if len(rs) == 0 {
		return result{}
	}
	s := slices.Clone(rs)
	sort.Slice(s, func(i, j int) bool { return s[i].rps < s[j].rps })
	m := s[len(s)/2]
	var errs int64
	for _, r := range rs {
		errs += r.errors
	}
	m.errors = errs
	return m
}

func medianOf(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

func rd(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }

func report(out io.Writer, o options, modes []string, results map[string][]result) {
	direct := median(results["direct/-"])
	fmt.Fprintf(out, "| scenario | metrics+access log | req/s | p50 | p99 | errors | vs direct | proxy CPU | proxy CPU/req |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
	if len(results["direct/-"]) > 0 {
		fmt.Fprintf(out, "| direct (load -> back end) | - | %.0f | %v | %v | %d | 1.00 | - | - |\n", direct.rps, rd(direct.p50), rd(direct.p99), direct.errors)
	}
	for _, sc := range []string{"http", "https", "tcp"} {
		for _, mode := range modes {
			rs := results[sc+"/"+mode]
			if len(rs) == 0 {
				continue
			}
			m := median(rs)
			ratio := "-"
			if direct.rps > 0 {
				ratio = fmt.Sprintf("%.2f", m.rps/direct.rps)
			}
			fmt.Fprintf(out, "| %s | %s | %.0f | %v | %v | %d | %s | %.0f %% | %v |\n", sc, mode, m.rps, rd(m.p50), rd(m.p99), m.errors, ratio, m.cpuPct, m.cpuPerReq.Round(100*time.Nanosecond))
		}
	}
	if len(modes) == 2 {
		fmt.Fprintln(out, "\nobservation cost: on/off, both Fulcrums loaded at the same time on the same core; median over repetitions [min, max]:")
		for _, sc := range []string{"http", "https", "tcp"} {
			off, on := results[sc+"/off"], results[sc+"/on"]
			if len(off) == 0 || len(off) != len(on) {
				continue
			}
			rps, cpu := make([]float64, len(off)), make([]float64, 0, len(off))
			for i := range off {
				rps[i] = on[i].rps / off[i].rps
				if off[i].cpuPerReq > 0 && on[i].cpuPerReq > 0 {
					cpu = append(cpu, float64(on[i].cpuPerReq)/float64(off[i].cpuPerReq))
				}
			}
			// The verdict is on CPU per request: with both Fulcrums on one core, how the kernel
			// splits it between them (and between the two load generators on the other core)
			// moves requests/s by ±30 %, but not what each request costs.
			line := fmt.Sprintf("  %-5s", sc)
			if len(cpu) > 0 {
				d := (medianOf(cpu) - 1) * 100
				verdict := "within 5 %"
				if d > 5 {
					verdict = "MORE than 5 %"
				}
				line += fmt.Sprintf(" proxy CPU/request on/off = %.3f [%.3f, %.3f] (%+.1f %%, %s);", medianOf(cpu), slices.Min(cpu), slices.Max(cpu), d, verdict)
			}
			line += fmt.Sprintf(" req/s on/off = %.3f [%.3f, %.3f]", medianOf(rps), slices.Min(rps), slices.Max(rps))
			fmt.Fprintln(out, line)
		}
		fmt.Fprintln(out, "  (tcp listeners write no access log and count at scrape time: their ratio shows the noise floor;")
		fmt.Fprintln(out, "  the table above gives per-mode medians, which need not come from the same repetition)")
	}
	fmt.Fprintf(out, "\nFulcrum pinned to CPU %q with GOMAXPROCS=1; load generator (%s, %d conns) and back ends on CPU %q. direct = the load straight to one back end (plain HTTP).\n",
		o.proxyCPU, o.loader, o.conns, o.otherCPUs)
}
