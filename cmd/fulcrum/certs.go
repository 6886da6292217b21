package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/configs"
)

const certsHelp = `Usage:
  fulcrum certs SUBCOMMAND [flags] [NAME] [FILE]

Subcommands (each answers --help):
  list                          every certificate: kind, domains, expiry, serial, key location
  show NAME                     one certificate in detail
  renew NAME                    renew now (through the running fulcrum's admin API when it is up)
  import NAME -cert F -key F    import a certificate; its key goes into the keystore
  import NAME -cert F -keystore-key KEY   a certificate for a key already in the keystore
                                (imported wrapped with fulcrum keys import)
  export NAME                   the certificate chain, PEM
  authorities                   the private authorities: subject, expiry, fingerprint
  export-authority NAME         an authority's CA certificate, PEM, for clients to trust

The configuration file is -config FILE or the last argument (default ./fulcrum.toml); flags and
arguments may come in any order. -o json prints the admin API's snake_case objects.

Examples:
  fulcrum certs list /etc/fulcrum/fulcrum.toml
  fulcrum certs show www -o json -config /etc/fulcrum/fulcrum.toml
  fulcrum certs export-authority internal fulcrum.toml > internal-ca.pem
  fulcrum certs import legacy -cert legacy.pem -key legacy.key fulcrum.toml
`

// certsSub describes one `fulcrum certs` subcommand.
type certsSub struct {
	synopsis, help string
	needsName      bool
	output         bool // takes -o table|json
	examples       []string
}

var certsSubs = map[string]certsSub{
	"list": {synopsis: "fulcrum certs list [-o table|json] [-config] FILE", output: true,
		help:     "Lists every certificate of the configuration: kind, domains, expiry, serial and where its key is.\n",
		examples: []string{"fulcrum certs list fulcrum.toml", "fulcrum certs list -o json -config fulcrum.toml | jq '.[].not_after'"}},
	"show": {synopsis: "fulcrum certs show NAME [-o json|table] [-config] FILE", needsName: true, output: true,
		help:     "Shows one certificate with the admin API's field names (GET /admin/certificates).\n",
		examples: []string{"fulcrum certs show www fulcrum.toml", "fulcrum certs show -config fulcrum.toml -o table www"}},
	"renew": {synopsis: "fulcrum certs renew NAME [-config] FILE", needsName: true,
		help: "Renews a certificate now. With a running fulcrum (its admin endpoint answers), the running\n" +
			"process renews and serves the new certificate at once; otherwise it is renewed in state_dir\n" +
			"and served after the next start or reload.\n",
		examples: []string{"fulcrum certs renew www fulcrum.toml"}},
	"import": {synopsis: "fulcrum certs import NAME -cert FILE (-key FILE | -keystore-key KEY) [-config] FILE", needsName: true,
		help: "Imports an externally issued certificate: the key is generated into (HSM) or sealed in\n" +
			"(software) the keystore, so the key file is no longer needed afterwards. With -keystore-key\n" +
			"the certificate uses a key already in the keystore (see fulcrum keys import), which a key\n" +
			"pending deletion cannot be.\n",
		examples: []string{"fulcrum certs import legacy -cert legacy.pem -key legacy.key fulcrum.toml",
			"fulcrum certs import legacy -cert legacy.pem -keystore-key legacy-key fulcrum.toml"}},
	"export": {synopsis: "fulcrum certs export NAME [-config] FILE", needsName: true,
		help:     "Prints the certificate chain as PEM (never the key).\n",
		examples: []string{"fulcrum certs export www fulcrum.toml > www.pem"}},
	"authorities": {synopsis: "fulcrum certs authorities [-o table|json] [-config] FILE", output: true,
		help:     "Lists the private certificate authorities: subject, validity, SHA-256 fingerprint, the file\nits certificate is stored in and where its key is.\n",
		examples: []string{"fulcrum certs authorities fulcrum.toml", "fulcrum certs authorities -o json fulcrum.toml"}},
	"export-authority": {synopsis: "fulcrum certs export-authority NAME [-config] FILE", needsName: true,
		help:     "Prints an authority's CA certificate as PEM: what clients and targets must trust.\n",
		examples: []string{"fulcrum certs export-authority internal fulcrum.toml > /usr/local/share/ca-certificates/internal.crt"}},
}

