package desync

import (
	"net/http"
)

// text lets the analyser run on Go's parsed strings and on raw head bytes
// without converting (and so without allocating).
type text interface{ ~string | ~[]byte }

// Character classes (RFC 7230 / http-desync-guardian's tables).
var (
	tcharTable    [256]bool // token characters
	badCharTable  [256]bool // CR, LF, NUL: a parsing error or an attack
	valueTable    [256]bool // VCHAR / SP / HTAB / obs-text
	uriCharTable  [256]bool // > SP and not DEL (obs-text allowed)
	whitespaceTbl [256]bool // SP / HTAB
)

func init() {
	for b := 0; b < 256; b++ {
		c := byte(b)
		alnum := c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		switch c {
		case '-', '_', '.', '!', '#', '$', '%', '&', '\'', '*', '+', '^', '`', '|', '~':
			tcharTable[b] = true
		default:
			tcharTable[b] = alnum
		}
		badCharTable[b] = c == '\r' || c == '\n' || c == 0
		whitespaceTbl[b] = c == ' ' || c == '\t'
		valueTable[b] = (c >= ' ' && c < 0x7f) || c >= 0x80 || c == '\t'
		uriCharTable[b] = c > ' ' && c != 0x7f
	}
}

// headerTier is the safety of one header line (upstream HeaderSafetyTier).
type headerTier uint8

const (
	hCompliant headerTier = iota
	hNonCompliant
	hBad
)

func nameTier[T text](name T) headerTier { return charsTier(name, &tcharTable) }

func valueTier[T text](v T) headerTier { return charsTier(v, &valueTable) }

// charsTier grades s by its bytes: compliant when every one is in allowed, bad as soon as one
// is a bad character, else non-compliant.
func charsTier[T text](s T, allowed *[256]bool) headerTier {
	t := hCompliant
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !allowed[c] {
			if badCharTable[c] {
				return hBad
			}
			t = hNonCompliant
		}
	}
	return t
}

// similarity of a header name to Transfer-Encoding / Content-Length.
type similarity uint8

const (
	identical   similarity = iota // equal ignoring ASCII case
	sameLetters                   // same letters, differing in delimiters/whitespace/junk
	distant
)

const (
	teName = "transfer-encoding"
	clName = "content-length"
)

