package listener

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// load sends requests at about rate per second until ctx ends, and counts outcomes.
type load struct {
	ok, failed atomic.Int64
	firstErr   atomic.Value
}

func runLoad(ctx context.Context, c *http.Client, url string, rate, workers int, l *load) *sync.WaitGroup {
	var wg sync.WaitGroup
	tick := time.Second * time.Duration(workers) / time.Duration(rate)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(tick)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				req, _ := http.NewRequestWithContext(context.Background(), "GET", url, nil)
				resp, err := c.Do(req)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode == 200 {
						l.ok.Add(1)
						continue
					}
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
				l.failed.Add(1)
				l.firstErr.CompareAndSwap(nil, err.Error())
			}
		}()
	}
	return &wg
}

// TestReloadUnderLoad: 20 reloads during 10 s of ~1,000 req/s — zero failed requests, a WebSocket
// opened before the first reload still echoes after the last, no goroutine growth.
func TestReloadUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("10 s load test")
	}
	dir := t.TempDir()
	b1, b2 := backend(t, "b1"), backend(t, "b2")
	addr := configtest.Addr(t)
	cfgText := func(i int) string {
		// Each generation changes something real: a header value, and every other one the targets.
		targets := fmt.Sprintf("[%q, %q]", hostOf(b1), hostOf(b2))
		if i%2 == 1 {
			targets = fmt.Sprintf("[%q]", hostOf(b1))
		}
		return header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = %s
deregistration_delay = "1s"
[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
[[listeners.rules]]
priority = 1
paths = ["/*"]
forward = "web"
request_headers = { set = { "x-generation" = "%d" } }
`, targets, addr, i)
	}
	rt := startRuntime(t, loadConfig(t, dir, cfgText(0)), nil)
	c := clientFrom("127.0.0.1")
	// Warm up at the test's concurrency, so everything lazily started exists before the baseline.
	warm, cancelWarm := context.WithTimeout(context.Background(), time.Second)
	runLoad(warm, c, "http://"+addr+"/", 1000, 20, &load{}).Wait()
	cancelWarm()
	// Idle keep-alive connections are not a leak: close them on both sides before counting.
	quiesce := func() {
		c.CloseIdleConnections()
		b1.CloseClientConnections()
		b2.CloseClientConnections()
	}
	quiesce()
	time.Sleep(100 * time.Millisecond) // let closed connections' goroutines exit: nothing to wait on
	baseline := runtime.NumGoroutine()

	ws, err := echo.DialWebSocket(context.Background(), "ws://"+addr+"/ws", nil)
	if err != nil {
		t.Fatalf("websocket through the proxy: %v", err)
	}
	defer ws.Close()
	roundTrip := func(msg string) {
		t.Helper()
		if err := ws.WriteText(msg); err != nil {
			t.Fatalf("websocket write: %v", err)
		}
		_, got, err := ws.ReadMessage()
		if err != nil || string(got) != msg {
			t.Fatalf("websocket echo = %q, %v; want %q", got, err, msg)
		}
	}
	roundTrip("before")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var l load
	wg := runLoad(ctx, c, "http://"+addr+"/", 1000, 20, &l)
	for i := 1; i <= 20; i++ {
		time.Sleep(450 * time.Millisecond) // spread the reloads over the load window
		if _, err := rt.Reload(context.Background(), loadConfig(t, dir, cfgText(i))); err != nil {
			t.Fatalf("reload %d: %v", i, err)
		}
	}
	wg.Wait()
	roundTrip("after")
	if l.failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed during reloads; first: %v", l.failed.Load(), l.ok.Load()+l.failed.Load(), l.firstErr.Load())
	}
	// The load must overlap the reloads, not prove a rate: a shared CI core under -race serves a
	// few hundred requests a second, and 20 reloads over 9 s need only that the load kept going.
	if l.ok.Load() < 200 {
		t.Fatalf("only %d requests in 10 s; the load did not run", l.ok.Load())
	}
	t.Logf("%d requests, 0 failed, 20 reloads", l.ok.Load())

	ws.Close()
	quiesce()
	// Retired generations finish on their own (deregistration delay 1 s); goroutines must come
	// back to the warmed-up level: twenty generations must not leave twenty sets behind.
	var now int
	deadline := time.Now().Add(10 * time.Second)
	for now = runtime.NumGoroutine(); now > baseline+5; now = runtime.NumGoroutine() {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines: %d warmed up, %d after reloads\n%s", baseline, now, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("goroutines: %d warmed up, %d after 20 reloads", baseline, now)
}

// TestTargetKilledUnderLoad: a target that dies leaves the rotation within the health-check
// budget, and clients see no more failures than the retry rule allows (none for GETs: a refused
// dial is retried on another target).
func TestTargetKilledUnderLoad(t *testing.T) {
	dir := t.TempDir()
	b1 := backend(t, "b1")
	b2 := backend(t, "b2")
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q, %q]
health_check = { path = "/healthz", interval = "300ms", timeout = "250ms", unhealthy_threshold = 2, healthy_threshold = 2 }
[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
`, hostOf(b1), hostOf(b2), addr))
	rt := startRuntime(t, cfg, nil)
	c := clientFrom("127.0.0.1")
	// Load first, so both targets hold pooled keep-alive connections; the kill then closes them
	// between requests. A request the target was answering at the very instant it died gets 502
	// (as from ALB); the test is about what follows: stale pooled connections and refused dials
	// must be retried on the live target until health takes the dead one out.
	warm, stopWarm := context.WithTimeout(context.Background(), 500*time.Millisecond)
	var before load
	runLoad(warm, c, "http://"+addr+"/", 500, 10, &before).Wait()
	stopWarm()
	if before.failed.Load() != 0 || before.ok.Load() == 0 {
		t.Fatalf("before the kill: %d ok, %d failed (first: %v)", before.ok.Load(), before.failed.Load(), before.firstErr.Load())
	}
	killed := time.Now()
	b2.CloseClientConnections()
	b2.Close()
	// The live target's checks must not time out on a loaded -race machine (a 50 ms timeout did,
	// leaving no healthy target and answering 503); the killed one is refused at once anyway.
	ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
	defer cancel()
	var l load
	wg := runLoad(ctx, c, "http://"+addr+"/", 500, 10, &l)
	g := rt.set.Group("web")
	var b2Target string = hostOf(b2)
	configtest.WaitFor(t, 3*time.Second, "the killed target marked down", func() bool {
		for _, tg := range g.Targets() {
			if st := tg.Status(); st.Address == b2Target {
				return !st.Healthy
			}
		}
		return false
	})
	t.Logf("target marked down %v after it was killed", time.Since(killed))
	wg.Wait()
	if l.failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed (first: %v); refused dials must be retried on the live target", l.failed.Load(), l.failed.Load()+l.ok.Load(), l.firstErr.Load())
	}
}

