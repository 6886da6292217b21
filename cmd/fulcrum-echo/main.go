// Command fulcrum-echo is the sample back end for the Fulcrum demo and tests:
// it answers every request with a JSON description of the request (see
// package echo for the endpoints).
//
//	fulcrum-echo -listen 127.0.0.1:9101 -name b1 [-tls-cert F -tls-key F] [-h2c]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/fulcrum-lb/fulcrum/cmd/fulcrum-echo/echo"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fulcrum-echo:", err)
		os.Exit(1)
	}
}

// newServer builds the echo server: HTTP/1.1 always, h2 over TLS, and h2c
// (prior knowledge) when asked.
func newServer(name string, tls, h2c bool) *http.Server {
	srv := &http.Server{
		Handler:           echo.Handler(name),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
	}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetHTTP2(tls)
	protos.SetUnencryptedHTTP2(h2c)
	srv.Protocols = &protos
	return srv
}

func run(args []string) error {
	fs := flag.NewFlagSet("fulcrum-echo", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:9101", "address to listen on")
	name := fs.String("name", "", "back end name reported in replies (default: the listen address)")
	cert := fs.String("tls-cert", "", "TLS certificate file (PEM); serve HTTPS (HTTP/1.1 and h2)")
	key := fs.String("tls-key", "", "TLS key file (PEM)")
	h2c := fs.Bool("h2c", false, "also accept cleartext HTTP/2 (prior knowledge and Upgrade)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if (*cert == "") != (*key == "") {
		return errors.New("-tls-cert and -tls-key go together")
	}
	if *name == "" {
		*name = *listen
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	srv := newServer(*name, *cert != "", *h2c)

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *listen, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	errc := make(chan error, 1)
	go func() {
		if *cert != "" {
			errc <- srv.ServeTLS(ln, *cert, *key)
		} else {
			errc <- srv.Serve(ln)
		}
	}()
	log.Info("fulcrum-echo listening", "addr", ln.Addr().String(), "name", *name, "tls", *cert != "", "h2c", *h2c)

	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}
