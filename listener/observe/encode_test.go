package observe

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

func sampleRecord() listener.RequestRecord {
	return listener.RequestRecord{Listener: "web", Time: time.Date(2026, 1, 2, 3, 4, 5, 6789, time.UTC), Duration: 1234567 * time.Nanosecond,
		RequestDuration: 20 * time.Microsecond, TargetDuration: time.Millisecond, TargetStatus: 200, Client: netip.MustParseAddrPort("[::1]:54321"), Target: "127.0.0.1:9101", Group: "echo",
		Status: 200, BytesIn: -1, BytesOut: 100, Method: "GET", URI: "/a?b=\"c\"&d=<e>", Proto: "HTTP/1.1", Host: "h",
		UserAgent: "ua\x00\n\t\xff\u2028é", TLSVersion: 0x0304, Cipher: 0x1301, SNI: "localhost", RulePriority: -1,
		RequestID: "id", Reason: "target_timeout", Classification: desync.Ambiguous, ClassificationReason: desync.ReasonBothTeClPresent,
		Actions: listener.ActionsRedirect, RedirectURL: "https://h/a?b=\"c\"&d=<e>"}
}

// checkSameAsJSON: the hand-written encoder gives the same document as encoding/json.
func checkSameAsJSON(t *testing.T, rec *listener.RequestRecord) {
	t.Helper()
	line := appendEntry(nil, rec)
	if line[len(line)-1] != '\n' {
		t.Fatalf("no newline: %q", line)
	}
	var got, want map[string]any
	if err := json.Unmarshal(line, &got); err != nil {
		t.Fatalf("appendEntry is not JSON: %v\n%s", err, line)
	}
	ref, _ := json.Marshal(newEntry(rec))
	json.Unmarshal(ref, &want)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("appendEntry differs from encoding/json:\n got %s\nwant %s", line, ref)
	}
}

func TestAppendEntryMatchesJSON(t *testing.T) {
	rec := sampleRecord()
	checkSameAsJSON(t, &rec)
	rec = listener.RequestRecord{} // zero: no client, no TLS, no target
	checkSameAsJSON(t, &rec)
	if m := decodeLine(t, appendEntry(nil, &rec)); m["request_processing_time"] != -1.0 || m["target_processing_time"] != -1.0 {
		t.Errorf("never sent to a target: want -1 timings as ALB logs them, got %v", m)
	}
	rec = sampleRecord()
	buf := make([]byte, 0, 4096)
	if n := testing.AllocsPerRun(100, func() { buf = appendEntry(buf[:0], &rec) }); n != 0 {
		t.Errorf("appendEntry allocates %v times per line", n)
	}
}

func FuzzAppendEntry(f *testing.F) {
	f.Add("GET", "/x", "curl/8", "")
	f.Add("G\"ET", "/\\\x01<>&\u2028", "\xff\xfe", "é")
	f.Fuzz(func(t *testing.T, method, uri, ua, sni string) {
		rec := sampleRecord()
		rec.Method, rec.URI, rec.UserAgent, rec.SNI = method, uri, ua, sni
		checkSameAsJSON(t, &rec)
	})
}

func decodeLine(t *testing.T, line []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(line, &m); err != nil {
		t.Fatalf("%v: %s", err, line)
	}
	return m
}
