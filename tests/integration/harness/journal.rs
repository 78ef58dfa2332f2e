//! The journal the fault suite's child program (`conch-testchild`) writes, and the checker
//! that proves the promise from it: no two holders ran at once, revs increase from holder to
//! holder, nothing ran without a fencing token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Path of the test-only child program.
pub fn testchild() -> &'static str {
    env!("CARGO_BIN_EXE_conch-testchild")
}

/// One record: `<boottime-ns> <event> <role> pid=<pid> node=<node> rev=<rev> lease=<l>
/// [tick=<t>] .`, written as `\n<record>\n` (see `record` in tests/support/testchild.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ns: u128,
    pub event: String,
    pub role: String,
    pub pid: i32,
    pub node: String,
    /// `None` when the process ran without `CONCH_REV` (it must not).
    pub rev: Option<i64>,
    pub lease: String,
    /// `CONCH_TICK` of a cron run.
    pub tick: Option<String>,
}

/// The life of one holder's tree, from its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub rev: i64,
    pub node: String,
    pub lease: String,
    pub first_ns: u128,
    /// The last record of any process of the tree: its death is at most one beat later.
    pub last_ns: u128,
    pub pids: Vec<i32>,
}

/// Read and parse a journal; a missing file is an empty journal.
pub fn read(path: &Path) -> Vec<Record> {
    parse_journal(&std::fs::read_to_string(path).unwrap_or_default())
}

/// The records of a journal's text, in file order.
///
/// A write reaches the file page by page, so two kinds of partial record occur, neither of
/// them a bug of the program under test:
/// - the text after the last newline is a record still being written: left for the next read;
/// - a line without the closing ` .` is a record cut for good (its writer was SIGKILLed
///   between two pages). Only its tokens followed by a space are whole; the fields it lacks
///   are its pid's, from that process's whole records. It is the process's last sign of
///   life, so it is kept; one whose pid is cut, or whose process left no whole record, names
///   no holder and is dropped (the process's previous record is at most one beat older).
///
/// A whole record that does not parse panics: that is the writer's bug.
fn parse_journal(text: &str) -> Vec<Record> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop();
    let lines: Vec<&str> = lines.into_iter().filter(|l| !l.is_empty()).collect();
    let whole = |l: &str| {
        l.strip_suffix(" .")
            .map(|body| parse(body).unwrap_or_else(|| panic!("bad journal line {l:?}")))
    };
    let mut by_pid: BTreeMap<i32, Record> = BTreeMap::new();
    for r in lines.iter().filter_map(|l| whole(l)) {
        by_pid.entry(r.pid).or_insert(r);
    }
    lines
        .iter()
        .filter_map(|l| whole(l).or_else(|| salvage(l, &by_pid)))
        .collect()
}

/// A record cut at its end: its whole tokens, the rest from its pid's first whole record.
fn salvage(line: &str, by_pid: &BTreeMap<i32, Record>) -> Option<Record> {
    let mut tokens: Vec<&str> = line.split(' ').collect();
    tokens.pop();
    let ns = tokens.first()?.parse().ok()?;
    let field = |key: &str| {
        tokens
            .iter()
            .skip(3)
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
    };
    let base = by_pid.get(&field("pid")?.parse().ok()?)?;
    Some(Record {
        ns,
        event: tokens.get(1).map_or("cut", |e| e).to_string(),
        ..base.clone()
    })
}

fn parse(line: &str) -> Option<Record> {
    let mut f = line.split_whitespace();
    let ns = f.next()?.parse().ok()?;
    let event = f.next()?.to_string();
    let role = f.next()?.to_string();
    let (mut pid, mut node, mut rev, mut lease, mut tick) = (None, None, None, String::new(), None);
    for kv in f {
        match kv.split_once('=')? {
            ("pid", v) => pid = v.parse().ok(),
            ("node", v) => node = Some(v.to_string()),
            ("rev", v) => rev = Some(v.parse().ok()),
            ("lease", v) => lease = v.to_string(),
            ("tick", v) => tick = Some(v.to_string()),
            _ => {}
        }
    }
    Some(Record {
        ns,
        event,
        role,
        pid: pid?,
        node: node?,
        rev: rev?,
        lease,
        tick,
    })
}

