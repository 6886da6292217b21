package fleet

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Sealer seals values under the fleet's 32-byte master key (AES-256-GCM, the value's name as
// additional data, so a sealed value cannot be moved to another name).
type Sealer struct{ aead cipher.AEAD }

// NewSealer makes a Sealer from a 32-byte key.
func NewSealer(key []byte) (*Sealer, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("fleet: master key must be 32 bytes, got %d", len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: a}, nil
}

func aad(name string) []byte { return []byte("fulcrum/fleet/v1/" + name) }

// Seal returns nonce||ciphertext.
func (s *Sealer) Seal(name string, plain []byte) []byte {
	nonce := make([]byte, s.aead.NonceSize(), s.aead.NonceSize()+len(plain)+s.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return s.aead.Seal(nonce, nonce, plain, aad(name))
}

// Open reverses Seal.
func (s *Sealer) Open(name string, sealed []byte) ([]byte, error) {
	n := s.aead.NonceSize()
	if len(sealed) < n {
		return nil, errors.New("fleet: sealed value too short")
	}
	out, err := s.aead.Open(nil, sealed[:n], sealed[n:], aad(name))
	if err != nil {
		return nil, fmt.Errorf("fleet: open sealed %s (is master_key the same on every node?): %w", name, err)
	}
	return out, nil
}

// ErrMasterKeyMismatch: this node cannot open what the fleet sealed.
var ErrMasterKeyMismatch = errors.New("fleet: this node's master key differs from the fleet's: every node needs the same master_key")

// CheckMasterKey makes sure every node seals under the same key: the first node stores a
// sealed marker, and a node whose key cannot open it is refused with a clear error rather
// than failing later on every sealed key.
func (f *Fleet) CheckMasterKey(ctx context.Context, s *Sealer) error {
	k := f.key("secrets/master-key-check")
	ctx, cancel := context.WithTimeout(ctx, f.opTO)
	defer cancel()
	sealed := s.Seal("master-key-check", []byte("fulcrum fleet"))
	resp, err := f.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, string(sealed))).Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return fmt.Errorf("fleet: master key check: %w", err)
	}
	if resp.Succeeded {
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return nil
	}
	if _, err := s.Open("master-key-check", kvs[0].Value); err != nil {
		return ErrMasterKeyMismatch
	}
	return nil
}

// SecretRing is a rotating set of 32-byte secrets shared by the fleet (newest first, the
// previous one still accepted): session-ticket keys, sticky-cookie keys. One node at a time
// (the holder of the lease-held leadership PREFIX/leaders/NAME) rotates; every node watches
// the sealed value and hands each new ring to the onChange callback given to Ring. While etcd is unreachable nodes keep
// the ring they have.
type SecretRing struct {
	f        *Fleet
	name     string
	sealer   *Sealer
	rotation time.Duration
	keep     int
	onChange func([][32]byte)

	mu   sync.Mutex
	cur  ring
	kick chan struct{}
}

type ring struct {
	Secrets [][32]byte `json:"secrets"`
	Rotated time.Time  `json:"rotated"`
}

// Ring starts sharing the secret ring name, rotated every rotation and keeping keep
// generations (at least 2). It returns once the current ring is known (read, or created by
// this node), or with an error if etcd did not answer in time; the ring then follows etcd in
// the background either way, until the fleet is closed.
func (f *Fleet) Ring(ctx context.Context, name string, sealer *Sealer, rotation time.Duration, keep int, onChange func([][32]byte)) (*SecretRing, error) {
	if keep < 2 {
		keep = 2
	}
	r := &SecretRing{f: f, name: name, sealer: sealer, rotation: rotation, keep: keep, onChange: onChange, kick: make(chan struct{}, 1)}
	err := r.ensure(ctx)
	f.wg.Add(2)
	go r.follow()
	go r.lead()
	return r, err
}

func (r *SecretRing) key() string { return r.f.key("secrets/", r.name) }

// ensure reads the ring, creating it if there is none.
func (r *SecretRing) ensure(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.f.opTO)
	defer cancel()
	fresh := ring{Secrets: [][32]byte{newSecret()}, Rotated: time.Now().UTC()}
	b, _ := json.Marshal(fresh)
	resp, err := r.f.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(r.key()), "=", 0)).
		Then(clientv3.OpPut(r.key(), string(r.sealer.Seal(r.name, b)))).Else(clientv3.OpGet(r.key())).Commit()
	if err != nil {
		return fmt.Errorf("fleet: secret %s: %w", r.name, err)
	}
	if resp.Succeeded {
		r.set(fresh)
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return fmt.Errorf("fleet: secret %s vanished", r.name)
	}
	return r.apply(kvs[0].Value)
}

func (r *SecretRing) apply(sealed []byte) error {
	b, err := r.sealer.Open(r.name, sealed)
	if err != nil {
		return err
	}
	var rg ring
	if err := json.Unmarshal(b, &rg); err != nil || len(rg.Secrets) == 0 {
		return fmt.Errorf("fleet: secret %s: bad ring", r.name)
	}
	r.set(rg)
	return nil
}

