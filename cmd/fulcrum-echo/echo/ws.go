package echo

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Minimal RFC 6455 WebSocket: enough for an echo endpoint and a test client
// (text, binary, fragmented messages, ping/pong, close). No extensions.

// WebSocket opcodes.
const (
	OpContinuation = 0x0
	OpText         = 0x1
	OpBinary       = 0x2
	OpClose        = 0x8
	OpPing         = 0x9
	OpPong         = 0xA
)

// MaxMessage bounds a reassembled message.
const MaxMessage = 16 << 20

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// CloseError is returned by ReadMessage when the peer closed.
type CloseError struct {
	Code   int
	Reason string
}

func (e *CloseError) Error() string { return fmt.Sprintf("websocket closed: %d %s", e.Code, e.Reason) }

// WSConn is one WebSocket connection (either side).
type WSConn struct {
	conn   net.Conn
	br     *bufio.Reader
	client bool // clients mask what they send

	wmu    sync.Mutex
	closed bool
}

// ws upgrades and echoes every data message back until the peer closes.
func (h *handler) ws(w http.ResponseWriter, r *http.Request) {
	key := r.Header.Get("Sec-WebSocket-Key")
	if r.Method != http.MethodGet || !headerHas(r.Header, "Connection", "upgrade") ||
		!strings.EqualFold(r.Header.Get("Upgrade"), "websocket") || key == "" {
		http.Error(w, "websocket upgrade required", http.StatusBadRequest)
		return
	}
	if r.Header.Get("Sec-WebSocket-Version") != "13" {
		w.Header().Set("Sec-WebSocket-Version", "13")
		http.Error(w, "unsupported websocket version", http.StatusUpgradeRequired)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "hijack: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	conn.SetDeadline(time.Time{})
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\nX-Backend: %s\r\n\r\n", acceptKey(key), h.name)
	if err := brw.Flush(); err != nil {
		return
	}
	c := &WSConn{conn: conn, br: brw.Reader}
	// A hijacked connection is not closed by Server.Shutdown; close it if
	// the request context ends (server BaseContext cancelled) so the loop ends.
	stop := context.AfterFunc(r.Context(), func() { conn.Close() })
	defer stop()
	for {
		op, data, err := c.ReadMessage()
		if err != nil {
			return
		}
		if err := c.WriteMessage(op, data); err != nil {
			return
		}
	}
}

// DialWebSocket opens a WebSocket to url (ws://, wss://, http:// or
// https://), sending header with the handshake. ctx bounds the handshake.
func DialWebSocket(ctx context.Context, rawURL string, header http.Header) (*WSConn, error) {
	return DialWebSocketTLS(ctx, rawURL, header, nil)
}

// DialWebSocketTLS is DialWebSocket with a TLS configuration for wss.
func DialWebSocketTLS(ctx context.Context, rawURL string, header http.Header, tlsConf *tls.Config) (*WSConn, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("websocket url: %w", err)
	}
	secure := false
	switch u.Scheme {
	case "ws", "http":
	case "wss", "https":
		secure = true
	default:
		return nil, fmt.Errorf("websocket url %q: unsupported scheme", rawURL)
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), map[bool]string{false: "80", true: "443"}[secure])
	}
	var conn net.Conn
	if secure {
		cfg := tlsConf.Clone()
		if cfg == nil {
			cfg = &tls.Config{}
		}
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		cfg.NextProtos = []string{"http/1.1"}
		conn, err = (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	} else {
		conn, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("websocket dial %s: %w", addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var nonce [16]byte
	rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	req := &http.Request{Method: http.MethodGet, URL: u, Host: u.Host, Header: http.Header{}, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
	for k, vs := range header {
		req.Header[k] = append([]string(nil), vs...)
	}
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", key)
	req.Header.Set("Sec-WebSocket-Version", "13")
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("websocket handshake write: %w", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("websocket handshake read: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Accept") != acceptKey(key) {
		resp.Body.Close()
		conn.Close()
		return nil, fmt.Errorf("websocket handshake: status %d, accept %q", resp.StatusCode, resp.Header.Get("Sec-WebSocket-Accept"))
	}
	conn.SetDeadline(time.Time{})
	return &WSConn{conn: conn, br: br, client: true}, nil
}

// NetConn returns the underlying connection (for deadlines).
func (c *WSConn) NetConn() net.Conn { return c.conn }

// WriteText sends a text message.
func (c *WSConn) WriteText(s string) error { return c.WriteMessage(OpText, []byte(s)) }

// WriteBinary sends a binary message.
func (c *WSConn) WriteBinary(b []byte) error { return c.WriteMessage(OpBinary, b) }

// Ping sends a ping; the peer's pong is consumed by ReadMessage.
func (c *WSConn) Ping(payload []byte) error { return c.writeFrame(OpPing, payload) }

// WriteMessage sends one unfragmented message with the given opcode.
func (c *WSConn) WriteMessage(op int, data []byte) error { return c.writeFrame(byte(op), data) }

func (c *WSConn) writeFrame(op byte, data []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed {
		return net.ErrClosed
	}
	hdr := make([]byte, 0, 14+len(data))
	hdr = append(hdr, 0x80|op)
	mask := byte(0)
	if c.client {
		mask = 0x80
	}
	switch n := len(data); {
	case n < 126:
		hdr = append(hdr, mask|byte(n))
	case n <= 0xffff:
		hdr = append(hdr, mask|126)
		hdr = binary.BigEndian.AppendUint16(hdr, uint16(n))
	default:
		hdr = append(hdr, mask|127)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(n))
	}
	if c.client {
		var key [4]byte
		rand.Read(key[:])
		hdr = append(hdr, key[:]...)
		start := len(hdr)
		hdr = append(hdr, data...)
		for i := range data {
			hdr[start+i] ^= key[i&3]
		}
	} else {
		hdr = append(hdr, data...)
	}
	_, err := c.conn.Write(hdr)
	if op == OpClose {
		c.closed = true
	}
	return err
}

// ReadMessage returns the next data message (OpText or OpBinary), answering
// pings and reassembling fragments. When the peer closes it answers the
// close and returns a *CloseError.
func (c *WSConn) ReadMessage() (op int, data []byte, err error) {
	var msgOp byte
	var msg []byte
	for {
		fin, fop, payload, err := c.readFrame()
		if err != nil {
			return 0, nil, err
		}
		switch fop {
		case OpPing:
			if err := c.writeFrame(OpPong, payload); err != nil {
				return 0, nil, err
			}
			continue
		case OpPong:
			continue
		case OpClose:
			ce := &CloseError{Code: 1005}
			if len(payload) >= 2 {
				ce.Code = int(binary.BigEndian.Uint16(payload))
				ce.Reason = string(payload[2:])
			}
			c.writeFrame(OpClose, payload[:min(len(payload), 2)])
			c.conn.Close()
			return 0, nil, ce
		case OpText, OpBinary:
			if msgOp != 0 {
				return 0, nil, c.fail(1002, "new message inside a fragmented one")
			}
			msgOp = fop
		case OpContinuation:
			if msgOp == 0 {
				return 0, nil, c.fail(1002, "continuation without a message")
			}
		default:
			return 0, nil, c.fail(1002, "unknown opcode")
		}
		if len(msg)+len(payload) > MaxMessage {
			return 0, nil, c.fail(1009, "message too big")
		}
		msg = append(msg, payload...)
		if fin {
			return int(msgOp), msg, nil
		}
	}
}

func (c *WSConn) fail(code int, reason string) error {
	p := binary.BigEndian.AppendUint16(nil, uint16(code))
	c.writeFrame(OpClose, append(p, reason...))
	c.conn.Close()
	return fmt.Errorf("websocket protocol error: %s", reason)
}

func (c *WSConn) readFrame() (fin bool, op byte, payload []byte, err error) {
	var h [2]byte
	if _, err = io.ReadFull(c.br, h[:]); err != nil {
		return
	}
	fin, op = h[0]&0x80 != 0, h[0]&0x0f
	if h[0]&0x70 != 0 {
		return false, 0, nil, c.fail(1002, "reserved bits set")
	}
	masked := h[1]&0x80 != 0
	if masked == c.client {
		// Clients must mask, servers must not.
		return false, 0, nil, c.fail(1002, "bad masking")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		if _, err = io.ReadFull(c.br, b[:]); err != nil {
			return
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err = io.ReadFull(c.br, b[:]); err != nil {
			return
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	if op >= 0x8 && (n > 125 || !fin) {
		return false, 0, nil, c.fail(1002, "bad control frame")
	}
	if n > MaxMessage {
		return false, 0, nil, c.fail(1009, "frame too big")
	}
	var key [4]byte
	if masked {
		if _, err = io.ReadFull(c.br, key[:]); err != nil {
			return
		}
	}
	payload = make([]byte, n)
	if _, err = io.ReadFull(c.br, payload); err != nil {
		return
	}
	if masked {
		for i := range payload {
			payload[i] ^= key[i&3]
		}
	}
	return fin, op, payload, nil
}

// Close sends a normal close and closes the connection (without waiting
// for the peer's answer).
func (c *WSConn) Close() error {
	err := c.writeFrame(OpClose, []byte{0x03, 0xe8})
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	if cerr := c.conn.Close(); err == nil && !errors.Is(cerr, net.ErrClosed) {
		err = cerr
	}
	return err
}
