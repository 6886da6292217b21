package router

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

// refMatch is the reference matcher: dynamic programming over (pattern offset, subject offset),
// straight from the definition ('*' any run of bytes, '?' one byte, else equal, ASCII folding).
func refMatch(p, s string, fold bool) bool {
	if fold {
		p, s = asciiLowerRef(p), asciiLowerRef(s)
	}
	// ok[j] = p[i:] matches s[j:], computed for i from len(p) down to 0.
	ok := make([]bool, len(s)+1)
	ok[len(s)] = true
	for i := len(p) - 1; i >= 0; i-- {
		next := make([]bool, len(s)+1)
		for j := len(s); j >= 0; j-- {
			switch {
			case p[i] == '*':
				next[j] = ok[j] || j < len(s) && next[j+1]
			case j < len(s) && (p[i] == '?' || p[i] == s[j]):
				next[j] = ok[j+1]
			}
		}
		ok = next
	}
	return ok[0]
}

func asciiLowerRef(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 32
		}
	}
	return string(b)
}

// refDecode percent-decodes a query component the lenient way decodeAt does.
func refDecode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '+':
			b.WriteByte(' ')
		case s[i] == '%' && i+2 < len(s) && strings.ContainsRune("0123456789abcdefABCDEF", rune(s[i+1])) && strings.ContainsRune("0123456789abcdefABCDEF", rune(s[i+2])):
			var v byte
			for _, c := range []byte(s[i+1 : i+3]) {
				v <<= 4
				switch {
				case c <= '9':
					v |= c - '0'
				case c >= 'a':
					v |= c - 'a' + 10
				default:
					v |= c - 'A' + 10
				}
			}
			b.WriteByte(v)
			i += 2
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

// regexpFor is a second reference for ASCII input: the pattern as an anchored regexp.
func regexpFor(p string, fold bool) *regexp.Regexp {
	var b strings.Builder
	b.WriteString("^(?s)")
	if fold {
		b.WriteString("(?i)")
	}
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '*':
			b.WriteString(".*")
		case '?':
			b.WriteString(".")
		default:
			b.WriteString(regexp.QuoteMeta(p[i : i+1]))
		}
	}
	b.WriteString("$")
	return regexp.MustCompile(b.String())
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func TestPatterns(t *testing.T) {
	tests := []struct {
		name    string
		pattern string
		fold    bool
		s       string
		want    bool
	}{
		{"exact", "/a/b", false, "/a/b", true},
		{"exact differs", "/a/b", false, "/a/c", false},
		{"exact is case-sensitive", "/API", false, "/api", false},
		{"star alone matches empty", "*", false, "", true},
		{"star crosses slashes", "/v1/*", false, "/v1/a/b/c", true},
		{"prefix needs the literal", "/v1/*", false, "/v1", false},
		{"prefix allows empty rest", "/v1/*", false, "/v1/", true},
		{"suffix", "*.png", false, "/img/x.png", true},
		{"suffix miss", "*.png", false, "/img/x.pngx", false},
		{"star in middle", "/a/*/c", false, "/a/b/x/c", true},
		{"star in middle, needs both ends", "/a/*/c", false, "/a/c", false},
		{"question is one byte", "/v?", false, "/v1", true},
		{"question is not zero bytes", "/v?", false, "/v", false},
		{"question is not two bytes", "/v?", false, "/v12", false},
		{"double star collapses", "/a/**/b", false, "/a//b", true},
		{"backtracking", "*a*b*c", false, "xxaxxbxxbxxc", true},
		{"backtracking miss", "*a*b*c", false, "xxaxxbxxbxx", false},
		{"many stars no blowup", strings.Repeat("*a", 30) + "*b", false, strings.Repeat("a", 1000), false},
		{"host fold", "api.example.com", true, "API.Example.COM", true},
		{"host wildcard fold", "*.EXAMPLE.com", true, "www.example.COM", true},
		{"host wildcard needs the dot", "*.example.com", true, "example.com", false},
		{"host wildcard multi-label", "*.example.com", true, "a.b.example.com", true},
		{"host question", "ap?.example.com", true, "api.example.com", true},
		{"host question not empty", "ap?.example.com", true, "ap.example.com", false},
		{"fold with question then literal", "?B", true, "ab", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := compilePattern(tc.pattern, tc.fold)
			if got := p.match(tc.s); got != tc.want {
				t.Errorf("compilePattern(%q, %v).match(%q) = %v, want %v (kind %d)", tc.pattern, tc.fold, tc.s, got, tc.want, p.kind)
			}
			if ref := refMatch(tc.pattern, tc.s, tc.fold); ref != tc.want {
				t.Errorf("reference disagrees with the table: %v", ref)
			}
		})
	}
}

func TestPatternLinearTime(t *testing.T) {
	// A pattern that makes naive recursive matchers exponential.
	p := compilePattern(strings.Repeat("*a", 50)+"*b", false)
	s := strings.Repeat("a", 5000)
	start := time.Now()
	if p.match(s) {
		t.Fatal("matched")
	}
	if d := time.Since(start); d > 2*time.Second { // O(p*s) = 500k steps: microseconds in practice
		t.Fatalf("took %v", d)
	}
}

