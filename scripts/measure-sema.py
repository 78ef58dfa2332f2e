#!/usr/bin/env python3
"""Measure `conch sema`: promotion latency (a holder's child ends -> the next child starts)
and etcd requests per release, against a throw-away etcd on loopback.

    cargo build --release && scripts/measure-sema.py            # uses target/release
    scripts/measure-sema.py --debug                              # uses target/debug

Children are `conch-testchild`, which journals `start`/`end` on CLOCK_BOOTTIME; a holder is
released by creating its `--until-file`. Requests per release are read from etcd's own
/metrics (grpc_server_handled_total for unary calls, grpc_server_started_total for streams),
as a delta over a series of releases.
"""
import os, random, re, shutil, socket, statistics, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = "debug" if "--debug" in sys.argv else "release"
CONCH = os.path.join(ROOT, "target", PROFILE, "conch")
CHILD = os.path.join(ROOT, "target", PROFILE, "conch-testchild")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def etcd_bin():
    out = subprocess.run([os.path.join(ROOT, "scripts/fetch-etcd.sh")], capture_output=True, text=True, check=True)
    return os.path.join(out.stdout.strip().splitlines()[-1], "etcd")


def wait(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = cond()
        except OSError:
            v = None
        if v:
            return v
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def metrics(url):
    """Per method: unary calls handled, and streams started (Watch, LeaseKeepAlive)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'grpc_server_handled_total\{.*grpc_method="(\w+)".*grpc_type="unary".*\} ([\d.e+]+)', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        m = re.match(r'grpc_server_started_total\{.*grpc_method="(Watch|LeaseKeepAlive)".*\} ([\d.e+]+)', line)
        if m:
            out[m.group(1) + "-streams"] = out.get(m.group(1) + "-streams", 0.0) + float(m.group(2))
    return out


def journal(path):
    recs = []
    if os.path.exists(path):
        for line in open(path):
            f = line.split()
            if len(f) >= 5 and f[1] in ("start", "end") and f[2] == "child":
                node = f[4].split("=", 1)[1]
                recs.append((int(f[0]), f[1], node))
    return recs


def scenario(url, n, waiters, releases, rng):
    d = tempfile.mkdtemp(prefix="conch-measure-")
    j = os.path.join(d, "journal")
    env = dict(os.environ, CONCH_ENDPOINTS=url, CONCH_PREFIX=f"/measure-{rng.randrange(1 << 30)}", CONCH_QUIET="true")
    procs = []
    total = n + waiters
    for i in range(total):
        procs.append(subprocess.Popen(
            [CONCH, "--node", f"w{i}", "sema", "s", "--max", str(n), "--",
             CHILD, "--journal", j, "--until-file", os.path.join(d, f"release-w{i}")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait(lambda: sum(1 for r in journal(j) if r[1] == "start") >= n, 120, f"{n} holders")
    # Let every waiter queue up before measuring.
    wait(lambda: len(subprocess.run([CONCH, "sema", "s", "--who"], env=env, capture_output=True, text=True).stdout.splitlines()) >= total, 120, "the queue")
    before = metrics(url)
    lat = []
    for _ in range(releases):
        recs = journal(j)
        started = {r[2] for r in recs if r[1] == "start"}
        ended = {r[2] for r in recs if r[1] == "end"}
        running = sorted(started - ended)
        victim = rng.choice(running)
        starts_before = len(started)
        open(os.path.join(d, f"release-{victim}"), "w").close()
        try:
            wait(lambda: sum(1 for r in journal(j) if r[1] == "start") > starts_before, 30, "a promotion")
        except SystemExit:
            who = subprocess.run([CONCH, "sema", "s", "--who"], env=env, capture_output=True, text=True).stdout
            raise SystemExit(f"no promotion within 30 s after releasing {victim} (journal in {d}):\n{who}")
        recs = journal(j)
        end_ns = next(r[0] for r in recs if r[1] == "end" and r[2] == victim)
        new_start = max(r[0] for r in recs if r[1] == "start")
        lat.append((new_start - end_ns) / 1e6)
    after = metrics(url)
    for i in range(total):
        open(os.path.join(d, f"release-w{i}"), "w").close()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(d, ignore_errors=True)
    per = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / releases for k in set(after) | set(before)}
    return lat, per


PLAN = [(1, 40, 30), (2, 40, 30), (10, 40, 30), (10, 100, 20), (10, 500, 20)]
if os.environ.get("MEASURE_PLAN"):
    PLAN = [tuple(map(int, p.split(":"))) for p in os.environ["MEASURE_PLAN"].split(",")]


def main():
    for b in (CONCH, CHILD):
        if not os.path.exists(b):
            raise SystemExit(f"{b} missing: cargo build {'--release' if PROFILE == 'release' else ''}")
    port, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="conch-measure-etcd-")
    etcd = subprocess.Popen([etcd_bin(), "--data-dir", data, "--listen-client-urls", url, "--advertise-client-urls", url,
                             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(lambda: urllib.request.urlopen(url + "/health", timeout=1).status == 200, 20, "etcd")
        rng = random.Random(1)
        print(f"conch sema promotion ({PROFILE} build, etcd on loopback)")
        print("| slots N | waiters | releases | latency median ms | p99 ms | max ms | Range+Txn / release | other unary / release | watches opened / release | keepalive streams reopened / release |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n, waiters, releases in PLAN:
            lat, per = scenario(url, n, waiters, releases, rng)
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
            kv = per.get("Range", 0.0) + per.get("Txn", 0.0)
            other = sum(v for k, v in per.items() if not k.endswith("-streams") and k not in ("Range", "Txn"))
            print(f"| {n} | {waiters} | {releases} | {statistics.median(lat):.1f} | {p99:.1f} | {lat[-1]:.1f} | {kv:.1f} | {other:.1f} | "
                  f"{per.get('Watch-streams', 0.0):.1f} | {per.get('LeaseKeepAlive-streams', 0.0):.1f} |", flush=True)
    finally:
        etcd.kill()
        etcd.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
