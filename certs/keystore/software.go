package keystore

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// The software keystore keeps every key sealed at rest with envelope encryption: the PKCS#8
// form of the key is sealed with its own random AES-256-GCM data key (the storage name is the
// additional authenticated data, so a sealed file cannot be renamed into another key), and
// the data key is wrapped with AES-256-GCM under the master key. Nothing on disk is a private
// key in the clear; unsealed keys live only in memory.
type software struct {
	dir    string
	master cipher.AEAD
	stats  Stats

	mu   sync.Mutex // guards keys and file writes (control plane only)
	keys map[string]crypto.Signer

	blobs Blobs // nil: sealed files under dir
}

// The sealed blob of a key is a file under dir, or a value in blobs (fleet mode).
func (s *software) readBlob(name string) ([]byte, error) {
	if s.blobs != nil {
		return s.blobs.Load(context.Background(), "keys/"+name+".sealed")
	}
	return os.ReadFile(s.path(name))
}

func (s *software) writeBlob(name string, b []byte) error {
	if s.blobs != nil {
		return s.blobs.Store(context.Background(), "keys/"+name+".sealed", b)
	}
	return WriteFileAtomic(s.path(name), b, 0o600)
}

func (s *software) removeBlob(name string) error {
	if s.blobs != nil {
		return s.blobs.Delete(context.Background(), "keys/"+name+".sealed")
	}
	return os.Remove(s.path(name))
}

// sealedKey is the on-disk form of one key (JSON, base64 fields).
type sealedKey struct {
	Version  int    `json:"v"`
	Name     string `json:"name"`
	DEKNonce []byte `json:"dek_nonce"`
	DEK      []byte `json:"dek"` // data key wrapped under the master key
	Nonce    []byte `json:"nonce"`
	Sealed   []byte `json:"sealed"` // PKCS#8 sealed under the data key
}

func newSoftware(dir string, masterKey []byte) (*software, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	aead, err := newGCM(masterKey)
	if err != nil {
		return nil, err
	}
	return &software{dir: dir, master: aead, keys: map[string]crypto.Signer{}}, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("key must be 32 bytes, got %d", len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// loadMasterKey reads the key-encryption key: "file:PATH" (created 0600 with 32 random bytes
// when absent) or "env:NAME" (base64 of 32 bytes).
func loadMasterKey(ref string, resolve func(string) string) ([]byte, error) {
	switch {
	case strings.HasPrefix(ref, "env:"):
		v, err := ReadSecret(ref, resolve)
		if err != nil {
			return nil, err
		}
		k, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			return nil, fmt.Errorf("%s: not base64: %w", ref, err)
		}
		if len(k) != 32 {
			return nil, fmt.Errorf("%s: need 32 bytes, got %d", ref, len(k))
		}
		return k, nil
	case strings.HasPrefix(ref, "file:"):
		p := resolve(strings.TrimPrefix(ref, "file:"))
		k, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			k = make([]byte, 32)
			if _, err := rand.Read(k); err != nil {
				return nil, err
			}
			if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
				return nil, err
			}
			// O_EXCL: two processes racing on first start must not overwrite each other.
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return nil, fmt.Errorf("create master key: %w", err)
			}
			_, werr := f.Write(k)
			if cerr := f.Close(); werr == nil {
				werr = cerr
			}
			if werr != nil {
				return nil, fmt.Errorf("write master key: %w", werr)
			}
			return k, nil
		}
		if err != nil {
			return nil, err
		}
		if len(k) != 32 {
			return nil, fmt.Errorf("%s: need 32 bytes, got %d", p, len(k))
		}
		return k, nil
	}
	return nil, fmt.Errorf("master_key must be \"file:PATH\" or \"env:NAME\"")
}

func (s *software) Describe() string { return "software" }
func (s *software) Stats() *Stats    { return &s.stats }
func (s *software) Close() error {
	s.mu.Lock()
	s.keys = map[string]crypto.Signer{}
	s.mu.Unlock()
	return nil
}

