// Command fulcrum is the Fulcrum load balancer: classic, application and network listeners from
// one TOML file, with certificates whose keys stay in a keystore (PKCS#11 HSM or software).
//
//	fulcrum [run] [-config] FILE        start; SIGHUP reloads, SIGUSR2 upgrades the binary,
//	                                    SIGTERM/SIGINT drain then exit
//	fulcrum validate [-config] FILE     exit 0 if it can start; else print every problem, exit 1
//	fulcrum certs SUBCOMMAND ...        list, show, renew, import, export certificates and authorities
//	fulcrum keys SUBCOMMAND ...         list keys, schedule or cancel deletion, import wrapped keys
//	fulcrum version | --version
//
// Every command and subcommand answers --help with its flags and examples.
package main

import (
	"errors"
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

const mainHelp = `Fulcrum: a TLS load balancer with ELB-style listeners configured in one TOML file.

Usage:
  fulcrum [run] [-config] FILE       start; SIGHUP reloads, SIGUSR2 starts the binary on disk
                                     on the same sockets (upgrade), SIGTERM/SIGINT drain then exit
  fulcrum validate [-config] FILE    check that FILE would start; exit 1 and list every problem
  fulcrum certs SUBCOMMAND ...       certificates and authorities (fulcrum certs --help)
  fulcrum keys SUBCOMMAND ...        keystore keys through the admin endpoint (fulcrum keys --help)
  fulcrum version                    version, module version and commit (also --version)
  fulcrum help [COMMAND]             this text, or a command's (also COMMAND --help)

The configuration file is named either by -config FILE or as the one argument; with neither,
./fulcrum.toml is used, and the commands print which file they read.

Examples:
  fulcrum validate configs/quickstart.toml
  fulcrum run -config /etc/fulcrum/fulcrum.toml
  fulcrum certs list -o json /etc/fulcrum/fulcrum.toml
`

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 {
		switch a := args[0]; {
		case a == "-h" || a == "-help" || a == "--help" || a == "help":
			if a == "help" && len(args) > 1 {
				return run([]string{args[1], "--help"}, stdout, stderr)
			}
			fmt.Fprint(stdout, mainHelp)
			return 0
		case a == "-version" || a == "--version" || a == "-V":
			cmd, args = "version", args[1:]
		case !strings.HasPrefix(a, "-") && !looksLikeConfig(a):
			cmd, args = a, args[1:]
		}
	}
	switch cmd {
	case "run":
		return cmdRun(args, stdout, stderr)
	case "validate":
		return cmdValidate(args, stdout, stderr)
	case "certs":
		return cmdCerts(args, stdout, stderr)
	case "keys":
		return cmdKeys(args, stdout, stderr)
	case "version":
		fs := newFlags("version", "fulcrum version", "Prints the release, the Go module version and the VCS commit the binary was built from.\n", "fulcrum --version")
		if _, code, ok := parse(fs, args, stdout, stderr, 0); !ok {
			return code
		}
		fmt.Fprintln(stdout, versionLine())
		return 0
	default:
		fmt.Fprintf(stderr, "fulcrum: unknown command %q (commands: run, validate, certs, keys, version; see fulcrum --help)\n", cmd)
		return 2
	}
}

// looksLikeConfig says whether the first argument is a configuration file (`fulcrum FILE` means
// `fulcrum run FILE`) rather than a command.
func looksLikeConfig(a string) bool {
	return strings.HasSuffix(a, ".toml") || strings.ContainsRune(a, os.PathSeparator)
}

// buildInfo is what the binary knows about its own build.
type buildInfo struct {
	Version       string `json:"version"`        // -ldflags -X main.version, else the module version
	ModuleVersion string `json:"module_version"` // "(devel)" for a build from a work tree
	Commit        string `json:"commit"`         // vcs.revision, "" when built without VCS info
	CommitTime    string `json:"commit_time"`
	Modified      bool   `json:"modified"` // the work tree had uncommitted changes
	GoVersion     string `json:"go_version"`
}

