//! Keep an up-to-date view of one key directory (`cron/job/`, `cron/trigger/`): read it
//! whole, then watch it from the next revision, and start over (re-read) whenever the watch
//! ends — etcd restarted, a member failed, the revision was compacted, or the watch went
//! silent. Liveness: a progress request every [`PROGRESS_EVERY`] must be answered.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::etcd::Etcd;

const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// One key under the directory (`name` is the part after the directory).
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub value: Vec<u8>,
    pub create_rev: i64,
    pub mod_rev: i64,
}

#[derive(Debug)]
pub enum DirEvent {
    /// The whole directory, read after (re)connecting: replaces everything known.
    Snapshot(Vec<Entry>),
    Put(Entry),
    Delete(String),
}

/// Run until `cancel`. `watching` is true while a watch is open and answering.
pub async fn watch_dir(
    etcd: Etcd,
    dir: String,
    tx: mpsc::Sender<DirEvent>,
    watching: Option<Arc<AtomicBool>>,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_START;
    let set = |v: bool| {
        if let Some(w) = &watching {
            w.store(v, Relaxed);
        }
    };
    loop {
        set(false);
        match once(&etcd, &dir, &tx, &set, &cancel, &mut backoff).await {
            Ok(()) => return,
            Err(why) => tracing::warn!(dir = %dir, why = %why, "watch ended; reading again"),
        }
        set(false);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// One read-then-watch; `Ok` only on cancel (or when the receiver is gone).
async fn once(
    etcd: &Etcd,
    dir: &str,
    tx: &mpsc::Sender<DirEvent>,
    set: &impl Fn(bool),
    cancel: &CancellationToken,
    backoff: &mut Duration,
) -> Result<(), String> {
    let entry = |kv: &etcd_client::KeyValue| Entry {
        name: String::from_utf8_lossy(&kv.key()[dir.len().min(kv.key().len())..]).into_owned(),
        value: kv.value().to_vec(),
        create_rev: kv.create_revision(),
        mod_rev: kv.mod_revision(),
    };
    let d = dir.to_string();
    let r = etcd
        .retry("read directory", |mut c| {
            let d = d.clone();
            async move { c.get(d, Some(GetOptions::new().with_prefix())).await }
        })
        .await
        .map_err(|e| e.to_string())?;
    let rev = r.header().map_or(0, |h| h.revision());
    if tx
        .send(DirEvent::Snapshot(r.kvs().iter().map(entry).collect()))
        .await
        .is_err()
    {
        return Ok(());
    }
    let (idx, mut client) = etcd.client();
    let d = dir.to_string();
    let opened = etcd
        .bounded("watch directory", async move {
            client
                .watch(
                    d,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1)
                            .with_progress_notify(),
                    ),
                )
                .await
        })
        .await;
    let mut stream = match opened {
        Ok(w) => w,
        Err(e) => {
            etcd.rotate(idx);
            return Err(e.to_string());
        }
    };
    set(true);
    *backoff = BACKOFF_START;
    let mut asked: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if let Some(at) = asked {
                    if at.elapsed() > PROGRESS_EVERY {
                        etcd.rotate(idx);
                        return Err("etcd did not answer a progress request".into());
                    }
                } else {
                    asked = Some(tokio::time::Instant::now());
                    if stream.request_progress().await.is_err() {
                        return Err("cannot ask for progress".into());
                    }
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    asked = None;
                    if resp.canceled() {
                        return Err(format!("watch canceled ({})", resp.cancel_reason()));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let e = match ev.event_type() {
                            EventType::Put => DirEvent::Put(entry(kv)),
                            EventType::Delete => DirEvent::Delete(entry(kv).name),
                        };
                        if tx.send(e).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Ok(None) => return Err("watch stream ended".into()),
                Err(e) => {
                    etcd.rotate(idx);
                    return Err(e.to_string());
                }
            },
        }
    }
}
