package main

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fulcrum-lb/fulcrum/certs/fleet"
	"github.com/fulcrum-lb/fulcrum/listener"
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

// fleetCollector exports the fleet storage's operations and failures (etcd unreachable shows
// as a rising error count while the node keeps serving).
type fleetCollector struct {
	rt       *listener.Runtime
	ops, err *prometheus.Desc
}

func newFleetCollector(rt *listener.Runtime) *fleetCollector {
	return &fleetCollector{
		rt:  rt,
		ops: prometheus.NewDesc("fulcrum_fleet_storage_operations_total", "Fleet storage operations on etcd by operation.", []string{"op"}, nil),
		err: prometheus.NewDesc("fulcrum_fleet_storage_errors_total", "Failed fleet storage operations on etcd by operation (etcd unreachable, timeouts).", []string{"op"}, nil),
	}
}

func (c *fleetCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.ops; ch <- c.err }

func (c *fleetCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.rt.Certs().FleetStats()
	if st == nil {
		return
	}
	for op, name := range fleet.OpNames {
		n, e := st.Count(fleet.Op(op))
		ch <- prometheus.MustNewConstMetric(c.ops, prometheus.CounterValue, float64(n), name)
		ch <- prometheus.MustNewConstMetric(c.err, prometheus.CounterValue, float64(e), name)
	}
}
