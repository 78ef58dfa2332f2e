//! `conch version`: version, commit, and the containment mode this host would get (and why).

use super::{GlobalArgs, exit};
use crate::child::Containment;

pub fn run(g: &GlobalArgs) -> u8 {
    println!(
        "conch {} (commit {})",
        env!("CARGO_PKG_VERSION"),
        env!("CONCH_COMMIT")
    );
    match Containment::probe(g.containment_request(), g.cgroup_root.clone()) {
        Ok(c) => {
            let root = c
                .cgroup_root
                .as_ref()
                .map(|p| format!(" under {}", p.display()))
                .unwrap_or_default();
            println!("containment: {}{root} ({})", c.mode.as_str(), c.reason);
        }
        Err(e) => println!("containment: unavailable ({e})"),
    }
    exit::OK
}
