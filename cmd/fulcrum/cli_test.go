package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func cliRun(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

// minimalConfig is a valid configuration with one HTTP listener on addr.
func minimalConfig(dir, admin, addr string) string {
	return configHead(dir, admin, "") + fmt.Sprintf(`
[[target_groups]]
name = "web"
protocol = "http"
targets = ["127.0.0.1:9"]

[[listeners]]
name = "public"
style = "application"
protocol = "http"
address = %q
default_action = { forward = "web" }
`, addr)
}

// TestCLIConfigPath: the configuration is -config FILE or the one positional FILE, never a
// silent ./fulcrum.toml instead of what was asked.
func TestCLIConfigPath(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	writeConfig(t, good, minimalConfig(dir, "", "127.0.0.1:18080"))
	bad := filepath.Join(dir, "bad.toml")
	writeConfig(t, bad, "[server]\nadmn = \"x\"\n")
	// A valid ./fulcrum.toml in the working directory must not be what a positional names.
	wd, _ := os.Getwd()
	t.Chdir(dir)
	defer os.Chdir(wd)
	writeConfig(t, filepath.Join(dir, "fulcrum.toml"), minimalConfig(dir, "", "127.0.0.1:18081"))

	for _, args := range [][]string{{"validate", bad}, {"validate", "-config", bad}, {"validate", "-config=" + bad}} {
		if code, out, errs := cliRun(args...); code != 1 || !strings.Contains(errs, "bad.toml") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 1 naming bad.toml", args, code, out, errs)
		}
	}
	if code, out, errs := cliRun("validate", good); code != 0 || !strings.HasPrefix(out, good+": valid") {
		t.Errorf("validate good: exit %d %q %q", code, out, errs)
	}
	if code, out, _ := cliRun("validate"); code != 0 || !strings.HasPrefix(out, "fulcrum.toml: valid") {
		t.Errorf("validate with ./fulcrum.toml: exit %d %q", code, out)
	}
	if code, _, errs := cliRun("validate", "-config", good, bad); code != 2 || !strings.Contains(errs, "two configuration files") {
		t.Errorf("two files: exit %d %q", code, errs)
	}
	if code, _, errs := cliRun("validate", good, bad); code != 2 || !strings.Contains(errs, "unexpected argument") {
		t.Errorf("two positionals: exit %d %q", code, errs)
	}
	if code, _, errs := cliRun("validate", filepath.Join(dir, "missing.toml")); code != 1 || !strings.Contains(errs, "missing.toml") {
		t.Errorf("missing file: exit %d %q", code, errs)
	}
	// Without a file anywhere: an error saying what to do, not a default.
	os.Remove(filepath.Join(dir, "fulcrum.toml"))
	if code, _, errs := cliRun("validate"); code != 2 || !strings.Contains(errs, "no configuration file given") {
		t.Errorf("no file: exit %d %q", code, errs)
	}
	// `fulcrum run FILE` and `fulcrum FILE` read FILE (a bad one stops them before anything starts).
	for _, args := range [][]string{{"run", bad}, {bad}, {"-config", bad}} {
		if code, _, errs := cliRun(args...); code != 1 || !strings.Contains(errs, "bad.toml") {
			t.Errorf("%q: exit %d %q", args, code, errs)
		}
	}
}

// TestCLIHelp: --help (and -h, help COMMAND) on every command and subcommand prints usage with
// examples on stdout and exits 0.
func TestCLIHelp(t *testing.T) {
	cmds := [][]string{{}, {"run"}, {"validate"}, {"certs"}, {"version"}}
	for sub := range certsSubs {
		cmds = append(cmds, []string{"certs", sub})
	}
	for _, c := range cmds {
		for _, h := range []string{"--help", "-h"} {
			code, out, errs := cliRun(append(append([]string{}, c...), h)...)
			if code != 0 || !strings.Contains(out, "Usage") || errs != "" {
				t.Errorf("%q %s: exit %d, stdout %q, stderr %q", c, h, code, out, errs)
			}
			if len(c) > 0 && c[0] != "version" && !strings.Contains(out, "Examples:") {
				t.Errorf("%q %s: no examples:\n%s", c, h, out)
			}
		}
	}
	if code, out, _ := cliRun("help", "validate"); code != 0 || !strings.Contains(out, "fulcrum validate") {
		t.Errorf("help validate: %d %q", code, out)
	}
	if code, _, errs := cliRun("frobnicate"); code != 2 || !strings.Contains(errs, "unknown command") {
		t.Errorf("unknown command: %d %q", code, errs)
	}
	if code, _, errs := cliRun("certs", "frobnicate", "x"); code != 2 || !strings.Contains(errs, "unknown subcommand") {
		t.Errorf("unknown certs subcommand: %d %q", code, errs)
	}
}

