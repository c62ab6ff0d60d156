#!/bin/sh
# Dump tcpgate's pinned eBPF maps with bpftool (needs root: bpftool opens
# maps read-write even to dump them).
#
# usage: tcpgate-maps.sh [-d PIN_DIR] [-j] [sessions|sockets|grants|intercept|stats|all]...
#   -d PIN_DIR  the agent's agent.pin_dir (default /sys/fs/bpf/tcpgate, or $TCPGATE_PIN_DIR)
#   -j          JSON output (bpftool -j)
# The records are described in docs/operating.md ("The pin directory").
set -eu

usage() {
	sed -n 's/^# \{0,1\}//; 5,7p' "$0" >&2
	exit 64
}
die() {
	echo "tcpgate-maps.sh: $*" >&2
	exit 1
}

pin_dir=${TCPGATE_PIN_DIR:-/sys/fs/bpf/tcpgate}
json=
while getopts d:jh opt; do
	case $opt in
	d) pin_dir=$OPTARG ;;
	j) json=-j ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || set -- all

command -v bpftool >/dev/null 2>&1 || die "bpftool not found: install it (Debian: apt-get install bpftool)"
[ -d "$pin_dir" ] ||
	die "$pin_dir does not exist: is the tcpgate agent running with the eBPF data path, and is this its agent.pin_dir? (-d PIN_DIR)"

dump() {
	pin=$pin_dir/$1
	[ -e "$pin" ] || die "$pin is not pinned: is $pin_dir the pin dir of a running tcpgate agent?"
	[ -n "$json" ] || echo "== $1 ($pin)"
	# $json is empty or -j: splitting it is intended.
	# shellcheck disable=SC2086
	bpftool $json map dump pinned "$pin"
}

for map in "$@"; do
	case $map in
	all) for m in sessions sockets grants intercept stats; do dump "$m"; done ;;
	sessions | sockets | grants | intercept | stats) dump "$map" ;;
	*) echo "tcpgate-maps.sh: unknown map $map" >&2 && usage ;;
	esac
done
