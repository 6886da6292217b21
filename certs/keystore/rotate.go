package keystore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Master-key rotation of the software keystore: every data key is unwrapped with the current
// master key and wrapped again under a new one; the keys themselves (sealed under their data
// keys) are not touched, and signers in memory keep signing throughout, so rotation needs no
// downtime. Crash safety: the new key is written to master_key's file + ".next" first; each
// sealed file is then replaced atomically; the ".next" file is renamed over the old key last.
// A start that finds ".next" finishes the rotation (files already re-wrapped open with it).

// ErrCannotRotate is returned when the keystore has no master key Fulcrum can replace.
var ErrCannotRotate = errors.New("master key cannot be rotated here")

// RotateMasterKey re-wraps every data key under a fresh master key, which replaces the
// master_key file. The old key opens nothing afterwards and is refused at start.
func (m *Managed) RotateMasterKey(ctx context.Context) (string, error) {
	s, ok := m.b.(*software)
	var id string
	var err error
	if !ok {
		err = fmt.Errorf("%w: the keystore is %s, whose keys never leave the HSM (rotate wrapping keys in the HSM itself)", ErrCannotRotate, m.b.Describe())
	} else {
		id, err = s.rotate()
	}
	m.event(ctx, "rotate-master-key", "master_key", err)
	return id, err
}

func (s *software) nextPath() string { return s.masterPath + ".next" }

func (s *software) rotate() (string, error) {
	if s.blobs != nil {
		return "", fmt.Errorf("%w: in a fleet every node holds the master key; rotating it on one node would lock the others out", ErrCannotRotate)
	}
	if s.masterPath == "" {
		return "", fmt.Errorf("%w: master_key comes from the environment; set a new one there and re-seal with master_key = \"file:...\"", ErrCannotRotate)
	}
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return "", err
	}
	defer clear(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := WriteFileAtomic(s.nextPath(), k, 0o600); err != nil {
		return "", fmt.Errorf("keystore: write new master key: %w", err)
	}
	if err := s.finishRotationLocked(k); err != nil {
		return "", err
	}
	return hex.EncodeToString(s.masterID), nil
}

// resumeRotation finishes a rotation a crash interrupted.
func (s *software) resumeRotation() error {
	if s.masterPath == "" {
		return nil
	}
	k, err := os.ReadFile(s.nextPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	defer clear(k)
	if len(k) != 32 {
		return fmt.Errorf("keystore: %s: need 32 bytes, got %d", s.nextPath(), len(k))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.finishRotationLocked(k)
}

// finishRotationLocked re-wraps every sealed file still under the current master key, then
// makes next the master key (s.mu held).
func (s *software) finishRotationLocked(next []byte) error {
	nextAEAD, err := newGCM(next)
	if err != nil {
		return err
	}
	nextID := masterIDOf(next)
	names, err := readDirNames(s.dir)
	if err != nil {
		return err
	}
	for _, f := range names {
		if !strings.HasSuffix(f, ".sealed") {
			continue
		}
		p := filepath.Join(s.dir, f)
		blob, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("keystore: rotate: %w", err)
		}
		var sk sealedKey
		if err := json.Unmarshal(blob, &sk); err != nil {
			return fmt.Errorf("keystore: rotate %s: %w", f, err)
		}
		if sk.Version == 2 && string(sk.MasterID) == string(nextID) {
			continue // re-wrapped before a crash
		}
		dek, err := s.openDEKLocked(&sk)
		if err != nil {
			return fmt.Errorf("keystore: rotate %s: %w", f, err)
		}
		nonce := make([]byte, nextAEAD.NonceSize())
		if _, err := rand.Read(nonce); err != nil {
			clear(dek)
			return err
		}
		sk.Version, sk.MasterID, sk.DEKNonce = 2, nextID, nonce
		sk.DEK = nextAEAD.Seal(nil, nonce, dek, aadDEK2)
		clear(dek)
		out, err := json.Marshal(&sk)
		if err != nil {
			return err
		}
		if err := WriteFileAtomic(p, out, 0o600); err != nil {
			return fmt.Errorf("keystore: rotate %s: %w", f, err)
		}
	}
	// Every file opens with next now: make it the master key.
	if err := os.Rename(s.nextPath(), s.masterPath); err != nil {
		return fmt.Errorf("keystore: install the new master key: %w", err)
	}
	s.flushCachesLocked()
	if err := s.setMaster(next); err != nil {
		return err
	}
	return WriteFileAtomic(s.checkPath(), []byte(hex.EncodeToString(s.masterID)+"\n"), 0o600)
}