// TestRefusedReloadKeepsCertificates: a reload that swaps a listener's certificate but fails
// later (a target group whose ca_file does not exist, found only when groups are built) changes
// nothing: the listener keeps presenting the old certificate, and no new one is served.
func TestRefusedReloadKeepsCertificates(t *testing.T) {
	dir := t.TempDir()
	be := backend(t, "be")
	addr := configtest.Addr(t)
	conf := func(cert, extra string) string {
		return header(dir) + fmt.Sprintf(`
[[authorities]]
name = "internal"
common_name = "Reload Test CA"

[[certificates]]
name = %q
domains = ["%s.example.test"]
authority = "internal"

[[target_groups]]
name = "be"
protocol = "http"
targets = [%q]
%s
[[listeners]]
name = "tls"
style = "application"
protocol = "https"
address = %q
certificates = [%q]
default_action = { forward = "be" }
`, cert, cert, hostOf(be), extra, addr, cert)
	}
	rt := startRuntime(t, loadConfig(t, dir, conf("old", "")), nil)
	pool := x509.NewCertPool()
	pool.AddCert(rt.Certs().Authority("internal").Cert)
	served := func() string {
		t.Helper()
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "old.example.test", InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].DNSNames[0]
	}
	if got := served(); got != "old.example.test" {
		t.Fatalf("before the reload the listener serves %q", got)
	}

	broken := conf("new", `
[[target_groups]]
name = "re-encrypt"
protocol = "https"
targets = ["127.0.0.1:1"]
tls = { ca_file = "no-such-ca.pem" }
`)
	_, err := rt.Reload(context.Background(), loadConfig(t, dir, broken))
	if err == nil || !strings.Contains(err.Error(), "no-such-ca.pem") {
		t.Fatalf("reload with a missing ca_file: err = %v, want it refused naming the file", err)
	}
	if got := served(); got != "old.example.test" {
		t.Fatalf("after a refused reload the listener serves %q, want the old certificate", got)
	}
	for _, ci := range rt.Certs().List() {
		if ci.Name == "new" {
			t.Fatalf("a refused reload installed certificate %q", ci.Name)
		}
	}

	// The same swap without the broken group applies.
	if _, err := rt.Reload(context.Background(), loadConfig(t, dir, conf("new", ""))); err != nil {
		t.Fatalf("good reload: %v", err)
	}
	if got := served(); got != "new.example.test" {
		t.Fatalf("after the good reload the listener serves %q", got)
	}
}

