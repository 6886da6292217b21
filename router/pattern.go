package router

import "strings"

// Wildcard patterns (ALB syntax): '*' matches any run of bytes (including "/" and the empty run),
// '?' matches exactly one byte. Everything else is literal. Matching is by bytes, so a non-ASCII
// character counts as its UTF-8 length for '?'; host patterns are ASCII by validation, and paths
// and query values that carry non-ASCII text are rare enough that byte semantics is the simpler,
// predictable choice.

type patKind uint8

const (
	patAny     patKind = iota // "*": matches everything
	patExact                  // no wildcard
	patPrefix                 // "lit*"
	patSuffix                 // "*lit"
	patGeneral                // anything else
)

// pattern is a compiled wildcard pattern. The common shapes (exact, prefix, suffix, "*") get a
// direct comparison; the rest run the greedy matcher, which is O(len(p)*len(s)) at worst and never
// backtracks exponentially.
type pattern struct {
	kind patKind
	fold bool   // ASCII case-insensitive: p and lit are lower-cased at compile time
	lit  string // the literal of exact, prefix and suffix patterns
	p    string // the whole pattern (consecutive stars collapsed)
}

// compilePattern compiles p. With fold, matching is ASCII case-insensitive.
func compilePattern(p string, fold bool) pattern {
	if fold {
		p = asciiLower(p)
	}
	// Collapse "**" to "*": same language, less work for the matcher.
	if strings.Contains(p, "**") {
		var b strings.Builder
		for i := 0; i < len(p); i++ {
			if p[i] == '*' && i > 0 && p[i-1] == '*' {
				continue
			}
			b.WriteByte(p[i])
		}
		p = b.String()
	}
	pt := pattern{kind: patGeneral, fold: fold, p: p}
	stars, quest := strings.Count(p, "*"), strings.Contains(p, "?")
	switch {
	case p == "*":
		pt.kind = patAny
	case quest:
	case stars == 0:
		pt.kind, pt.lit = patExact, p
	case stars == 1 && p[len(p)-1] == '*':
		pt.kind, pt.lit = patPrefix, p[:len(p)-1]
	case stars == 1 && p[0] == '*':
		pt.kind, pt.lit = patSuffix, p[1:]
	}
	return pt
}

// String returns the compiled pattern text.
func (pt *pattern) String() string { return pt.p }

// hasWildcard reports whether p uses '*' or '?'.
func hasWildcard(p string) bool { return strings.ContainsAny(p, "*?") }

// match reports whether s matches the pattern.
func (pt *pattern) match(s string) bool {
	switch pt.kind {
	case patAny:
		return true
	case patExact:
		return len(s) == len(pt.lit) && equalBytes(pt.lit, s, pt.fold)
	case patPrefix:
		return len(s) >= len(pt.lit) && equalBytes(pt.lit, s[:len(pt.lit)], pt.fold)
	case patSuffix:
		return len(s) >= len(pt.lit) && equalBytes(pt.lit, s[len(s)-len(pt.lit):], pt.fold)
	}
	return wildMatch(pt.p, s, pt.fold, false)
}

// matchDecoded is match against the percent-decoded form of s ("%41" is 'A', '+' is a space),
// decoding on the fly so that nothing is allocated. Used for query keys and values.
func (pt *pattern) matchDecoded(s string) bool {
	if pt.kind == patAny {
		return true
	}
	return wildMatch(pt.p, s, pt.fold, true)
}

// equalBytes compares a pattern literal (lower-cased when fold) with s.
func equalBytes(lit, s string, fold bool) bool {
	if !fold {
		return lit == s
	}
	for i := 0; i < len(s); i++ {
		if lit[i] != lower(s[i]) {
			return false
		}
	}
	return true
}

func lower(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + ('a' - 'A')
	}
	return c
}

// wildMatch is the classic greedy wildcard matcher with a single backtrack point: on a mismatch
// it returns to the last '*' and lets it swallow one more byte. Earlier stars never need to be
// revisited, because a later star can absorb whatever an earlier one would have taken. With
// decode the subject is read through percent-decoding (decodeAt); positions (si, mark) stay
// offsets in the encoded text, which is all the backtracking needs.
func wildMatch(p, s string, fold, decode bool) bool {
	pi, si := 0, 0
	star, mark := -1, 0
	for si < len(s) {
		b, next := subjectAt(s, si, decode)
		if pi < len(p) {
			c := p[pi]
			if c == '*' {
				star, mark = pi, si
				pi++
				continue
			}
			if c == '?' || c == b || fold && c == lower(b) {
				pi++
				si = next
				continue
			}
		}
		if star < 0 {
			return false
		}
		pi = star + 1
		_, mark = subjectAt(s, mark, decode)
		si = mark
	}
	for pi < len(p) && p[pi] == '*' {
		pi++
	}
	return pi == len(p)
}

// subjectAt reads the subject's byte at i, percent-decoded when decode, and the offset after it.
func subjectAt(s string, i int, decode bool) (byte, int) {
	if decode {
		return decodeAt(s, i)
	}
	return s[i], i + 1
}

// decodeAt decodes one byte of a query component at s[i]: "%XX" with two hex digits is that
// byte, '+' is a space (form encoding, as url.ParseQuery), anything else (including a '%' not
// followed by two hex digits) is itself. It returns the byte and the offset after it.
func decodeAt(s string, i int) (byte, int) {
	switch c := s[i]; c {
	case '+':
		return ' ', i + 1
	case '%':
		if i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			return unhex(s[i+1])<<4 | unhex(s[i+2]), i + 3
		}
	}
	return s[i], i + 1
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// trimHost strips a port (":443", also after a bracketed IPv6 literal) and one trailing dot,
// without changing case and without allocating. A bare IPv6 address (several colons, no
// brackets) is left alone.
func trimHost(h string) string {
	if len(h) > 0 && h[0] == '[' {
		if i := strings.IndexByte(h, ']'); i > 0 {
			if rest := h[i+1:]; rest == "" || rest[0] == ':' && allDigits(rest[1:]) {
				h = h[:i+1]
			}
		}
	} else if i := strings.LastIndexByte(h, ':'); i >= 0 && strings.IndexByte(h[:i], ':') < 0 && allDigits(h[i+1:]) {
		h = h[:i]
	}
	if n := len(h); n > 0 && h[n-1] == '.' {
		h = h[:n-1]
	}
	return h
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return true
		}
	}
	return false
}

// NormalizeHost returns h lower-cased (ASCII), without a port and without one trailing dot:
// "WWW.Example.com.:8443" becomes "www.example.com", "[::1]:80" becomes "[::1]". When h is
// already normal (or only needs trimming) it returns a substring of h and allocates nothing.
func NormalizeHost(h string) string {
	h = trimHost(h)
	return asciiLower(h)
}

// asciiLower lower-cases ASCII letters only (non-ASCII bytes stay as they are, so a pattern and
// a subject fold the same way). It returns s itself when there is nothing to change.
func asciiLower(s string) string {
	if !hasUpper(s) {
		return s
	}
	b := []byte(s)
	for i, c := range b {
		b[i] = lower(c)
	}
	return string(b)
}
