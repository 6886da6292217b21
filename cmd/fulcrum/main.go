// Command fulcrum is the Fulcrum load balancer: classic, application and network listeners from
// one TOML file, with certificates whose keys stay in a keystore (PKCS#11 HSM or software).
//
//	fulcrum [run] -config FILE          start; SIGHUP reloads, SIGTERM/SIGINT drain then exit
//	fulcrum validate -config FILE       exit 0 if valid; else print every problem and exit 1
//	fulcrum certs list|show NAME|renew NAME|import NAME -cert F -key F|export NAME -config FILE
//	fulcrum version
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	"github.com/fulcrum-lb/fulcrum/configs"
)

// version is set at build time with -ldflags "-X main.version=..."; otherwise the module's.
var version = ""

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return cmdRun(args, stdout, stderr)
	case "validate":
		return cmdValidate(args, stdout, stderr)
	case "certs":
		return cmdCerts(args, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "fulcrum", versionString())
		return 0
	case "help", "-h", "--help":
		usage(stdout)
		return 0
	default:
		fmt.Fprintf(stderr, "fulcrum: unknown command %q\n", cmd)
		usage(stderr)
		return 2
	}
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  fulcrum [run] -config FILE          start; SIGHUP reloads, SIGTERM/SIGINT drain then exit
  fulcrum validate -config FILE       exit 0 if the file is valid; else print every problem, exit 1
  fulcrum certs list|show NAME|renew NAME|import NAME -cert F -key F|export NAME  -config FILE
  fulcrum version
`)
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
}

// configFlag parses "-config FILE" (and nothing else unless extra is given).
func configFlag(name string, args []string, stderr io.Writer, extra func(*flag.FlagSet)) (*flag.FlagSet, string, bool) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "fulcrum.toml", "configuration file")
	if extra != nil {
		extra(fs)
	}
	if err := fs.Parse(args); err != nil {
		return nil, "", false
	}
	return fs, *path, true
}

func cmdValidate(args []string, stdout, stderr io.Writer) int {
	_, path, ok := configFlag("validate", args, stderr, nil)
	if !ok {
		return 2
	}
	cfg, err := configs.LoadFile(path)
	if err != nil {
		printConfigError(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: valid (%d listeners, %d target groups, %d certificates, %d authorities)\n",
		path, len(cfg.Listeners), len(cfg.TargetGroups), len(cfg.Certificates), len(cfg.Authorities))
	return 0
}

// printConfigError prints the problems, one per line: the configs package joins them.
func printConfigError(w io.Writer, err error) {
	fmt.Fprintln(w, err)
}
