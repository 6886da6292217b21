package keystore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// testClock is a clock tests move by hand.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *testClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type eventLog struct {
	mu sync.Mutex
	ev []Event
}

func (l *eventLog) add(e Event) { l.mu.Lock(); l.ev = append(l.ev, e); l.mu.Unlock() }
func (l *eventLog) find(action, object string) []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Event
	for _, e := range l.ev {
		if e.Action == action && e.Object == object {
			out = append(out, e)
		}
	}
	return out
}

// keystores runs f against the software keystore and the SoftHSM2 token, each with its own
// state directory, a test clock and an event log.
func keystores(t *testing.T, f func(t *testing.T, open func() *Managed, clk *testClock, ev *eventLog)) {
	kinds := []struct {
		name string
		cfg  func(dir string) configs.Keystore
	}{
		{"software", func(dir string) configs.Keystore {
			return configs.Keystore{Type: "software", MasterKey: "file:" + filepath.Join(dir, "master.key")}
		}},
		{"pkcs11", func(string) configs.Keystore { return softhsmtest.Keystore() }},
	}
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			if k.name == "pkcs11" {
				needHSM(t)
			}
			dir := t.TempDir()
			clk := &testClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
			ev := &eventLog{}
			var opened []*Managed
			open := func() *Managed {
				ks, err := Open(context.Background(), k.cfg(dir), Options{StateDir: dir, Log: slog.New(slog.DiscardHandler), Now: clk.now})
				if err != nil {
					t.Fatal(err)
				}
				m := ks.(*Managed)
				m.SetAudit(ev.add)
				opened = append(opened, m)
				return m
			}
			t.Cleanup(func() {
				for _, m := range opened {
					m.Close()
				}
			})
			f(t, open, clk, ev)
		})
	}
}

func sign(s crypto.Signer) error {
	d := sha256.Sum256([]byte("x"))
	var opts crypto.SignerOpts = crypto.SHA256
	_, err := s.Sign(rand.Reader, d[:], opts)
	return err
}

