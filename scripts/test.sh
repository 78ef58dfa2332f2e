#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests against real etcd servers the
# harness starts itself, driving the real conch binary with real cgroups. Run as root (the
# tests create cgroups). Installs protoc and fetches etcd first if they are missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/ensure-deps.sh
cargo test --all-targets "$@"
