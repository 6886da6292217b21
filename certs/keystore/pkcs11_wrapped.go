package keystore

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"strings"

	"crypto/rsa"

	"github.com/miekg/pkcs11"
)

// names lists the labels of the token's private keys, wrapping keys left out.
func (k *p11) names(ctx context.Context) ([]string, error) {
	var out []string
	err := k.withSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		objs, err := findAll(p, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)})
		if err != nil {
			return err
		}
		for _, o := range objs {
			a, err := p.GetAttributeValue(sh, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return fmt.Errorf("read label: %w", err)
			}
			if l := string(a[0].Value); l != "" && !strings.HasPrefix(l, wrapPrefix) {
				out = append(out, l)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keystore: list keys in token %q: %w", k.cfg.TokenLabel, err)
	}
	return out, nil
}

func findAll(p *pkcs11.Ctx, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(sh, tmpl); err != nil {
		return nil, fmt.Errorf("find objects: %w", err)
	}
	defer p.FindObjectsFinal(sh)
	var out []pkcs11.ObjectHandle
	for range 1000 { // bounded: a token with more than 64000 keys is not ours to list
		objs, _, err := p.FindObjects(sh, 64)
		if err != nil {
			return nil, fmt.Errorf("find objects: %w", err)
		}
		if len(objs) == 0 {
			break
		}
		out = append(out, objs...)
	}
	return out, nil
}

func wrapID(label string) []byte {
	h := sha256.Sum256([]byte("fulcrum-wrap/" + label))
	return h[:16]
}

// newWrappingKey generates the RSA wrapping key pair in the token. Its private half may only
// unwrap (no decrypt, no sign), is sensitive and never leaves the token.
func (k *p11) newWrappingKey(ctx context.Context, label string) (crypto.PublicKey, error) {
	var pub *rsa.PublicKey
	err := k.withSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		id := wrapID(label)
		pubT := append(tokenKey(pkcs11.CKO_PUBLIC_KEY, pkcs11.CKK_RSA, id, label),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, wrappingKeyBits),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		)
		privT := append(tokenKey(pkcs11.CKO_PRIVATE_KEY, pkcs11.CKK_RSA, id, label),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		)
		ph, _, err := p.GenerateKeyPair(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}, pubT, privT)
		if err != nil {
			return fmt.Errorf("generate RSA-%d wrapping key: %w", wrappingKeyBits, err)
		}
		a, err := p.GetAttributeValue(sh, ph, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil)})
		if err != nil {
			return fmt.Errorf("read wrapping public key: %w", err)
		}
		pub = &rsa.PublicKey{N: new(big.Int).SetBytes(a[0].Value), E: int(new(big.Int).SetBytes(a[1].Value).Int64())}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keystore: token %q: %w", k.cfg.TokenLabel, err)
	}
	return pub, nil
}

func (k *p11) deleteWrappingKey(ctx context.Context, label string) error {
	return k.withSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		objs, err := findAll(p, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
		if err != nil {
			return err
		}
		for _, o := range objs {
			if err := p.DestroyObject(sh, o); err != nil {
				return fmt.Errorf("destroy wrapping key %s: %w", label, err)
			}
		}
		return nil
	})
}

