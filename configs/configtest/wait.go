package configtest

import (
	"testing"
	"time"
)

// WaitFor polls cond until it holds and fails the test, naming what it waited for, once limit
// has passed. It is for state that announces nothing (a health verdict, a metric, a file's
// content); where a readiness signal exists (a channel, a log line, an accepted connection),
// wait on that instead.
func WaitFor(t testing.TB, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
