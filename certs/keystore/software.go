package keystore

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// The software keystore keeps every key sealed at rest with envelope encryption: the PKCS#8
// form of the key is sealed with its own random AES-256-GCM data key (the storage name is the
// additional authenticated data, so a sealed file cannot be renamed into another key), and
// the data key is wrapped with AES-256-GCM under the master key. Nothing on disk is a private
// key in the clear; unsealed keys live only in memory.
type software struct {
	dir        string
	masterPath string // "file:" master keys: where rotation writes the new key ("" for env:)
	cache      dekCacheConfig
	now        func() time.Time
	stats      Stats

	mu       sync.Mutex // guards keys, master, the caches and file writes (control plane only)
	master   cipher.AEAD
	masterID []byte
	keys     map[string]crypto.Signer
	encDEK   *cachedDEK            // the data key new seals reuse (cache on)
	decDEK   map[string]*cachedDEK // unwrapped data keys by their wrapped form (cache on)

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
//
// Version 1 binds the wrapped data key to the key's name. Version 2 (written since data-key
// caching) wraps the data key without the name, so one data key can seal several keys; the
// name stays bound to the sealed key itself (aadKey), so a file still cannot be renamed into
// another key. MasterID says which master key wrapped the data key.
type sealedKey struct {
	Version  int    `json:"v"`
	Name     string `json:"name"`
	MasterID []byte `json:"master_id,omitempty"`
	DEKNonce []byte `json:"dek_nonce"`
	DEK      []byte `json:"dek"` // data key wrapped under the master key
	Nonce    []byte `json:"nonce"`
	Sealed   []byte `json:"sealed"` // PKCS#8 sealed under the data key
}

// dekCacheConfig bounds data-key reuse (the AWS Encryption SDK's caching idea): a data key
// seals at most maxUses keys and is reused for at most maxAge. maxUses 0 turns caching off.
type dekCacheConfig struct {
	maxUses int
	maxAge  time.Duration
}

type cachedDEK struct {
	dek      []byte
	wrapped  []byte
	nonce    []byte
	created  time.Time
	uses     int
	masterID []byte
}

const decCacheEntries = 64

func newSoftware(dir string, masterKey []byte, masterPath string, cache dekCacheConfig, now func() time.Time) (*software, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("keystore: create %s: %w", dir, err)
	}
	if now == nil {
		now = time.Now
	}
	s := &software{dir: dir, masterPath: masterPath, cache: cache, now: now, keys: map[string]crypto.Signer{}, decDEK: map[string]*cachedDEK{}}
	if err := s.setMaster(masterKey); err != nil {
		return nil, err
	}
	if err := s.resumeRotation(); err != nil {
		return nil, err
	}
	if err := s.checkMaster(); err != nil {
		return nil, err
	}
	return s, nil
}

// masterIDOf is a public fingerprint of a master key (HMAC-SHA-256 of a fixed label), so a
// sealed file and the master-key check can say which key they belong to without revealing it.
func masterIDOf(k []byte) []byte {
	h := hmac.New(sha256.New, k)
	h.Write([]byte("fulcrum master key id v1"))
	return h.Sum(nil)[:16]
}

func (s *software) setMaster(k []byte) error {
	aead, err := newGCM(k)
	if err != nil {
		return err
	}
	s.master, s.masterID = aead, masterIDOf(k)
	return nil
}

func (s *software) checkPath() string { return filepath.Join(s.dir, "master.id") }

