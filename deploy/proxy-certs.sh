#!/bin/sh
# Client-certificate TLS for codeloop-docker-proxy on TCP (the Kubernetes layout).
#
#   deploy/proxy-certs.sh OUT [NAME...]      NAME: the proxy's DNS names or IPs (default sandbox-engine)
#
# Makes a CA used for nothing else, signs one server certificate for NAME... and one client
# certificate, then throws the CA key away (run it again to rotate everything):
#   OUT/server/{ca,cert,key}.pem   the proxy: --tls-ca, --tls-cert, --tls-key
#   OUT/client/{ca,cert,key}.pem   the workers: DOCKER_CERT_PATH=<dir>, DOCKER_TLS_VERIFY=1
# Only holders of OUT/client can create sandboxes: keep it in a Secret mounted by workers alone.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 OUT [NAME...]" >&2; exit 2; }
out=$1
shift
[ $# -ge 1 ] || set -- sandbox-engine
umask 077
mkdir -p "$out/server" "$out/client"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
san=""
for name in "$@"; do
  case $name in
    *:*) kind=IP ;;        # IPv6
    *[!0-9.]*) kind=DNS ;;
    *) kind=IP ;;
  esac
  san="${san:+$san,}$kind:$name"
done
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key "$tmp/ca.key"
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days 825 -subj "/CN=codeloop docker proxy CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$tmp/ca.pem"
sign() {  # sign DIR CN EXTENSIONS
  key "$out/$1/key.pem"
  openssl req -new -key "$out/$1/key.pem" -subj "/CN=$2" -out "$tmp/$1.csr"
  printf '%s\n' "$3" > "$tmp/$1.ext"
  openssl x509 -req -in "$tmp/$1.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial -sha256 \
    -days 825 -extfile "$tmp/$1.ext" -out "$out/$1/cert.pem" 2>/dev/null
  cp "$tmp/ca.pem" "$out/$1/ca.pem"
}
sign server "$1" "subjectAltName=$san
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
sign client codeloop-worker "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
chmod 0644 "$out/server/ca.pem" "$out/server/cert.pem" "$out/client/ca.pem" "$out/client/cert.pem"
echo "server: $out/server ($san)  client: $out/client"
