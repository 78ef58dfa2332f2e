#!/usr/bin/env bash
# Install what building conch needs and a fresh Debian machine lacks: protoc (etcd-client
# generates its gRPC code at build time). Then fetch etcd into .cache/etcd/ (no system install).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v protoc >/dev/null 2>&1 || [ ! -e /usr/include/google/protobuf/timestamp.proto ]; then
    echo "ensure-deps: installing protoc (Debian's protobuf-compiler, libprotobuf-dev)" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        protobuf-compiler libprotobuf-dev >&2
fi
"$root/scripts/fetch-etcd.sh" >/dev/null