// TestReloadAddsAndRemovesListeners: a reload that removes one listener and adds another lets
// the request in flight on the removed one finish, closes its socket before Reload returns, and
// serves on the new one; a listener that changes kind at one address keeps its socket.
func TestReloadAddsAndRemovesListeners(t *testing.T) {
	dir := t.TempDir()
	arrived, release := make(chan struct{}, 1), make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/slow" { // health checks
			return
		}
		arrived <- struct{}{}
		<-release
		w.Write([]byte("slow done"))
	}))
	defer slow.Close()
	fast := backend(t, "fast")
	oldAddr, newAddr := configtest.Addr(t), configtest.Addr(t)
	conf := func(name, addr, group string) string {
		return header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "slow"
protocol = "http"
targets = [%q]

[[target_groups]]
name = "fast"
protocol = "http"
targets = [%q]

[[listeners]]
name = %q
style = "application"
protocol = "http"
address = %q
default_action = { forward = %q }
`, hostOf(slow), hostOf(fast), name, addr, group)
	}
	rt := startRuntime(t, loadConfig(t, dir, conf("old", oldAddr, "slow")), nil)
	c := clientFrom("127.0.0.1")

	type result struct {
		status int
		body   string
		err    error
	}
	inflight := make(chan result, 1)
	go func() {
		resp, err := c.Get("http://" + oldAddr + "/slow")
		if err != nil {
			inflight <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		inflight <- result{resp.StatusCode, string(b), err}
	}()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the request never reached the back end")
	}

	oldSock := rt.Sockets()[oldAddr]
	ch, err := rt.Reload(context.Background(), loadConfig(t, dir, conf("new", newAddr, "fast")))
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	if !slices.Equal(ch.Added, []string{"new"}) || !slices.Equal(ch.Removed, []string{"old"}) || len(ch.Updated) != 0 {
		t.Fatalf("changes: %+v", ch)
	}
	// Asked of the socket, not its port: a free port may go to another test process at once.
	if _, err := oldSock.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("the removed listener's socket is still open: Accept = %v", err)
	}
	if s, who, _ := get(t, c, newReq(t, "GET", "http://"+newAddr+"/")); s != 200 || who != "fast" {
		t.Fatalf("the added listener: %d %q", s, who)
	}
	close(release)
	select {
	case r := <-inflight:
		if r.err != nil || r.status != 200 || r.body != "slow done" {
			t.Fatalf("the request in flight on the removed listener: %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the request in flight on the removed listener never finished")
	}

	// The same address as a network listener: the socket stays, the new kind serves it.
	l4conf := header(dir) + fmt.Sprintf(`
[[target_groups]]
name = "fast"
protocol = "tcp"
targets = [%q]

[[listeners]]
name = "new"
style = "network"
protocol = "tcp"
address = %q
forward = "fast"
`, hostOf(fast), newAddr)
	if ch, err = rt.Reload(context.Background(), loadConfig(t, dir, l4conf)); err != nil {
		t.Fatalf("reload to a network listener: %v", err)
	}
	if !slices.Equal(ch.Updated, []string{"new"}) {
		t.Fatalf("changes: %+v", ch)
	}
	c4 := clientFrom("127.0.0.1")
	defer c4.CloseIdleConnections() // a stream through a network listener lasts as long as the client keeps it
	if s, who, _ := get(t, c4, newReq(t, "GET", "http://"+newAddr+"/")); s != 200 || who != "fast" {
		t.Fatalf("through the network listener: %d %q", s, who)
	}
}
