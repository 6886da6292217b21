package certs

import (
	"crypto/tls"
	"testing"
	"time"
)

// benchHandshakes runs full (or resumed) TLS 1.3 handshakes against a 127.0.0.1 server and
// reports handshakes/s and the keystore signatures per handshake.
func benchHandshakes(b *testing.B, hsm, resume bool) {
	if hsm {
		needHSM(b)
	}
	m := newManager(b, testConfig(b.TempDir(), hsm))
	cfg := m.cfg.Load()
	tc, err := m.ServerTLS(&cfg.Listeners[0])
	if err != nil {
		b.Fatal(err)
	}
	addr := serve(b, tc)
	cc := clientCfg(m, "www.example.test", tls.VersionTLS13)
	if resume {
		cc.ClientSessionCache = tls.NewLRUClientSessionCache(64)
		if _, err := dial(addr, cc); err != nil {
			b.Fatal(err)
		}
	}
	st := m.Keystore().Stats()
	signs := st.Signs.Load()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			cs, err := dial(addr, cc)
			if err != nil {
				b.Error(err)
				return
			}
			if resume && !cs.DidResume {
				b.Error("did not resume")
				return
			}
		}
	})
	el := time.Since(start)
	b.StopTimer()
	n := st.Signs.Load() - signs
	b.ReportMetric(float64(b.N)/el.Seconds(), "handshakes/s")
	b.ReportMetric(float64(n)/float64(b.N), "signs/op")
	if resume && n != 0 {
		b.Fatalf("resumed handshakes signed %d times", n)
	}
}

func BenchmarkHandshakeTLS13HSM(b *testing.B)     { benchHandshakes(b, true, false) }
func BenchmarkHandshakeTLS13Memory(b *testing.B)  { benchHandshakes(b, false, false) }
func BenchmarkHandshakeTLS13Resumed(b *testing.B) { benchHandshakes(b, true, true) }
