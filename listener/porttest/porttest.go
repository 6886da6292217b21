// Package porttest hands tests loopback addresses to put listeners on. It forwards to
// configs/configtest, the one test-helper package, until listener's tests call that directly.
package porttest

import (
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// Unused is configtest.AddrOn: a loopback address on a port free now, below the ephemeral
// range, never handed out before in this process.
func Unused(t testing.TB, network, host string) string {
	t.Helper()
	return configtest.AddrOn(t, network, host)
}
