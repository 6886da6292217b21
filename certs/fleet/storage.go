package fleet

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Storage is a certmagic.Storage on etcd under PREFIX/data/. Values carry their modification
// time (an 8-byte header) for Stat. Locks are etcd mutexes on the node's lease: a node that
// dies holding one frees it when its lease expires.
//
// Every value read or written is also kept in the node's cache directory: when etcd does not
// answer, Load falls back to it, so a node keeps (and after a restart finds) what it had.
type Storage struct {
	f *Fleet

	mu    sync.Mutex
	locks map[string]*concurrency.Mutex
}

// Storage returns the fleet's certmagic.Storage (one per Fleet: its locks are the node's).
func (f *Fleet) Storage() *Storage {
	f.storeOnce.Do(func() { f.store = &Storage{f: f, locks: map[string]*concurrency.Mutex{}} })
	return f.store
}

var _ certmagic.Storage = (*Storage)(nil)

var magic = []byte("fl1")

func encode(v []byte, mod time.Time) []byte {
	out := make([]byte, 0, len(magic)+8+len(v))
	out = append(out, magic...)
	out = binary.BigEndian.AppendUint64(out, uint64(mod.UnixNano()))
	return append(out, v...)
}

func decode(b []byte) ([]byte, time.Time) {
	if len(b) < len(magic)+8 || !bytes.Equal(b[:len(magic)], magic) {
		return b, time.Time{}
	}
	ns := binary.BigEndian.Uint64(b[len(magic):])
	return b[len(magic)+8:], time.Unix(0, int64(ns))
}

func (s *Storage) dataKey(key string) string { return s.f.key("data/", strings.Trim(key, "/")) }

// retry runs op until it succeeds, ctx ends or the fleet's operation timeout passes. Each
// attempt gets a third of the timeout: a request stuck on a member that just died (or on a
// cluster electing a new leader) is tried again through another one rather than waited out.
func (s *Storage) retry(ctx context.Context, op func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, s.f.opTO)
	defer cancel()
	for {
		actx, acancel := context.WithTimeout(ctx, s.f.opTO/3)
		err := op(actx)
		acancel()
		if err == nil || ctx.Err() != nil {
			return err
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return err
		}
	}
}

func validKey(key string) error {
	if key == "" || strings.Contains(key, "..") || strings.ContainsAny(key, "\x00") {
		return fmt.Errorf("fleet: bad storage key %q", key)
	}
	return nil
}

