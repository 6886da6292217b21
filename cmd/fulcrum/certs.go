package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"text/tabwriter"
	"time"

	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// cmdCerts runs the certificate subcommands against the configuration's keystore and state
// directory. renew goes through the running process's admin API when there is one, so the new
// certificate is served at once; otherwise it renews in the state directory.
func cmdCerts(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: fulcrum certs list|show NAME|renew NAME|import NAME -cert F -key F|export NAME -config FILE")
		return 2
	}
	sub, args := args[0], args[1:]
	var name string
	if sub != "list" {
		if len(args) == 0 || len(args[0]) == 0 || args[0][0] == '-' {
			fmt.Fprintf(stderr, "fulcrum certs %s: missing certificate NAME\n", sub)
			return 2
		}
		name, args = args[0], args[1:]
	}
	var certFile, keyFile string
	_, path, ok := configFlag("certs "+sub, args, stderr, func(fs *flag.FlagSet) {
		if sub == "import" {
			fs.StringVar(&certFile, "cert", "", "PEM certificate chain to import")
			fs.StringVar(&keyFile, "key", "", "PEM private key to import into the keystore")
		}
	})
	if !ok {
		return 2
	}
	cfg, err := configs.LoadFile(path)
	if err != nil {
		printConfigError(stderr, err)
		return 1
	}
	if sub == "renew" && cfg.Server.Admin != "" {
		if done, err := renewViaAdmin(cfg.Server.Admin, name); done {
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
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tKIND\tDOMAINS\tNOT AFTER\tSERIAL\tKEY")
		for _, c := range m.List() {
			fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\t%s\n", c.Name, c.Kind, c.Domains, c.NotAfter.UTC().Format(time.RFC3339), c.Serial, c.KeyLocation)
		}
		tw.Flush()
	case "show":
		for _, c := range m.List() {
			if c.Name == name {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				enc.Encode(c)
				return 0
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
		if certFile == "" || keyFile == "" {
			fmt.Fprintln(stderr, "fulcrum certs import: -cert and -key are required")
			return 2
		}
		certPEM, err := os.ReadFile(certFile)
		if err != nil {
			fmt.Fprintf(stderr, "fulcrum certs import: %v\n", err)
			return 1
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
	default:
		fmt.Fprintf(stderr, "fulcrum certs: unknown subcommand %q\n", sub)
		return 2
	}
	return 0
}

// renewViaAdmin asks a running fulcrum to renew; done is false when nothing listens there.
func renewViaAdmin(admin, name string) (done bool, err error) {
	c := &http.Client{Timeout: 2 * time.Minute}
	resp, err := c.Post("http://"+admin+"/admin/certificates/"+name+"/renew", "", nil)
	if err != nil {
		return false, nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return true, errors.New(string(body))
	}
	return true, nil
}
