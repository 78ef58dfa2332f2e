#!/usr/bin/env python3
"""conch's benchmark harness: the scenarios B1-B9 of quality.md §3, side by side with the
peers, against throw-away etcd servers on loopback. Python 3 standard library only.

    scripts/bench.py                      build (cargo build --release --bins), run B1-B9, print the table
    scripts/bench.py --smoke              every scenario with tiny sizes and rounds (CI: ~1.5 min)
    scripts/bench.py --only B1,B7         some scenarios
    scripts/bench.py --rounds 3           override the rounds (trials) of every scenario
    scripts/bench.py --no-build           use target/release as it is
    scripts/bench.py --output FILE        also write the table (markdown) to FILE
    scripts/bench.py --keep               keep the scratch dir (conch/conchd logs, journals) for inspection

Prints ONE markdown table on stdout (progress goes to stderr): scenario, conch median / p99,
peer median / p99, ratio, target, met?  Exits non-zero only when the harness itself failed
(a scenario could not be run), never because a target was missed. docs/benchmarks.md says
what every number means.

Every process is started in its own process group and tracked; every etcd, temp dir, proxy
and cgroup the harness makes is removed at the end, also after a failure or Ctrl-C.
"""

import argparse
import base64
import collections
import datetime
import http.client
import json
import math
import os
import platform
import random
import resource
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
CONCH = os.path.join(RELEASE, "conch")
CHILD = os.path.join(RELEASE, "conch-testchild")
BEAT_NS = 5_000_000  # conch-testchild's heartbeat period: a killed child died within this of its last record
SCENARIOS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9"]

# conch's renewal period P (src/hold/deadline.rs, Timing::derive): 3P + 1 s <= TTL*(1-rho) - delta - G.
RHO, DELTA_S, ELECTION_S, ATTEMPTS = 0.01, 0.25, 1.0, 3


def renewal_period(ttl_s, grace_s):
    return (ttl_s * (1 - RHO) - DELTA_S - grace_s - ELECTION_S) / ATTEMPTS


class HarnessError(Exception):
    """The harness could not do what it set out to do (not: a target was missed)."""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def boot_ns():
    """CLOCK_BOOTTIME, the clock conch-testchild journals on."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def p99(xs):
    """Nearest-rank 99th percentile (the maximum for fewer than 100 samples)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def wait_for(cond, timeout, what, interval=0.005):
    end = time.monotonic() + timeout
    while True:
        try:
            v = cond()
        except (OSError, http.client.HTTPException):
            v = None
        if v:
            return v
        if time.monotonic() >= end:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


_used_ports = set()


def free_port():
    """A free loopback port from 20000-32000: below the ephemeral range (32768+), so an
    outgoing connection cannot take it between this check and the server binding it."""
    for _ in range(2000):
        p = random.randrange(20000, 32000)
        if p in _used_ports:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _used_ports.add(p)
        return p
    raise HarnessError("no free port in 20000-32000")


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def prefix_end(prefix):
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b)


def cgroup_v2_mount():
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split() and right.split()[0] == "cgroup2":
                    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), left.split()[4])
    except OSError:
        pass
    return None


