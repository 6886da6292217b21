package certs

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
)

// TestAuthorityKeyLost: an authority whose certificate is stored but whose key has left the
// keystore — deleted from the SoftHSM2 token by another program, or through the keystore —
// is never replaced by a silently created new authority (which every client trusting the old
// one would reject). A reload notices it, and so does a restart: the manager keeps running,
// the certificates the authority issued keep serving, it issues and renews nothing, and
// KeyLost says so. Removing the stored authority certificate is the deliberate way to a new one.
func TestAuthorityKeyLost(t *testing.T) {
	for _, tc := range []struct {
		name string
		hsm  bool
	}{{"software", false}, {"softhsm2", true}} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.hsm {
				needHSM(t)
			}
			dir := t.TempDir()
			m := newManager(t, testConfig(dir, tc.hsm))
			caPath := filepath.Join(dir, "authorities", "internal.pem")
			before, err := os.ReadFile(caPath)
			if err != nil {
				t.Fatal(err)
			}
			a := m.Authority("internal")
			if a.KeyLost() != nil {
				t.Fatalf("fresh authority: %v", a.KeyLost())
			}
			serials := servedSerials(m)
			servesWWW(t, m, a, serials["www"])

			if tc.hsm {
				// Another program deletes the key pair from the token: the manager's cached
				// handle must not hide it.
				ks := softhsmtest.Keystore()
				for _, typ := range []string{"privkey", "pubkey"} {
					out, err := exec.Command("pkcs11-tool", "--module", ks.Module, "--token-label", ks.TokenLabel,
						"--login", "--pin", softhsmtest.Pin, "--delete-object", "--type", typ, "--label", a.keyName).CombinedOutput()
					if err != nil {
						t.Fatalf("pkcs11-tool --delete-object --type %s: %v\n%s", typ, err, out)
					}
				}
			} else if err := m.Keystore().Delete(context.Background(), a.keyName); err != nil {
				t.Fatal(err)
			}

			// Reload.
			if err := m.Reconcile(valid(t, testConfig(dir, tc.hsm))); err != nil {
				t.Fatalf("reload with the authority's key gone: %v (want the reload to apply, the authority marked lost)", err)
			}
			lost := m.Authority("internal")
			if !errors.Is(lost.KeyLost(), ErrAuthorityKeyLost) {
				t.Fatalf("after the reload: KeyLost = %v, want ErrAuthorityKeyLost", lost.KeyLost())
			}
			assertKept(t, m, serials, caPath, before)
			servesWWW(t, m, lost, serials["www"])
			if err := m.Renew("www"); !errors.Is(err, ErrAuthorityKeyLost) {
				t.Fatalf("renewal by a lost authority: %v, want ErrAuthorityKeyLost", err)
			}
			m.Close()

			// Restart.
			m2, err := NewManager(context.Background(), valid(t, testConfig(dir, tc.hsm)), quiet)
			if err != nil {
				t.Fatalf("restart with the authority's key gone: %v (want a running manager, the authority marked lost)", err)
			}
			if !errors.Is(m2.Authority("internal").KeyLost(), ErrAuthorityKeyLost) {
				t.Fatalf("after the restart: KeyLost = %v", m2.Authority("internal").KeyLost())
			}
			assertKept(t, m2, serials, caPath, before)
			servesWWW(t, m2, m2.Authority("internal"), serials["www"])
			if err := m2.Renew("other"); !errors.Is(err, ErrAuthorityKeyLost) {
				t.Fatalf("renewal after the restart: %v, want ErrAuthorityKeyLost", err)
			}
			m2.Close()

			// Removing the certificate is the deliberate way to a new authority.
			os.Remove(caPath)
			m3 := newManager(t, testConfig(dir, tc.hsm))
			if a := m3.Authority("internal"); a == nil || a.KeyLost() != nil {
				t.Fatal("no usable authority after removing the old one deliberately")
			}
		})
	}
}

func servedSerials(m *Manager) map[string]string {
	out := map[string]string{}
	for _, ci := range m.List() {
		out[ci.Name] = ci.Serial
	}
	return out
}

// assertKept: the same certificates serve and the stored authority is untouched.
func assertKept(t *testing.T, m *Manager, serials map[string]string, caPath string, before []byte) {
	t.Helper()
	for name, serial := range servedSerials(m) {
		if serial != serials[name] {
			t.Fatalf("certificate %s: serial %s, was %s", name, serial, serials[name])
		}
	}
	if after, _ := os.ReadFile(caPath); !bytes.Equal(before, after) {
		t.Fatal("the stored authority was replaced")
	}
}

// servesWWW handshakes with the manager's "public" listener configuration and checks that
// clients trusting authority a get certificate www with the given serial.
func servesWWW(t *testing.T, m *Manager, a *Authority, serial string) {
	t.Helper()
	tc, err := m.ServerTLS(&m.cfg.Load().Listeners[0])
	if err != nil {
		t.Fatal(err)
	}
	st, err := dial(serve(t, tc), &tls.Config{RootCAs: a.Pool(), ServerName: "www.example.test"})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if got := serialHex(st.PeerCertificates[0]); got != serial {
		t.Fatalf("served www serial %s, want %s", got, serial)
	}
}
