package keystore

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Deletion waiting periods, in days, as AWS KMS has them.
const (
	MinDeletionDays     = 7
	MaxDeletionDays     = 30
	DefaultDeletionDays = 30
)

// ErrPendingDeletion is returned by signers and by Generate/Import for a key scheduled for
// deletion: it may neither sign nor back a new certificate until the deletion is cancelled.
var ErrPendingDeletion = errors.New("key is pending deletion")

// Event is one key-management event for the audit log.
type Event struct {
	Time   time.Time
	Actor  string // who asked: the admin caller, or "fulcrum" for the process itself
	Role   string
	Action string // generate, import, schedule-deletion, cancel-deletion, destroy, ...
	Object string // the key name
	Result string // ok | error
	Error  string
	Count  uint64 // action "sign": signatures in the summarised minute
	Errors uint64 // action "sign": failed signatures in it
}

type actorKey struct{}

type actor struct{ name, role string }

// WithActor marks ctx with the admin caller on whose behalf the keystore acts (for the audit log).
func WithActor(ctx context.Context, name, role string) context.Context {
	return context.WithValue(ctx, actorKey{}, actor{name, role})
}

func actorOf(ctx context.Context) actor {
	if a, ok := ctx.Value(actorKey{}).(actor); ok {
		return a
	}
	return actor{"fulcrum", "system"}
}

// KeyInfo describes one key for `fulcrum keys list`.
type KeyInfo struct {
	Name         string    `json:"name"`
	State        string    `json:"state"` // enabled | pending_deletion
	DeletionDate time.Time `json:"deletion_date,omitzero"`
	Origin       string    `json:"origin,omitempty"` // generated | imported | wrapped-import
	Type         string    `json:"type,omitempty"`
	UsedBy       string    `json:"used_by,omitempty"` // filled by the caller that knows the certificates
	Signs        uint64    `json:"signs"`
	SignErrors   uint64    `json:"sign_errors"`
}

// keyRecord is a key's lifecycle, persisted in lifecycle.json.
type keyRecord struct {
	State        string    `json:"state"`
	DeletionDate time.Time `json:"deletion_date,omitzero"`
	Origin       string    `json:"origin,omitempty"`
	Type         string    `json:"type,omitempty"`
}

type lifecycleFile struct {
	Keys    map[string]*keyRecord    `json:"keys"`
	Imports map[string]*importRecord `json:"imports,omitempty"`
}

// keyGate is the per-key state the signing path reads: one atomic load and two counters, no lock.
type keyGate struct {
	pending atomic.Bool
	signs   atomic.Uint64
	errs    atomic.Uint64
	// last values reported in the audit log's per-minute summary (summary goroutine only)
	lastSigns, lastErrs uint64
}

// backend is what the PKCS#11 and software keystores offer beyond Keystore.
type backend interface {
	Keystore
	// names lists the keys the backend holds (wrapping keys excluded).
	names(ctx context.Context) ([]string, error)
	// newWrappingKey creates the RSA wrapping key pair of an import and returns its public half.
	newWrappingKey(ctx context.Context, label string) (crypto.PublicKey, error)
	// unwrapImport unwraps blob (RSA-OAEP key || AES key wrap with padding of PKCS#8) with the
	// wrapping key label into a key named name of type kt.
	unwrapImport(ctx context.Context, label, name string, kt KeyType, blob []byte) (crypto.Signer, error)
	// deleteWrappingKey destroys an import's wrapping key pair.
	deleteWrappingKey(ctx context.Context, label string) error
}

// Managed is the keystore Open returns: a backend plus the key administration operators expect
// from a KMS — a lifecycle per key (scheduled deletion with a waiting period), wrapped import
// with expiring import tokens, per-key signing counts and an audit trail of every key event.
type Managed struct {
	b    backend
	path string // lifecycle.json

	now   atomic.Pointer[func() time.Time]
	audit atomic.Pointer[func(Event)]

	// pre-sink events: startup events (authority keys generated) come before the audit log is
	// attached; they are kept (bounded) and written when it is.
	early []Event

	mu    sync.Mutex // control plane: lifecycle changes, gates map, early events
	state lifecycleFile
	gates map[string]*keyGate

	cancel context.CancelFunc
	done   chan struct{}
}

