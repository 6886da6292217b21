package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

// TestAuthorityKeyLostReported: when an authority's key leaves the keystore, a reload keeps
// the process serving with the authority's certificates, and the loss is on /metrics
// (fulcrum_authority_key_lost), on GET /admin/authorities and the status page's data, and in
// the answer to a renewal; a restart starts, and reports the same.
func TestAuthorityKeyLostReported(t *testing.T) {
	dir := t.TempDir()
	b := echoBackend(t, "b1")
	web, webTLS, dead, admin := configtest.Addr(t), configtest.Addr(t), configtest.DeadAddr(t), configtest.Addr(t)
	path := filepath.Join(dir, "fulcrum.toml")
	text := adminConfig(dir, admin, web, webTLS, hostOf(b), dead, "")
	d := startTestDaemon(t, path, text)
	c := httpClient()
	ca := d.rt.Certs().Authority("test-ca")
	pool := ca.Pool()
	served := func() string { // the serial a client trusting the authority is served
		t.Helper()
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", webTLS, &tls.Config{RootCAs: pool, ServerName: "localhost"})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer conn.Close()
		return fmt.Sprintf("%x", conn.ConnectionState().PeerCertificates[0].SerialNumber)
	}
	reported := func(td *testDaemon, state string, gauge float64) {
		t.Helper()
		var views []authorityView
		if code := fetchJSON(t, c, "GET", td.admin+"/admin/authorities", &views); code != 200 || len(views) != 1 || views[0].State != state {
			t.Fatalf("GET /admin/authorities: %d %+v, want state %q", code, views, state)
		}
		if state != "ok" && !strings.Contains(views[0].Error, "authority key lost") {
			t.Fatalf("error of a lost authority: %q", views[0].Error)
		}
		var st statusResponse
		if fetchJSON(t, c, "GET", td.admin+"/admin/status", &st); len(st.Authorities) != 1 || st.Authorities[0].State != state {
			t.Fatalf("GET /admin/status authorities: %+v, want state %q", st.Authorities, state)
		}
		if got, ok := value(scrape(t, c, td.admin), "fulcrum_authority_key_lost", "authority", "test-ca"); !ok || got != gauge {
			t.Fatalf("fulcrum_authority_key_lost{authority=test-ca} = %v (present %v), want %v", got, ok, gauge)
		}
	}
	reported(d, "ok", 0)
	serial := served()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.rt.Certs().Keystore().Delete(ctx, ca.KeyName()); err != nil {
		t.Fatal(err)
	}
	if res := d.reload("test"); !res.OK {
		t.Fatalf("reload with the authority's key gone refused: %v", res.Errors)
	}
	reported(d, "key_lost", 1)
	if got := served(); got != serial {
		t.Fatalf("after the key was lost: served %s, want the same certificate %s", got, serial)
	}
	if code, body := fetch(t, c, "POST", d.admin+"/admin/certificates/site/renew", nil); code != 409 || !strings.Contains(body, "authority key lost") {
		t.Fatalf("renewal by a lost authority: %d %s", code, body)
	}

	d.stop()
	d2 := startTestDaemon(t, path, text) // a restart starts, and says the same
	reported(d2, "key_lost", 1)
	if got := served(); got != serial {
		t.Fatalf("after the restart: served %s, want %s", got, serial)
	}
	if d2.rt.Certs().Authority("test-ca").Cert.SerialNumber.Cmp(ca.Cert.SerialNumber) != 0 {
		t.Fatal("a new authority was created")
	}
}
