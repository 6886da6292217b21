package certs

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"github.com/fulcrum-lb/fulcrum/certs/fleet"
	"github.com/fulcrum-lb/fulcrum/certs/fleet/etcdtest"
	"github.com/fulcrum-lb/fulcrum/certs/softhsmtest"
	"github.com/fulcrum-lb/fulcrum/configs"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// countingHandler counts log messages by text (how many certificates a node issued).
type countingHandler struct {
	mu   sync.Mutex
	n    map[string]int
	warn []string // warnings and errors, for the test log
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.n[r.Message]++
	if r.Level >= slog.LevelWarn {
		line := r.Message
		r.Attrs(func(a slog.Attr) bool { line += " " + a.String(); return true })
		h.warn = append(h.warn, line)
	}
	h.mu.Unlock()
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }
func (h *countingHandler) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n[msg]
}

const fleetMasterEnv = "TEST_FLEET_MASTER_KEY"

func fleetConfig(t *testing.T, c *etcdtest.Cluster, node string, lifetime string) *configs.Config {
	cfg := &configs.Config{
		Server:      configs.Server{StateDir: t.TempDir()},
		Keystore:    configs.Keystore{Type: "software", MasterKey: "env:" + fleetMasterEnv},
		Authorities: []configs.Authority{{Name: "internal"}},
		Certificates: []configs.Certificate{
			{Name: "www", Domains: []string{"www.fulcrum.test"}, Authority: "internal", Lifetime: lifetime},
		},
		Listeners: []configs.Listener{httpsListener("public", 1, "www")},
		Fleet:     &configs.Fleet{Etcd: c.Endpoints(), Prefix: "/fulcrum-test/" + t.Name(), Node: node, LeaseTTL: "2s"},
	}
	return cfg
}

type fleetTestNode struct {
	m    *Manager
	log  *countingHandler
	addr string
}