func newManaged(b backend, stateDir string, now func() time.Time) (*Managed, error) {
	m := &Managed{b: b, gates: map[string]*keyGate{}}
	if stateDir != "" {
		m.path = filepath.Join(stateDir, "key-lifecycle.json")
	}
	if now == nil {
		now = time.Now
	}
	m.now.Store(&now)
	m.state = lifecycleFile{Keys: map[string]*keyRecord{}, Imports: map[string]*importRecord{}}
	raw, err := os.ReadFile(m.path)
	switch {
	case m.path == "" || errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("keystore: read %s: %w", m.path, err)
	default:
		if err := json.Unmarshal(raw, &m.state); err != nil {
			return nil, fmt.Errorf("keystore: %s: %w", m.path, err)
		}
		if m.state.Keys == nil {
			m.state.Keys = map[string]*keyRecord{}
		}
		if m.state.Imports == nil {
			m.state.Imports = map[string]*importRecord{}
		}
	}
	for name, r := range m.state.Keys {
		g := m.gateLocked(name)
		g.pending.Store(r.State == statePending)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel, m.done = cancel, make(chan struct{})
	// Keys whose waiting period ended while the process was down go now.
	m.Sweep(ctx)
	go m.loop(ctx)
	return m, nil
}

const (
	stateEnabled = "enabled"
	statePending = "pending_deletion"
)

// SetClock replaces the clock deletions and import tokens are judged by (tests).
func (m *Managed) SetClock(now func() time.Time) { m.now.Store(&now) }

func (m *Managed) clock() time.Time { return (*m.now.Load())() }

// SetAudit attaches the audit sink and writes the events that happened before it.
func (m *Managed) SetAudit(f func(Event)) {
	m.mu.Lock()
	early := m.early
	m.early = nil
	m.audit.Store(&f)
	m.mu.Unlock()
	for _, e := range early {
		f(e)
	}
}

func (m *Managed) emit(e Event) {
	if e.Time.IsZero() {
		e.Time = m.clock()
	}
	if f := m.audit.Load(); f != nil {
		(*f)(e)
		return
	}
	m.mu.Lock()
	f := m.audit.Load()
	if f == nil {
		if len(m.early) < 1000 {
			m.early = append(m.early, e)
		}
		m.mu.Unlock()
		return
	}
	m.mu.Unlock()
	(*f)(e)
}

func (m *Managed) event(ctx context.Context, action, object string, err error) {
	a := actorOf(ctx)
	e := Event{Actor: a.name, Role: a.role, Action: action, Object: object, Result: "ok"}
	if err != nil {
		e.Result, e.Error = "error", err.Error()
	}
	m.emit(e)
}

// loop destroys keys whose waiting period ended and writes the per-minute signing summary.
func (m *Managed) loop(ctx context.Context) {
	defer close(m.done)
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.Sweep(ctx)
			m.SignSummary()
		}
	}
}

func (m *Managed) gateLocked(name string) *keyGate {
	g := m.gates[name]
	if g == nil {
		g = &keyGate{}
		m.gates[name] = g
	}
	return g
}

func (m *Managed) gate(name string) *keyGate {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gateLocked(name)
}

// save writes lifecycle.json (m.mu held).
func (m *Managed) saveLocked() error {
	if m.path == "" { // no state directory (tests of the keystore alone): kept in memory
		return nil
	}
	b, err := json.MarshalIndent(&m.state, "", "  ")
	if err != nil {
		return err
	}
	if err := WriteFileAtomic(m.path, b, 0o600); err != nil {
		return fmt.Errorf("keystore: write %s: %w", m.path, err)
	}
	return nil
}

func (m *Managed) pendingErr(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if r := m.state.Keys[name]; r != nil && r.State == statePending {
		return fmt.Errorf("keystore: %s: %w (deletion on %s; cancel it with fulcrum keys cancel-deletion %s)",
			name, ErrPendingDeletion, r.DeletionDate.UTC().Format(time.RFC3339), name)
	}
	return nil
}

func (m *Managed) record(name, origin string, kt KeyType) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state.Keys[name] = &keyRecord{State: stateEnabled, Origin: origin, Type: string(kt)}
	m.gateLocked(name).pending.Store(false)
	return m.saveLocked()
}

// ---- Keystore

