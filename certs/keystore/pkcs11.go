package keystore

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"
)

// pkcs11Config selects a token. The token is always chosen by label, never by slot number,
// because slot numbers move when tokens are added or removed.
type pkcs11Config struct {
	Module          string
	TokenLabel      string
	Pin             string
	MaxSessions     int           // session pool size, login session included (validated: 2-1024)
	PoolWaitTimeout time.Duration // how long a signature waits for a free session (0: poolWaitTimeout)
}

// poolWaitTimeout is how long a signature waits for a free session before it fails (not a
// configuration key).
const poolWaitTimeout = 2 * time.Second

// p11 is the PKCS#11 keystore. The crypto11 context lives in an atomic pointer so the signing
// path takes no lock; when the token reports that sessions or the device are gone, a single
// owner goroutine closes the context and configures a new one (for SoftHSM a restored token is
// only seen after C_Finalize + C_Initialize, which Close/Configure do when the last reference
// to the module goes away). Signers handed out are wrappers that look their key up again by
// label and id after each rebuild.
type p11 struct {
	cfg   pkcs11Config
	log   *slog.Logger
	stats Stats

	state atomic.Pointer[p11State] // nil while disconnected
	gen   atomic.Uint64

	kick   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex // control plane: generate/delete/close
	closed  bool
	signers map[string]*hsmSigner
}

type p11State struct {
	ctx *crypto11.Context
	gen uint64
}

// openPKCS11 logs into the token and starts the reconnect owner goroutine.
func openPKCS11(ctx context.Context, cfg pkcs11Config, log *slog.Logger) (Keystore, error) {
	if cfg.MaxSessions < 2 {
		// configs refuses fewer: crypto11 keeps one session for the login.
		return nil, fmt.Errorf("keystore: pkcs11 max_sessions %d: at least 2 (one is the login's)", cfg.MaxSessions)
	}
	if cfg.PoolWaitTimeout == 0 {
		cfg.PoolWaitTimeout = poolWaitTimeout
	}
	if log == nil {
		log = slog.Default()
	}
	k := &p11{cfg: cfg, log: log, kick: make(chan struct{}, 1), done: make(chan struct{}), signers: map[string]*hsmSigner{}}
	c, err := k.configure()
	if err != nil {
		return nil, err
	}
	k.state.Store(&p11State{ctx: c, gen: k.gen.Add(1)})
	rctx, cancel := context.WithCancel(context.Background())
	k.cancel = cancel
	go k.reconnectLoop(rctx)
	return k, nil
}

// configureMu serializes the token-label check with crypto11.Configure: the check may
// initialize the module itself, and must finalize it before crypto11 initializes it.
var configureMu sync.Mutex

func (k *p11) configure() (*crypto11.Context, error) {
	configureMu.Lock()
	defer configureMu.Unlock()
	if n := countTokens(k.cfg.Module, k.cfg.TokenLabel); n > 1 {
		// crypto11 would take the first one, which may not be the token holding the keys.
		return nil, fmt.Errorf("keystore: pkcs11 token label %q matches %d tokens in %s: give each token a distinct label (softhsm2-util --show-slots lists them)", k.cfg.TokenLabel, n, k.cfg.Module)
	}
	c, err := crypto11.Configure(&crypto11.Config{
		Path:            k.cfg.Module,
		TokenLabel:      k.cfg.TokenLabel,
		Pin:             k.cfg.Pin,
		MaxSessions:     k.cfg.MaxSessions,
		PoolWaitTimeout: k.cfg.PoolWaitTimeout,
	})
	if err != nil {
		return nil, fmt.Errorf("keystore: pkcs11 token %q in %s: %w", k.cfg.TokenLabel, k.cfg.Module, err)
	}
	return c, nil
}

// countTokens counts the initialized tokens labelled label; 0 when the module cannot be asked
// (crypto11.Configure then reports why). When crypto11 already holds the module initialized in
// this process it is enumerated as is, and never finalized here.
func countTokens(module, label string) int {
	m := pkcs11.New(module)
	if m == nil {
		return 0
	}
	defer m.Destroy()
	err := m.Initialize()
	var ce pkcs11.Error
	if errors.As(err, &ce) && ce == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
		err = nil
	} else if err == nil {
		defer m.Finalize()
	}
	if err != nil {
		return 0
	}
	slots, err := m.GetSlotList(true)
	if err != nil {
		return 0
	}
	n := 0
	for _, sl := range slots {
		if ti, err := m.GetTokenInfo(sl); err == nil && strings.TrimRight(ti.Label, " \x00") == label {
			n++
		}
	}
	return n
}

