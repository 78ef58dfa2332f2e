#!/bin/sh
# chaos-node: one VM's part in the chaos scenarios of test-cluster-chaos.sh (run as root inside
# a VM made by vagrant/Vagrantfile; see vagrant/README.md). Partitions are iptables DROP rules
# in a chain of our own, on the private network only (Vagrant's ssh uses another interface).
#
#   chaos-node candidate [--restart]
#                             start `conch elect chaos` for this node in the background
#                             (--restart: service mode, for scenarios e and f)
#   chaos-node status         running / the exit code of the last candidate
#   chaos-node holder         "rev node lease pid grandchild-pid start" of a child running here
#   chaos-node kill-conch     SIGKILL this node's conch (scenario d)
#   chaos-node tree           the processes of this node's conch cgroups, if any
#   chaos-node partition      drop all private-network traffic, both ways (scenario a)
#   chaos-node isolate-peers  drop etcd peer traffic, port 2380, both ways (scenario c)
#   chaos-node heal           remove the drop rules
#   chaos-node etcd-kill      SIGKILL this node's etcd member (scenario b)
#   chaos-node etcd-start     start it again
#   chaos-node etcd-stop      SIGSTOP this node's etcd member (scenario e: on two nodes)
#   chaos-node etcd-cont      SIGCONT it
#   chaos-node leader         etcd endpoint status as a table (IS LEADER column)
#   chaos-node journal        print this node's journal
#   chaos-node reset          stop the candidate, heal, resume etcd, empty the journal
set -eu
. /etc/default/conch-chaos
state=/var/lib/conch-chaos
lib=/usr/local/lib/conch-chaos
TTL=${CHAOS_TTL:-4s}
KILL_AFTER=${CHAOS_KILL_AFTER:-1s}
mkdir -p "$state"

unchain() {
    iptables -D INPUT -j CONCH_CHAOS 2>/dev/null || true
    iptables -D OUTPUT -j CONCH_CHAOS 2>/dev/null || true
    iptables -F CONCH_CHAOS 2>/dev/null || true
    iptables -X CONCH_CHAOS 2>/dev/null || true
}
chain() {
    unchain
    iptables -N CONCH_CHAOS
    iptables -I INPUT -j CONCH_CHAOS
    iptables -I OUTPUT -j CONCH_CHAOS
}

case "${1:-}" in
candidate)
    if [ -f "$state/conch.pid" ] && kill -0 "$(cat "$state/conch.pid")" 2>/dev/null; then
        echo "a candidate is already running (pid $(cat "$state/conch.pid"))"
        exit 0
    fi
    case "${2:-}" in
        "") mode="" ;;
        --restart) mode=--restart ;;
        *) echo "usage: chaos-node candidate [--restart]" >&2; exit 64 ;;
    esac
    rm -f "$state/conch.rc"
    CHAOS_JOURNAL="$state/journal" setsid sh -c '
        /usr/local/bin/conch --node "$(hostname)" --endpoints "$1" elect chaos $6 --ttl "$2" --kill-after "$3" \
            -- "$4/child.sh" >>"$5/conch.log" 2>&1 &
        echo $! >"$5/conch.pid"
        wait $!
        echo $? >"$5/conch.rc"' sh "$CHAOS_ENDPOINTS" "$TTL" "$KILL_AFTER" "$lib" "$state" "$mode" \
        </dev/null >/dev/null 2>&1 &
    echo "candidate${mode:+ ($mode)} started on $(hostname)"
    ;;
status)
    if [ -f "$state/conch.rc" ]; then echo "exited $(cat "$state/conch.rc")"; else echo running; fi
    ;;
holder)
    python3 "$lib/chaos.py" holder "$state/journal" 500 0 || echo "no child running here"
    ;;
kill-conch)
    kill -KILL "$(cat "$state/conch.pid")"
    echo "conch SIGKILLed at $(date +%s%N)"
    ;;
tree)
    find /sys/fs/cgroup -path '*conch.slice/*' -name cgroup.procs 2>/dev/null | while IFS= read -r f; do
        echo "$f: $(tr '\n' ' ' <"$f")"
    done
    ;;
partition)
    chain
    iptables -A CONCH_CHAOS -s "$CHAOS_SUBNET" -j DROP
    iptables -A CONCH_CHAOS -d "$CHAOS_SUBNET" -j DROP
    echo "partitioned at $(date +%s%N)"
    ;;
isolate-peers)
    chain
    iptables -A CONCH_CHAOS -p tcp --dport 2380 -j DROP
    iptables -A CONCH_CHAOS -p tcp --sport 2380 -j DROP
    echo "peers cut off at $(date +%s%N)"
    ;;
heal)
    unchain
    echo "healed"
    ;;
etcd-kill)
    systemctl kill -s KILL etcd
    echo "etcd SIGKILLed at $(date +%s%N)"
    ;;
etcd-start)
    systemctl start --no-block etcd
    ;;
etcd-stop)
    systemctl kill -s STOP etcd
    echo "etcd SIGSTOPped at $(date +%s%N)"
    ;;
etcd-cont)
    systemctl kill -s CONT etcd
    echo "etcd SIGCONTed at $(date +%s%N)"
    ;;
leader)
    etcdctl --endpoints="$CHAOS_ENDPOINTS" --command-timeout=2s endpoint status -w table || true
    ;;
journal)
    cat "$state/journal" 2>/dev/null || true
    ;;
reset)
    if [ -f "$state/conch.pid" ]; then kill -TERM "$(cat "$state/conch.pid")" 2>/dev/null || true; fi
    unchain
    systemctl kill -s CONT etcd 2>/dev/null || true
    : >"$state/journal"
    rm -f "$state/conch.rc"
    ;;
*)
    sed -n '2,22p' "$0" >&2
    exit 64
    ;;
esac
