#!/usr/bin/env bash
# test-cluster-chaos.sh: conch's promise under real faults, across network namespaces.
#
# Builds a three-node cluster on this one machine: network namespaces n1, n2, n3 (each with
# its own hostname) plus a client namespace, joined by veth pairs to a bridge in a hub
# namespace, addresses 10.231.0.0/24. One etcd member per node, one `conch elect chaos`
# candidate per node. The candidates' child journals start/beat/end lines (wall-clock µs, node,
# CONCH_REV, pid, lease) into one shared file; a setsid grandchild that ignores SIGTERM beats
# too. Then faults, each with its assertions:
#
#   a  partition the holder's node from every etcd member (nft drop rules, both ways)
#   b  SIGKILL the etcd leader member
#   c  isolate the etcd leader from its peers (peer port dropped, clients still reach it)
#   d  SIGKILL the holder's conch: the whole tree must be gone within 1 s
#   e  quorum loss and return, candidates in service mode (`--restart`): etcd on the two nodes
#      other than the holder's SIGSTOPped for CHAOS_OUTAGE (> TTL) seconds, then SIGCONTed. The
#      holder's tree must be dead before quorum returns (no lease can be revoked earlier: that
#      is a Raft commit), nothing may run or start while quorum is gone, and the office must be
#      held again (a higher rev) within CHAOS_QUORUM_BOUND of the return, every candidate
#      still running
#   f  the etcd leader's host dies (leadership moved onto the holder's host first): every
#      process in that namespace (etcd member, conch, the child tree) SIGKILLed at once; another
#      host must hold the office within TTL + 10 s; then the host's etcd member and candidate
#      are started again and the cluster must be healthy with all three members
#
# Scenarios a-d run plain candidates (they assert conch's exit code 70 on a lost hold); e and f
# run `--restart` candidates: the script switches (SIGTERM, then start again) when needed.
#
# and a checker: no two revs' intervals overlap, revs strictly increase in start order, every
# record carries a rev. Exit 0 only if every scenario passed; 1 if one failed; 2 if the test
# could not be set up.
#
# Needs root, iproute2, nftables (or iptables), util-linux (nsenter, unshare, setsid), python3;
# as root with apt it installs what is missing. Traffic never leaves the machine: the root
# namespace gets no test address, the namespaces have only `lo` and their test link and no
# default route (checked before any traffic), and partitions are drop rules inside the
# namespaces, never removed links or routes. Everything is torn down on exit (trap).
#
# Environment:
#   CONCH_BIN         conch binary to test (default: `cargo build`, else target/debug/conch)
#   ETCD_BIN_DIR      directory with etcd + etcdctl (default: scripts/fetch-etcd.sh)
#   CHAOS_TTL         lease TTL in seconds (default 4)
#   CHAOS_KILL_AFTER  --kill-after in seconds (default 1)
#   CHAOS_ROUNDS      how many times to run the partition scenario (default 1)
#   CHAOS_SCENARIOS   which scenarios, e.g. "a d" (default "a b c d e f")
#   CHAOS_OUTAGE      (e) seconds without quorum (default TTL + 3; must exceed the TTL)
#   CHAOS_QUORUM_BOUND (e) seconds after quorum returns within which the office must be held
#                     again (default 30)
#   CHAOS_KEEP=1      keep the work directory (logs, journal) even when everything passed
#
# `test-cluster-chaos.sh --check JOURNAL` runs only the checker on a journal (e.g. merged from
# the Vagrant VMs); `--helpers DIR` writes the test child and the checker into DIR.
set -euo pipefail
export LC_ALL=C

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TTL="${CHAOS_TTL:-4}"
KILL_AFTER="${CHAOS_KILL_AFTER:-1}"
ROUNDS="${CHAOS_ROUNDS:-1}"
SCENARIOS="${CHAOS_SCENARIOS:-a b c d e f}"
OUTAGE="${CHAOS_OUTAGE:-$((TTL + 3))}"
QUORUM_BOUND="${CHAOS_QUORUM_BOUND:-30}"
OFFICE=chaos
NET=10.231.0
NODES=(n1 n2 n3)
TAG="cchaos$$"                       # namespace names are unique to this run
HUB="$TAG-hub"
CLI="$TAG-cli"
CLI_ADDR="$NET.10"
declare -A NS ADDR ETCD_PID CAND_PID
for i in 1 2 3; do
    NS[n$i]="$TAG-n$i"
    ADDR[n$i]="$NET.$i"
done
ALL_EPS="$NET.1:2379,$NET.2:2379,$NET.3:2379"
NS_MADE=()
WORK=""
CG_ROOT=""
FAILED=0
T0=""

