package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/keystore"
)

// Sticky-cookie keys (backends.StickyKeys) without a fleet. Each generation is an RSA key in the
// keystore, sealed like certificate keys (or inside the HSM, never leaving it); the HMAC key is
// derived from its PKCS#1 v1.5 signature of a fixed message, which is deterministic, so every
// process that opens the keystore derives the same key and nothing secret is ever written in
// the clear. state_dir/sticky-keys.json lists the generations (names and dates, no key).
//
// A new generation signs every sticky_key_rotation; the ones it replaced still verify for
// sticky_key_overlap, then their keys are deleted.

const stickyFile = "sticky-keys.json"

// stickyMessage is what each generation's key signs to derive the cookie key.
var stickyMessage = sha256.Sum256([]byte("fulcrum sticky cookie key v1"))

// stickyGen is one generation in sticky-keys.json.
type stickyGen struct {
	Key     string    `json:"key"` // keystore key name
	Created time.Time `json:"created"`
	// Retired is when a newer generation took over signing; zero for the signing one.
	Retired time.Time `json:"retired,omitzero"`
}

// stickySet is what the request path reads: the signing key and every key that verifies.
type stickySet struct {
	sign   []byte
	verify [][]byte
}

// stickyRing holds the generations. mu serialises refreshes; the request path reads set only.
type stickyRing struct {
	mu      sync.Mutex
	gens    []stickyGen       // newest first
	derived map[string][]byte // by keystore key name
	set     atomic.Pointer[stickySet]
}

// StickyKeys is backends.StickyKeys: the current sticky-cookie keys. Without a fleet only;
// nil before NewManager made the first generation.
func (m *Manager) StickyKeys() (sign []byte, verify [][]byte) {
	if s := m.sticky.set.Load(); s != nil {
		return s.sign, s.verify
	}
	return nil, nil
}

// refreshSticky brings the generations up to date at now: drops those past their overlap,
// makes a new signing one when the current is older than the rotation period, and publishes
// the keys. It returns when it must run next.
func (m *Manager) refreshSticky(ctx context.Context, now time.Time) (time.Time, error) {
	r := &m.sticky
	r.mu.Lock()
	defer r.mu.Unlock()
	sv := &m.cfg.Load().Server
	rotation, overlap := sv.StickyKeyRotationDuration(), sv.StickyKeyOverlapDuration()
	if rotation <= 0 || overlap <= 0 {
		return time.Time{}, errors.New("certs: sticky-cookie keys: the configuration was not validated (sticky_key_rotation, sticky_key_overlap)")
	}
	path := filepath.Join(m.stateDir, stickyFile)
	if r.derived == nil {
		r.derived = map[string][]byte{}
		b, err := os.ReadFile(path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return time.Time{}, fmt.Errorf("certs: sticky-cookie keys: %w", err)
		default:
			if err := json.Unmarshal(b, &r.gens); err != nil {
				return time.Time{}, fmt.Errorf("certs: sticky-cookie keys: %s: %w", path, err)
			}
		}
	}
	gens := r.gens
	changed := false
	if len(gens) == 0 || !now.Before(gens[0].Created.Add(rotation)) {
		name := m.prefix + "sticky-" + strconv.FormatInt(now.UnixNano(), 36)
		if _, err := m.ks.Generate(ctx, name, keystore.RSA2048); err != nil {
			return time.Time{}, fmt.Errorf("certs: new sticky-cookie key: %w", err)
		}
		if len(gens) > 0 {
			gens[0].Retired = now
		}
		gens = append([]stickyGen{{Key: name, Created: now}}, gens...)
		changed = true
	}
	var expired []string
	kept := gens[:1]
	for _, g := range gens[1:] {
		if now.Before(g.Retired.Add(overlap)) {
			kept = append(kept, g)
		} else {
			expired = append(expired, g.Key)
			changed = true
		}
	}
	gens = kept
	if changed {
		b, _ := json.MarshalIndent(gens, "", "  ")
		if err := keystore.WriteFileAtomic(path, b, 0o600); err != nil {
			return time.Time{}, fmt.Errorf("certs: sticky-cookie keys: %w", err)
		}
	}
	r.gens = gens
	// Keys are deleted only once the file no longer names them: a crash in between leaves an
	// unused key, never a listed one that is gone.
	for _, k := range expired {
		delete(r.derived, k)
		if err := m.ks.Delete(ctx, k); err != nil {
			m.log.Warn("deleting an expired sticky-cookie key", "key", k, "err", err)
		}
	}
	set := &stickySet{}
	next := gens[0].Created.Add(rotation)
	for i, g := range gens {
		k, err := m.stickyKey(ctx, g.Key)
		if err != nil {
			return time.Time{}, err
		}
		if i == 0 {
			set.sign = k
		} else if end := g.Retired.Add(overlap); end.Before(next) {
			next = end
		}
		set.verify = append(set.verify, k)
	}
	r.set.Store(set)
	return next, nil
}

// stickyKey derives (once per process) the cookie key of the generation whose keystore key is
// name. Called with the ring locked.
func (m *Manager) stickyKey(ctx context.Context, name string) ([]byte, error) {
	if k := m.sticky.derived[name]; k != nil {
		return k, nil
	}
	s, err := m.ks.Signer(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("certs: sticky-cookie key %s: %w", name, err)
	}
	var sigs [2][]byte
	for i := range sigs {
		if sigs[i], err = s.Sign(rand.Reader, stickyMessage[:], crypto.SHA256); err != nil {
			return nil, fmt.Errorf("certs: sticky-cookie key %s: %w", name, err)
		}
	}
	// The derivation is only stable if the signature is: refuse a keystore where it is not,
	// rather than break every binding at the next restart.
	if !bytes.Equal(sigs[0], sigs[1]) {
		return nil, fmt.Errorf("certs: sticky-cookie key %s: the keystore's signatures are not deterministic", name)
	}
	h := hmac.New(sha256.New, sigs[0])
	h.Write([]byte("fulcrum sticky cookie v1"))
	k := h.Sum(nil)
	m.sticky.derived[name] = k
	return k, nil
}

// rotateSticky refreshes the sticky-cookie keys whenever a generation is due, until Close.
func (m *Manager) rotateSticky(next time.Time) {
	defer m.wg.Done()
	for {
		t := time.NewTimer(time.Until(next))
		select {
		case <-m.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		n, err := m.refreshSticky(m.ctx, time.Now())
		if err != nil {
			// The keys in use stay in use; try again soon rather than at the next period.
			m.log.Error("rotating the sticky-cookie keys", "err", err)
			n = time.Now().Add(time.Minute)
		}
		next = n
	}
}