// cmdCerts runs the certificate subcommands against the configuration's keystore and state
// directory. renew goes through the running process's admin API when there is one, so the new
// certificate is served at once; otherwise it renews in the state directory.
func cmdCerts(args []string, stdout, stderr io.Writer) int {
	// The subcommand is the first argument that is not a flag or a flag's value.
	sub, rest := "", []string(nil)
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "-h" || a == "-help" || a == "--help" {
			if sub == "" {
				fmt.Fprint(stdout, certsHelp)
				return 0
			}
		}
		if sub == "" && !strings.HasPrefix(a, "-") {
			sub = a
			rest = append(append(rest, args[:i]...), args[i+1:]...)
			break
		}
		if sub == "" && !strings.Contains(a, "=") && (a == "-config" || a == "--config" || a == "-o" || a == "--o" || a == "-cert" || a == "--cert" || a == "-key" || a == "--key" || a == "-keystore-key" || a == "--keystore-key") {
			i++ // its value
		}
	}
	spec, ok := subcommand("certs", sub, certsHelp, certsSubs, stderr)
	if !ok {
		return 2
	}
	fs := newFlags("certs "+sub, spec.synopsis, spec.help, spec.examples...)
	cf := addConfig(fs)
	var certFile, keyFile, ksKey, output string
	if sub == "import" {
		fs.StringVar(&certFile, "cert", "", "PEM certificate chain to import")
		fs.StringVar(&keyFile, "key", "", "PEM private key to import into the keystore")
		fs.StringVar(&ksKey, "keystore-key", "", "use this key already in the keystore (fulcrum keys import) instead of -key")
	}
	if spec.output {
		def := "table"
		if sub == "show" {
			def = "json"
		}
		fs.StringVar(&output, "o", def, "output format: table or json")
	}
	maxArgs := 1
	if spec.needsName {
		maxArgs = 2
	}
	pos, code, ok := parse(fs, rest, stdout, stderr, maxArgs)
	if !ok {
		return code
	}
	var name string
	if spec.needsName {
		if len(pos) == 0 {
			fmt.Fprintf(stderr, "fulcrum certs %s: missing NAME (see fulcrum certs %s --help)\n", sub, sub)
			return 2
		}
		name, pos = pos[0], pos[1:]
	}
	if output != "" && output != "table" && output != "json" {
		fmt.Fprintf(stderr, "fulcrum certs %s: -o %q: want table or json\n", sub, output)
		return 2
	}
	if sub == "import" && (certFile == "" || (keyFile == "") == (ksKey == "")) {
		fmt.Fprintln(stderr, "fulcrum certs import: -cert and one of -key or -keystore-key are required")
		return 2
	}
	path, cfg, code := cf.load(fs, pos, stderr)
	if cfg == nil {
		return code
	}
	if sub == "renew" && cfg.Server.Admin != "" {
		if done, err := renewViaAdmin(cfg, name); done {
			if err != nil {
				fmt.Fprintf(stderr, "fulcrum certs renew %s: %v\n", name, err)
				return 1
			}
			fmt.Fprintf(stdout, "%s: renewed by the running fulcrum\n", name)
			return 0
		}
	}

	mcfg := cfg
	if sub == "import" {
		// The configuration may already name the certificate (imported = true), which cannot
		// load before it is imported: the import needs only the keystore and the state dir.
		c := *cfg
		c.Certificates, c.Listeners, c.TargetGroups = nil, nil, nil
		mcfg = &c
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	m, err := certs.NewManager(ctx, mcfg, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		fmt.Fprintf(stderr, "fulcrum certs %s: %v\n", sub, err)
		return 1
	}
	defer m.Close()

	switch sub {
	case "list":
		views := certificatesView(m.List(), time.Now())
		if output == "json" {
			return writeJSONTo(stdout, views)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tKIND\tDOMAINS\tNOT_AFTER\tRENEW_AT\tSERIAL\tKEY_LOCATION")
		for _, c := range views {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.Name, c.Kind, strings.Join(c.Domains, ","), c.NotAfter.Format(time.RFC3339), orDash(c.RenewAt), c.Serial, c.KeyLocation)
		}
		tw.Flush()
	case "show":
		for _, c := range certificatesView(m.List(), time.Now()) {
			if c.Name == name {
				if output == "json" {
					return writeJSONTo(stdout, c)
				}
				return writeFields(stdout, c)
			}
		}
		fmt.Fprintf(stderr, "fulcrum certs show: no certificate %q in %s\n", name, path)
		return 1
	case "renew":
		if err := m.Renew(name); err != nil {
			fmt.Fprintf(stderr, "fulcrum certs renew %s: %v\n", name, err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: renewed in %s (reload a running fulcrum to serve it)\n", name, cfg.Server.StateDir)
	case "import":
		certPEM, err := os.ReadFile(certFile)
		if err != nil {
			fmt.Fprintf(stderr, "fulcrum certs import: %v\n", err)
			return 1
		}
		if ksKey != "" {
			if err := m.ImportKeystoreKey(name, certPEM, ksKey); err != nil {
				fmt.Fprintf(stderr, "fulcrum certs import %s: %v\n", name, err)
				return 1
			}
			fmt.Fprintf(stdout, "%s: imported for key %s in %s (reload a running fulcrum to serve it)\n", name, ksKey, m.Keystore().Describe())
			return 0
		}
		keyPEM, err := os.ReadFile(keyFile)
		if err != nil {
			fmt.Fprintf(stderr, "fulcrum certs import: %v\n", err)
			return 1
		}
		if err := m.Import(name, certPEM, keyPEM); err != nil {
			fmt.Fprintf(stderr, "fulcrum certs import %s: %v\n", name, err)
			return 1
		}
		where := "sealed in the software keystore"
		if d := m.Keystore().Describe(); d != "software" {
			where = "in " + d + ", not extractable"
		}
		fmt.Fprintf(stdout, "%s: imported; the key is %s (the key file is no longer needed)\n", name, where)
	case "export":
		pem, err := m.Export(name)
		if err != nil {
			fmt.Fprintf(stderr, "fulcrum certs export %s: %v\n", name, err)
			return 1
		}
		stdout.Write(pem)
	case "authorities":
		views := authoritiesView(cfg, m)
		if output == "json" {
			return writeJSONTo(stdout, views)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tSUBJECT\tNOT_AFTER\tSHA256_FINGERPRINT\tCERTIFICATE_FILE\tKEY_LOCATION")
		for _, a := range views {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", a.Name, a.Subject, a.NotAfter.Format(time.RFC3339), a.SHA256Fingerprint, a.CertificateFile, a.KeyLocation)
		}
		tw.Flush()
	case "export-authority":
		a := m.Authority(name)
		if a == nil {
			fmt.Fprintf(stderr, "fulcrum certs export-authority: no authority %q in %s\n", name, path)
			return 1
		}
		stdout.Write(a.CertPEM)
	}
	return 0
}

// authorityView is one private authority, with the admin API's naming.
type authorityView struct {
	Name              string    `json:"name"`
	Subject           string    `json:"subject"`
	Serial            string    `json:"serial"`
	NotBefore         time.Time `json:"not_before"`
	NotAfter          time.Time `json:"not_after"`
	SHA256Fingerprint string    `json:"sha256_fingerprint"`
	CertificateFile   string    `json:"certificate_file"`
	KeyLocation       string    `json:"key_location"`
	KeyName           string    `json:"key_name"`
	// State is "ok", or "key_lost" when the key left the keystore: what the authority issued
	// keeps serving, it issues and renews nothing (Error says why and what to do).
	State string `json:"state"`
	Error string `json:"error,omitempty"`
}

func authoritiesView(cfg *configs.Config, m *certs.Manager) []authorityView {
	out := []authorityView{}
	for _, ac := range cfg.Authorities {
		a := m.Authority(ac.Name)
		if a == nil {
			continue
		}
		sum := sha256.Sum256(a.Cert.Raw)
		state, why := "ok", ""
		if err := a.KeyLost(); err != nil {
			state, why = "key_lost", err.Error()
		}
		out = append(out, authorityView{
			State: state, Error: why,
			Name: a.Name, Subject: a.Cert.Subject.String(), Serial: fmt.Sprintf("%x", a.Cert.SerialNumber),
			NotBefore: a.Cert.NotBefore.UTC(), NotAfter: a.Cert.NotAfter.UTC(),
			SHA256Fingerprint: hex.EncodeToString(sum[:]),
			CertificateFile:   filepath.Join(cfg.StateDirPath(), "authorities", a.Name+".pem"),
			KeyLocation:       m.Keystore().Describe(),
			KeyName:           a.KeyName(),
		})
	}
	return out
}

func writeJSONTo(w io.Writer, v any) int {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return 1
	}
	return 0
}

// writeFields prints a JSON object's fields as "key: value" lines, in the JSON names.
func writeFields(w io.Writer, v any) int {
	b, err := json.Marshal(v)
	if err != nil {
		return 1
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.Token() // {
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	for dec.More() {
		k, _ := dec.Token()
		var raw json.RawMessage
		dec.Decode(&raw)
		val := strings.Trim(string(raw), `"`)
		fmt.Fprintf(tw, "%s:\t%s\n", k, val)
	}
	tw.Flush()
	return 0
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// renewViaAdmin asks a running fulcrum to renew, with the admin credentials of
// $FULCRUM_ADMIN_TOKEN; done is false when nothing listens there.
func renewViaAdmin(cfg *configs.Config, name string) (done bool, err error) {
	c, err := newAdminClient(cfg, adminFlags{})
	if err != nil {
		return true, err
	}
	return c.do("POST", "/admin/certificates/"+name+"/renew", nil, nil)
}
