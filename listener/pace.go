package listener

import (
	"time"
)

// pace bounds how long one direction of a transfer may keep Fulcrum waiting on a client: no
// single wait longer than timeout (client_body_timeout or send_timeout), and in all no more
// than timeout + bytes/rate (min_transfer_rate), so a client that moves a byte just before
// each timeout is cut after about one timeout instead of never. Only time spent waiting on the
// client counts: a target that is slow to take a body or to produce a response does not use
// up the client's budget. A zero pace (timeout 0) sets no deadline. Not safe for concurrent use:
// one direction of one request has one reader or writer at a time.
type pace struct {
	timeout time.Duration
	rate    int64 // bytes per second, > 0 when timeout > 0
	waited  time.Duration
	bytes   int64
}

func newPace(timeout time.Duration, rate int) pace {
	if rate <= 0 {
		rate = 1
	}
	return pace{timeout: timeout, rate: int64(rate)}
}

func (p *pace) on() bool { return p.timeout > 0 }

// deadline is when the next wait must end, starting now.
func (p *pace) deadline(now time.Time) time.Time {
	budget := p.timeout - p.waited
	if p.bytes > 0 {
		// bytes/rate seconds, computed in nanoseconds without overflow for any realistic size.
		budget += time.Duration(p.bytes/p.rate)*time.Second + time.Duration(p.bytes%p.rate)*time.Second/time.Duration(p.rate)
	}
	budget = min(budget, p.timeout)
	if budget <= 0 {
		return now // out of budget: the next wait fails at once
	}
	return now.Add(budget)
}

// done records one wait that moved n bytes and took d.
func (p *pace) done(n int, d time.Duration) {
	p.bytes += int64(n)
	p.waited += d
}
