package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"
)

// TestLogFormat: log_format text or json, "auto" being JSON when stderr is not a terminal, and
// durations in seconds in both.
func TestLogFormat(t *testing.T) {
	var buf bytes.Buffer
	newLogger(&buf, "info", "json").Info("drained", "budget", 1500*time.Millisecond)
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil || m["budget"] != 1.5 {
		t.Fatalf("json: %v %q", err, buf.String())
	}
	buf.Reset()
	newLogger(&buf, "info", "text").Info("drained", "budget", 1500*time.Millisecond)
	if s := buf.String(); !strings.Contains(s, "msg=drained budget=1.5") {
		t.Fatalf("text: %q", s)
	}
	buf.Reset()
	newLogger(&buf, "info", "auto").Info("x")
	if !json.Valid(buf.Bytes()) {
		t.Fatalf("auto to a buffer is not JSON: %q", buf.String())
	}
	f, err := os.CreateTemp(t.TempDir(), "log")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if isTerminal(f) {
		t.Fatal("a regular file taken for a terminal")
	}
	buf.Reset()
	newLogger(&buf, "warn", "text").Info("hidden")
	if buf.Len() != 0 {
		t.Fatalf("log_level warn printed info: %q", buf.String())
	}
}