def vm_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == field:
                return int(v.split()[0])
    raise HarnessError(f"no {field} for pid {pid}")


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            if int(st[st.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(d))
    return out


def cpu_s(pid, split=False):
    """(own CPU seconds, CPU seconds of its reaped children) of a live process; with split,
    (own user, own system, children's user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    v = st[st.rindex(")") + 2:].split()
    hz = os.sysconf("SC_CLK_TCK")
    if split:
        return int(v[11]) / hz, int(v[12]) / hz, (int(v[13]) + int(v[14])) / hz
    return (int(v[11]) + int(v[12])) / hz, (int(v[13]) + int(v[14])) / hz


def host_cpu():
    """(busy, total) CPU seconds of the whole host so far, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / hz, sum(v[:8]) / hz


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


# --------------------------------------------------------------------------------------
# etcd: a throw-away single member, its HTTP/JSON gateway and its /metrics


class Gateway:
    """etcd's grpc-gateway (`POST /v3/...`, JSON) over one kept-alive HTTP/1.1 connection.
    Every call is a gRPC call inside etcd too, so none are made inside a /metrics window."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def post(self, path, body):
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                text = r.read()
                if r.status != 200:
                    raise HarnessError(f"etcd {path}: HTTP {r.status}: {text[:300]!r}")
                return json.loads(text)
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def put(self, key, value):
        self.post("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def count(self, prefix):
        r = self.post("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "count_only": True})
        return int(r.get("count", 0))

    def range(self, prefix):
        r = self.post("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return [dict(kv, key=base64.b64decode(kv["key"]).decode()) for kv in r.get("kvs", [])]

    def lease_ttl(self, lease_id):
        """Seconds left, rounded down (>= 0: alive), or -1: expired / revoked / never existed.
        The JSON gateway omits zero fields: no TTL means 0 (alive, under a second left)."""
        return int(self.post("/v3/lease/timetolive", {"ID": str(lease_id)}).get("TTL", 0))

    def leases(self):
        return [int(l["ID"]) for l in self.post("/v3/lease/leases", {}).get("leases", [])]

    def put_many(self, pairs, batch=100):
        """Puts in transactions of `batch` (etcd's default --max-txn-ops is 128)."""
        for i in range(0, len(pairs), batch):
            ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in pairs[i:i + batch]]
            self.post("/v3/kv/txn", {"compare": [], "success": ops})


class Etcd:
    def __init__(self, bench, tag):
        self.bench = bench
        self.name = f"bench-{os.getpid()}-{tag}"
        self.port, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tempfile.mkdtemp(prefix="etcd-", dir=bench.tmp)
        self.log = open(os.path.join(self.data, "..", f"etcd-{tag}.log"), "wb")
        self.proc = bench.spawn(
            [bench.etcd, "--name", self.name, "--data-dir", os.path.join(self.data, "d"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"{self.name}=http://127.0.0.1:{peer}", "--log-level", "warn"],
            stdout=self.log, stderr=self.log)
        self.gw = Gateway(self.port)

        def ours():
            if self.proc.poll() is not None:
                raise HarnessError(f"etcd exited with {self.proc.returncode} (log: {self.log.name})")
            # The member list names this run's member: a stray server on the port is not ours.
            return any(m.get("name") == self.name for m in self.gw.post("/v3/cluster/member/list", {}).get("members", []))

        wait_for(ours, 30, f"etcd {self.name} on {self.url}", interval=0.05)
        self.gw.put("bench/ready", "1")

    def metrics(self):
        """etcd's own request counters: (metric, method, type) -> value."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"(grpc_server_(?:msg_received|started)_total)\{([^}]*)\} (\S+)$", line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                key = (m.group(1), labels.get("grpc_method"), labels.get("grpc_type"))
                out[key] = out.get(key, 0.0) + float(m.group(3))
        return out

    @staticmethod
    def requests(before, after):
        """What clients asked etcd between two /metrics snapshots:
        unary = unary calls (Range, Txn, Put, LeaseGrant, LeaseRevoke, ...);
        watch = messages on Watch streams (watch create / cancel / progress requests);
        keepalive = lease renewals (messages on LeaseKeepAlive streams);
        streams = streams opened (Watch, LeaseKeepAlive)."""
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}
        r = {"unary": 0.0, "watch": 0.0, "keepalive": 0.0, "streams": 0.0}
        for (metric, method, typ), v in d.items():
            if metric == "grpc_server_msg_received_total":
                if typ == "unary":
                    r["unary"] += v
                elif method == "LeaseKeepAlive":
                    r["keepalive"] += v
                else:
                    r["watch"] += v
            elif typ != "unary":
                r["streams"] += v
        return r

    def stop(self):
        self.gw.close()
        self.bench.stop(self.proc)
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


# --------------------------------------------------------------------------------------
# The fault proxy of B5: forwards TCP to etcd until told to blackhole.


class Proxy:
    """Between one client and etcd. `blackhole()` stops forwarding both ways: bytes are read
    and dropped (nothing is delivered, nothing is closed), like a network partition."""

    def __init__(self, target_port):
        self.target = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.holed = threading.Event()
        self.stopped = threading.Event()
        self.socks = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    def _pump(self, src, dst):
        while True:
            try:
                b = src.recv(65536)
            except OSError:
                return
            if not b:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if self.holed.is_set():
                continue
            try:
                dst.sendall(b)
            except OSError:
                return

    def blackhole(self):
        self.holed.set()

    def close(self):
        self.stopped.set()
        self.holed.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


# --------------------------------------------------------------------------------------
# conch-testchild's journal (tests/support/testchild.rs):
#   <boottime-ns> start|beat|end <role> pid=P node=N rev=R lease=L [tick=T]


class Journal:
    def __init__(self, path):
        self.path = path
        self.off = 0
        self.recs = []
        self.rest = b""

    def refresh(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                data = f.read()
        except FileNotFoundError:
            return self.recs
        self.off += len(data)
        data = self.rest + data
        lines = data.split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            p = line.decode(errors="replace").split()
            if len(p) < 4:
                continue
            r = {"ns": int(p[0]), "ev": p[1], "role": p[2]}
            for kv in p[3:]:
                k, _, v = kv.partition("=")
                r[k] = v
            self.recs.append(r)
        return self.recs

    def starts(self, node=None):
        return [r for r in self.refresh() if r["ev"] == "start" and r["role"] == "child" and (node is None or r.get("node") == node)]

    def last_life(self, node):
        """The last record (start, beat or end) of `node`'s child: it was alive then."""
        t = [r["ns"] for r in self.refresh() if r["role"] == "child" and r.get("node") == node]
        return max(t) if t else None


# --------------------------------------------------------------------------------------
# Table rows


def fms(ns_or_ms, unit="ms"):
    return "—" if ns_or_ms is None or (isinstance(ns_or_ms, float) and math.isnan(ns_or_ms)) else f"{ns_or_ms:.1f} {unit}"


def ratio_s(a, b):
    if a is None or b is None or b == 0 or any(isinstance(x, float) and math.isnan(x) for x in (a, b)):
        return "—"
    return f"{a / b:.2f}×"


def yn(ok):
    return "—" if ok is None else ("yes" if ok else "**no**")


class Row:
    def __init__(self, scenario, cmed="—", cp99="—", pmed="—", pp99="—", ratio="—", target="—", met=None):
        self.cells = [scenario, cmed, cp99, pmed, pp99, ratio, target, yn(met)]


# --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.tmp = tempfile.mkdtemp(prefix="conch-bench-")
        self.procs = []
        self.proc_lock = threading.Lock()
        self.cgroots = []
        self.rows = []
        self.notes = []
        self.failed = []
        self.busy = {}
        self.v2 = cgroup_v2_mount()
        self.etcd_dir = None
        self.etcd = self.etcdctl = None
        self.n = 0

    # ---- processes

    def spawn(self, argv, env=None, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw):
        """Start a process in its own process group (so stop() reaches whatever it forks)."""
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                             start_new_session=True, **kw)
        with self.proc_lock:
            self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGKILL, timeout=10):
        """Stop p and its process group, once: a group is only signalled while its leader is
        unreaped or right after reaping it (its pid cannot have been reused by then while
        members remain)."""
        if getattr(p, "bench_stopped", False):
            return
        p.bench_stopped = True
        reaped_before = p.returncode is not None
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        elif not reaped_before:
            # The leader was reaped just now; anything it left in its group goes too. (A leader
            # reaped earlier is left alone: its pid may belong to someone else by now.)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        with self.proc_lock:
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self, procs):
        # SIGKILL every group first (no waiting in between), then reap and sweep each.
        for p in procs:
            if p.returncode is None and not getattr(p, "bench_stopped", False):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in procs:
            self.stop(p)

    # ---- per-scenario context

    def cgroot(self, tag):
        if not self.v2:
            return None
        d = os.path.join(self.v2, f"conch-bench-{os.getpid()}-{tag}")
        self.cgroots.append(d)
        return d

    def destroy_cgroup(self, root):
        if not os.path.isdir(root):
            return
        try:
            with open(os.path.join(root, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass

        def empty():
            with open(os.path.join(root, "cgroup.events")) as f:
                return "populated 0" in f.read()
        try:
            wait_for(empty, 5, f"{root} to empty", interval=0.02)
        except HarnessError:
            pass
        for dirpath, dirs, _ in sorted(os.walk(root), key=lambda t: -t[0].count("/")):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass

    def cleanup(self):
        with self.proc_lock:
            procs = list(self.procs)
        self.stop_all(procs)
        for root in self.cgroots:
            self.destroy_cgroup(root)
        if self.args.keep:
            log(f"kept logs and journals in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def rounds(self, full, smoke):
        if self.args.rounds:
            return self.args.rounds
        return smoke if self.smoke else full

    # ---- setup

    def build(self):
        if self.args.no_build:
            return
        if shutil.which("protoc") is None:
            log("protoc missing: scripts/ensure-deps.sh")
            subprocess.run([os.path.join(ROOT, "scripts", "ensure-deps.sh")], check=True)
        log("cargo build --release --bins")
        r = subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT)
        if r.returncode != 0:
            raise HarnessError("cargo build --release --bins failed")

    def find_etcd(self):
        out = subprocess.run([os.path.join(ROOT, "scripts", "fetch-etcd.sh")], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            raise HarnessError(f"scripts/fetch-etcd.sh failed: {out.stderr[-500:]}")
        self.etcd_dir = out.stdout.strip().splitlines()[-1]
        self.etcd = os.path.join(self.etcd_dir, "etcd")
        self.etcdctl = os.path.join(self.etcd_dir, "etcdctl")
        try:
            with open(os.path.join(self.etcd_dir, "..", "VERSION")) as f:
                self.etcd_version = f.read().strip()
        except OSError:
            self.etcd_version = subprocess.run([self.etcd, "--version"], capture_output=True, text=True).stdout.split("\n")[0]

    def context(self, tag):
        """A fresh etcd, key prefix, cgroup root and scratch dir for one scenario."""
        self.n += 1
        return Ctx(self, f"{tag.lower()}-{self.n}")


class Ctx:
    def __init__(self, bench, tag):
        self.b = bench
        self.tag = tag
        self.dir = os.path.join(bench.tmp, tag)
        os.makedirs(self.dir)
        self.etcd = Etcd(bench, tag)
        self.prefix = f"/bench-{tag}"
        self.cgroot = bench.cgroot(tag)
        self.logf = open(os.path.join(self.dir, "procs.log"), "ab")
        self.procs = []

    def close(self):
        self.b.stop_all(self.procs)
        if self.cgroot:
            self.b.destroy_cgroup(self.cgroot)
        self.etcd.stop()
        self.logf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def path(self, name):
        return os.path.join(self.dir, name)

    def log_tail(self, n=2000):
        self.logf.flush()
        try:
            with open(self.logf.name, "rb") as f:
                f.seek(max(0, os.path.getsize(self.logf.name) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def env(self, node=None, endpoints=None):
        e = {k: v for k, v in os.environ.items() if not k.startswith(("CONCH_", "ETCDCTL_"))}
        e.update(CONCH_ENDPOINTS=endpoints or self.etcd.url, CONCH_PREFIX=self.prefix, CONCH_QUIET="true", ETCDCTL_API="3")
        if self.cgroot:
            e["CONCH_CGROUP_ROOT"] = self.cgroot
        if node:
            e["CONCH_NODE"] = node
        return e

    def spawn(self, argv, env, stdout=None, stderr=None, **kw):
        p = self.b.spawn(argv, env=env, stdout=stdout or self.logf, stderr=stderr or self.logf, **kw)
        self.procs.append(p)
        return p

    def holder(self, kind, name, node, child, endpoints=None, ttl=None, grace=None):
        """One participant whose child is `child` (argv):
        sema = `conch sema NAME --max 1`, elect = `conch elect NAME`,
        lock = `etcdctl lock NAME`, eelect = `etcdctl elect NAME p` + the child started by sh once elected."""
        ep = endpoints or self.etcd.url
        env = self.env(node, ep)
        timing = []
        if kind in ("sema", "elect"):
            if ttl:
                timing = ["--ttl", f"{ttl}s", "--kill-after", f"{grace}s"]
            if kind == "sema":
                argv = [CONCH, "sema", name, "--max", "1", *timing, "--", *child]
            else:
                argv = [CONCH, "elect", name, *timing, "--", *child]
        elif kind == "lock":
            if ttl:
                timing = ["--ttl", str(ttl)]
            argv = [self.b.etcdctl, f"--endpoints={ep}", "lock", *timing, name, "--", *child]
        elif kind == "eelect":
            fifo = self.path(f"fifo-{name}-{node}")
            script = ('e=$1 u=$2 n=$3 f=$4; shift 4; mkfifo "$f" || exit 1; '
                      '"$e" --endpoints="$u" elect "$n" p >"$f" & pid=$!; '
                      '{ read -r _ || exit 1; "$@"; kill -INT "$pid"; } <"$f"; wait "$pid"; rc=$?; rm -f "$f"; exit $rc')
            argv = ["sh", "-c", script, "sh", self.b.etcdctl, ep, name, fifo, *child]
        else:
            raise AssertionError(kind)
        return self.spawn(argv, env)

    def keyprefix(self, kind, name):
        if kind == "sema":
            return f"{self.prefix}/v1/sema/{name}/"
        if kind == "elect":
            return f"{self.prefix}/v1/elect/{name}/"
        return f"{name}/"

    def wait_keys(self, kind, name, n, timeout=60):
        kp = self.keyprefix(kind, name)
        wait_for(lambda: self.etcd.gw.count(kp) >= n, timeout, f"{n} participants under {kp}", interval=0.01)

    def wait_exit(self, procs, timeout, what):
        end = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise HarnessError(f"{what}: pid {p.pid} ({' '.join(p.args[:4])} …) still running after {timeout:.0f}s;"
                                   f" log tail:\n{self.log_tail()}")
            if p.returncode != 0:
                raise HarnessError(f"{what}: {' '.join(p.args[:6])} … exited {p.returncode}; log tail:\n{self.log_tail()}")
            self.b.stop(p)


# --------------------------------------------------------------------------------------
# The scenarios


def b1(b):
    """Uncontended wrap: whole-process wall time of one acquire-run-release."""
    n = b.rounds(20, 1) * (1 if b.smoke else 5)
    times = {"conch": [], "etcdctl": [], "flock": []}
    with b.context("B1") as c:
        env = c.env("b1")
        lockfile = c.path("flock")
        cmds = {
            "conch": [CONCH, "sema", "x", "--max", "1", "--", "true"],
            "etcdctl": [b.etcdctl, f"--endpoints={c.etcd.url}", "lock", "x", "true"],
            "flock": ["flock", lockfile, "true"],
        }
        # Warm the page cache and etcd once; not measured.
        for k in cmds:
            subprocess.run(cmds[k], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        order = list(cmds)
        for i in range(max(3, n)):
            order = order[1:] + order[:1]  # rotate: nobody always runs first
            for k in order:
                t0 = time.perf_counter()
                r = subprocess.run(cmds[k], env=env, stdout=subprocess.DEVNULL, stderr=c.logf)
                dt = (time.perf_counter() - t0) * 1000
                if r.returncode != 0:
                    raise HarnessError(f"B1 {k} exited {r.returncode}: {c.log_tail()}")
                times[k].append(dt)
    c_, e_, f_ = (times[k] for k in ("conch", "etcdctl", "flock"))
    b.rows.append(Row("B1 uncontended `sema x --max 1 -- true`, wall time (peer: `etcdctl lock x true`)",
                      fms(median(c_)), fms(p99(c_)), fms(median(e_)), fms(p99(e_)), ratio_s(median(c_), median(e_)),
                      "conch ≤ 0.35× etcdctl", median(c_) <= 0.35 * median(e_)))
    b.rows.append(Row("B1 floor: `flock FILE true` (one host only)", fms(median(c_)), fms(p99(c_)),
                      fms(median(f_)), fms(p99(f_)), ratio_s(median(c_), median(f_)), "— (floor)", None))
    b.notes.append(f"B1: {len(c_)} runs each, interleaved conch / etcdctl / flock.")


def handoff_chain(c, kind, name, n):
    """n participants queue behind a holder whose child waits for a gate file; the gate is
    opened and each child (`--run 10ms`) hands over to the next. Returns the n-1 handoffs
    (ms): next child's start - previous child's end, from the journal (CLOCK_BOOTTIME)."""
    j = Journal(c.path(f"journal-{name}"))
    gate = c.path(f"gate-{name}")
    procs = [c.holder(kind, name, f"{name}-0", [CHILD, "--journal", j.path, "--until-file", gate])]
    wait_for(lambda: j.starts(), 30, f"{name}: first holder's child")
    for i in range(1, n):
        procs.append(c.holder(kind, name, f"{name}-{i}", [CHILD, "--journal", j.path, "--run", "10ms"]))
    c.wait_keys(kind, name, n)
    time.sleep(0.05)
    open(gate, "w").close()
    c.wait_exit(procs, 60, f"{name} chain")
    recs = j.refresh()
    starts = {r["node"]: r["ns"] for r in recs if r["ev"] == "start" and r["role"] == "child"}
    ends = {r["node"]: r["ns"] for r in recs if r["ev"] == "end" and r["role"] == "child"}
    if len(starts) != n or len(ends) != n:
        raise HarnessError(f"{name}: {len(starts)} starts / {len(ends)} ends in the journal, expected {n}")
    order = sorted(starts, key=starts.get)
    # A negative handoff would be two holders at once: a broken lock, reported in the notes.
    return [(starts[nxt] - ends[a]) / 1e6 for a, nxt in zip(order, order[1:])]


def write_latency(c, n):
    """etcd's own write latency: `POST /v3/kv/put` through etcd's HTTP/JSON gateway on a
    kept-alive connection (a raft round + fsync + the gateway's JSON<->gRPC hop)."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        c.etcd.gw.put("bench/write-latency", str(i))
        out.append((time.perf_counter() - t0) * 1000)
    return out


def b2_b3(b, tag, kinds, label, peer_label):
    rounds = b.rounds(10, 1)
    h = {k: [] for k in kinds}
    w = []
    with b.context(tag) as c:
        write_latency(c, 20)  # warm-up
        for r in range(rounds):
            ks = kinds if r % 2 == 0 else kinds[::-1]
            for k in ks:
                h[k] += handoff_chain(c, k, f"{tag.lower()}{k}{r}", 8)
                w += write_latency(c, 10 if b.smoke else 30)
    ck, pk = kinds
    cm, cp = median(h[ck]), p99(h[ck])
    wm = median(w)
    met = cm <= 3 * wm and cp <= 50
    for k in kinds:
        bad = [x for x in h[k] if x < 0]
        if bad:
            b.notes.append(f"{tag}: OVERLAP — with {k}, {len(bad)} children started before the previous one ended "
                           f"(by up to {-min(bad):.1f} ms).")
            if k == ck:
                met = False
    b.rows.append(Row(f"{tag} {label} (peer: {peer_label})", fms(cm), fms(cp), fms(median(h[pk])), fms(p99(h[pk])),
                      ratio_s(cm, median(h[pk])), f"median ≤ 3× etcd write ({3 * wm:.1f} ms); p99 ≤ 50 ms", met))
    b.rows.append(Row(f"{tag} floor: etcd write latency (gateway put), same run", fms(cm), fms(cp), fms(wm), fms(p99(w)),
                      ratio_s(cm, wm), "— (floor)", None))
    b.notes.append(f"{tag}: {len(h[ck])} handoffs each ({rounds} rounds of 8 participants, alternating), "
                   f"{len(w)} gateway puts.")


def b2(b):
    b2_b3(b, "B2", ["sema", "lock"], "mutex handoff, 8 contenders, child 10 ms: release → next child start",
          "`etcdctl lock`")


def b3(b):
    b2_b3(b, "B3", ["elect", "eelect"], "elect: leader's child exits → standby's child starts",
          "`etcdctl elect` + child, resign by SIGINT")


def b4(b):
    """Failover after SIGKILL of the leader's wrapper (conch / etcdctl): SIGKILL → standby's child start."""
    ttl, grace = 4, 1
    rounds = b.rounds(5, 1)
    res = {"elect": [], "lock": []}
    gone = {"elect": [], "lock": []}
    with b.context("B4") as c:
        for r in range(rounds):
            for k in (["elect", "lock"] if r % 2 == 0 else ["lock", "elect"]):
                name = f"b4{k}{r}"
                j = Journal(c.path(f"journal-{name}"))
                lead = c.holder(k, name, "L", [CHILD, "--journal", j.path], ttl=ttl, grace=grace)
                wait_for(lambda: j.starts("L"), 30, f"{name} leader's child")
                stby = c.holder(k, name, "S", [CHILD, "--journal", j.path, "--run", "10ms"], ttl=ttl, grace=grace)
                c.wait_keys(k, name, 2)
                time.sleep(random.uniform(0.1, 0.8))  # a random phase of the renewal cycle
                t = boot_ns()
                os.kill(lead.pid, signal.SIGKILL)  # the wrapper only, as a crash would
                s = wait_for(lambda: j.starts("S"), ttl + 15, f"{name} standby's child")[0]["ns"]
                res[k].append((s - t) / 1e9)
                time.sleep(0.05)
                last = j.last_life("L")
                gone[k].append(None if last > s else (last + BEAT_NS - t) / 1e6)
                c.wait_exit([stby], 30, name)
                b.stop(lead)
                c.procs.remove(lead)
    cm, cp = median(res["elect"]), p99(res["elect"])
    b.rows.append(Row(f"B4 elect: leader's conch SIGKILLed → standby's child starts, --ttl {ttl}s --kill-after {grace}s "
                      f"(peer: `etcdctl lock --ttl {ttl}`)", fms(cm, "s"), fms(cp, "s"), fms(median(res['lock']), "s"),
                      fms(p99(res["lock"]), "s"), ratio_s(cm, median(res["lock"])), f"≤ TTL + 1.5 s = {ttl + 1.5:.1f} s",
                      cp <= ttl + 1.5))
    cg = [g for g in gone["elect"] if g is not None]
    pg = sum(1 for g in gone["lock"] if g is None)
    b.notes.append(f"B4: {rounds} rounds. After the SIGKILL, conch's child tree was gone within "
                   f"{max(cg) if cg else float('nan'):.0f} ms (last journal record + its 5 ms beat; {len(cg)}/{len(gone['elect'])} gone before "
                   f"the standby started); etcdctl lock's child was still running when the standby's started in "
                   f"{pg}/{len(gone['lock'])} rounds (it is orphaned, not killed).")


def b5(b):
    """Partition of the holder: a proxy between the holder's wrapper and etcd blackholes both
    ways; the holder's tree must be dead while a direct client still sees the lease alive."""
    ttl, grace = 4, 1
    trials = b.rounds(20, 2)
    peer_every = 4  # etcdctl's behaviour does not vary: one peer trial per 4 conch trials
    out = {"elect": [], "lock": []}
    with b.context("B5") as c:
        poll = Gateway(c.etcd.port)
        plan = []
        for t in range(trials):
            plan.append(("elect", t))
            if t % peer_every == 0:
                plan.append(("lock", t))
        for k, t in plan:
            name = f"b5{k}{t}"
            j = Journal(c.path(f"journal-{name}"))
            proxy = Proxy(c.etcd.port)
            try:
                hold = c.holder(k, name, "H", [CHILD, "--journal", j.path], endpoints=proxy.url, ttl=ttl, grace=grace)
                first = wait_for(lambda: j.starts("H"), 30, f"{name} holder's child")[0]
                if k == "elect":
                    lease = int(first["lease"], 16)
                else:
                    kvs = sorted(c.etcd.gw.range(f"{name}/"), key=lambda kv: int(kv["create_revision"]))
                    lease = int(kvs[0]["lease"])
                stby = c.holder(k, name, "S", [CHILD, "--journal", j.path, "--run", "10ms"], ttl=ttl, grace=grace)
                c.wait_keys(k, name, 2)
                time.sleep(random.uniform(0.2, 1.0))
                t_b = boot_ns()
                proxy.blackhole()
                last_alive = None
                expired = None
                end = time.monotonic() + ttl + 15
                while time.monotonic() < end:
                    s = boot_ns()
                    left = poll.lease_ttl(lease)
                    if left >= 0:
                        last_alive = s  # alive at the latest when this question was sent
                    else:
                        expired = boot_ns()
                        break
                    time.sleep(0.003)
                if expired is None:
                    raise HarnessError(f"{name}: the holder's lease did not expire within {ttl + 15}s")
                s_start = wait_for(lambda: j.starts("S"), 15, f"{name} standby's child")[0]["ns"]
                time.sleep(0.3)  # would the old tree still be running?
                h_last = j.last_life("H")
                dead_by = h_last + BEAT_NS
                out[k].append({
                    "before": dead_by < last_alive,
                    "margin": (last_alive - dead_by) / 1e6,
                    "kill_after_partition": (h_last - t_b) / 1e6,
                    "expiry_after_partition": (expired - t_b) / 1e6,
                    "overlap": max(0.0, (h_last - s_start) / 1e6),
                    "still_running": h_last > s_start,
                })
                c.wait_exit([stby], 30, name)
                for p in (hold,):
                    b.stop(p)
                    c.procs.remove(p)
            finally:
                proxy.close()
        poll.close()
    ce, pe = out["elect"], out["lock"]
    ok = sum(1 for x in ce if x["before"])
    pok = sum(1 for x in pe if x["before"])
    cmarg = [x["margin"] for x in ce]
    b.rows.append(Row(f"B5 partition of the holder ({len(ce)} trials; peer {len(pe)}): tree dead before lease expiry, "
                      f"margin = lease last seen alive − tree dead (ms, median / worst)",
                      f"{ok}/{len(ce)}; {median(cmarg):.0f} ms", f"worst {min(cmarg):.0f} ms",
                      f"{pok}/{len(pe)}", "—", "—", f"{len(ce)}/{len(ce)} before expiry", ok == len(ce)))
    cov = [x["overlap"] for x in ce]
    pov = [x["overlap"] for x in pe]
    prun = sum(1 for x in pe if x["still_running"])
    b.rows.append(Row("B5 overlap: old tree's last beat − standby's child start (max over trials)",
                      fms(median(cov)), f"max {max(cov):.1f} ms", fms(median(pov)) + (" (never killed)" if prun else ""),
                      f"max {max(pov):.1f} ms" if pov else "—", "—", "0 ms", max(cov) == 0))
    b.notes.append(
        "B5: conch killed the tree {:.0f}–{:.0f} ms after the partition began; a direct client saw the lease expire "
        "{:.0f}–{:.0f} ms after it (TTL {} s). etcdctl lock's child was still running when the standby's child started in {}/{} "
        "trials (it was stopped by the harness {} ms later).".format(
            min(x["kill_after_partition"] for x in ce), max(x["kill_after_partition"] for x in ce),
            min(x["expiry_after_partition"] for x in ce), max(x["expiry_after_partition"] for x in ce), ttl,
            prun, len(pe), 300))


def b6_run(b, waiters, slots=10, run_ms=50):
    """`waiters` queue behind `slots` holders (gated); from the moment the gate opens, the
    queue drains. Returns (drain s, ideal s, requests per release, keepalives, max concurrency)."""
    with b.context(f"B6w{waiters}") as c:
        j = Journal(c.path("journal"))
        gate = c.path("gate")
        kp = f"{c.prefix}/v1/sema/b6/"
        procs = []

        def sema(node, child):
            return c.spawn([CONCH, "sema", "b6", "--max", str(slots), "--", *child], c.env(node))

        for i in range(slots):
            procs.append(sema(f"h{i}", [CHILD, "--journal", j.path, "--until-file", gate]))
        wait_for(lambda: len(j.starts()) >= slots, 60, f"{slots} gated holders")
        batch = 25
        for i in range(0, waiters, batch):
            for k in range(i, min(waiters, i + batch)):
                procs.append(sema(f"w{k}", [CHILD, "--journal", j.path, "--run", f"{run_ms}ms"]))
            want = slots + min(waiters, i + batch)
            wait_for(lambda: c.etcd.gw.count(kp) >= want, 120, f"{want} participants queued", interval=0.02)
        time.sleep(1.0)
        m0 = c.etcd.metrics()
        # CPU accounting over the drain: the wrappers (and what they reaped) are the harness's
        # children; what they used before the gate is subtracted.
        pre = sum(sum(cpu_s(p.pid)) for p in procs if p.poll() is None)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        e0, h0 = cpu_s(c.etcd.proc.pid)[0], host_cpu()
        t_gate = boot_ns()
        open(gate, "w").close()
        c.wait_exit(procs, 120 + waiters * run_ms / slots / 1000 * 10, f"B6 drain of {waiters}")
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        e1, h1 = cpu_s(c.etcd.proc.pid)[0], host_cpu()
        m1 = c.etcd.metrics()
        cpu = {"wrappers": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime - pre, "etcd": e1 - e0,
               "busy": h1[0] - h0[0], "total": h1[1] - h0[1]}
        recs = j.refresh()
        ends = [r["ns"] for r in recs if r["ev"] == "end" and r["role"] == "child"]
        if len(ends) != waiters + slots:
            raise HarnessError(f"B6: {len(ends)} children ended, expected {waiters + slots}")
        drain = (max(ends) - t_gate) / 1e9
        ev = sorted([(r["ns"], 1) for r in recs if r["ev"] == "start" and r["role"] == "child"] +
                    [(r["ns"], -1) for r in recs if r["ev"] == "end" and r["role"] == "child"])
        cur = peak = 0
        for _, d in ev:
            cur += d
            peak = max(peak, cur)
        # Each start after the gate takes the slot of the oldest unmatched end before it.
        free, handoffs = collections.deque(), []
        for t, d in ev:
            if t < t_gate:
                continue
            if d < 0:
                free.append(t)
            elif free:
                handoffs.append((t - free.popleft()) / 1e6)
        runs = {}
        for r in recs:
            if r["role"] == "child" and r["ev"] in ("start", "end") and r["node"].startswith("w"):
                runs.setdefault(r["node"], {})[r["ev"]] = r["ns"]
        lived = [(v["end"] - v["start"]) / 1e6 for v in runs.values() if "start" in v and "end" in v]
        cpu["handoff"] = median(handoffs)
        cpu["run"] = median(lived)
        req = Etcd.requests(m0, m1)
        releases = waiters + slots
        per = (req["unary"] + req["watch"] + req["streams"]) / releases
        return drain, waiters * run_ms / slots / 1000, per, req, peak, cpu


def b6(b):
    small, big = (100, 200) if b.smoke else (100, 1000)
    rounds = b.rounds(2, 1)
    res = {small: [], big: []}
    for r in range(rounds):
        for w in ([small, big] if r % 2 == 0 else [big, small]):
            log(f"B6 round {r + 1}/{rounds}: {w} waiters")
            res[w].append(b6_run(b, w))
    drains = [x[0] for x in res[big]]
    ideal = res[big][0][1]
    dm = median(drains)
    b.rows.append(Row(f"B6 drain: {big} waiters on `--max 10`, child 50 ms (ideal {ideal:.1f} s)", fms(dm, "s"),
                      fms(p99(drains), "s"), "—", "—", f"{dm / ideal:.2f}× ideal", "≤ 1.5× ideal", dm <= 1.5 * ideal))
    ps, pb = median([x[2] for x in res[small]]), median([x[2] for x in res[big]])
    b.rows.append(Row(f"B6 etcd requests per release at {big} waiters (peer columns: at {small} waiters)",
                      f"{pb:.1f}", "—", f"{ps:.1f}", "—", f"{pb / ps:.2f}×", f"≤ 1.2× the {small}-waiter value",
                      pb <= 1.2 * ps))
    for w in (small, big):
        req, cpu = res[w][0][3], res[w][0][5]
        b.notes.append(f"B6 {w} waiters (first round): drain {res[w][0][0]:.2f} s; per release "
                       f"{req['unary'] / (w + 10):.1f} unary + {req['watch'] / (w + 10):.1f} watch messages + "
                       f"{req['streams'] / (w + 10):.2f} streams opened; {req['keepalive']:.0f} lease renewals during the drain "
                       f"(not counted as per-release work); at most {res[w][0][4]} children at once; host CPU "
                       f"{100 * cpu['busy'] / max(cpu['total'], 1e-9):.0f}% busy during the drain: wrappers (+ their "
                       f"supervisors and children) {cpu['wrappers']:.1f} CPU-s, etcd {cpu['etcd']:.1f} CPU-s; a freed slot "
                       f"was taken {cpu['handoff']:.1f} ms (median) after a child's end; children ran {cpu['run']:.1f} ms "
                       f"(median, start → end).")


def b7(b):
    """Peak RSS (VmHWM) of a holding wrapper while its child runs."""
    rounds = b.rounds(5, 1)
    settle = 1.5 if b.smoke else 3.0
    m = {"conch": [], "sup": [], "etcdctl": [], "flock": []}
    with b.context("B7") as c:
        for r in range(rounds):
            for k in (["elect", "lock", "flock"] if r % 2 == 0 else ["flock", "lock", "elect"]):
                name = f"b7{k}{r}"
                j = Journal(c.path(f"journal-{name}"))
                gate = c.path(f"gate-{name}")
                child = [CHILD, "--journal", j.path, "--until-file", gate]
                if k == "flock":
                    p = c.spawn(["flock", c.path("flock"), *child], c.env("F"))
                else:
                    p = c.holder(k, name, "H", child)
                wait_for(lambda: j.starts(), 30, f"{name} child")
                time.sleep(settle)  # a few renewals
                if k == "elect":
                    m["conch"].append(vm_kib(p.pid, "VmHWM") / 1024)
                    sup = [q for q in children_of(p.pid) if b"__supervise" in cmdline(q)]
                    if len(sup) != 1:
                        raise HarnessError(f"B7: expected one `conch __supervise` child of {p.pid}, found {sup}")
                    m["sup"].append(vm_kib(sup[0], "VmHWM") / 1024)
                    m.setdefault("sup_anon", []).append(vm_kib(sup[0], "RssAnon") / 1024)
                    m.setdefault("sup_file", []).append(vm_kib(sup[0], "RssFile") / 1024)
                    m.setdefault("conch_anon", []).append(vm_kib(p.pid, "RssAnon") / 1024)
                    m.setdefault("conch_file", []).append(vm_kib(p.pid, "RssFile") / 1024)
                elif k == "lock":
                    m["etcdctl"].append(vm_kib(p.pid, "VmHWM") / 1024)
                else:
                    m["flock"].append(vm_kib(p.pid, "VmHWM") / 1024)
                open(gate, "w").close()
                c.wait_exit([p], 30, name)
                c.procs.remove(p)
    cm, em = median(m["conch"]), median(m["etcdctl"])
    b.rows.append(Row("B7 peak RSS (VmHWM) of a holding `conch elect` (peer: holding `etcdctl lock`)",
                      fms(cm, "MiB"), fms(max(m["conch"]), "MiB"), fms(em, "MiB"), fms(max(m["etcdctl"]), "MiB"),
                      ratio_s(cm, em), "≤ 8 MiB and ≤ 0.35× etcdctl", max(m["conch"]) <= 8 and cm <= 0.35 * em))
    sm = median(m["sup"])
    b.rows.append(Row("B7 peak RSS of its supervisor (`conch __supervise`) (peer columns: holding `flock`, the floor)",
                      fms(sm, "MiB"), fms(max(m["sup"]), "MiB"), fms(median(m["flock"]), "MiB"), fms(max(m["flock"]), "MiB"),
                      ratio_s(sm, median(m["flock"])), "≤ 2 MiB", max(m["sup"]) <= 2))
    b.notes.append(f"B7: {rounds} rounds; VmHWM read {settle:.1f} s after the child started (p99 column = max). Resident "
                   f"then (median): conch {median(m['conch_anon']):.1f} MiB anonymous + {median(m['conch_file']):.1f} MiB "
                   f"file-backed; supervisor {median(m['sup_anon']):.1f} MiB anonymous + {median(m['sup_file']):.1f} MiB "
                   f"file-backed (the conch binary and libc pages it touched).")


def runs_seen(c, nodes):
    """(job, tick) of every run the B8 conchds' logs show so far (the job prints its tick)."""
    seen = set()
    for i in range(nodes):
        with open(c.path(f"conchd-n{i}.log"), errors="replace") as f:
            for line in f:
                mm = re.match(r"([sm]\d+): (\d{19}) (\S+)$", line.strip())
                if mm:
                    tick = datetime.datetime.strptime(mm.group(3), "%Y-%m-%dT%H:%M:%SZ").replace(
                        tzinfo=datetime.timezone.utc).timestamp()
                    seen.add((mm.group(1), int(tick)))
    return seen


def b8(b):
    """3 conchd, many `@every 1m` jobs plus `@every 1s` jobs: tick lag, conchd memory, leases."""
    nodes = 3
    n_min, n_sec = (200, 10) if b.smoke else (10000, 100)
    with b.context("B8") as c:
        logs = []
        conchds = []
        for i in range(nodes):
            lf = open(c.path(f"conchd-n{i}.log"), "wb")
            logs.append(lf)
            conchds.append(c.spawn([CONCH, "conchd", "--node", f"n{i}"], c.env(f"n{i}"), stdout=lf, stderr=lf))
        try:
            np_ = f"{c.prefix}/v1/node/"
            wait_for(lambda: c.etcd.gw.count(np_) >= nodes, 60, "conchd registration", interval=0.05)
            before = len(c.etcd.gw.leases())
            if not b.smoke and time.time() % 60 > 25:
                # Put the jobs early in a minute: >= 30 s of steady state before the first burst.
                log(f"B8: waiting {60 - time.time() % 60:.0f} s for the start of a minute")
                while time.time() % 60 > 25 or time.time() % 60 < 1:
                    time.sleep(0.2)
            added = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            cmd = ["sh", "-c", 'exec date "+%s%N $CONCH_TICK"']

            def spec(schedule):
                return json.dumps({"schedule": schedule, "tz": "UTC", "cmd": cmd, "run_ttl": "10m", "overlap": "allow",
                                   "starting_deadline": "1m", "node_selector": {}, "jitter": "0s", "paused": False,
                                   "added_by": "bench@localhost", "added_at": added}, separators=(",", ":"))

            jp = f"{c.prefix}/v1/cron/job/"
            pairs = [(f"{jp}s{i:03d}", spec("@every 1s")) for i in range(n_sec)]
            pairs += [(f"{jp}m{i:05d}", spec("@every 1m")) for i in range(n_min)]
            t0 = time.time()
            c.etcd.gw.put_many(pairs)
            log(f"B8: {len(pairs)} job specs put in {time.time() - t0:.1f} s (transactions of 100 puts)")
            w_start = math.ceil(time.time()) + 5  # ticks from here on count: conchd has read the specs
            if b.smoke:
                first_min, w_end = None, w_start + 15
            else:
                # Steady state up to the first minute boundary after the jobs were added (>= 30 s),
                # then two minute boundaries (the 10 000-job bursts), the last followed by 20 s.
                first_min = (w_start // 60 + 1) * 60
                w_end = first_min + 60 + 20
            log(f"B8: measuring ticks {time.strftime('%H:%M:%S', time.gmtime(w_start))}–"
                f"{time.strftime('%H:%M:%S', time.gmtime(w_end))} UTC")
            while time.time() < w_start:
                time.sleep(0.05)
            c0 = [cpu_s(p.pid, True) for p in conchds]
            e0, h0 = cpu_s(c.etcd.proc.pid)[0], host_cpu()
            mid = None
            while time.time() < w_end + 3:
                if mid is None and first_min is not None and time.time() >= first_min:
                    mid = ([cpu_s(p.pid, True) for p in conchds], cpu_s(c.etcd.proc.pid)[0], host_cpu())
                for p in conchds:
                    if p.poll() is not None:
                        raise HarnessError(f"B8: conchd {p.pid} exited {p.returncode}")
                time.sleep(0.5)
            c1 = [cpu_s(p.pid, True) for p in conchds]
            e1, h1 = cpu_s(c.etcd.proc.pid)[0], host_cpu()
            after = len(c.etcd.gw.leases())
            hwm = [vm_kib(p.pid, "VmHWM") / 1024 for p in conchds]
            rss = [vm_kib(p.pid, "VmRSS") / 1024 for p in conchds]
            # Late runs of the window's last burst are still starting: let the daemons go on
            # (not measured any more) until every run due in the window has been seen, so that
            # "not run" means not run, not "not yet run when the harness stopped looking".
            due = {(f"s{i:03d}", t) for t in range(w_start, w_end + 1) for i in range(n_sec)}
            due |= {(f"m{i:05d}", t) for t in range(w_start, w_end + 1) if t % 60 == 0 for i in range(n_min)}
            tail_start, tail_cap = time.time(), (10 if b.smoke else 120)
            while True:
                left = due - runs_seen(c, nodes)
                if not left or time.time() - tail_start > tail_cap:
                    break
                time.sleep(2)
            tail = time.time() - tail_start
        finally:
            for p in conchds:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGTERM)
            for p in conchds:
                try:
                    p.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    pass
                b.stop(p)
                c.procs.remove(p)
            for lf in logs:
                lf.close()
        runs = []
        warns = {}
        for i in range(nodes):
            with open(c.path(f"conchd-n{i}.log"), errors="replace") as f:
                for line in f:
                    w = re.search(r" (WARN|ERROR) (\S+)", line)
                    if w:
                        warns[w.group(1) + " " + w.group(2)] = warns.get(w.group(1) + " " + w.group(2), 0) + 1
                    mm = re.match(r"([sm]\d+): (\d{19}) (\S+)$", line.strip())
                    if mm:
                        tick = datetime.datetime.strptime(mm.group(3), "%Y-%m-%dT%H:%M:%SZ").replace(
                            tzinfo=datetime.timezone.utc).timestamp()
                        runs.append((mm.group(1), int(tick), int(mm.group(2))))
    seen = {}
    for job, tick, ns in runs:
        seen.setdefault((job, tick), []).append(ns)
    dups = sum(1 for v in seen.values() if len(v) > 1)

    def lags(kind, period):
        """Lag (ms) of every expected run in the window; a run not seen at all counts as inf."""
        out = []
        for t in range(w_start, w_end + 1):
            if t % period:
                continue
            for i in range(n_sec if kind == "s" else n_min):
                job = f"{kind}{i:03d}" if kind == "s" else f"{kind}{i:05d}"
                v = seen.get((job, t))
                out.append((min(v) - t * 1_000_000_000) / 1e6 if v else float("inf"))
        return out

    ls, lm = lags("s", 1), lags("m", 60)

    def show(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else (
            "not run" if math.isinf(x) else f"{x:.1f} ms")

    miss_s, miss_m = sum(1 for x in ls if math.isinf(x)), sum(1 for x in lm if math.isinf(x))
    b.rows.append(Row(f"B8 tick lag (child start − tick) of the {n_sec} `@every 1s` jobs, {nodes} conchd, {n_min} `@every 1m` "
                      f"jobs beside them ({len(ls)} runs due in the window, {miss_s} not run: counted as infinitely late)",
                      show(median(ls)), show(p99(ls)), "—", "—", "—", "p99 ≤ 100 ms", bool(ls) and p99(ls) <= 100))
    if first_min is not None:
        steady = [x for (t, x) in zip([t for t in range(w_start, w_end + 1) for _ in range(n_sec)], ls) if t < first_min]
        b.rows.append(Row(f"B8 (info) the same, only the {first_min - w_start} s before the first minute burst "
                          f"({sum(1 for x in steady if math.isinf(x))} of {len(steady)} not run)",
                          show(median(steady)), show(p99(steady)), "—", "—", "—", "(info)", None))
    seen_m = [x for x in lm if not math.isinf(x)]
    b.rows.append(Row(f"B8 (info) tick lag of the {n_min} `@every 1m` jobs: {len(lm)} runs due, {miss_m} not run; "
                      f"median / p99 / max of the runs seen", show(median(seen_m) if seen_m else None),
                      show(p99(seen_m) if seen_m else None), "—", "—", "—",
                      f"(info: max {show(max(seen_m)) if seen_m else '—'})", None))
    b.rows.append(Row("B8 conchd peak RSS (VmHWM, max of 3)", fms(median(hwm), "MiB"), fms(max(hwm), "MiB"), "—", "—", "—",
                      "≤ 150 MiB", max(hwm) <= 150))
    b.rows.append(Row("B8 live etcd leases: after registration → at the end of the window", f"{before} → {after}", "—", "—",
                      "—", "—", "unchanged (one per conchd)", after == before))
    def cpu_diff(a, z):
        """conchd's own user / system CPU-s and its reaped children's (supervisors + jobs), summed over nodes."""
        d = [sum(x[i] for x in z) - sum(x[i] for x in a) for i in range(3)]
        return f"conchd itself {d[0]:.1f} CPU-s user + {d[1]:.1f} system, its reaped children (supervisors + jobs) {d[2]:.1f}"

    if mid is not None:
        steady_runs = sum(1 for x in steady if not math.isinf(x))
        b.notes.append(f"B8 before the first minute burst ({first_min - w_start} s, only the @every 1s jobs due, {steady_runs} "
                       f"runs): host {100 * (mid[2][0] - h0[0]) / max(mid[2][1] - h0[1], 1e-9):.0f}% busy; "
                       f"{cpu_diff(c0, mid[0])}; etcd {mid[1] - e0:.1f} CPU-s.")
    top = ", ".join(f"{k} ×{v}" for k, v in sorted(warns.items(), key=lambda kv: -kv[1])[:6]) or "none"
    b.notes.append(f"B8: window {w_end - w_start + 1} s of ticks; {len(runs)} runs seen in all; {dups} (job, tick) ran twice; "
                   f"conchd VmRSS at the end {', '.join(f'{x:.1f}' for x in rss)} MiB; during the window the host was "
                   f"{100 * (h1[0] - h0[0]) / max(h1[1] - h0[1], 1e-9):.0f}% busy: {cpu_diff(c0, c1)}; "
                   f"etcd {e1 - e0:.1f} CPU-s; conchd warnings/errors: {top}. After the window the daemons ran on "
                   f"{tail:.0f} s (not measured) so that late runs of the window's ticks could start and be seen; a run "
                   f"still not started then counts as not run.")


def b9(b):
    """Idle holders: etcd requests per second per holder, from etcd's /metrics."""
    holders = 10
    window = 4.0 if b.smoke else 20.0
    rounds = b.rounds(2, 1)
    rate = {"elect": [], "lock": []}
    detail = {}
    for r in range(rounds):
        for k in (["elect", "lock"] if r % 2 == 0 else ["lock", "elect"]):
            with b.context(f"B9{k}") as c:
                j = Journal(c.path("journal"))
                gate = c.path("gate")
                procs = [c.holder(k, f"b9-{i}", f"h{i}", [CHILD, "--journal", j.path, "--until-file", gate])
                         for i in range(holders)]
                wait_for(lambda: len(j.starts()) >= holders, 60, f"{holders} idle holders")
                time.sleep(2.0)
                m0 = c.etcd.metrics()
                time.sleep(window)
                m1 = c.etcd.metrics()
                req = Etcd.requests(m0, m1)
                total = req["unary"] + req["watch"] + req["keepalive"] + req["streams"]
                rate[k].append(total / window / holders)
                detail[k] = req
                open(gate, "w").close()
                c.wait_exit(procs, 60, "B9 holders")
    P = renewal_period(10, 5)
    cm = median(rate["elect"])
    b.rows.append(Row(f"B9 idle `conch elect` holders ({holders}, {window:.0f} s): etcd requests/s per holder "
                      f"(peer: idle `etcdctl lock`)", f"{cm:.2f} /s", f"{max(rate['elect']):.2f} /s",
                      f"{median(rate['lock']):.3f} /s", f"{max(rate['lock']):.3f} /s", ratio_s(cm, median(rate["lock"])),
                      f"≈ 1/P = {1 / P:.2f} /s (P = {P:.2f} s; ±25 %)", 0.75 / P <= cm <= 1.25 / P))
    d, e = detail["elect"], detail["lock"]
    b.notes.append(f"B9 (last round, {window:.0f} s, {holders} holders): conch {d['keepalive']:.0f} renewals, {d['unary']:.0f} unary "
                   f"calls, {d['watch']:.0f} watch messages, {d['streams']:.0f} streams opened; etcdctl lock {e['keepalive']:.0f} "
                   f"renewals, {e['unary']:.0f} unary, {e['watch']:.0f} watch messages, {e['streams']:.0f} streams opened "
                   f"(`etcdctl lock`'s session TTL defaults to 10 s, renewed every TTL/3).")


RUNNERS = {"B1": b1, "B2": b2, "B3": b3, "B4": b4, "B5": b5, "B6": b6, "B7": b7, "B8": b8, "B9": b9}


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), kernel {platform.release()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and rounds: keeps the harness working (CI)")
    ap.add_argument("--only", default="", help="comma-separated scenarios, e.g. B1,B7")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (B5: trials) of every scenario")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release --bins first")
    ap.add_argument("--output", help="also write the markdown table to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (process logs, journals) for inspection")
    args = ap.parse_args()
    only = [s.strip().upper() for s in args.only.split(",") if s.strip()] or SCENARIOS
    for s in only:
        if s not in RUNNERS:
            ap.error(f"unknown scenario {s} (known: {', '.join(SCENARIOS)})")
    if args.rounds < 0:
        ap.error("--rounds must be positive")

    b = Bench(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C, kill and a closed terminal all clean up (installed explicitly: a shell starts
    # background jobs with SIGINT ignored).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    started = time.monotonic()
    try:
        b.build()
        for p in (CONCH, CHILD):
            if not os.path.exists(p):
                raise HarnessError(f"{p} missing: cargo build --release --bins")
        b.find_etcd()
        if os.geteuid() != 0:
            log("not root: conch falls back to process-group containment (no cgroups); numbers differ")
        version = subprocess.run([CONCH, "version"], capture_output=True, text=True).stdout.splitlines()[0]
        for s in only:
            log(f"{s} …")
            t0 = time.monotonic()
            h0 = host_cpu()
            try:
                RUNNERS[s](b)
            except HarnessError as e:
                b.failed.append(s)
                b.rows.append(Row(f"{s} — harness failed: {str(e).splitlines()[0][:200]}"))
                log(f"{s} FAILED: {e}")
            except Exception as e:  # a bug in the harness: report it, go on with the others
                import traceback
                traceback.print_exc()
                b.failed.append(s)
                b.rows.append(Row(f"{s} — harness failed: {type(e).__name__}: {str(e)[:200]}"))
            h1 = host_cpu()
            b.busy[s] = 100 * (h1[0] - h0[0]) / max(h1[1] - h0[1], 1e-9)
            log(f"{s} done in {time.monotonic() - t0:.0f} s (host CPU {b.busy[s]:.0f}% busy)")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    except HarnessError as e:
        log(f"harness failed: {e}")
        return 2
    finally:
        b.cleanup()
    head = ["scenario", "conch median", "conch p99", "peer median", "peer p99", "ratio (conch/peer)", "target", "met?"]
    lines = [
        f"conch benchmark — {'SMOKE (tiny sizes; numbers not meaningful)' if args.smoke else 'full run'} — "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"{version}; etcd {b.etcd_version} (single member, loopback, data dir in {tempfile.gettempdir()}); {machine()}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in b.rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r.cells) + " |")
    lines.append("")
    lines += [f"- {n}" for n in b.notes]
    lines.append("- host CPU busy during each scenario (everything on the host, the harness's own load included): "
                 + ", ".join(f"{k} {v:.0f}%" for k, v in b.busy.items()))
    lines.append(f"- wall time of the harness: {time.monotonic() - started:.0f} s")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    if b.failed:
        log(f"harness failed in {', '.join(b.failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
