//! Conch: run ordinary Linux processes under cluster-wide holds kept in etcd v3.
//!
//! # Architecture on one page
//!
//! ```text
//!   cli/        thin outside: argv, env, exit codes (the only place that picks them)
//!    │
//!   recipes/    elect (and later sema, cron): conch's own etcd transactions
//!    │
//!   hold/       the centre: lease grant + renewal on conch's own cadence, the deadline D
//!    │          on CLOCK_BOOTTIME, loss triggers, the run loop that kills before D
//!    │
//!   child/      one command tree: spawn into its own cgroup (or process group), pidfd,
//!   cgroup/     the kill schedule; the Linux-specific supervision lives only here
//!
//!   etcd.rs     connection: endpoints, TLS, auth, deadlines on every call, failover
//!   keys.rs     key schema, names, holder records
//! ```
//!
//! The promise: when a holder is cut off from etcd, its child tree is dead before etcd can
//! expire the holder's lease, so a successor never overlaps it. `docs/design.md` explains
//! the hold loop in prose; `hold::deadline` is the maths.

#![cfg(target_os = "linux")]

pub mod cgroup;
pub mod child;
pub mod cli;
pub mod conchd;
pub mod cron;
pub mod etcd;
#[doc(hidden)]
pub mod fuzzing;
pub mod hold;
pub mod keys;
pub mod recipes;
pub mod status;
