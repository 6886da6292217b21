package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
)

func serve(t *testing.T, srv *http.Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	})
	return ln.Addr().String()
}

func TestH2C(t *testing.T) {
	addr := serve(t, newServer("h2c", false, true))
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	c := &http.Client{Transport: &http.Transport{Protocols: &p}, Timeout: 10 * time.Second}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + addr + "/x")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var rep echo.Reply
	json.NewDecoder(resp.Body).Decode(&rep)
	if resp.ProtoMajor != 2 || rep.Proto != "HTTP/2.0" || rep.Backend != "h2c" {
		t.Fatalf("proto %s reply %+v", resp.Proto, rep)
	}
}

func TestTLSServesH2(t *testing.T) {
	srv := newServer("tls", true, false)
	ts := httptest.NewUnstartedServer(srv.Handler)
	ts.Config = srv
	ts.EnableHTTP2 = true
	ts.StartTLS()
	defer ts.Close()
	c := ts.Client()
	resp, err := c.Get(ts.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var rep echo.Reply
	json.NewDecoder(resp.Body).Decode(&rep)
	if resp.ProtoMajor != 2 || !rep.TLS {
		t.Fatalf("proto %s tls %v", resp.Proto, rep.TLS)
	}
}

// SIGTERM shuts the server down gracefully and run returns nil.
func TestGracefulShutdownOnSIGTERM(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	done := make(chan error, 1)
	go func() { done <- run([]string{"-listen", addr, "-name", "sig"}) }()
	ready := false
	for i := 0; i < 200 && !ready; i++ {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			ready = resp.StatusCode == 200
			break
		}
		select {
		case err := <-done:
			t.Fatalf("run exited early: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if !ready {
		t.Fatal("server never became ready")
	}
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not return after SIGTERM")
	}
}

func TestRunFlags(t *testing.T) {
	if err := run([]string{"-tls-cert", "x"}); err == nil {
		t.Fatal("cert without key accepted")
	}
	if err := run([]string{"-listen", "256.0.0.1:1"}); err == nil {
		t.Fatal("bad listen address accepted")
	}
}
