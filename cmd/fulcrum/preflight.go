package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/fulcrum-lb/fulcrum/certs"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// preflight finds what configs.Load cannot see from the file alone but would stop `fulcrum run`
// at start: the admin endpoint on a listener's address, files that are missing or unreadable,
// and certificate files whose key is not theirs. It opens no keystore and binds nothing, so
// `fulcrum validate` is safe to run next to the fulcrum serving the same file.
func preflight(cfg *configs.Config) []*configs.Problem {
	pf := &preflighter{cfg: cfg}
	if b, err := os.ReadFile(cfg.File); err == nil {
		pf.lines = strings.Split(string(b), "\n")
	}
	pf.addresses()
	pf.files()
	pf.adminFiles()
	return pf.probs
}

type preflighter struct {
	cfg   *configs.Config
	lines []string
	probs []*configs.Problem
}

// add records a problem; the line is the first line of the file that holds value as a string,
// which is where the operator wrote it.
func (pf *preflighter) add(path, name, field, value, format string, args ...any) {
	p := &configs.Problem{File: pf.cfg.File, Path: path, Name: name, Field: field, Message: fmt.Sprintf(format, args...)}
	if value != "" {
		q := strconv.Quote(value)
		for i, l := range pf.lines {
			if strings.Contains(l, q) {
				p.Line = i + 1
				break
			}
		}
	}
	pf.probs = append(pf.probs, p)
}

// addresses: the admin endpoint and a TCP listener on one host:port cannot both bind (the
// listeners among themselves are checked by configs already). A wildcard host overlaps every
// host on the same port.
func (pf *preflighter) addresses() {
	admin := pf.cfg.Server.Admin
	if admin == "" {
		return
	}
	ah, ap, err := net.SplitHostPort(admin)
	if err != nil {
		return // configs reports a malformed admin address
	}
	for i, l := range pf.cfg.Listeners {
		lh, lp, err := net.SplitHostPort(l.Address)
		if err != nil || lp != ap || !hostsOverlap(ah, lh) {
			continue
		}
		pf.add(fmt.Sprintf("listeners[%d]", i), l.Name, fmt.Sprintf("listeners[%d].address", i), l.Address,
			"address %s conflicts with the admin endpoint server.admin = %q: both cannot listen there; move one of them", l.Address, admin)
	}
}

func hostsOverlap(a, b string) bool {
	wild := func(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }
	if wild(a) || wild(b) {
		return true
	}
	norm := func(h string) string {
		if h == "localhost" {
			return "127.0.0.1"
		}
		if ip := net.ParseIP(h); ip != nil {
			return ip.String()
		}
		return strings.ToLower(h)
	}
	return norm(a) == norm(b)
}

// files checks every file the configuration names and start-up reads.
func (pf *preflighter) files() {
	cfg := pf.cfg
	for i, c := range cfg.Certificates {
		path := fmt.Sprintf("certificates[%d]", i)
		if c.CertFile != "" {
			keyFile := c.KeyFile
			if keyFile == "" {
				keyFile = c.CertFile // both in one PEM file
			}
			okCert := pf.readable(path, c.Name, path+".cert_file", c.CertFile)
			okKey := pf.readable(path, c.Name, path+".key_file", keyFile)
			if okCert && okKey {
				if _, err := tls.LoadX509KeyPair(cfg.Resolve(c.CertFile), cfg.Resolve(keyFile)); err != nil {
					pf.add(path, c.Name, path+".key_file", keyFile, "cert_file %s and key_file %s do not make a pair: %v", c.CertFile, keyFile, err)
				}
			}
		}
		if c.ACMECAFile != "" {
			pf.caFile(path, c.Name, path+".acme_ca_file", c.ACMECAFile)
		}
		pf.secret(path, c.Name, path+".acme_eab_mac_key", c.ACMEEABMACKey)
		if c.ACMEDNS != nil {
			pf.secret(path, c.Name, path+".acme_dns.tsig_secret", c.ACMEDNS.TSIGSecret)
		}
	}
	for i, l := range cfg.Listeners {
		path := fmt.Sprintf("listeners[%d]", i)
		if l.ClientAuth != nil && l.ClientAuth.CAFile != "" {
			pf.caFile(path, l.Name, path+".client_auth.ca_file", l.ClientAuth.CAFile)
		}
		if l.BackendTLS != nil && l.BackendTLS.CAFile != "" {
			pf.caFile(path, l.Name, path+".backend_tls.ca_file", l.BackendTLS.CAFile)
		}
	}
	for i, g := range cfg.TargetGroups {
		path := fmt.Sprintf("target_groups[%d]", i)
		if g.TLS != nil && g.TLS.CAFile != "" {
			pf.caFile(path, g.Name, path+".tls.ca_file", g.TLS.CAFile)
		}
	}
	switch dest := cfg.Server.AccessLog; dest {
	case "", "stdout", "stderr":
	default:
		pf.writable("server", "", "server.access_log", dest)
	}
	ks := cfg.Keystore
	if kind, file, _ := strings.Cut(ks.MasterKey, ":"); kind == "file" {
		// Created on first start when absent; an existing one must be readable.
		if _, err := os.Stat(cfg.Resolve(file)); err == nil {
			pf.readable("keystore", "", "keystore.master_key", file)
		}
	}
	if ks.Type == "pkcs11" {
		pf.secret("keystore", "", "keystore.pin", ks.Pin)
		if ks.Module != "" {
			pf.readable("keystore", "", "keystore.module", ks.Module)
		}
	}
}

