//! Micro-benchmarks of conch's hot pure functions: the deadline tracker (every renewal), the
//! semaphore ranking (every `--who`, status read), schedule → next tick (every tick of every
//! job), and conchd's job table (every due tick).
//!
//! `cargo bench --bench micro` measures (median of several batches, ns per call). Under
//! `cargo test --all-targets` (no `--bench` argument) each runs a few iterations as a smoke
//! test, so the benchmarks keep compiling and working without slowing the suite.

use std::hint::black_box;
use std::time::{Duration, Instant};

use conch::conchd::table::Table;
use conch::cron::job::{JobSpec, Overlap};
use conch::cron::schedule::Schedule;
use conch::hold::clock::BootInstant;
use conch::hold::deadline::Deadline;
use conch::keys::{HolderRecord, Name};
use conch::recipes::sema_query::{Participant, mark_holders};

/// Run `f` `iters` times per batch over `batches` batches; print the median ns per call.
fn bench(name: &str, measure: bool, iters: u32, mut f: impl FnMut(u32)) {
    let (batches, iters) = if measure { (11, iters) } else { (1, 3) };
    let mut per_call: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for i in 0..iters {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    if measure {
        println!("{name:<48} {:>12.1} ns/call", per_call[per_call.len() / 2]);
    }
}

fn spec(schedule: &str) -> JobSpec {
    JobSpec {
        schedule: schedule.into(),
        tz: "Europe/Berlin".into(),
        cmd: vec!["true".into()],
        run_ttl: "10m".into(),
        overlap: Overlap::Allow,
        starting_deadline: "1m".into(),
        node_selector: Default::default(),
        jitter: "10s".into(),
        paused: false,
        added_by: "bench".into(),
        added_at: "2026-01-01T00:00:00Z".into(),
        resumed_at: None,
        signature: None,
    }
}

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    const T0: i64 = 1_795_860_000; // 2026-11-28T10:00:00Z

    // Deadline tracker: one renewal answer applied.
    let start = BootInstant::from_boot(Duration::from_secs(1000));
    let mut d = Deadline::granted(start, Duration::from_secs(10));
    bench("deadline: apply a renewal", measure, 1_000_000, |i| {
        let sent = start + Duration::from_millis(u64::from(i % 5000));
        black_box(d.renewed(sent, sent + Duration::from_millis(2), 10));
    });

    // Semaphore ranking: 1000 participants, max 10, with and without --spread.
    let mut parts: Vec<Participant> = (0..1000)
        .map(|i| Participant {
            rev: i,
            record: Some(HolderRecord {
                node: format!("n{}", i % 50),
                pid: 1,
                started: "2026-11-28T10:00:00Z".into(),
                cmd: None,
                lease: "0".into(),
                containment: "cgroup".into(),
            }),
            held: false,
        })
        .collect();
    bench(
        "sema ranking: 1000 participants, max 10",
        measure,
        2_000,
        |_| {
            mark_holders(10, false, black_box(&mut parts));
        },
    );
    bench(
        "sema ranking: 1000 participants, max 10, spread",
        measure,
        200,
        |_| {
            mark_holders(10, true, black_box(&mut parts));
        },
    );

    // Schedule → next tick.
    for expr in ["@every 1m", "*/5 * * * *", "30 2 * * 1-5", "0 0 29 2 *"] {
        let s = Schedule::parse(expr, "Europe/Berlin").expect("valid");
        bench(
            &format!("next tick: {expr:?} in Europe/Berlin"),
            measure,
            20_000,
            |i| {
                black_box(s.next_after(T0 + i64::from(i) * 61));
            },
        );
    }

    // conchd's job table: 10,000 jobs @every 1m, one minute of due ticks popped.
    let jobs: Vec<_> = (0..10_000)
        .map(|i| {
            spec("@every 1m")
                .validate(&Name::parse(&format!("job{i:05}")).expect("name"), T0, 1)
                .expect("valid")
        })
        .collect();
    let t = Instant::now();
    let mut table = Table::new();
    for j in jobs {
        table.upsert(j, T0 * 1000);
    }
    if measure {
        println!(
            "{:<48} {:>12.1} ms",
            "job table: load 10,000 jobs",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    let mut minute = 1;
    bench(
        "job table: pop one minute of 10,000 due ticks",
        measure,
        3,
        |_| {
            let due = table.pop_due((T0 + 60 * minute + 15) * 1000);
            black_box(due.len());
            minute += 1;
        },
    );
}
