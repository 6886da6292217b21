package configs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"sync"

	"github.com/BurntSushi/toml"
)

// LoadFile reads, decodes, defaults and validates a configuration file. Relative paths in it
// resolve against the file's directory (Config.Resolve).
func LoadFile(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Load(path, b)
}

// Load decodes configuration bytes strictly (unknown keys are errors), applies defaults,
// validates and returns the configuration, or nil and a *ValidationError listing every problem.
// name is the file name used in messages; its directory anchors relative paths. Load is a pure
// function: it touches nothing outside the returned value.
func Load(name string, b []byte) (*Config, error) {
	raw := string(b)
	var c Config
	c.File = name
	md, err := toml.Decode(raw, &c)
	if err != nil {
		// c is half decoded (in map order): take names from a lenient decode of just the names.
		names := namesOnly(raw)
		return nil, &ValidationError{Problems: []*Problem{decodeProblem(name, raw, &names, err)}}
	}
	if name != "" {
		dir := filepath.Dir(name)
		if abs, err := filepath.Abs(dir); err == nil {
			dir = abs
		}
		c.dir = dir
	}
	unknown := unknownKeys(&c, raw, md.Keys())
	err = c.validate(raw)
	if len(unknown) == 0 {
		if err != nil {
			return nil, err
		}
		return &c, nil
	}
	var ve *ValidationError
	if errors.As(err, &ve) {
		unknown = append(unknown, ve.Problems...)
	}
	sortProblems(unknown)
	return nil, &ValidationError{Problems: unknown}
}

type named struct {
	Name any `toml:"name"`
}

// namesOnly decodes only the names of the named objects, for messages about a file that does
// not decode as a whole.
func namesOnly(raw string) Config {
	var n struct {
		Authorities  []named `toml:"authorities"`
		Certificates []named `toml:"certificates"`
		TargetGroups []named `toml:"target_groups"`
		Listeners    []named `toml:"listeners"`
	}
	var c Config
	if _, err := toml.Decode(raw, &n); err != nil {
		return c
	}
	str := func(v any) string { s, _ := v.(string); return s }
	for _, e := range n.Authorities {
		c.Authorities = append(c.Authorities, Authority{Name: str(e.Name)})
	}
	for _, e := range n.Certificates {
		c.Certificates = append(c.Certificates, Certificate{Name: str(e.Name)})
	}
	for _, e := range n.TargetGroups {
		c.TargetGroups = append(c.TargetGroups, TargetGroup{Name: str(e.Name)})
	}
	for _, e := range n.Listeners {
		c.Listeners = append(c.Listeners, Listener{Name: str(e.Name)})
	}
	return c
}

// ---- strict keys

type schemaNode struct {
	fields map[string]reflect.Type // exact toml tag -> field type
}

var schemaCache sync.Map // reflect.Type -> *schemaNode

func schemaOf(t reflect.Type) *schemaNode {
	if n, ok := schemaCache.Load(t); ok {
		return n.(*schemaNode)
	}
	n := &schemaNode{fields: make(map[string]reflect.Type)}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if !f.IsExported() || tag == "-" || tag == "" {
			continue
		}
		n.fields[tag] = f.Type
	}
	schemaCache.Store(t, n)
	return n
}

// elemType looks through pointers and slices to what one TOML table or value decodes into.
func elemType(t reflect.Type) reflect.Type {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		t = t.Elem()
	}
	return t
}

// unknownKeys walks every key the file defines through the schema with exact (case-sensitive)
// names. BurntSushi/toml matches struct fields case-insensitively and treats keys inside custom
// unmarshalers as decoded, so MetaData.Undecoded alone would let "Name" or a typo inside
// forward = [{ grup = "x" }] through.
func unknownKeys(c *Config, raw string, keys []toml.Key) []*Problem {
	root := reflect.TypeOf(Config{})
	reported := make(map[string]bool)
	var probs []*Problem
	var li *lineIndex
	for _, k := range keys {
		t := root
		for i, comp := range k {
			t = elemType(t)
			if t.Kind() == reflect.Map || t.Kind() == reflect.Interface {
				break // free-form keys (headers, query, port = ...)
			}
			if t.Kind() != reflect.Struct {
				break // a table where a scalar belongs: decoding already failed on it
			}
			n := schemaOf(t)
			ft, ok := n.fields[comp]
			if ok {
				t = ft
				continue
			}
			bad := strings.Join(k[:i+1], ".")
			if reported[bad] {
				break
			}
			reported[bad] = true
			if li == nil {
				li = buildLineIndex(raw)
			}
			msg := fmt.Sprintf("unknown key %q%s", comp, suggestKey(comp, n))
			entries := li.all(bad)
			if len(entries) == 0 {
				entries = []indexEntry{{path: bad}}
			}
			for _, e := range entries {
				obj, name := objectOf(c, parentPath(e.path))
				probs = append(probs, &Problem{File: c.File, Line: e.line, Path: obj, Name: name, Field: e.path, Message: msg})
			}
			break
		}
	}
	return probs
}

