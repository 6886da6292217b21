package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestMasterKeyRotationUnderLoad rotates the software keystore's master key (with curl, as an
// operator would) while clients make full handshakes: none may fail, and afterwards no sealed
// file under state_dir opens with the old master key.
func TestMasterKeyRotationUnderLoad(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl is not installed")
	}
	dir := t.TempDir()
	admin, web := configtest.Addr(t), configtest.Addr(t)
	os.WriteFile(filepath.Join(dir, "key_admin.token"), []byte(keyAdminToken), 0o600)
	os.WriteFile(filepath.Join(dir, "operator.token"), []byte(operatorToken), 0o600)
	d := startTestDaemon(t, filepath.Join(dir, "fulcrum.toml"), fmt.Sprintf(`[server]
admin = %q
state_dir = %q
shutdown_timeout = "5s"

[[server.admin_tokens]]
name = "sec-team"
secret = "file:key_admin.token"
role = "key_admin"

[[server.admin_tokens]]
name = "deploy"
secret = "file:operator.token"
role = "operator"

[keystore]
type = "software"
master_key = "file:master.key"
data_key_cache_max_uses = 4

[[authorities]]
name = "internal"

[[certificates]]
name = "a"
domains = ["a.example.test"]
authority = "internal"

[[certificates]]
name = "b"
domains = ["b.example.test"]
authority = "internal"
key_type = "rsa-2048"

[[listeners]]
name = "tls"
style = "application"
protocol = "https"
address = %q
certificates = ["a", "b"]
default_action = { fixed_response = { status = 200, content_type = "text/plain", body = "ok" } }
`, admin, dir, web))
	old, err := os.ReadFile(filepath.Join(dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 4 {
		sni := []string{"a.example.test", "b.example.test"}[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 100000; n++ {
				select {
				case <-stop:
					return
				default:
				}
				// No session cache: every handshake signs with the keystore key.
				c, err := tls.Dial("tcp", web, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				c.Close()
				ok.Add(1)
			}
		}()
	}
	configtest.WaitFor(t, 30*time.Second, "handshakes before the rotation", func() bool { return ok.Load() > 20 })
	out, err := exec.Command("curl", "-sS", "-f", "-X", "POST", "-H", "Authorization: Bearer "+keyAdminToken,
		d.admin+"/admin/keystore/rotate-master-key").CombinedOutput()
	if err != nil {
		t.Fatalf("rotate: %v\n%s", err, out)
	}
	before := ok.Load()
	configtest.WaitFor(t, 30*time.Second, "handshakes after the rotation", func() bool { return ok.Load() > before+20 })
	close(stop)
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d of %d handshakes failed during the rotation: %v", failed.Load(), ok.Load()+failed.Load(), firstErr.Load())
	}
	// An operator may not rotate.
	out, _ = exec.Command("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Authorization: Bearer "+operatorToken,
		d.admin+"/admin/keystore/rotate-master-key").CombinedOutput()
	if string(out) != "403" {
		t.Fatalf("operator's rotation: %s", out)
	}

	cur, _ := os.ReadFile(filepath.Join(dir, "master.key"))
	if bytes.Equal(cur, old) {
		t.Fatal("master key unchanged")
	}
	files, _ := filepath.Glob(filepath.Join(dir, "keys", "*.sealed"))
	if len(files) < 3 { // the authority's key and two certificate keys
		t.Fatalf("%d sealed files", len(files))
	}
	for _, f := range files {
		var sk struct {
			Name     string `json:"name"`
			DEKNonce []byte `json:"dek_nonce"`
			DEK      []byte `json:"dek"`
		}
		b, _ := os.ReadFile(f)
		if err := json.Unmarshal(b, &sk); err != nil {
			t.Fatal(err)
		}
		for _, key := range [][]byte{old, cur} {
			blk, _ := aes.NewCipher(key)
			g, _ := cipher.NewGCM(blk)
			_, err2 := g.Open(nil, sk.DEKNonce, sk.DEK, []byte("fulcrum/dek/v2"))
			_, err1 := g.Open(nil, sk.DEKNonce, sk.DEK, []byte("fulcrum/dek/v1/"+sk.Name))
			opens := err1 == nil || err2 == nil
			if bytes.Equal(key, old) && opens {
				t.Errorf("%s opens with the old master key", f)
			}
			if bytes.Equal(key, cur) && !opens {
				t.Errorf("%s does not open with the new master key", f)
			}
		}
	}
	d.stop()
	recs := readAudit(t, filepath.Join(dir, "audit.log"))
	n := 0
	for _, r := range recs {
		if r.Action == "rotate-master-key" && r.Identity == "token:sec-team" && r.Result == "ok" {
			n++
		}
		if strings.Contains(r.Action, "rotate-master-key") && r.Identity == "token:deploy" && r.Result != "denied" {
			t.Errorf("operator's rotation: %+v", r)
		}
	}
	if n != 1 {
		t.Fatalf("%d rotation audit lines", n)
	}
}
