package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/keystore"
)

// auditLog is the append-only JSON-lines record of admin writes, denials and key events. Each
// line is written with one write(2) on an O_APPEND file, so lines never interleave, and synced:
// an audit line that a crash can lose is not an audit line.
type auditLog struct {
	mu sync.Mutex
	f  *os.File
}

func openAudit(path string) (*auditLog, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	return &auditLog{f: f}, nil
}

// auditLine is one line of the audit log.
type auditLine struct {
	Time     time.Time `json:"time"`
	Identity string    `json:"identity"`
	Role     string    `json:"role"`
	Action   string    `json:"action"`
	Object   string    `json:"object"`
	Result   string    `json:"result"` // ok | error | denied
	Error    string    `json:"error,omitempty"`
	Remote   string    `json:"remote,omitempty"`
	Count    uint64    `json:"count,omitempty"`  // sign summaries: signatures in the minute
	Errors   uint64    `json:"errors,omitempty"` // sign summaries: failed signatures
}

func (a *auditLog) write(l auditLine) {
	if a == nil {
		return
	}
	if l.Time.IsZero() {
		l.Time = time.Now()
	}
	l.Time = l.Time.UTC()
	b, err := json.Marshal(l)
	if err != nil {
		return
	}
	b = append(b, '\n')
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.f == nil {
		return
	}
	a.f.Write(b)
	a.f.Sync()
}

// keyEvent is the keystore's audit sink.
func (a *auditLog) keyEvent(e keystore.Event) {
	a.write(auditLine{Time: e.Time, Identity: e.Actor, Role: e.Role, Action: e.Action, Object: e.Object,
		Result: e.Result, Error: e.Error, Count: e.Count, Errors: e.Errors})
}

func (a *auditLog) Close() error {
	if a == nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.f == nil {
		return nil
	}
	err := a.f.Close()
	a.f = nil
	return err
}