func (s *software) path(name string) string { return filepath.Join(s.dir, name+".sealed") }

func (s *software) Generate(ctx context.Context, name string, kt KeyType) (crypto.Signer, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	k, err := generateInMemory(kt)
	if err != nil {
		return nil, fmt.Errorf("keystore: generate %s: %w", name, err)
	}
	return s.store(name, k)
}

func (s *software) Import(ctx context.Context, name string, key crypto.Signer) (crypto.Signer, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	return s.store(name, key)
}

func (s *software) store(name string, k crypto.Signer) (crypto.Signer, error) {
	blob, err := s.seal(name, k)
	if err != nil {
		return nil, fmt.Errorf("keystore: seal %s: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writeBlob(name, blob); err != nil {
		return nil, fmt.Errorf("keystore: write %s: %w", name, err)
	}
	cs := countingSigner{Signer: k, st: &s.stats}
	s.keys[name] = cs
	return cs, nil
}

func (s *software) seal(name string, k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	defer clear(der)
	dek := make([]byte, 32)
	if _, err := rand.Read(dek); err != nil {
		return nil, err
	}
	defer clear(dek)
	aead, err := newGCM(dek)
	if err != nil {
		return nil, err
	}
	sk := sealedKey{Version: 1, Name: name, Nonce: make([]byte, aead.NonceSize()), DEKNonce: make([]byte, s.master.NonceSize())}
	if _, err := rand.Read(sk.Nonce); err != nil {
		return nil, err
	}
	if _, err := rand.Read(sk.DEKNonce); err != nil {
		return nil, err
	}
	sk.Sealed = aead.Seal(nil, sk.Nonce, der, aadKey(name))
	sk.DEK = s.master.Seal(nil, sk.DEKNonce, dek, aadDEK(name))
	return json.Marshal(&sk)
}

func aadKey(name string) []byte { return []byte("fulcrum/key/v1/" + name) }
func aadDEK(name string) []byte { return []byte("fulcrum/dek/v1/" + name) }

func (s *software) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if k, ok := s.keys[name]; ok {
		return k, nil
	}
	blob, err := s.readBlob(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("keystore: %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: read %s: %w", name, err)
	}
	k, err := s.unseal(name, blob)
	if err != nil {
		return nil, fmt.Errorf("keystore: unseal %s: %w", name, err)
	}
	cs := countingSigner{Signer: k, st: &s.stats}
	s.keys[name] = cs
	return cs, nil
}

func (s *software) unseal(name string, blob []byte) (crypto.Signer, error) {
	var sk sealedKey
	if err := json.Unmarshal(blob, &sk); err != nil {
		return nil, err
	}
	if sk.Version != 1 || sk.Name != name {
		return nil, fmt.Errorf("sealed key is version %d for %q", sk.Version, sk.Name)
	}
	if len(sk.DEKNonce) != s.master.NonceSize() {
		return nil, errors.New("bad data-key nonce")
	}
	dek, err := s.master.Open(nil, sk.DEKNonce, sk.DEK, aadDEK(name))
	if err != nil {
		return nil, fmt.Errorf("unwrap data key (wrong master key?): %w", err)
	}
	defer clear(dek)
	aead, err := newGCM(dek)
	if err != nil {
		return nil, err
	}
	if len(sk.Nonce) != aead.NonceSize() {
		return nil, errors.New("bad key nonce")
	}
	der, err := aead.Open(nil, sk.Nonce, sk.Sealed, aadKey(name))
	if err != nil {
		return nil, fmt.Errorf("open sealed key: %w", err)
	}
	defer clear(der)
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, err
	}
	sg, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("sealed key %T is not a signer", k)
	}
	return sg, nil
}

func (s *software) Delete(ctx context.Context, name string) error {
	if err := validName(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.keys, name)
	if err := s.removeBlob(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("keystore: delete %s: %w", name, err)
	}
	return nil
}

// WriteFileAtomic writes via a temporary file and rename so a crash never leaves half a file.
// The certificate manager stores its state the same way.
func WriteFileAtomic(path string, b []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