func (m *Managed) Generate(ctx context.Context, name string, kt KeyType) (crypto.Signer, error) {
	if err := m.pendingErr(name); err != nil {
		m.event(ctx, "generate", name, err)
		return nil, err
	}
	s, err := m.b.Generate(ctx, name, kt)
	if err == nil {
		err = m.record(name, "generated", kt)
	}
	m.event(ctx, "generate", name, err)
	if err != nil {
		return nil, err
	}
	return m.gated(name, s), nil
}

func (m *Managed) Import(ctx context.Context, name string, key crypto.Signer) (crypto.Signer, error) {
	if err := m.pendingErr(name); err != nil {
		m.event(ctx, "import", name, err)
		return nil, err
	}
	s, err := m.b.Import(ctx, name, key)
	if err == nil {
		err = m.record(name, "imported", typeOf(key.Public()))
	}
	m.event(ctx, "import", name, err)
	if err != nil {
		return nil, err
	}
	return m.gated(name, s), nil
}

// Signer finds a key again. A key pending deletion is refused: it must not back a new
// certificate (the signers already handed out refuse to sign as well).
func (m *Managed) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	if err := m.pendingErr(name); err != nil {
		return nil, err
	}
	s, err := m.b.Signer(ctx, name)
	if err != nil {
		return nil, err
	}
	return m.gated(name, s), nil
}

func (m *Managed) Delete(ctx context.Context, name string) error {
	err := m.b.Delete(ctx, name)
	if err == nil {
		m.mu.Lock()
		if _, ok := m.state.Keys[name]; ok {
			delete(m.state.Keys, name)
			err = m.saveLocked()
		}
		m.mu.Unlock()
	}
	m.event(ctx, "delete", name, err)
	return err
}

func (m *Managed) Describe() string { return m.b.Describe() }
func (m *Managed) Stats() *Stats    { return m.b.Stats() }

// Backend is the keystore Managed wraps (tests and metrics type-assert it).
func (m *Managed) Backend() Keystore { return m.b }

func (m *Managed) Close() error {
	m.cancel()
	<-m.done
	m.SignSummary()
	return m.b.Close()
}

func (m *Managed) gated(name string, s crypto.Signer) crypto.Signer {
	return &gatedSigner{Signer: s, name: name, g: m.gate(name)}
}

// gatedSigner refuses to sign while its key is pending deletion and counts per key.
type gatedSigner struct {
	crypto.Signer
	name string
	g    *keyGate
}

func (s *gatedSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if s.g.pending.Load() {
		s.g.errs.Add(1)
		return nil, fmt.Errorf("sign with %s: %w", s.name, ErrPendingDeletion)
	}
	sig, err := s.Signer.Sign(r, digest, opts)
	if err != nil {
		s.g.errs.Add(1)
		return nil, err
	}
	s.g.signs.Add(1)
	return sig, nil
}

// ---- administration

