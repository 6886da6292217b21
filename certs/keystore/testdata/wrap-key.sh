#!/bin/sh
# Wrap a private key for `fulcrum keys import` (the README's commands, run by the tests).
# usage: wrap-key.sh KEY.pem WRAPPING-KEY.pem OUT.wrapped
set -eu
KEY=$1 WRAPPING_KEY=$2 OUT=$3
umask 077
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
openssl pkcs8 -topk8 -nocrypt -in "$KEY" -outform DER -out "$WORK/key.der"
openssl rand -out "$WORK/aes.key" 32
openssl pkeyutl -encrypt -pubin -inkey "$WRAPPING_KEY" -in "$WORK/aes.key" -out "$WORK/aes.wrapped" -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1
openssl enc -id-aes256-wrap-pad -K "$(od -An -v -tx1 "$WORK/aes.key" | tr -d ' \n')" -iv A65959A6 -in "$WORK/key.der" -out "$WORK/key.wrapped"
cat "$WORK/aes.wrapped" "$WORK/key.wrapped" > "$OUT"
