package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"strconv"
	"testing"

	"github.com/fulcrum-lb/fulcrum/configs"
	"github.com/fulcrum-lb/fulcrum/configs/configtest"
)

func ecdsaKey() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func pemKey(t testing.TB, k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func mustBytes(k *ecdsa.PrivateKey) []byte {
	b, err := k.Bytes()
	if err != nil {
		panic(err)
	}
	return b
}

// valid is cfg as the binary would run it: written as TOML and read back by configs.Load, so the
// manager sees only validated configuration with its defaults.
func valid(t testing.TB, cfg *configs.Config) *configs.Config {
	t.Helper()
	c, err := configtest.Load("", *cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// httpsListener is an application listener serving certs (the manager only reads its name,
// certificates and TLS settings; the rest is what validation asks of any listener).
func httpsListener(name string, port int, certs ...string) configs.Listener {
	return configs.Listener{Name: name, Style: "application", Protocol: "https", Address: "127.0.0.1:" + strconv.Itoa(port),
		Certificates: certs, DefaultAction: &configs.Action{FixedResponse: &configs.FixedResponse{Status: 200}}}
}
