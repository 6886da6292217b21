package park

import (
	"context"
	"sync"
)

// Lazy holds a server's Poller, started on first use: a server that never parks a connection
// runs no poller goroutine. If the poller cannot start, parking stays off for good and the
// connections keep waiting on their goroutines. The zero value is ready to use.
type Lazy struct {
	mu     sync.Mutex
	p      *Poller
	failed bool
}

// Get returns the Poller, starting it when start is set, none runs yet and ctx (the server's
// life) has not ended; nil when none runs. err is New's error, returned by the one call that
// tried and failed, for the caller to report.
func (l *Lazy) Get(ctx context.Context, start bool) (p *Poller, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	// ctx is checked under the lock: a server that ends its ctx and then stops what Get
	// returns never misses a poller started meanwhile.
	if l.p == nil && start && !l.failed && ctx.Err() == nil {
		l.p, err = New()
		l.failed = err != nil
	}
	return l.p, err
}
