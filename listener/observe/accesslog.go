package observe

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/listener"
	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// accessLog writes JSON lines from a bounded queue on its own goroutine.
type accessLog struct {
	path    string // "" for stdout/stderr
	w       io.Writer
	f       *os.File
	mu      sync.Mutex // guards w and f between the writer goroutine and reopen
	queue   chan listener.RequestRecord
	conns   chan listener.ConnRecord // layer-4 connections: fewer, and formatted with encoding/json
	kick    chan struct{}            // wakes the writer early when the queue is half full
	dropped prometheus.Counter
	cancel  context.CancelFunc
	done    chan struct{}
}

// accessEntry is the access-log line: the fields of an ALB access log.
type accessEntry struct {
	Type                  string  `json:"type"` // http | https | h2 | ws | wss, as ALB's first field
	Time                  string  `json:"time"`
	Listener              string  `json:"listener"`
	Client                string  `json:"client"`
	Target                string  `json:"target"`
	TargetGroup           string  `json:"target_group"`
	RequestProcessingTime float64 `json:"request_processing_time"`
	TargetProcessingTime  float64 `json:"target_processing_time"`
	ResponseTime          float64 `json:"response_time"`
	Status                int     `json:"elb_status_code"`
	TargetStatus          int     `json:"target_status_code"` // 0 when no target answered
	ReceivedBytes         int64   `json:"received_bytes"`
	SentBytes             int64   `json:"sent_bytes"`
	Request               string  `json:"request"`
	Host                  string  `json:"host"`
	UserAgent             string  `json:"user_agent"`
	SSLProtocol           string  `json:"ssl_protocol"`
	SSLCipher             string  `json:"ssl_cipher"`
	SNI                   string  `json:"sni"`
	RulePriority          int     `json:"matched_rule_priority"`
	TraceID               string  `json:"trace_id"`
	ErrorReason           string  `json:"error_reason"`
	// The desync tier and its reason; "" for a compliant (or HTTP/2) request, as ALB logs "-".
	Classification       string `json:"classification"`
	ClassificationReason string `json:"classification_reason"`
	ActionsExecuted      string `json:"actions_executed"` // e.g. "forward"; "" when none ran (rejected)
	RedirectURL          string `json:"redirect_url"`
}

// accessLogQueue is how many lines may wait for the writer; beyond it lines are dropped and
// counted, so a slow disk never slows requests down.
const accessLogQueue = 8192

// accessLogTick is how often the writer drains the queue. Requests never wake the writer (a
// wake-up per request costs a goroutine switch, about as much as formatting the line); it
// drains in batches on this tick, or early when the queue is half full.
const accessLogTick = 20 * time.Millisecond

// openAccessLog opens the access log: "" (none), "stdout", "stderr" or a file path (relative to
// the configuration file).
func openAccessLog(cfg *configs.Config, dropped prometheus.Counter) (*accessLog, error) {
	switch dest := cfg.Server.AccessLog; dest {
	case "":
		return nil, nil
	case "stdout":
		return newAccessLog(os.Stdout, "", dropped, accessLogQueue)
	case "stderr":
		return newAccessLog(os.Stderr, "", dropped, accessLogQueue)
	default:
		return newAccessLog(nil, cfg.Resolve(dest), dropped, accessLogQueue)
	}
}

