// Package configtest is Fulcrum's one test-helper package: configurations that tests write as
// Go structs turned into what the binary runs (the struct is written as TOML and read back by
// configs.Load, so packages other than configs only ever see validated configuration with its
// defaults applied), loopback ports, a wait for state that announces nothing, and a test
// certificate authority. It imports only configs, so every package's tests may use it.
package configtest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	"github.com/BurntSushi/toml"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// Load validates c as the binary would load it from a file in dir ("" for the temporary
// directory; relative paths in c are relative to it).
func Load(dir string, c configs.Config) (*configs.Config, error) {
	text, err := TOML(c)
	if err != nil {
		return nil, err
	}
	if dir == "" {
		dir = os.TempDir()
	}
	loaded, err := configs.Load(filepath.Join(dir, "test.toml"), []byte(text))
	if err != nil {
		return nil, fmt.Errorf("config: %w\n%s", err, text)
	}
	return loaded, nil
}

// Must is Load that panics: for configurations a test expects to be valid (tests of validation
// belong to configs).
func Must(dir string, c configs.Config) *configs.Config {
	loaded, err := Load(dir, c)
	if err != nil {
		panic(err)
	}
	return loaded
}

// TOML is c written as a configuration file, for tests that hand a file to the binary.
func TOML(c configs.Config) (string, error) {
	var b bytes.Buffer
	if err := toml.NewEncoder(&b).Encode(&c); err != nil {
		return "", fmt.Errorf("configtest: encode: %w", err)
	}
	return b.String(), nil
}
