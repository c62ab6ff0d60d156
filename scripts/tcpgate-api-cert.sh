#!/bin/sh
# Make (or renew) the grant API's certificate, as docs/install.md ("The
# grant API's certificate") describes: a private CA once, then a leaf for
# the API that names every address or DNS name runners put in --api.
#
# usage: tcpgate-api-cert.sh [-d DIR] [-g GROUP] [-D DAYS] NAME...
#   NAME      an IP address or a DNS name runners use, e.g. 198.51.100.1 bastion.example
#   -d DIR    where the files go (default /etc/tcpgate)
#   -g GROUP  the group that may read api.key: the agent's (default tcpgate)
#   -D DAYS   the leaf's validity (default 90)
# Writes DIR/bastion-ca.pem + ca.key only when they do not exist yet (give
# bastion-ca.pem to the runners, keep ca.key offline), and a fresh
# DIR/api.pem + api.key each run: then `systemctl reload tcpgate`.
set -eu

usage() {
	sed -n 's/^# \{0,1\}//; 6,10p' "$0" >&2
	exit 64
}
die() {
	echo "tcpgate-api-cert.sh: $*" >&2
	exit 1
}

dir=/etc/tcpgate
group=tcpgate
days=90
while getopts d:g:D:h opt; do
	case $opt in
	d) dir=$OPTARG ;;
	g) group=$OPTARG ;;
	D) days=$OPTARG ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || usage
command -v openssl >/dev/null 2>&1 || die "openssl not found: install it (Debian: apt-get install openssl)"
[ -d "$dir" ] || die "$dir does not exist"

san=
cn=
for name in "$@"; do
	case $name in
	*:* | *[0-9].*[0-9].*[0-9].*[0-9]) kind=IP ;; # IPv6, or IPv4 dotted quad
	*[!A-Za-z0-9.-]* | '') die "not an IP address or DNS name: $name" ;;
	*) kind=DNS && cn=${cn:-$name} ;;
	esac
	san=${san:+$san,}$kind:$name
done
cn=${cn:-$1}

umask 077
cd "$dir"
if [ ! -e bastion-ca.pem ] && [ ! -e ca.key ]; then
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout ca.key -out bastion-ca.pem -days 3650 -subj "/CN=bastion CA" 2>/dev/null ||
		die "making the CA failed"
	chmod 0644 bastion-ca.pem
	echo "made the CA $dir/bastion-ca.pem (give it to the runners; keep $dir/ca.key offline)"
elif [ ! -e bastion-ca.pem ] || [ ! -e ca.key ]; then
	die "$dir has only one of bastion-ca.pem and ca.key: restore the other or move both away"
fi

# The leaf goes to new names first: a reload never reads half of it.
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-keyout api.key.new -out api.csr -subj "/CN=$cn" 2>/dev/null || die "making the API key failed"
printf 'subjectAltName=%s\n%s\n%s\n' "$san" \
	'basicConstraints=critical,CA:FALSE' 'extendedKeyUsage=serverAuth' >api.ext
openssl x509 -req -in api.csr -CA bastion-ca.pem -CAkey ca.key -CAcreateserial \
	-days "$days" -extfile api.ext -out api.pem.new 2>/dev/null || die "signing the API certificate failed"
chmod 0644 api.pem.new
if getent group "$group" >/dev/null 2>&1; then
	chgrp "$group" api.key.new && chmod 0640 api.key.new
else
	echo "tcpgate-api-cert.sh: no group $group: api.key stays readable by root only (-g GROUP)" >&2
fi
mv api.key.new api.key
mv api.pem.new api.pem
rm -f api.csr
echo "made $dir/api.pem for $san; then: systemctl reload tcpgate"
