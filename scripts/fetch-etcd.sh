#!/usr/bin/env bash
# Fetch a real etcd (server + etcdctl) from Debian's packages into .cache/etcd/<suite>/,
# without installing anything system-wide: a private apt package list, `apt-get download`,
# `dpkg -x`.
#
#   scripts/fetch-etcd.sh            newest suite with etcd >= 3.5.28 (sid), else trixie, else bookworm
#   scripts/fetch-etcd.sh bookworm   one suite (bookworm's 3.4 is the oldest server conch supports)
#
# Prints the directory holding `etcd` and `etcdctl` on stdout; progress goes to stderr.
# Idempotent: a suite already fetched is not fetched again.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CONCH_ETCD_CACHE:-$root/.cache/etcd}"
mirror="${CONCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "fetch-etcd: $*" >&2; }

# version_ge A B: true when Debian version A >= B.
version_ge() { dpkg --compare-versions "$1" ge "$2"; }

fetch_suite() {
    local suite="$1"
    local dir="$cache/$suite"
    if [ -x "$dir/bin/etcd" ] && [ -x "$dir/bin/etcdctl" ]; then
        echo "$dir/bin"
        return 0
    fi
    local apt="$cache/.apt-$suite"
    mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/etc/preferences.d" "$dir"
    local signed=""
    [ -r "$keyring" ] && signed="[signed-by=$keyring]"
    echo "deb $signed $mirror $suite main" >"$apt/etc/sources.list"
    : >"$apt/status"
    local opts=(
        -o "Dir::Etc::SourceList=$apt/etc/sources.list"
        -o "Dir::Etc::SourceParts=-"
        -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
        -o "Dir::State::Lists=$apt/lists"
        -o "Dir::State::Status=$apt/status"
        -o "Dir::Cache=$apt"
        -o "Dir::Cache::Archives=$apt/archives"
        -o "APT::Get::List-Cleanup=0"
        -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=root"
        -o "APT::Architecture=$(dpkg --print-architecture)"
    )
    log "reading Debian $suite package list"
    if ! apt-get "${opts[@]}" -qq update >&2; then
        log "could not read the $suite package list"
        return 1
    fi
    local version
    version="$(apt-cache "${opts[@]}" show etcd-server 2>/dev/null | sed -n 's/^Version: //p' | head -n1)"
    if [ -z "$version" ]; then
        log "$suite has no etcd-server package"
        return 1
    fi
    if [ -n "${MIN_VERSION:-}" ] && ! version_ge "$version" "$MIN_VERSION"; then
        log "$suite has etcd $version, older than $MIN_VERSION"
        return 1
    fi
    log "downloading etcd-server and etcd-client $version from $suite"
    (cd "$apt/archives" && rm -f ./*.deb && apt-get "${opts[@]}" -qq download etcd-server etcd-client >&2)
    local tmp="$dir/.x"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for deb in "$apt"/archives/*.deb; do dpkg -x "$deb" "$tmp"; done
    mkdir -p "$dir/bin"
    local etcd etcdctl
    # The binaries live in usr/bin (bookworm's package also ships an init script named etcd).
    etcd="$(find "$tmp" -type f -path '*/bin/etcd' -perm -u+x | head -n1)"
    etcdctl="$(find "$tmp" -type f -path '*/bin/etcdctl' -perm -u+x | head -n1)"
    for f in "$etcd" "$etcdctl"; do
        if [ -n "$f" ] && [ "$(head -c4 "$f" | od -An -c | tr -d ' ')" != '177ELF' ]; then
            log "$f is not an ELF binary"
            return 1
        fi
    done
    if [ -z "$etcd" ] || [ -z "$etcdctl" ]; then
        log "the $suite packages hold no etcd/etcdctl binary"
        return 1
    fi
    install -m 0755 "$etcd" "$dir/bin/etcd"
    install -m 0755 "$etcdctl" "$dir/bin/etcdctl"
    echo "$version" >"$dir/VERSION"
    rm -rf "$tmp"
    log "etcd $version ready in $dir/bin"
    echo "$dir/bin"
}

if [ $# -gt 0 ]; then
    fetch_suite "$1"
    exit $?
fi

# Newest first: sid carries a 3.5.28+ server (older ones have lease bugs, see holds.md §1).
MIN_VERSION=3.5.28 fetch_suite sid && exit 0
for suite in trixie bookworm; do
    log "falling back to $suite (its etcd has known lease bugs: fine for tests, not production)"
    fetch_suite "$suite" && exit 0
done
log "no Debian suite gave an etcd"
exit 1