// lookupErr is the error a lookup counts in the stats: a missing key is an answer, not a
// failure.
func lookupErr(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// Store puts value at key (and in the local cache).
func (s *Storage) Store(ctx context.Context, key string, value []byte) (err error) {
	defer func() { s.f.Stats.done(OpStore, err) }()
	if err := validKey(key); err != nil {
		return err
	}
	val := string(encode(value, time.Now()))
	if err := s.retry(ctx, func(ctx context.Context) error {
		_, err := s.f.cli.Put(ctx, s.dataKey(key), val)
		return err
	}); err != nil {
		return fmt.Errorf("fleet: store %s: %w", key, err)
	}
	s.cachePut(key, value)
	return nil
}

// Load reads key from etcd, or from the local cache when etcd does not answer.
func (s *Storage) Load(ctx context.Context, key string) (v []byte, err error) {
	defer func() { s.f.Stats.done(OpLoad, lookupErr(err)) }()
	if err := validKey(key); err != nil {
		return nil, err
	}
	var resp *clientv3.GetResponse
	err = s.retry(ctx, func(ctx context.Context) (err error) {
		resp, err = s.f.cli.Get(ctx, s.dataKey(key))
		return err
	})
	if err != nil {
		if b, cerr := s.cacheGet(key); cerr == nil {
			return b, nil
		}
		return nil, fmt.Errorf("fleet: load %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		s.cacheDel(key)
		return nil, fmt.Errorf("fleet: %s: %w", key, fs.ErrNotExist)
	}
	v, _ = decode(resp.Kvs[0].Value)
	s.cachePut(key, v)
	return v, nil
}

// Delete removes key and everything below it.
func (s *Storage) Delete(ctx context.Context, key string) (err error) {
	defer func() { s.f.Stats.done(OpDelete, err) }()
	if err := validKey(key); err != nil {
		return err
	}
	k := s.dataKey(key)
	err = s.retry(ctx, func(ctx context.Context) error {
		_, err := s.f.cli.Txn(ctx).Then(clientv3.OpDelete(k), clientv3.OpDelete(k+"/", clientv3.WithPrefix())).Commit()
		return err
	})
	if err != nil {
		return fmt.Errorf("fleet: delete %s: %w", key, err)
	}
	s.cacheDel(key)
	return nil
}

// Exists reports whether key is a value or a directory (a prefix of values).
func (s *Storage) Exists(ctx context.Context, key string) bool {
	_, err := s.Stat(ctx, key)
	return err == nil
}

// List lists the keys below dir: every value when recursive, else the direct children
// (values and directories).
func (s *Storage) List(ctx context.Context, dir string, recursive bool) (out []string, err error) {
	defer func() { s.f.Stats.done(OpList, err) }()
	dir = strings.Trim(dir, "/")
	pfx := s.f.key("data/")
	if dir != "" {
		pfx += dir + "/"
	}
	var resp *clientv3.GetResponse
	err = s.retry(ctx, func(ctx context.Context) (err error) {
		resp, err = s.f.cli.Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("fleet: list %s: %w", dir, err)
	}
	seen := map[string]bool{}
	for _, kv := range resp.Kvs {
		rel := strings.TrimPrefix(string(kv.Key), pfx)
		if !recursive {
			if i := strings.IndexByte(rel, '/'); i >= 0 {
				rel = rel[:i]
			}
		}
		k := path.Join(dir, rel)
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("fleet: list %s: %w", dir, fs.ErrNotExist)
	}
	sort.Strings(out)
	return out, nil
}

// Stat describes key.
func (s *Storage) Stat(ctx context.Context, key string) (ki certmagic.KeyInfo, err error) {
	defer func() { s.f.Stats.done(OpStat, lookupErr(err)) }()
	if err := validKey(key); err != nil {
		return ki, err
	}
	k := s.dataKey(key)
	var resp *clientv3.GetResponse
	err = s.retry(ctx, func(ctx context.Context) (err error) {
		resp, err = s.f.cli.Get(ctx, k)
		return err
	})
	if err != nil {
		return ki, fmt.Errorf("fleet: stat %s: %w", key, err)
	}
	if len(resp.Kvs) == 1 {
		v, mod := decode(resp.Kvs[0].Value)
		return certmagic.KeyInfo{Key: key, Modified: mod, Size: int64(len(v)), IsTerminal: true}, nil
	}
	err = s.retry(ctx, func(ctx context.Context) (err error) {
		resp, err = s.f.cli.Get(ctx, k+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err
	})
	if err != nil {
		return ki, fmt.Errorf("fleet: stat %s: %w", key, err)
	}
	if resp.Count > 0 {
		return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
	}
	return ki, fmt.Errorf("fleet: %s: %w", key, fs.ErrNotExist)
}

// Lock takes the fleet-wide lock name, waiting while another node holds it (or until ctx
// ends). The lock lives on this node's lease.
func (s *Storage) Lock(ctx context.Context, name string) (err error) {
	defer func() { s.f.Stats.done(OpLock, err) }()
	var m *concurrency.Mutex
	for {
		// Transient failures (a member dying, an election, etcd away for longer than the
		// lease) are waited out: the caller asked to wait for the lock, not to fail on them.
		sess, err := s.f.session(ctx)
		if err != nil {
			return fmt.Errorf("fleet: lock %s: %w", name, err)
		}
		m = concurrency.NewMutex(sess, s.f.key("locks/", strings.Trim(name, "/")))
		err = m.Lock(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("fleet: lock %s: %w", name, err)
		}
		s.f.log.Debug("fleet lock: retrying", "lock", name, "err", err)
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("fleet: lock %s: %w", name, ctx.Err())
		}
	}
	s.mu.Lock()
	s.locks[name] = m
	s.mu.Unlock()
	return nil
}

// Unlock releases a lock taken with Lock.
func (s *Storage) Unlock(ctx context.Context, name string) (err error) {
	defer func() { s.f.Stats.done(OpUnlock, err) }()
	s.mu.Lock()
	m := s.locks[name]
	delete(s.locks, name)
	s.mu.Unlock()
	if m == nil {
		return fmt.Errorf("fleet: unlock %s: not locked by this node", name)
	}
	if err := s.retry(context.WithoutCancel(ctx), m.Unlock); err != nil {
		// The key is on our lease: at worst it goes when the lease does.
		return fmt.Errorf("fleet: unlock %s: %w", name, err)
	}
	return nil
}

// Watch calls fn with the key (relative to the storage root) of every value stored or deleted
// under dir, from now until ctx ends. After a broken watch (etcd compacted past it) fn is
// called with "" to say: re-read everything.
func (s *Storage) Watch(ctx context.Context, dir string, fn func(key string)) {
	s.f.wg.Add(1)
	go func() {
		defer s.f.wg.Done()
		pfx := s.f.key("data/", strings.Trim(dir, "/"))
		root := s.f.key("data/")
		for ctx.Err() == nil && s.f.ctx.Err() == nil {
			wctx, cancel := context.WithCancel(ctx)
			stop := context.AfterFunc(s.f.ctx, cancel)
			wch := s.f.cli.Watch(clientv3.WithRequireLeader(wctx), pfx, clientv3.WithPrefix())
			for resp := range wch {
				if err := resp.Err(); err != nil {
					s.f.Stats.done(OpWatch, err)
					break
				}
				for _, ev := range resp.Events {
					s.f.Stats.done(OpWatch, nil)
					fn(strings.TrimPrefix(string(ev.Kv.Key), root))
				}
			}
			stop()
			cancel()
			if ctx.Err() != nil || s.f.ctx.Err() != nil {
				return
			}
			// Whatever happened while the watch was down is read again.
			select {
			case <-time.After(500 * time.Millisecond):
			case <-ctx.Done():
				return
			case <-s.f.ctx.Done():
				return
			}
			fn("")
		}
	}()
}

func (s *Storage) cachePath(key string) string {
	return filepath.Join(s.f.cache, filepath.FromSlash(strings.Trim(key, "/")))
}

func (s *Storage) cachePut(key string, v []byte) {
	if s.f.cache == "" {
		return
	}
	p := s.cachePath(key)
	if old, err := os.ReadFile(p); err == nil && bytes.Equal(old, v) {
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return
	}
	tf, err := os.CreateTemp(filepath.Dir(p), ".tmp-*")
	if err != nil {
		return
	}
	_, werr := tf.Write(v)
	if cerr := tf.Close(); werr == nil && cerr == nil {
		_ = os.Rename(tf.Name(), p)
	}
	_ = os.Remove(tf.Name())
}

func (s *Storage) cacheGet(key string) ([]byte, error) {
	if s.f.cache == "" {
		return nil, fs.ErrNotExist
	}
	return os.ReadFile(s.cachePath(key))
}

func (s *Storage) cacheDel(key string) {
	if s.f.cache != "" {
		_ = os.RemoveAll(s.cachePath(key))
	}
}
