# conch: the same commands are spelled out in the README for people without `just`.

# Build the conch binary (target/debug/conch; `just release` for the optimised one).
build:
    scripts/ensure-deps.sh
    cargo build

release:
    scripts/ensure-deps.sh
    cargo build --release

# Run the whole test suite (unit + integration against real etcd, real cgroups).
test:
    scripts/test.sh

# Watch a leader election hand over between two wrapped processes on a throw-away etcd.
demo:
    scripts/demo.sh

# Fetch etcd (server + etcdctl) from Debian's packages into .cache/etcd/.
fetch-etcd:
    scripts/fetch-etcd.sh

# Chaos test: three hosts as network namespaces, etcd + conch on each, faults a-f (needs root).
chaos:
    bash test-cluster-chaos.sh

# Benchmarks B1-B9 (quality.md §3) side by side with etcdctl / flock / etcd's own write latency;
# prints one markdown table. `just bench --smoke`, `just bench --only B1,B7`, `just bench --rounds 3`.
bench *ARGS:
    scripts/ensure-deps.sh
    cargo build --release --bins
    scripts/bench.py {{ARGS}}
