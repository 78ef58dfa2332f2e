//! Job output: each run's stdout and stderr go into one pipe, and conchd copies every line
//! to its own stderr prefixed with the job name (`backup: dumping 3 tables`). Output is never
//! stored in etcd.

#![forbid(unsafe_code)]

use std::io::Write;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Longest line copied as one; longer lines are split (a job printing without newlines must
/// not make conchd buffer without bound).
const MAX_LINE: usize = 16 * 1024;

/// Make a pipe for a job's output: (read end for [`pump`], write end for the child).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Copy lines from `read` to stderr until every writer has closed the pipe (the whole tree
/// is gone). With `json`, each line is a tracing event instead, so stderr stays valid JSON.
pub async fn pump(read: OwnedFd, name: String, json: bool) {
    let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(read) else {
        return;
    };
    let mut reader = BufReader::with_capacity(MAX_LINE, rx);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        let line = String::from_utf8_lossy(&buf);
        if json {
            tracing::info!(name = %name, line = %line, "job-output");
        } else {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{name}: {line}");
        }
    }
}

use tokio::io::AsyncReadExt as _;
