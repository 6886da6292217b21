package desync

import (
	"fmt"
	"strings"
)

// Mode is the desync mitigation mode of a listener.
type Mode uint8

const (
	// Defensive (the default) blocks Severe requests and closes the
	// connections after Ambiguous ones.
	Defensive Mode = iota
	// Monitor forwards everything; classifications are counted. Ambiguous
	// and Severe requests still get CloseAfter: SPEC 7 says a request with
	// both Content-Length and Transfer-Encoding never reaches a back end on a
	// kept-alive connection, whatever the mode, and closing is invisible to
	// HTTP semantics.
	Monitor
	// Strictest forwards only Compliant requests.
	Strictest
)

func (m Mode) String() string {
	switch m {
	case Monitor:
		return "monitor"
	case Defensive:
		return "defensive"
	case Strictest:
		return "strictest"
	}
	return "Mode(?)"
}

// ParseMode accepts the configuration spelling (case-insensitive); "" means
// the default, defensive.
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "defensive":
		return Defensive, nil
	case "monitor":
		return Monitor, nil
	case "strictest":
		return Strictest, nil
	}
	return Defensive, fmt.Errorf("desync mitigation mode %q: want monitor, defensive or strictest", s)
}

// Verdict is what the listener does with a classified request.
type Verdict struct {
	// Block: answer 400 with "Connection: close", never forward.
	Block bool
	// CloseAfter: forward, then close the client connection and the target
	// connection used for this request (no reuse of either).
	CloseAfter bool
}

// Decide maps a tier to the action of the given mode (ALB table):
//
//	tier        monitor          defensive        strictest
//	Compliant   forward          forward          forward
//	Acceptable  forward          forward          400 + close
//	Ambiguous   forward + close  forward + close  400 + close
//	Severe      forward + close  400 + close      400 + close
//
// (ALB's monitor mode does not close; Fulcrum does, see Monitor.)
func Decide(m Mode, t Tier) Verdict {
	switch m {
	case Monitor:
		return Verdict{CloseAfter: t >= Ambiguous}
	case Strictest:
		if t != Compliant {
			return Verdict{Block: true, CloseAfter: true}
		}
		return Verdict{}
	default: // Defensive
		switch t {
		case Severe:
			return Verdict{Block: true, CloseAfter: true}
		case Ambiguous:
			return Verdict{CloseAfter: true}
		}
		return Verdict{}
	}
}
