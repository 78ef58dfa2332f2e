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

# Fuzz one decoder of untrusted bytes for 5 minutes (needs `cargo install cargo-fuzz` and a
# nightly toolchain): names_and_keys, holder_record, job_spec or schedule. Starts from the
# hand-written seeds in fuzz/corpus/TARGET/ (left untouched); what the fuzzer grows goes to
# fuzz/target/corpus/TARGET/, a failing input to fuzz/artifacts/TARGET/: add that to the seeds
# once fixed (`cargo test` runs them). No sanitizer: the code under test is safe Rust, and the
# fuzzer runs about twice as fast without one.
fuzz TARGET SECS="300":
    mkdir -p fuzz/target/corpus/{{TARGET}}
    cd fuzz && cargo +nightly fuzz run --sanitizer none {{TARGET}} target/corpus/{{TARGET}} corpus/{{TARGET}} -- -max_total_time={{SECS}} -timeout=10 -rss_limit_mb=2048