func TestScheduledDeletion(t *testing.T) {
	keystores(t, func(t *testing.T, open func() *Managed, clk *testClock, ev *eventLog) {
		ctx := context.Background()
		m := open()
		name := "del-" + strings.ReplaceAll(t.Name(), "/", "-")
		s, err := m.Generate(ctx, name, ECDSAP256)
		if err != nil {
			t.Fatal(err)
		}
		used := func(k string) string {
			if k == "served" {
				return "certificate www"
			}
			return ""
		}
		for _, bad := range []int{3, 6, 31} {
			if _, err := m.ScheduleDeletion(ctx, name, bad, used); err == nil || !strings.Contains(err.Error(), "7 to 30") {
				t.Fatalf("%d days: %v", bad, err)
			}
		}
		if _, err := m.Generate(ctx, "served", ECDSAP256); err != nil {
			t.Fatal(err)
		}
		var inUse *InUseError
		if _, err := m.ScheduleDeletion(ctx, "served", 7, used); !errors.As(err, &inUse) || !strings.Contains(err.Error(), "certificate www") {
			t.Fatalf("in-use key: %v", err)
		}
		if err := sign(s); err != nil {
			t.Fatal("nothing changed, yet:", err)
		}
		when, err := m.ScheduleDeletion(ctx, name, 7, used)
		if err != nil {
			t.Fatal(err)
		}
		if want := clk.now().Add(7 * 24 * time.Hour); !when.Equal(want) {
			t.Fatalf("deletion date %v, want %v", when, want)
		}
		if err := sign(s); !errors.Is(err, ErrPendingDeletion) {
			t.Fatalf("sign while pending: %v", err)
		}
		if _, err := m.Signer(ctx, name); !errors.Is(err, ErrPendingDeletion) {
			t.Fatalf("Signer while pending: %v", err)
		}
		if _, err := m.Generate(ctx, name, ECDSAP256); !errors.Is(err, ErrPendingDeletion) {
			t.Fatalf("Generate over a pending key: %v", err)
		}
		// A restart keeps the schedule.
		m.Close()
		m = open()
		if _, err := m.Signer(ctx, name); !errors.Is(err, ErrPendingDeletion) {
			t.Fatalf("after restart: %v", err)
		}
		if err := m.CancelDeletion(ctx, name); err != nil {
			t.Fatal(err)
		}
		s2, err := m.Signer(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if err := sign(s2); err != nil {
			t.Fatal("after cancel:", err)
		}
		if err := m.CancelDeletion(ctx, name); err == nil {
			t.Fatal("cancel of a key not pending")
		}
		// Schedule again; the period ends; the key is destroyed, also across a restart.
		if _, err := m.ScheduleDeletion(ctx, name, 30, used); err != nil {
			t.Fatal(err)
		}
		clk.add(29 * 24 * time.Hour)
		m.Sweep(ctx)
		if list, _ := m.List(ctx); !hasKey(list, name) {
			t.Fatal("destroyed before the period ended")
		}
		m.Close()
		clk.add(24 * time.Hour)
		m = open() // the sweep at start destroys it
		list, err := m.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if hasKey(list, name) {
			t.Fatalf("not destroyed after the period: %+v", list)
		}
		if _, err := m.b.Signer(ctx, name); err == nil {
			t.Fatal("the backend still has the key")
		}
		if len(ev.find("destroy", name)) != 1 || len(ev.find("schedule-deletion", name)) != 2+3+0 && len(ev.find("schedule-deletion", name)) != 5 {
			t.Fatalf("audit: destroy %v schedule %v", ev.find("destroy", name), ev.find("schedule-deletion", name))
		}
		if e := ev.find("schedule-deletion", "served"); len(e) != 1 || e[0].Result != "error" {
			t.Fatalf("refused schedule not audited: %+v", e)
		}
	})
}

func hasKey(list []KeyInfo, name string) bool {
	for _, k := range list {
		if k.Name == name {
			return true
		}
	}
	return false
}

// wrapWithOpenSSL runs testdata/wrap-key.sh: the README's commands.
func wrapWithOpenSSL(t *testing.T, keyPEM, wrappingPEM string) []byte {
	t.Helper()
	dir := t.TempDir()
	kf, wf, out := filepath.Join(dir, "key.pem"), filepath.Join(dir, "wrapping.pem"), filepath.Join(dir, "out.wrapped")
	os.WriteFile(kf, []byte(keyPEM), 0o600)
	os.WriteFile(wf, []byte(wrappingPEM), 0o600)
	script, _ := filepath.Abs("testdata/wrap-key.sh")
	if b, err := exec.Command("sh", script, kf, wf, out).CombinedOutput(); err != nil {
		t.Fatalf("wrap-key.sh: %v\n%s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func opensslKey(t *testing.T, kt KeyType) string {
	t.Helper()
	args := map[KeyType][]string{
		ECDSAP256: {"genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"},
		RSA2048:   {"genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"},
	}[kt]
	b, err := exec.Command("openssl", args...).Output()
	if err != nil {
		t.Fatalf("openssl %v: %v", args, err)
	}
	return string(b)
}

func TestWrappedImport(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl is not installed")
	}
	keystores(t, func(t *testing.T, open func() *Managed, clk *testClock, ev *eventLog) {
		ctx := context.Background()
		m := open()
		suffix := strings.ReplaceAll(t.Name(), "/", "-")
		for _, kt := range []KeyType{ECDSAP256, RSA2048} {
			name := "imp-" + string(kt) + suffix
			p, err := m.ImportParams(ctx, name, kt)
			if err != nil {
				t.Fatal(err)
			}
			other := "imp-other-" + string(kt) + suffix
			po, err := m.ImportParams(ctx, other, kt)
			if err != nil {
				t.Fatal(err)
			}
			blob := wrapWithOpenSSL(t, opensslKey(t, kt), p.PublicKeyPEM)

			// Bad input: each a clear error, nothing imported.
			wrongType := ECDSAP256
			if kt == ECDSAP256 {
				wrongType = RSA2048
			}
			foreign := wrapWithOpenSSL(t, opensslKey(t, wrongType), p.PublicKeyPEM)
			for _, bad := range []struct {
				what, token string
				blob        []byte
				want        string
			}{
				{"other key's token", po.ImportToken, blob, "is for key"},
				{"garbage token", "nope", blob, "not a Fulcrum import token"},
				{"forged token", p.ImportToken + "x", blob, "does not match"},
				{"blob for another key type", p.ImportToken, foreign, ""},
				{"blob for another wrapping key", p.ImportToken, wrapWithOpenSSL(t, opensslKey(t, kt), po.PublicKeyPEM), "unwrap"},
				{"truncated blob", p.ImportToken, blob[:100], "wrapped key of 100 bytes"},
			} {
				err := m.ImportWrapped(ctx, name, bad.blob, bad.token)
				if err == nil || !strings.Contains(err.Error(), bad.want) {
					t.Fatalf("%s: %v", bad.what, err)
				}
				if list, _ := m.List(ctx); hasKey(list, name) {
					t.Fatalf("%s: the key was imported anyway", bad.what)
				}
			}
			if err := m.ImportWrapped(ctx, name, blob, p.ImportToken); err != nil {
				t.Fatal(err)
			}
			s, err := m.Signer(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			d := sha256.Sum256([]byte("m"))
			sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
			if err != nil {
				t.Fatal(err)
			}
			switch pub := s.Public().(type) {
			case *ecdsa.PublicKey:
				if !ecdsa.VerifyASN1(pub, d[:], sig) {
					t.Fatal("EC signature does not verify")
				}
			case *rsa.PublicKey:
				if rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) != nil {
					t.Fatal("RSA signature does not verify")
				}
			}
			if m.Describe() != "software" {
				softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, name)
			}
			// The token is used up.
			if err := m.ImportWrapped(ctx, name, blob, p.ImportToken); err == nil {
				t.Fatal("token reused")
			}
			// An expired token.
			clk.add(ImportTokenLifetime + time.Minute)
			if err := m.ImportWrapped(ctx, other, blob, po.ImportToken); err == nil || !strings.Contains(err.Error(), "expired") {
				t.Fatalf("expired token: %v", err)
			}
			m.Sweep(ctx) // drops the expired import's wrapping key
			if e := ev.find("expire-import-token", other); len(e) != 1 || e[0].Result != "ok" {
				t.Fatalf("expired import not swept: %+v", e)
			}
			if got := ev.find("import", name); len(got) != 8 || got[6].Result != "ok" {
				t.Fatalf("import events: %+v", got)
			}
		}
	})
}

func TestUnwrapKWPRejects(t *testing.T) {
	kek := make([]byte, 32)
	for _, c := range [][]byte{nil, make([]byte, 8), make([]byte, 17), make([]byte, 24)} {
		if _, err := unwrapKWP(kek, c); err == nil {
			t.Fatalf("%d bytes accepted", len(c))
		}
	}
}

func FuzzUnwrapKWP(f *testing.F) {
	f.Add(make([]byte, 16))
	f.Add(make([]byte, 40))
	kek := make([]byte, 32)
	f.Fuzz(func(t *testing.T, c []byte) {
		out, err := unwrapKWP(kek, c)
		if err == nil && len(out) > len(c) {
			t.Fatal("longer than its input")
		}
	})
}

// The README shows the operator exactly the commands the tests run.
func TestReadmeWrapCommands(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile("testdata/wrap-key.sh")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(string(script), "\n") {
		if strings.HasPrefix(l, "openssl ") || strings.HasPrefix(l, "cat ") {
			n++
			if !strings.Contains(string(readme), "\n"+l+"\n") {
				t.Errorf("README lacks the command %q", l)
			}
		}
	}
	if n != 5 {
		t.Fatalf("%d commands in wrap-key.sh", n)
	}
}
