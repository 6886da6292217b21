// Package keystore is where Fulcrum's private keys are generated and used: an embedded
// software keystore that seals every key at rest with envelope encryption, or a PKCS#11
// token (an HSM; SoftHSM2 in tests) whose keys never leave it.
//
// Callers only ever hold crypto.Signer values. Key material is never returned.
package keystore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// KeyType is a key algorithm and size as written in the configuration.
type KeyType string

// The key types the configuration accepts.
const (
	ECDSAP256 KeyType = "ecdsa-p256"
	ECDSAP384 KeyType = "ecdsa-p384"
	RSA2048   KeyType = "rsa-2048"
	RSA3072   KeyType = "rsa-3072"
	RSA4096   KeyType = "rsa-4096"
)

// ErrNotFound is returned by Signer when no key has the name.
var ErrNotFound = errors.New("key not found")

// ErrUnavailable is returned while the keystore is being reconnected (an HSM outage).
var ErrUnavailable = errors.New("keystore unavailable")

// Keystore generates and holds private keys by name.
type Keystore interface {
	// Generate creates a new key under name, replacing any key of that name.
	Generate(ctx context.Context, name string, kt KeyType) (crypto.Signer, error)
	// Signer finds an existing key again (after a restart).
	Signer(ctx context.Context, name string) (crypto.Signer, error)
	// Import stores an existing key under name (imported certificates).
	Import(ctx context.Context, name string, key crypto.Signer) (crypto.Signer, error)
	// Delete removes the key; deleting a missing key is not an error.
	Delete(ctx context.Context, name string) error
	// Describe names the keystore for humans: "software" or "pkcs11 token LABEL".
	Describe() string
	// Stats are the keystore's signing counters.
	Stats() *Stats
	// Close releases the keystore; signers handed out stop working.
	Close() error
}

// Stats counts signatures. The fields are updated atomically on the signing path so that
// metrics can read them without a lock.
type Stats struct {
	Signs      atomic.Uint64 // successful signatures
	SignErrors atomic.Uint64 // failed signatures
	SignNanos  atomic.Uint64 // total time spent in successful signatures
	Rebuilds   atomic.Uint64 // PKCS#11 context rebuilds (reconnects)

	// Software keystore data-key cache (zero while caching is off).
	DataKeyCacheHits   atomic.Uint64
	DataKeyCacheMisses atomic.Uint64
}

// Options are what Open needs besides the [keystore] section.
type Options struct {
	StateDir string                   // software keys are sealed under StateDir/keys
	Resolve  func(path string) string // makes configuration paths absolute; nil = identity
	Log      *slog.Logger
	// Now is the clock of deletion schedules and import tokens (nil: time.Now). Tests move it.
	Now func() time.Time
	// Blobs, when set, is where the software keystore keeps its sealed keys instead of
	// StateDir/keys (fleet mode: etcd, so every node of the fleet finds every key). The
	// blobs are sealed exactly as on disk; keys are named "keys/NAME.sealed".
	Blobs Blobs
}

// Blobs is a key-value store for sealed key blobs (certmagic.Storage satisfies it). Load
// returns an error wrapping fs.ErrNotExist for a missing key.
type Blobs interface {
	Load(ctx context.Context, key string) ([]byte, error)
	Store(ctx context.Context, key string, value []byte) error
	Delete(ctx context.Context, key string) error
}

// Open builds the keystore described by cfg.
func Open(ctx context.Context, cfg configs.Keystore, opt Options) (Keystore, error) {
	if opt.Resolve == nil {
		opt.Resolve = func(p string) string { return p }
	}
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	switch cfg.Type {
	case "software":
		mk := cfg.MasterKey // configs defaults it under state_dir
		master, err := loadMasterKey(mk, opt.Resolve)
		if err != nil {
			return nil, fmt.Errorf("keystore: master key: %w", err)
		}
		masterPath := ""
		if strings.HasPrefix(mk, "file:") {
			masterPath = opt.Resolve(strings.TrimPrefix(mk, "file:"))
		}
		cache := dekCacheConfig{maxUses: cfg.DataKeyCacheMaxUses, maxAge: cfg.DataKeyCacheMaxAgeDuration()}
		s, err := newSoftware(filepath.Join(opt.StateDir, "keys"), master, masterPath, cache, opt.Now)
		if err != nil {
			return nil, err
		}
		s.blobs = opt.Blobs
		m, err := newManaged(s, opt.StateDir, opt.Now)
		if err != nil {
			s.Close()
			return nil, err
		}
		return m, nil
	case "pkcs11":
		pin, err := ReadSecret(cfg.Pin, opt.Resolve)
		if err != nil {
			return nil, fmt.Errorf("keystore: pkcs11 pin: %w", err)
		}
		k, err := openPKCS11(ctx, pkcs11Config{
			Module:      opt.Resolve(cfg.Module),
			TokenLabel:  cfg.TokenLabel,
			Pin:         pin,
			MaxSessions: cfg.MaxSessions,
		}, opt.Log)
		if err != nil {
			return nil, err
		}
		m, err := newManaged(k.(*p11), opt.StateDir, opt.Now)
		if err != nil {
			k.Close()
			return nil, err
		}
		return m, nil
	default:
		return nil, fmt.Errorf("keystore: unknown type %q", cfg.Type)
	}
}

// ReadSecret resolves "env:NAME" or "file:PATH" (surrounding white space trimmed).
func ReadSecret(ref string, resolve func(string) string) (string, error) {
	switch {
	case strings.HasPrefix(ref, "env:"):
		name := strings.TrimPrefix(ref, "env:")
		v, ok := os.LookupEnv(name)
		if !ok {
			return "", fmt.Errorf("environment variable %s is not set", name)
		}
		return strings.TrimSpace(v), nil
	case strings.HasPrefix(ref, "file:"):
		p := strings.TrimPrefix(ref, "file:")
		if resolve != nil {
			p = resolve(p)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		return strings.TrimSpace(string(b)), nil
	default:
		return "", fmt.Errorf("secret must be \"env:NAME\" or \"file:PATH\"")
	}
}

// validName keeps key names usable as file names and PKCS#11 labels.
func validName(name string) error {
	if name == "" || len(name) > 128 || name[0] == '.' {
		return fmt.Errorf("invalid key name %q", name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("invalid key name %q", name)
		}
	}
	return nil
}

// generateInMemory is the software keystore's key generation.
func generateInMemory(kt KeyType) (crypto.Signer, error) {
	switch kt {
	case ECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case ECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case RSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case RSA3072:
		return rsa.GenerateKey(rand.Reader, 3072)
	case RSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	}
	return nil, fmt.Errorf("unknown key type %q", kt)
}

// countingSigner adds the keystore's counters to an in-memory signer.
type countingSigner struct {
	crypto.Signer
	st *Stats
}

func (c countingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	t := time.Now()
	sig, err := c.Signer.Sign(r, digest, opts)
	if err != nil {
		c.st.SignErrors.Add(1)
		return nil, err
	}
	c.st.Signs.Add(1)
	c.st.SignNanos.Add(uint64(time.Since(t)))
	return sig, nil
}

// MasterKey reads a master key reference as the software keystore does ("file:PATH", created
// 0600 with 32 random bytes when absent, or "env:NAME" holding base64): fleet mode seals its
// shared secrets under the same key.
func MasterKey(ref string, resolve func(string) string) ([]byte, error) {
	if resolve == nil {
		resolve = func(p string) string { return p }
	}
	return loadMasterKey(ref, resolve)
}
