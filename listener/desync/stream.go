package desync

import "bytes"

// Classifier is the analyser driven line by line by a parser that is reading the head anyway:
// the HTTP/1 engine (listener/h1) feeds it while it splits the head into fields, so the bytes that
// are classified are exactly the bytes that are routed and forwarded, and the head is walked
// once. ClassifyRaw and the raw-head sniffer use it too: there is one set of rules.
//
// Use: Reset, RequestLine, then for every following line LineEnd and Fold or Field, then Finish
// with the fields Field returned (in order). It does not allocate.
type Classifier struct {
	s          state
	nTE, nCL   int
	terminated bool
}

// FieldKind says whether a field takes part in message framing as the analyser sees it.
type FieldKind uint8

const (
	// KindOther is any field that does not frame the body.
	KindOther FieldKind = iota
	// KindTE is Transfer-Encoding, by its exact name (any case).
	KindTE
	// KindCL is Content-Length, by its exact name (any case).
	KindCL
	// KindLookalikeTE is a name made of the letters of Transfer-Encoding with other
	// delimiters ("Transfer_Encoding", "Transfer-Encoding\x0b"): never framing here, but some
	// engine may read it as framing, so it must never be forwarded.
	KindLookalikeTE
	// KindLookalikeCL is the same for Content-Length.
	KindLookalikeCL
)

// Field is one header line of a request head as split by its parser: the name before the first
// colon (untrimmed), the value after it (untrimmed), and what the classifier made of it.
type Field struct {
	Name, Value []byte
	Kind        FieldKind
	NoColon     bool // the line had no colon: Name is the whole line, Value empty
}

// Reset starts a new head.
func (c *Classifier) Reset() { *c = Classifier{} }

// RequestLine records the first line (without its line end) and returns its parts, split as
// upstream splits them: the method up to the first space, the version after the last space
// (trailing non-token bytes aside), the target between. A line without a version is HTTP/0.9
// (version empty).
func (c *Classifier) RequestLine(line []byte, crlf bool) (method, uri, version []byte) {
	if !crlf {
		c.s.up(Acceptable, ReasonNonCrLfLineTermination)
	}
	method, rest, hasSP := bytes.Cut(line, []byte(" "))
	if !hasSP {
		c.s.up(Ambiguous, ReasonMissingUri)
		return method, nil, nil
	}
	before, tok, partial := lastToken(rest)
	switch {
	case partial && bytes.HasPrefix(tok, []byte("HTTP/1.")), !partial && len(before) == 0 && len(tok) == 0:
		c.s.up(Ambiguous, ReasonMissingUri)
		return method, nil, tok
	case partial:
		return method, tok, nil // no version: HTTP/0.9
	}
	if bytes.Contains(before, []byte(" HTTP/")) {
		// "GET /a HTTP/1.1 HTTP/1.1": a version inside the target. Upstream reads the target as
		// ending at the first space, so the version is "HTTP/1.1 HTTP/1.1" (severe); read as a
		// target with a space, it would be forwarded, percent-encoded, as only acceptable.
		c.s.up(Severe, ReasonBadVersion)
	}
	return method, before, tok
}

// LineEnd records how a header line (or the empty line) ended.
func (c *Classifier) LineEnd(crlf bool) {
	if !crlf {
		c.s.up(Acceptable, ReasonNonCrLfLineTermination)
	}
}

// Fold records an obs-fold continuation line (severe: see obsFoldTier).
func (c *Classifier) Fold() { c.s.up(obsFoldTier, ReasonMultilineHeader) }

// Terminated records the empty line that ends the head.
func (c *Classifier) Terminated() { c.terminated = true }

// Field classifies one header line (without its line end) and returns it split.
func (c *Classifier) Field(line []byte) Field {
	name, value, found := bytes.Cut(line, []byte(":"))
	if !found {
		c.s.up(Ambiguous, ReasonMissingHeaderColon)
	}
	f := Field{Name: name, Value: value, NoColon: !found}
	k, _, look := fieldKind(name, value, &c.s)
	switch {
	case k == kindTE && look:
		f.Kind = KindLookalikeTE
	case k == kindCL && look:
		f.Kind = KindLookalikeCL
	case k == kindTE:
		f.Kind = KindTE
	case k == kindCL:
		f.Kind = KindCL
	}
	switch k {
	case kindTE:
		c.nTE++
	case kindCL:
		c.nCL++
	}
	return f
}

// Finish applies the framing, method, version and target rules and returns the verdict. fields
// are the ones Field returned, in order.
func (c *Classifier) Finish(method, uri, version []byte, fields []Field) (Tier, Reason) {
	s := c.s
	if !c.terminated {
		s.up(Ambiguous, ReasonMissingLastEmptyLine)
	}
	if len(trimOWS(version)) == 0 {
		version = []byte("HTTP/0.9")
	}
	if (c.nTE > 0 || c.nCL > 0) && !versionBlocksFraming(&s, version, c.nTE, c.nCL) {
		var f framing
		for i := range fields {
			if k := fields[i].Kind; k == KindTE || k == KindLookalikeTE {
				addTE(&f, &s, fields[i].Value)
			}
		}
		for i := range fields {
			if k := fields[i].Kind; k == KindCL || k == KindLookalikeCL {
				addCL(&f, &s, fields[i].Value)
			}
		}
		f.finish(&s, isBodyless(method))
	}
	checkMethod(&s, method)
	checkVersion(&s, version)
	checkURI(&s, uri)
	return s.tier, s.reason
}

// fieldKind is headerKind that also says whether a framing kind came from a look-alike name.
func fieldKind[T text](name, value T, s *state) (kind int, ht headerTier, lookalike bool) {
	kind, ht = headerKind(name, value, s)
	if kind != kindOther {
		want := teName
		if kind == kindCL {
			want = clName
		}
		lookalike = similar(want, name) != identical
	}
	return kind, ht, lookalike
}
