// Package fleet lets several Fulcrum nodes share their certificate state through etcd: a
// certmagic.Storage whose locks are held on etcd leases (a crashed node's locks expire with its
// lease), watches that tell every node within moments what another node stored, node
// heartbeats for /admin/fleet, and rotating secrets (session-ticket and sticky-cookie keys)
// sealed under the fleet's master key and rotated by one lease-held leader.
//
// Nothing in etcd is a private key in the clear: software-keystore keys arrive already sealed
// under the shared master key, HSM keys never leave the HSM (only their names and the
// certificates are stored), and shared secrets are sealed here.
package fleet

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc/grpclog"
)

// Options configure a Fleet.
type Options struct {
	Endpoints []string
	TLS       *tls.Config // nil: plain connections (loopback or a private network)
	Prefix    string      // every key lives under it, e.g. "/fulcrum/"
	Node      string      // this node's name
	LeaseTTL  time.Duration
	// CacheDir keeps a copy of every value this node read or wrote, so a node restarted
	// while etcd is unreachable still finds its certificates. "" disables it.
	CacheDir string
	// OpTimeout bounds each storage operation (default 5s): an unreachable etcd turns into an
	// error the caller retries, never a hang.
	OpTimeout time.Duration
	Log       *slog.Logger
}

// Fleet is one node's membership: an etcd client, a lease kept alive while etcd answers (the
// node's heartbeat, locks and leadership hang on it) and the operation counters.
type Fleet struct {
	cli    *clientv3.Client
	prefix string
	node   string
	ttl    time.Duration
	opTO   time.Duration
	log    *slog.Logger
	cache  string

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	sess    *concurrency.Session // nil while etcd is unreachable
	sessCh  chan struct{}        // closed and replaced whenever sess changes
	started time.Time

	storeOnce sync.Once
	store     *Storage

	Stats Stats
}

// Stats count storage operations and their failures, by operation.
type Stats struct {
	ops  [numOps]atomic.Uint64
	errs [numOps]atomic.Uint64
}

// Op is a storage operation counted in Stats.
type Op int

// The counted operations.
const (
	OpLoad Op = iota
	OpStore
	OpDelete
	OpList
	OpStat
	OpLock
	OpUnlock
	OpWatch
	numOps
)

// OpNames names the operations for metrics labels.
var OpNames = [numOps]string{"load", "store", "delete", "list", "stat", "lock", "unlock", "watch"}

// Count returns the operations and failures of op.
func (s *Stats) Count(op Op) (ops, errs uint64) { return s.ops[op].Load(), s.errs[op].Load() }

func (s *Stats) done(op Op, err error) {
	s.ops[op].Add(1)
	if err != nil {
		s.errs[op].Add(1)
	}
}

var quietGRPC sync.Once

// Open connects to etcd (in the background: an unreachable etcd is not an error here) and
// starts keeping this node's lease and heartbeat. Close stops everything.
func Open(ctx context.Context, o Options) (*Fleet, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("fleet: no etcd endpoints")
	}
	if o.Node == "" || strings.Contains(o.Node, "/") {
		return nil, fmt.Errorf("fleet: bad node name %q", o.Node)
	}
	if o.LeaseTTL < 2*time.Second { // configs defaults lease_ttl and refuses less
		return nil, fmt.Errorf("fleet: lease TTL %v is under etcd's 2s minimum", o.LeaseTTL)
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = 5 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	prefix := "/" + strings.Trim(o.Prefix, "/") + "/"
	eps := make([]string, len(o.Endpoints))
	for i, ep := range o.Endpoints {
		if !strings.Contains(ep, "://") {
			if o.TLS != nil {
				ep = "https://" + ep
			} else {
				ep = "http://" + ep
			}
		}
		eps[i] = ep
	}
	quietGRPC.Do(func() {
		// grpc logs every failed reconnect to stderr; etcd being down is reported by us, once.
		grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, io.Discard))
	})
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            eps,
		TLS:                  o.TLS,
		DialTimeout:          o.OpTimeout,
		DialKeepAliveTime:    o.LeaseTTL / 2,
		DialKeepAliveTimeout: o.LeaseTTL / 2,
		Logger:               zap.NewNop(),
		Context:              context.WithoutCancel(ctx),
	})
	if err != nil {
		return nil, fmt.Errorf("fleet: etcd client: %w", err)
	}
	f := &Fleet{cli: cli, prefix: prefix, node: o.Node, ttl: o.LeaseTTL, opTO: o.OpTimeout, log: o.Log.With("fleet", o.Node),
		cache: o.CacheDir, sessCh: make(chan struct{}), started: time.Now()}
	f.ctx, f.cancel = context.WithCancel(context.WithoutCancel(ctx))
	f.wg.Add(1)
	go f.keepSession()
	return f, nil
}

