//! The recipes: conch's own transactions for each primitive, on top of the hold loop.
//!
//! etcd's server-side Lock and Election services are not used (holds.md §1): their recipes
//! have known holes, and they cannot do a non-blocking try.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod elect;
pub mod query;
