#!/usr/bin/env bash
# Watch a leader election hand over between two wrapped processes on a throw-away local
# etcd (`conch dev`). Installs protoc and fetches etcd first if they are missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/ensure-deps.sh
cargo build --quiet
export PATH="$root/.cache/etcd/sid/bin:$PATH"
exec target/debug/conch dev --listen "${CONCH_DEV_LISTEN:-http://127.0.0.1:2379}" -- scripts/demo-election.sh