/// Group records into one interval per rev, in order of first record.
pub fn intervals(records: &[Record]) -> Vec<Interval> {
    let mut by_rev: BTreeMap<i64, Interval> = BTreeMap::new();
    for r in records {
        let rev = r
            .rev
            .unwrap_or_else(|| panic!("a process ran without CONCH_REV: {r:?}"));
        let iv = by_rev.entry(rev).or_insert_with(|| Interval {
            rev,
            node: r.node.clone(),
            lease: r.lease.clone(),
            first_ns: r.ns,
            last_ns: r.ns,
            pids: Vec::new(),
        });
        iv.first_ns = iv.first_ns.min(r.ns);
        iv.last_ns = iv.last_ns.max(r.ns);
        if !iv.pids.contains(&r.pid) {
            iv.pids.push(r.pid);
        }
    }
    let mut v: Vec<Interval> = by_rev.into_values().collect();
    v.sort_by_key(|i| i.first_ns);
    v
}

/// What the checker found.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub intervals: Vec<Interval>,
    /// Largest overlap between holders in ms (0 when none).
    pub max_overlap_ms: f64,
    /// At most this many trees alive at once.
    pub max_concurrent: usize,
}

/// Check a journal for at most `slots` concurrent holders (1 for elect) and revs increasing
/// from holder to holder (for `slots == 1`). Panics with the evidence on a violation.
pub fn check(path: &Path, slots: usize) -> Verdict {
    let records = read(path);
    let iv = intervals(&records);
    // Sweep over start/end events: ends sort before starts at the same instant.
    let mut events: Vec<(u128, i32)> = Vec::new();
    for i in &iv {
        events.push((i.first_ns, 1));
        events.push((i.last_ns, -1));
    }
    events.sort();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in &events {
        cur += d;
        max = max.max(cur);
    }
    let mut max_overlap_ns: u128 = 0;
    for (a, w) in iv.iter().enumerate() {
        for b in iv.iter().skip(a + 1) {
            if b.first_ns < w.last_ns {
                max_overlap_ns = max_overlap_ns.max(w.last_ns.min(b.last_ns) - b.first_ns);
            }
        }
    }
    let verdict = Verdict {
        intervals: iv.clone(),
        max_overlap_ms: max_overlap_ns as f64 / 1e6,
        max_concurrent: max.max(0) as usize,
    };
    assert!(
        verdict.max_concurrent <= slots,
        "{} holders ran at once (allowed {slots}); overlap {:.3} ms; intervals: {iv:#?}",
        verdict.max_concurrent,
        verdict.max_overlap_ms
    );
    if slots == 1 {
        for pair in iv.windows(2) {
            assert!(
                pair[1].rev > pair[0].rev,
                "rev did not increase from holder to holder: {pair:#?}"
            );
        }
    }
    verdict
}

/// cron: every tick ran at most once — exactly one direct child started per tick, and every
/// record of a tick carries one rev and one node. Returns tick → (node, rev). Panics with
/// the evidence otherwise.
pub fn check_ticks(path: &Path) -> BTreeMap<String, (String, i64)> {
    let records = read(path);
    let mut starts: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    let mut seen: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for r in &records {
        let tick = r
            .tick
            .clone()
            .unwrap_or_else(|| panic!("a cron run without CONCH_TICK: {r:?}"));
        let rev = r
            .rev
            .unwrap_or_else(|| panic!("a cron run without CONCH_REV: {r:?}"));
        let e = seen.entry(tick.clone()).or_insert((r.node.clone(), rev));
        assert_eq!(
            *e,
            (r.node.clone(), rev),
            "tick {tick} ran on two nodes or under two claims: {r:?} vs {e:?}"
        );
        if r.event == "start" && r.role == "child" {
            starts.entry(tick).or_default().push(r);
        }
    }
    for (tick, s) in &starts {
        assert_eq!(s.len(), 1, "tick {tick} ran {} times: {s:#?}", s.len());
    }
    seen
}

