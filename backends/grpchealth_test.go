package backends

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// TestGRPCHealthCheck: a check with grpc_code calls the target over h2c. The standard health
// service marks the target unhealthy when it answers NOT_SERVING and healthy again on SERVING;
// a method's gRPC status is matched against grpc_code (Unimplemented is 12).
func TestGRPCHealthCheck(t *testing.T) {
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	addr := ln.Addr().String()

	hc := func(path, codes string) *configs.HealthCheck {
		return &configs.HealthCheck{Protocol: "http", Path: path, GRPCCode: codes, Interval: "300ms",
			Timeout: "250ms", HealthyThreshold: 2, UnhealthyThreshold: 2}
	}
	r := newReg(t)
	set := build(t, r, conf(
		configs.TargetGroup{Name: "svc", Protocol: "http", HTTP2: true, HealthCheck: hc("", "0"),
			Targets: []configs.Target{{Address: addr, Weight: 1}}},
		configs.TargetGroup{Name: "unimpl-ok", Protocol: "http", HTTP2: true, HealthCheck: hc("/x.Y/Z", "12"),
			Targets: []configs.Target{{Address: addr, Weight: 1}}},
		configs.TargetGroup{Name: "unimpl-bad", Protocol: "http", HTTP2: true, HealthCheck: hc("/x.Y/Z", "0-11"),
			Targets: []configs.Target{{Address: addr, Weight: 1}}},
	))
	svc := set.Group("svc").Targets()[0]
	bad := set.Group("unimpl-bad").Targets()[0]
	ok := set.Group("unimpl-ok").Targets()[0]

	configtest.WaitFor(t, 15*time.Second, "Unimplemented outside grpc_code marks the target unhealthy", func() bool { return !bad.Healthy() })
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	configtest.WaitFor(t, 15*time.Second, "NOT_SERVING marks the target unhealthy", func() bool { return !svc.Healthy() })
	if st := svc.Status(); st.Reason == "" {
		t.Errorf("no reason for the failure: %+v", st)
	}
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	configtest.WaitFor(t, 15*time.Second, "SERVING marks the target healthy again", svc.Healthy)
	// On a loaded machine a check may time out now and then; what must never happen is a
	// status mismatch for the code grpc_code lists.
	configtest.WaitFor(t, 15*time.Second, "Unimplemented inside grpc_code keeps the target healthy", ok.Healthy)
	if st := ok.Status(); strings.Contains(st.Reason, "does not match") {
		t.Errorf("grpc_code 12 target failed on its status: %+v", st)
	}
}
