package configs

import (
	"path/filepath"
	"testing"
)

// TestFleetExamples loads the three-node example of configs/fleet/.
func TestFleetExamples(t *testing.T) {
	t.Setenv("FULCRUM_MASTER_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	files, _ := filepath.Glob(filepath.Join("fleet", "*.toml"))
	if len(files) != 3 {
		t.Fatalf("fleet examples: %v", files)
	}
	for _, f := range files {
		c, err := LoadFile(f)
		if err != nil {
			t.Fatalf("%s:\n%v", f, err)
		}
		if c.Fleet == nil || len(c.Fleet.Etcd) != 3 || c.Fleet.LeaseTTLDuration() <= 0 || c.Fleet.MasterKey != "env:FULCRUM_MASTER_KEY" {
			t.Errorf("%s: fleet %+v", f, c.Fleet)
		}
	}
	// Without [fleet] nothing is shared.
	c, err := LoadFile("quickstart.toml")
	if err != nil || c.Fleet != nil {
		t.Fatalf("quickstart: %v %+v", err, c.Fleet)
	}
}