// List describes every key the backend holds, with its lifecycle.
func (m *Managed) List(ctx context.Context) ([]KeyInfo, error) {
	names, err := m.b.names(ctx)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]KeyInfo, 0, len(names))
	for _, n := range names {
		ki := KeyInfo{Name: n, State: stateEnabled}
		if r := m.state.Keys[n]; r != nil {
			ki.State, ki.DeletionDate, ki.Origin, ki.Type = r.State, r.DeletionDate, r.Origin, r.Type
		}
		if g := m.gates[n]; g != nil {
			ki.Signs, ki.SignErrors = g.signs.Load(), g.errs.Load()
		}
		out = append(out, ki)
	}
	slices.SortFunc(out, func(a, b KeyInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// InUseError is returned when a key that a served certificate (or an authority) still uses is
// scheduled for deletion.
type InUseError struct{ Key, User string }

func (e *InUseError) Error() string {
	return fmt.Sprintf("key %s is used by %s: replace or remove it first", e.Key, e.User)
}

// ScheduleDeletion disables the key at once and destroys it after days (7 to 30). usedBy says
// which served certificate or authority uses a key ("" when none); such keys are refused.
func (m *Managed) ScheduleDeletion(ctx context.Context, name string, days int, usedBy func(string) string) (time.Time, error) {
	when, err := m.schedule(ctx, name, days, usedBy)
	m.event(ctx, "schedule-deletion", name, err)
	return when, err
}

func (m *Managed) schedule(ctx context.Context, name string, days int, usedBy func(string) string) (time.Time, error) {
	if days < MinDeletionDays || days > MaxDeletionDays {
		return time.Time{}, fmt.Errorf("waiting period of %d days: must be %d to %d days", days, MinDeletionDays, MaxDeletionDays)
	}
	if err := m.exists(ctx, name); err != nil {
		return time.Time{}, err
	}
	if usedBy != nil {
		if u := usedBy(name); u != "" {
			return time.Time{}, &InUseError{Key: name, User: u}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.state.Keys[name]
	if r != nil && r.State == statePending {
		return time.Time{}, fmt.Errorf("key %s is already pending deletion (on %s)", name, r.DeletionDate.UTC().Format(time.RFC3339))
	}
	prev := r
	if r == nil {
		r = &keyRecord{}
	} else {
		cp := *r
		r = &cp
	}
	r.State, r.DeletionDate = statePending, m.clock().Add(time.Duration(days)*24*time.Hour).UTC()
	m.state.Keys[name] = r
	if err := m.saveLocked(); err != nil {
		if prev == nil {
			delete(m.state.Keys, name)
		} else {
			m.state.Keys[name] = prev
		}
		return time.Time{}, err
	}
	m.gateLocked(name).pending.Store(true)
	return r.DeletionDate, nil
}

func (m *Managed) exists(ctx context.Context, name string) error {
	if err := validName(name); err != nil {
		return err
	}
	names, err := m.b.names(ctx)
	if err != nil {
		return err
	}
	if !slices.Contains(names, name) {
		return fmt.Errorf("keystore: %s: %w", name, ErrNotFound)
	}
	return nil
}

// CancelDeletion puts a key pending deletion back in service.
func (m *Managed) CancelDeletion(ctx context.Context, name string) error {
	err := m.cancelDeletion(name)
	m.event(ctx, "cancel-deletion", name, err)
	return err
}

func (m *Managed) cancelDeletion(name string) error {
	if err := validName(name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.state.Keys[name]
	if r == nil || r.State != statePending {
		return fmt.Errorf("key %s is not pending deletion", name)
	}
	r.State, r.DeletionDate = stateEnabled, time.Time{}
	if err := m.saveLocked(); err != nil {
		r.State = statePending
		return err
	}
	m.gateLocked(name).pending.Store(false)
	return nil
}

// Sweep destroys every key whose waiting period has ended (C_DestroyObject in the HSM, the
// sealed file in the software keystore) and every expired import's wrapping key.
func (m *Managed) Sweep(ctx context.Context) {
	now := m.clock()
	m.mu.Lock()
	var due []string
	for n, r := range m.state.Keys {
		if r.State == statePending && !now.Before(r.DeletionDate) {
			due = append(due, n)
		}
	}
	var expired []string
	for n, ir := range m.state.Imports {
		if now.After(ir.Expires) {
			expired = append(expired, n)
		}
	}
	m.mu.Unlock()
	slices.Sort(due)
	for _, n := range due {
		err := m.b.Delete(ctx, n)
		if err == nil {
			m.mu.Lock()
			delete(m.state.Keys, n)
			err = m.saveLocked()
			m.mu.Unlock()
		}
		m.event(context.Background(), "destroy", n, err)
	}
	for _, n := range expired {
		m.mu.Lock()
		ir := m.state.Imports[n]
		if ir == nil || !now.After(ir.Expires) {
			m.mu.Unlock()
			continue
		}
		delete(m.state.Imports, n)
		err := m.saveLocked()
		m.mu.Unlock()
		if err == nil {
			err = m.b.deleteWrappingKey(ctx, ir.WrapLabel)
		}
		m.event(context.Background(), "expire-import-token", n, err)
	}
}

// SignSummary writes one audit event per key that signed (or failed to) since the last summary.
func (m *Managed) SignSummary() {
	m.mu.Lock()
	type row struct {
		name          string
		signs, errors uint64
	}
	var rows []row
	for n, g := range m.gates {
		s, e := g.signs.Load(), g.errs.Load()
		if s != g.lastSigns || e != g.lastErrs {
			rows = append(rows, row{n, s - g.lastSigns, e - g.lastErrs})
			g.lastSigns, g.lastErrs = s, e
		}
	}
	m.mu.Unlock()
	slices.SortFunc(rows, func(a, b row) int { return strings.Compare(a.name, b.name) })
	for _, r := range rows {
		m.emit(Event{Actor: "fulcrum", Role: "system", Action: "sign", Object: r.name, Result: "ok", Count: r.signs, Errors: r.errors})
	}
}
