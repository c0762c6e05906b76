#!/usr/bin/env sh
# Test certificates for the SDK suites, made with the openssl CLI into DIR (a fresh
# temporary directory the caller owns): ca.pem/ca.key (a self-signed CA), server.pem/
# server.key (DNS:localhost, IP:127.0.0.1), client.pem/client.key (URI SAN = $2, the
# identity the server reads), and other-ca.pem + foreign.pem/foreign.key (a client
# certificate with the same identity from a CA the server does not trust).
# Usage: test-certs.sh DIR CLIENT_URI
set -eu
dir=$1
uri=$2
cd "$dir"
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
ca() { # name subject
  openssl req -x509 $ec -keyout "$1.key" -out "$1.pem" -days 2 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
leaf() { # name ca extensions
  openssl req $ec -keyout "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
    -out "$1.pem" -days 2 -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
ca ca "tidewatch test ca"
ca other-ca "another ca"
leaf server ca "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
leaf client ca "subjectAltName=URI:$uri
extendedKeyUsage=clientAuth"
leaf foreign other-ca "subjectAltName=URI:$uri
extendedKeyUsage=clientAuth"