func (r *SecretRing) set(rg ring) {
	r.mu.Lock()
	changed := len(rg.Secrets) != len(r.cur.Secrets) || len(rg.Secrets) > 0 && rg.Secrets[0] != r.cur.Secrets[0]
	r.cur = rg
	r.mu.Unlock()
	if changed && r.onChange != nil {
		r.onChange(rg.Secrets)
	}
}

// Secrets is the current ring, newest first.
func (r *SecretRing) Secrets() [][32]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][32]byte(nil), r.cur.Secrets...)
}

// Rotate asks the leader to rotate now (an operator after a suspected leak, or tests). It
// rotates directly in etcd with a compare-and-swap, so it works from any node.
func (r *SecretRing) Rotate(ctx context.Context) error { return r.rotate(ctx, true) }

// rotate replaces the ring with a new secret in front if force or the newest is older than
// the rotation period; a compare-and-swap keeps two rotators from losing a generation.
func (r *SecretRing) rotate(ctx context.Context, force bool) error {
	ctx, cancel := context.WithTimeout(ctx, r.f.opTO)
	defer cancel()
	resp, err := r.f.cli.Get(ctx, r.key())
	if err != nil {
		return fmt.Errorf("fleet: rotate %s: %w", r.name, err)
	}
	var rg ring
	var rev int64
	if len(resp.Kvs) == 1 {
		rev = resp.Kvs[0].ModRevision
		b, err := r.sealer.Open(r.name, resp.Kvs[0].Value)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &rg); err != nil {
			return fmt.Errorf("fleet: secret %s: %w", r.name, err)
		}
	}
	if !force && len(rg.Secrets) > 0 && time.Since(rg.Rotated) < r.rotation {
		return nil
	}
	rg.Secrets = append([][32]byte{newSecret()}, rg.Secrets...)
	if len(rg.Secrets) > r.keep {
		rg.Secrets = rg.Secrets[:r.keep]
	}
	rg.Rotated = time.Now().UTC()
	b, _ := json.Marshal(rg)
	tx, err := r.f.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(r.key()), "=", rev)).
		Then(clientv3.OpPut(r.key(), string(r.sealer.Seal(r.name, b)))).Commit()
	if err != nil {
		return fmt.Errorf("fleet: rotate %s: %w", r.name, err)
	}
	if tx.Succeeded {
		r.set(rg)
	}
	return nil
}

// follow applies every ring stored by any node.
func (r *SecretRing) follow() {
	defer r.f.wg.Done()
	for r.f.ctx.Err() == nil {
		wctx, cancel := context.WithCancel(r.f.ctx)
		for resp := range r.f.cli.Watch(clientv3.WithRequireLeader(wctx), r.key()) {
			if resp.Err() != nil {
				break
			}
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypePut {
					if err := r.apply(ev.Kv.Value); err != nil {
						r.f.log.Error("shared secret", "secret", r.name, "err", err)
					}
				}
			}
		}
		cancel()
		select {
		case <-time.After(500 * time.Millisecond):
		case <-r.f.ctx.Done():
			return
		}
		// Catch up with what changed while the watch was down.
		if err := r.ensure(r.f.ctx); err != nil {
			r.f.log.Debug("shared secret resync", "secret", r.name, "err", err)
		}
	}
}

// lead campaigns for the ring's leadership and, while leader, rotates on schedule.
func (r *SecretRing) lead() {
	defer r.f.wg.Done()
	for r.f.ctx.Err() == nil {
		sess, err := r.f.session(r.f.ctx)
		if err != nil {
			return
		}
		el := concurrency.NewElection(sess, r.f.key("leaders/", r.name))
		cctx, cancel := context.WithCancel(r.f.ctx)
		stop := context.AfterFunc(sessDone(sess), cancel)
		if err := el.Campaign(cctx, r.f.node); err != nil {
			stop()
			cancel()
			continue
		}
		r.f.log.Debug("leading secret rotation", "secret", r.name)
		for cctx.Err() == nil {
			if err := r.rotate(cctx, false); err != nil && cctx.Err() == nil {
				r.f.log.Warn("rotating shared secret", "secret", r.name, "err", err)
			}
			wait := r.rotation
			r.mu.Lock()
			if !r.cur.Rotated.IsZero() {
				wait = time.Until(r.cur.Rotated.Add(r.rotation))
			}
			r.mu.Unlock()
			wait = max(wait, time.Second)
			select {
			case <-time.After(wait):
			case <-cctx.Done():
			}
		}
		stop()
		cancel()
		rctx, rcancel := context.WithTimeout(context.Background(), r.f.opTO)
		_ = el.Resign(rctx)
		rcancel()
	}
}

// sessDone is a context that ends with the session.
func sessDone(s *concurrency.Session) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-s.Done()
		cancel()
	}()
	return ctx
}

func newSecret() [32]byte {
	var s [32]byte
	if _, err := rand.Read(s[:]); err != nil {
		panic(err)
	}
	return s
}