// readable reports (and records when not) whether the named file can be read.
func (pf *preflighter) readable(path, name, field, file string) bool {
	f, err := os.Open(pf.cfg.Resolve(file))
	if err == nil {
		st, serr := f.Stat()
		f.Close()
		if serr == nil && st.IsDir() {
			err = errors.New("is a directory")
		}
	}
	if err != nil {
		what := "cannot be read"
		if errors.Is(err, os.ErrNotExist) {
			what = "does not exist"
		}
		pf.add(path, name, field, file, "%s %s %s: %v", field[strings.LastIndexByte(field, '.')+1:], file, what, unwrapPath(err))
		return false
	}
	return true
}

// writable reports when the file start-up appends to (created with its directories when
// missing) cannot be: a directory where the file or one of its parents should be, or no write
// permission. It creates nothing.
func (pf *preflighter) writable(path, name, field, file string) {
	p := pf.cfg.Resolve(file)
	key := field[strings.LastIndexByte(field, '.')+1:]
	if st, err := os.Stat(p); err == nil {
		if st.IsDir() {
			pf.add(path, name, field, file, "%s %s is a directory", key, file)
		} else if err := unix.Access(p, unix.W_OK); err != nil {
			pf.add(path, name, field, file, "%s %s cannot be written: %v", key, file, err)
		}
		return
	}
	// The nearest existing parent must be a directory this process may create entries in.
	for dir := filepath.Dir(p); ; dir = filepath.Dir(dir) {
		st, err := os.Stat(dir)
		if err != nil {
			if next := filepath.Dir(dir); next != dir {
				continue
			}
			return
		}
		if !st.IsDir() {
			pf.add(path, name, field, file, "%s %s cannot be created: %s is not a directory", key, file, dir)
		} else if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
			pf.add(path, name, field, file, "%s %s cannot be created in %s: %v", key, file, dir, err)
		}
		return
	}
}

// caFile checks a file of trusted roots: readable and holding at least one certificate.
func (pf *preflighter) caFile(path, name, field, file string) {
	if !pf.readable(path, name, field, file) {
		return
	}
	b, _ := os.ReadFile(pf.cfg.Resolve(file))
	key := field[strings.LastIndexByte(field, '.')+1:]
	ders, err := certs.ParseChainPEM(b)
	if err != nil {
		pf.add(path, name, field, file, "%s %s holds no PEM certificate", key, file)
		return
	}
	for _, der := range ders {
		if _, err := x509.ParseCertificate(der); err != nil {
			pf.add(path, name, field, file, "%s %s: a certificate does not parse: %v", key, file, err)
			return
		}
	}
}

// secret checks a "file:PATH" secret reference ("env:NAME" is read at start; an unset variable
// is reported there, since validate may run with another environment).
func (pf *preflighter) secret(path, name, field, ref string) {
	if kind, file, _ := strings.Cut(ref, ":"); kind == "file" {
		pf.readable(path, name, field, file)
	}
}

// unwrapPath drops the *PathError's own "open PATH:" prefix: the message already names the file.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
