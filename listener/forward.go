package listener

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/backends"
	"github.com/fulcrum-lb/fulcrum/listener/h1"
	"github.com/fulcrum-lb/fulcrum/router"
)

// The steps the HTTP/1 engine (h1serve.go) and the HTTP/2 direct path (h2direct.go) share when
// they forward a request to a target speaking HTTP/1.1: the outgoing head's settings, the
// choice of target, the retries and the mapping of a failed exchange to an answer. Each engine
// keeps its own exchange and its own way of answering; what is here decides, so that both
// forward alike.

// certMode is the listener's client_auth mode when it passes the client's certificate to the
// targets as fields, "" when it passes none.
func (st *httpState) certMode() string {
	if ca := st.cfg.ClientAuth; ca != nil && (ca.Mode == clientAuthPass || ca.Mode == clientAuthVer) {
		return ca.Mode
	}
	return ""
}

// setOutgoing prepares o for a request forwarded under rule: what the listener generation and
// the rule add to the head, and the request id, which rec records. The id is the client's own
// X-Request-Id (read through h) when the client is a trusted proxy, else a new one.
func setOutgoing(o *h1.Outgoing, rec *RequestRecord, st *httpState, rule *router.Rule, client netip.Addr, h router.Headers) {
	o.XFF, o.DropInvalid, o.Proto, o.Port = st.xff, st.cfg.DropInvalidHeaderFields, st.proto, st.port
	o.Trusted = inPrefixes(st.trusted, client)
	o.Client = client
	o.Ops = rule.RequestHeaders
	var fromClient []byte
	if o.Trusted { // only a trusted client's id is kept: skip the lookup otherwise
		if v, ok := h.HeaderValue("X-Request-Id", 0); ok {
			fromClient = strBytes(v)
		}
	}
	o.SetRequestID(fromClient)
	rec.RequestID = h1.Str(o.RequestID)
}

// pickTarget chooses a request's target: the one its stickiness cookie names, else the group's
// pick for client. Nil when no target is healthy.
func pickTarget(g *backends.Group, h backends.HeaderValues, client netip.Addr) *backends.Target {
	if t := g.StickyTargetCookies(h); t != nil {
		return t
	}
	return g.Pick(client, nil)
}

// heldTarget is the target whose in-flight slot an exchange holds.
type heldTarget struct{ t *backends.Target }

// release gives the slot back, once: the exchange releases it as soon as the target's part is
// over, and the attempt loop again in case the exchange ended early.
func (h *heldTarget) release() {
	if h.t != nil {
		h.t.Release()
		h.t = nil
	}
}

var (
	// errAtLimit: the target and the one other tried were at their max_in_flight.
	errAtLimit = errors.New("targets at their limit")
	// errNoTargetReachable: every attempt ended asking for another.
	errNoTargetReachable = errors.New("no target reachable")
)

// attempts is what the attempt loop needs of a forwarded request.
type attempts struct {
	rec     *RequestRecord // Target, RequestDuration and TargetDuration are set here
	held    *heldTarget
	g       *backends.Group
	pool    backends.H1Pool
	client  netip.Addr
	hasBody bool
}

// run forwards the request to target, or to other targets of the group: a target at its
// max_in_flight gives way to one other target, never more (a 503 at once beats a pile-up); a
// connection that cannot be had is reported and the request goes to another target, up to
// twice (a body not read yet is still whole); a kept-alive connection the target had closed
// (exchange returns retry) is replaced by a new one, once. exchange sends the request on tc
// and answers the client, unless it returns retry.
//
// It returns nil when exchange has answered; otherwise nothing was answered and the error says
// why: errAtLimit, errNoTargetReachable or the failed dial's error.
func (a attempts) run(target *backends.Target, exchange func(target *backends.Target, tc backends.TargetConn) (retry bool)) error {
	rec := a.rec
	stale := false
	limit := a.g.MaxInFlight()
	for attempt := 0; attempt < 3; attempt++ {
		if !target.TryAcquire(limit) {
			next := a.g.Pick(a.client, target)
			if next == nil || next == target || !next.TryAcquire(limit) {
				return errAtLimit
			}
			target = next
		}
		a.held.t = target
		addr := target.Addr()
		rec.Target = addr
		t0 := time.Now()
		if attempt == 0 {
			rec.RequestDuration = t0.Sub(rec.Time)
		}
		tc, err := a.pool.Get(context.Background(), addr, stale, a.hasBody)
		if err != nil {
			a.held.release()
			target.ReportFailure()
			if attempt < 2 {
				if next := a.g.Pick(a.client, target); next != nil && next != target {
					target, stale = next, false
					continue
				}
			}
			return err
		}
		retry := exchange(target, tc)
		rec.TargetDuration = time.Since(t0)
		a.held.release()
		if retry && !stale {
			stale = true
			continue
		}
		return nil
	}
	return errNoTargetReachable
}

// targetFailure is the status and the log's reason for an exchange that failed before any
// response byte reached the client.
func targetFailure(err error) (status int, reason string) {
	switch {
	case isTimeout(err):
		return 504, "target_timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return 502, "target_refused"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return 502, "target_closed"
	}
	return 502, "target_error"
}

// isIdempotentMethod reports whether a request with method m may be sent again after a
// reused connection failed under it.
func isIdempotentMethod(m string) bool {
	switch m {
	case "GET", "HEAD", "OPTIONS", "TRACE":
		return true
	}
	return false
}
