package main

import (
	_ "embed"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// The status page is one self-contained HTML file (inline CSS and script, no external fonts or
// scripts: it must work on an air-gapped host). It polls GET /admin/status and updates in place;
// both sit behind the admin endpoint's authentication like every other GET (role viewer).
//
//go:embed status.html
var statusHTML []byte

func registerStatusRoutes(mux *http.ServeMux, d *daemon) {
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
		w.Header().Set("Cache-Control", "no-store")
		w.Write(statusHTML)
	})
	mux.HandleFunc("GET /admin/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, statusView(d))
	})
}

// listenerStatus is one listener on the status page: its rules as text and its counters (the
// page turns counters into rates between two polls).
type listenerStatus struct {
	Name           string   `json:"name"`
	Style          string   `json:"style"`
	Protocol       string   `json:"protocol"`
	Address        string   `json:"address"`
	Rules          []string `json:"rules"`
	Requests       float64  `json:"requests"`    // HTTP requests answered (layer 7)
	Errors         float64  `json:"errors_5xx"`  // of which 5xx
	Connections    float64  `json:"connections"` // client connections accepted
	LatencySumSecs float64  `json:"latency_sum_seconds"`
	LatencyCount   float64  `json:"latency_count"`
	ActiveConns    float64  `json:"active_connections"`
}

type statusResponse struct {
	Time         time.Time         `json:"time"`
	Version      string            `json:"version"`
	Listeners    []listenerStatus  `json:"listeners"`
	Groups       []groupView       `json:"target_groups"`
	Certificates []certificateView `json:"certificates"`
	Authorities  []authorityView   `json:"authorities"`
}

func statusView(d *daemon) statusResponse {
	cfg := d.rt.Config()
	addrs := d.rt.Addrs()
	out := statusResponse{Time: time.Now().UTC(), Version: versionString(), Listeners: []listenerStatus{}}
	idx := map[string]int{}
	for _, l := range cfg.Listeners {
		ls := listenerStatus{Name: l.Name, Style: l.Style, Protocol: l.Protocol, Address: l.Address, Rules: describeRules(&l)}
		if a := addrs[l.Name]; a != "" {
			ls.Address = a
		}
		idx[l.Name] = len(out.Listeners)
		out.Listeners = append(out.Listeners, ls)
	}
	if mfs, err := d.obs.Registry().Gather(); err == nil {
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				var name, code string
				for _, lp := range m.GetLabel() {
					switch lp.GetName() {
					case "listener":
						name = lp.GetValue()
					case "code":
						code = lp.GetValue()
					}
				}
				i, ok := idx[name]
				if !ok {
					continue
				}
				ls := &out.Listeners[i]
				switch mf.GetName() {
				case "fulcrum_http_requests_total":
					ls.Requests += m.GetCounter().GetValue()
					if code == "5xx" {
						ls.Errors += m.GetCounter().GetValue()
					}
				case "fulcrum_http_request_duration_seconds":
					ls.LatencySumSecs += m.GetHistogram().GetSampleSum()
					ls.LatencyCount += float64(m.GetHistogram().GetSampleCount())
				case "fulcrum_connections_total":
					ls.Connections += m.GetCounter().GetValue()
				case "fulcrum_active_connections":
					ls.ActiveConns += m.GetGauge().GetValue()
				}
			}
		}
	}
	out.Groups = targetsView(cfg, d.rt.Registry().Targets()).Groups
	out.Certificates = certificatesView(d.rt.Certs().List(), time.Now())
	out.Authorities = authoritiesView(cfg, d.rt.Certs())
	return out
}

// describeRules is each rule of a listener in one line, then its default action.
func describeRules(l *configs.Listener) []string {
	var out []string
	for _, r := range l.Rules {
		var cond []string
		add := func(what string, v []string) {
			if len(v) > 0 {
				cond = append(cond, what+" "+strings.Join(v, ","))
			}
		}
		add("host", r.Hosts)
		add("path", r.Paths)
		add("method", r.Methods)
		add("source", r.SourceIPs)
		for k, v := range r.Headers {
			add("header "+k, v)
		}
		for k, v := range r.Query {
			add("query "+k, v)
		}
		out = append(out, fmt.Sprintf("%d: %s -> %s", r.Priority, strings.Join(cond, " and "), describeAction(r.Forward, r.Redirect, r.FixedResponse)))
	}
	switch {
	case l.DefaultAction != nil:
		out = append(out, "default -> "+describeAction(l.DefaultAction.Forward, l.DefaultAction.Redirect, l.DefaultAction.FixedResponse))
	case len(l.Forward) > 0:
		out = append(out, "default -> "+describeAction(l.Forward, nil, nil))
	}
	if out == nil {
		out = []string{}
	}
	return out
}

func describeAction(f configs.Forward, rd *configs.Redirect, fr *configs.FixedResponse) string {
	switch {
	case rd != nil:
		return fmt.Sprintf("redirect %d", rd.Status)
	case fr != nil:
		return fmt.Sprintf("fixed response %d", fr.Status)
	}
	var gs []string
	for _, g := range f {
		if len(f) > 1 {
			gs = append(gs, fmt.Sprintf("%s (weight %d)", g.Group, g.Weight))
		} else {
			gs = append(gs, g.Group)
		}
	}
	return "forward " + strings.Join(gs, ", ")
}
