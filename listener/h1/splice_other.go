//go:build !linux

package h1

// spliceBody is Linux only; elsewhere bodies are copied through the buffers.
func spliceBody(dst *Writer, src *Reader, n int64) (int64, bool, error) { return 0, false, nil }