func isAlnum(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

func nextAlnum[T text](h T, i int) int {
	for i < len(h) && !isAlnum(h[i]) {
		i++
	}
	return i
}

func nextSymbol[T text](h T, i int) int {
	for i < len(h) && h[i] <= ' ' {
		i++
	}
	return i
}

// sameChar compares one letter, also matching the two UTF-8 letters whose
// upper case is ASCII ("ſ" -> S, "ı" -> I), as some engines upper-case names.
func sameChar[T text](want byte, h T, i int) (bool, int) {
	c := h[i]
	if c >= 'A' && c <= 'Z' {
		c += 'a' - 'A'
	}
	if want == c {
		return true, i + 1
	}
	if i+1 < len(h) {
		if want == 's' && h[i] == 0xc5 && h[i+1] == 0xbf || want == 'i' && h[i] == 0xc4 && h[i+1] == 0xb1 {
			return true, i + 2
		}
	}
	return false, i + 1
}

// similar reports how close header name h is to imp (lower case letters and '-').
func similar[T text](imp string, h T) similarity {
	if len(h) < len(imp) {
		return distant
	}
	hi := nextAlnum(h, 0)
	ident := hi == 0 && len(imp) == len(h)
	for k := 0; k < len(imp); k++ {
		if hi == len(h) {
			return distant
		}
		c := imp[k]
		delim := c == '-'
		same, ni := sameChar(c, h, hi)
		if !same {
			if !delim {
				break
			}
			ident = false
		}
		if delim {
			hi = nextAlnum(h, ni)
		} else {
			hi = nextSymbol(h, ni)
		}
	}
	exhausted := hi == len(h)
	switch {
	case exhausted && ident:
		return identical
	case exhausted || nextAlnum(h, hi) == len(h):
		return sameLetters
	}
	return distant
}

// state accumulates the verdict. Upstream keeps the first reason of the
// highest tier; with headers from a Go map (random order) ties are broken by
// reason order instead, so the result is deterministic.
type state struct {
	tier      Tier
	reason    Reason
	unordered bool
}

func (s *state) up(t Tier, r Reason) {
	if t > s.tier || (s.unordered && t == s.tier && t != Compliant && r < s.reason) {
		s.tier, s.reason = t, r
	}
}

// Header kinds for the Transfer-Encoding / Content-Length pass.
const (
	kindOther = iota
	kindTE
	kindCL
)

// headerPass1 does the per-header checks and reports whether the header takes
// part in message framing (identical or look-alike TE/CL).
func headerPass1[T text](s *state, name, value T) int {
	kind, _ := headerKind(name, value, s)
	return kind
}

// headerKind classifies one header; when s is non-nil it also records the
// header's own verdicts (first pass).
func headerKind[T text](name, value T, s *state) (int, headerTier) {
	te := similar(teName, name)
	cl := distant
	if te == distant {
		cl = similar(clName, name)
	}
	essential := te == identical || cl == identical
	ht := nameTier(name)
	if vt := valueTier(value); vt > ht {
		ht = vt
	}
	if s != nil {
		switch ht {
		case hBad:
			s.up(Severe, ReasonBadHeader)
		case hNonCompliant:
			s.up(Acceptable, ReasonNonCompliantHeader)
		}
	}
	// Empty name (after OWS trim) or a name starting with ':'.
	i, j := 0, len(name)
	for i < j && whitespaceTbl[name[i]] {
		i++
	}
	for i < j && whitespaceTbl[name[j-1]] {
		j--
	}
	switch {
	case i == j || name[i] == ':':
		if s != nil {
			s.up(Ambiguous, ReasonEmptyHeader)
		}
		return kindOther, ht
	case !essential && ht != hBad:
		if te == sameLetters || cl == sameLetters {
			if s != nil {
				s.up(Ambiguous, ReasonSuspiciousHeader)
			}
			if te == sameLetters {
				return kindTE, ht
			}
			return kindCL, ht
		}
		return kindOther, ht
	case te == identical:
		return kindTE, ht
	case cl == identical:
		return kindCL, ht
	}
	return kindOther, ht
}

func trimOWS[T text](v T) T {
	i, j := 0, len(v)
	for i < j && whitespaceTbl[v[i]] {
		i++
	}
	for i < j && whitespaceTbl[v[j-1]] {
		j--
	}
	return v[i:j]
}

func equalFoldASCII[T text](v T, lower string) bool {
	if len(v) != len(lower) {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// teItem checks one comma-separated Transfer-Encoding item; ok=false when it
// is not a known coding.
func teItem[T text](item T) (chunked, ok bool) {
	t := trimOWS(item)
	for k := 0; k < len(t); k++ {
		if t[k] == ';' {
			t = trimOWS(t[:k])
			break
		}
	}
	switch {
	case equalFoldASCII(t, "chunked"):
		return true, true
	case equalFoldASCII(t, "compress"), equalFoldASCII(t, "deflate"), equalFoldASCII(t, "gzip"), equalFoldASCII(t, "identity"):
		return false, true
	}
	return false, false
}

// parseNum parses a Content-Length value: OWS, digits only, no overflow.
func parseNum[T text](v T) (uint64, bool) {
	t := trimOWS(v)
	var n uint64
	for k := 0; k < len(t); k++ {
		c := t[k]
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if n > (^uint64(0)-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, true
}

// framing collects the Transfer-Encoding / Content-Length facts (second pass).
type framing struct {
	teSeen    bool
	lastChunk bool // upstream: "chunked" directly after "chunked" is the error
	clSet     bool
	cl        uint64
}

func addTE[T text](f *framing, s *state, v T) {
	f.teSeen = true
	start := 0
	for k := 0; k <= len(v); k++ {
		if k < len(v) && v[k] != ',' {
			continue
		}
		chunked, ok := teItem(v[start:k])
		start = k + 1
		if !ok {
			s.up(Severe, ReasonBadTransferEncoding)
			continue
		}
		if chunked && f.lastChunk {
			s.up(Severe, ReasonMultipleTransferEncodingChunked)
		}
		f.lastChunk = chunked
	}
}

func addCL[T text](f *framing, s *state, v T) {
	n, ok := parseNum(v)
	if !ok {
		s.up(Severe, ReasonBadContentLength)
		return
	}
	switch {
	case !f.clSet:
		f.clSet, f.cl = true, n
	case f.cl != n:
		s.up(Severe, ReasonMultipleContentLength)
	default:
		s.up(Ambiguous, ReasonDuplicateContentLength)
	}
}

// versionLE10 / versionLT10 mirror upstream's byte-wise comparison of the
// version token with "HTTP/1.0".
func versionCmp10[T text](v T) int {
	const ref = "HTTP/1.0"
	for k := 0; k < len(v) && k < len(ref); k++ {
		if v[k] != ref[k] {
			if v[k] < ref[k] {
				return -1
			}
			return 1
		}
	}
	switch {
	case len(v) < len(ref):
		return -1
	case len(v) > len(ref):
		return 1
	}
	return 0
}

// finishFraming applies the method/version rules once all TE/CL headers were
// seen. Returns false when the version rule already decided (upstream skips
// the value checks then).
func versionBlocksFraming[T text](s *state, version T, nTE, nCL int) bool {
	c := versionCmp10(version)
	if c <= 0 && nTE > 0 {
		s.up(Ambiguous, ReasonUndefinedTransferEncodingSemantics)
		return true
	}
	if c < 0 && nCL > 0 {
		s.up(Ambiguous, ReasonUndefinedContentLengthSemantics)
		return true
	}
	return false
}

func (f *framing) finish(s *state, bodyless bool) {
	if bodyless {
		if f.teSeen {
			s.up(Ambiguous, ReasonUndefinedTransferEncodingSemantics)
		}
		if f.clSet {
			if f.cl == 0 {
				s.up(Acceptable, ReasonGetHeadZeroContentLength)
			} else {
				s.up(Ambiguous, ReasonUndefinedContentLengthSemantics)
			}
		}
	}
	if f.clSet && f.teSeen {
		s.up(Ambiguous, ReasonBothTeClPresent)
	}
}

func checkMethod[T text](s *state, m T) {
	for k := 0; k < len(m); k++ {
		if !tcharTable[m[k]] {
			s.up(Severe, ReasonBadMethod)
			return
		}
	}
}

func checkVersion[T text](s *state, v T) {
	t := trimOWS(v)
	if string(t) == "HTTP/0.9" {
		s.up(Acceptable, ReasonNonCompliantVersion)
		return
	}
	valid := len(t) == 8 && string(t[:7]) == "HTTP/1." && t[7] >= '0' && t[7] <= '9'
	switch {
	case !valid:
		s.up(Severe, ReasonBadVersion)
	case len(t) != len(v) || t[7] > '1':
		s.up(Acceptable, ReasonNonCompliantVersion)
	}
}

func checkURI[T text](s *state, u T) {
	for k := 0; k < len(u); k++ {
		c := u[k]
		switch {
		case uriCharTable[c]:
		case badCharTable[c]:
			s.up(Severe, ReasonBadUri)
			return
		case c == ' ':
			s.up(Acceptable, ReasonSpaceInUri)
		default:
			s.up(Ambiguous, ReasonAmbiguousUri)
		}
	}
}

func isBodyless[T text](m T) bool { return string(m) == "GET" || string(m) == "HEAD" }

// Classify returns the desync tier of an HTTP/1 request and why.
//
// It looks at the request as Go's server parsed it. If the request arrived on
// a Conn (the server's ConnContext set to ConnContext), the raw header block
// recorded for this request is analysed instead, because Go's parser drops
// framing details (see package doc). Call it exactly once per request: it
// consumes the recorded head. HTTP/2 and later are not classified
// (Compliant), as upstream.
func Classify(r *http.Request) (Tier, Reason) {
	return classify(r)
}

func classify(r *http.Request) (Tier, Reason) {
	if r.ProtoMajor >= 2 {
		return Compliant, ReasonCompliant
	}
	if c := connFromContext(r); c != nil {
		if t, why, ok := c.classifyRaw(r); ok {
			return t, why
		}
	}
	return ClassifyParsed(r)
}

// ClassifyParsed classifies from the parsed request only (no raw bytes); it
// does not count. Exposed for callers that have no Conn.
func ClassifyParsed(r *http.Request) (Tier, Reason) {
	if r.ProtoMajor >= 2 {
		return Compliant, ReasonCompliant
	}
	s := state{unordered: true}
	version := r.Proto
	if len(trimOWS(version)) == 0 {
		version = "HTTP/0.9"
	}
	nTE, nCL := len(r.TransferEncoding), 0
	for name, vs := range r.Header {
		for _, v := range vs {
			switch headerPass1(&s, name, v) {
			case kindTE:
				nTE++
			case kindCL:
				nCL++
			}
		}
	}
	if (nTE > 0 || nCL > 0) && !versionBlocksFraming(&s, version, nTE, nCL) {
		var f framing
		// Go removed the Transfer-Encoding header and kept the codings here.
		for _, te := range r.TransferEncoding {
			addTE(&f, &s, te)
		}
		if nTE > len(r.TransferEncoding) {
			for name, vs := range r.Header {
				for _, v := range vs {
					if k, _ := headerKind(name, v, nil); k == kindTE {
						addTE(&f, &s, v)
					}
				}
			}
		}
		if nCL > 0 {
			for name, vs := range r.Header {
				for _, v := range vs {
					if k, _ := headerKind(name, v, nil); k == kindCL {
						addCL(&f, &s, v)
					}
				}
			}
		}
		f.finish(&s, isBodyless(r.Method))
	}
	checkMethod(&s, r.Method)
	checkVersion(&s, version)
	checkURI(&s, r.RequestURI)
	return s.tier, s.reason
}
