package configs

import (
	"strconv"
	"strings"
)

// lineIndex maps field paths with array indices ("listeners[2].rules[0].paths[1]") to the line
// they are written on. BurntSushi/toml keeps key positions private and keyed without array
// indices, so this small scanner walks the raw text once more. It runs only after the TOML parser
// accepted the text (or to locate a decode error), and it never fails: on anything it does not
// understand it skips to the end of the line.
type lineIndex struct {
	first   map[string]int // indexed path -> first line it appears on
	entries []indexEntry   // every key, table header and array element in file order
}

type indexEntry struct {
	path string
	line int
	kind byte // 's' string, 'i' integer, 'f' float, 'b' bool, 'd' datetime, 'a' array, 't' table
	elem bool // an element of an array value (not a key of its own)
}

type indexer struct {
	s    string
	pos  int
	line int
	idx  *lineIndex
	aot  map[string]int // indexed path of an array of tables -> elements so far
	elem bool           // the value being recorded is an array element
}

func buildLineIndex(s string) *lineIndex {
	ix := &indexer{s: s, line: 1, idx: &lineIndex{first: make(map[string]int)}, aot: make(map[string]int)}
	ix.run()
	return ix.idx
}

// line returns the line of path, or of its nearest parent that has one; 0 when none does.
func (li *lineIndex) lineOf(path string) int {
	if li == nil {
		return 0
	}
	for path != "" {
		if l, ok := li.first[path]; ok {
			return l
		}
		path = parentPath(path)
	}
	return 0
}

// parentPath strips the last component: "a[1].b" -> "a[1]" -> "a" -> "".
func parentPath(p string) string {
	if strings.HasSuffix(p, "]") {
		if i := strings.LastIndexByte(p, '['); i >= 0 {
			return p[:i]
		}
	}
	if i := strings.LastIndexByte(p, '.'); i >= 0 {
		return p[:i]
	}
	return ""
}

// stripIndices turns "listeners[2].rules[0].paths" into "listeners.rules.paths".
func stripIndices(p string) string {
	if strings.IndexByte(p, '[') < 0 {
		return p
	}
	var b strings.Builder
	depth := 0
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case c == '[':
			depth++
		case c == ']':
			depth--
		case depth == 0:
			b.WriteByte(c)
		}
	}
	return b.String()
}

func (ix *indexer) record(path string, kind byte) {
	if _, ok := ix.idx.first[path]; !ok {
		ix.idx.first[path] = ix.line
	}
	ix.idx.entries = append(ix.idx.entries, indexEntry{path: path, line: ix.line, kind: kind, elem: ix.elem})
}

func join(prefix, key string) string {
	if prefix == "" {
		return key
	}
	return prefix + "." + key
}

func (ix *indexer) eof() bool { return ix.pos >= len(ix.s) }

// skipSpace skips blanks and, when nl, newlines and comments too.
func (ix *indexer) skipSpace(nl bool) {
	for !ix.eof() {
		switch c := ix.s[ix.pos]; c {
		case ' ', '\t', '\r':
			ix.pos++
		case '\n':
			if !nl {
				return
			}
			ix.line++
			ix.pos++
		case '#':
			if !nl {
				return
			}
			ix.skipLine()
		default:
			return
		}
	}
}

// skipLine moves to the start of the next line.
func (ix *indexer) skipLine() {
	for !ix.eof() && ix.s[ix.pos] != '\n' {
		ix.pos++
	}
	if !ix.eof() {
		ix.pos++
		ix.line++
	}
}

func (ix *indexer) run() {
	prefix := ""
	for steps := 0; ; steps++ {
		ix.skipSpace(true)
		if ix.eof() {
			return
		}
		start := ix.pos
		if ix.s[ix.pos] == '[' {
			aot := strings.HasPrefix(ix.s[ix.pos:], "[[")
			if aot {
				ix.pos += 2
			} else {
				ix.pos++
			}
			keys := ix.key()
			ix.elem = false
			prefix = ix.header(keys, aot)
			ix.record(prefix, 't')
			ix.skipLine()
		} else {
			keys := ix.key()
			ix.skipSpace(false)
			if len(keys) == 0 || ix.eof() || ix.s[ix.pos] != '=' {
				ix.skipLine()
			} else {
				ix.pos++
				ix.skipSpace(false)
				ix.elem = false
				ix.value(join(prefix, strings.Join(keys, ".")))
			}
		}
		if ix.pos == start { // never loop without progress
			ix.skipLine()
		}
	}
}

// header resolves a [table] or [[array]] header to its indexed path.
func (ix *indexer) header(keys []string, aot bool) string {
	p := ""
	for i, k := range keys {
		if i > 0 {
			if _, ok := ix.idx.first[p]; !ok { // [a.b] also defines a
				ix.record(p, 't')
			}
		}
		p = join(p, k)
		if aot && i == len(keys)-1 {
			n := ix.aot[p]
			ix.aot[p] = n + 1
			p += "[" + strconv.Itoa(n) + "]"
		} else if n := ix.aot[p]; n > 0 {
			p += "[" + strconv.Itoa(n-1) + "]"
		}
	}
	return p
}

