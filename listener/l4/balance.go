package l4

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
)

// ErrNoTarget is returned by a Balance dialer when the group has no target to offer.
var ErrNoTarget = errors.New("l4: no healthy target")

// Target is what Balance needs from a target (backends' *Target): in-flight accounting for
// least-connections balancing and passive health.
type Target interface {
	comparable
	Acquire()       // one more connection in flight
	Release()       // one fewer
	ReportFailure() // a dial failed (passive health)
}

// Group is what Balance needs from a tcp/tls target group. backends' *Group fits with a small
// adapter that turns ConnMeta into its ProxyInfo:
//
//	type l4Group struct{ g *backends.Group }
//	func (a l4Group) Pick(c netip.Addr, ex *backends.Target) *backends.Target { return a.g.Pick(c, ex) }
//	func (a l4Group) Dial(ctx context.Context, t *backends.Target, m *l4.ConnMeta) (net.Conn, error) {
//		return a.g.Dial(ctx, t, &backends.ProxyInfo{Src: m.Client, Dst: m.Local, ...})
//	}
//	dialer := l4.Balance[*backends.Target](l4Group{g}, 2)
//
// Dial must write the outbound PROXY header (if any) and finish the back-end TLS handshake
// before returning, so that a failure is always "before any client byte was sent"; it must not
// report failures itself (Balance does).
type Group[T Target] interface {
	Pick(client netip.Addr, exclude T) T // the zero T when no target is available
	Dial(ctx context.Context, t T, meta *ConnMeta) (net.Conn, error)
}

// Balance returns a Dialer that picks a target of g, dials it and, when the dial fails (no
// client byte has been sent yet), tries another target, up to attempts tries in all (minimum
// 1). A failed target is reported and excluded from the next pick.
func Balance[T Target](g Group[T], attempts int) Dialer {
	if attempts < 1 {
		attempts = 1
	}
	return &balancer[T]{g: g, attempts: attempts}
}

type balancer[T Target] struct {
	g        Group[T]
	attempts int
}

func (b *balancer[T]) DialFor(ctx context.Context, meta *ConnMeta) (net.Conn, func(), error) {
	var zero, exclude T
	var errs []error
	for range b.attempts {
		t := b.g.Pick(meta.Client.Addr(), exclude)
		if t == zero {
			break
		}
		t.Acquire()
		c, err := b.g.Dial(ctx, t, meta)
		if err == nil {
			return c, t.Release, nil
		}
		t.Release()
		t.ReportFailure()
		errs = append(errs, err)
		exclude = t
		if ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 0 {
		return nil, nil, ErrNoTarget
	}
	return nil, nil, fmt.Errorf("l4: dial target (%d attempts): %w", len(errs), errors.Join(errs...))
}