// unwrapImport unwraps the blob inside the token in two C_UnwrapKey calls (see wrapped.go):
// RSA-OAEP to an ephemeral AES session key that may only unwrap, then AES key wrap with
// padding to a token private key that is sensitive and not extractable. The public object is
// built from what the token tells about the private one.
func (k *p11) unwrapImport(ctx context.Context, label, name string, kt KeyType, blob []byte) (crypto.Signer, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	var ckk uint = pkcs11.CKK_EC
	if strings.HasPrefix(string(kt), "rsa-") {
		ckk = pkcs11.CKK_RSA
	}
	st, err := k.current()
	if err != nil {
		return nil, err
	}
	id := keyID(name)
	err = k.withSession(func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		wk, err := findAll(p, sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
		if err != nil {
			return err
		}
		if len(wk) != 1 {
			return fmt.Errorf("wrapping key %s: %d objects in the token, want 1 (run import-params again)", label, len(wk))
		}
		a, err := p.GetAttributeValue(sh, wk[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil)})
		if err != nil {
			return fmt.Errorf("read wrapping key: %w", err)
		}
		rsaPart, kwpPart, err := splitWrapped(blob, len(a[0].Value))
		if err != nil {
			return err
		}
		oaep := pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil)
		aesKey, err := p.UnwrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, oaep)}, wk[0], rsaPart, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		})
		if err != nil {
			return fmt.Errorf("unwrap the AES key with the wrapping key (was it wrapped with this import's public key, RSA-OAEP SHA-1?): %w", err)
		}
		defer p.DestroyObject(sh, aesKey)
		privT := append(tokenKey(pkcs11.CKO_PRIVATE_KEY, ckk, id, name), signOnly()...)
		priv, err := p.UnwrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}, aesKey, kwpPart, privT)
		if err != nil {
			return fmt.Errorf("unwrap the %s key with the AES key (is the blob a PKCS#8 %s key, RFC 5649-wrapped?): %w", kt, kt, err)
		}
		pubT, err := publicFromPrivate(p, sh, priv, ckk, kt, id, name)
		if err == nil {
			_, err = p.CreateObject(sh, pubT)
		}
		if err != nil {
			_ = p.DestroyObject(sh, priv)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keystore: import %s into token %q: %w", name, k.cfg.TokenLabel, err)
	}
	s, err := findKey(st.ctx, name)
	if err != nil {
		return nil, fmt.Errorf("keystore: find imported %s in token %q: %w", name, k.cfg.TokenLabel, err)
	}
	return k.wrap(name, s, st.gen), nil
}

// publicFromPrivate checks the unwrapped key's type and builds its public object's template.
func publicFromPrivate(p *pkcs11.Ctx, sh pkcs11.SessionHandle, priv pkcs11.ObjectHandle, ckk uint, kt KeyType, id []byte, label string) ([]*pkcs11.Attribute, error) {
	common := append(tokenKey(pkcs11.CKO_PUBLIC_KEY, ckk, id, label), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true))
	if ckk == pkcs11.CKK_RSA {
		a, err := p.GetAttributeValue(sh, priv, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil)})
		if err != nil {
			return nil, fmt.Errorf("read the imported key's modulus: %w", err)
		}
		if got := KeyType(fmt.Sprintf("rsa-%d", new(big.Int).SetBytes(a[0].Value).BitLen())); got != kt {
			return nil, fmt.Errorf("the wrapped key is %s, but this import is for %s", got, kt)
		}
		return append(common, pkcs11.NewAttribute(pkcs11.CKA_MODULUS, a[0].Value), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, a[1].Value)), nil
	}
	a, err := p.GetAttributeValue(sh, priv, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil)})
	if err != nil {
		return nil, fmt.Errorf("read the imported key's curve: %w", err)
	}
	want := oidP256
	if kt == ECDSAP384 {
		want = oidP384
	}
	wantDER, _ := asn1.Marshal(want)
	if !bytes.Equal(a[0].Value, wantDER) {
		return nil, fmt.Errorf("the wrapped key is not on the curve of %s", kt)
	}
	curve := elliptic.P256()
	if kt == ECDSAP384 {
		curve = elliptic.P384()
	}
	point, err := ecPublicPoint(p, sh, priv, curve)
	if err != nil {
		return nil, err
	}
	ecPoint, _ := asn1.Marshal(point)
	return append(common, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, a[0].Value), pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, ecPoint)), nil
}

var errNoPoint = errors.New("cannot find the imported EC key's public point")

