package h2

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// testCert is a self-signed certificate for 127.0.0.1, made once per test binary.
var testCert = sync.OnceValue(func() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "h2 test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
})

// testServer serves srv over TLS (ALPN h2) on a loopback port until the test ends.
type testServer struct {
	srv  *Server
	ln   net.Listener
	addr string
	wg   sync.WaitGroup
}

func startServer(t testing.TB, cfg Config, h Handler) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{srv: NewServer(cfg, h), ln: ln, addr: ln.Addr().String()}
	tcfg := &tls.Config{Certificates: []tls.Certificate{testCert()}, NextProtos: []string{"h2"}}
	ctx, cancel := context.WithCancel(context.Background())
	ts.wg.Add(1)
	go func() {
		defer ts.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ts.wg.Add(1)
			go func() {
				defer ts.wg.Done()
				tc := tls.Server(c, tcfg)
				tc.SetDeadline(time.Now().Add(10 * time.Second))
				if err := tc.HandshakeContext(ctx); err != nil {
					tc.Close()
					return
				}
				tc.SetDeadline(time.Time{})
				ts.srv.ServeConn(ctx, tc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		ts.srv.Shutdown(sctx)
		scancel()
		cancel()
		ts.wg.Wait()
	})
	return ts
}

// echoHandler answers GET with a short greeting and echoes a request body; it sends request trailers back
// as response trailers.
var echoHandler = HandlerFunc(func(s *Stream) {
	body, err := io.ReadAll(s)
	if err != nil {
		return
	}
	if len(body) == 0 {
		body = []byte("hello from h2\n")
	}
	tr := s.Trailers()
	hdr := []hpack.HeaderField{{Name: "content-type", Value: "text/plain"}}
	if err := s.WriteHead(200, hdr, false); err != nil {
		return
	}
	if len(tr) == 0 {
		s.WriteData(body, true)
		return
	}
	if _, err := s.Write(body); err != nil {
		return
	}
	s.WriteTrailers(tr)
})

func clientTLS() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}
}
