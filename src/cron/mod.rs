//! Distributed cron: schedules, job specs, the records conchd writes, and the transactions
//! that decide each tick exactly once.

pub mod job;
pub mod record;
pub mod schedule;
pub mod sign;
pub mod store;
