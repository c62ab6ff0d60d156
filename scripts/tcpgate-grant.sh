#!/bin/sh
# Get a source-bound tcpgate grant for this CI job, then exit.
#
# The token comes from, in this order:
#   TCPGATE_TOKEN_FILE   a file holding the job's JWT
#   TCPGATE_TOKEN        the JWT itself (GitLab `id_tokens`)
#   ACTIONS_ID_TOKEN_REQUEST_URL + ACTIONS_ID_TOKEN_REQUEST_TOKEN
#                        GitHub Actions OIDC (needs `permissions: id-token: write`),
#                        fetched with audience $TCPGATE_AUDIENCE (default tcpgate)
# Settings:
#   TCPGATE_API       the grant API URL(s), space separated (one per address family); required
#   TCPGATE_CA        PEM file of the API's CA (else the system trust store)
#   TCPGATE_ALLOW     destinations to narrow to, space separated PREFIX=PORTS
#   TCPGATE_LIFETIME  shorten the grant, e.g. 15m
#   TCPGATE_BIN       the tcpgate binary (default: tcpgate on PATH)
# The token is written only to a mode 0600 temporary file, removed on exit,
# and never printed.
set -eu

die() {
	echo "tcpgate-grant.sh: $*" >&2
	exit 1
}

tcpgate=${TCPGATE_BIN:-tcpgate}
command -v "$tcpgate" >/dev/null 2>&1 || die "$tcpgate not found: install tcpgate or set TCPGATE_BIN"
[ -n "${TCPGATE_API:-}" ] || die "TCPGATE_API is not set (e.g. https://bastion.example:8443)"

umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' HUP INT TERM
token_file=$tmp/job.jwt

if [ -n "${TCPGATE_TOKEN_FILE:-}" ]; then
	[ -r "$TCPGATE_TOKEN_FILE" ] || die "TCPGATE_TOKEN_FILE $TCPGATE_TOKEN_FILE is not readable"
	token_file=$TCPGATE_TOKEN_FILE
elif [ -n "${TCPGATE_TOKEN:-}" ]; then
	printf '%s\n' "$TCPGATE_TOKEN" >"$token_file"
elif [ -n "${ACTIONS_ID_TOKEN_REQUEST_URL:-}" ]; then
	[ -n "${ACTIONS_ID_TOKEN_REQUEST_TOKEN:-}" ] ||
		die "ACTIONS_ID_TOKEN_REQUEST_TOKEN is not set: give the job 'permissions: id-token: write'"
	command -v curl >/dev/null 2>&1 || die "curl not found (needed for the GitHub OIDC token)"
	# The request token goes in a header file, not on the command line (ps).
	printf 'Authorization: Bearer %s\n' "$ACTIONS_ID_TOKEN_REQUEST_TOKEN" >"$tmp/auth"
	curl -fsS -H "@$tmp/auth" \
		"$ACTIONS_ID_TOKEN_REQUEST_URL&audience=${TCPGATE_AUDIENCE:-tcpgate}" >"$tmp/oidc.json" ||
		die "fetching the GitHub OIDC token failed"
	# The answer is {"count":N,"value":"<jwt>"}; a JWT holds no quotes.
	sed -n 's/.*"value"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$tmp/oidc.json" >"$token_file"
	[ -s "$token_file" ] || die "the GitHub OIDC answer holds no token"
else
	die "no token: set TCPGATE_TOKEN_FILE or TCPGATE_TOKEN, or run in GitHub Actions with id-token: write"
fi

# Build the argument list in "$@"; word splitting of the space-separated
# lists is intended.
set -- grant --token-file "$token_file"
for url in $TCPGATE_API; do
	set -- "$@" --api "$url"
done
for dest in ${TCPGATE_ALLOW:-}; do
	set -- "$@" --allow "$dest"
done
[ -z "${TCPGATE_CA:-}" ] || set -- "$@" --ca "$TCPGATE_CA"
[ -z "${TCPGATE_LIFETIME:-}" ] || set -- "$@" --lifetime "$TCPGATE_LIFETIME"
# Unset so clap does not also read them as the defaults of --api / --ca.
unset TCPGATE_API TCPGATE_CA TCPGATE_TOKEN ACTIONS_ID_TOKEN_REQUEST_TOKEN
"$tcpgate" "$@"
