package certs

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/mholt/acmez/v3/acme"
	"github.com/miekg/dns"

	"github.com/fulcrum-lb/fulcrum/certs/keystore"
	"github.com/fulcrum-lb/fulcrum/configs"
)

// dnsSolver answers DNS-01 by writing the challenge's TXT record into the zone with an RFC 2136
// dynamic update (TSIG-signed), waits until the server answers with it, and removes exactly
// that record afterwards. The server is the zone's primary, which the CA's resolvers reach
// through the zone's delegation: waiting on it, not on a resolver, avoids caching negative
// answers before the CA looks.
type dnsSolver struct {
	server     string
	zone       string // FQDN, or "" to find it from the SOA
	tsigName   string // FQDN, "" without TSIG
	tsigAlg    string
	tsigSecret string // base64
	ttl        uint32
	wait       time.Duration
	poll       time.Duration
}

var tsigAlgorithms = map[string]string{
	"hmac-sha256": dns.HmacSHA256,
	"hmac-sha384": dns.HmacSHA384,
	"hmac-sha512": dns.HmacSHA512,
}

func newDNSSolver(cfg *configs.Config, d *configs.ACMEDNS) (*dnsSolver, error) {
	// ttl and propagation_timeout are defaulted and checked by configs.
	s := &dnsSolver{server: d.Server, ttl: uint32(d.TTL), wait: d.PropagationTimeoutDuration(), poll: 500 * time.Millisecond}
	if d.Zone != "" {
		s.zone = dns.CanonicalName(d.Zone)
	}
	if d.TSIGKey != "" {
		secret, err := keystore.ReadSecret(d.TSIGSecret, cfg.Resolve)
		if err != nil {
			return nil, fmt.Errorf("acme_dns.tsig_secret: %w", err)
		}
		if _, err := base64.StdEncoding.DecodeString(secret); err != nil || secret == "" {
			return nil, errors.New("acme_dns.tsig_secret: not a base64 TSIG secret")
		}
		alg, ok := tsigAlgorithms[d.TSIGAlgorithm]
		if !ok {
			return nil, fmt.Errorf("acme_dns.tsig_algorithm %q: want hmac-sha256, hmac-sha384 or hmac-sha512", d.TSIGAlgorithm)
		}
		s.tsigName, s.tsigAlg, s.tsigSecret = dns.CanonicalName(d.TSIGKey), alg, secret
	}
	return s, nil
}

func (s *dnsSolver) record(ch acme.Challenge) *dns.TXT {
	return &dns.TXT{
		Hdr: dns.RR_Header{Name: dns.CanonicalName(ch.DNS01TXTRecordName()), Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: s.ttl},
		Txt: []string{ch.DNS01KeyAuthorization()},
	}
}

// Present adds the TXT record (other records of the name, such as a wildcard's and its base
// name's challenges, stay).
func (s *dnsSolver) Present(ctx context.Context, ch acme.Challenge) error {
	return s.change(ctx, ch, true)
}

// CleanUp removes the record Present added, and no other.
func (s *dnsSolver) CleanUp(ctx context.Context, ch acme.Challenge) error {
	return s.change(ctx, ch, false)
}

// change adds or removes the challenge's TXT record with one dynamic update.
func (s *dnsSolver) change(ctx context.Context, ch acme.Challenge, add bool) error {
	rr := s.record(ch)
	zone, err := s.zoneOf(ctx, rr.Hdr.Name)
	if err != nil {
		return err
	}
	m := new(dns.Msg)
	m.SetUpdate(zone)
	verb := "add"
	if add {
		m.Insert([]dns.RR{rr})
	} else {
		m.Remove([]dns.RR{rr})
		verb = "remove"
	}
	if err := s.update(ctx, m); err != nil {
		return fmt.Errorf("acme dns-01: %s %s TXT in zone %s at %s: %w", verb, rr.Hdr.Name, zone, s.server, err)
	}
	return nil
}

// Wait returns once the server answers the TXT query with the challenge's value (acmez calls
// it before telling the CA to validate), or fails after the propagation timeout.
func (s *dnsSolver) Wait(ctx context.Context, ch acme.Challenge) error {
	rr := s.record(ch)
	ctx, cancel := context.WithTimeout(ctx, s.wait)
	defer cancel()
	t := time.NewTicker(s.poll)
	defer t.Stop()
	for {
		q := new(dns.Msg)
		q.SetQuestion(rr.Hdr.Name, dns.TypeTXT)
		r, err := s.exchange(ctx, q)
		if err == nil {
			for _, a := range r.Answer {
				if txt, ok := a.(*dns.TXT); ok && strings.Join(txt.Txt, "") == rr.Txt[0] {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("acme dns-01: %s TXT not visible at %s within %v (last error: %v)", rr.Hdr.Name, s.server, s.wait, err)
		case <-t.C:
		}
	}
}

// zoneOf is the configured zone, or the closest enclosing name the server has an SOA for.
func (s *dnsSolver) zoneOf(ctx context.Context, name string) (string, error) {
	if s.zone != "" {
		if !dns.IsSubDomain(s.zone, name) {
			return "", fmt.Errorf("acme dns-01: %s is not in acme_dns.zone %s", name, s.zone)
		}
		return s.zone, nil
	}
	labels := dns.SplitDomainName(name)
	for i := range labels {
		cand := dns.Fqdn(strings.Join(labels[i:], "."))
		q := new(dns.Msg)
		q.SetQuestion(cand, dns.TypeSOA)
		r, err := s.exchange(ctx, q)
		if err != nil {
			return "", fmt.Errorf("acme dns-01: find the zone of %s at %s: %w", name, s.server, err)
		}
		for _, a := range r.Answer {
			if soa, ok := a.(*dns.SOA); ok && strings.EqualFold(soa.Hdr.Name, cand) {
				return dns.CanonicalName(cand), nil
			}
		}
	}
	return "", fmt.Errorf("acme dns-01: %s has no SOA for %s or any parent: set acme_dns.zone", s.server, name)
}

// update sends a dynamic update, TSIG-signed when a key is configured, and wants NOERROR.
func (s *dnsSolver) update(ctx context.Context, m *dns.Msg) error {
	r, err := s.exchange(ctx, m)
	if err != nil {
		return err
	}
	if r.Rcode != dns.RcodeSuccess {
		return fmt.Errorf("server answered %s", dns.RcodeToString[r.Rcode])
	}
	return nil
}

// exchange sends m over TCP (updates and TXT answers can exceed a UDP datagram), signing it
// when a TSIG key is configured; the client checks the signature of the answer.
func (s *dnsSolver) exchange(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	c := &dns.Client{Net: "tcp", Timeout: 10 * time.Second}
	if s.tsigName != "" {
		m.SetTsig(s.tsigName, s.tsigAlg, 300, time.Now().Unix())
		c.TsigSecret = map[string]string{s.tsigName: s.tsigSecret}
	}
	r, _, err := c.ExchangeContext(ctx, m, s.server)
	return r, err
}
