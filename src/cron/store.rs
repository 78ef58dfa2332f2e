//! Cron's etcd transactions: the only code that reads or writes `cron/` keys.
//!
//! The one rule everything here keeps: a tick is decided by creating its fire key, which
//! happens at most once (put-if-absent) and carries no lease. Running it, recording it
//! missed, recording it skipped and taking a manual trigger are each that one creation, in
//! one transaction with whatever else must change with it. Every call is bounded by the
//! request timeout; only calls that are safe to repeat go through [`Etcd::retry`].

#![forbid(unsafe_code)]

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse,
};

use super::job::{JobSpec, Overlap};
use super::record::{Decision, FireRecord, NodeRecord, ResultRecord};
use crate::etcd::{CallError, Etcd};
use crate::keys::{Name, Prefix, parse_tick_key, prefix_end};

/// A job spec as found in etcd, valid or not.
#[derive(Debug, Clone)]
pub struct StoredJob {
    /// The key's last segment (not necessarily a valid name: foreign keys are shown, not run).
    pub key_name: String,
    pub raw: Vec<u8>,
    pub mod_rev: i64,
}

impl StoredJob {
    pub fn name(&self) -> Option<Name> {
        Name::parse(&self.key_name).ok()
    }
}

/// How a claim of a tick came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node runs the tick; `rev` is the fire key's create revision (`CONCH_REV`).
    Won { rev: i64 },
    /// Recorded as skipped by this node (overlap=forbid and a run still going).
    Skipped,
    /// An earlier attempt of this node's claim committed under the lease conchd held then
    /// (since lost); nobody else can run the tick.
    WonUnderOldLease { rev: i64 },
    /// Someone else decided the tick (`existed`, with their record if readable); or, for a
    /// manual run, the trigger was gone (`!existed`).
    Taken {
        existed: bool,
        winner: Option<FireRecord>,
    },
}

/// Cron's keys under one prefix.
#[derive(Debug, Clone)]
pub struct Store {
    pub etcd: Etcd,
    pub prefix: Prefix,
}

fn kv_rev(r: &etcd_client::GetResponse) -> i64 {
    r.header().map_or(0, |h| h.revision())
}

impl Store {
    pub fn new(etcd: Etcd, prefix: Prefix) -> Store {
        Store { etcd, prefix }
    }

    /// Create or replace a job (`cron add`). A put of the same value is safe to repeat.
    pub async fn put_job(&self, name: &Name, spec: &JobSpec) -> Result<(), CallError> {
        let key = self.prefix.cron_job(name);
        let value = spec.to_json();
        self.etcd
            .retry("put job", |mut c| {
                let (k, v) = (key.clone(), value.clone());
                async move { c.put(k, v, None).await }
            })
            .await?;
        Ok(())
    }