// key reads a dotted key: bare, "basic" or 'literal' parts.
func (ix *indexer) key() []string {
	var keys []string
	for {
		ix.skipSpace(false)
		if ix.eof() {
			return keys
		}
		switch c := ix.s[ix.pos]; {
		case c == '"' || c == '\'':
			keys = append(keys, ix.str())
		case isBareKey(c):
			st := ix.pos
			for !ix.eof() && isBareKey(ix.s[ix.pos]) {
				ix.pos++
			}
			keys = append(keys, ix.s[st:ix.pos])
		default:
			return keys
		}
		ix.skipSpace(false)
		if ix.eof() || ix.s[ix.pos] != '.' {
			return keys
		}
		ix.pos++
	}
}

func isBareKey(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// str reads a string of any of the four kinds and returns its (roughly unescaped) content.
func (ix *indexer) str() string {
	q := ix.s[ix.pos]
	triple := strings.HasPrefix(ix.s[ix.pos:], string([]byte{q, q, q}))
	if triple {
		ix.pos += 3
	} else {
		ix.pos++
	}
	var b strings.Builder
	for !ix.eof() {
		c := ix.s[ix.pos]
		switch {
		case c == '\\' && q == '"':
			if ix.pos+1 < len(ix.s) {
				if ix.s[ix.pos+1] == '\n' {
					ix.line++
				}
				b.WriteByte(ix.s[ix.pos+1])
			}
			ix.pos += 2
			continue
		case c == '\n':
			ix.line++
			if !triple { // unterminated: stop at the line end
				return b.String()
			}
		case c == q:
			if !triple {
				ix.pos++
				return b.String()
			}
			if strings.HasPrefix(ix.s[ix.pos:], string([]byte{q, q, q})) {
				ix.pos += 3
				for !ix.eof() && ix.s[ix.pos] == q { // up to two quotes may end the content
					ix.pos++
				}
				return b.String()
			}
		}
		b.WriteByte(c)
		ix.pos++
	}
	return b.String()
}

// list reads an array or inline table from its opening bracket to close, calling part for
// each element (i counts them) and stepping over the commas. A part that reads nothing is
// garbage: one byte of it is skipped, so that the scan always progresses.
func (ix *indexer) list(close byte, part func(i int)) {
	ix.pos++
	for i := 0; ; i++ {
		ix.skipSpace(true)
		if ix.eof() {
			return
		}
		if ix.s[ix.pos] == close {
			ix.pos++
			return
		}
		st := ix.pos
		part(i)
		ix.skipSpace(true)
		if !ix.eof() && ix.s[ix.pos] == ',' {
			ix.pos++
		} else if ix.pos == st {
			ix.pos++
		}
	}
}

// value reads one value at path, recording it and, for arrays and inline tables, its parts.
func (ix *indexer) value(path string) {
	if ix.eof() {
		return
	}
	switch c := ix.s[ix.pos]; c {
	case '"', '\'':
		ix.record(path, 's')
		ix.str()
	case '[':
		ix.record(path, 'a')
		ix.list(']', func(i int) {
			ix.elem = true
			ix.value(path + "[" + strconv.Itoa(i) + "]")
		})
	case '{':
		ix.record(path, 't')
		ix.list('}', func(int) {
			keys := ix.key()
			ix.skipSpace(true)
			if len(keys) > 0 && !ix.eof() && ix.s[ix.pos] == '=' {
				ix.pos++
				ix.skipSpace(true)
				ix.elem = false
				ix.value(join(path, strings.Join(keys, ".")))
			}
		})
	default:
		st := ix.pos
		for !ix.eof() {
			c := ix.s[ix.pos]
			if c == ',' || c == ']' || c == '}' || c == '\n' || c == '#' {
				break
			}
			ix.pos++
		}
		ix.record(path, scalarKind(strings.TrimSpace(ix.s[st:ix.pos])))
	}
}

func scalarKind(v string) byte {
	switch {
	case v == "true" || v == "false":
		return 'b'
	case strings.HasSuffix(v, "inf") || strings.HasSuffix(v, "nan"):
		return 'f'
	case len(v) >= 5 && v[4] == '-' || len(v) >= 3 && v[2] == ':':
		return 'd'
	case strings.HasPrefix(v, "0x") || strings.HasPrefix(v, "0o") || strings.HasPrefix(v, "0b"):
		return 'i'
	case strings.ContainsAny(v, ".eE"):
		return 'f'
	}
	return 'i'
}

// find returns the first entry whose index-free path is key (and whose kind is kind, unless 0).
func (li *lineIndex) find(key string, kind byte) (indexEntry, bool) {
	for _, e := range li.entries {
		if !e.elem && (kind == 0 || e.kind == kind) && stripIndices(e.path) == key {
			return e, true
		}
	}
	return indexEntry{}, false
}

// all returns every entry whose index-free path is key.
func (li *lineIndex) all(key string) []indexEntry {
	var out []indexEntry
	for _, e := range li.entries {
		if !e.elem && stripIndices(e.path) == key {
			out = append(out, e)
		}
	}
	return out
}