// checkMaster refuses a master key other than the one the keys are sealed under: after a
// rotation the old key is refused at start with a clear error, not key by key later. The
// first start records the key's fingerprint.
func (s *software) checkMaster() error {
	b, err := os.ReadFile(s.checkPath())
	if errors.Is(err, fs.ErrNotExist) {
		return WriteFileAtomic(s.checkPath(), []byte(hex.EncodeToString(s.masterID)+"\n"), 0o600)
	}
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	if strings.TrimSpace(string(b)) != hex.EncodeToString(s.masterID) {
		return fmt.Errorf("keystore: the master key (id %x) is not the one the keys in %s are sealed under (id %s): an old master key after a rotation, or the wrong file", s.masterID, s.dir, strings.TrimSpace(string(b)))
	}
	return nil
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

// dataKeyCipher is the AEAD that seals and opens one key file under the data key dek. dek, a
// copy of the key, is wiped as soon as the cipher is made: the cipher keeps its own schedule.
func dataKeyCipher(dek []byte) (cipher.AEAD, error) {
	defer clear(dek)
	return newGCM(dek)
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
	s.flushCachesLocked()
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
	// The cached data key may be replaced (and cleared) by another seal once s.mu is released:
	// work on a copy.
	s.mu.Lock()
	d, err := s.dataKeyLocked()
	var dek []byte
	if err == nil {
		dek = slices.Clone(d.dek)
		if s.cache.maxUses == 0 {
			clear(d.dek)
		}
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	aead, err := dataKeyCipher(dek)
	if err != nil {
		return nil, err
	}
	sk := sealedKey{Version: 2, Name: name, MasterID: d.masterID, DEKNonce: d.nonce, DEK: d.wrapped, Nonce: make([]byte, aead.NonceSize())}
	if _, err := rand.Read(sk.Nonce); err != nil {
		return nil, err
	}
	sk.Sealed = aead.Seal(nil, sk.Nonce, der, aadKey(name))
	return json.Marshal(&sk)
}

// dataKeyLocked returns the data key to seal with: the cached one while it is young and
// little used enough, else a fresh one wrapped under the master key (s.mu held).
func (s *software) dataKeyLocked() (*cachedDEK, error) {
	now := s.now()
	if c := s.encDEK; c != nil && s.cache.maxUses > 0 && c.uses < s.cache.maxUses && now.Sub(c.created) < s.cache.maxAge {
		c.uses++
		s.stats.DataKeyCacheHits.Add(1)
		return c, nil
	}
	if s.cache.maxUses > 0 {
		s.stats.DataKeyCacheMisses.Add(1)
	}
	c := &cachedDEK{dek: make([]byte, 32), nonce: make([]byte, s.master.NonceSize()), created: now, uses: 1, masterID: s.masterID}
	if _, err := rand.Read(c.dek); err != nil {
		return nil, err
	}
	if _, err := rand.Read(c.nonce); err != nil {
		return nil, err
	}
	c.wrapped = s.master.Seal(nil, c.nonce, c.dek, aadDEK2)
	if s.cache.maxUses > 0 {
		if s.encDEK != nil {
			clear(s.encDEK.dek)
		}
		s.encDEK = c
	}
	return c, nil
}

// aadDEK2 binds a version-2 wrapped data key to its purpose (not to a key name: it is shared).
var aadDEK2 = []byte("fulcrum/dek/v2")

// openDEKLocked unwraps a sealed key's data key, from the cache when it holds it (s.mu held).
func (s *software) openDEKLocked(sk *sealedKey) ([]byte, error) {
	if len(sk.DEKNonce) != s.master.NonceSize() {
		return nil, errors.New("bad data-key nonce")
	}
	aad := aadDEK2
	if sk.Version == 1 {
		aad = aadDEK(sk.Name)
	}
	ck := string(sk.DEKNonce) + string(sk.DEK)
	if s.cache.maxUses > 0 && sk.Version == 2 {
		if c := s.decDEK[ck]; c != nil && c.uses < s.cache.maxUses && s.now().Sub(c.created) < s.cache.maxAge {
			c.uses++
			s.stats.DataKeyCacheHits.Add(1)
			return slices.Clone(c.dek), nil
		}
		s.stats.DataKeyCacheMisses.Add(1)
	}
	dek, err := s.master.Open(nil, sk.DEKNonce, sk.DEK, aad)
	if err != nil {
		return nil, fmt.Errorf("unwrap data key (wrong master key?): %w", err)
	}
	if s.cache.maxUses > 0 && sk.Version == 2 {
		if len(s.decDEK) >= decCacheEntries {
			for k, c := range s.decDEK { // evict one; the cache is small and bounded
				clear(c.dek)
				delete(s.decDEK, k)
				break
			}
		}
		s.decDEK[ck] = &cachedDEK{dek: slices.Clone(dek), created: s.now(), uses: 1}
	}
	return dek, nil
}

// flushCachesLocked forgets every cached data key (rotation, close).
func (s *software) flushCachesLocked() {
	if s.encDEK != nil {
		clear(s.encDEK.dek)
		s.encDEK = nil
	}
	for k, c := range s.decDEK {
		clear(c.dek)
		delete(s.decDEK, k)
	}
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
	if (sk.Version != 1 && sk.Version != 2) || sk.Name != name {
		return nil, fmt.Errorf("sealed key is version %d for %q", sk.Version, sk.Name)
	}
	dek, err := s.openDEKLocked(&sk)
	if err != nil {
		return nil, err
	}
	aead, err := dataKeyCipher(dek)
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

func readDirNames(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("keystore: list %s: %w", dir, err)
	}
	out := make([]string, 0, len(ents))
	for _, e := range ents {
		if e.Type().IsRegular() {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
