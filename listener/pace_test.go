package listener

import (
	"testing"
	"time"
)

func TestPace(t *testing.T) {
	now := time.Unix(1000, 0)
	p := newPace(10*time.Second, 100)
	if d := p.deadline(now).Sub(now); d != 10*time.Second {
		t.Fatalf("first wait %v, want the timeout", d)
	}
	// A trickle: one byte after 9 s of waiting, again and again. The budget shrinks by ~9 s
	// per byte while each byte earns 10 ms, so it runs out after about one timeout.
	var total time.Duration
	for i := 0; ; i++ {
		d := p.deadline(now).Sub(now)
		if d < 9*time.Second {
			total += d // the wait times out before the next byte: cut
			break
		}
		total += 9 * time.Second
		p.done(1, 9*time.Second)
		if i > 10 {
			t.Fatalf("trickle still allowed after %v", total)
		}
	}
	if total > 11*time.Second {
		t.Errorf("trickle held the connection %v, want about one timeout", total)
	}
	// A fast transfer keeps the full timeout for every wait.
	q := newPace(10*time.Second, 100)
	for range 100 {
		q.done(1<<20, time.Millisecond)
	}
	if d := q.deadline(now).Sub(now); d != 10*time.Second {
		t.Errorf("fast transfer: next wait %v, want the timeout", d)
	}
	// Zero pace: never on.
	var z pace
	if z.on() {
		t.Error("zero pace is on")
	}
}
