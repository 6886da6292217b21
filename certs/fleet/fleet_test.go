package fleet

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"slices"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/fleet/etcdtest"
)

func open(t *testing.T, c *etcdtest.Cluster, node string) *Fleet {
	t.Helper()
	f, err := Open(context.Background(), Options{Endpoints: c.Endpoints(), Prefix: "/t/" + t.Name(), Node: node,
		LeaseTTL: 2 * time.Second, CacheDir: t.TempDir(), OpTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestFleetStorage(t *testing.T) {
	c := etcdtest.Start(t, 3)
	a, b := open(t, c, "a"), open(t, c, "b")
	sa, sb := a.Storage(), b.Storage()
	ctx := context.Background()

	changed := make(chan string, 16)
	sb.Watch(ctx, "certificates", func(k string) { changed <- k })
	// The watch may start after the first store: store until it reports.
	deadline := time.Now().Add(20 * time.Second)
	for got := false; !got; {
		if err := sa.Store(ctx, "certificates/www.json", []byte("chain")); err != nil {
			t.Fatal(err)
		}
		select {
		case k := <-changed:
			if k != "certificates/www.json" {
				t.Fatalf("watch reported %q", k)
			}
			got = true
		case <-time.After(time.Second):
			if time.Now().After(deadline) {
				t.Fatal("no watch event")
			}
		}
	}
	v, err := sb.Load(ctx, "certificates/www.json")
	if err != nil || string(v) != "chain" {
		t.Fatalf("load: %q %v", v, err)
	}
	if err := sa.Store(ctx, "certificates/sub/x.json", []byte("x")); err != nil {
		t.Fatal(err)
	}
	l, err := sb.List(ctx, "certificates", false)
	if err != nil || !slices.Equal(l, []string{"certificates/sub", "certificates/www.json"}) {
		t.Fatalf("list: %v %v", l, err)
	}
	l, _ = sb.List(ctx, "certificates", true)
	if !slices.Equal(l, []string{"certificates/sub/x.json", "certificates/www.json"}) {
		t.Fatalf("recursive list: %v", l)
	}
	ki, err := sb.Stat(ctx, "certificates/www.json")
	if err != nil || !ki.IsTerminal || ki.Size != 5 || time.Since(ki.Modified) > time.Hour {
		t.Fatalf("stat: %+v %v", ki, err)
	}
	if ki, err := sb.Stat(ctx, "certificates/sub"); err != nil || ki.IsTerminal {
		t.Fatalf("stat dir: %+v %v", ki, err)
	}
	if !sb.Exists(ctx, "certificates") || sb.Exists(ctx, "nothing") {
		t.Fatal("exists")
	}
	if err := sa.Delete(ctx, "certificates/sub"); err != nil {
		t.Fatal(err)
	}
	if _, err := sb.Load(ctx, "certificates/sub/x.json"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("deleted value: %v", err)
	}
	if _, err := sb.Stat(ctx, "nothing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("stat missing: %v", err)
	}

	// One member down changes nothing.
	c.Members[0].Kill()
	t0 := time.Now()
	if err := sa.Store(ctx, "k", []byte("v2")); err != nil {
		t.Fatalf("store with a member down: %v", err)
	}
	t.Logf("store with a member down took %s", time.Since(t0))
	if v, err := sb.Load(ctx, "k"); err != nil || string(v) != "v2" {
		t.Fatalf("load with a member down: %q %v", v, err)
	}
	// All of etcd down: loads come from the node's cache, stores fail (the caller retries).
	c.StopAll()
	if v, err := sb.Load(ctx, "k"); err != nil || string(v) != "v2" {
		t.Fatalf("load from cache with etcd down: %q %v", v, err)
	}
	if err := sa.Store(ctx, "k", []byte("v3")); err == nil {
		t.Fatal("store succeeded with etcd down")
	}
	// A node restarted while etcd is down finds what it had in its cache.
	b2, err := Open(ctx, Options{Endpoints: c.Endpoints(), Prefix: "/t/" + t.Name(), Node: "b", LeaseTTL: 2 * time.Second, CacheDir: b.cache, OpTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if v, err := b2.Storage().Load(ctx, "certificates/www.json"); err != nil || string(v) != "chain" {
		t.Fatalf("restarted node with etcd down: %q %v", v, err)
	}
	b2.Close()
	if _, e := a.Stats.Count(OpStore); e == 0 {
		t.Error("failed store not counted")
	}
	c.StartAll(t)
	deadline = time.Now().Add(30 * time.Second)
	for {
		if err := sa.Store(ctx, "k", []byte("v3")); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("store after etcd came back: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestFleetLockExpiresWithCrashedNode(t *testing.T) {
	c := etcdtest.Start(t, 1) // lease expiry needs no quorum games: one member is enough
	a, b := open(t, c, "a"), open(t, c, "b")
	ctx := context.Background()
	if err := a.Storage().Lock(ctx, "renew-www"); err != nil {
		t.Fatal(err)
	}
	st := waitNodes(t, b, 2)
	if len(st.Locks) != 1 || st.Locks[0].Holder != "a" || st.Locks[0].Name != "renew-www" {
		t.Fatalf("status locks: %+v", st)
	}
	if len(st.Nodes) != 2 {
		t.Fatalf("status nodes: %+v", st.Nodes)
	}
	// b waits while a holds the lock.
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	err := b.Storage().Lock(short, "renew-www")
	cancel()
	if err == nil {
		t.Fatal("b took a held lock")
	}
	// a crashes: its lease expires and b gets the lock.
	a.Kill()
	got := make(chan error, 1)
	go func() {
		lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		got <- b.Storage().Lock(lctx, "renew-www")
	}()
	if err := <-got; err != nil {
		t.Fatalf("lock after the holder crashed: %v", err)
	}
	if err := b.Storage().Unlock(ctx, "renew-www"); err != nil {
		t.Fatal(err)
	}
}

func TestFleetSecretRing(t *testing.T) {
	c := etcdtest.Start(t, 1)
	key := bytes.Repeat([]byte{7}, 32)
	s, _ := NewSealer(key)
	nodes := []*Fleet{open(t, c, "a"), open(t, c, "b"), open(t, c, "c")}
	ctx := context.Background()
	var rings []*SecretRing
	changes := make(chan [][32]byte, 64)
	for _, f := range nodes {
		if err := f.CheckMasterKey(ctx, s); err != nil {
			t.Fatal(err)
		}
		r, err := f.Ring(ctx, "tickets", s, time.Hour, 2, func(k [][32]byte) { changes <- k })
		if err != nil {
			t.Fatal(err)
		}
		rings = append(rings, r)
	}
	first := rings[0].Secrets()
	for _, r := range rings[1:] {
		if !slices.Equal(r.Secrets(), first) {
			t.Fatal("nodes started with different rings")
		}
	}
	if err := rings[1].Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	want := rings[1].Secrets()
	if len(want) != 2 || want[1] != first[0] {
		t.Fatalf("rotated ring: %d secrets", len(want))
	}
	deadline := time.Now().Add(20 * time.Second)
	for _, r := range rings {
		for !slices.Equal(r.Secrets(), want) {
			if time.Now().After(deadline) {
				t.Fatal("rotation did not reach every node")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	other, _ := NewSealer(bytes.Repeat([]byte{8}, 32))
	if err := nodes[0].CheckMasterKey(ctx, other); err == nil {
		t.Fatal("a different master key was accepted")
	}
	st := nodes[0].Status(ctx)
	leaders := 0
	for _, l := range st.Locks {
		if l.Name == "leader:tickets" {
			leaders++
		}
	}
	if leaders != 1 {
		t.Fatalf("leaders: %+v", st.Locks)
	}
}

// waitNodes waits until f sees n nodes' heartbeats.
func waitNodes(t *testing.T, f *Fleet, n int) Status {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := f.Status(context.Background())
		if len(st.Nodes) == n {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("status: want %d nodes: %+v", n, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
