package h2

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// decodeBoth decodes one header block split into HEADERS + CONTINUATION frames of at most
// split bytes, with x/net's Framer (ReadMetaHeaders: what the reader used before headerBlock)
// and with headerBlock, and describes each outcome: the error's kind and code, or the fields
// and whether the list was truncated.
func decodeBoth(block []byte, split int, max uint32) (theirs, ours string) {
	var wire bytes.Buffer
	w := http2.NewFramer(&wire, nil)
	first := block
	if len(first) > split {
		first = first[:split]
	}
	rest := block[len(first):]
	w.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: first, EndStream: true, EndHeaders: len(rest) == 0})
	for len(rest) > 0 {
		frag := rest[:min(split, len(rest))]
		rest = rest[len(frag):]
		w.WriteContinuation(1, len(rest) == 0, frag)
	}
	raw := wire.Bytes()

	describe := func(f *http2.MetaHeadersFrame, err error) string {
		var se http2.StreamError
		var ce http2.ConnectionError
		switch {
		case errors.As(err, &se):
			return fmt.Sprintf("stream error %v", se.Code)
		case errors.As(err, &ce):
			return fmt.Sprintf("connection error %v", http2.ErrCode(ce))
		case err != nil:
			return "error " + err.Error()
		}
		return fmt.Sprintf("truncated=%v %q", f.Truncated, f.Fields)
	}

	fr := http2.NewFramer(nil, bytes.NewReader(raw))
	fr.MaxHeaderListSize = max
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	f, err := fr.ReadFrame()
	mh, _ := f.(*http2.MetaHeadersFrame)
	theirs = describe(mh, err)

	fr = http2.NewFramer(nil, bytes.NewReader(raw))
	hb := newHeaderBlock(max)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return theirs, describe(nil, err)
		}
		var done bool
		switch f := f.(type) {
		case *http2.HeadersFrame:
			done, err = hb.begin(f)
		case *http2.ContinuationFrame:
			done, err = hb.more(f)
		}
		if err != nil {
			return theirs, describe(nil, err)
		}
		if done {
			return theirs, describe(hb.frame(), nil)
		}
	}
}

func encodeBlock(fields ...hpack.HeaderField) []byte {
	var b bytes.Buffer
	e := hpack.NewEncoder(&b)
	for _, f := range fields {
		e.WriteField(f)
	}
	return b.Bytes()
}

func hf(name, value string) hpack.HeaderField { return hpack.HeaderField{Name: name, Value: value} }

// FuzzHeaderBlock: headerBlock decides every header block as x/net's readMetaFrame does (same
// fields, same truncation, same error kinds and codes), whatever the bytes and however the
// block is split into CONTINUATION frames.
func FuzzHeaderBlock(f *testing.F) {
	req := []hpack.HeaderField{hf(":method", "GET"), hf(":scheme", "https"), hf(":authority", "a.example"), hf(":path", "/x"), hf("user-agent", "u"), hf("cookie", "a=1"), hf("cookie", "b=2")}
	f.Add(encodeBlock(req...), uint8(200), uint16(4096))
	f.Add(encodeBlock(req...), uint8(3), uint16(4096))
	f.Add(encodeBlock(req...), uint8(5), uint16(100)) // truncated
	f.Add(encodeBlock(append(req, hf("trailer", "a, b, c"))...), uint8(255), uint16(300))
	f.Add(encodeBlock(hf(":method", "GET"), hf("x-a", "1"), hf(":path", "/")), uint8(255), uint16(4096)) // pseudo after regular
	f.Add(encodeBlock(hf(":method", "GET"), hf("X-Upper", "1")), uint8(255), uint16(4096))
	f.Add(encodeBlock(hf(":method", "GET"), hf("x-a", "a\r\nb")), uint8(255), uint16(4096))
	f.Add(encodeBlock(hf(":method", "GET"), hf(":method", "GET")), uint8(255), uint16(4096))
	f.Add(encodeBlock(hf(":method", "GET"), hf(":status", "200")), uint8(255), uint16(4096))
	f.Add(encodeBlock(hf(":bogus", "1")), uint8(255), uint16(4096))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff}, uint8(2), uint16(4096)) // bad integer
	f.Add(bytes.Repeat(encodeBlock(hf("x-long", string(bytes.Repeat([]byte("v"), 200)))), 4), uint8(64), uint16(64))
	f.Fuzz(func(t *testing.T, block []byte, split uint8, max uint16) {
		if split == 0 {
			split = 1
		}
		theirs, ours := decodeBoth(block, int(split), uint32(max)+1)
		if theirs != ours {
			t.Fatalf("block %x split %d max %d:\n x/net: %s\n ours:  %s", block, split, max, theirs, ours)
		}
	})
}

// TestKeepFields: streams' fields share slabs without reaching into each other.
func TestKeepFields(t *testing.T) {
	c := &conn{}
	a := c.keepFields([]hpack.HeaderField{hf("a", "1"), hf("b", "2")})
	b := c.keepFields([]hpack.HeaderField{hf("c", "3")})
	a = append(a, hf("z", "9")) // must not overwrite b
	if !reflect.DeepEqual(b, []hpack.HeaderField{hf("c", "3")}) {
		t.Fatalf("b = %v after appending to a", b)
	}
	big := make([]hpack.HeaderField, 100)
	if got := c.keepFields(big); len(got) != 100 {
		t.Fatalf("kept %d of 100 fields", len(got))
	}
	if c.keepFields(nil) != nil {
		t.Fatal("no fields should keep nothing")
	}
}
