package configs

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
)

// bigConfig is 1,000 application listeners with 10 rules each (10,000 rules) over 1,000 groups.
func bigConfig(listeners, rulesPer int) []byte {
	var b strings.Builder
	b.WriteString("[server]\nadmin = \"127.0.0.1:9900\"\n\n")
	for i := 0; i < listeners; i++ {
		fmt.Fprintf(&b, "[[target_groups]]\nname = \"g%d\"\nprotocol = \"http\"\ntargets = [\"10.0.%d.%d:80\", { address = \"10.1.%d.%d:80\", weight = 2 }]\n", i, i/250, i%250+1, i/250, i%250+1)
		fmt.Fprintf(&b, "[target_groups.health_check]\npath = \"/healthz\"\nmatcher = \"200-299,302\"\n\n")
	}
	for i := 0; i < listeners; i++ {
		fmt.Fprintf(&b, "[[listeners]]\nname = \"l%d\"\nstyle = \"application\"\nprotocol = \"http\"\naddress = \"127.0.0.1:%d\"\n", i, 20000+i)
		fmt.Fprintf(&b, "trusted_proxies = [\"10.0.0.0/8\"]\ndefault_action = { forward = \"g%d\" }\n", i)
		for r := 0; r < rulesPer; r++ {
			fmt.Fprintf(&b, "[[listeners.rules]]\npriority = %d\nhosts = [\"h%d.example.test\", \"*.w%d.example.test\"]\npaths = [\"/p%d/*\"]\n", r+1, r, r, r)
			fmt.Fprintf(&b, "source_ips = [\"192.0.2.0/24\"]\nforward = [{ group = \"g%d\", weight = 90 }, { group = \"g%d\", weight = 10 }]\n", (i+r)%listeners, (i+r+1)%listeners)
		}
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

func BenchmarkLoad(b *testing.B) {
	src := bigConfig(1000, 10)
	b.SetBytes(int64(len(src)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load("big.toml", src); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoadInvalid measures the error path: one mistake at the end builds the line index.
func BenchmarkLoadInvalid(b *testing.B) {
	src := append(bigConfig(1000, 10), "[[listeners.rules]]\npriority = 1\npaths = [\"x\"]\nforward = \"g0\"\n"...)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load("big.toml", src); err == nil {
			b.Fatal("no error")
		}
	}
}

// TestLoadLargeFast guards against quadratic checks creeping in. A wall-clock bound fails on a
// loaded machine under -race, so the yardstick is the TOML decoder on the same text, timed in the
// same conditions: validation and the error path's line index must stay a small multiple of it.
func TestLoadLargeFast(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	src := append(bigConfig(1000, 10), "[[listeners.rules]]\npriority = 1\npaths = [\"x\"]\nforward = \"g0\"\n"...)
	start := time.Now()
	var c Config
	if _, err := toml.Decode(string(src), &c); err != nil {
		t.Fatal(err)
	}
	decode := time.Since(start)
	start = time.Now()
	_, err := Load("big.toml", src)
	load := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "big.toml:") {
		t.Fatalf("want problems, got %v", err)
	}
	if !strings.Contains(err.Error(), `listeners[999].rules[10] ("l999"): paths[0] "x" must start with "/"`) {
		t.Errorf("got %v", err)
	}
	t.Logf("decode %v, load %v (%.1fx)", decode, load, float64(load)/float64(decode))
	// Today Load is about 1.1-2x the decode alone; a quadratic check over 10,000 rules is 100x.
	if load > 6*decode {
		t.Errorf("loading 10,000 rules took %v, %.1fx the %v the decoder alone takes", load, float64(load)/float64(decode), decode)
	}
}

// BenchmarkDecodeOnly is BurntSushi/toml alone on the same text, to tell parsing from checking.
func BenchmarkDecodeOnly(b *testing.B) {
	src := string(bigConfig(1000, 10))
	b.ReportAllocs()
	for b.Loop() {
		var c Config
		if _, err := toml.Decode(src, &c); err != nil {
			b.Fatal(err)
		}
	}
}
