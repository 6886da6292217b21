package certs

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestAuthorityKeyLost: an authority whose certificate is stored but whose key has left the
// keystore is an error that names the way out, never a silently created new authority (which
// every client trusting the old one would reject).
func TestAuthorityKeyLost(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir, false)
	m := newManager(t, cfg)
	caPath := filepath.Join(dir, "authorities", "internal.pem")
	before, err := os.ReadFile(caPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Keystore().Delete(context.Background(), m.Authority("internal").keyName); err != nil {
		t.Fatal(err)
	}
	m.Close()

	_, err = NewManager(context.Background(), testConfig(dir, false), quiet)
	if !errors.Is(err, ErrAuthorityKeyLost) {
		t.Fatalf("NewManager with the authority's key gone: %v, want ErrAuthorityKeyLost", err)
	}
	after, _ := os.ReadFile(caPath)
	if !bytes.Equal(before, after) {
		t.Fatal("the stored authority was replaced")
	}
	// Removing the certificate is the deliberate way to a new authority.
	os.Remove(caPath)
	m2 := newManager(t, testConfig(dir, false))
	if m2.Authority("internal") == nil {
		t.Fatal("no authority after removing the old one deliberately")
	}
}
