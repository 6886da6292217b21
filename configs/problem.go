package configs

import (
	"sort"
	"strconv"
	"strings"
)

// Problem is one thing wrong with a configuration. Its Error text is one line:
//
//	FILE:LINE: PATH ("NAME"): MESSAGE
//
// LINE (and COL, for syntax errors) are omitted when unknown, PATH and NAME when the problem
// is not inside a named object. Callers (the admin API, tests) inspect the fields.
type Problem struct {
	File    string // the configuration file's name as given to Load
	Line    int    // 1-based; 0 when unknown
	Col     int    // 1-based; set for syntax errors only
	Path    string // object the problem is in, e.g. "listeners[2]" or "listeners[2].rules[0]"
	Name    string // name of the enclosing listener, group, certificate or authority
	Field   string // full path of the offending field, e.g. "listeners[2].rules[0].paths[1]"
	Message string // what is wrong and what to do
}

func (p *Problem) Error() string {
	var b strings.Builder
	b.Grow(len(p.File) + len(p.Path) + len(p.Name) + len(p.Message) + 24)
	if p.File != "" {
		b.WriteString(p.File)
	} else {
		b.WriteString("config")
	}
	if p.Line > 0 {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(p.Line))
		if p.Col > 0 {
			b.WriteByte(':')
			b.WriteString(strconv.Itoa(p.Col))
		}
	}
	b.WriteString(": ")
	if p.Path != "" {
		b.WriteString(p.Path)
		if p.Name != "" {
			b.WriteString(" (")
			b.WriteString(strconv.Quote(p.Name))
			b.WriteByte(')')
		}
		b.WriteString(": ")
	}
	b.WriteString(p.Message)
	// One problem, one line: user text is quoted in messages, but a key may hold a newline.
	return strings.NewReplacer("\n", `\n`, "\r", `\r`).Replace(b.String())
}

// ValidationError is every problem found in one configuration, in file order. Its Error text is
// the problems' lines joined by "\n" (as errors.Join would), and Unwrap exposes each *Problem,
// so errors.As(err, &p) with p *Problem finds the first one.
type ValidationError struct {
	Problems []*Problem
}

func (e *ValidationError) Error() string {
	var b strings.Builder
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(p.Error())
	}
	return b.String()
}

// Unwrap returns the problems as errors.
func (e *ValidationError) Unwrap() []error {
	errs := make([]error, len(e.Problems))
	for i, p := range e.Problems {
		errs[i] = p
	}
	return errs
}

// sortProblems orders problems by line; problems without a line keep their place at the front.
func sortProblems(ps []*Problem) {
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Line < ps[j].Line })
}
