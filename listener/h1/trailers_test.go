package h1

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"testing/iotest"
)

// TestCopyChunkedTrailers: the body comes out unchunked, each trailer field is handed over in
// order (also when the section arrives a byte at a time, so fields straddle reads), and bad
// framing in the trailer section fails as it does in CopyBody.
func TestCopyChunkedTrailers(t *testing.T) {
	cases := []struct {
		name, in, body, trailers string
		err                      error
	}{
		{"none", "5\r\nhello\r\n0\r\n\r\n", "hello", "", nil},
		{"two", "3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-A: 1\r\nx-b:  two words \r\n\r\n", "abcde", "X-A=1|x-b=two words|", nil},
		{"empty value", "0\r\nX-A:\r\n\r\n", "", "X-A=|", nil},
		{"no colon", "0\r\nX-A\r\n\r\n", "", "", ErrBadChunk},
		{"bad name", "0\r\nX A: 1\r\n\r\n", "", "", ErrBadChunk},
		{"bare LF", "0\r\nX-A: 1\n\r\n", "", "", ErrBadChunk},
		{"CR in value", "0\r\nX-A: 1\r2\r\n\r\n", "", "", ErrBadChunk},
		{"section too large", "0\r\n" + strings.Repeat("X-A: "+strings.Repeat("v", 1000)+"\r\n", 20) + "\r\n", "", "", ErrBadChunk},
		{"cut in trailers", "0\r\nX-A: 1\r\n", "", "X-A=1|", ErrShortBody},
	}
	for _, tc := range cases {
		for _, slow := range []bool{false, true} {
			var src *Reader
			if slow {
				src = NewReader(iotest.OneByteReader(strings.NewReader(tc.in)))
			} else {
				src = NewReader(strings.NewReader(tc.in))
			}
			var out bytes.Buffer
			dst := NewWriter(&out)
			var got strings.Builder
			n, err := CopyChunkedTrailers(dst, src, func(name, value []byte) {
				got.Write(name)
				got.WriteByte('=')
				got.Write(value)
				got.WriteByte('|')
			})
			dst.Flush()
			if !errors.Is(err, tc.err) {
				t.Errorf("%s (slow=%v): error %v, want %v", tc.name, slow, err, tc.err)
				continue
			}
			if err != nil {
				continue
			}
			if out.String() != tc.body || n != int64(len(tc.body)) {
				t.Errorf("%s (slow=%v): body %q (%d), want %q", tc.name, slow, out.String(), n, tc.body)
			}
			if got.String() != tc.trailers {
				t.Errorf("%s (slow=%v): trailers %q, want %q", tc.name, slow, got.String(), tc.trailers)
			}
		}
	}
}