// Node is this node's name.
func (f *Fleet) Node() string { return f.node }

// LeaseTTL is how long a crashed node's locks and leadership outlive it.
func (f *Fleet) LeaseTTL() time.Duration { return f.ttl }

// Client is the etcd client (tests and the admin endpoint).
func (f *Fleet) Client() *clientv3.Client { return f.cli }

// Close resigns everything this node holds (its lease is revoked, so its locks are free at
// once rather than after the TTL) and closes the client.
func (f *Fleet) Close() error {
	f.cancel()
	f.wg.Wait()
	f.mu.Lock()
	s := f.sess
	f.sess = nil
	f.mu.Unlock()
	if s != nil {
		ctx, cancel := context.WithTimeout(context.Background(), f.opTO)
		_, _ = f.cli.Revoke(ctx, s.Lease())
		cancel()
	}
	return f.cli.Close()
}

// Kill drops the client without revoking the lease, as a crashed process would: its locks and
// leadership stay until the lease expires. For tests of takeover.
func (f *Fleet) Kill() {
	f.cancel()
	f.wg.Wait()
	f.cli.Close()
}

func (f *Fleet) key(parts ...string) string { return f.prefix + strings.Join(parts, "") }

// session waits for a live session (etcd reachable, lease granted) or ctx's end.
func (f *Fleet) session(ctx context.Context) (*concurrency.Session, error) {
	for {
		f.mu.Lock()
		s, ch := f.sess, f.sessCh
		f.mu.Unlock()
		if s != nil {
			select {
			case <-s.Done():
			default:
				return s, nil
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("fleet: no etcd session: %w", ctx.Err())
		case <-f.ctx.Done():
			return nil, errors.New("fleet: closed")
		}
	}
}

// nodeRecord is the heartbeat value under PREFIX/nodes/NODE (on the node's lease).
type nodeRecord struct {
	Node      string    `json:"node"`
	Lease     string    `json:"lease"` // hex lease id: lock and leader keys carry it
	Started   time.Time `json:"started"`
	Heartbeat time.Time `json:"heartbeat"`
}

// keepSession keeps a lease alive while etcd answers and makes a new one whenever it is lost
// (etcd unreachable for longer than the TTL): locks and leadership are tied to it.
func (f *Fleet) keepSession() {
	defer f.wg.Done()
	backoff := 200 * time.Millisecond
	for f.ctx.Err() == nil {
		s, err := concurrency.NewSession(f.cli, concurrency.WithTTL(int((f.ttl+time.Second-1)/time.Second)), concurrency.WithContext(f.ctx))
		if err != nil {
			if f.ctx.Err() != nil {
				return
			}
			f.log.Warn("etcd session", "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-f.ctx.Done():
				return
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 200 * time.Millisecond
		f.mu.Lock()
		f.sess = s
		close(f.sessCh)
		f.sessCh = make(chan struct{})
		f.mu.Unlock()
		f.heartbeat(s)
		f.mu.Lock()
		if f.sess == s {
			f.sess = nil
			close(f.sessCh)
			f.sessCh = make(chan struct{})
		}
		f.mu.Unlock()
		if f.ctx.Err() == nil {
			f.log.Warn("etcd session lost; its locks and leadership are released")
		}
	}
}

// heartbeat writes the node record on the session's lease every third of the TTL until the
// session ends.
func (f *Fleet) heartbeat(s *concurrency.Session) {
	t := time.NewTicker(f.ttl / 3)
	defer t.Stop()
	for {
		rec := nodeRecord{Node: f.node, Lease: strconv.FormatInt(int64(s.Lease()), 16), Started: f.started, Heartbeat: time.Now().UTC()}
		b, _ := json.Marshal(rec)
		ctx, cancel := context.WithTimeout(f.ctx, f.opTO)
		_, err := f.cli.Put(ctx, f.key("nodes/", f.node), string(b), clientv3.WithLease(s.Lease()))
		cancel()
		if err != nil && f.ctx.Err() == nil {
			f.log.Debug("fleet heartbeat", "err", err)
		}
		select {
		case <-t.C:
		case <-s.Done():
			return
		case <-f.ctx.Done():
			return
		}
	}
}

// NodeStatus is one node as /admin/fleet shows it.
type NodeStatus struct {
	Node      string    `json:"node"`
	Started   time.Time `json:"started"`
	Heartbeat time.Time `json:"last_heartbeat"`
	Self      bool      `json:"self,omitempty"`
}

// LockStatus is a held lock (or leadership) and the node holding it.
type LockStatus struct {
	Name   string `json:"name"`
	Holder string `json:"holder"` // node name, or the lease id when the node is unknown
}

// Status is what /admin/fleet shows.
type Status struct {
	Node      string       `json:"node"`
	Prefix    string       `json:"prefix"`
	Connected bool         `json:"connected"` // this node holds a live etcd lease
	Nodes     []NodeStatus `json:"nodes"`
	Locks     []LockStatus `json:"locks"`
	Error     string       `json:"error,omitempty"`
}

// Status reads the fleet's nodes and lock holders from etcd.
func (f *Fleet) Status(ctx context.Context) Status {
	st := Status{Node: f.node, Prefix: f.prefix, Nodes: []NodeStatus{}, Locks: []LockStatus{}}
	f.mu.Lock()
	st.Connected = f.sess != nil
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, f.opTO)
	defer cancel()
	resp, err := f.cli.Get(ctx, f.key("nodes/"), clientv3.WithPrefix())
	if err != nil {
		st.Error = err.Error()
		return st
	}
	byLease := map[int64]string{}
	for _, kv := range resp.Kvs {
		var rec nodeRecord
		if json.Unmarshal(kv.Value, &rec) != nil {
			continue
		}
		byLease[kv.Lease] = rec.Node
		st.Nodes = append(st.Nodes, NodeStatus{Node: rec.Node, Started: rec.Started, Heartbeat: rec.Heartbeat, Self: rec.Node == f.node})
	}
	for _, dir := range []string{"locks/", "leaders/"} {
		resp, err := f.cli.Get(ctx, f.key(dir), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
		if err != nil {
			st.Error = err.Error()
			return st
		}
		seen := map[string]bool{}
		for _, kv := range resp.Kvs {
			// concurrency keys are PFX/NAME/LEASEID; the oldest one holds it.
			rest := strings.TrimPrefix(string(kv.Key), f.key(dir))
			i := strings.LastIndexByte(rest, '/')
			if i < 0 {
				continue
			}
			name := rest[:i]
			if seen[name] {
				continue
			}
			seen[name] = true
			holder := byLease[kv.Lease]
			if holder == "" {
				holder = "lease " + strconv.FormatInt(kv.Lease, 16)
			}
			if dir == "leaders/" {
				name = "leader:" + name
			}
			st.Locks = append(st.Locks, LockStatus{Name: name, Holder: holder})
		}
	}
	return st
}