func TestMatchDecoded(t *testing.T) {
	tests := []struct {
		name, pattern, s string
		want             bool
	}{
		{"plain", "2", "2", true},
		{"percent", "a b", "a%20b", true},
		{"plus is space", "a b", "a+b", true},
		{"percent lower hex", "a/b", "a%2fb", true},
		{"bad percent is literal", "100%", "100%", true},
		{"short percent is literal", "%2", "%2", true},
		{"fold", "beta", "BeTa", true},
		{"fold through percent", "a", "%41", true},
		{"wildcard over encoded", "a*z", "a%20%20z", true},
		{"question is one decoded byte", "a?z", "a%20z", true},
		{"question not three raw bytes", "a???z", "a%20z", false},
		{"star backtrack over encoded", "*%", "%25%25", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := compilePattern(tc.pattern, true)
			if got := p.matchDecoded(tc.s); got != tc.want {
				t.Errorf("matchDecoded(%q, %q) = %v, want %v", tc.pattern, tc.s, got, tc.want)
			}
		})
	}
}

func TestNormalizeHost(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"already normal", "example.com", "example.com"},
		{"upper", "WWW.Example.COM", "www.example.com"},
		{"port", "example.com:8443", "example.com"},
		{"trailing dot", "example.com.", "example.com"},
		{"dot and port", "Example.COM.:443", "example.com"},
		{"empty port", "example.com:", "example.com"},
		{"ipv6 with port", "[::1]:8080", "[::1]"},
		{"ipv6 without port", "[::1]", "[::1]"},
		{"bare ipv6 untouched", "::1", "::1"},
		{"ipv4 with port", "192.0.2.1:80", "192.0.2.1"},
		{"non-numeric port kept", "example.com:abc", "example.com:abc"},
		{"empty", "", ""},
		{"non-ascii kept", "ÉXAMPLE.com", "Éxample.com"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := NormalizeHost(tc.in); got != tc.want {
				t.Errorf("NormalizeHost(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
	for _, in := range []string{"example.com", "example.com:443", "example.com."} {
		if n := testing.AllocsPerRun(100, func() { _ = NormalizeHost(in) }); n != 0 {
			t.Errorf("NormalizeHost(%q) allocates %v times", in, n)
		}
	}
}

func checkPattern(t *testing.T, p, s string, fold bool) {
	if len(p) > 64 || len(s) > 256 {
		return
	}
	pt := compilePattern(p, fold)
	got := pt.match(s)
	if want := refMatch(p, s, fold); got != want {
		t.Fatalf("match(%q, %q, fold=%v) = %v, reference %v", p, s, fold, got, want)
	}
	if isASCII(p) && isASCII(s) {
		if want := regexpFor(p, fold).MatchString(s); got != want {
			t.Fatalf("match(%q, %q, fold=%v) = %v, regexp %v", p, s, fold, got, want)
		}
	}
}

func FuzzHostPattern(f *testing.F) {
	for _, s := range [][2]string{
		{"*.example.com", "www.example.com"}, {"*.example.com", "example.com"}, {"ap?.x", "API.X"},
		{"*", ""}, {"a*b*c", "aXbYc"}, {"**", "x"}, {"?*?", "ab"}, {"EXAMPLE.com", "example.COM"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, p, s string) {
		checkPattern(t, p, s, true)
		// Host matching as MatchHTTP does it: the host is trimmed, the pattern loses one dot.
		h := trimHost(s)
		if NormalizeHost(s) != asciiLowerRef(h) {
			t.Fatalf("NormalizeHost(%q) = %q, want %q", s, NormalizeHost(s), asciiLowerRef(h))
		}
	})
}

func FuzzPathPattern(f *testing.F) {
	for _, s := range [][2]string{
		{"/v1/*", "/v1/users"}, {"/a/*/c", "/a/b/c"}, {"*.png", "/x.PNG"}, {"/v?", "/v1"},
		{"*a*a*a*b", "aaaaaaaaaaaa"}, {"/", "/"}, {"*", "/anything"}, {"/a?c*", "/abcdef"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, p, s string) {
		checkPattern(t, p, s, false)
	})
}

func FuzzQueryPattern(f *testing.F) {
	for _, s := range [][2]string{
		{"a b", "a+b"}, {"a b", "a%20b"}, {"*%", "%25"}, {"x?z", "x%zz"}, {"100%", "100%"}, {"*", ""},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, p, s string) {
		if len(p) > 64 || len(s) > 256 {
			return
		}
		pt := compilePattern(p, true)
		got := pt.matchDecoded(s)
		if want := refMatch(p, refDecode(s), true); got != want {
			t.Fatalf("matchDecoded(%q, %q) = %v, reference %v (decoded %q)", p, s, got, want, refDecode(s))
		}
	})
}