// startFleet starts three managers at once (they race for the authority and the first
// certificate) and serves each one's listener.
func startFleet(t *testing.T, c *etcdtest.Cluster, lifetime string) []*fleetTestNode {
	t.Helper()
	key := make([]byte, 32)
	rand.Read(key)
	t.Setenv(fleetMasterEnv, base64.StdEncoding.EncodeToString(key))
	nodes := make([]*fleetTestNode, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i, name := range []string{"a", "b", "c"} {
		cfg := valid(t, fleetConfig(t, c, name, lifetime))
		h := &countingHandler{n: map[string]int{}}
		nodes[i] = &fleetTestNode{log: h}
		wg.Add(1)
		go func() {
			defer wg.Done()
			nodes[i].m, errs[i] = NewManager(context.Background(), cfg, slog.New(h))
		}()
	}
	wg.Wait()
	for i, n := range nodes {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		t.Cleanup(n.m.Close)
		tc, err := n.m.ServerTLS(&n.m.cfg.Load().Listeners[0])
		if err != nil {
			t.Fatal(err)
		}
		n.addr = serve(t, tc)
	}
	return nodes
}

func issued(nodes []*fleetTestNode) int {
	n := 0
	for _, x := range nodes {
		n += x.log.count("issued certificate")
	}
	return n
}

// waitSame waits until every node serves the same certificate, other than not (a serial), and
// returns its serial.
func waitSame(t *testing.T, nodes []*fleetTestNode, not string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s0 := serialOf(nodes[0].m, "www")
		same := s0 != not
		for _, n := range nodes[1:] {
			same = same && serialOf(n.m, "www") == s0
		}
		if same {
			return s0
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodes do not converge on one certificate (other than %s)", not)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestFleet: three nodes on a three-member etcd share one private authority and one
// certificate, renew it once for the fleet, resume each other's TLS sessions, share the
// sticky-cookie key, ride out one etcd member dying and all of etcd stopping, and take over
// a renewal from a node that died holding its lock. Nothing in etcd is a key in the clear.
func TestFleet(t *testing.T) {
	c := etcdtest.Start(t, 3)
	nodes := startFleet(t, c, "15s")
	ctx := context.Background()

	// One authority, one certificate, issued once.
	ca := nodes[0].m.Authority("internal").Cert
	for _, n := range nodes[1:] {
		if !n.m.Authority("internal").Cert.Equal(ca) {
			t.Fatal("nodes have different authorities")
		}
	}
	serial1 := waitSame(t, nodes, "")
	if n := issued(nodes); n != 1 {
		t.Fatalf("the fleet issued %d certificates, want 1", n)
	}

	// A session from node a resumes on b and c.
	cache := tls.NewLRUClientSessionCache(8)
	cc := &tls.Config{RootCAs: nodes[0].m.Authority("internal").Pool(), ServerName: "www.fulcrum.test", ClientSessionCache: cache}
	if _, err := dial(nodes[0].addr, cc); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes[1:] {
		cs, err := dial(n.addr, cc)
		if err != nil {
			t.Fatal(err)
		}
		if !cs.DidResume {
			t.Fatalf("session from node a did not resume on %s", n.m.fleet.f.Node())
		}
	}
	// One sticky-cookie key for the fleet.
	k := nodes[0].m.StickyKey()
	if len(k) != 32 || !bytes.Equal(k, nodes[1].m.StickyKey()) || !bytes.Equal(k, nodes[2].m.StickyKey()) {
		t.Fatal("nodes have different sticky-cookie keys")
	}

	// The scheduled renewal (a third of 15 s left) happens once for the fleet.
	serial2 := waitSame(t, nodes, serial1)
	if n := issued(nodes); n != 2 {
		t.Fatalf("the fleet issued %d certificates for one renewal, want 2 in all", n)
	}

	// One etcd member dies: a renewal still reaches every node.
	c.Members[1].Kill()
	if err := nodes[1].m.Renew("www"); err != nil {
		t.Fatalf("renew with one etcd member down: %v", err)
	}
	serial3 := waitSame(t, nodes, serial2)
	if err := c.Members[1].Restart(); err != nil {
		t.Fatal(err)
	}

	// All of etcd stops: every node keeps serving, handshakes never fail.
	var failed, done atomic.Int64
	stop := make(chan struct{})
	var lwg sync.WaitGroup
	for _, n := range nodes {
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := dial(n.addr, &tls.Config{RootCAs: nodes[0].m.Authority("internal").Pool(), ServerName: "www.fulcrum.test"}); err != nil {
					failed.Add(1)
					t.Logf("handshake with etcd down: %v", err)
				}
				done.Add(1)
			}
		}()
	}
	c.StopAll()
	// A renewal now waits (no lock to be had) rather than failing for good.
	renewed := make(chan error, 1)
	go func() { renewed <- nodes[2].m.Renew("www") }()
	time.Sleep(3 * time.Second) // longer than the lease TTL: sessions are lost
	select {
	case err := <-renewed:
		t.Fatalf("a renewal finished while etcd was down: %v", err)
	default:
	}
	c.StartAll(t)
	select {
	case err := <-renewed:
		if err != nil {
			t.Fatalf("renewal after etcd came back: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("renewal did not resume when etcd came back")
	}
	close(stop)
	lwg.Wait()
	if failed.Load() != 0 || done.Load() == 0 {
		t.Fatalf("%d of %d handshakes failed while etcd was down", failed.Load(), done.Load())
	}
	serial4 := waitSame(t, nodes, serial3)

	// Node a dies holding the renewal lock: node b renews once a's lease is gone.
	if err := nodes[0].m.fleet.st.Lock(ctx, "cert-www"); err != nil {
		t.Fatal(err)
	}
	nodes[0].m.fleet.f.Kill()
	start := time.Now()
	if err := nodes[1].m.Renew("www"); err != nil {
		t.Fatal(err)
	}
	t.Logf("takeover after the lock holder died: %v (lease TTL 2s)", time.Since(start))
	if s := serialOf(nodes[1].m, "www"); s == serial4 {
		t.Fatal("node b did not renew")
	}

	// Nothing under the prefix is a private key in the clear.
	assertNoClearKeys(t, c, nodes)
}

// assertNoClearKeys scans every value under the fleet's prefix for the nodes' private keys
// (raw, hex, base64, PEM) and their session-ticket secrets.
func assertNoClearKeys(t *testing.T, c *etcdtest.Cluster, nodes []*fleetTestNode) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/fulcrum-test/"+t.Name()+"/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) < 5 {
		t.Fatalf("only %d values under the prefix", len(resp.Kvs))
	}
	var secrets [][]byte
	for _, n := range nodes[1:] {
		n.m.tickets.mu.Lock()
		for _, s := range n.m.tickets.secrets {
			secrets = append(secrets, append([]byte(nil), s[:]...))
		}
		n.m.tickets.mu.Unlock()
		secrets = append(secrets, n.m.StickyKey())
		for _, s := range []any{n.m.Authority("internal").signer, entryOf(n.m, "www").cur.Load().PrivateKey} {
			if k, ok := unwrapECDSA(s); ok {
				secrets = append(secrets, mustBytes(k))
			}
		}
	}
	if len(secrets) < 6 {
		t.Fatalf("only %d secrets to look for", len(secrets))
	}
	for _, kv := range resp.Kvs {
		v := kv.Value
		if bytes.Contains(v, []byte("PRIVATE KEY")) {
			t.Errorf("%s holds a PEM private key", kv.Key)
		}
		for _, s := range secrets {
			for _, enc := range [][]byte{s, []byte(hex.EncodeToString(s)), []byte(base64.StdEncoding.EncodeToString(s)), []byte(base64.RawURLEncoding.EncodeToString(s))} {
				if bytes.Contains(v, enc) {
					t.Errorf("%s holds a secret in the clear", kv.Key)
				}
			}
		}
	}
}

// unwrapECDSA finds the in-memory key inside the software keystore's counting signer.
func unwrapECDSA(s any) (*ecdsa.PrivateKey, bool) {
	for range 4 {
		if k, ok := s.(*ecdsa.PrivateKey); ok {
			return k, true
		}
		v := reflect.ValueOf(s)
		if v.Kind() == reflect.Pointer && v.Elem().Kind() == reflect.Struct {
			v = v.Elem() // the keystore's lifecycle gate is a pointer
		}
		if v.Kind() != reflect.Struct {
			return nil, false
		}
		f := v.FieldByName("Signer")
		if !f.IsValid() || !f.CanInterface() {
			return nil, false
		}
		s = f.Interface()
	}
	return nil, false
}

// TestFleetACME: three nodes and Pebble: the fleet orders once (node a, which answers no
// challenge itself: Pebble asks node b, which answers from the fleet's shared challenges), all
// three serve that certificate, and the renewal happens once for the fleet.
func TestFleetACME(t *testing.T) {
	c := etcdtest.Start(t, 3)
	httpLn, httpPort := listenPort(t)
	_, tlsPort := listenPort(t)
	p := startPebble(t, httpPort, tlsPort, 15) // 15 s certificates: renewed with 5 s left
	start := time.Now()
	key := make([]byte, 32)
	rand.Read(key)
	t.Setenv(fleetMasterEnv, base64.StdEncoding.EncodeToString(key))
	var nodes []*fleetTestNode
	for _, name := range []string{"a", "b", "c"} {
		cfg := acmeConfig(t.TempDir(), p, false, "www.fulcrum.test")
		cfg.Keystore = configs.Keystore{Type: "software", MasterKey: "env:" + fleetMasterEnv}
		cfg.Fleet = &configs.Fleet{Etcd: c.Endpoints(), Prefix: "/fulcrum-test/" + t.Name(), Node: name, LeaseTTL: "2s"}
		h := &countingHandler{n: map[string]int{}}
		m, err := NewManager(context.Background(), valid(t, cfg), slog.New(h))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(m.Close)
		t.Cleanup(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			for _, w := range h.warn {
				t.Logf("node %s: %s", name, w)
			}
		})
		nodes = append(nodes, &fleetTestNode{m: m, log: h})
	}
	if _, ok := entryOf(nodes[0].m, "site").acme.client.ChallengeSolvers["tls-alpn-01"]; ok {
		t.Fatal("a fleet offers TLS-ALPN-01, which only the ordering node could answer")
	}
	var hits atomic.Int64
	challengeServer(t, httpLn, nodes[1].m, &hits)
	nodes[0].m.StartACME()
	waitCert(t, nodes[0].m, "site")
	for _, n := range nodes[1:] {
		n.m.StartACME()
		waitCert(t, n.m, "site")
	}
	if hits.Load() == 0 {
		t.Fatal("node b answered no challenge for node a's order")
	}
	s1 := serialOf(nodes[0].m, "site")
	for _, n := range nodes[1:] {
		if serialOf(n.m, "site") != s1 {
			t.Fatal("nodes serve different ACME certificates")
		}
	}
	if n := issued(nodes); n != 1 {
		t.Fatalf("the fleet ordered %d certificates, want 1", n)
	}
	leaf := entryOf(nodes[0].m, "site").cur.Load().Leaf
	t.Logf("ordered after %v; not before %v, renew at %v", time.Since(start), leaf.NotBefore, renewAt(leaf))
	deadline := time.Now().Add(40 * time.Second)
	for {
		same := true
		for _, n := range nodes {
			same = same && serialOf(n.m, "site") != s1 && serialOf(n.m, "site") == serialOf(nodes[0].m, "site")
		}
		if same {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the fleet did not renew the ACME certificate")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := issued(nodes); n != 2 {
		t.Fatalf("the fleet ordered %d certificates for one renewal, want 2 in all", n)
	}
	t.Logf("renewed after %v", time.Since(start))
}

// TestFleetHSM: with a PKCS#11 keystore the fleet shares the token (one SoftHSM2 token that
// every node reaches, as a network HSM): the authority and leaf keys are generated in it
// once, non-extractable; etcd holds the certificates and the keys' names, no key blobs.
func TestFleetHSM(t *testing.T) {
	needHSM(t)
	c := etcdtest.Start(t, 1)
	key := make([]byte, 32)
	rand.Read(key)
	t.Setenv(fleetMasterEnv, base64.StdEncoding.EncodeToString(key))
	var ms []*Manager
	for _, name := range []string{"a", "b"} {
		cfg := fleetConfig(t, c, name, "1h")
		cfg.Keystore = softhsmtest.Keystore()
		cfg.Fleet.MasterKey = "env:" + fleetMasterEnv
		m, err := NewManager(context.Background(), valid(t, cfg), quiet)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(m.Close)
		ms = append(ms, m)
	}
	if serialOf(ms[0], "www") != serialOf(ms[1], "www") || !ms[0].Authority("internal").Cert.Equal(ms[1].Authority("internal").Cert) {
		t.Fatal("the nodes do not share the certificate and authority")
	}
	e := entryOf(ms[1], "www")
	e.meta.Lock()
	keyName := e.keyName
	e.meta.Unlock()
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, keyName)
	softhsmtest.AssertSensitive(t, softhsmtest.Module, softhsmtest.Label, softhsmtest.Pin, ms[0].Authority("internal").keyName)

	// A reload cannot move a node to another fleet.
	moved := *ms[0].cfg.Load()
	fl := *moved.Fleet
	fl.Prefix = "/elsewhere/"
	moved.Fleet = &fl
	if _, err := ms[0].Prepare(&moved); err == nil || !strings.Contains(err.Error(), "[fleet] needs a restart") {
		t.Fatalf("reload changing [fleet]: %v", err)
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/fulcrum-test/"+t.Name()+"/data/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
		if bytes.Contains(kv.Key, []byte("/data/keys/")) {
			t.Errorf("a key blob in etcd with an HSM keystore: %s", kv.Key)
		}
	}
	if len(keys) != 2 { // the authority's certificate and the certificate record
		t.Fatalf("etcd holds %v", keys)
	}
}