// newAccessLog starts the writer: to w, or to the file at path when path is set.
func newAccessLog(w io.Writer, path string, dropped prometheus.Counter, queue int) (*accessLog, error) {
	a := &accessLog{queue: make(chan listener.RequestRecord, queue), conns: make(chan listener.ConnRecord, max(queue/8, 1)), kick: make(chan struct{}, 1), dropped: dropped, done: make(chan struct{}), path: path, w: w}
	if path != "" {
		if err := a.reopen(); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	go a.run(ctx)
	return a, nil
}

// write queues the record without blocking; the writer goroutine formats it. The queued copy
// owns its strings: the record's may view the connection's buffers (valid during the call only).
func (a *accessLog) write(rec *listener.RequestRecord) {
	q := rec.Detach()
	select {
	case a.queue <- q:
	default:
		a.dropped.Inc()
		return
	}
	if len(a.queue) == cap(a.queue)/2 {
		select {
		case a.kick <- struct{}{}:
		default: // already kicked
		}
	}
}

// writeConn queues a connection record without blocking (dropped and counted when full).
func (a *accessLog) writeConn(rec *listener.ConnRecord) {
	select {
	case a.conns <- *rec:
	default:
		a.dropped.Inc()
	}
}

// connEntry is a layer-4 connection's line: the fields of an NLB connection log that apply.
type connEntry struct {
	Type           string  `json:"type"` // tcp | tls (terminated here)
	Time           string  `json:"time"` // when the connection was accepted
	Listener       string  `json:"listener"`
	Client         string  `json:"client"`
	Destination    string  `json:"destination"` // the listener address the client reached
	Target         string  `json:"target"`
	ConnectionTime float64 `json:"connection_time"` // seconds, accept to close
	ReceivedBytes  int64   `json:"received_bytes"`  // from the client
	SentBytes      int64   `json:"sent_bytes"`      // to the client
	TLSProtocol    string  `json:"tls_protocol_version"`
	TLSCipher      string  `json:"tls_cipher"`
	DomainName     string  `json:"domain_name"` // SNI (terminated or routed on)
	ALPN           string  `json:"alpn_fe_protocol"`
	ErrorReason    string  `json:"error_reason"` // proxy_header, tls_handshake, client_hello, dial, replay, idle_timeout, relay; "" when clean
}

func newConnEntry(rec *listener.ConnRecord) connEntry {
	e := connEntry{
		Type: "tcp", Time: rec.Start.UTC().Format(time.RFC3339Nano), Listener: rec.Listener,
		Target: rec.Target, ConnectionTime: rec.Duration.Seconds(), ReceivedBytes: rec.BytesIn, SentBytes: rec.BytesOut,
		DomainName: rec.SNI, ALPN: rec.ALPN, ErrorReason: rec.Reason,
	}
	if rec.Client.IsValid() {
		e.Client = rec.Client.String()
	}
	if rec.Local.IsValid() {
		e.Destination = rec.Local.String()
	}
	if rec.TLS {
		e.Type = "tls"
		if rec.TLSVersion != 0 {
			e.TLSProtocol, e.TLSCipher = tls.VersionName(rec.TLSVersion), tls.CipherSuiteName(rec.Cipher)
		}
	}
	return e
}

// newEntry is the line's fields as a struct: the documented schema (json tags), used by tests
// and as the reference appendEntry must match.
func newEntry(rec *listener.RequestRecord) accessEntry {
	e := accessEntry{
		Type:                  requestType(rec),
		Time:                  rec.Time.UTC().Format(time.RFC3339Nano),
		Listener:              rec.Listener,
		Client:                clientString(rec),
		Target:                rec.Target,
		TargetGroup:           rec.Group,
		RequestProcessingTime: requestSeconds(rec),
		TargetProcessingTime:  targetSeconds(rec),
		ResponseTime:          rec.Duration.Seconds(),
		Status:                rec.Status,
		TargetStatus:          rec.TargetStatus,
		ReceivedBytes:         max(rec.BytesIn, 0),
		SentBytes:             rec.BytesOut,
		Request:               rec.Method + " " + rec.URI + " " + rec.Proto,
		Host:                  rec.Host,
		UserAgent:             rec.UserAgent,
		SNI:                   rec.SNI,
		RulePriority:          rec.RulePriority,
		TraceID:               rec.RequestID,
		ErrorReason:           rec.Reason,
		ActionsExecuted:       rec.Actions.String(),
		RedirectURL:           rec.RedirectURL,
	}
	if rec.Classification != desync.Compliant {
		e.Classification, e.ClassificationReason = rec.Classification.String(), rec.ClassificationReason.String()
	}
	if rec.TLSVersion != 0 {
		e.SSLProtocol = tls.VersionName(rec.TLSVersion)
		e.SSLCipher = tls.CipherSuiteName(rec.Cipher)
	}
	return e
}

func clientString(rec *listener.RequestRecord) string {
	if !rec.Client.IsValid() {
		return ""
	}
	return rec.Client.String()
}

// appendEntry appends the JSON line for rec (what json.Marshal(newEntry(rec)) gives, without
// reflection or allocation: the writer shares the proxy's core under GOMAXPROCS=1).
func appendEntry(b []byte, rec *listener.RequestRecord) []byte {
	b = append(b, `{"type":"`...)
	b = append(b, requestType(rec)...)
	b = append(b, `","time":"`...)
	b = rec.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","listener":`...)
	b = appendJSONString(b, rec.Listener)
	b = append(b, `,"client":"`...)
	if rec.Client.IsValid() {
		b = rec.Client.AppendTo(b)
	}
	b = append(b, `","target":`...)
	b = appendJSONString(b, rec.Target)
	b = append(b, `,"target_group":`...)
	b = appendJSONString(b, rec.Group)
	b = append(b, `,"request_processing_time":`...)
	b = strconv.AppendFloat(b, requestSeconds(rec), 'f', -1, 64)
	b = append(b, `,"target_processing_time":`...)
	b = strconv.AppendFloat(b, targetSeconds(rec), 'f', -1, 64)
	b = append(b, `,"response_time":`...)
	b = strconv.AppendFloat(b, rec.Duration.Seconds(), 'f', -1, 64)
	b = append(b, `,"elb_status_code":`...)
	b = strconv.AppendInt(b, int64(rec.Status), 10)
	b = append(b, `,"target_status_code":`...)
	b = strconv.AppendInt(b, int64(rec.TargetStatus), 10)
	b = append(b, `,"received_bytes":`...)
	b = strconv.AppendInt(b, max(rec.BytesIn, 0), 10)
	b = append(b, `,"sent_bytes":`...)
	b = strconv.AppendInt(b, rec.BytesOut, 10)
	b = append(b, `,"request":"`...)
	b = appendJSONChars(b, rec.Method)
	b = append(b, ' ')
	b = appendJSONChars(b, rec.URI)
	b = append(b, ' ')
	b = appendJSONChars(b, rec.Proto)
	b = append(b, `","host":`...)
	b = appendJSONString(b, rec.Host)
	b = append(b, `,"user_agent":`...)
	b = appendJSONString(b, rec.UserAgent)
	b = append(b, `,"ssl_protocol":`...)
	if rec.TLSVersion != 0 {
		b = appendJSONString(b, tls.VersionName(rec.TLSVersion))
		b = append(b, `,"ssl_cipher":`...)
		b = appendJSONString(b, cipherName(rec.Cipher))
	} else {
		b = append(b, `"","ssl_cipher":""`...)
	}
	b = append(b, `,"sni":`...)
	b = appendJSONString(b, rec.SNI)
	b = append(b, `,"matched_rule_priority":`...)
	b = strconv.AppendInt(b, int64(rec.RulePriority), 10)
	b = append(b, `,"trace_id":`...)
	b = appendJSONString(b, rec.RequestID)
	b = append(b, `,"error_reason":`...)
	b = appendJSONString(b, rec.Reason)
	b = append(b, `,"classification":"`...)
	if rec.Classification != desync.Compliant {
		b = append(b, rec.Classification.String()...)
		b = append(b, `","classification_reason":"`...)
		b = append(b, rec.ClassificationReason.String()...)
	} else {
		b = append(b, `","classification_reason":"`...)
	}
	b = append(b, `","actions_executed":"`...)
	b = rec.Actions.AppendTo(b)
	b = append(b, `","redirect_url":`...)
	b = appendJSONString(b, rec.RedirectURL)
	return append(b, '}', '\n')
}

// cipherNames caches tls.CipherSuiteName, which builds the whole suite list on every call (14
// allocations: the largest cost of an HTTPS access-log line before this cache).
var cipherNames = func() map[uint16]string {
	m := map[uint16]string{}
	for _, cs := range append(tls.CipherSuites(), tls.InsecureCipherSuites()...) {
		m[cs.ID] = cs.Name
	}
	return m
}()

func cipherName(id uint16) string {
	if n, ok := cipherNames[id]; ok {
		return n
	}
	return tls.CipherSuiteName(id)
}

func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	b = appendJSONChars(b, s)
	return append(b, '"')
}

