module github.com/fulcrum-lb/fulcrum/cmd/fulcrum-bench/ioproto

go 1.26.8

require (
	github.com/fulcrum-lb/fulcrum v0.0.0
	github.com/lesismal/llib v1.2.5
	github.com/lesismal/nbio v1.6.8
)

require (
	github.com/BurntSushi/toml v1.6.0 // indirect
	golang.org/x/crypto v0.58.0 // indirect
	golang.org/x/net v0.62.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
	golang.org/x/text v0.43.0 // indirect
)

replace github.com/fulcrum-lb/fulcrum => ../../..
