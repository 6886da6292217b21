package main

import (
	"context"
	"net/http"
	"time"
)

// fleetView is GET /admin/fleet: this node, every node with its last heartbeat, and which
// node holds which lock (renewals, authority creation) or leadership (secret rotation).
func fleetView(d *daemon, r *http.Request) (int, any) {
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	st := d.rt.Certs().FleetStatus(ctx)
	if st == nil {
		return http.StatusOK, map[string]any{"fleet": false}
	}
	return http.StatusOK, map[string]any{"fleet": true, "status": st}
}
