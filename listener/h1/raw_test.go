//go:build linux

package h1

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

func rawOf(t *testing.T, c *net.TCPConn) *Raw {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	x := new(Raw)
	x.Set(c, rc)
	return x
}

// TestRawReadWrite: a reader and a writer over Raw move a head and a large body (the body
// still spliced), see EOF, and honour the connection's deadlines.
func TestRawReadWrite(t *testing.T) {
	target, in, out, client := relay(t)
	head := []byte("HTTP/1.1 200 OK\r\nContent-Length: 1048700\r\n\r\n")
	body := make([]byte, 1048700)
	rand.Read(body)
	go func() { target.Write(head); target.Write(body); target.CloseWrite() }()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(client, int64(len(head)+len(body))))
		got <- b
	}()

	var src Reader
	var dst Writer
	src.ResetRaw(rawOf(t, in))
	dst.ResetRaw(rawOf(t, out))
	src.SetTimeout(in, 5*time.Second, 0)
	dst.SetTimeout(out, 5*time.Second, 0)
	for len(src.Buffered()) < len(head) {
		if err := src.Fill(64 << 10); err != nil {
			t.Fatalf("head: %v", err)
		}
	}
	dst.Commit(append(dst.Buf(), src.Buffered()[:len(head)]...))
	src.Discard(len(head))
	before := spliced.Load()
	if n, err := CopyBody(&dst, &src, Sized, int64(len(body)), Sized); err != nil || n != int64(len(body)) {
		t.Fatalf("CopyBody = %d, %v", n, err)
	}
	if err := dst.Flush(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, append(head, body...)) {
		t.Fatalf("client got %d bytes, not the response sent", len(b))
	}
	if spliced.Load()-before < int64(len(body))-128<<10 {
		t.Fatal("a large body over Raw was not spliced")
	}
	if err := src.Fill(64 << 10); err != io.EOF {
		t.Fatalf("after the target's FIN: %v, want EOF", err)
	}

	// Deadlines set on the net.Conn apply to Raw's waits.
	_, in2, _, _ := relay(t)
	var r2 Reader
	r2.ResetRaw(rawOf(t, in2))
	in2.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if err := r2.Fill(4 << 10); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past its deadline: %v", err)
	}
}