func readBuildInfo() buildInfo {
	var b buildInfo
	bi, ok := debug.ReadBuildInfo()
	if ok {
		b.ModuleVersion = bi.Main.Version
		b.GoVersion = bi.GoVersion
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				b.Commit = s.Value
			case "vcs.time":
				b.CommitTime = s.Value
			case "vcs.modified":
				b.Modified = s.Value == "true"
			}
		}
	}
	if b.ModuleVersion == "" {
		b.ModuleVersion = "(devel)"
	}
	b.Version = version
	if b.Version == "" {
		b.Version = b.ModuleVersion
	}
	return b
}

func versionString() string { return readBuildInfo().Version }

// versionLine is `fulcrum --version`: the release, then where exactly it was built from.
func versionLine() string {
	b := readBuildInfo()
	var sb strings.Builder
	fmt.Fprintf(&sb, "fulcrum %s (module %s", b.Version, b.ModuleVersion)
	if b.Commit != "" {
		fmt.Fprintf(&sb, ", commit %s", b.Commit)
		if b.CommitTime != "" {
			fmt.Fprintf(&sb, " of %s", b.CommitTime)
		}
		if b.Modified {
			sb.WriteString(", modified")
		}
	} else {
		sb.WriteString(", commit unknown: built without VCS information")
	}
	fmt.Fprintf(&sb, ", %s)", b.GoVersion)
	return sb.String()
}

// newFlags makes a command's flag set whose --help prints synopsis, description, flags and
// examples to stdout.
func newFlags(name, synopsis, description string, examples ...string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage:\n  %s\n\n%s", synopsis, description)
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n > 0 {
			fmt.Fprintln(w, "\nFlags:")
			fs.PrintDefaults()
		}
		if len(examples) > 0 {
			fmt.Fprintln(w, "\nExamples:")
			for _, e := range examples {
				fmt.Fprintln(w, "  "+e)
			}
		}
	}
	return fs
}

// parse parses flags and positional arguments in any order (`certs show www -o json -config F`
// and `certs -config F show -o json www` alike); "--" ends the flags. It returns the exit code
// and false when the command must stop (--help: 0; a bad flag: 2, with the message on stderr).
// At most maxArgs positional arguments are accepted; the rest is an error, never ignored.
func parse(fs *flag.FlagSet, args []string, stdout, stderr io.Writer, maxArgs int) ([]string, int, bool) {
	var pos []string
	fs.SetOutput(io.Discard)
	for {
		// The flag package stops at the first non-flag: parse the rest again after it.
		rest := args
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(stdout)
				fs.Usage()
				return nil, 0, false
			}
			fmt.Fprintf(stderr, "fulcrum %s: %v (see fulcrum %s --help)\n", fs.Name(), err, fs.Name())
			return nil, 2, false
		}
		left := fs.Args()
		if len(left) == 0 {
			break
		}
		if len(left) < len(rest) && rest[len(rest)-len(left)-1] == "--" {
			pos = append(pos, left...)
			break
		}
		pos = append(pos, left[0])
		args = left[1:]
	}
	if len(pos) > maxArgs {
		if maxArgs == 0 {
			fmt.Fprintf(stderr, "fulcrum %s: unexpected argument %q (see fulcrum %s --help)\n", fs.Name(), pos[0], fs.Name())
		} else {
			fmt.Fprintf(stderr, "fulcrum %s: unexpected argument %q after %q (see fulcrum %s --help)\n", fs.Name(), pos[maxArgs], strings.Join(pos[:maxArgs], " "), fs.Name())
		}
		return nil, 2, false
	}
	return pos, 0, true
}

// configArg registers -config on fs; call resolve after parse to get the one configuration path
// from -config or the positional argument.
type configArg struct {
	flag string
}

