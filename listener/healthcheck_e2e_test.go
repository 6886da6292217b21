package listener

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestHealthCheckIntervalOnly: a group that sets only a short health-check interval loads, and
// its checks time out at half the interval: a target that answers its checks later than that
// leaves the rotation, the prompt one serves everything.
func TestHealthCheckIntervalOnly(t *testing.T) {
	dir := t.TempDir()
	prompt := backend(t, "prompt")
	release := make(chan struct{})
	late := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			select { // far past the 500 ms a 1 s interval leaves, well within the default 2 s
			case <-time.After(1200 * time.Millisecond):
			case <-release:
			}
		}
		echo.Handler("late").ServeHTTP(w, r)
	}))
	defer late.Close()
	defer close(release)
	addr := configtest.Addr(t)
	rt := startRuntime(t, loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q, %q]
health_check = { path = "/healthz", interval = "1s", unhealthy_threshold = 1, healthy_threshold = 1 }

[[listeners]]
name = "web"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
`, hostOf(prompt), hostOf(late), addr)), nil)
	if got := rt.Config().Group("web").HealthCheck.TimeoutDuration(); got != 500*time.Millisecond {
		t.Fatalf("timeout %v, want half the interval", got)
	}
	healthy := func(addr string) bool {
		for _, ts := range rt.Registry().Targets() {
			if ts.Address == addr {
				return ts.Healthy
			}
		}
		return false
	}
	configtest.WaitFor(t, 10*time.Second, "the late target down and the prompt one up", func() bool { return !healthy(hostOf(late)) && healthy(hostOf(prompt)) })
	c := clientFrom("127.0.0.1")
	for range 10 {
		if s, who, _ := get(t, c, newReq(t, "GET", "http://"+addr+"/")); s != 200 || who != "prompt" {
			t.Fatalf("%d from %q, want the prompt target only", s, who)
		}
	}
}
