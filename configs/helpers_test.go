package configs

import "net/netip"

func netipAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