func suggestKey(key string, n *schemaNode) string {
	m := make(map[string]bool, len(n.fields))
	for k := range n.fields {
		m[k] = true
	}
	if s := suggest(strings.ToLower(key), m); s != "" {
		return s
	}
	names := make([]string, 0, len(n.fields))
	for k := range n.fields {
		names = append(names, k)
	}
	sort.Strings(names)
	if len(names) > 12 {
		return ""
	}
	return " (known keys: " + strings.Join(names, ", ") + ")"
}

// objectOf maps an indexed path to the object problems are reported against and its name:
// "listeners[2].rules[0].redirect" -> "listeners[2].rules[0]", the listener's name.
func objectOf(c *Config, path string) (obj, name string) {
	top, rest, _ := strings.Cut(path, ".")
	i := strings.IndexByte(top, '[')
	if i < 0 {
		return top, ""
	}
	n := idxOf(top)
	switch top[:i] {
	case "listeners":
		name = nameAt(c.Listeners, n)
	case "target_groups":
		name = nameAt(c.TargetGroups, n)
	case "certificates":
		name = nameAt(c.Certificates, n)
	case "authorities":
		name = nameAt(c.Authorities, n)
	}
	obj = top
	if strings.HasPrefix(rest, "rules[") {
		r, _, _ := strings.Cut(rest, ".")
		obj += "." + r
	}
	return obj, name
}

// ---- decode errors

var decodeErrRE = regexp.MustCompile(`^toml: (?:line (\d+) )?\(last key "(.*)"\): (.*)$`)
var mismatchRE = regexp.MustCompile(`^type mismatch for \S+: expected (\w+) but found (\S+)$`)
var incompatibleRE = regexp.MustCompile(`^incompatible types: TOML value has type (\S+); destination has type (.+)$`)

// decodeProblem turns a toml syntax or type error into a Problem with the best position known.
func decodeProblem(name, raw string, c *Config, err error) *Problem {
	p := &Problem{File: name}
	var pe toml.ParseError
	if errors.As(err, &pe) {
		p.Line, p.Col = pe.Position.Line, pe.Position.Col
		p.Message = pe.Message
		// A ParseError is either a syntax error (position exact) or a value the decoder could not
		// store (position of the last element with that key). Only the latter parses as plain TOML.
		var m map[string]any
		if pe.LastKey != "" {
			if _, err := toml.Decode(raw, &m); err == nil {
				if field := locate(p, raw, c, pe.LastKey, 0); field != "" {
					p.Message = lastComponent(field) + ": " + pe.Message
				}
			}
		}
		return p
	}
	m := decodeErrRE.FindStringSubmatch(err.Error())
	if m == nil {
		p.Message = strings.TrimPrefix(err.Error(), "toml: ")
		return p
	}
	key, msg := m[2], m[3]
	if m[1] != "" {
		fmt.Sscan(m[1], &p.Line)
	}
	var kind byte
	if im := incompatibleRE.FindStringSubmatch(msg); im != nil {
		kind = kindOf(im[1])
		msg = fmt.Sprintf("must be %s, not %s", article(im[2]), article(kindName(kind, im[1])))
	} else if im := mismatchRE.FindStringSubmatch(msg); im != nil {
		kind = kindOf(im[2])
		msg = fmt.Sprintf("must be %s, not %s", article(im[1]), article(kindName(kind, im[2])))
	}
	p.Message = msg
	if field := locate(p, raw, c, key, kind); field != "" {
		p.Message = lastComponent(field) + " " + msg
	} else {
		p.Message = key + " " + msg
	}
	return p
}

// locate finds the indexed path of a decode error's key (the first occurrence of that kind)
// and sets the problem's line and object from it.
func locate(p *Problem, raw string, c *Config, key string, kind byte) string {
	li := buildLineIndex(raw)
	e, ok := li.find(key, kind)
	if !ok {
		if e, ok = li.find(key, 0); !ok {
			return ""
		}
	}
	p.Line, p.Col = e.line, 0
	p.Field = e.path
	p.Path, p.Name = objectOf(c, parentPath(e.path))
	return e.path
}

func lastComponent(path string) string {
	obj, _ := objectOf(&Config{}, parentPath(path))
	rel := strings.TrimPrefix(strings.TrimPrefix(path, obj), ".")
	if rel == "" {
		return path
	}
	return rel
}

func kindOf(goType string) byte {
	switch goType {
	case "string":
		return 's'
	case "int64":
		return 'i'
	case "float64":
		return 'f'
	case "bool":
		return 'b'
	case "[]any", "[]map[string]any":
		return 'a'
	case "map[string]any":
		return 't'
	}
	return 'd'
}

func kindName(k byte, fallback string) string {
	switch k {
	case 's':
		return "string"
	case 'i':
		return "integer"
	case 'f':
		return "float"
	case 'b':
		return "boolean"
	case 'a':
		return "array"
	case 't':
		return "table"
	case 'd':
		return "date/time"
	}
	return fallback
}

func article(t string) string {
	switch t {
	case "map":
		t = "table"
	case "slice":
		t = "array"
	}
	if t != "" && strings.ContainsRune("aeiou", rune(t[0])) {
		return "an " + t
	}
	return "a " + t
}
