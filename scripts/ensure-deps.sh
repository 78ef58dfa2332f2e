#!/usr/bin/env bash
# Install what building and testing conch needs and a fresh Debian machine lacks: protoc
# (etcd-client generates its gRPC code at build time) and chromium + chromedriver (the status
# page's browser test). Then fetch etcd into .cache/etcd/ (no system install).
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
if ! command -v chromedriver >/dev/null 2>&1; then
    # The status page's browser test drives headless Chromium through chromedriver.
    echo "ensure-deps: installing chromium and chromedriver (Debian's chromium, chromium-driver)" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >&2
fi
"$root/scripts/fetch-etcd.sh" >/dev/null
