#!/usr/bin/env bash
# Run by scripts/demo.sh inside `conch dev` (CONCH_ENDPOINTS points at the dev etcd).
set -u
export CONCH_QUIET=true
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

held_by() { # wait until node $1 holds the office
    for _ in $(seq 100); do
        conch elect demo --who 2>/dev/null | grep -q " $1 " && return 0
        sleep 0.1
    done
    return 1
}

say "two candidates campaign for office 'demo'; the first wins, the second waits"
conch --node node-a elect demo -- sh -c 'echo "[node-a] I am the leader (fencing token CONCH_REV=$CONCH_REV); working 3s"; sleep 3; echo "[node-a] done: exiting hands the office over"' &
a=$!
held_by node-a
conch --node node-b elect demo -- sh -c 'echo "[node-b] I am the leader now (CONCH_REV=$CONCH_REV, higher than node-a'"'"'s)"; sleep 1' &
b=$!
sleep 0.5
say "who holds it? (conch elect demo --who)"
conch elect demo --who
wait "$a" "$b"

say "fail-closed: node-c leads, then its lease is revoked behind its back"
conch --node node-c elect demo --ttl 5s --kill-after 1s -- sh -c 'echo "[node-c] leader; my child and a setsid grandchild run until the hold is gone"; setsid sleep 600 & exec sleep 600' &
c=$!
held_by node-c
lease=$(conch elect demo --who --json | sed -n 's/.*"lease":"\([0-9a-f]*\)".*/\1/p')
if command -v etcdctl >/dev/null 2>&1; then
    etcdctl --endpoints="$CONCH_ENDPOINTS" lease revoke "$lease" >/dev/null
    wait "$c"
    echo "[demo] conch on node-c exited $? (70 = hold lost, child tree killed)"
else
    echo "[demo] etcdctl not found: stopping node-c with SIGTERM instead"
    kill -TERM "$c"
    wait "$c"
fi
say "office after the loss:"
conch elect demo --who || echo "demo is vacant (exit 1)"