func (k *p11) Describe() string { return "pkcs11 token " + k.cfg.TokenLabel }
func (k *p11) Stats() *Stats    { return &k.stats }

// Close stops the reconnect goroutine and closes the context (waiting for in-flight signatures).
func (k *p11) Close() error {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return nil
	}
	k.closed = true
	k.mu.Unlock()
	k.cancel()
	<-k.done
	if st := k.state.Swap(nil); st != nil {
		return st.ctx.Close()
	}
	return nil
}

// Healthy reports whether the token is connected right now.
func (k *p11) Healthy() bool { return k.state.Load() != nil }

// reconnectLoop is the only place that closes and reconfigures the context.
func (k *p11) reconnectLoop(ctx context.Context) {
	defer close(k.done)
	for {
		select {
		case <-ctx.Done():
			return
		case <-k.kick:
		}
		k.rebuild(ctx)
	}
}

func (k *p11) rebuild(ctx context.Context) {
	old := k.state.Swap(nil)
	if old != nil {
		// Close waits for sessions in use to come back to the pool, then (last reference)
		// finalizes the module so the next Configure re-reads the token list.
		_ = old.ctx.Close()
	}
	k.log.Warn("pkcs11: reconnecting to token", "token", k.cfg.TokenLabel)
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		c, err := k.configure()
		if err == nil {
			if err = k.probe(c); err == nil {
				k.state.Store(&p11State{ctx: c, gen: k.gen.Add(1)})
				k.stats.Rebuilds.Add(1)
				k.log.Info("pkcs11: token reconnected", "token", k.cfg.TokenLabel, "attempts", attempt)
				// Drain a kick raised by signatures that failed on the old context.
				select {
				case <-k.kick:
				default:
				}
				return
			}
			_ = c.Close()
		}
		if attempt == 1 || attempt%20 == 0 {
			k.log.Warn("pkcs11: token still unavailable", "token", k.cfg.TokenLabel, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 500*time.Millisecond)
	}
}

// probe checks that the keys in use can be looked up on the new context (the token answers
// object searches), so a token that is present but not usable does not count as recovered.
func (k *p11) probe(c *crypto11.Context) error {
	k.mu.Lock()
	names := make([]string, 0, len(k.signers))
	for n := range k.signers {
		names = append(names, n)
	}
	k.mu.Unlock()
	for _, n := range names {
		// A key deleted behind our back must not block recovery of all the others.
		if _, err := findKey(c, n); err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	return nil
}

// requestRebuild asks the owner goroutine to reconnect (coalesced).
func (k *p11) requestRebuild() {
	select {
	case k.kick <- struct{}{}:
	default:
	}
}

// fatal reports whether err means the sessions or the device are gone, so the context must be
// rebuilt. SoftHSM reports a vanished token directory with several codes, hence the list.
func fatal(err error) bool {
	var pe pkcs11.Error
	if !errors.As(err, &pe) {
		return false
	}
	switch pe {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_GENERAL_ERROR:
		return true
	}
	return false
}

func keyID(name string) []byte {
	h := sha256.Sum256([]byte("fulcrum-key/" + name))
	return h[:16]
}

func findKey(c *crypto11.Context, name string) (crypto11.Signer, error) {
	s, err := c.FindKeyPairs(keyID(name), []byte(name))
	if err != nil {
		return nil, err
	}
	if len(s) == 0 {
		return nil, ErrNotFound
	}
	return s[0], nil
}

func (k *p11) current() (*p11State, error) {
	st := k.state.Load()
	if st == nil {
		return nil, ErrUnavailable
	}
	return st, nil
}

func (k *p11) Generate(ctx context.Context, name string, kt KeyType) (crypto.Signer, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	st, err := k.current()
	if err != nil {
		return nil, err
	}
	// Replace a key left by an attempt that crashed before its certificate was stored.
	if err := k.deleteOn(st.ctx, name); err != nil {
		return nil, err
	}
	pub, err := crypto11.NewAttributeSetWithIDAndLabel(keyID(name), []byte(name))
	if err != nil {
		return nil, err
	}
	priv := pub.Copy()
	// Explicit, even though crypto11 defaults to the same: the key must never leave the token.
	if err := priv.Set(crypto11.CkaSensitive, true); err != nil {
		return nil, err
	}
	if err := priv.Set(crypto11.CkaExtractable, false); err != nil {
		return nil, err
	}
	var s crypto11.Signer
	switch kt {
	case ECDSAP256:
		s, err = st.ctx.GenerateECDSAKeyPairWithAttributes(pub, priv, elliptic.P256())
	case ECDSAP384:
		s, err = st.ctx.GenerateECDSAKeyPairWithAttributes(pub, priv, elliptic.P384())
	case RSA2048, RSA3072, RSA4096:
		bits := map[KeyType]int{RSA2048: 2048, RSA3072: 3072, RSA4096: 4096}[kt]
		s, err = st.ctx.GenerateRSAKeyPairWithAttributes(pub, priv, bits)
	default:
		return nil, fmt.Errorf("keystore: unknown key type %q", kt)
	}
	if err != nil {
		if fatal(err) {
			k.requestRebuild()
		}
		return nil, fmt.Errorf("keystore: generate %s in token %q: %w", name, k.cfg.TokenLabel, err)
	}
	return k.wrap(name, s, st.gen), nil
}

func (k *p11) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	k.mu.Lock()
	hs, ok := k.signers[name]
	k.mu.Unlock()
	if ok {
		return hs, nil
	}
	st, err := k.current()
	if err != nil {
		return nil, err
	}
	s, err := findKey(st.ctx, name)
	if err != nil {
		if fatal(err) {
			k.requestRebuild()
		}
		return nil, fmt.Errorf("keystore: find %s in token %q: %w", name, k.cfg.TokenLabel, err)
	}
	return k.wrap(name, s, st.gen), nil
}

