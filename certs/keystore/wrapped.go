package keystore

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Wrapped import, as AWS KMS does it with import tokens. import-params creates an RSA-3072
// wrapping key pair inside the keystore and an import token valid for ImportTokenLifetime; the
// operator wraps the key material offline the way CKM_RSA_AES_KEY_WRAP defines it:
//
//	blob = RSA-OAEP(SHA-1, MGF1-SHA-1)(ephemeral AES-256 key) || AES key wrap with padding
//	       (RFC 5649) of the private key's PKCS#8 DER under that AES key
//
// The HSM unwraps both layers itself (C_UnwrapKey twice: the AES key becomes a session object
// that only exists for the second unwrap), so the clear key never enters Fulcrum's memory.
// SoftHSM2 2.6 lacks CKM_RSA_AES_KEY_WRAP itself (and OAEP with SHA-256), hence the two steps
// and SHA-1: the blob is byte for byte what CKM_RSA_AES_KEY_WRAP with SHA-1 OAEP takes.

// ImportTokenLifetime is how long an import token (and its wrapping key) is valid.
const ImportTokenLifetime = 24 * time.Hour

// wrapPrefix names the wrapping keys; keys list leaves them out.
const wrapPrefix = "fulcrum-import-wrap."

const wrappingKeyBits = 3072

const tokenPrefix = "fulcrum-import-token-v1:"

// importRecord is an import in progress, persisted in the lifecycle file. Only the token's
// digest is kept.
type importRecord struct {
	TokenSHA256 []byte    `json:"token_sha256"`
	Expires     time.Time `json:"expires"`
	KeyType     string    `json:"key_type"`
	WrapLabel   string    `json:"wrap_label"`
}

// ImportParams is what import-params hands the operator.
type ImportParams struct {
	Name         string    `json:"name"`
	KeyType      string    `json:"key_type"`
	PublicKeyPEM string    `json:"public_key_pem"` // the wrapping key (SPKI)
	ImportToken  string    `json:"import_token"`
	Expires      time.Time `json:"expires"`
	Algorithm    string    `json:"algorithm"`
}

const wrapAlgorithm = "RSA_AES_KEY_WRAP_SHA_1 (RSA-OAEP SHA-1 of an AES-256 key, then RFC 5649 AES key wrap with padding of PKCS#8)"

func importableType(kt KeyType) error {
	switch kt {
	case ECDSAP256, ECDSAP384, RSA2048, RSA3072, RSA4096:
		return nil
	}
	return fmt.Errorf("key type %q: want ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072 or rsa-4096", kt)
}

// ImportParams starts (or restarts) an import of key material under name.
func (m *Managed) ImportParams(ctx context.Context, name string, kt KeyType) (*ImportParams, error) {
	p, err := m.importParams(ctx, name, kt)
	m.event(ctx, "import-params", name, err)
	return p, err
}

func (m *Managed) importParams(ctx context.Context, name string, kt KeyType) (*ImportParams, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	if err := importableType(kt); err != nil {
		return nil, err
	}
	names, err := m.b.names(ctx)
	if err != nil {
		return nil, err
	}
	if slices.Contains(names, name) {
		return nil, fmt.Errorf("a key named %s exists already: import under a new name", name)
	}
	label := wrapPrefix + name
	// A previous import of the same name is replaced: its token stops working.
	if err := m.b.deleteWrappingKey(ctx, label); err != nil {
		return nil, err
	}
	pub, err := m.b.newWrappingKey(ctx, label)
	if err != nil {
		return nil, fmt.Errorf("create wrapping key: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	token := tokenPrefix + name + ":" + base64.RawURLEncoding.EncodeToString(raw)
	sum := sha256.Sum256([]byte(token))
	rec := &importRecord{TokenSHA256: sum[:], Expires: m.clock().Add(ImportTokenLifetime).UTC(), KeyType: string(kt), WrapLabel: label}
	m.mu.Lock()
	m.state.Imports[name] = rec
	err = m.saveLocked()
	m.mu.Unlock()
	if err != nil {
		_ = m.b.deleteWrappingKey(ctx, label)
		return nil, err
	}
	return &ImportParams{
		Name: name, KeyType: string(kt), ImportToken: token, Expires: rec.Expires, Algorithm: wrapAlgorithm,
		PublicKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})),
	}, nil
}

