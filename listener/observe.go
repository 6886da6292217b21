package listener

import (
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/fulcrum-lb/fulcrum/listener/desync"
)

// Observer receives what metrics and access logs need. It is called on the request path, so an
// implementation must not block: count with pre-bound metrics, hand log lines to a bounded queue.
type Observer interface {
	// Request is called once per finished HTTP request. rec is only valid during the call, and
	// its strings may view the connection's buffers: copy what is kept beyond the call.
	Request(rec *RequestRecord)
	// Desync is called for every request that is not compliant.
	Desync(listener string, tier desync.Tier, reason desync.Reason)
}

// RequestRecord is one HTTP request as the access log sees it (the fields of an ALB access log).
type RequestRecord struct {
	Listener string
	Time     time.Time
	Duration time.Duration // first byte in to last byte out
	// RequestDuration is the time from the request to sending it to a target, TargetDuration
	// from there to the target's response headers. Both mean nothing when Target is "";
	// TargetDuration means nothing when TargetStatus is 0.
	RequestDuration time.Duration
	TargetDuration  time.Duration
	TargetStatus    int // the target's status code, 0 when no target answered
	Client          netip.AddrPort
	Target          string
	Group           string
	Status          int
	BytesIn         int64
	BytesOut        int64
	Method          string
	URI             string
	Proto           string
	Host            string
	UserAgent       string
	TLSVersion      uint16
	Cipher          uint16
	SNI             string
	RulePriority    int // 0 = default action, -1 = none matched yet (rejected before routing)
	RequestID       string
	Reason          string // why it failed, "" when it did not
	// Classification and ClassificationReason are the request's desync tier and why (HTTP/1;
	// HTTP/2 requests are not classified and stay Compliant).
	Classification       desync.Tier
	ClassificationReason desync.Reason
	Actions              Actions // what the matched rule did
	RedirectURL          string  // the Location of a redirect action; owned by the record
}

// Actions is the set of actions a request ran, ALB's actions_executed. A set of bits rather
// than a formatted list, so that filling it on the request path costs nothing.
type Actions uint8

const (
	ActionsForward Actions = 1 << iota
	ActionsRedirect
	ActionsFixedResponse
	numActions = iota
)

// actionNames are ALB's names, in the order ALB lists executed actions.
var actionNames = [numActions]string{"forward", "redirect", "fixed-response"}

// AppendTo appends the actions as ALB lists them: names joined by commas, nothing when none ran.
func (a Actions) AppendTo(b []byte) []byte {
	first := true
	for i, name := range actionNames {
		if a&(1<<i) == 0 {
			continue
		}
		if !first {
			b = append(b, ',')
		}
		b = append(b, name...)
		first = false
	}
	return b
}

func (a Actions) String() string { return string(a.AppendTo(nil)) }

// Detach returns a copy of rec that owns its strings, for an observer that keeps the record
// beyond the call (the request's strings may view the connection's pooled buffers, which the
// next request on any connection overwrites).
func (rec *RequestRecord) Detach() RequestRecord {
	q := *rec
	q.Method, q.URI, q.Proto, q.Host = strings.Clone(q.Method), strings.Clone(q.URI), strings.Clone(q.Proto), strings.Clone(q.Host)
	q.UserAgent, q.RequestID, q.SNI = strings.Clone(q.UserAgent), strings.Clone(q.RequestID), strings.Clone(q.SNI)
	return q
}

var recordPool = sync.Pool{New: func() any { return new(RequestRecord) }}

// ConnObserver is an Observer that also records layer-4 connections (network and classic
// tcp/ssl listeners), once each when it ends. Optional: the runtime checks for it.
type ConnObserver interface {
	// Connection is called once per finished connection. rec is only valid during the call.
	Connection(rec *ConnRecord)
}

// ConnRecord is one layer-4 connection, as an NLB connection log sees it.
type ConnRecord struct {
	Listener   string
	Start      time.Time
	Duration   time.Duration
	Client     netip.AddrPort // from the PROXY header when the listener takes one
	Local      netip.AddrPort // the listener address the client reached
	Target     string         // "" when no target was reached
	BytesIn    int64          // client -> target
	BytesOut   int64          // target -> client
	TLS        bool           // terminated here (offload or re-encryption)
	TLSVersion uint16
	Cipher     uint16
	SNI        string
	ALPN       string
	Reason     string // proxy_header, tls_handshake, client_hello, dial, replay, idle_timeout, relay; "" when clean
}

// statusWriter records the status and the bytes written. It unwraps for http.ResponseController,
// which ReverseProxy uses to flush streams and hijack upgraded connections.
type statusWriter struct {
	http.ResponseWriter
	status  int
	written int64

	// pace (send_timeout, min_transfer_rate) sets a write deadline through dl before each
	// write to the client: the HTTP/1 connection, or the HTTP/2 stream. nil dl: none.
	pace pace
	dl   interface{ SetWriteDeadline(time.Time) error }
	werr error // the first failed write
}

var statusWriterPool = sync.Pool{New: func() any { return new(statusWriter) }}

func acquireStatusWriter(w http.ResponseWriter) *statusWriter {
	sw := statusWriterPool.Get().(*statusWriter)
	*sw = statusWriter{ResponseWriter: w}
	return sw
}

func releaseStatusWriter(sw *statusWriter) {
	sw.ResponseWriter = nil
	statusWriterPool.Put(sw)
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 || code == http.StatusSwitchingProtocols {
		w.status = code
	}
	if w.dl != nil && w.pace.on() {
		// The head may be written only after the handler (net/http flushes it then): give
		// that write a fresh deadline rather than one left from a previous request.
		w.dl.SetWriteDeadline(w.pace.deadline(time.Now()))
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	if w.dl == nil || !w.pace.on() {
		n, err := w.ResponseWriter.Write(p)
		w.written += int64(n)
		w.noteErr(err)
		return n, err
	}
	t0 := time.Now()
	w.dl.SetWriteDeadline(w.pace.deadline(t0))
	n, err := w.ResponseWriter.Write(p)
	w.pace.done(n, time.Since(t0))
	w.written += int64(n)
	w.noteErr(err)
	return n, err
}

func (w *statusWriter) noteErr(err error) {
	if err != nil && w.werr == nil {
		w.werr = err
	}
}

// Flush is direct (not only through Unwrap) because ReverseProxy flushes streaming responses often.
func (w *statusWriter) Flush() {
	f, ok := w.ResponseWriter.(http.Flusher)
	if !ok {
		return
	}
	if w.dl == nil || !w.pace.on() {
		f.Flush()
		return
	}
	t0 := time.Now()
	w.dl.SetWriteDeadline(w.pace.deadline(t0))
	f.Flush()
	w.pace.done(0, time.Since(t0))
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
