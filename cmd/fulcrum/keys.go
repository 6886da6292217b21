package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// adminFlags are the credentials the CLI presents to the admin endpoint.
type adminFlags struct {
	token, cert, key, ca string
}

func (a *adminFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&a.token, "admin-token", "", "admin bearer token: \"env:NAME\" or \"file:PATH\" (default $FULCRUM_ADMIN_TOKEN)")
	fs.StringVar(&a.cert, "admin-cert", "", "client certificate (PEM) for the admin endpoint")
	fs.StringVar(&a.key, "admin-key", "", "private key (PEM) of -admin-cert")
	fs.StringVar(&a.ca, "admin-ca", "", "authority (PEM) of the admin endpoint's certificate")
}

// adminClient talks to the running process's admin endpoint with the operator's credentials.
type adminClient struct {
	base  string
	token string
	hc    *http.Client
}

func newAdminClient(cfg *configs.Config, f adminFlags) (*adminClient, error) {
	if cfg.Server.Admin == "" {
		return nil, errors.New("the configuration has no admin endpoint ([server] admin): key administration goes through the running fulcrum")
	}
	c := &adminClient{base: "http://" + cfg.Server.Admin, hc: &http.Client{Timeout: 2 * time.Minute}}
	switch {
	case f.token != "":
		t, err := keystore.ReadSecret(f.token, nil)
		if err != nil {
			return nil, fmt.Errorf("-admin-token: %w", err)
		}
		c.token = t
	default:
		c.token = strings.TrimSpace(os.Getenv("FULCRUM_ADMIN_TOKEN"))
	}
	if cfg.Server.AdminTLSCertificate == "" {
		if f.cert != "" {
			return nil, errors.New("-admin-cert: the admin endpoint speaks plain HTTP (no admin_tls_certificate)")
		}
		return c, nil
	}
	host, _, err := net.SplitHostPort(cfg.Server.Admin)
	if err != nil {
		return nil, err
	}
	tc := &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	caFile := f.ca
	if caFile == "" {
		for _, ct := range cfg.Certificates {
			if ct.Name == cfg.Server.AdminTLSCertificate && ct.Authority != "" {
				caFile = filepath.Join(cfg.StateDirPath(), "authorities", ct.Authority+".pem")
			}
		}
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("admin endpoint authority: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("admin endpoint authority %s: no PEM certificate", caFile)
		}
	}
	if f.cert != "" || f.key != "" {
		kp, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return nil, fmt.Errorf("-admin-cert/-admin-key: %w", err)
		}
		tc.Certificates = []tls.Certificate{kp}
	}
	c.base = "https://" + cfg.Server.Admin
	c.hc.Transport = &http.Transport{TLSClientConfig: tc}
	return c, nil
}

// do sends in as JSON and decodes the answer into out; an answer other than 200 is an error
// carrying the endpoint's message. reached is false when nothing answered at all.
func (c *adminClient) do(method, path string, in, out any) (reached bool, err error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return false, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.base+path, body)
	if err != nil {
		return false, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return false, fmt.Errorf("admin endpoint %s: %w (is fulcrum running?)", c.base, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(raw, &e) == nil && e.Error != "" {
			return true, fmt.Errorf("%s (%d)", e.Error, resp.StatusCode)
		}
		return true, fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(raw))
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return true, fmt.Errorf("admin answer: %w", err)
		}
	}
	return true, nil
}