// ImportWrapped unwraps blob into a key named name. A wrong, foreign or expired token, or a
// blob that does not hold a key of the announced type, changes nothing.
func (m *Managed) ImportWrapped(ctx context.Context, name string, blob []byte, token string) error {
	err := m.importWrapped(ctx, name, blob, strings.TrimSpace(token))
	m.event(ctx, "import", name, err)
	return err
}

func (m *Managed) importWrapped(ctx context.Context, name string, blob []byte, token string) error {
	if err := validName(name); err != nil {
		return err
	}
	if rest, ok := strings.CutPrefix(token, tokenPrefix); !ok {
		return errors.New("import token is not a Fulcrum import token")
	} else if other, _, _ := strings.Cut(rest, ":"); other != name {
		return fmt.Errorf("import token is for key %q, not %q", other, name)
	}
	m.mu.Lock()
	rec := m.state.Imports[name]
	m.mu.Unlock()
	if rec == nil {
		return fmt.Errorf("no import of %s in progress (or its token was used or expired): run fulcrum keys import-params %s", name, name)
	}
	sum := sha256.Sum256([]byte(token))
	if subtle.ConstantTimeCompare(sum[:], rec.TokenSHA256) != 1 {
		return fmt.Errorf("import token does not match the current import of %s (a newer import-params replaces older tokens)", name)
	}
	if now := m.clock(); now.After(rec.Expires) {
		return fmt.Errorf("import token of %s expired at %s: run fulcrum keys import-params %s again", name, rec.Expires.Format(time.RFC3339), name)
	}
	if err := m.pendingErr(name); err != nil {
		return err
	}
	if _, err := m.b.unwrapImport(ctx, rec.WrapLabel, name, KeyType(rec.KeyType), blob); err != nil {
		return err
	}
	m.mu.Lock()
	delete(m.state.Imports, name)
	m.state.Keys[name] = &keyRecord{State: stateEnabled, Origin: "wrapped-import", Type: rec.KeyType}
	m.gateLocked(name).pending.Store(false)
	err := m.saveLocked()
	m.mu.Unlock()
	if derr := m.b.deleteWrappingKey(ctx, rec.WrapLabel); err == nil {
		err = derr
	}
	return err
}

// typeOf names a public key's type as the configuration does.
func typeOf(pub crypto.PublicKey) KeyType {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return ECDSAP256
		case elliptic.P384():
			return ECDSAP384
		}
	case *rsa.PublicKey:
		return KeyType(fmt.Sprintf("rsa-%d", k.N.BitLen()))
	}
	return KeyType(fmt.Sprintf("%T", pub))
}

// checkType refuses an unwrapped key that is not of the type the import announced.
func checkType(key crypto.Signer, kt KeyType) error {
	if got := typeOf(key.Public()); got != kt {
		return fmt.Errorf("the wrapped key is %s, but this import is for %s: wrap the right key, or run import-params with -type %s", got, kt, got)
	}
	return nil
}

// splitWrapped cuts a blob into the RSA-OAEP part (modulus length) and the AES-KWP part.
func splitWrapped(blob []byte, modLen int) (rsaPart, kwpPart []byte, err error) {
	if len(blob) < modLen+16 || (len(blob)-modLen)%8 != 0 {
		return nil, nil, fmt.Errorf("wrapped key of %d bytes: want %d bytes of RSA-OAEP followed by an AES key wrap (a multiple of 8, at least 16)", len(blob), modLen)
	}
	return blob[:modLen], blob[modLen:], nil
}

// ---- software keystore: the same format, unwrapped in memory (its keys live there anyway)

