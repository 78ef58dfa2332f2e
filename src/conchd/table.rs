//! The job table: which tick of which job is due next. Pure (no I/O, no clock of its own):
//! conchd feeds it jobs and the time, and it hands back due ticks in order.
//!
//! A job's first tick is the first one after `max(added_at, now − starting_deadline)`: a
//! job never runs for a tick before it was added, and a (re)started conchd never considers a
//! tick that is past its starting deadline (those are the lookback's business). Ticks come
//! from the schedule only, never from the current time.

#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use crate::cron::job::Job;
use crate::keys::Name;

/// Most ticks of one job handed out by one [`Table::pop_due`] when conchd fell behind (a
/// suspended host, a stalled runtime): older ones are skipped with a warning; each handed-out
/// tick that is past its starting deadline is recorded as missed.
pub const MAX_BACKLOG: usize = 100;

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Wake {
    at_ms: i64,
    generation: u64,
    name: Name,
}

#[derive(Debug)]
struct Entry {
    job: Arc<Job>,
    generation: u64,
    /// The next tick to hand out (`None`: the schedule has no more ticks).
    tick: Option<i64>,
    /// The last tick handed out, if any.
    last_done: Option<i64>,
}

/// How an upsert changed the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    New,
    Changed,
    /// Same spec revision as before: nothing to do.
    Same,
}

#[derive(Debug, Default)]
pub struct Table {
    entries: HashMap<Name, Entry>,
    heap: BinaryHeap<Reverse<Wake>>,
    generation: u64,
}