const hexDigits = "0123456789abcdef"

// jsonSafe marks the bytes appendJSONChars copies as they are: one table lookup per byte instead
// of six comparisons, which made escaping the largest part of formatting a line.
var jsonSafe = func() (t [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
	}
	return t
}()

// appendJSONChars escapes s for a JSON string as encoding/json does (quotes, backslash, control
// characters, <, >, &, U+2028/U+2029; invalid UTF-8 becomes U+FFFD). Request lines and user
// agents are client-controlled: a line must never break out of its field.
func appendJSONChars(b []byte, s string) []byte {
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if jsonSafe[c] {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	return append(b, s[start:]...)
}

// requestType is ALB's "type" of a request: http, https, h2, or ws/wss once upgraded.
func requestType(rec *listener.RequestRecord) string {
	tls := rec.TLSVersion != 0
	switch {
	case rec.Status == http.StatusSwitchingProtocols && tls:
		return "wss"
	case rec.Status == http.StatusSwitchingProtocols:
		return "ws"
	case rec.Proto == "HTTP/2.0":
		return "h2"
	case tls:
		return "https"
	}
	return "http"
}

// requestSeconds is request_processing_time: from the request to sending it to a target, -1
// when it was never sent (as in an ALB log: fixed responses, redirects, no healthy target,
// rejected requests).
func requestSeconds(rec *listener.RequestRecord) float64 {
	if rec.Target == "" {
		return -1
	}
	return rec.RequestDuration.Seconds()
}

// targetSeconds is target_processing_time: from sending to the target's response headers, -1
// when no target answered (refused, closed, timed out).
func targetSeconds(rec *listener.RequestRecord) float64 {
	if rec.TargetStatus == 0 {
		return -1
	}
	return rec.TargetDuration.Seconds()
}

func (a *accessLog) run(ctx context.Context) {
	defer close(a.done)
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintln(os.Stderr, "access log writer stopped:", r)
		}
	}()
	var bw *bufio.Writer
	var cur io.Writer // what bw writes to; a file replaced by reopen is closed once flushed
	// sync switches to the writer reopen installed: everything queued before goes to the old
	// file (flushed, then closed), everything after to the new one. Called with a.mu held.
	sync := func() {
		if cur == a.w && bw != nil {
			return
		}
		if bw != nil {
			bw.Flush()
			if f, ok := cur.(*os.File); ok && f != a.f && f != os.Stdout && f != os.Stderr {
				f.Close()
			}
		}
		cur = a.w
		bw = bufio.NewWriterSize(cur, 64<<10)
	}
	// drain writes what is queued now, not what arrives meanwhile, so a busy queue cannot keep
	// the writer going forever, then flushes. It holds the lock for the whole batch: reopen
	// waits at most one batch, and lines are formatted straight into bw's buffer.
	drain := func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		sync()
		for n := len(a.queue); n > 0; n-- {
			e := <-a.queue
			if bw.Available() < 4<<10 {
				bw.Flush() // room for a typical line, so appending to the buffer does not reallocate
			}
			bw.Write(appendEntry(bw.AvailableBuffer(), &e))
		}
		for n := len(a.conns); n > 0; n-- {
			c := <-a.conns
			line, _ := json.Marshal(newConnEntry(&c))
			bw.Write(append(line, '\n'))
		}
		bw.Flush()
	}
	tick := time.NewTicker(accessLogTick)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			drain()
		case <-a.kick:
			drain()
		case <-ctx.Done():
			drain()
			return
		}
	}
}

// reopen opens the file again (logrotate moved it away and sends SIGUSR1).
func (a *accessLog) reopen() error {
	if a.path == "" {
		return nil
	}
	// Its directory is created as state_dir is: "state/access.log" works on a first start.
	if err := os.MkdirAll(filepath.Dir(a.path), 0o750); err != nil {
		return fmt.Errorf("access log directory for %s: %w", a.path, err)
	}
	f, err := os.OpenFile(a.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open access log %s: %w", a.path, err)
	}
	a.mu.Lock()
	a.f, a.w = f, f // the writer flushes and closes the old file when it switches
	a.mu.Unlock()
	return nil
}

func (a *accessLog) close() {
	a.cancel()
	<-a.done
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.f != nil {
		a.f.Close()
	}
}
