// Package echo is the sample back end used by the demo and by tests: it
// answers every request with a JSON description of what it received, plus a
// few endpoints that exercise a proxy (status codes, delays, streaming,
// WebSocket, large bodies).
package echo

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Limits keep a misbehaving client from tying up the back end.
const (
	MaxDelay  = 30 * time.Second
	MaxBytes  = 1 << 30
	MaxStream = 10000
)

// Reply is the JSON body of the default answer.
type Reply struct {
	Backend string              `json:"backend"`
	Method  string              `json:"method"`
	URI     string              `json:"uri"`
	Host    string              `json:"host"`
	Proto   string              `json:"proto"`
	Headers map[string][]string `json:"headers"`
	Remote  string              `json:"remote"`
	TLS     bool                `json:"tls"`
	Body    int64               `json:"body_bytes"`
}

// Handler returns the echo handler for a back end called name.
func Handler(name string) http.Handler {
	mux := http.NewServeMux()
	h := &handler{name: name}
	mux.HandleFunc("/healthz", h.healthz)
	mux.HandleFunc("/status/{code}", h.status)
	mux.HandleFunc("/delay/{d}", h.delay)
	mux.HandleFunc("/stream", h.stream)
	mux.HandleFunc("/ws", h.ws)
	mux.HandleFunc("/bytes/{n}", h.bytes)
	mux.HandleFunc("/", h.echo)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", name)
		mux.ServeHTTP(w, r)
	})
}

type handler struct{ name string }

func (h *handler) reply(w http.ResponseWriter, r *http.Request, code int) {
	n, _ := io.Copy(io.Discard, io.LimitReader(r.Body, MaxBytes))
	rep := Reply{
		Backend: h.name, Method: r.Method, URI: r.RequestURI, Host: r.Host, Proto: r.Proto,
		Headers: r.Header, Remote: r.RemoteAddr, TLS: r.TLS != nil, Body: n,
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(rep)
}

func (h *handler) echo(w http.ResponseWriter, r *http.Request) { h.reply(w, r, http.StatusOK) }

func (h *handler) healthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	io.WriteString(w, "ok\n")
}

func (h *handler) status(w http.ResponseWriter, r *http.Request) {
	code, err := strconv.Atoi(r.PathValue("code"))
	if err != nil || code < 200 || code > 999 {
		http.Error(w, "status must be 200..999", http.StatusBadRequest)
		return
	}
	h.reply(w, r, code)
}

func (h *handler) delay(w http.ResponseWriter, r *http.Request) {
	d, err := time.ParseDuration(r.PathValue("d"))
	if err != nil {
		if secs, err2 := strconv.ParseFloat(r.PathValue("d"), 64); err2 == nil {
			d, err = time.Duration(secs*float64(time.Second)), nil
		}
	}
	if err != nil || d < 0 {
		http.Error(w, "bad duration", http.StatusBadRequest)
		return
	}
	d = min(d, MaxDelay)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
		return // client (or proxy) gave up
	}
	h.reply(w, r, http.StatusOK)
}

// queryParam reads query parameter name with parse, capped at limit; def when it is absent. A
// value that does not parse or is negative is answered 400, and ok is false.
func queryParam[T int | time.Duration](w http.ResponseWriter, r *http.Request, name string, def, limit T, parse func(string) (T, error)) (v T, ok bool) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return def, true
	}
	v, err := parse(s)
	if err != nil || v < 0 {
		http.Error(w, "bad "+name, http.StatusBadRequest)
		return v, false
	}
	return min(v, limit), true
}

// stream writes n chunks, one per interval, flushing each (SSE-shaped).
func (h *handler) stream(w http.ResponseWriter, r *http.Request) {
	n, ok := queryParam(w, r, "n", 5, MaxStream, strconv.Atoi)
	if !ok {
		return
	}
	interval, ok := queryParam(w, r, "interval", 100*time.Millisecond, MaxDelay, time.ParseDuration)
	if !ok {
		return
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	t := time.NewTicker(max(interval, time.Millisecond))
	defer t.Stop()
	for i := 0; i < n; i++ {
		if i > 0 {
			select {
			case <-t.C:
			case <-r.Context().Done():
				return
			}
		}
		if _, err := fmt.Fprintf(w, "data: {\"backend\":%q,\"seq\":%d}\n\n", h.name, i); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
	}
}

func (h *handler) bytes(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.PathValue("n"), 10, 64)
	if err != nil || n < 0 || n > MaxBytes {
		http.Error(w, fmt.Sprintf("n must be 0..%d", MaxBytes), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	if r.Method == http.MethodHead {
		return
	}
	io.CopyN(w, patternReader{}, n)
}

// patternReader yields a repeating, checkable byte pattern without allocating
// the whole body.
type patternReader struct{}

func (patternReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'a' + byte(i%26)
	}
	return len(p), nil
}

// headerHas reports whether a comma-separated header contains token.
func headerHas(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, f := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), token) {
				return true
			}
		}
	}
	return false
}
