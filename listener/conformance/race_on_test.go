//go:build race

package conformance

// raceEnabled: the memory bounds are measured without the race detector (make test's memory
// step), whose client side would be too slow for thousands of connections.
const raceEnabled = true