/// A due tick: run (or record) `tick` of `job`.
#[derive(Debug, Clone)]
pub struct Due {
    pub job: Arc<Job>,
    pub tick: i64,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &Name) -> Option<&Arc<Job>> {
        self.entries.get(name).map(|e| &e.job)
    }

    /// The next tick this node will consider for `name`.
    pub fn next_tick(&self, name: &Name) -> Option<i64> {
        self.entries.get(name).and_then(|e| e.tick)
    }

    pub fn names(&self) -> impl Iterator<Item = &Name> {
        self.entries.keys()
    }

    /// Add or replace a job. An edited job keeps its place: no tick it already handed out
    /// comes again.
    pub fn upsert(&mut self, job: Job, now_ms: i64) -> Upserted {
        let prev = self.entries.get(&job.name);
        if prev.is_some_and(|p| p.job.mod_rev == job.mod_rev) {
            return Upserted::Same;
        }
        let how = if prev.is_some() {
            Upserted::Changed
        } else {
            Upserted::New
        };
        let last_done = prev.and_then(|p| p.last_done);
        let earliest_claimable =
            now_ms.div_euclid(1000) - job.starting_deadline.as_secs() as i64 - 1;
        let floor = job
            .added_at
            .max(earliest_claimable)
            .max(last_done.unwrap_or(i64::MIN));
        let tick = job.schedule.next_after(floor);
        self.generation += 1;
        let generation = self.generation;
        let job = Arc::new(job);
        if let Some(t) = tick {
            self.push(&job, t, generation);
        }
        self.entries.insert(
            job.name.clone(),
            Entry {
                job,
                generation,
                tick,
                last_done,
            },
        );
        how
    }

    pub fn remove(&mut self, name: &Name) -> Option<Arc<Job>> {
        // Its heap entries go stale (generation no longer matches) and are dropped lazily.
        self.entries.remove(name).map(|e| e.job)
    }

    fn push(&mut self, job: &Job, tick: i64, generation: u64) {
        let at_ms = tick * 1000 + job.jitter_offset().as_millis() as i64;
        self.heap.push(Reverse(Wake {
            at_ms,
            generation,
            name: job.name.clone(),
        }));
    }

    /// When the next tick is due (wall-clock ms), if any.
    pub fn next_wake_ms(&mut self) -> Option<i64> {
        while let Some(Reverse(w)) = self.heap.peek() {
            if self
                .entries
                .get(&w.name)
                .is_some_and(|e| e.generation == w.generation)
            {
                return Some(w.at_ms);
            }
            self.heap.pop();
        }
        None
    }

    /// Every tick due at `now_ms`, oldest first; each job moves on to its next tick.
    pub fn pop_due(&mut self, now_ms: i64) -> Vec<Due> {
        let mut out = vec![];
        // Ticks handed out per job in this call (for the backlog bound).
        let mut handed: HashMap<Name, usize> = HashMap::new();
        while let Some(at) = self.next_wake_ms() {
            if at > now_ms {
                break;
            }
            let Some(Reverse(w)) = self.heap.pop() else {
                break;
            };
            let Some(e) = self.entries.get_mut(&w.name) else {
                continue;
            };
            let Some(tick) = e.tick else { continue };
            let job = e.job.clone();
            out.push(Due {
                job: job.clone(),
                tick,
            });
            e.last_done = Some(tick);
            let mut next = job.schedule.next_after(tick);
            // Fell far behind: hand out at most MAX_BACKLOG of this job's past ticks.
            let behind = {
                let n = handed.entry(job.name.clone()).or_insert(0);
                *n += 1;
                *n
            };
            if behind >= MAX_BACKLOG
                && next.is_some_and(|n| n * 1000 + job.jitter_offset().as_millis() as i64 <= now_ms)
            {
                let earliest = now_ms.div_euclid(1000) - job.starting_deadline.as_secs() as i64 - 1;
                tracing::warn!(name = %job.name, "conchd fell behind; skipping older ticks of this job");
                next = job.schedule.next_after(earliest.max(tick));
            }
            e.tick = next;
            let generation = e.generation;
            if let Some(n) = next {
                self.push(&job, n, generation);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cron::job::{JobSpec, Overlap};

    fn job(name: &str, schedule: &str, added_at: &str, rev: i64) -> Job {
        JobSpec {
            schedule: schedule.into(),
            tz: "UTC".into(),
            cmd: vec!["true".into()],
            run_ttl: "10m".into(),
            overlap: Overlap::Allow,
            starting_deadline: "10s".into(),
            node_selector: Default::default(),
            jitter: "0s".into(),
            paused: false,
            added_by: "t".into(),
            added_at: added_at.into(),
            resumed_at: None,
            signature: None,
        }
        .validate(&Name::parse(name).unwrap(), 1_700_000_000, rev)
        .unwrap()
    }

    // 2026-11-28T10:00:00Z
    const T0: i64 = 1_795_860_000;

    #[test]
    fn first_tick_is_after_the_add_and_within_the_starting_deadline() {
        let mut t = Table::new();
        // Added long ago; conchd starts at T0+0.5s: the first tick considered is the first
        // one after T0-11 (starting deadline 10s), i.e. T0-10, already due.
        let j = job("a", "@every 5s", "2026-01-01T00:00:00Z", 1);
        assert_eq!(t.upsert(j, T0 * 1000 + 500), Upserted::New);
        let due: Vec<i64> = t.pop_due(T0 * 1000 + 500).iter().map(|d| d.tick).collect();
        assert_eq!(due, vec![T0 - 10, T0 - 5, T0]);
        assert_eq!(t.next_wake_ms(), Some((T0 + 5) * 1000));
        // Added at T0: nothing before it.
        let mut t = Table::new();
        t.upsert(
            job("b", "@every 5s", "2026-11-28T10:00:00Z", 1),
            T0 * 1000 + 500,
        );
        assert!(t.pop_due(T0 * 1000 + 500).is_empty());
        assert_eq!(t.next_tick(&Name::parse("b").unwrap()), Some(T0 + 5));
    }

    #[test]
    fn an_edit_never_hands_out_a_tick_twice_and_removal_stops_it() {
        let mut t = Table::new();
        t.upsert(job("a", "@every 5s", "2026-11-28T10:00:00Z", 1), T0 * 1000);
        assert_eq!(t.pop_due((T0 + 5) * 1000).len(), 1);
        assert_eq!(
            t.upsert(
                job("a", "@every 5s", "2026-11-28T10:00:00Z", 1),
                (T0 + 5) * 1000
            ),
            Upserted::Same
        );
        assert_eq!(
            t.upsert(
                job("a", "@every 5s", "2026-11-28T10:00:00Z", 2),
                (T0 + 5) * 1000
            ),
            Upserted::Changed
        );
        assert!(t.pop_due((T0 + 5) * 1000 + 999).is_empty());
        let due = t.pop_due((T0 + 10) * 1000);
        assert_eq!(
            due.iter().map(|d| d.tick).collect::<Vec<_>>(),
            vec![T0 + 10]
        );
        assert_eq!(due[0].job.mod_rev, 2);
        t.remove(&Name::parse("a").unwrap());
        assert_eq!(t.next_wake_ms(), None);
        assert!(t.pop_due((T0 + 100) * 1000).is_empty());
    }

    #[test]
    fn many_jobs_come_out_in_time_order() {
        let mut t = Table::new();
        t.upsert(
            job("slow", "@every 10s", "2026-11-28T10:00:00Z", 1),
            T0 * 1000,
        );
        t.upsert(
            job("fast", "@every 3s", "2026-11-28T10:00:00Z", 1),
            T0 * 1000,
        );
        let due: Vec<(String, i64)> = t
            .pop_due((T0 + 10) * 1000)
            .iter()
            .map(|d| (d.job.name.to_string(), d.tick - T0))
            .collect();
        assert_eq!(
            due,
            vec![
                ("fast".into(), 3),
                ("fast".into(), 6),
                ("fast".into(), 9),
                ("slow".into(), 10)
            ]
        );
    }

    #[test]
    fn a_long_stall_hands_out_a_bounded_backlog() {
        let mut t = Table::new();
        t.upsert(job("a", "@every 1s", "2026-11-28T10:00:00Z", 1), T0 * 1000);
        let due = t.pop_due((T0 + 3600) * 1000);
        assert!(due.len() <= MAX_BACKLOG + 12, "{}", due.len());
        assert_eq!(due.last().unwrap().tick, T0 + 3600);
        let ticks: Vec<i64> = due.iter().map(|d| d.tick).collect();
        assert!(ticks.windows(2).all(|w| w[0] < w[1]));
    }
}
