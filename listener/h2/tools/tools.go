//go:build tools

// Package tools pins the Go programs the h2 tests run (h2spec). It is a module of its own so
// that their dependencies never enter the proxy's build.
package tools

import _ "github.com/summerwind/h2spec/cmd/h2spec"
