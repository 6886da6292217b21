package listener

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// grpcTarget is a gRPC server with the health service and three raw methods:
// /test.Echo/Deny fails with PermissionDenied and a trailer, /test.Echo/Deadline reports the
// deadline it got, /test.Echo/Stream echoes every message of a bidirectional stream.
func grpcTarget(t *testing.T, creds credentials.TransportCredentials) (addr string, deadlines chan time.Duration) {
	t.Helper()
	deadlines = make(chan time.Duration, 4)
	opts := []grpc.ServerOption{grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(ss)
		switch method {
		case "/test.Echo/Deny":
			var req healthpb.HealthCheckRequest
			if err := ss.RecvMsg(&req); err != nil {
				return err
			}
			ss.SetTrailer(metadata.Pairs("x-why", "policy"))
			return status.Error(codes.PermissionDenied, "denied by "+req.Service)
		case "/test.Echo/Deadline":
			var req healthpb.HealthCheckRequest
			if err := ss.RecvMsg(&req); err != nil {
				return err
			}
			d, ok := ss.Context().Deadline()
			if !ok {
				deadlines <- -1
			} else {
				deadlines <- time.Until(d)
			}
			return ss.SendMsg(&req)
		case "/test.Echo/Stream":
			for {
				var req healthpb.HealthCheckRequest
				err := ss.RecvMsg(&req)
				if errors.Is(err, io.EOF) {
					return nil
				}
				if err != nil {
					return err
				}
				if err := ss.SendMsg(&req); err != nil {
					return err
				}
			}
		}
		return status.Error(codes.Unimplemented, method)
	})}
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	srv := grpc.NewServer(opts...)
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return ln.Addr().String(), deadlines
}

// TestGRPCThroughH2Listener: unary and bidirectional streaming calls from a real gRPC client
// through an https listener (HTTP/2 by ALPN) to an h2c and to an h2-over-TLS target group, with
// status codes, messages and trailers intact and the client's deadline reaching the target.
func TestGRPCThroughH2Listener(t *testing.T) {
	dir := t.TempDir()
	var cert atomic.Pointer[tls.Certificate]
	h2cAddr, h2cDeadlines := grpcTarget(t, nil)
	tlsAddr, tlsDeadlines := grpcTarget(t, credentials.NewTLS(&tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			if c := cert.Load(); c != nil {
				return c, nil
			}
			return nil, fmt.Errorf("no certificate yet")
		}}))
	h2cLn, tlsLn := configtest.Addr(t), configtest.Addr(t)
	cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "grpc-h2c"
protocol = "http"
http2 = true
targets = [%q]
health_check = { disabled = true }

[[target_groups]]
name = "grpc-tls"
protocol = "https"
http2 = true
targets = [%q]
tls = { server_name = "backend.internal", authority = "internal" }
health_check = { disabled = true }

[[listeners]]
name = "to-h2c"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "grpc-h2c" }

[[listeners]]
name = "to-tls"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "grpc-tls" }
`, h2cAddr, tlsAddr, h2cLn, tlsLn))
	rt := startRuntime(t, cfg, nil)
	cert.Store(l7Issue(t, rt, "internal", "backend.internal"))
	pool, _ := l7CAPool(t, dir, "internal")

	for _, tc := range []struct {
		name      string
		addr      string
		deadlines chan time.Duration
	}{
		{"h2c target", h2cLn, h2cDeadlines},
		{"h2 over TLS target", tlsLn, tlsDeadlines},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cc, err := grpc.NewClient(tc.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
				RootCAs: pool, ServerName: "www.example.test"})))
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()

			resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
			if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("unary Check: %v %v", resp, err)
			}

			var trailer metadata.MD
			err = cc.Invoke(ctx, "/test.Echo/Deny", &healthpb.HealthCheckRequest{Service: "rules"},
				&healthpb.HealthCheckResponse{}, grpc.Trailer(&trailer))
			if st, _ := status.FromError(err); st.Code() != codes.PermissionDenied || st.Message() != "denied by rules" {
				t.Fatalf("Deny: %v, want PermissionDenied %q", err, "denied by rules")
			}
			if got := trailer.Get("x-why"); len(got) != 1 || got[0] != "policy" {
				t.Fatalf("trailer x-why = %v", got)
			}

			dctx, dcancel := context.WithTimeout(ctx, 7*time.Second)
			var echoed healthpb.HealthCheckRequest
			err = cc.Invoke(dctx, "/test.Echo/Deadline", &healthpb.HealthCheckRequest{Service: "d"}, &echoed)
			dcancel()
			if err != nil || echoed.Service != "d" {
				t.Fatalf("Deadline: %v %q", err, echoed.Service)
			}
			if d := <-tc.deadlines; d <= 0 || d > 7*time.Second {
				t.Fatalf("target saw deadline in %v, want within the client's 7s", d)
			}

			st, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/test.Echo/Stream")
			if err != nil {
				t.Fatal(err)
			}
			for i := range 5 {
				msg := fmt.Sprintf("m%d", i)
				if err := st.SendMsg(&healthpb.HealthCheckRequest{Service: msg}); err != nil {
					t.Fatalf("send %d: %v", i, err)
				}
				var got healthpb.HealthCheckRequest
				if err := st.RecvMsg(&got); err != nil || got.Service != msg {
					t.Fatalf("recv %d: %q %v", i, got.Service, err)
				}
			}
			st.CloseSend()
			if err := st.RecvMsg(&healthpb.HealthCheckRequest{}); !errors.Is(err, io.EOF) {
				t.Fatalf("stream end: %v, want EOF", err)
			}
		})
	}
}

// TestH2ConnectIs501: CONNECT over HTTP/2 gets a clear 501, never a tunnel or a forwarded request.
func TestH2ConnectIs501(t *testing.T) {
	dir := t.TempDir()
	var hits atomic.Int64
	be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	t.Cleanup(be.Close)
	addr := configtest.Addr(t)
	cfg := loadConfig(t, dir, l7PKI(dir)+fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = [%q]
health_check = { disabled = true }
[[listeners]]
name = "app"
style = "application"
protocol = "https"
address = %q
certificates = ["www"]
default_action = { forward = "web" }
`, hostOf(be), addr))
	startRuntime(t, cfg, nil)
	pool, _ := l7CAPool(t, dir, "internal")
	c, fr := l7H2Conn(t, addr, pool)
	defer c.Close()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "example.test:443"})
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == 1 {
			if s := h.PseudoValue("status"); s != "501" {
				t.Fatalf("CONNECT answered %s, want 501", s)
			}
			break
		}
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("target saw %d requests", n)
	}
}
