#!/bin/sh
# Create the etcd role and user conch runs as: read and write on conch's prefix, nothing else.
#
#   ETCDCTL_ENDPOINTS=https://10.0.0.1:2379 ETCDCTL_CACERT=ca.crt ETCDCTL_CERT=root.crt \
#   ETCDCTL_KEY=root.key ETCDCTL_USER=root:ROOTPASS  deploy/etcd-role.sh [PREFIX] [USER]
#
# PREFIX is conch's --prefix (default /conch), USER the etcd user to create (default conch).
# The password is read from CONCH_NEW_PASSWORD, or asked for by etcdctl. The etcdctl
# settings (ETCDCTL_*) must be those of a user allowed to manage auth (root), or of nobody
# while auth is still off. Safe to run again: what exists is kept, the grant is set again.
# With --enable-auth as the last argument it also turns etcd auth on (create the root user
# first: `etcdctl user add root`).
set -eu

prefix=${1:-/conch}
user=${2:-conch}
enable=no
[ "${3:-}" = "--enable-auth" ] && enable=yes
role=$user
: "${ETCDCTL:=etcdctl}"
export ETCDCTL_API=3

case "$prefix" in
/*) ;;
*) echo "etcd-role.sh: the prefix must start with /: $prefix" >&2; exit 64 ;;
esac
prefix=${prefix%/}

has() { "$ETCDCTL" "$1" list 2>/dev/null | grep -qx "$2"; }

has role "$role" || "$ETCDCTL" role add "$role"
# Everything conch writes and reads lives under "<prefix>/": keys, leases' keys, watches.
"$ETCDCTL" role grant-permission "$role" --prefix=true readwrite "$prefix/"
if ! has user "$user"; then
	if [ -n "${CONCH_NEW_PASSWORD:-}" ]; then
		printf '%s\n' "$CONCH_NEW_PASSWORD" | "$ETCDCTL" user add "$user" --interactive=false
	else
		"$ETCDCTL" user add "$user"
	fi
fi
"$ETCDCTL" user grant-role "$user" "$role"
[ "$enable" = yes ] && "$ETCDCTL" auth enable
"$ETCDCTL" role get "$role"