func (k *p11) Delete(ctx context.Context, name string) error {
	if err := validName(name); err != nil {
		return err
	}
	st, err := k.current()
	if err != nil {
		return err
	}
	k.mu.Lock()
	delete(k.signers, name)
	k.mu.Unlock()
	return k.deleteOn(st.ctx, name)
}

func (k *p11) deleteOn(c *crypto11.Context, name string) error {
	found, err := c.FindKeyPairs(keyID(name), []byte(name))
	if err != nil {
		return fmt.Errorf("keystore: find %s: %w", name, err)
	}
	for _, s := range found {
		if d, ok := s.(interface{ Delete() error }); ok {
			if err := d.Delete(); err != nil {
				return fmt.Errorf("keystore: delete %s: %w", name, err)
			}
		}
	}
	return nil
}

func (k *p11) wrap(name string, s crypto11.Signer, gen uint64) *hsmSigner {
	hs := &hsmSigner{k: k, name: name, pub: s.Public()}
	hs.res.Store(&resolved{gen: gen, s: s})
	k.mu.Lock()
	k.signers[name] = hs
	k.mu.Unlock()
	return hs
}

// hsmSigner is the crypto.Signer handed to TLS and the authorities. It survives context
// rebuilds: the crypto11 handle is looked up again by label when the generation changed.
type hsmSigner struct {
	k    *p11
	name string
	pub  crypto.PublicKey
	res  atomic.Pointer[resolved]
}

type resolved struct {
	gen uint64
	s   crypto11.Signer
}

func (h *hsmSigner) Public() crypto.PublicKey { return h.pub }

func (h *hsmSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	st := h.k.state.Load()
	if st == nil {
		h.k.stats.SignErrors.Add(1)
		return nil, fmt.Errorf("sign with %s: %w", h.name, ErrUnavailable)
	}
	res := h.res.Load()
	if res.gen != st.gen {
		s, err := findKey(st.ctx, h.name)
		if err != nil {
			h.k.stats.SignErrors.Add(1)
			if fatal(err) {
				h.k.requestRebuild()
			}
			return nil, fmt.Errorf("sign with %s: find key after reconnect: %w", h.name, err)
		}
		res = &resolved{gen: st.gen, s: s}
		h.res.Store(res)
	}
	t := time.Now()
	sig, err := res.s.Sign(r, digest, opts)
	if err != nil {
		h.k.stats.SignErrors.Add(1)
		if fatal(err) {
			h.k.requestRebuild()
		}
		return nil, fmt.Errorf("sign with %s in token %q: %w", h.name, h.k.cfg.TokenLabel, err)
	}
	h.k.stats.Signs.Add(1)
	h.k.stats.SignNanos.Add(uint64(time.Since(t)))
	return sig, nil
}
