package h2

import (
	"io"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// HTTPHandler serves each stream with an http.Handler: the bridge from this engine to a request
// core written against net/http's types. The engine still owns framing, flow control, limits and
// the attack bounds; what costs here is the request and header map the bridge builds, which a
// core that reads Stream directly avoids.
func HTTPHandler(h http.Handler) Handler {
	return HandlerFunc(func(s *Stream) {
		req, err := newRequest(s)
		if err != nil {
			s.WriteHead(http.StatusBadRequest, nil, true)
			return
		}
		rw := &responseWriter{s: s, hdr: http.Header{}}
		defer func() {
			if r := recover(); r != nil {
				if r != http.ErrAbortHandler {
					panic(r)
				}
				s.Reset(http2.ErrCodeInternal)
				return
			}
			rw.finish()
		}()
		h.ServeHTTP(rw, req)
	})
}

func newRequest(s *Stream) (*http.Request, error) {
	var u *url.URL
	var err error
	if s.Method == "CONNECT" && s.Protocol == "" {
		u = &url.URL{Host: s.Authority}
	} else if u, err = url.ParseRequestURI(s.Path); err != nil {
		return nil, err
	}
	hdr := make(http.Header, len(s.Header)+1)
	var cookies []string
	for _, f := range s.Header {
		switch f.Name {
		case "cookie":
			// RFC 9113 section 8.2.3: split cookie fields are joined for HTTP/1.1.
			cookies = append(cookies, f.Value)
			continue
		case "host":
			if s.Authority != "" {
				continue
			}
		}
		k := http.CanonicalHeaderKey(f.Name)
		hdr[k] = append(hdr[k], f.Value)
	}
	if len(cookies) > 0 {
		hdr["Cookie"] = []string{strings.Join(cookies, "; ")}
	}
	host := s.Authority
	if host == "" {
		host = hdr.Get("Host")
	}
	hdr.Del("Host")
	req := &http.Request{
		Method:     s.Method,
		URL:        u,
		Proto:      "HTTP/2.0",
		ProtoMajor: 2,
		Header:     hdr,
		Host:       host,
		RequestURI: s.Path,
	}
	ci := s.ConnInfo()
	req.RemoteAddr, req.TLS = ci.RemoteAddr, ci.TLS // shared by the connection's streams, read-only
	if vv := hdr["Trailer"]; len(vv) > 0 {
		req.Trailer = http.Header{}
		for _, v := range vv {
			for _, k := range strings.Split(v, ",") {
				if k = http.CanonicalHeaderKey(strings.TrimSpace(k)); k != "" {
					req.Trailer[k] = nil
				}
			}
		}
	}
	if s.HasBody() {
		req.ContentLength = s.ContentLength
		req.Body = &requestBody{s: s, req: req}
	} else {
		req.Body = http.NoBody
	}
	return req.WithContext(s.Context()), nil
}

// requestBody reads the stream and fills the request's trailers at EOF.
type requestBody struct {
	s    *Stream
	req  *http.Request
	done bool
}

func (b *requestBody) Read(p []byte) (int, error) {
	n, err := b.s.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		for _, f := range b.s.Trailers() {
			if b.req.Trailer == nil {
				b.req.Trailer = http.Header{}
			}
			k := http.CanonicalHeaderKey(f.Name)
			b.req.Trailer[k] = append(b.req.Trailer[k], f.Value)
		}
	}
	return n, err
}

func (b *requestBody) Close() error { return nil }

// responseWriter is an http.ResponseWriter (and Flusher) over a Stream. The head is sent with the
// first body bytes, on Flush, or with END_STREAM when the handler wrote no body.
type responseWriter struct {
	s        *Stream
	hdr      http.Header
	status   int
	headSent bool
	err      error
	fields   []hpack.HeaderField
}

func (w *responseWriter) Header() http.Header { return w.hdr }

func (w *responseWriter) WriteHeader(code int) {
	if w.status != 0 {
		return
	}
	if code >= 100 && code <= 199 && code != 101 {
		w.s.WriteInformational(code, w.headFields(false))
		return
	}
	w.status = code
}

func (w *responseWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if err := w.sendHead(false); err != nil {
		return 0, err
	}
	return w.s.Write(p)
}

// Flush sends the head if it is still pending; written body bytes are already queued for the
// connection's writer, which sends them on its next turn.
func (w *responseWriter) Flush() {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	w.sendHead(false)
}

func (w *responseWriter) sendHead(end bool) error {
	if w.headSent {
		return w.err
	}
	w.headSent = true
	w.err = w.s.WriteHead(w.status, w.headFields(false), end)
	return w.err
}

// finish ends the response after the handler returned: head, trailers or END_STREAM.
func (w *responseWriter) finish() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	trailers := w.trailerFields()
	if !w.headSent {
		if err := w.sendHead(len(trailers) == 0); err != nil || len(trailers) == 0 {
			return
		}
	}
	if w.err != nil {
		return
	}
	if len(trailers) > 0 {
		w.s.WriteTrailers(trailers)
		return
	}
	w.s.WriteData(nil, true)
}

// hopByHop are never sent on HTTP/2 (RFC 9113 section 8.2.2).
func hopByHop(k string) bool {
	switch k {
	case "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// headFields converts the header map to lower-case fields, leaving out hop-by-hop fields and
// trailers announced with http.TrailerPrefix.
func (w *responseWriter) headFields(_ bool) []hpack.HeaderField {
	w.fields = w.fields[:0]
	for k, vv := range w.hdr {
		if hopByHop(k) || strings.HasPrefix(k, http.TrailerPrefix) {
			continue
		}
		name := strings.ToLower(k)
		for _, v := range vv {
			w.fields = append(w.fields, hpack.HeaderField{Name: name, Value: v})
		}
	}
	return w.fields
}

// trailerFields collects the trailers: the keys announced in "Trailer" and any key set with
// http.TrailerPrefix.
func (w *responseWriter) trailerFields() []hpack.HeaderField {
	var out []hpack.HeaderField
	for _, v := range w.hdr["Trailer"] {
		for _, k := range strings.Split(v, ",") {
			k = http.CanonicalHeaderKey(strings.TrimSpace(k))
			for _, val := range w.hdr[k] {
				out = append(out, hpack.HeaderField{Name: strings.ToLower(k), Value: val})
			}
		}
	}
	for k, vv := range w.hdr {
		if !strings.HasPrefix(k, http.TrailerPrefix) {
			continue
		}
		name := strings.ToLower(strings.TrimPrefix(k, http.TrailerPrefix))
		for _, v := range vv {
			out = append(out, hpack.HeaderField{Name: name, Value: v})
		}
	}
	return out
}

var _ http.Flusher = (*responseWriter)(nil)
