#!/usr/bin/env python3
"""Measure conchd: tick lag (child start - tick), conchd's memory, and etcd's live lease count
before and after many ticks, against a throw-away etcd on loopback.

    cargo build --release && scripts/measure-cron.py                 # 3 conchd, 100 @every 1s jobs
    scripts/measure-cron.py --nodes 3 --jobs 100 --ticks 1000 --debug

Each job's command is `sh -c 'exec date "+%s%N $CONCH_TICK"'`: the shell puts the tick into
the format and execs `date`, so the line holds the child's start (plus a shell's start-up,
about a millisecond) and the tick it ran for; conchd prefixes it with the job name on its
stderr. Lag = start - tick; a (job, tick) seen twice would be a double run. Leases are
counted with etcd's LeaseLeases API through etcdctl; memory is VmHWM/VmRSS of each conchd.
"""
import argparse, calendar, os, re, shutil, socket, statistics, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def etcd_dir():
    out = subprocess.run([os.path.join(ROOT, "scripts/fetch-etcd.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def wait(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = cond()
        except OSError:
            v = None
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def proc_mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--ticks", type=int, default=1000, help="total job runs to wait for")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args()
    profile = "debug" if a.debug else "release"
    conch = os.path.join(ROOT, "target", profile, "conch")
    if not os.path.exists(conch):
        raise SystemExit(f"{conch} missing: cargo build {'--release' if profile == 'release' else ''}")
    bindir = etcd_dir()
    port, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="conch-measure-etcd-")
    work = tempfile.mkdtemp(prefix="conch-measure-cron-")
    etcd = subprocess.Popen([os.path.join(bindir, "etcd"), "--data-dir", data, "--listen-client-urls", url,
                             "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCH_") or k == "CONCH_CONTAINMENT"}
    env.update(CONCH_ENDPOINTS=url, CONCH_PREFIX="/measure", CONCH_QUIET="true")
    cgroot = None
    nodes = []
    try:
        wait(lambda: urllib.request.urlopen(url + "/health", timeout=1).status == 200, 20, "etcd")

        def leases():
            out = subprocess.run([os.path.join(bindir, "etcdctl"), f"--endpoints={url}", "lease", "list"],
                                 capture_output=True, text=True, check=True).stdout
            return len([l for l in out.splitlines()[1:] if l.strip()])

        for i in range(a.nodes):
            log = open(os.path.join(work, f"n{i}.log"), "w")
            nodes.append((subprocess.Popen([conch, "conchd", "--node", f"n{i}"], env=env, stdout=log, stderr=log), log))
        wait(lambda: subprocess.run([os.path.join(bindir, "etcdctl"), f"--endpoints={url}", "get", "--prefix",
                                     "/measure/v1/node/", "--keys-only"], capture_output=True, text=True)
             .stdout.count("/measure/v1/node/") >= a.nodes, 20, "conchd registration")
        before = leases()
        for j in range(a.jobs):
            subprocess.run([conch, "cron", "add", f"j{j:04d}", "--schedule", "@every 1s", "--", "sh", "-c", 'exec date "+%s%N $CONCH_TICK"'],
                           env=env, check=True, capture_output=True)
        t0 = time.time()

        def lines():
            out = []
            for i in range(a.nodes):
                with open(os.path.join(work, f"n{i}.log")) as f:
                    for line in f:
                        m = re.match(r"(j\d{4}): (\d{19}) (\S+)$", line.strip())
                        if m:
                            out.append((m.group(1), int(m.group(2)), m.group(3)))
            return out

        wait(lambda: len(lines()) >= a.ticks, 600, f"{a.ticks} runs")
        after = leases()
        mem = [proc_mem(p.pid) for p, _ in nodes]
        runs = lines()
        elapsed = time.time() - t0
        def epoch(t):
            return calendar.timegm(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ"))
        lags = [(ns - epoch(t) * 1_000_000_000) / 1e6 for _, ns, t in runs]
        ticks = {(j, t) for j, _, t in runs}
        print(f"conchd tick lag ({profile} build, {a.nodes} conchd, {a.jobs} jobs @every 1s, etcd on loopback, 2-core host)")
        print(f"runs observed: {len(runs)} in {elapsed:.1f}s; distinct (job, tick): {len(ticks)}"
              f"{' — DUPLICATE RUNS' if len(ticks) != len(runs) else ''}")
        print(f"tick lag ms: median {statistics.median(lags):.1f}, p90 {pct(lags, 0.9):.1f}, "
              f"p99 {pct(lags, 0.99):.1f}, max {max(lags):.1f}")
        for i, m in enumerate(mem):
            print(f"conchd n{i}: VmHWM {m['VmHWM']:.1f} MiB, VmRSS {m['VmRSS']:.1f} MiB")
        print(f"live leases: {before} after registration, {after} after {len(runs)} runs")
    finally:
        for p, log in nodes:
            p.terminate()
        for p, log in nodes:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()
        etcd.kill()
        etcd.wait()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