// TestFleetEtcdTLS: etcd serving clients over TLS with client-certificate authentication; a
// node with ca_file, cert_file and key_file joins, a client without a certificate gets nothing.
func TestFleetEtcdTLS(t *testing.T) {
	etcdtest.Need(t)
	dir := t.TempDir()
	ca := configtest.NewCA(t, "etcd test CA")
	caFile := ca.WriteCA(t, dir, "ca.pem")
	srvCert, srvKey := configtest.WritePair(t, dir, "etcd", ca.Issue(t, []string{"etcd", "127.0.0.1"}, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth))
	cliCert, cliKey := configtest.WritePair(t, dir, "node-a", ca.Issue(t, []string{"node-a"}, x509.ExtKeyUsageClientAuth))
	c := etcdtest.StartTLS(t, 1, &etcdtest.TLSFiles{CA: caFile, Cert: srvCert, Key: srvKey})

	key := make([]byte, 32)
	rand.Read(key)
	t.Setenv(fleetMasterEnv, base64.StdEncoding.EncodeToString(key))
	cfg := fleetConfig(t, c, "a", "1h")
	cfg.Fleet.CAFile, cfg.Fleet.CertFile, cfg.Fleet.KeyFile = caFile, cliCert, cliKey
	m, err := NewManager(context.Background(), valid(t, cfg), quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if st := m.FleetStatus(context.Background()); st.Error != "" {
		t.Fatalf("status over TLS: %s", st.Error)
	}
	if _, err := m.readState(context.Background(), certKey("www")); err != nil {
		t.Fatalf("the certificate record is not in etcd: %v", err)
	}

	// Without a client certificate etcd answers nothing.
	f, err := fleet.Open(context.Background(), fleet.Options{Endpoints: c.Endpoints(), TLS: &tls.Config{RootCAs: ca.Pool()}, Prefix: cfg.Fleet.Prefix,
		Node: "intruder", LeaseTTL: 2 * time.Second, OpTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Storage().Load(context.Background(), certKey("www")); err == nil {
		t.Fatal("etcd answered a client without a certificate")
	}
}
