//go:build race

package l4

// raceEnabled: the race detector instruments memory (goroutine stacks grow), so memory bounds
// are looser under it.
const raceEnabled = true