func (s *software) names(ctx context.Context) ([]string, error) {
	var ents []string
	var err error
	if s.blobs != nil {
		// Fleet mode: the blobs are in the fleet's storage; certmagic.Storage can list them.
		l, ok := s.blobs.(interface {
			List(ctx context.Context, prefix string, recursive bool) ([]string, error)
		})
		if !ok {
			return nil, errors.New("keystore: this fleet storage cannot list keys")
		}
		keys, lerr := l.List(ctx, "keys", false)
		for _, k := range keys {
			ents = append(ents, k[strings.LastIndexByte(k, '/')+1:])
		}
		err = lerr
	} else {
		ents, err = readDirNames(s.dir)
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range ents {
		if k, ok := strings.CutSuffix(n, ".sealed"); ok && !strings.HasPrefix(k, wrapPrefix) {
			out = append(out, k)
		}
	}
	return out, nil
}

func (s *software) newWrappingKey(ctx context.Context, label string) (crypto.PublicKey, error) {
	k, err := rsa.GenerateKey(rand.Reader, wrappingKeyBits)
	if err != nil {
		return nil, err
	}
	if _, err := s.store(label, k); err != nil {
		return nil, err
	}
	return &k.PublicKey, nil
}

func (s *software) deleteWrappingKey(ctx context.Context, label string) error {
	return s.Delete(ctx, label)
}

func (s *software) unwrapImport(ctx context.Context, label, name string, kt KeyType, blob []byte) (crypto.Signer, error) {
	ws, err := s.Signer(ctx, label)
	if err != nil {
		return nil, fmt.Errorf("wrapping key of %s: %w", name, err)
	}
	cs, _ := ws.(countingSigner)
	wk, ok := cs.Signer.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("wrapping key of %s is not RSA", name)
	}
	rsaPart, kwpPart, err := splitWrapped(blob, wk.Size())
	if err != nil {
		return nil, err
	}
	kek, err := rsa.DecryptOAEP(sha1.New(), nil, wk, rsaPart, nil)
	if err != nil {
		return nil, fmt.Errorf("unwrap the AES key: %w (was it wrapped with this import's public key, RSA-OAEP SHA-1?)", err)
	}
	defer clear(kek)
	der, err := unwrapKWP(kek, kwpPart)
	if err != nil {
		return nil, err
	}
	defer clear(der)
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("the unwrapped key is not PKCS#8: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("the unwrapped key %T cannot sign", k)
	}
	if err := checkType(signer, kt); err != nil {
		return nil, err
	}
	return s.store(name, signer)
}

// unwrapKWP is AES key unwrap with padding (RFC 5649).
func unwrapKWP(kek, c []byte) ([]byte, error) {
	bad := errors.New("AES key unwrap failed: not wrapped with this AES key (RFC 5649 key wrap with padding)")
	b, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	if len(c) < 16 || len(c)%8 != 0 {
		return nil, bad
	}
	n := len(c)/8 - 1
	var a [8]byte
	r := make([]byte, n*8)
	var blk [16]byte
	if n == 1 {
		b.Decrypt(blk[:], c)
		copy(a[:], blk[:8])
		copy(r, blk[8:])
	} else {
		copy(a[:], c[:8])
		copy(r, c[8:])
		for j := 5; j >= 0; j-- {
			for i := n; i >= 1; i-- {
				t := uint64(n*j + i)
				x := binary.BigEndian.Uint64(a[:]) ^ t
				binary.BigEndian.PutUint64(blk[:8], x)
				copy(blk[8:], r[(i-1)*8:i*8])
				b.Decrypt(blk[:], blk[:])
				copy(a[:], blk[:8])
				copy(r[(i-1)*8:i*8], blk[8:])
			}
		}
	}
	clear(blk[:])
	if a[0] != 0xA6 || a[1] != 0x59 || a[2] != 0x59 || a[3] != 0xA6 {
		clear(r)
		return nil, bad
	}
	mli := int(binary.BigEndian.Uint32(a[4:]))
	if mli <= 8*(n-1) || mli > 8*n {
		clear(r)
		return nil, bad
	}
	for _, p := range r[mli:] {
		if p != 0 {
			clear(r)
			return nil, bad
		}
	}
	return r[:mli], nil
}