// TestCLIVersion builds the binary from the repository, as `go build` does, and reads back the
// module version and the commit from --version.
func TestCLIVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"version"}, {"-version"}} {
		if code, out, _ := cliRun(args...); code != 0 || !strings.HasPrefix(out, "fulcrum ") || !strings.Contains(out, "module ") {
			t.Errorf("%q: %d %q", args, code, out)
		}
	}
	rev, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Skipf("not in a git work tree (%v): the commit cannot be checked", err)
	}
	// go build stamps no VCS information in a linked work tree (git worktree add): CI's clone is
	// a plain one, where this runs.
	gd, _ := exec.Command("git", "rev-parse", "--absolute-git-dir").Output()
	cd, _ := exec.Command("git", "rev-parse", "--path-format=absolute", "--git-common-dir").Output()
	if !bytes.Equal(gd, cd) {
		t.Skip("linked git work tree: go build records no commit here")
	}
	bin := filepath.Join(t.TempDir(), "fulcrum")
	build := exec.Command("go", "build", "-buildvcs=true", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	want := regexp.MustCompile(`^fulcrum \S+ \(module \S+, commit ` + strings.TrimSpace(string(rev)) + ` of \S+`)
	if !want.Match(out) {
		t.Fatalf("--version = %q, want module version and commit %s", out, rev)
	}
}

// TestValidateStartFailures: what configs.Load accepts but `fulcrum run` could not start with.
func TestValidateStartFailures(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM, _ := externalCert(t, "a.example.test")
	_, otherKey, _ := externalCert(t, "b.example.test")
	os.WriteFile(filepath.Join(dir, "a.pem"), certPEM, 0o600)
	os.WriteFile(filepath.Join(dir, "a.key"), keyPEM, 0o600)
	os.WriteFile(filepath.Join(dir, "b.key"), otherKey, 0o600)
	os.WriteFile(filepath.Join(dir, "notca.pem"), []byte("not a certificate\n"), 0o600)

	cases := []struct {
		name, admin, extra, want string
	}{
		{"admin on a listener's address", "127.0.0.1:18090", "", `listeners[0] ("public"): address 127.0.0.1:18090 conflicts with the admin endpoint`},
		{"admin wildcard on the listener's port", "0.0.0.0:18090", "", `conflicts with the admin endpoint`},
		{"missing cert_file", "", certificate("missing.pem", "a.key"), `certificates[0] ("imp"): cert_file missing.pem does not exist`},
		{"missing key_file", "", certificate("a.pem", "nokey.key"), `key_file nokey.key does not exist`},
		{"key of another certificate", "", certificate("a.pem", "b.key"), `cert_file a.pem and key_file b.key do not make a pair`},
		{"ca_file that is not one", "", "\n[[target_groups]]\nname = \"tls\"\nprotocol = \"https\"\ntargets = [\"127.0.0.1:9\"]\ntls = { ca_file = \"notca.pem\" }\n", `target_groups[1] ("tls"): ca_file notca.pem holds no PEM certificate`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			text := minimalConfig(dir, c.admin, "127.0.0.1:18090") + c.extra
			if strings.Contains(c.admin, "0.0.0.0") {
				text = strings.Replace(text, "[server]\n", "[server]\nadmin_allow_public = true\n", 1)
				text = strings.Replace(text, "admin_auth = \"none\"\n", "", 1) // loopback only
			}
			path := filepath.Join(dir, "f.toml")
			writeConfig(t, path, text)
			code, out, errs := cliRun("validate", path)
			if code != 1 || !strings.Contains(errs, c.want) || !strings.HasPrefix(errs, path+":") {
				t.Fatalf("exit %d, stdout %q, stderr %q; want exit 1 and %q", code, out, errs, c.want)
			}
		})
	}
	// The good pair passes.
	path := filepath.Join(dir, "ok.toml")
	writeConfig(t, path, minimalConfig(dir, "127.0.0.1:18091", "127.0.0.1:18090")+certificate("a.pem", "a.key"))
	if code, out, errs := cliRun("validate", path); code != 0 {
		t.Fatalf("valid file: exit %d %q %q", code, out, errs)
	}
}