func addConfig(fs *flag.FlagSet) *configArg {
	c := &configArg{}
	fs.StringVar(&c.flag, "config", "", "configuration file (or give it as the argument; default ./fulcrum.toml)")
	return c
}

// subcommand looks up sub, the subcommand of command cmd, in known. When it is missing or
// unknown, it prints why and ok is false: the caller exits 2.
func subcommand[T any](cmd, sub, help string, known map[string]T, stderr io.Writer) (spec T, ok bool) {
	if sub == "" {
		fmt.Fprintf(stderr, "fulcrum %s: missing subcommand\n\n%s", cmd, help)
		return spec, false
	}
	spec, ok = known[sub]
	if !ok {
		fmt.Fprintf(stderr, "fulcrum %s: unknown subcommand %q (see fulcrum %s --help)\n", cmd, sub, cmd)
	}
	return spec, ok
}

// loadOnlyConfig parses the arguments of a command that takes only the configuration file and
// loads it. On failure (or -help) it has printed why and cfg is nil; code is the exit status.
func loadOnlyConfig(fs *flag.FlagSet, args []string, stdout, stderr io.Writer) (path string, cfg *configs.Config, code int) {
	cf := addConfig(fs)
	pos, code, ok := parse(fs, args, stdout, stderr, 1)
	if !ok {
		return "", nil, code
	}
	return cf.load(fs, pos, stderr)
}

// load resolves the configuration path and loads the file. On failure it has printed why and
// cfg is nil; code is the exit status (2 for a usage error, 1 for an invalid file).
func (c *configArg) load(fs *flag.FlagSet, pos []string, stderr io.Writer) (path string, cfg *configs.Config, code int) {
	path, ok := c.resolve(fs, pos, stderr)
	if !ok {
		return "", nil, 2
	}
	cfg, err := configs.LoadFile(path)
	if err != nil {
		printConfigError(stderr, err)
		return "", nil, 1
	}
	return path, cfg, 0
}

// resolve picks the configuration path: -config FILE or a positional FILE (both only if they
// agree). It never falls back silently: with neither, ./fulcrum.toml must exist.
func (c *configArg) resolve(fs *flag.FlagSet, pos []string, stderr io.Writer) (string, bool) {
	path := c.flag
	if len(pos) > 0 {
		if path != "" && path != pos[0] {
			fmt.Fprintf(stderr, "fulcrum %s: two configuration files given: -config %s and %s\n", fs.Name(), path, pos[0])
			return "", false
		}
		path = pos[0]
	}
	if path == "" {
		path = "fulcrum.toml"
		if _, err := os.Stat(path); err != nil {
			fmt.Fprintf(stderr, "fulcrum %s: no configuration file given and ./fulcrum.toml does not exist (fulcrum %s FILE, or -config FILE)\n", fs.Name(), fs.Name())
			return "", false
		}
	}
	return path, true
}

const validateHelp = `Loads FILE and checks everything that would stop "fulcrum run FILE" from starting: the schema,
every value, address conflicts between listeners and the admin endpoint, files that are missing
or unreadable (certificates, CA files, admin token files and their length), access and audit
logs that cannot be created, and certificate files that do not match their keys. Prints every problem, one line
each with file, line and field, and exits 1; prints a one-line summary and exits 0 when valid.
It does not open the keystore or bind sockets, so it is safe next to a running fulcrum.
`

func cmdValidate(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("validate", "fulcrum validate [-config] FILE", validateHelp,
		"fulcrum validate /etc/fulcrum/fulcrum.toml",
		"fulcrum validate -config configs/quickstart.toml && systemctl reload fulcrum")
	path, cfg, code := loadOnlyConfig(fs, args, stdout, stderr)
	if cfg == nil {
		return code
	}
	if probs := preflight(cfg); len(probs) > 0 {
		for _, p := range probs {
			fmt.Fprintln(stderr, p)
		}
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