// ecPublicPoint finds the public point of an EC private key inside the token. PKCS#11 private
// key objects need not carry it (SoftHSM2 keeps neither CKA_EC_POINT nor CKA_PUBLIC_KEY_INFO on
// an unwrapped key), so when CKA_PUBLIC_KEY_INFO is empty the key signs two digests and the
// public key is recovered from the signatures (the candidate from the first that verifies the
// second). Only public values leave the token.
func ecPublicPoint(p *pkcs11.Ctx, sh pkcs11.SessionHandle, priv pkcs11.ObjectHandle, curve elliptic.Curve) ([]byte, error) {
	if a, err := p.GetAttributeValue(sh, priv, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_KEY_INFO, nil)}); err == nil && len(a) == 1 && len(a[0].Value) > 0 {
		var spki struct {
			Alg asn1.RawValue
			Key asn1.BitString
		}
		if _, err := asn1.Unmarshal(a[0].Value, &spki); err == nil {
			return spki.Key.Bytes, nil
		}
	}
	signRaw := func(d []byte) (r, s *big.Int, err error) {
		if err := p.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, priv); err != nil {
			return nil, nil, err
		}
		sig, err := p.Sign(sh, d)
		if err != nil {
			return nil, nil, err
		}
		if len(sig)%2 != 0 || len(sig) == 0 {
			return nil, nil, fmt.Errorf("ECDSA signature of %d bytes", len(sig))
		}
		h := len(sig) / 2
		return new(big.Int).SetBytes(sig[:h]), new(big.Int).SetBytes(sig[h:]), nil
	}
	d1 := sha256.Sum256([]byte("fulcrum: recover the public key of an imported key (1)"))
	d2 := sha256.Sum256([]byte("fulcrum: recover the public key of an imported key (2)"))
	r1, s1, err := signRaw(d1[:])
	if err != nil {
		return nil, fmt.Errorf("%w: sign: %v", errNoPoint, err)
	}
	r2, s2, err := signRaw(d2[:])
	if err != nil {
		return nil, fmt.Errorf("%w: sign: %v", errNoPoint, err)
	}
	for _, q := range recoverECDSA(curve, d1[:], r1, s1) {
		if ecdsa.Verify(q, d2[:], r2, s2) && ecdsa.Verify(q, d1[:], r1, s1) {
			return elliptic.Marshal(curve, q.X, q.Y), nil //nolint:staticcheck // uncompressed point
		}
	}
	return nil, errNoPoint
}

// recoverECDSA returns the public keys that a signature (r, s) of digest may come from
// (SEC 1 section 4.1.6, with R.x = r: r + n exceeds p for these curves in all but a negligible
// fraction of cases). The curves are NIST prime curves with p = 3 mod 4.
func recoverECDSA(curve elliptic.Curve, digest []byte, r, s *big.Int) []*ecdsa.PublicKey {
	params := curve.Params()
	n, pp := params.N, params.P
	if r.Sign() <= 0 || s.Sign() <= 0 || r.Cmp(n) >= 0 || s.Cmp(n) >= 0 {
		return nil
	}
	// y^2 = x^3 - 3x + b
	x := new(big.Int).Set(r)
	y2 := new(big.Int).Exp(x, big.NewInt(3), pp)
	y2.Sub(y2, new(big.Int).Mul(x, big.NewInt(3)))
	y2.Add(y2, params.B)
	y2.Mod(y2, pp)
	y := new(big.Int).Exp(y2, new(big.Int).Rsh(new(big.Int).Add(pp, big.NewInt(1)), 2), pp)
	if new(big.Int).Exp(y, big.NewInt(2), pp).Cmp(y2) != 0 {
		return nil
	}
	e := hashToInt(digest, n)
	rInv := new(big.Int).ModInverse(r, n)
	negE := new(big.Int).Mod(new(big.Int).Neg(e), n)
	var out []*ecdsa.PublicKey
	for _, ry := range []*big.Int{y, new(big.Int).Sub(pp, y)} {
		sx, sy := curve.ScalarMult(x, ry, s.Bytes())    //nolint:staticcheck
		gx, gy := curve.ScalarBaseMult(negE.Bytes())    //nolint:staticcheck
		qx, qy := curve.Add(sx, sy, gx, gy)             //nolint:staticcheck
		qx, qy = curve.ScalarMult(qx, qy, rInv.Bytes()) //nolint:staticcheck
		if qx.Sign() == 0 && qy.Sign() == 0 {
			continue
		}
		out = append(out, &ecdsa.PublicKey{Curve: curve, X: qx, Y: qy})
	}
	return out
}

// hashToInt is ECDSA's digest-to-integer conversion (leftmost bits of the order's length).
func hashToInt(hash []byte, n *big.Int) *big.Int {
	orderBits := n.BitLen()
	orderBytes := (orderBits + 7) / 8
	if len(hash) > orderBytes {
		hash = hash[:orderBytes]
	}
	ret := new(big.Int).SetBytes(hash)
	if excess := len(hash)*8 - orderBits; excess > 0 {
		ret.Rsh(ret, uint(excess))
	}
	return ret
}
