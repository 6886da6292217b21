// Package desync classifies HTTP/1 requests into the HTTP desync tiers used by
// ALB's "desync mitigation mode" (the tiers and reasons of AWS
// http-desync-guardian) and decides, per mitigation mode, whether a request
// is blocked or forwarded and whether the connections are closed afterwards.
//
// Classification works on the request as Go's net/http server parsed it
// (Classify). Go's parser drops or merges some framing information before a
// handler runs (it deletes Content-Length when Transfer-Encoding is chunked,
// collapses identical duplicate Content-Length fields, ignores and removes
// Transfer-Encoding on HTTP/1.0 and joins obs-folded lines), so the package
// also provides Conn, a net.Conn wrapper that records the raw header block of
// each request as it is read. When the server's ConnContext is ConnContext,
// Classify analyses those raw bytes instead, which recovers the lost cases.
package desync

// Tier is the request safety tier, ordered from harmless to dangerous.
type Tier uint8

const (
	// Compliant: RFC 7230 compliant, no known risk.
	Compliant Tier = iota
	// Acceptable: not compliant, but no known desync risk.
	Acceptable
	// Ambiguous: HTTP engines may disagree on the message framing.
	Ambiguous
	// Severe: malformed or crafted; must not reach a back end.
	Severe
	numTiers
)

var tierNames = [numTiers]string{"Compliant", "Acceptable", "Ambiguous", "Severe"}

func (t Tier) String() string {
	if t < numTiers {
		return tierNames[t]
	}
	return "Tier(?)"
}

// Reason says why a request got its tier. Names match http-desync-guardian's
// ClassificationReason so logs and metrics line up with ALB's.
type Reason uint8

// The reasons, in the order the upstream analyser checks them (the order is
// used to break ties deterministically when headers come from a Go map).
const (
	ReasonCompliant Reason = iota
	ReasonNonCrLfLineTermination
	ReasonMultilineHeader
	ReasonPartialHeaderLine
	ReasonMissingLastEmptyLine
	ReasonMissingHeaderColon
	ReasonMissingUri
	ReasonEmptyHeader
	ReasonSuspiciousHeader
	ReasonNonCompliantHeader
	ReasonBadHeader
	ReasonUndefinedTransferEncodingSemantics
	ReasonUndefinedContentLengthSemantics
	ReasonMultipleTransferEncodingChunked
	ReasonBadTransferEncoding
	ReasonMultipleContentLength
	ReasonDuplicateContentLength
	ReasonBadContentLength
	ReasonGetHeadZeroContentLength
	ReasonBothTeClPresent
	ReasonBadMethod
	ReasonNonCompliantVersion
	ReasonBadVersion
	ReasonBadUri
	ReasonSpaceInUri
	ReasonAmbiguousUri
	// ReasonUnverifiedRequest is Fulcrum's own: the raw-head sniffer lost track
	// of the byte stream (or overflowed), so the request cannot be verified
	// against its raw bytes. Classified Ambiguous so the connection is closed.
	ReasonUnverifiedRequest
	numReasons
)

// NumReasons is the number of Reason values (for metric label tables).
const NumReasons = int(numReasons)

// NumTiers is the number of Tier values.
const NumTiers = int(numTiers)

var reasonNames = [numReasons]string{
	"Compliant",
	"NonCrLfLineTermination",
	"MultilineHeader",
	"PartialHeaderLine",
	"MissingLastEmptyLine",
	"MissingHeaderColon",
	"MissingUri",
	"EmptyHeader",
	"SuspiciousHeader",
	"NonCompliantHeader",
	"BadHeader",
	"UndefinedTransferEncodingSemantics",
	"UndefinedContentLengthSemantics",
	"MultipleTransferEncodingChunked",
	"BadTransferEncoding",
	"MultipleContentLength",
	"DuplicateContentLength",
	"BadContentLength",
	"GetHeadZeroContentLength",
	"BothTeClPresent",
	"BadMethod",
	"NonCompliantVersion",
	"BadVersion",
	"BadUri",
	"SpaceInUri",
	"AmbiguousUri",
	"UnverifiedRequest",
}

func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return "Reason(?)"
}

// ParseTier and ParseReason map names back (tests, config, logs).
func ParseTier(s string) (Tier, bool) {
	for i, n := range tierNames {
		if n == s {
			return Tier(i), true
		}
	}
	return 0, false
}

// ParseReason returns the Reason whose String is s.
func ParseReason(s string) (Reason, bool) {
	for i, n := range reasonNames {
		if n == s {
			return Reason(i), true
		}
	}
	return 0, false
}
