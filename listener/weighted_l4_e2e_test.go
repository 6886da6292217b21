package listener

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestNetworkWeightedForward: a network listener forwarding to weighted target groups splits
// connections by weight (NLB weighted target groups); a group of weight 0 gets none.
func TestNetworkWeightedForward(t *testing.T) {
	dir := t.TempDir()
	listen := func(name string) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return serveListener(t, ln, lineEcho(name))
	}
	a, b, c := listen("a"), listen("b"), listen("c")
	addr := configtest.Addr(t)
	startRuntime(t, loadConfig(t, dir, header(dir)+fmt.Sprintf(`
[[target_groups]]
name = "a"
protocol = "tcp"
targets = [%q]

[[target_groups]]
name = "b"
protocol = "tcp"
targets = [%q]

[[target_groups]]
name = "c"
protocol = "tcp"
targets = [%q]

[[listeners]]
name = "db"
style = "network"
protocol = "tcp"
address = %q
forward = [{ group = "a", weight = 3 }, { group = "b", weight = 1 }, { group = "c", weight = 0 }]
`, a, b, c, addr)), nil)
	const n = 400
	got := map[string]int{}
	for range n {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "x\n")
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if err != nil {
			t.Fatalf("through the listener: %v", err)
		}
		name, _, _ := strings.Cut(line, ":")
		got[name]++
	}
	// 3:1 of 400 is 300:100; the bounds are more than five standard deviations wide.
	if got["a"] < 250 || got["a"] > 350 || got["b"] < 50 || got["b"] > 150 || got["c"] != 0 {
		t.Fatalf("connections by group %v, want about a=300 b=100 c=0", got)
	}
}