/// Now on `CLOCK_BOOTTIME`, in ms: the journal's clock.
pub fn boot_ms() -> f64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

/// Journal nanoseconds as ms.
pub fn ms(ns: u128) -> f64 {
    ns as f64 / 1e6
}

/// A fresh journal path in `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join("journal")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "conch-journal-test-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("j");
        std::fs::write(
            &p,
            lines
                .iter()
                .map(|l| format!("\n{l} .\n"))
                .collect::<String>(),
        )
        .unwrap();
        p
    }

    #[test]
    fn a_record_still_being_written_waits_for_the_next_read() {
        let text = "\n100 start child pid=1 node=a rev=5 lease=1 .\n\n200 beat child pid=1 node=a rev=5 le";
        let r = parse_journal(text);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ns, 100);
        let done = format!("{text}ase=1 .\n");
        assert_eq!(parse_journal(&done).len(), 2);
    }

    #[test]
    fn a_record_cut_for_good_counts_for_its_pid_and_an_unknown_one_is_dropped() {
        // pid 3's last beat was cut inside `rev=41`: it still belongs to rev 41, and it puts
        // that holder alive after its successor started — an overlap the checker must see.
        let text = [
            "\n100 start child pid=3 node=b rev=41 lease=1 .\n",
            "\n150 start child pid=9 node=c rev=50 lease=2 .\n",
            "\n200 beat child pid=3 node=b rev=4",
            "\n260 beat grandchild pid=",
            "\n300 beat child pid=9 node=c rev=50 lease=2 .\n",
        ]
        .concat();
        let r = parse_journal(&text);
        assert_eq!(r.len(), 4, "{r:#?}");
        assert_eq!((r[2].ns, r[2].rev, r[2].pid), (200, Some(41), 3));
        let iv = intervals(&r);
        assert_eq!((iv[0].rev, iv[0].last_ns), (41, 200));
        let p = write(&[]);
        std::fs::write(&p, &text).unwrap();
        assert!(std::panic::catch_unwind(|| check(&p, 1)).is_err());
    }

    #[test]
    fn disjoint_holders_pass_and_overlap_fails() {
        let ok = write(&[
            "100 start child pid=1 node=a rev=5",
            "200 beat grandchild pid=2 node=a rev=5",
            "300 start child pid=3 node=b rev=9",
            "400 end child pid=3 node=b rev=9",
        ]);
        let v = check(&ok, 1);
        assert_eq!(v.max_concurrent, 1);
        assert_eq!(v.max_overlap_ms, 0.0);
        assert_eq!(v.intervals.len(), 2);

        let bad = write(&[
            "100 start child pid=1 node=a rev=5",
            "2000300 start child pid=3 node=b rev=9",
            "2500000 beat child pid=3 node=b rev=9",
            "3000000 beat grandchild pid=2 node=a rev=5",
        ]);
        let r = std::panic::catch_unwind(|| check(&bad, 1));
        assert!(
            r.is_err(),
            "a grandchild beating after the successor started is an overlap"
        );
        assert_eq!(check(&bad, 2).max_overlap_ms, 0.4997);
    }

    #[test]
    fn revs_must_increase() {
        let p = write(&[
            "100 start child pid=1 node=a rev=9",
            "300 start child pid=3 node=b rev=5",
        ]);
        assert!(std::panic::catch_unwind(|| check(&p, 1)).is_err());
    }

    #[test]
    fn running_without_a_rev_is_caught() {
        let p = write(&["100 start child pid=1 node=a rev=-"]);
        assert!(
            std::panic::catch_unwind(|| read(&p)).is_err()
                || std::panic::catch_unwind(|| check(&p, 1)).is_err()
        );
    }
}