now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
T0=$(now_us)
log() {
    local d=$(( ($(now_us) - T0) / 100000 ))
    printf '[%4d.%ds] %s\n' $((d / 10)) $((d % 10)) "$*"
}
die() { echo "test-cluster-chaos: $*" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# Cleanup: every process in our namespaces, the cgroups conch made for us, the namespaces
# (deleting them deletes the veth pairs), the work directory.
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    exec 3>&2 2>/dev/null   # no "Killed" job notices; our own messages go to fd 3
    local ns pids deadline
    for ns in "${NS_MADE[@]}"; do
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    done
    deadline=$(( $(now_us) + 5000000 ))
    for ns in "${NS_MADE[@]}"; do
        while [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && [ "$(now_us)" -lt "$deadline" ]; do
            sleep 0.05
        done
        [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && echo "cleanup: processes left in $ns: $(ip netns pids "$ns" | tr '\n' ' ')" >&3
    done
    wait
    if [ -n "$CG_ROOT" ] && [ -d "$CG_ROOT" ]; then
        local cg
        for cg in "$CG_ROOT"/*/; do
            [ -d "$cg" ] || continue
            [ -w "$cg/cgroup.kill" ] && echo 1 >"$cg/cgroup.kill" 2>/dev/null
            deadline=$(( $(now_us) + 2000000 ))
            while ! rmdir "$cg" 2>/dev/null && [ "$(now_us)" -lt "$deadline" ]; do sleep 0.05; done
        done
        rmdir "$CG_ROOT" 2>/dev/null || echo "cleanup: could not remove $CG_ROOT" >&3
    fi
    for ((i = ${#NS_MADE[@]} - 1; i >= 0; i--)); do
        ip netns del "${NS_MADE[$i]}" 2>/dev/null || echo "cleanup: could not delete netns ${NS_MADE[$i]}" >&3
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$rc" -eq 0 ] && [ "${CHAOS_KEEP:-0}" != 1 ]; then
            rm -rf "$WORK"
        else
            echo "logs, journal and results kept in $WORK" >&3
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# The workload conch runs: journals wall-clock µs, node, rev, kind, pid, lease. A setsid
# grandchild that ignores SIGTERM beats too (only cgroup.kill / SIGKILL ends it).
write_helpers() { # write_helpers DIR: the test child and the Python helper
cat >"$1/child.sh" <<'EOF'
#!/usr/bin/env bash
export LC_ALL=C
j=${CHAOS_JOURNAL:?}
step=${CHAOS_BEAT:-0.05}
rec() {
    local t=$EPOCHREALTIME
    printf '%s %s %s %s %s %s\n' "${t/./}" "${CONCH_NODE:--}" "${CONCH_REV:--}" "$1" "$BASHPID" "${CONCH_LEASE:--}" >>"$j"
}
if [ "${1:-}" = grand ]; then
    trap '' TERM
    rec gstart
    while :; do rec gbeat; sleep "$step"; done
fi
trap 'rec end; exit 0' TERM
rec start
setsid "$0" grand </dev/null >/dev/null 2>&1 &
while :; do rec beat; sleep "$step" & wait $!; done
EOF
chmod +x "$1/child.sh"

# Python helper: journal checker, holder lookup, tree/lease watcher, etcd leader parsing,
# per-scenario verdicts.
cat >"$1/chaos.py" <<'EOF'
import json, os, sys, time, urllib.request

def now_us():
    return time.time_ns() // 1000

def read_journal(path, live=False):
    recs, bad = [], []
    with open(path) as f:
        data = f.read()
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif live and lines:
        lines.pop()  # a line still being written
    for n, line in enumerate(lines, 1):
        p = line.split()
        try:
            ts, node, rev, kind, pid, lease = p
            ts, pid = int(ts), int(pid)
        except ValueError:
            bad.append((n, line))
            continue
        r = int(rev) if rev.isdigit() and int(rev) > 0 else None
        if r is None:
            bad.append((n, line))
        recs.append(dict(ts=ts, node=node, rev=r, kind=kind, pid=pid, lease=lease))
    return recs, bad

def intervals(recs):
    iv = {}
    for r in recs:
        if r["rev"] is None:
            continue
        i = iv.setdefault(r["rev"], dict(rev=r["rev"], first=r["ts"], last=r["ts"], nodes=set(),
                                          leases=set(), pid=None, gpid=None, term=None, n=0))
        i["first"] = min(i["first"], r["ts"])
        i["last"] = max(i["last"], r["ts"])
        i["nodes"].add(r["node"])
        i["leases"].add(r["lease"])
        i["n"] += 1
        if r["kind"] == "start":
            i["pid"] = r["pid"]
        elif r["kind"] == "gstart":
            i["gpid"] = r["pid"]
        elif r["kind"] == "end" and i["term"] is None:
            i["term"] = r["ts"]
    return iv

def check(recs, bad, lo=None, hi=None):
    """The invariants, over the revs whose interval meets [lo, hi]. Returns (problems, max overlap µs, revs)."""
    iv = intervals(recs)
    sel = [i for i in iv.values() if (lo is None or i["last"] >= lo) and (hi is None or i["first"] <= hi)]
    sel.sort(key=lambda i: i["first"])
    problems, worst = [], 0
    for n, line in bad:
        if lo is None:
            problems.append(f"journal line {n} has no valid rev or is malformed: {line!r}")
    for i in sel:
        if len(i["nodes"]) != 1 or len(i["leases"]) != 1:
            problems.append(f"rev {i['rev']} appears on several nodes/leases: {sorted(i['nodes'])} {sorted(i['leases'])}")
    for k in range(1, len(sel)):
        if sel[k]["rev"] <= sel[k - 1]["rev"]:
            problems.append(f"rev {sel[k]['rev']} started after rev {sel[k-1]['rev']}: revs must increase")
    for k in range(len(sel)):
        for m in range(k):
            ov = sel[m]["last"] - sel[k]["first"]
            if ov > 0:
                worst = max(worst, ov)
                problems.append(f"OVERLAP {ov/1000:.0f} ms: rev {sel[m]['rev']} ({min(sel[m]['nodes'])}) ran until "
                                f"{sel[m]['last']} after rev {sel[k]['rev']} ({min(sel[k]['nodes'])}) started at {sel[k]['first']}")
    return problems, worst, sel

def alive(pid, start):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    fields = st[st.rindex(")") + 2:].split()
    return fields[0] != "Z" and (start is None or fields[19] == start)

def starttime(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rindex(")") + 2:].split()[19]
    except OSError:
        return None

def post(ep, path, body, timeout):
    req = urllib.request.Request(f"http://{ep}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())

def cmd_holder(journal, fresh_ms, min_rev):
    """The rev whose child and grandchild are running now: 'rev node lease pid gpid first'."""
    recs, _ = read_journal(journal, live=True)
    iv = intervals(recs)
    t = now_us()
    cands = [i for i in iv.values() if i["rev"] > int(min_rev) and i["pid"] and i["gpid"]
             and i["term"] is None and t - i["last"] <= int(fresh_ms) * 1000]
    if not cands:
        return 1
    i = max(cands, key=lambda i: i["first"])
    print(i["rev"], min(i["nodes"]), min(i["leases"]), i["pid"], i["gpid"], i["first"])
    return 0

def cmd_watch(pids, lease, endpoints, deadline_s, stop_file, out, ready_file=None):
    """Poll the tree (every 20 ms) and the lease as another client sees it (every 100 ms).
    READY_FILE (optional) is created after the first TTL reading."""
    pids = [int(p) for p in pids.split(",") if p]
    starts = {p: starttime(p) for p in pids}
    eps = endpoints.split(",")
    lid = str(int(lease, 16))
    deadline = now_us() + int(float(deadline_s) * 1e6)
    # gone_us: when the request that first found the lease gone was sent; gone_recv_us: when
    # its answer came. The lease was gone somewhere in between: a request sent while quorum
    # was lost is answered only once it is back, with what is true then.
    res = dict(dead_us=None, e_lower_us=None, gone_us=None, gone_recv_us=None, last_alive_us=None, last_exists_us=None,
               readings=0, errors=0, log=[])
    last_poll, k = 0, 0
    while True:
        t = now_us()
        if res["dead_us"] is None and not any(alive(p, starts[p]) for p in pids):
            res["dead_us"] = t
        if res["gone_us"] is None and t - last_poll >= 100_000:
            last_poll = t
            ep = eps[k % len(eps)]
            t0 = now_us()
            try:
                r = post(ep, "/v3/lease/timetolive", {"ID": lid}, 0.3)
                ttl = int(r.get("TTL", 0))
                res["readings"] += 1
                res["log"].append([t0, ttl])
                if ttl == -1 and "grantedTTL" not in r:
                    res["gone_us"], res["gone_recv_us"] = t0, now_us()
                else:
                    # not revoked yet: the holder's key still exists, nobody else can hold the office
                    res["last_exists_us"] = t0
                if ttl >= 1:
                    # the server truncates the remaining seconds: expiry >= t0 + ttl
                    e = t0 + ttl * 1_000_000
                    res["e_lower_us"] = max(res["e_lower_us"] or 0, e)
                    res["last_alive_us"] = t0
                    if ready_file and not os.path.exists(ready_file):
                        open(ready_file, "w").close()
            except Exception:
                res["errors"] += 1
                k += 1
        if (res["dead_us"] is not None and res["gone_us"] is not None) or t > deadline \
                or os.path.exists(stop_file):
            break
        time.sleep(0.02)
    with open(out, "w") as f:
        json.dump(res, f)
    return 0

def cmd_leader(want):
    """Read `etcdctl endpoint status -w json` on stdin; print the leader's node if every
    responding member (at least `want` of them) agrees on a leader that answered too."""
    try:
        st = json.load(sys.stdin)
    except ValueError:
        return 1
    ids, leaders = {}, set()
    for e in st:
        s = e.get("Status", {})
        mid, lead = s.get("header", {}).get("member_id"), s.get("leader")
        if not mid or not lead:
            return 1  # a member that knows no leader (an election is going on)
        ids[mid] = e["Endpoint"]
        leaders.add(lead)
    if len(st) < int(want) or len(leaders) != 1:
        return 1
    lead = leaders.pop()
    if lead not in ids:
        return 1
    print("n" + ids[lead].split(":")[0].rsplit(".", 1)[1])
    return 0

def cmd_ttl(endpoints, lease):
    """Print the lease's remaining TTL (whole seconds, truncated) as the etcd leader sees it."""
    for ep in endpoints.split(","):
        try:
            r = post(ep, "/v3/lease/timetolive", {"ID": str(int(lease, 16))}, 0.5)
            print(int(r.get("TTL", 0)))
            return 0
        except Exception:
            continue
    return 1

def cmd_member_hex(name):
    """Read `etcdctl member list -w json` on stdin; print member NAME's ID in hex."""
    for m in json.load(sys.stdin).get("members", []):
        if m.get("name") == name:
            print(f"{int(m['ID']):x}")
            return 0
    return 1

def cmd_maxrev(journal):
    """The highest rev in the journal (0 if none)."""
    recs, _ = read_journal(journal, live=True)
    print(max((r["rev"] for r in recs if r["rev"]), default=0))
    return 0

def ms(us):
    return f"{us/1000:+.0f} ms" if us is not None else "-"

def cmd_verdict(a):
    """a: dict of key=value from the scenario. Prints the findings, appends a summary row."""
    recs, bad = read_journal(a["journal"])
    iv = intervals(recs)
    rev = int(a["rev"])
    h = iv.get(rev)
    w = {}
    if a.get("watch") and os.path.exists(a["watch"]):
        with open(a["watch"]) as f:
            w = json.load(f)
    fault = int(a["fault_us"])
    problems, worst, sel = check(recs, bad, int(a["from_us"]), int(a["to_us"]))
    fails = list(problems)
    notes = []
    mode = a["mode"]
    dead, e_low, gone = w.get("dead_us"), w.get("e_lower_us"), w.get("gone_us")
    lost = dead is not None
    succ = min((i for i in iv.values() if i["rev"] > rev and i["first"] >= fault), key=lambda i: i["first"], default=None)
    term_rel = dead_rel = "-"
    if mode == "quorum":
        # (e) No lease can be revoked, by expiry or by request, while two of three members are
        # stopped: a revocation is a Raft commit. So the key could not vanish before quorum
        # returned (or before a client last saw the lease granted, if that is later).
        e_low = max(e_low or 0, w.get("last_exists_us") or 0, int(a["restored_us"]))
    if lost and e_low is not None:
        dead_rel = f"{(e_low - dead)/1e6:.2f} s before" if dead < e_low else f"{(dead - e_low)/1e6:.2f} s AFTER"
        if mode == "quorum":
            dead_rel += " quorum back" if e_low == int(a["restored_us"]) else " lease last seen"
        if h and h["term"]:
            term_rel = f"{(e_low - h['term'])/1e6:.2f} s before" if h["term"] < e_low else f"{(h['term'] - e_low)/1e6:.2f} s AFTER"
    if mode in ("partition", "etcd") and lost:
        if e_low is None:
            fails.append("the watcher never read the holder's lease TTL: cannot place the kill against expiry")
        elif dead >= e_low:
            fails.append(f"tree of rev {rev} died {(dead - e_low)/1000:.0f} ms after its lease could have expired")
        if w.get("last_exists_us") is None or w["last_exists_us"] <= dead:
            fails.append("no client saw the lease still granted after the tree was dead")
        if a.get("rc") != "70":
            fails.append(f"cut-off conch exited {a.get('rc')}, want 70")
    if mode == "partition" and not lost:
        fails.append(f"tree of rev {rev} was still alive when the watcher gave up")
    if mode == "etcd" and not lost:
        if h is None or h["last"] < int(a["to_us"]) - 1_000_000:
            fails.append(f"rev {rev} neither kept beating nor was its tree seen dead")
    if mode == "sigkill":
        limit = int(a["limit_ms"]) * 1000
        if not lost or dead - fault > limit:
            n = a.get("survivors", "?")
            fails.append(f"tree of rev {rev} NOT gone within {limit//1000} ms of conch's SIGKILL "
                         f"({n} process(es) of it still alive: the orphaned tree was killed by this script "
                         f"{'after the successor started' if succ else 'at the deadline'})")
        notes.append(f"tree gone {(dead - fault)/1000:.0f} ms after SIGKILL" if lost and dead - fault <= limit
                     else "tree survived conch")
    if mode == "quorum":
        # (e) two of three members stopped for longer than the TTL, --restart candidates
        restored, bound = int(a["restored_us"]), int(a["bound_ms"]) * 1000
        if a.get("frozen") != "2":
            fails.append(f"only {a.get('frozen')} of the 2 etcd members were seen stopped: quorum was not proven gone")
        # Only an answer that came back before quorum did proves the lease gone during the
        # outage (a request sent just before the restore is answered after it).
        if w.get("gone_recv_us") is not None and w["gone_recv_us"] < restored:
            fails.append(f"rev {rev}'s lease was seen gone during the outage")
        if not lost or dead >= restored:
            fails.append(f"tree of rev {rev} still alive when quorum returned, {(restored - fault)/1e6:.1f} s into the outage (TTL {a['ttl']} s)")
        else:
            pre = [t + k * 1_000_000 for t, k in w.get("log", []) if t < restored and k >= 1]
            if pre:
                notes.append(f"tree dead {(dead - max(pre))/1000:+.0f} ms vs the expiry bound from TTL readings before the outage "
                             "(whole seconds, truncated; they end with quorum, so this bound is up to 1 s early)")
            quiet = [r for r in recs if dead < r["ts"] < restored]
            if quiet:
                fails.append(f"{len(quiet)} journal record(s) of rev(s) {sorted({r['rev'] or 0 for r in quiet})} "
                             f"while quorum was gone, after rev {rev}'s tree had died: somebody ran without quorum")
        starts = [r for r in recs if fault <= r["ts"] < restored and r["kind"] in ("start", "gstart")]
        if starts:
            fails.append(f"rev(s) {sorted({r['rev'] or 0 for r in starts})} started while quorum was gone")
        before = max((i["rev"] for i in iv.values() if i["first"] < restored), default=0)
        if succ is None:
            fails.append(f"the office was not held again within {bound/1e6:.0f} s of quorum's return")
        else:
            if succ["rev"] <= before:
                fails.append(f"rev {succ['rev']} after the outage is not higher than rev {before} before it")
            if succ["first"] - restored > bound:
                fails.append(f"office held again only {(succ['first'] - restored)/1e6:.1f} s after quorum returned (bound {bound/1e6:.0f} s)")
            if h is not None and succ["first"] <= h["last"]:
                fails.append(f"successor rev {succ['rev']} started before rev {rev}'s last record")
            notes.append(f"rev {succ['rev']} ({min(succ['nodes'])}) started {(succ['first'] - restored)/1e6:.1f} s after quorum returned")
        if a.get("cands") != "3":
            fails.append(f"{a.get('cands')} of 3 --restart candidates still running after the outage: service mode must outlive quorum loss")
    if mode == "host":
        # (f) every process of the etcd leader's host (= the holder's host) SIGKILLed at once
        bound, victim = int(a["bound_ms"]) * 1000, a["victim"]
        if victim != a["node"]:
            # leadership could not be moved onto the holder's host: the holder lives elsewhere
            # and must simply keep (or hand over cleanly) the office; overlap and who_rev still apply
            notes.append(f"the holder ran on {a['node']}, not on the dead host {victim}")
        elif not lost or dead - fault > 1_000_000:
            fails.append(f"tree of rev {rev} not gone within 1 s of its host's death")
        if succ is None:
            if victim == a["node"]:
                fails.append(f"no successor rev > {rev} within {bound/1e6:.0f} s of the host's death")
        else:
            if min(succ["nodes"]) == victim:
                fails.append(f"successor rev {succ['rev']} runs on the dead host {victim}")
            if succ["first"] - fault > bound:
                fails.append(f"office held again only {(succ['first'] - fault)/1e6:.1f} s after the host died (bound {bound/1e6:.0f} s)")
            if h is not None and succ["first"] <= h["last"]:
                fails.append(f"successor rev {succ['rev']} started before rev {rev}'s last record")
            notes.append(f"rev {succ['rev']} ({min(succ['nodes'])}) started {(succ['first'] - fault)/1e6:.1f} s after the host died")
        if a.get("healthy") != "ok":
            fails.append(f"after restarting {victim}: {a.get('healthy')}")
    if mode in ("partition", "sigkill") or (mode == "etcd" and lost):
        if succ is None:
            fails.append(f"no successor rev > {rev} started after the fault")
        elif h is not None and succ["first"] <= h["last"]:
            fails.append(f"successor rev {succ['rev']} started {(h['last'] - succ['first'])/1000:.0f} ms before rev {rev}'s last record")
    if a.get("who_rev") in (None, "", "-"):
        fails.append("the office is not held after the scenario (conch --who)")
    else:
        cur = max((i for i in iv.values() if i["term"] is None), key=lambda i: i["last"], default=None)
        if cur is None or str(cur["rev"]) != a["who_rev"]:
            fails.append(f"conch --who says rev {a['who_rev']}, the journal's running rev is {cur and cur['rev']}")
    if succ is not None and gone is not None:
        notes.append(f"successor start {(succ['first'] - gone)/1000:+.0f} ms vs lease seen gone")
    where = f"leader {a.get('lead')}" + (" (holder's node)" if a.get("lead") == a["node"] else "")
    if mode == "etcd":
        outcome = f"{where}: " + ("hold lost, tree killed" if lost else "hold kept")
    elif mode == "partition":
        outcome = f"{a['node']} cut off, rc {a.get('rc')}"
    elif mode == "quorum":
        outcome = f"etcd {a.get('stopped')} SIGSTOPped {(int(a['restored_us']) - fault)/1e6:.0f} s, " + \
                  ("tree killed" if lost else "tree kept running")
    elif mode == "host":
        outcome = f"host {a['victim']} (etcd leader) SIGKILLed, {a.get('nkilled')} procs"
    else:
        outcome = f"conch SIGKILLed, rc {a.get('rc')}"
    if succ:
        outcome += f"; rev {succ['rev']} ({min(succ['nodes'])}) took over"
        if mode == "quorum":
            outcome += f" {(succ['first'] - int(a['restored_us']))/1e6:.1f} s after restore"
        elif mode == "host":
            outcome += f" after {(succ['first'] - fault)/1e6:.1f} s"
    ok = not fails
    print(f"  holder rev {rev} on {a['node']}; fault at {fault}")
    if lost:
        print(f"  SIGTERM seen (child's 'end'): {term_rel} lease expiry; tree dead: {dead_rel} lease expiry"
              f" (expiry >= {e_low}, tree dead at {dead}, lease seen gone at {gone})")
    for n in notes:
        print(f"  {n}")
    print(f"  overlap: {worst/1000:.0f} ms over {len(sel)} rev(s) in the window")
    for p in fails:
        print(f"  FAIL: {p}")
    print(f"  => {'PASS' if ok else 'FAIL'}")
    with open(a["results"], "a") as f:
        f.write("\t".join([a["name"], f"{a['node']}/{rev}", outcome, term_rel, dead_rel,
                           f"{worst/1000:.0f}", "PASS" if ok else "FAIL"]) + "\n")
    return 0 if ok else 1

def cmd_final(journal, results):
    recs, bad = read_journal(journal)
    problems, worst, sel = check(recs, bad)
    revs = [i["rev"] for i in sel]
    ok = not problems
    print(f"  {len(recs)} records, {len(sel)} revs ({', '.join(map(str, revs))}), max overlap {worst/1000:.0f} ms")
    for p in problems:
        print(f"  FAIL: {p}")
    with open(results, "a") as f:
        f.write("\t".join(["journal", "all", f"{len(recs)} records, {len(sel)} revs", "-", "-",
                           f"{worst/1000:.0f}", "PASS" if ok else "FAIL"]) + "\n")
    return 0 if ok else 1

def cmd_table(results):
    rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
    head = ["scenario", "holder", "outcome", "SIGTERM vs expiry", "tree dead vs expiry", "overlap ms", "result"]
    wid = [max(len(r[k]) for r in rows + [head]) for k in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(wid[k]) for k, c in enumerate(r)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (x + 2) for x in wid) + "|")
    for r in rows:
        print(line(r))
    return 0 if all(r[-1] == "PASS" for r in rows) else 1

if __name__ == "__main__":
    c, args = sys.argv[1], sys.argv[2:]
    if c == "holder":
        sys.exit(cmd_holder(*args))
    if c == "watch":
        sys.exit(cmd_watch(*args))
    if c == "leader":
        sys.exit(cmd_leader(*args))
    if c == "ttl":
        sys.exit(cmd_ttl(*args))
    if c == "member-hex":
        sys.exit(cmd_member_hex(*args))
    if c == "maxrev":
        sys.exit(cmd_maxrev(*args))
    if c == "verdict":
        sys.exit(cmd_verdict(dict(x.split("=", 1) for x in args)))
    if c == "final":
        sys.exit(cmd_final(*args))
    if c == "table":
        sys.exit(cmd_table(*args))
    sys.exit(f"unknown command {c}")
EOF
}

# ---------------------------------------------------------------------------------------------
# `test-cluster-chaos.sh --check JOURNAL`: only run the checker on a journal (for example one
# merged from the Vagrant VMs, see vagrant/README.md). Needs python3, nothing else.
if [ "${1:-}" = --helpers ]; then  # write child.sh and chaos.py into DIR (used by vagrant/)
    [ -d "${2:-}" ] || die "usage: $0 --helpers DIR"
    write_helpers "$2"
    exit 0
fi
if [ "${1:-}" = --check ]; then
    [ -r "${2:-}" ] || die "usage: $0 --check JOURNAL"
    WORK="$(mktemp -d /tmp/conch-chaos-check.XXXXXX)"
    write_helpers "$WORK"
    : >"$WORK/results.tsv"
    rc=0
    python3 "$WORK/chaos.py" final "$2" "$WORK/results.tsv" || rc=1
    python3 "$WORK/chaos.py" table "$WORK/results.tsv" >/dev/null || rc=1
    rm -rf "$WORK"
    WORK=""
    [ "$rc" -eq 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
    exit "$rc"
fi

[ $# -eq 0 ] || die "usage: $0 [--check JOURNAL | --helpers DIR] (settings via CHAOS_* variables, see the header)"
for s in $SCENARIOS; do
    case "$s" in a|b|c|d|e|f) ;; *) die "unknown scenario '$s' in CHAOS_SCENARIOS (a b c d e f)" ;; esac
done
[ "$OUTAGE" -gt "$TTL" ] || die "CHAOS_OUTAGE ($OUTAGE s) must exceed the TTL ($TTL s)"

# ---------------------------------------------------------------------------------------------
# Prerequisites.
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, nft, cgroups)"
need_pkgs=()
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v nft >/dev/null || command -v iptables >/dev/null || need_pkgs+=(nftables)
for t in nsenter unshare setsid; do command -v $t >/dev/null || need_pkgs+=(util-linux); done
command -v python3 >/dev/null || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing: ${need_pkgs[*]} (and no apt-get to install them)"
    echo "installing ${need_pkgs[*]} with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    # shellcheck disable=SC2046  # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${need_pkgs[@]}" | sort -u) >&2
fi
if command -v nft >/dev/null; then FW=nft; else FW=iptables; fi

ETCD_DIR="${ETCD_BIN_DIR:-$("$ROOT/scripts/fetch-etcd.sh")}"
ETCD="$ETCD_DIR/etcd"
ETCDCTL="$ETCD_DIR/etcdctl"
[ -x "$ETCD" ] && [ -x "$ETCDCTL" ] || die "no etcd/etcdctl in $ETCD_DIR"

WORK="$(mktemp -d /tmp/conch-chaos.XXXXXX)"
chmod 755 "$WORK"
LOGS="$WORK/logs"
JOURNAL="$WORK/journal"
RESULTS="$WORK/results.tsv"
mkdir -p "$LOGS" "$WORK/etcd" "$WORK/bin"
: >"$JOURNAL"
export CHAOS_JOURNAL="$JOURNAL"
: >"$RESULTS"
write_helpers "$WORK"
PY="$WORK/chaos.py"

if [ -n "${CONCH_BIN:-}" ]; then
    src_bin="$CONCH_BIN"
else
    src_bin="$ROOT/target/debug/conch"
    if command -v cargo >/dev/null; then
        if ! (cd "$ROOT" && cargo build --quiet) >"$LOGS/cargo-build.log" 2>&1; then
            [ -x "$src_bin" ] || { cat "$LOGS/cargo-build.log" >&2; die "cargo build failed"; }
            echo "warning: cargo build failed; testing the existing $src_bin" >&2
        fi
    fi
fi
[ -x "$src_bin" ] || die "no conch binary at $src_bin (set CONCH_BIN or install cargo)"
# A private copy: a rebuild during the run cannot swap the binary under the test.
CONCH="$WORK/bin/conch"
cp "$src_bin" "$CONCH"

# conch's children get their own cgroup root, so cleanup never touches anybody else's.
cg2=$(awk '$(NF-2) == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
if [ -n "$cg2" ] && [ -w "$cg2" ]; then
    CG_ROOT="$cg2/conch-chaos-$$.slice"
    CG_FLAGS=(--cgroup-root "$CG_ROOT")
else
    CG_FLAGS=()
fi


# ---------------------------------------------------------------------------------------------
# Namespace helpers. `inns NS cmd…` runs a command in NS's network namespace (nsenter keeps the
# mount namespace, so the cgroup v2 mount stays visible; `ip netns exec` would remount /sys).
inns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" -- "$@"; }
# `spawn NS HOST cmd…` (always in the background): also a UTS namespace with its own hostname;
# every step execs, so $! is the command's own pid.
spawn() {
    local ns=$1 host=$2; shift 2
    exec nsenter --net="/run/netns/$ns" -- unshare --uts -- \
        sh -c 'echo "$0" >/proc/sys/kernel/hostname && exec "$@"' "$host" "$@"
}
alive() { # pid is running (not a zombie)
    local st
    [ -r "/proc/$1/stat" ] || return 1
    read -r st 2>/dev/null <"/proc/$1/stat" || return 1
    st=${st##*) }
    [ "${st%% *}" != Z ]
}
# poll MS CMD…: run CMD every 50 ms until it succeeds; fail after MS milliseconds.
poll() {
    local end=$(( $(now_us) + $1 * 1000 )); shift
    until "$@"; do
        [ "$(now_us)" -lt "$end" ] || return 1
        sleep 0.05
    done
}
py() { python3 "$PY" "$@"; }
ctl() { inns "$CLI" "$ETCDCTL" --endpoints="$ALL_EPS" --dial-timeout=1s --command-timeout=2s "$@"; }

# ---------------------------------------------------------------------------------------------
# Network: hub namespace with a bridge; n1..n3 and the client namespace hang off it.
log "network: namespaces $TAG-{hub,n1,n2,n3,cli}, bridge in the hub, $NET.0/24 on veth links only"
if ip -4 -o addr show | grep -q " $NET\."; then
    die "the root namespace already has an address in $NET.0/24: refusing to add a test network there"
fi
for ns in "$HUB" "${NS[n1]}" "${NS[n2]}" "${NS[n3]}" "$CLI"; do
    ip netns add "$ns"
    NS_MADE+=("$ns")
    ip -n "$ns" link set lo up
    inns "$ns" sh -c 'echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6' 2>/dev/null || true
done
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up
attach() { # attach NS ADDR PORTNAME
    ip -n "$HUB" link add "$3" type veth peer name eth0 netns "$1"
    ip -n "$HUB" link set "$3" master br0
    ip -n "$HUB" link set "$3" up
    ip -n "$1" addr add "$2/24" dev eth0
    ip -n "$1" link set eth0 up
}
for n in "${NODES[@]}"; do attach "${NS[$n]}" "${ADDR[$n]}" "v-$n"; done
attach "$CLI" "$CLI_ADDR" v-cli

# Safety: no default route anywhere, only lo + the test links, nothing on the root side.
for ns in "${NS_MADE[@]}"; do
    if [ -n "$(ip -n "$ns" route show default)" ] || [ -n "$(ip -n "$ns" -6 route show default 2>/dev/null)" ]; then
        die "namespace $ns has a default route: refusing to send any traffic"
    fi
    links=$(ip -n "$ns" -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | sort | tr '\n' ' ')
    case "$ns" in
        "$HUB") want="br0 lo v-cli v-n1 v-n2 v-n3 " ;;
        *) want="eth0 lo " ;;
    esac
    [ "$links" = "$want" ] || die "namespace $ns has links '$links', want '$want'"
done
ip -4 -o addr show | grep -q " $NET\." && die "a test address leaked into the root namespace"
log "safety checks passed: no default route in any namespace, root namespace has no $NET.x address"

# ---------------------------------------------------------------------------------------------
# etcd: one member per node namespace.
CLUSTER="n1=http://$NET.1:2380,n2=http://$NET.2:2380,n3=http://$NET.3:2380"
start_member() {
    local n=$1 a=${ADDR[$1]}
    ( spawn "${NS[$n]}" "$n" "$ETCD" --name "$n" --data-dir "$WORK/etcd/$n" \
        --listen-client-urls "http://$a:2379" --advertise-client-urls "http://$a:2379" \
        --listen-peer-urls "http://$a:2380" --initial-advertise-peer-urls "http://$a:2380" \
        --initial-cluster "$CLUSTER" --initial-cluster-token "conch-chaos-$$" \
        --initial-cluster-state new --log-level warn ) >>"$LOGS/etcd-$n.log" 2>&1 &
    ETCD_PID[$n]=$!
}
leader_is_one_of() { # prints the leader if all of the given members answer and agree on it
    local eps="" n
    for n in "$@"; do eps+="${eps:+,}${ADDR[$n]}:2379"; done
    local st
    st=$(inns "$CLI" "$ETCDCTL" --endpoints="$eps" --dial-timeout=1s --command-timeout=1s \
        endpoint status -w json 2>/dev/null) || true
    [ -n "$st" ] || return 1
    local lead
    lead=$(printf '%s' "$st" | py leader "$#") || return 1
    for n in "$@"; do [ "$n" = "$lead" ] && { echo "$lead"; return 0; }; done
    return 1
}
cluster_ok() { leader_is_one_of n1 n2 n3 >/dev/null && ctl endpoint health >/dev/null 2>&1; }

log "etcd $("$ETCD" --version | sed -n 's/^etcd Version: //p'): starting members n1 n2 n3"
for n in "${NODES[@]}"; do start_member "$n"; done
poll 30000 cluster_ok || die "the etcd cluster did not become healthy (logs in $LOGS)"
log "etcd cluster healthy, leader $(leader_is_one_of n1 n2 n3)"

# ---------------------------------------------------------------------------------------------
# conch candidates: one per node, own member first in --endpoints.
eps_for() {
    local n=$1 m out="${ADDR[$1]}:2379"
    for m in "${NODES[@]}"; do [ "$m" = "$n" ] || out+=",${ADDR[$m]}:2379"; done
    echo "$out"
}
# Candidates are plain (CAND_RESTART=0: conch exits after a lost hold, a-d check its exit code)
# or in service mode (1: `--restart`, e and f); candidates_mode switches between them.
CAND_RESTART=0
case "${SCENARIOS%% *}" in e|f) CAND_RESTART=1 ;; esac
start_candidate() {
    local n=$1 mode=()
    [ "$CAND_RESTART" = 1 ] && mode=(--restart)
    ( spawn "${NS[$n]}" "$n" "$CONCH" --node "$n" --endpoints "$(eps_for "$n")" \
        "${CG_FLAGS[@]}" elect "$OFFICE" "${mode[@]}" --ttl "${TTL}s" --kill-after "${KILL_AFTER}s" \
        -- "$WORK/child.sh" ) >>"$LOGS/conch-$n.log" 2>&1 &
    CAND_PID[$n]=$!
}
# cand_exit N MS: wait up to MS for candidate N's conch to exit; sets RC (else RC=running).
RC=""
cand_exit() {
    local pid=${CAND_PID[$1]}
    RC=running
    poll "$2" eval '! alive '"$pid" || return 1
    RC=0
    { wait "$pid"; } 2>/dev/null || RC=$?
    CAND_PID[$1]=""
}
ensure_candidates() { # (re)start the candidate of every node whose conch is not running
    local n rc
    for n in "${NODES[@]}"; do
        if [ -n "${CAND_PID[$n]:-}" ] && ! alive "${CAND_PID[$n]}"; then
            rc=0
            { wait "${CAND_PID[$n]}"; } 2>/dev/null || rc=$?
            log "conch on $n had exited $rc: starting a new candidate there"
            CAND_PID[$n]=""
        fi
        [ -n "${CAND_PID[$n]:-}" ] || start_candidate "$n"
    done
}
HOLDER=()
holder_now() { # HOLDER=(rev node lease pid gpid first) of a running child with rev > $1
    local out
    out=$(py holder "$JOURNAL" 500 "$1") || return 1
    read -r -a HOLDER <<<"$out"
}
who_rev() { # the rev conch itself reports as holder, or "-"
    inns "$CLI" "$CONCH" --endpoints "$ALL_EPS" elect "$OFFICE" --who --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["rev"])' 2>/dev/null || echo -
}
# steady MIN_REV: wait until a child with rev > MIN_REV runs and conch --who agrees.
settled() { holder_now "$1" && [ "$(who_rev)" = "${HOLDER[0]}" ]; }
steady() { poll $(( (TTL + 10) * 1000 )) settled "$1"; }

# candidates_mode 0|1: make every candidate plain (0) or `--restart` (1). Switching SIGTERMs
# the running candidates (the holder's conch ends its tree and releases the office), waits for
# them, then starts the new ones and waits for a holder.
candidates_mode() {
    [ "$CAND_RESTART" = "$1" ] && return 0
    local n pids=() rc
    log "switching the candidates to $([ "$1" = 1 ] && echo "service mode (--restart)" || echo "plain mode (no --restart)")"
    for n in "${NODES[@]}"; do
        if [ -n "${CAND_PID[$n]:-}" ] && alive "${CAND_PID[$n]}"; then
            kill -TERM "${CAND_PID[$n]}"
            pids+=("${CAND_PID[$n]}")
        fi
    done
    if ! poll $(( (KILL_AFTER + 5) * 1000 )) tree_gone "${pids[@]}"; then
        log "conch did not exit within $((KILL_AFTER + 5)) s of SIGTERM: SIGKILL"
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    for n in "${NODES[@]}"; do
        [ -n "${CAND_PID[$n]:-}" ] || continue
        rc=0
        { wait "${CAND_PID[$n]}"; } 2>/dev/null || rc=$?
        [ "$rc" -eq 143 ] || [ "$rc" -eq 0 ] || log "conch on $n exited $rc after SIGTERM"
        CAND_PID[$n]=""
    done
    CAND_RESTART=$1
    ensure_candidates
    steady 0
}

ensure_candidates
steady 0 || die "no candidate acquired the office (logs in $LOGS)"
containment=$(inns "$CLI" "$CONCH" --endpoints "$ALL_EPS" elect "$OFFICE" --who --json 2>/dev/null |
    python3 -c 'import json,sys; print(json.loads(sys.stdin.readline()).get("containment","?"))' || echo "?")
log "office held: rev ${HOLDER[0]} on ${HOLDER[1]} (containment: $containment; TTL ${TTL}s, kill-after ${KILL_AFTER}s)"

# ---------------------------------------------------------------------------------------------
# Firewall faults, inside one namespace.
fw_partition() { # drop everything on the test network, both ways (own member included)
    if [ "$FW" = nft ]; then
        inns "$1" nft -f - <<EOF
table inet conch_chaos {
    chain in { type filter hook input priority 0; policy accept; ip saddr $NET.0/24 drop; }
    chain out { type filter hook output priority 0; policy accept; ip daddr $NET.0/24 drop; }
}
EOF
    else
        inns "$1" iptables -I INPUT -s "$NET.0/24" -j DROP
        inns "$1" iptables -I OUTPUT -d "$NET.0/24" -j DROP
    fi
}
fw_isolate_peers() { # drop etcd peer traffic (port 2380) only; clients still get through
    if [ "$FW" = nft ]; then
        inns "$1" nft -f - <<EOF
table inet conch_chaos {
    chain in { type filter hook input priority 0; policy accept; tcp dport 2380 drop; tcp sport 2380 drop; }
    chain out { type filter hook output priority 0; policy accept; tcp dport 2380 drop; tcp sport 2380 drop; }
}
EOF
    else
        local c
        for c in INPUT OUTPUT; do
            inns "$1" iptables -I "$c" -p tcp --dport 2380 -j DROP
            inns "$1" iptables -I "$c" -p tcp --sport 2380 -j DROP
        done
    fi
}
fw_heal() {
    if [ "$FW" = nft ]; then
        inns "$1" nft delete table inet conch_chaos 2>/dev/null || true
    else
        inns "$1" iptables -F INPUT
        inns "$1" iptables -F OUTPUT
    fi
}

WATCH_PID=""
watch_start() { # watch_start NAME DEADLINE_S: watch the current holder's tree and lease
    rm -f "$WORK/$1.stop" "$WORK/$1.watch.json" "$WORK/$1.ready"
    ( exec nsenter --net="/run/netns/$CLI" -- python3 "$PY" watch "${HOLDER[3]},${HOLDER[4]}" "${HOLDER[2]}" \
        "$ALL_EPS" "$2" "$WORK/$1.stop" "$WORK/$1.watch.json" "$WORK/$1.ready" ) >>"$LOGS/watch.log" 2>&1 &
    WATCH_PID=$!
}
watch_ready() { poll "$2" test -e "$WORK/$1.ready"; } # watch_ready NAME MS: the watcher has read the TTL
watch_done() { poll "$1" eval '! alive '"$WATCH_PID"; }
watch_stop() {
    touch "$WORK/$1.stop"
    poll 3000 eval '! alive '"$WATCH_PID" || kill -KILL "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
}
verdict() { # verdict KEY=VALUE…
    py verdict journal="$JOURNAL" results="$RESULTS" "$@" || FAILED=1
}
lease_unextended() { # 2 s (election timeout + a renewal period + slack) since $1, and TTL < full
    [ $(( $(now_us) - $1 )) -ge 2000000 ] || return 1
    local t
    t=$(inns "$CLI" python3 "$PY" ttl "$ALL_EPS" "${HOLDER[2]}") || return 1
    [ "$t" -lt "$TTL" ]
}
leader_is() { [ "$(leader_is_one_of n1 n2 n3)" = "$1" ]; }
# move_leader FROM TO: hand etcd leadership over, then wait until the lease extension that every
# new leader grants (its election timeout) has worn off and a renewal set the expiry again.
move_leader() {
    local id moved
    id=$(ctl member list -w json 2>/dev/null | py member-hex "$2") || return 1
    moved=$(now_us)
    inns "$CLI" "$ETCDCTL" --endpoints="${ADDR[$1]}:2379" --command-timeout=3s move-leader "$id" \
        >/dev/null 2>&1 || return 1
    poll 10000 leader_is "$2" || return 1
    poll 10000 lease_unextended "$moved" || true
}
stopped_state() { # pid is stopped (SIGSTOP: state T)
    local st
    read -r st 2>/dev/null <"/proc/$1/stat" || return 1
    st=${st##*) }
    [ "${st%% *}" = T ]
}
candidate_key_of() { # an election key of $OFFICE whose holder record names node $1
    ctl get --prefix "/conch/v1/elect/$OFFICE/" --print-value-only 2>/dev/null | grep -q "\"node\":\"$1\""
}
tree_gone() { local p; for p in "$@"; do ! alive "$p" || return 1; done; }
other_nodes() { local n; for n in "${NODES[@]}"; do [ "$n" = "$1" ] || echo "$n"; done; }

# ---------------------------------------------------------------------------------------------
# (a) the holder's node is cut off from every etcd member.
scenario_partition() {
    local name=$1 from rev node fault rc to
    candidates_mode 0 || true
    from=$(now_us)
    steady 0 || { echo "  FAIL: office not held before the scenario"; FAILED=1; return; }
    rev=${HOLDER[0]} node=${HOLDER[1]}
    # Keep the etcd leader off the holder's node: a leader change would extend every lease by
    # a full TTL and make the race between the kill and the expiry easy to win.
    local lead target
    lead=$(leader_is_one_of n1 n2 n3) || true
    if [ "$lead" = "$node" ]; then
        target=$(other_nodes "$node" | head -n1)
        if move_leader "$lead" "$target"; then
            log "($name) moved etcd leadership from $node to $target first"
            lead=$target
        else
            log "($name) could not move etcd leadership off $node: the election will extend the lease"
        fi
    fi
    log "($name) partition: holder rev $rev on $node (etcd leader: ${lead:-?}); dropping all $NET.0/24 traffic in $node both ways"
    watch_start "$name" $((TTL * 3 + 5))
    fault=$(now_us)
    fw_partition "${NS[$node]}"
    cand_exit "$node" $(( (TTL + 6) * 1000 )) || true
    rc=$RC
    log "($name) conch on $node exited: $rc"
    watch_done $(( (TTL * 2 + 6) * 1000 )) || true
    watch_stop "$name"
    steady "$rev" || true
    log "($name) healing $node"
    fw_heal "${NS[$node]}"
    poll 20000 cluster_ok || log "($name) etcd cluster not healthy again after heal"
    ensure_candidates
    steady 0 || true
    to=$(now_us)
    verdict name="$name partition" mode=partition rev="$rev" node="$node" fault_us="$fault" \
        from_us="$from" to_us="$to" watch="$WORK/$name.watch.json" rc="$rc" who_rev="$(who_rev)"
}

# (b) / (c): the etcd leader is killed, or cut off from its peers.
scenario_etcd_leader() {
    local name=$1 how=$2 from rev node fault rc=running lead to
    local -a others
    candidates_mode 0 || true
    from=$(now_us)
    steady 0 || { echo "  FAIL: office not held before the scenario"; FAILED=1; return; }
    rev=${HOLDER[0]} node=${HOLDER[1]}
    lead=$(leader_is_one_of n1 n2 n3) || { echo "  FAIL: no etcd leader"; FAILED=1; return; }
    # The hard case: the leader is the member the holder's conch talks to first (its own node).
    if [ "$lead" != "$node" ]; then
        if move_leader "$lead" "$node"; then
            log "($name) moved etcd leadership from $lead to $node (the holder's own member) first"
            lead=$node
        else
            log "($name) could not move etcd leadership to $node; faulting leader $lead instead"
            lead=$(leader_is_one_of n1 n2 n3) || { echo "  FAIL: no etcd leader"; FAILED=1; return; }
        fi
    fi
    mapfile -t others < <(other_nodes "$lead")
    watch_start "$name" $((TTL * 3 + 10))
    fault=$(now_us)
    if [ "$how" = kill ]; then
        log "($name) etcd leader $lead SIGKILLed (holder rev $rev on $node)"
        {   # (stderr off: bash's "Killed" notice for its own job)
            kill -KILL "${ETCD_PID[$lead]}"
            poll 5000 eval '! alive '"${ETCD_PID[$lead]}" || true
            wait "${ETCD_PID[$lead]}" || true
        } 2>/dev/null
    else
        log "($name) etcd leader $lead isolated from its peers: port 2380 dropped in $lead (holder rev $rev on $node)"
        fw_isolate_peers "${NS[$lead]}"
    fi
    if poll 15000 leader_is_one_of "${others[@]}" >/dev/null; then
        log "($name) new etcd leader: $(leader_is_one_of "${others[@]}")"
    else
        log "($name) no new etcd leader among ${others[*]} within 15 s"
    fi
    # The elapsed time is what is under test: a lost hold shows within TTL + 1 s of the fault.
    local until=$(( fault + (TTL + 2) * 1000000 ))
    while [ "$(now_us)" -lt "$until" ]; do sleep 0.1; done
    if ! alive "${CAND_PID[$node]}"; then
        cand_exit "$node" 1000 || true
        rc=$RC
        watch_done 3000 || true
    fi
    watch_stop "$name"
    if [ "$how" = kill ]; then
        start_member "$lead"
    else
        fw_heal "${NS[$lead]}"
    fi
    poll 20000 cluster_ok || log "($name) etcd cluster not healthy again"
    log "($name) etcd healthy again, leader $(leader_is_one_of n1 n2 n3 || echo '?'); holder's conch: $rc"
    ensure_candidates
    steady 0 || true
    to=$(now_us)
    verdict name="$name etcd leader $how" mode=etcd rev="$rev" node="$node" fault_us="$fault" \
        from_us="$from" to_us="$to" watch="$WORK/$name.watch.json" rc="$rc" who_rev="$(who_rev)" lead="$lead"
}

# (d) the holder's conch is SIGKILLed: its tree must be gone within 1 s.
scenario_sigkill() {
    local name=$1 from rev node fault rc to survivors=0 p cg tree
    candidates_mode 0 || true
    from=$(now_us)
    steady 0 || { echo "  FAIL: office not held before the scenario"; FAILED=1; return; }
    rev=${HOLDER[0]} node=${HOLDER[1]} tree="${HOLDER[3]} ${HOLDER[4]}"
    log "($name) SIGKILL to conch on $node (holder rev $rev, child ${HOLDER[3]}, setsid grandchild ${HOLDER[4]})"
    watch_start "$name" $((TTL * 3 + 5))
    fault=$(now_us)
    kill -KILL "${CAND_PID[$node]}"
    cand_exit "$node" 2000 2>/dev/null || true   # (no "Killed" job notice)
    rc=$RC
    if ! poll $(( 1000 - ($(now_us) - fault) / 1000 )) tree_gone $tree; then
        # still alive after 1 s: count, then let it run until a successor starts (to show the
        # consequence), then kill what is left so the rest of the run is not polluted.
        for p in $tree; do alive "$p" && survivors=$((survivors + 1)); done
        log "($name) FAIL: $survivors process(es) of rev $rev still alive 1 s after conch's SIGKILL"
        steady "$rev" || true
        for p in $tree; do
            alive "$p" || continue
            cg=$(sed -n 's/^0:://p' "/proc/$p/cgroup" 2>/dev/null || true)
            if [ -n "$cg" ] && [ -n "$cg2" ] && [ "$cg" != / ] && [ -w "$cg2$cg/cgroup.kill" ] \
                && [ -n "$CG_ROOT" ] && [[ "$cg2$cg" == "$CG_ROOT"/* ]]; then
                echo 1 >"$cg2$cg/cgroup.kill"
            fi
            kill -KILL "$p" 2>/dev/null || true
        done
        log "($name) killed the orphaned tree of rev $rev"
    fi
    watch_done $(( (TTL * 2 + 6) * 1000 )) || true
    watch_stop "$name"
    ensure_candidates
    steady "$rev" || true
    to=$(now_us)
    verdict name="$name conch SIGKILL" mode=sigkill rev="$rev" node="$node" fault_us="$fault" \
        from_us="$from" to_us="$to" watch="$WORK/$name.watch.json" rc="$rc" who_rev="$(who_rev)" \
        limit_ms=1000 survivors="$survivors"
}

# (e) quorum lost and back: etcd on the two nodes other than the holder's is SIGSTOPped for
# OUTAGE (> TTL) seconds, with every candidate in service mode. The holder's tree must die
# before quorum returns, and before its lease could expire: no leader can expire a lease during
# the outage and the next leader renews every lease, so the watcher's sighting of the lease
# still granted after the return is the sound lower bound on its expiry. (The TTL readings
# alone cannot place the kill here: etcd reports whole seconds, and the last member answers
# lease reads only as long as it also takes renewals, so they end together with a resolution
# of ~1 s against conch's designed margin of TTL*1% + 250 ms.) SIGSTOP rather than SIGKILL:
# a frozen member keeps its connections open and answers nothing (the silence conch must time
# out on, facts.md), b and f already cover crashed members, and SIGCONT brings the same members
# back with their data and their place in the cluster at once. The holder's own member (its
# first endpoint) stays up, but without quorum: it can neither renew nor answer linearizably.
scenario_quorum() {
    local name=$1 from rev node fault restored to n cands=0 maxrev held="" tree frozen=0
    local -a stopped
    candidates_mode 1 || true
    from=$(now_us)
    steady 0 || { echo "  FAIL: office not held before the scenario"; FAILED=1; return; }
    rev=${HOLDER[0]} node=${HOLDER[1]} tree="${HOLDER[3]} ${HOLDER[4]}"
    mapfile -t stopped < <(other_nodes "$node")
    watch_start "$name" $((OUTAGE + QUORUM_BOUND + 10))
    watch_ready "$name" 3000 || log "($name) the watcher has not read the holder's lease TTL yet"
    log "($name) quorum loss: SIGSTOP to etcd on ${stopped[*]} for ${OUTAGE} s (TTL ${TTL}s); holder rev $rev on $node, its own member left without quorum"
    fault=$(now_us)
    for n in "${stopped[@]}"; do kill -STOP "${ETCD_PID[$n]}"; done
    for n in "${stopped[@]}"; do
        poll 1000 stopped_state "${ETCD_PID[$n]}" && frozen=$((frozen + 1))
    done
    # shellcheck disable=SC2086
    if poll $(( (TTL + 2) * 1000 )) tree_gone $tree; then
        log "($name) tree of rev $rev dead $(( ($(now_us) - fault) / 1000 )) ms into the outage"
    else
        log "($name) tree of rev $rev still alive $((TTL + 2)) s into the outage"
    fi
    # The outage lasts OUTAGE seconds whatever happens (this is the fault, not a wait for an event).
    while [ "$(now_us)" -lt $(( fault + OUTAGE * 1000000 )) ]; do sleep 0.1; done
    maxrev=$(py maxrev "$JOURNAL")
    restored=$(now_us)
    for n in "${stopped[@]}"; do kill -CONT "${ETCD_PID[$n]}"; done
    log "($name) SIGCONT to etcd on ${stopped[*]}: quorum back (highest rev so far: $maxrev)"
    poll 20000 cluster_ok || log "($name) etcd cluster not healthy within 20 s of quorum's return"
    if poll $(( QUORUM_BOUND * 1000 - ($(now_us) - restored) / 1000 )) settled "$maxrev"; then
        held=${HOLDER[0]}
        log "($name) office held again: rev $held on ${HOLDER[1]}, $(( (HOLDER[5] - restored) / 1000 )) ms after quorum returned"
    else
        log "($name) office not held again within ${QUORUM_BOUND} s of quorum's return"
    fi
    watch_done 3000 || true   # it ends once it saw the old lease gone
    watch_stop "$name"
    for n in "${NODES[@]}"; do
        [ -n "${CAND_PID[$n]:-}" ] && alive "${CAND_PID[$n]}" && cands=$((cands + 1))
    done
    [ "$cands" -eq 3 ] || log "($name) only $cands of 3 --restart candidates still running"
    ensure_candidates
    to=$(now_us)
    verdict name="$name quorum loss" mode=quorum rev="$rev" node="$node" fault_us="$fault" \
        from_us="$from" to_us="$to" watch="$WORK/$name.watch.json" restored_us="$restored" \
        bound_ms=$((QUORUM_BOUND * 1000)) ttl="$TTL" cands="$cands" stopped="${stopped[0]}+${stopped[1]}" frozen="$frozen" \
        who_rev="$(who_rev)"
}

# (f) the etcd leader's host dies: leadership is moved onto the holder's host first (the hard
# case: the office and the etcd leader go at once), then every process in that namespace is
# SIGKILLed at once, as a power cut would: its etcd member, its conch and conch's child tree.
scenario_host() {
    local name=$1 from rev node lead victim fault to n p pids nkilled=0 healthy=ok bound tree
    local -a others
    local -A killed=()
    candidates_mode 1 || true
    from=$(now_us)
    steady 0 || { echo "  FAIL: office not held before the scenario"; FAILED=1; return; }
    rev=${HOLDER[0]} node=${HOLDER[1]} tree="${HOLDER[3]} ${HOLDER[4]}"
    lead=$(leader_is_one_of n1 n2 n3) || { echo "  FAIL: no etcd leader"; FAILED=1; return; }
    if [ "$lead" != "$node" ]; then
        if move_leader "$lead" "$node"; then
            log "($name) moved etcd leadership from $lead to $node (the holder's host) first"
            lead=$node
        else
            lead=$(leader_is_one_of n1 n2 n3) || { echo "  FAIL: no etcd leader"; FAILED=1; return; }
            log "($name) could not move etcd leadership to $node; killing the leader's host $lead"
        fi
    fi
    victim=$lead
    mapfile -t others < <(other_nodes "$victim")
    bound=$(( (TTL + 10) * 1000 ))
    watch_start "$name" $(( TTL * 3 + 10 ))
    watch_ready "$name" 3000 || log "($name) the watcher has not read the holder's lease TTL yet"
    log "($name) host death: SIGKILL to every process in $victim's namespace (etcd leader; holder rev $rev on $node)"
    fault=$(now_us)
    # Kill until the namespace is empty: a process forked between listing and killing is
    # caught by the next round. (stderr off: bash's "Killed" notices for its own jobs.)
    {
        while pids=$(ip netns pids "${NS[$victim]}") && [ -n "$pids" ]; do
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            for p in $pids; do killed[$p]=1; done
            nkilled=${#killed[@]}
            [ "$(now_us)" -lt $(( fault + 2000000 )) ] || { log "($name) $victim's namespace not empty after 2 s: $pids"; break; }
            sleep 0.02
        done
        wait "${ETCD_PID[$victim]}" || true
        wait "${CAND_PID[$victim]}" || true
    } 2>/dev/null
    CAND_PID[$victim]="" ETCD_PID[$victim]=""
    # shellcheck disable=SC2086
    tree_gone $tree || log "($name) the tree of rev $rev survived its host's death"
    log "($name) $victim is dead: $nkilled SIGKILLs, namespace empty"
    if poll 15000 leader_is_one_of "${others[@]}" >/dev/null; then
        log "($name) new etcd leader: $(leader_is_one_of "${others[@]}")"
    else
        log "($name) no new etcd leader among ${others[*]} within 15 s"
    fi
    # the office held by a host other than the dead one (a new rev, if the holder died with it)
    local min_rev=$rev
    [ "$victim" = "$node" ] || min_rev=0
    if poll $(( bound - ($(now_us) - fault) / 1000 )) eval 'settled "$min_rev" && [ "${HOLDER[1]}" != "$victim" ]'; then
        log "($name) office held again: rev ${HOLDER[0]} on ${HOLDER[1]}, $(( (HOLDER[5] - fault) / 1000 )) ms after the host died"
    else
        log "($name) office not held by another host within $((bound / 1000)) s"
    fi
    watch_done 3000 || true
    watch_stop "$name"
    log "($name) $victim comes back: its etcd member (same data dir), then its candidate"
    start_member "$victim"
    poll 20000 cluster_ok || healthy="etcd cluster not healthy (3 members agreeing on a leader) within 20 s"
    ensure_candidates
    if [ "$healthy" = ok ]; then
        # the returning candidate campaigns again: its key shows up in the office
        poll 10000 candidate_key_of "$victim" || healthy="no campaign key from $victim's candidate within 10 s"
        steady 0 || healthy="office not held after $victim came back"
        for n in "${NODES[@]}"; do
            alive "${CAND_PID[$n]}" || healthy="conch candidate on $n exited"
        done
    fi
    log "($name) cluster after $victim's return: $healthy, leader $(leader_is_one_of n1 n2 n3 || echo '?')"
    to=$(now_us)
    verdict name="$name leader host killed" mode=host rev="$rev" node="$node" fault_us="$fault" \
        from_us="$from" to_us="$to" watch="$WORK/$name.watch.json" victim="$victim" \
        nkilled="$nkilled" bound_ms="$bound" healthy="$healthy" who_rev="$(who_rev)"
}

for s in $SCENARIOS; do
    case "$s" in
        a) for ((r = 1; r <= ROUNDS; r++)); do
               if [ "$ROUNDS" -gt 1 ]; then scenario_partition "a$r"; else scenario_partition a; fi
           done ;;
        b) scenario_etcd_leader b kill ;;
        c) scenario_etcd_leader c isolate ;;
        d) scenario_sigkill d ;;
        e) scenario_quorum e ;;
        f) scenario_host f ;;
        *) die "unknown scenario $s (a b c d e f)" ;;
    esac
done

log "whole journal"
py final "$JOURNAL" "$RESULTS" || FAILED=1

echo
echo "conch chaos summary ($(basename "$src_bin") at $src_bin; TTL ${TTL}s, kill-after ${KILL_AFTER}s, containment $containment, etcd $(cat "$ETCD_DIR/../VERSION" 2>/dev/null || echo '?'), runtime $(( ($(now_us) - T0) / 1000000 )) s)"
py table "$RESULTS" || FAILED=1
if [ "$FAILED" -ne 0 ]; then
    echo "RESULT: FAIL"
    exit 1
fi
echo "RESULT: PASS"
