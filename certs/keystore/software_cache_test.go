package keystore

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

func openSoftware(t *testing.T, dir string, cfg configs.Keystore, clk *testClock) *Managed {
	t.Helper()
	ks, err := Open(context.Background(), softwareConfig(t, dir, cfg), Options{StateDir: dir, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ks.Close() })
	return ks.(*Managed)
}

func sealedFile(t *testing.T, dir, name string) sealedKey {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "keys", name+".sealed"))
	if err != nil {
		t.Fatal(err)
	}
	var sk sealedKey
	if err := json.Unmarshal(b, &sk); err != nil {
		t.Fatal(err)
	}
	return sk
}

func TestDataKeyCache(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name         string
		uses         int
		distinct     int // data keys among the 5 sealed files
		hits, misses uint64
	}{
		{"off", 0, 5, 0, 0},
		{"3 uses", 3, 2, 3, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			clk := &testClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
			m := openSoftware(t, dir, configs.Keystore{DataKeyCacheMaxUses: tc.uses}, clk)
			names := []string{"k1", "k2", "k3", "k4", "k5"}
			for _, n := range names {
				if _, err := m.Generate(ctx, n, ECDSAP256); err != nil {
					t.Fatal(err)
				}
			}
			deks := map[string]bool{}
			for _, n := range names {
				deks[string(sealedFile(t, dir, n).DEK)] = true
			}
			st := m.Stats()
			if len(deks) != tc.distinct || st.DataKeyCacheHits.Load() != tc.hits || st.DataKeyCacheMisses.Load() != tc.misses {
				t.Fatalf("%d data keys, %d hits, %d misses", len(deks), st.DataKeyCacheHits.Load(), st.DataKeyCacheMisses.Load())
			}
			if tc.uses == 0 {
				return
			}
			// Age bounds reuse too.
			if _, err := m.Generate(ctx, "k6", ECDSAP256); err != nil { // uses the 2nd key's 3rd use
				t.Fatal(err)
			}
			clk.add(6 * time.Minute) // default max age 5m
			if _, err := m.Generate(ctx, "k7", ECDSAP256); err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(sealedFile(t, dir, "k6").DEK, sealedFile(t, dir, "k7").DEK) {
				t.Fatal("a data key older than max age was reused")
			}
			// A fresh process: opening k1..k3 (one data key) unwraps it once.
			m.Close()
			m2 := openSoftware(t, dir, configs.Keystore{DataKeyCacheMaxUses: tc.uses}, clk)
			for _, n := range []string{"k1", "k2", "k3"} {
				s, err := m2.Signer(ctx, n)
				if err != nil {
					t.Fatal(err)
				}
				if err := sign(s); err != nil {
					t.Fatal(err)
				}
			}
			if h, ms := m2.Stats().DataKeyCacheHits.Load(), m2.Stats().DataKeyCacheMisses.Load(); h != 2 || ms != 1 {
				t.Fatalf("opening: %d hits, %d misses", h, ms)
			}
		})
	}
}

func TestMasterKeyRotation(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clk := &testClock{t: time.Now()}
	m := openSoftware(t, dir, configs.Keystore{DataKeyCacheMaxUses: 2}, clk)
	var names []string
	for i := range 6 {
		n := "rot-" + string(rune('a'+i))
		names = append(names, n)
		if _, err := m.Generate(ctx, n, ECDSAP256); err != nil {
			t.Fatal(err)
		}
	}
	// A v1 file from before data-key caching is re-wrapped as well.
	s := m.b.(*software)
	if err := writeV1(s, "rot-legacy"); err != nil {
		t.Fatal(err)
	}
	names = append(names, "rot-legacy")
	old, _ := os.ReadFile(filepath.Join(dir, "master.key"))

	// Sign continuously while rotating: nothing may fail.
	var failed, signed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, n := range names {
		sg, err := m.Signer(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if sign(sg) != nil {
					failed.Add(1)
				} else {
					signed.Add(1)
				}
			}
		}()
	}
	id, err := m.RotateMasterKey(ctx)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if failed.Load() != 0 {
		t.Fatalf("%d signatures failed during the rotation", failed.Load())
	}
	cur, _ := os.ReadFile(filepath.Join(dir, "master.key"))
	if bytes.Equal(cur, old) || len(cur) != 32 || id == "" {
		t.Fatal("master key file not replaced")
	}
	// No blob opens with the old key any more; all open with the new one.
	oldAEAD, _ := newGCM(old)
	newAEAD, _ := newGCM(cur)
	for _, n := range names {
		sk := sealedFile(t, dir, n)
		if _, err := oldAEAD.Open(nil, sk.DEKNonce, sk.DEK, aadDEK2); err == nil {
			t.Fatalf("%s opens with the old master key", n)
		}
		if _, err := oldAEAD.Open(nil, sk.DEKNonce, sk.DEK, aadDEK(n)); err == nil {
			t.Fatalf("%s opens with the old master key (v1)", n)
		}
		if _, err := newAEAD.Open(nil, sk.DEKNonce, sk.DEK, aadDEK2); err != nil {
			t.Fatalf("%s does not open with the new master key: %v", n, err)
		}
	}
	m.Close()
	// The old key is refused at start; the new one opens everything.
	t.Setenv("OLD_MK", base64.StdEncoding.EncodeToString(old))
	if _, err := Open(ctx, softwareConfig(t, dir, configs.Keystore{MasterKey: "env:OLD_MK"}), Options{StateDir: dir}); err == nil {
		t.Fatal("the old master key was accepted")
	}
	m2 := openSoftware(t, dir, configs.Keystore{}, clk)
	for _, n := range names {
		sg, err := m2.Signer(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		if err := sign(sg); err != nil {
			t.Fatal(err)
		}
	}
	m2.Close()

	// A rotation interrupted after the new key was written is finished at the next start.
	next := make([]byte, 32)
	rand.Read(next)
	os.WriteFile(filepath.Join(dir, "master.key.next"), next, 0o600)
	m3 := openSoftware(t, dir, configs.Keystore{}, clk)
	if cur, _ := os.ReadFile(filepath.Join(dir, "master.key")); !bytes.Equal(cur, next) {
		t.Fatal("interrupted rotation not finished")
	}
	if _, err := os.Stat(filepath.Join(dir, "master.key.next")); err == nil {
		t.Fatal(".next left behind")
	}
	for _, n := range names {
		if _, err := m3.Signer(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
}

// writeV1 seals a key in the version-1 format (data key bound to the name).
func writeV1(s *software, name string) error {
	k, err := generateInMemory(ECDSAP256)
	if err != nil {
		return err
	}
	blob, err := s.seal(name, k)
	if err != nil {
		return err
	}
	var sk sealedKey
	json.Unmarshal(blob, &sk)
	s.mu.Lock()
	dek, err := s.openDEKLocked(&sk)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	sk.Version, sk.MasterID = 1, nil
	sk.DEK = s.master.Seal(nil, sk.DEKNonce, dek, aadDEK(name))
	out, _ := json.Marshal(&sk)
	return WriteFileAtomic(s.path(name), out, 0o600)
}
