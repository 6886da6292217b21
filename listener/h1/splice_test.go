//go:build linux

package h1

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// tcpPair returns the two ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (near, far *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-accepted
	if a == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); a.Close() })
	return c.(*net.TCPConn), a.(*net.TCPConn)
}

// relay sets up target → proxy → client: the proxy reads the target's end and writes the
// client's, as the engine does for a response body.
func relay(t *testing.T) (target, proxyIn, proxyOut, client *net.TCPConn) {
	target, proxyIn = tcpPair(t)
	proxyOut, client = tcpPair(t)
	return
}

func TestSpliceBodyMovesLargeBodies(t *testing.T) {
	target, in, out, client := relay(t)
	body := make([]byte, 1<<20+123)
	rand.Read(body)
	go func() { target.Write(body) }()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(client, int64(len(body))))
		got <- b
	}()

	src, dst := NewReader(in), NewWriter(out)
	src.SetTimeout(in, 5*time.Second, 0)
	dst.SetTimeout(out, 5*time.Second, 0)
	before := spliced.Load()
	n, err := CopyBody(dst, src, Sized, int64(len(body)), Sized)
	if err != nil || n != int64(len(body)) {
		t.Fatalf("CopyBody = %d, %v; want %d, nil", n, err, len(body))
	}
	if err := dst.Flush(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, body) {
		t.Fatalf("client got %d bytes, not the body sent", len(b))
	}
	if moved := spliced.Load() - before; moved < int64(len(body))-64<<10 {
		t.Fatalf("spliced %d of %d bytes: the zero-copy path was not taken", moved, len(body))
	}
	if dst.Written() != int64(len(body)) {
		t.Fatalf("Written = %d, want %d (the access log's byte count)", dst.Written(), len(body))
	}
}

func TestSpliceBodyShortSource(t *testing.T) {
	target, in, out, client := relay(t)
	go func() {
		target.Write(make([]byte, 200<<10))
		target.Close()
	}()
	go io.Copy(io.Discard, client)
	src, dst := NewReader(in), NewWriter(out)
	n, err := CopyBody(dst, src, Sized, 1<<20, Sized)
	if !errors.Is(err, ErrShortBody) {
		t.Fatalf("err = %v, want ErrShortBody", err)
	}
	if n != 200<<10 {
		t.Fatalf("moved %d, want %d", n, 200<<10)
	}
	if dst.Err() != nil {
		t.Fatalf("the client side is blamed: %v", dst.Err())
	}
}

// A client that stops reading fails the write side (send_timeout), not the target.
func TestSpliceBodyStalledClient(t *testing.T) {
	target, in, out, _ := relay(t) // the client never reads
	go func() { target.Write(make([]byte, 64<<20)) }()
	src, dst := NewReader(in), NewWriter(out)
	src.SetTimeout(in, 5*time.Second, 0)
	dst.SetTimeout(out, 200*time.Millisecond, 0)
	_, err := CopyBody(dst, src, Sized, 64<<20, Sized)
	if !isTimeout(err) || dst.Err() == nil || !isTimeout(dst.Err()) {
		t.Fatalf("err = %v, dst.Err() = %v; want a write timeout recorded on the writer", err, dst.Err())
	}
	if src.Err() != nil {
		t.Fatalf("the target side is blamed: %v", src.Err())
	}
}

// A target that stops sending fails the read side (target_read_timeout), and the writer stays
// clean; the timeout is not sticky on the reader, as with buffered reads.
func TestSpliceBodyStalledTarget(t *testing.T) {
	target, in, out, client := relay(t)
	go func() { target.Write(make([]byte, 100<<10)) }() // then nothing
	go io.Copy(io.Discard, client)
	src, dst := NewReader(in), NewWriter(out)
	src.SetTimeout(in, 200*time.Millisecond, 0)
	dst.SetTimeout(out, 5*time.Second, 0)
	n, err := CopyBody(dst, src, Sized, 1<<20, Sized)
	if !isTimeout(err) {
		t.Fatalf("err = %v, want a read timeout", err)
	}
	if n != 100<<10 {
		t.Fatalf("moved %d before the stall, want %d", n, 100<<10)
	}
	if dst.Err() != nil || src.Err() != nil {
		t.Fatalf("dst.Err() = %v, src.Err() = %v; want both nil", dst.Err(), src.Err())
	}
}

// Bodies whose source has gone quiet hold no pipe: a flood of slow uploads or stalled targets
// costs no descriptors beyond their sockets.
func TestSpliceQuietSourceHoldsNoPipe(t *testing.T) {
	const n = 20
	errs := make(chan error, n)
	var ins []*net.TCPConn
	for range n {
		target, in, out, client := relay(t)
		ins = append(ins, in)
		go func() { target.Write(make([]byte, 100<<10)) }() // then nothing
		received := make(chan struct{})
		go func() {
			io.ReadFull(client, make([]byte, 100<<10))
			close(received)
			io.Copy(io.Discard, client)
		}()
		go func() {
			src, dst := NewReader(in), NewWriter(out)
			src.SetTimeout(in, 30*time.Second, 0)
			_, err := CopyBody(dst, src, Sized, 1<<20, Sized)
			errs <- err
		}()
		<-received
	}
	// Every transfer has moved its 100 KiB and now waits for the rest.
	if inUse := openPipes.Load() - int64(len(pipes)); inUse != 0 {
		t.Fatalf("%d pipes held by transfers waiting for their source", inUse)
	}
	if open := openPipes.Load(); open > keptPipes {
		t.Fatalf("%d pipes open, more than the %d kept", open, keptPipes)
	}
	// Closing the proxy's side ends every transfer.
	for _, c := range ins {
		c.Close()
	}
	for range n {
		<-errs
	}
}