const keysHelp = `Usage:
  fulcrum keys SUBCOMMAND [flags] [NAME] [FILE]

Key administration through the running fulcrum's admin endpoint, which holds the keys, enforces
deletion schedules and writes the audit log. Reading needs the viewer role, the rest key_admin.

Subcommands (each answers --help):
  list                                  every key: state, deletion date, origin, type, user, signatures
  schedule-deletion NAME [-days 7..30]  disable the key now, destroy it after the period (default 30)
  cancel-deletion NAME                  put a key pending deletion back in service
  import-params NAME [-type T] [-out D] a wrapping key (made in the keystore) and an import token (24 h)
  import NAME -wrapped F -token F       unwrap key material inside the keystore (README: openssl commands)

Admin credentials: -admin-token env:NAME|file:PATH (default $FULCRUM_ADMIN_TOKEN), or
-admin-cert F -admin-key F (client certificate), and -admin-ca F for the endpoint's authority.

Examples:
  fulcrum keys list /etc/fulcrum/fulcrum.toml
  fulcrum keys schedule-deletion old-key -days 7 -admin-token file:/etc/fulcrum/key-admin.token fulcrum.toml
  fulcrum keys import-params legacy -type rsa-2048 -out . fulcrum.toml
  fulcrum keys import legacy -wrapped legacy.wrapped -token legacy.import-token fulcrum.toml
`

