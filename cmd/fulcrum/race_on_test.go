//go:build race

package main

// raceEnabled: the end-to-end test builds the binary with -race too, so it reuses the packages
// this test binary was compiled from instead of compiling everything again.
const raceEnabled = true