func certificate(cert, key string) string {
	return fmt.Sprintf("\n[[certificates]]\nname = \"imp\"\ncert_file = %q\nkey_file = %q\n", cert, key)
}

// TestCertsCLI: flags and arguments in any order, -o json with the admin API's snake_case
// names, authorities listed and exported.
func TestCertsCLI(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "fulcrum.toml")
	writeConfig(t, path, configHead(dir, "", "")+`
[[authorities]]
name = "internal"

[[certificates]]
name = "www"
domains = ["www.example.test"]
authority = "internal"
`)
	var lists []string
	for _, args := range [][]string{
		{"certs", "list", "-o", "json", "-config", path},
		{"certs", "-config", path, "list", "-o", "json"},
		{"certs", "list", path, "-o=json"},
		{"certs", "-o", "json", "list", path},
	} {
		code, out, errs := cliRun(args...)
		if code != 0 {
			t.Fatalf("%q: exit %d %s", args, code, errs)
		}
		lists = append(lists, out)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(lists[0]), &list); err != nil || len(list) != 1 {
		t.Fatalf("list -o json: %v\n%s", err, lists[0])
	}
	for _, k := range []string{"name", "not_after", "key_location", "renew_at", "expires_in_seconds"} {
		if _, ok := list[0][k]; !ok {
			t.Errorf("list -o json has no %q: %v", k, list[0])
		}
	}
	for _, args := range [][]string{
		{"certs", "show", "www", "-config", path},
		{"certs", "show", "-config", path, "www"},
		{"certs", "-config", path, "show", "www", "-o", "json"},
		{"certs", "show", "www", path},
	} {
		code, out, errs := cliRun(args...)
		var v map[string]any
		if code != 0 || json.Unmarshal([]byte(out), &v) != nil || v["name"] != "www" || v["key_location"] == nil {
			t.Errorf("%q: exit %d %q %q", args, code, out, errs)
		}
	}
	if code, out, _ := cliRun("certs", "show", "www", "-o", "table", path); code != 0 || !strings.Contains(out, "not_after:") {
		t.Errorf("show -o table: %d %q", code, out)
	}
	if code, out, _ := cliRun("certs", "list", path); code != 0 || !strings.Contains(out, "NOT_AFTER") || !strings.Contains(out, "www") {
		t.Errorf("list table: %d %q", code, out)
	}
	if code, _, errs := cliRun("certs", "show", path); code != 2 && code != 1 {
		t.Errorf("show without NAME: %d %q", code, errs)
	}

	code, out, errs := cliRun("certs", "authorities", "-o", "json", path)
	var auths []authorityView
	if code != 0 || json.Unmarshal([]byte(out), &auths) != nil || len(auths) != 1 || auths[0].Name != "internal" || auths[0].SHA256Fingerprint == "" {
		t.Fatalf("authorities: exit %d %q %q", code, out, errs)
	}
	code, out, errs = cliRun("certs", "export-authority", "internal", path)
	blk, _ := pem.Decode([]byte(out))
	if code != 0 || blk == nil {
		t.Fatalf("export-authority: exit %d %q %q", code, out, errs)
	}
	ca, err := x509.ParseCertificate(blk.Bytes)
	if err != nil || !ca.IsCA || auths[0].Subject != ca.Subject.String() {
		t.Fatalf("exported authority: %v, CA %v, subject %q vs %q", err, ca != nil && ca.IsCA, ca.Subject, auths[0].Subject)
	}
	stored, _ := os.ReadFile(auths[0].CertificateFile)
	if !bytes.Equal(stored, []byte(out)) {
		t.Errorf("certificate_file %s does not hold what export-authority printed", auths[0].CertificateFile)
	}
	if code, _, errs := cliRun("certs", "export-authority", "nope", path); code != 1 || !strings.Contains(errs, "no authority") {
		t.Errorf("unknown authority: %d %q", code, errs)
	}
}