// cmdKeys administers the keystore's keys through the running process, which holds the keys,
// enforces the schedule and writes the audit log.
func cmdKeys(args []string, stdout, stderr io.Writer) int {
	valued := map[string]bool{"config": true, "o": true, "admin-token": true, "admin-cert": true, "admin-key": true, "admin-ca": true,
		"days": true, "type": true, "out": true, "wrapped": true, "token": true}
	// The subcommand is the first argument that is not a flag or a flag's value.
	sub, rest := "", []string(nil)
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "-h" || a == "-help" || a == "--help" {
			fmt.Fprint(stdout, keysHelp)
			return 0
		}
		if !strings.HasPrefix(a, "-") {
			sub = a
			rest = append(append(rest, args[:i]...), args[i+1:]...)
			break
		}
		if n := strings.TrimLeft(a, "-"); !strings.Contains(n, "=") && valued[n] {
			i++
		}
	}
	known := map[string]string{
		"list":              "fulcrum keys list [admin credentials] [-config] FILE",
		"schedule-deletion": "fulcrum keys schedule-deletion NAME [-days 7..30] [admin credentials] [-config] FILE",
		"cancel-deletion":   "fulcrum keys cancel-deletion NAME [admin credentials] [-config] FILE",
		"import-params":     "fulcrum keys import-params NAME [-type T] [-out DIR] [admin credentials] [-config] FILE",
		"import":            "fulcrum keys import NAME -wrapped FILE -token FILE [admin credentials] [-config] FILE",
	}
	synopsis, ok := subcommand("keys", sub, keysHelp, known, stderr)
	if !ok {
		return 2
	}
	var (
		af               adminFlags
		days             int
		kt, out, output  string
		wrappedF, tokenF string
	)
	fs := newFlags("keys "+sub, synopsis, "See fulcrum keys --help.\n")
	cf := addConfig(fs)
	af.register(fs)
	switch sub {
	case "list":
		fs.StringVar(&output, "o", "table", "output format: table or json (the admin API's objects)")
	case "schedule-deletion":
		fs.IntVar(&days, "days", keystore.DefaultDeletionDays, "waiting period in days (7 to 30)")
	case "import-params":
		fs.StringVar(&kt, "type", configs.DefaultKeyType, "type of the key to import: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096")
		fs.StringVar(&out, "out", "", "write NAME.wrapping-key.pem and NAME.import-token in this directory")
	case "import":
		fs.StringVar(&wrappedF, "wrapped", "", "the wrapped key material (see the README for the openssl commands)")
		fs.StringVar(&tokenF, "token", "", "the import token file from import-params")
	}
	maxArgs := 2
	if sub == "list" {
		maxArgs = 1
	}
	pos, code, ok := parse(fs, rest, stdout, stderr, maxArgs)
	if !ok {
		return code
	}
	var name string
	if sub != "list" {
		if len(pos) == 0 {
			fmt.Fprintf(stderr, "fulcrum keys %s: missing key NAME (see fulcrum keys %s --help)\n", sub, sub)
			return 2
		}
		name, pos = pos[0], pos[1:]
	}
	if output != "" && output != "table" && output != "json" {
		fmt.Fprintf(stderr, "fulcrum keys list: -o %q: want table or json\n", output)
		return 2
	}
	if sub == "import" && (wrappedF == "" || tokenF == "") {
		fmt.Fprintln(stderr, "fulcrum keys import: -wrapped and -token are required")
		return 2
	}
	_, cfg, code := cf.load(fs, pos, stderr)
	if cfg == nil {
		return code
	}
	c, err := newAdminClient(cfg, af)
	if err != nil {
		fmt.Fprintf(stderr, "fulcrum keys %s: %v\n", sub, err)
		return 1
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "fulcrum keys %s %s: %v\n", sub, name, err)
		return 1
	}
	switch sub {
	case "list":
		var list []keystore.KeyInfo
		if _, err := c.do("GET", "/admin/keys", nil, &list); err != nil {
			return fail(err)
		}
		if output == "json" {
			return writeJSONTo(stdout, list)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tSTATE\tDELETION\tORIGIN\tTYPE\tUSED BY\tSIGNS\tERRORS")
		for _, k := range list {
			del := "-"
			if !k.DeletionDate.IsZero() {
				del = k.DeletionDate.UTC().Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", k.Name, k.State, del, dash(k.Origin), dash(k.Type), dash(k.UsedBy), k.Signs, k.SignErrors)
		}
		tw.Flush()
	case "schedule-deletion":
		var res struct {
			DeletionDate time.Time `json:"deletion_date"`
		}
		if _, err := c.do("POST", "/admin/keys/"+name+"/schedule-deletion", map[string]int{"days": days}, &res); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "%s: pending deletion; it no longer signs and is destroyed on %s unless cancelled (fulcrum keys cancel-deletion %s)\n",
			name, res.DeletionDate.UTC().Format(time.RFC3339), name)
	case "cancel-deletion":
		if _, err := c.do("POST", "/admin/keys/"+name+"/cancel-deletion", nil, nil); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "%s: deletion cancelled; the key signs again\n", name)
	case "import-params":
		var p keystore.ImportParams
		if _, err := c.do("POST", "/admin/keys/"+name+"/import-params", map[string]string{"key_type": kt}, &p); err != nil {
			return fail(err)
		}
		if out == "" {
			fmt.Fprint(stdout, p.PublicKeyPEM)
			fmt.Fprintf(stdout, "import token (expires %s): %s\n", p.Expires.UTC().Format(time.RFC3339), p.ImportToken)
			return 0
		}
		pubF, tokF := filepath.Join(out, name+".wrapping-key.pem"), filepath.Join(out, name+".import-token")
		if err := os.WriteFile(pubF, []byte(p.PublicKeyPEM), 0o644); err != nil {
			return fail(err)
		}
		if err := os.WriteFile(tokF, []byte(p.ImportToken+"\n"), 0o600); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "%s: wrapping key %s, import token %s (expires %s)\nwrap a %s key with %s (see README \"Importing wrapped keys\"), then:\n  fulcrum keys import %s -wrapped FILE -token %s\n",
			name, pubF, tokF, p.Expires.UTC().Format(time.RFC3339), p.KeyType, p.Algorithm, name, tokF)
	case "import":
		blob, err := os.ReadFile(wrappedF)
		if err != nil {
			return fail(err)
		}
		tok, err := os.ReadFile(tokenF)
		if err != nil {
			return fail(err)
		}
		var res struct {
			Location string `json:"location"`
		}
		req := map[string]any{"wrapped": blob, "import_token": strings.TrimSpace(string(tok))}
		if _, err := c.do("POST", "/admin/keys/"+name+"/import", req, &res); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "%s: imported into %s (unwrapped there; sensitive, not extractable)\n", name, res.Location)
	}
	return 0
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
