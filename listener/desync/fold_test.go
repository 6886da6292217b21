package desync

import "testing"

// TestFoldedFramingIsSevere: a folded Transfer-Encoding or Content-Length is obs-fold like any
// other folded field (severe: 400 and close in defensive and strictest), not an unverifiable
// request that defensive mode forwards.
func TestFoldedFramingIsSevere(t *testing.T) {
	heads := []string{
		"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n 5\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n \r\n\r\n",
	}
	for _, h := range append(heads, "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\t\r\n\r\n") {
		if tier, why := ClassifyRaw([]byte(h)); tier != Severe || why != ReasonMultilineHeader {
			t.Errorf("ClassifyRaw(%q) = %v/%v, want Severe/MultilineHeader", h, tier, why)
		}
	}
	for _, m := range []Mode{Defensive, Strictest} {
		ts := startServer(t, m)
		for _, h := range heads {
			o := send(ts.addr, "POST", h)
			if o.err != nil || o.status != 400 || o.tier != "Severe" || o.reason != "MultilineHeader" || !o.closed {
				t.Errorf("%v %q: %+v, want 400 Severe/MultilineHeader and close", m, h, o)
			}
		}
	}
}
