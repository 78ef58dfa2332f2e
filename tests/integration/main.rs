//! Conch's integration tests: the real binary against a real etcd, with real children,
//! signals and cgroups. One test binary (`cargo test --test integration`); the harness
//! starts one etcd for all of it. `CONCH_TEST_ETCD_SUITE=bookworm` runs the same tests
//! against Debian bookworm's etcd 3.4.

mod harness;

mod bad_input;
mod cron;
mod cron_faults;
mod cron_signed;
mod cron_status;
mod deploy;
mod elect;
mod elect_child;
mod elect_query;
mod faults;
mod harness_self;
mod sema;
mod soak;
mod tls;
