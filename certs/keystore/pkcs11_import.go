package keystore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"strings"

	"github.com/miekg/pkcs11"
)

// Import creates the key in the token: a private-key object that is sensitive, not extractable
// and never leaves the token again, and its public half, under the id and label Generate uses,
// so the key is found the same way afterwards. crypto11 cannot create key objects from key
// material, so the objects are created over a session of our own (see createObjects).
func (k *p11) Import(ctx context.Context, name string, key crypto.Signer) (crypto.Signer, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	pubT, privT, err := importTemplates(keyID(name), name, key)
	if err != nil {
		return nil, fmt.Errorf("keystore: import %s: %w", name, err)
	}
	st, err := k.current()
	if err != nil {
		return nil, err
	}
	if err := k.deleteOn(st.ctx, name); err != nil {
		return nil, err
	}
	if err := k.createObjects(pubT, privT); err != nil {
		return nil, fmt.Errorf("keystore: import %s into token %q: %w", name, k.cfg.TokenLabel, err)
	}
	s, err := findKey(st.ctx, name)
	if err != nil {
		return nil, fmt.Errorf("keystore: find imported %s in token %q: %w", name, k.cfg.TokenLabel, err)
	}
	return k.wrap(name, s, st.gen), nil
}

// createObjects creates the public, then the private object in one read-write session; if the
// private one fails, the public one is destroyed again.
//
// The session is our own: the module is already initialized (crypto11 did it, in this
// process), so C_Initialize reports CKR_CRYPTOKI_ALREADY_INITIALIZED and the login state is
// shared with crypto11's sessions (CKR_USER_ALREADY_LOGGED_IN). For the same reason this
// never calls C_Logout or C_Finalize, which would end crypto11's sessions too; Destroy only
// drops our reference to the library.
func (k *p11) createObjects(pub, priv []*pkcs11.Attribute) error {
	return k.withSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		ph, err := p.CreateObject(sh, pub)
		if err != nil {
			return fmt.Errorf("create public key: %w", err)
		}
		if _, err := p.CreateObject(sh, priv); err != nil {
			_ = p.DestroyObject(sh, ph)
			return fmt.Errorf("create private key: %w", err)
		}
		return nil
	})
}

// withSession runs f on a read-write session of our own, logged in (see createObjects).
func (k *p11) withSession(f func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error) error {
	p := pkcs11.New(k.cfg.Module)
	if p == nil {
		return fmt.Errorf("load %s", k.cfg.Module)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil && !isCKR(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return fmt.Errorf("initialize: %w", err)
	}
	slot, err := slotByLabel(p, k.cfg.TokenLabel)
	if err != nil {
		return err
	}
	sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("open session: %w", err)
	}
	defer p.CloseSession(sh)
	if err := p.Login(sh, pkcs11.CKU_USER, k.cfg.Pin); err != nil && !isCKR(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		return fmt.Errorf("login: %w", err)
	}
	return f(p, sh)
}

func slotByLabel(p *pkcs11.Ctx, label string) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("list slots: %w", err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && strings.TrimRight(ti.Label, " \x00") == label {
			return s, nil
		}
	}
	return 0, fmt.Errorf("no token labelled %q", label)
}

func isCKR(err error, code uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == code
}

// The curves a key may be imported on, by the DER of their OID (CKA_EC_PARAMS).
var (
	oidP256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	oidP384 = asn1.ObjectIdentifier{1, 3, 132, 0, 34}
)

// tokenKey starts the template of a key object of class and key type kt that is kept in the
// token, found by id and label.
func tokenKey(class, kt uint, id []byte, label string) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, kt),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
}

// signOnly are the attributes of a private key that never leaves the token and may only sign.
func signOnly() []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
}

// importTemplates are the attributes of the public and private objects for key: ECDSA on
// P-256 or P-384, or two-prime RSA (the key types Generate makes). The private object is a
// token object, private, sensitive and not extractable, and may only sign.
func importTemplates(id []byte, label string, key crypto.Signer) (pub, priv []*pkcs11.Attribute, err error) {
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		var oid asn1.ObjectIdentifier
		switch k.Curve {
		case elliptic.P256():
			oid = oidP256
		case elliptic.P384():
			oid = oidP384
		default:
			return nil, nil, fmt.Errorf("ECDSA curve %s: want P-256 or P-384", k.Curve.Params().Name)
		}
		params, _ := asn1.Marshal(oid)
		point, err := k.PublicKey.Bytes() // uncompressed
		if err != nil {
			return nil, nil, err
		}
		ecPoint, _ := asn1.Marshal(point) // CKA_EC_POINT is a DER OCTET STRING
		scalar, err := k.Bytes()
		if err != nil {
			return nil, nil, err
		}
		pub = append(tokenKey(pkcs11.CKO_PUBLIC_KEY, pkcs11.CKK_EC, id, label),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params),
			pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, ecPoint),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true))
		priv = append(append(tokenKey(pkcs11.CKO_PRIVATE_KEY, pkcs11.CKK_EC, id, label), signOnly()...),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, scalar))
		return pub, priv, nil
	case *rsa.PrivateKey:
		if len(k.Primes) != 2 {
			return nil, nil, fmt.Errorf("RSA key with %d primes: want 2", len(k.Primes))
		}
		k.Precompute()
		e := big.NewInt(int64(k.E)).Bytes()
		pub = append(tokenKey(pkcs11.CKO_PUBLIC_KEY, pkcs11.CKK_RSA, id, label),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, k.N.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, e),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true))
		priv = append(append(tokenKey(pkcs11.CKO_PRIVATE_KEY, pkcs11.CKK_RSA, id, label), signOnly()...),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, k.N.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, e),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, k.D.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, k.Primes[0].Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, k.Primes[1].Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, k.Precomputed.Dp.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, k.Precomputed.Dq.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, k.Precomputed.Qinv.Bytes()))
		return pub, priv, nil
	}
	return nil, nil, fmt.Errorf("key type %T: want ECDSA (P-256, P-384) or RSA", key)
}