    /// One job's stored spec.
    pub async fn job(&self, name: &Name) -> Result<Option<StoredJob>, CallError> {
        let key = self.prefix.cron_job(name);
        let r = self
            .etcd
            .retry("get job", |mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(r.kvs().first().map(|kv| StoredJob {
            key_name: name.to_string(),
            raw: kv.value().to_vec(),
            mod_rev: kv.mod_revision(),
        }))
    }

    /// Every stored job, by name, and the revision they were read at.
    pub async fn jobs(&self) -> Result<(Vec<StoredJob>, i64), CallError> {
        let dir = self.prefix.cron_jobs();
        let r = self
            .etcd
            .retry("list jobs", |mut c| {
                let d = dir.clone();
                async move { c.get(d, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let jobs = r
            .kvs()
            .iter()
            .map(|kv| StoredJob {
                key_name: String::from_utf8_lossy(&kv.key()[dir.len()..]).into_owned(),
                raw: kv.value().to_vec(),
                mod_rev: kv.mod_revision(),
            })
            .collect();
        Ok((jobs, kv_rev(&r)))
    }

    /// Rewrite a job's spec through `edit` only if it did not change since it was read
    /// (`pause`, `resume`). `Ok(None)`: no such job. Errors on a value that is not a job spec.
    pub async fn update_job(
        &self,
        name: &Name,
        edit: impl Fn(&mut JobSpec),
    ) -> Result<Option<JobSpec>, UpdateError> {
        let key = self.prefix.cron_job(name);
        loop {
            let Some(stored) = self.job(name).await? else {
                return Ok(None);
            };
            let mut spec = JobSpec::decode(&stored.raw).map_err(UpdateError::Foreign)?;
            edit(&mut spec);
            let value = spec.to_json();
            let r = self
                .etcd
                .retry("update job", |mut c| {
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            stored.mod_rev,
                        )])
                        .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
                    async move { c.txn(txn).await }
                })
                .await?;
            if r.succeeded() {
                return Ok(Some(spec));
            }
            // Changed under us (another add/pause): read again and re-apply.
        }
    }

    /// Delete a job with its pending triggers and its history, in one transaction. A run in
    /// flight finishes (its conchd writes a last result and then clears it). `false`: no job.
    pub async fn remove_job(&self, name: &Name) -> Result<bool, CallError> {
        let job = self.prefix.cron_job(name);
        let dirs = [
            format!("{}{}/", self.prefix.cron_triggers(), name),
            self.prefix.cron_fire_dir(name),
            self.prefix.cron_result_dir(name),
        ];
        let r =
            self.etcd
                .retry("remove job", |mut c| {
                    let mut ops = vec![TxnOp::delete(job.clone(), None)];
                    ops.extend(dirs.iter().map(|d| {
                        TxnOp::delete(d.clone(), Some(DeleteOptions::new().with_prefix()))
                    }));
                    let txn = Txn::new().and_then(ops);
                    async move { c.txn(txn).await }
                })
                .await?;
        Ok(matches!(r.op_responses().first(), Some(TxnOpResponse::Delete(d)) if d.deleted() > 0))
    }

    /// Delete one job's ticks and results (after its last run finished once it was removed).
    pub async fn clear_history(&self, name: &Name) -> Result<(), CallError> {
        let dirs = [
            self.prefix.cron_fire_dir(name),
            self.prefix.cron_result_dir(name),
        ];
        self.etcd
            .retry("clear history", |mut c| {
                let ops: Vec<TxnOp> = dirs
                    .iter()
                    .map(|d| TxnOp::delete(d.clone(), Some(DeleteOptions::new().with_prefix())))
                    .collect();
                async move { c.txn(Txn::new().and_then(ops)).await }
            })
            .await?;
        Ok(())
    }

    /// The newest `limit` keys of a tick directory, newest first: (tick, value, create rev).
    /// Keys that are not ticks (another tool's) are skipped without taking a tick's place.
    async fn newest(
        &self,
        what: &'static str,
        dir: String,
        limit: i64,
        keys_only: bool,
    ) -> Result<Vec<(i64, Vec<u8>, i64)>, CallError> {
        let mut end = prefix_end(&dir);
        let mut out = Vec::new();
        loop {
            let r = self
                .etcd
                .retry(what, |mut c| {
                    let mut opts = GetOptions::new()
                        .with_range(end.clone())
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(limit);
                    if keys_only {
                        opts = opts.with_keys_only();
                    }
                    let d = dir.clone();
                    async move { c.get(d, Some(opts)).await }
                })
                .await?;
            out.extend(r.kvs().iter().filter_map(|kv| {
                let tick = parse_tick_key(std::str::from_utf8(&kv.key()[dir.len()..]).ok()?)?;
                Some((tick, kv.value().to_vec(), kv.create_revision()))
            }));
            // Foreign keys took part of the page: read on below the lowest key seen.
            match r.kvs().last() {
                Some(kv) if r.more() && (out.len() as i64) < limit => end = kv.key().to_vec(),
                _ => break,
            }
        }
        out.truncate(limit.max(0) as usize);
        Ok(out)
    }

    /// A job's newest results, newest first. Unreadable values come back as `None`.
    pub async fn results(
        &self,
        name: &Name,
        limit: i64,
    ) -> Result<Vec<(i64, Option<ResultRecord>)>, CallError> {
        let dir = self.prefix.cron_result_dir(name);
        Ok(self
            .newest("read results", dir, limit, false)
            .await?
            .into_iter()
            .map(|(t, v, _)| (t, ResultRecord::parse(&v)))
            .collect())
    }

    /// A job's newest claims, newest first: (tick, record, create revision).
    pub async fn fires(
        &self,
        name: &Name,
        limit: i64,
    ) -> Result<Vec<(i64, Option<FireRecord>, i64)>, CallError> {
        let dir = self.prefix.cron_fire_dir(name);
        Ok(self
            .newest("read claims", dir, limit, false)
            .await?
            .into_iter()
            .map(|(t, v, rev)| (t, FireRecord::parse(&v), rev))
            .collect())
    }

    /// The newest claimed tick of job `name` older than `before` (`None`: none). A lookback
    /// reads this rather than the newest claim, which may be one its own conchd just made.
    pub async fn newest_fire_before(
        &self,
        name: &Name,
        before: i64,
    ) -> Result<Option<i64>, CallError> {
        let dir = self.prefix.cron_fire_dir(name);
        let end = format!("{dir}{}", crate::keys::tick_key(before));
        let r = self
            .etcd
            .retry("read claims", |mut c| {
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_keys_only()
                    .with_limit(16);
                let d = dir.clone();
                async move { c.get(d, Some(opts)).await }
            })
            .await?;
        // Newest first; a key that is not a tick (another tool's) is passed over.
        Ok(r.kvs()
            .iter()
            .find_map(|kv| parse_tick_key(std::str::from_utf8(&kv.key()[dir.len()..]).ok()?)))
    }

    /// Decide `tick` of job `name` for this node: put-if-absent on the fire key (and for
    /// overlap=forbid, the `running` key on `lease` if no run is going, else record the tick
    /// skipped), in one transaction. With `trigger = Some((key, create_rev))` the trigger must
    /// still exist and is deleted in the same transaction (a manual run).
    ///
    /// Safe to repeat: if an earlier attempt committed but its answer was lost, the fire
    /// key's record names this node and lease, and the claim is recognised as ours.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        name: &Name,
        tick: i64,
        overlap: Overlap,
        fire: &FireRecord,
        running_value: &str,
        lease: i64,
        skipped: &ResultRecord,
        trigger: Option<(&str, i64)>,
    ) -> Result<Claim, CallError> {
        let fire_key = self.prefix.cron_fire(name, tick);
        let running = self.prefix.cron_running(name);
        let result_key = self.prefix.cron_result(name, tick);
        let run_value = fire.to_json();
        let skip_value = FireRecord {
            decision: Decision::Skipped,
            ..fire.clone()
        }
        .to_json();
        let skipped = skipped.to_json();
        let r = self
            .etcd
            .retry("claim tick", |mut c| {
                let mut when = vec![Compare::create_revision(
                    fire_key.clone(),
                    CompareOp::Equal,
                    0,
                )];
                let mut trig_ops = vec![];
                if let Some((k, rev)) = trigger {
                    when.push(Compare::create_revision(k, CompareOp::Equal, rev));
                    trig_ops.push(TxnOp::delete(k, None));
                }
                let run_ops = |extra: Vec<TxnOp>| {
                    let mut ops = vec![TxnOp::put(fire_key.clone(), run_value.clone(), None)];
                    ops.extend(extra);
                    ops.extend(trig_ops.clone());
                    ops
                };
                let then = match overlap {
                    Overlap::Allow => run_ops(vec![]),
                    Overlap::Forbid => {
                        let mut skip_ops = vec![
                            TxnOp::put(fire_key.clone(), skip_value.clone(), None),
                            TxnOp::put(result_key.clone(), skipped.clone(), None),
                        ];
                        skip_ops.extend(trig_ops.clone());
                        vec![TxnOp::txn(
                            Txn::new()
                                .when([Compare::create_revision(
                                    running.clone(),
                                    CompareOp::Equal,
                                    0,
                                )])
                                .and_then(run_ops(vec![TxnOp::put(
                                    running.clone(),
                                    running_value,
                                    Some(PutOptions::new().with_lease(lease)),
                                )]))
                                .or_else(skip_ops),
                        )]
                    }
                };
                let txn = Txn::new()
                    .when(when)
                    .and_then(then)
                    .or_else([TxnOp::get(fire_key.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        let rev = r.header().map_or(0, |h| h.revision());
        if r.succeeded() {
            return Ok(match r.op_responses().first() {
                Some(TxnOpResponse::Txn(inner)) if !inner.succeeded() => Claim::Skipped,
                _ => Claim::Won { rev },
            });
        }
        let existing = match r.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| {
                (
                    FireRecord::parse(kv.value()),
                    kv.create_revision(),
                    kv.value().to_vec(),
                )
            }),
            _ => None,
        };
        match existing {
            // Our own earlier attempt committed (its answer was lost): it is ours — under
            // this lease, or under the one conchd held when that attempt was sent.
            Some((Some(rec), rev, _)) if rec.node == fire.node && rec.claimed == fire.claimed => {
                Ok(match rec.decision {
                    Decision::Run if rec.lease == fire.lease => Claim::Won { rev },
                    Decision::Run => Claim::WonUnderOldLease { rev },
                    Decision::Skipped => Claim::Skipped,
                    Decision::Missed => Claim::Taken {
                        existed: true,
                        winner: Some(rec),
                    },
                })
            }
            Some((winner, _, _)) => Ok(Claim::Taken {
                existed: true,
                winner,
            }),
            // The fire key is absent: the trigger was gone (taken by another node or withdrawn).
            None => Ok(Claim::Taken {
                existed: false,
                winner: None,
            }),
        }
    }

    /// Record `tick` as missed (or anything else decided without a run) if nobody decided it:
    /// put-if-absent on the fire key together with the result. `true` if this call recorded it.
    pub async fn record_unrun(
        &self,
        name: &Name,
        tick: i64,
        fire: &FireRecord,
        result: &ResultRecord,
    ) -> Result<bool, CallError> {
        let fire_key = self.prefix.cron_fire(name, tick);
        let result_key = self.prefix.cron_result(name, tick);
        let (fv, rv) = (fire.to_json(), result.to_json());
        let r = self
            .etcd
            .retry("record tick", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        fire_key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([
                        TxnOp::put(fire_key.clone(), fv.clone(), None),
                        TxnOp::put(result_key.clone(), rv.clone(), None),
                    ]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }

    /// Write a run's result (a plain put: safe to repeat until it lands).
    pub async fn write_result(
        &self,
        name: &Name,
        tick: i64,
        result: &ResultRecord,
    ) -> Result<(), CallError> {
        let key = self.prefix.cron_result(name, tick);
        let value = result.to_json();
        self.etcd
            .retry("write result", |mut c| {
                let (k, v) = (key.clone(), value.clone());
                async move { c.put(k, v, None).await }
            })
            .await?;
        Ok(())
    }

    /// Delete the `running` key if it is still the one this run created (at `rev`).
    pub async fn release_running(&self, name: &Name, rev: i64) -> Result<(), CallError> {
        let key = self.prefix.cron_running(name);
        self.etcd
            .retry("release running", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(key.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(())
    }

    /// Retention: delete a job's claims and results older than the newest `keep` results and
    /// older than `min_tick`, with two range deletes. Never touches a tick at or after
    /// `floor` (ticks that may still be claimed must keep their fire key).
    pub async fn prune(
        &self,
        name: &Name,
        keep: i64,
        min_tick: i64,
        floor: i64,
    ) -> Result<(), CallError> {
        let newest = self
            .newest(
                "read results",
                self.prefix.cron_result_dir(name),
                keep + 1,
                true,
            )
            .await?;
        // Everything older than the (keep+1)-th newest result goes, and everything older than
        // min_tick; never anything from floor on.
        let by_count = if newest.len() as i64 > keep {
            newest.last().map_or(0, |(t, _, _)| t + 1)
        } else {
            0
        };
        let cut = by_count.max(min_tick).min(floor);
        if cut <= 0 {
            return Ok(());
        }
        let ranges: Vec<(String, String)> = [
            self.prefix.cron_fire_dir(name),
            self.prefix.cron_result_dir(name),
        ]
        .into_iter()
        .map(|d| (d.clone(), format!("{d}{}", crate::keys::tick_key(cut))))
        .collect();
        self.etcd
            .retry("prune", |mut c| {
                let ops: Vec<TxnOp> = ranges
                    .iter()
                    .map(|(from, to)| {
                        TxnOp::delete(
                            from.clone(),
                            Some(DeleteOptions::new().with_range(to.clone())),
                        )
                    })
                    .collect();
                async move { c.txn(Txn::new().and_then(ops)).await }
            })
            .await?;
        Ok(())
    }

    /// Every live conchd node: (key's node name, record if readable).
    pub async fn nodes(&self) -> Result<Vec<(String, Option<NodeRecord>)>, CallError> {
        let dir = self.prefix.nodes();
        let r = self
            .etcd
            .retry("list nodes", |mut c| {
                let d = dir.clone();
                async move { c.get(d, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key()[dir.len()..]).into_owned(),
                    NodeRecord::parse(kv.value()),
                )
            })
            .collect())
    }

    /// Write a manual-run trigger for `name`; returns its key and create revision.
    pub async fn put_trigger(
        &self,
        name: &Name,
        id: &str,
        value: &str,
    ) -> Result<(String, i64), CallError> {
        let key = self.prefix.cron_trigger(name, id);
        let r = self
            .etcd
            .retry("put trigger", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), value, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok((key, r.header().map_or(0, |h| h.revision())))
    }

    /// Withdraw a trigger nobody took (guarded on its create revision). `true` if withdrawn.
    pub async fn withdraw_trigger(&self, key: &str, rev: i64) -> Result<bool, CallError> {
        let r = self
            .etcd
            .retry("withdraw trigger", |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(key, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }
}

/// Why `pause`/`resume` could not update a job.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Etcd(#[from] CallError),
    #[error("the stored job is not a conch job spec: {0}")]
    Foreign(super::job::JobError),
}

/// The range end of a directory key, for watches.
pub fn dir_end(dir: &str) -> Vec<u8> {
    prefix_end(dir)
}
