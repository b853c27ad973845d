//! Leases: at most one worker at a time runs a given piece of work on a
//! shared lake, and a dead worker's claim runs out.
//!
//! A lease is a small object under `_leases/NAME/` naming its owner and an
//! expiry. Claims are numbered: the current lease is the highest-numbered
//! one, and a worker claims the next number with a create-if-absent put
//! (object_store `PutMode::Create`: `If-None-Match` on S3, an exclusive hard
//! link on a local or shared filesystem), so of two workers claiming at once
//! exactly one succeeds. The owner renews its expiry in the background every
//! third of the lease time and deletes its claim when done; a worker that
//! finds a live claim waits (polling) until it is released or expires, and a
//! claim whose owner died (kill -9, a lost node) expires after the lease time,
//! or at once when its owner was a process on this host that no longer runs.
//! A task that the scheduler requeues recognises its own job's claim and
//! takes it over at once. A claim is never deleted once void (the numbering
//! must not restart under a worker claiming over it): the next claim of the
//! name removes it, and [`sweep`] (run by every `stage=all` submission)
//! claims and releases the names whose workers are gone.
//!
//! Lease time: `PIPELINE_LEASE_SECS` (default 120 s); longest wait:
//! `PIPELINE_LEASE_WAIT_SECS` (default a day).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lake::{Lake, LeaseGuard};

/// Where leases live in the lake.
pub const LEASES: &str = "_leases";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claim {
    pub owner: String,
    /// The scheduler job that holds it (SLURM job and array task), if any.
    #[serde(default)]
    pub job: Option<String>,
    /// Unix time in milliseconds after which the claim is void.
    pub expires_ms: i64,
    /// Host and process of the owner: a claim of a process that no longer
    /// runs on this host is void at once (kill -9, then run again).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
}

impl Claim {
    /// Whether the owner is known to be gone: same host, process not alive.
    /// Only where /proc shows processes: without it (macOS) nothing is
    /// known, and the claim runs until it expires.
    fn owner_gone(&self) -> bool {
        match (&self.host, self.pid) {
            (Some(h), Some(pid)) => {
                std::path::Path::new("/proc/self").exists()
                    && *h == crate::host::hostname()
                    && pid != std::process::id()
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            }
            _ => false,
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn env_secs(name: &str, default: f64) -> Duration {
    Duration::from_secs_f64(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(default),
    )
}

/// The scheduler job this process runs in (`JOB_TASK` under SLURM).
pub fn current_job() -> Option<String> {
    let job = std::env::var("SLURM_ARRAY_JOB_ID")
        .or_else(|_| std::env::var("SLURM_JOB_ID"))
        .ok()?;
    Some(match std::env::var("SLURM_ARRAY_TASK_ID") {
        Ok(t) => format!("{job}_{t}"),
        Err(_) => job,
    })
}

fn owner() -> String {
    let host = crate::host::hostname();
    match current_job() {
        Some(j) => format!("job {j} on {host} (pid {})", std::process::id()),
        None => format!("{host} (pid {})", std::process::id()),
    }
}

/// A held lease; renewed until dropped, then released.
pub struct Lease {
    lake: Lake,
    key: String,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
    guard: LeaseGuard,
}

impl Lease {
    /// What a writer checks before it commits ([`Lake::under_lease`]).
    pub fn guard(&self) -> LeaseGuard {
        self.guard.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
        // A lapsed claim is left alone: another worker may be claiming the
        // next number over it right now, and a deleted top claim would let
        // a third one start the numbering again at 0 beside it. The next
        // claim of the name, or a sweep, removes it.
        if !self.guard.held() {
            return;
        }
        if let Err(e) = self.lake.delete(&self.key) {
            tracing::warn!(error = %e, "releasing a lease");
        }
    }
}

/// The claims of a lease name, highest number first.
fn claims(lake: &Lake, dir: &str) -> Result<Vec<(u64, String, Option<Claim>)>> {
    let mut out = Vec::new();
    for (key, _) in lake.list(dir)? {
        let Some(n) = key
            .rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let claim = lake.get_opt(&key)?.and_then(|b| serde_json::from_slice(&b).ok());
        out.push((n, key, claim));
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// The live claim on `name`, if any (for status displays).
pub fn holder(lake: &Lake, name: &str) -> Result<Option<Claim>> {
    let dir = format!("{LEASES}/{name}");
    Ok(claims(lake, &dir)?
        .into_iter()
        .next()
        .and_then(|(_, _, c)| c)
        .filter(|c| c.expires_ms > now_ms() && !c.owner_gone()))
}

/// Take the lease `name`, waiting while another worker holds it.
pub fn acquire(lake: &Lake, name: &str) -> Result<Lease> {
    claim(lake, name, true)?.ok_or_else(|| Error::invalid(format!("{name}: a patient claim came back empty")))
}

/// Clears the claims that workers which are gone left behind (killed after
/// their commit, or unable to reach the lake to release): each lease name
/// whose latest claim is void is claimed through the usual protocol and
/// released at once, so a sweep is as safe beside running workers as any
/// other claimer. The number of names cleared.
pub fn sweep(lake: &Lake) -> Result<usize> {
    let prefix = format!("{LEASES}/");
    let names: std::collections::BTreeSet<String> = lake
        .list(LEASES)?
        .into_iter()
        .filter_map(|(key, _)| Some(key.strip_prefix(&prefix)?.rsplit_once('/')?.0.to_string()))
        .collect();
    let mut cleared = 0;
    for name in names {
        if holder(lake, &name)?.is_none() && claim(lake, &name, false)?.is_some() {
            cleared += 1;
        }
    }
    if cleared > 0 {
        tracing::info!(cleared, "cleared the leases of workers that are gone");
    }
    Ok(cleared)
}

/// Claim `name`; a live claim of another worker is waited out when
/// `patient`, else the answer is None.
fn claim(lake: &Lake, name: &str, patient: bool) -> Result<Option<Lease>> {
    let ttl = env_secs("PIPELINE_LEASE_SECS", 120.0);
    let max_wait = env_secs("PIPELINE_LEASE_WAIT_SECS", 86_400.0);
    let dir = format!("{LEASES}/{name}");
    let me = owner();
    let job = current_job();
    let started = Instant::now();
    let mut told = false;
    loop {
        let all = claims(lake, &dir)?;
        let top = all.first().cloned();
        let claim = Claim {
            owner: me.clone(),
            job: job.clone(),
            expires_ms: now_ms() + ttl.as_millis() as i64,
            host: Some(crate::host::hostname()),
            pid: Some(std::process::id()),
        };
        let body = Bytes::from(serde_json::to_vec(&claim).expect("json"));
        let mine_again = |c: &Claim| job.is_some() && c.job == job;
        let next = match &top {
            Some((n, key, Some(c))) if c.expires_ms > now_ms() && !mine_again(c) && !c.owner_gone() => {
                if !patient {
                    return Ok(None);
                }
                if started.elapsed() > max_wait {
                    return Err(Error::invalid(format!(
                        "{name} is being worked on by {} (lease {}); gave up after waiting {:.0} s",
                        c.owner,
                        lake.display(key),
                        started.elapsed().as_secs_f64()
                    )));
                }
                if !told {
                    tracing::info!(
                        "{name}: {} is working on it; waiting for its lease (#{n}) to end",
                        c.owner
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(500).min(ttl / 4));
                continue;
            }
            // Our own job's claim (the scheduler requeued us): take it over.
            Some((n, key, Some(c))) if mine_again(c) => {
                lake.put(key, body)?;
                tracing::info!("{name}: taking over this job's earlier lease #{n}");
                return Ok(Some(start(lake, key.clone(), claim, ttl)));
            }
            Some((n, _, _)) => n + 1,
            None => 0,
        };
        let key = format!("{dir}/{next:020}.json");
        if lake.put_if_absent(&key, body)? {
            // Older claims are void now.
            for (_, k, _) in all {
                let _ = lake.delete(&k);
            }
            return Ok(Some(start(lake, key, claim, ttl)));
        }
        // Another worker claimed that number first: look again.
    }
}

fn start(lake: &Lake, key: String, mut claim: Claim, ttl: Duration) -> Lease {
    let stop = Arc::new(AtomicBool::new(false));
    let guard = LeaseGuard::until(claim.expires_ms);
    let (l, k, s, g) = (lake.clone(), key.clone(), stop.clone(), guard.clone());
    let renewer = std::thread::spawn(move || {
        let every = ttl / 3;
        let mut last = Instant::now();
        while !s.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100).min(every));
            if last.elapsed() < every {
                continue;
            }
            last = Instant::now();
            if !g.held() {
                tracing::warn!(
                    "lease {k} lapsed (this process was stopped or could not renew it); its work will not be committed"
                );
                return;
            }
            claim.expires_ms = now_ms() + ttl.as_millis() as i64;
            let body = Bytes::from(serde_json::to_vec(&claim).expect("json"));
            match l.put(&k, body) {
                Ok(()) => g.extend_to(claim.expires_ms),
                Err(e) => tracing::warn!(error = %e, "renewing a lease"),
            }
        }
    });
    Lease {
        lake: lake.clone(),
        key,
        stop,
        renewer: Some(renewer),
        guard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{Artifact, Provenance};
    use arrow::array::{StringArray, UInt32Array, UInt64Array};
    use arrow::record_batch::RecordBatch;

    fn vocab_batch(count: u64) -> RecordBatch {
        let schema = crate::schemas::table("vocab").unwrap().file_schema();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt32Array::from(vec![7])),
                Arc::new(UInt64Array::from(vec![count])),
                Arc::new(StringArray::from(vec!["x"])),
            ],
        )
        .unwrap()
    }

    /// A worker whose lease lapsed (here: its expiry set in the past, as
    /// after a SIGSTOP longer than the lease) commits nothing: the other
    /// worker's data file and manifest stay as they were, byte for byte.
    #[test]
    fn a_lapsed_lease_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let artifact = Artifact::new("vocab", &[("dataset", "d"), ("split", "train")]).unwrap();
        lake.write_artifact(&artifact, &[vocab_batch(1)], Provenance::new("vocab"))
            .unwrap();
        let (data, manifest) = (
            lake.get(&artifact.data_key()).unwrap(),
            lake.get(&artifact.manifest_key()).unwrap(),
        );
        let lease = acquire(&lake, "vocab/test").unwrap();
        let held = lake.under_lease(lease.guard());
        held.write_artifact(&artifact, &[vocab_batch(2)], Provenance::new("vocab"))
            .unwrap();
        assert_ne!(
            lake.get(&artifact.data_key()).unwrap(),
            data,
            "a held lease commits"
        );
        let (data, manifest_now) = (
            lake.get(&artifact.data_key()).unwrap(),
            lake.get(&artifact.manifest_key()).unwrap(),
        );
        assert_ne!(manifest_now, manifest);
        lease.guard.extend_to(now_ms() - 1);
        let err = held
            .write_artifact(&artifact, &[vocab_batch(3)], Provenance::new("vocab"))
            .unwrap_err();
        assert!(
            matches!(err, Error::LeaseLapsed(_)) && err.to_string().contains("lease lapsed"),
            "{err}"
        );
        assert_eq!(lake.get(&artifact.data_key()).unwrap(), data);
        assert_eq!(lake.get(&artifact.manifest_key()).unwrap(), manifest_now);
    }

    /// The claim keys under a lease name.
    fn claim_keys(lake: &Lake, name: &str) -> Vec<String> {
        lake.list(&format!("{LEASES}/{name}"))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// Rewrites the claim at `key` as expired, as it reads once its owner
    /// stopped renewing it for the lease time.
    fn expire(lake: &Lake, key: &str) {
        let mut c: Claim = serde_json::from_slice(&lake.get(key).unwrap()).unwrap();
        c.expires_ms = now_ms() - 1;
        lake.put(key, Bytes::from(serde_json::to_vec(&c).unwrap()))
            .unwrap();
    }

    /// A lapsed holder leaves its claim (the numbering must not restart
    /// under a worker claiming over it); the next claimer takes the next
    /// number and removes it; a sweep clears names whose latest claim is
    /// void and leaves a live holder's claim, which still commits.
    #[test]
    fn lapsed_claims_stay_until_claimed_over_or_swept() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let lapsed = acquire(&lake, "train/a").unwrap();
        lapsed.guard.extend_to(now_ms() - 1);
        drop(lapsed);
        let first = format!("{LEASES}/train/a/{:020}.json", 0);
        assert_eq!(claim_keys(&lake, "train/a"), std::slice::from_ref(&first));
        expire(&lake, &first);
        let next = acquire(&lake, "train/a").unwrap();
        assert_eq!(
            claim_keys(&lake, "train/a"),
            [format!("{LEASES}/train/a/{:020}.json", 1)]
        );
        drop(next);
        assert!(claim_keys(&lake, "train/a").is_empty());

        // A claim left by a worker that is gone (expired), one of a live
        // holder, and a lapsed one.
        let gone = Claim {
            owner: "a worker killed after its commit".into(),
            job: None,
            expires_ms: now_ms() - 1,
            host: None,
            pid: None,
        };
        lake.put(
            &format!("{LEASES}/collect/b/{:020}.json", 7),
            Bytes::from(serde_json::to_vec(&gone).unwrap()),
        )
        .unwrap();
        let live = acquire(&lake, "decide/c").unwrap();
        let lapsed = acquire(&lake, "eval/d").unwrap();
        lapsed.guard.extend_to(now_ms() - 1);
        drop(lapsed);
        let live_keys = claim_keys(&lake, "decide/c");
        // The lapsed claim's object has not expired yet: only the gone
        // worker's is cleared.
        assert_eq!(sweep(&lake).unwrap(), 1);
        assert!(claim_keys(&lake, "collect/b").is_empty());
        assert_eq!(claim_keys(&lake, "eval/d").len(), 1);
        expire(&lake, &format!("{LEASES}/eval/d/{:020}.json", 0));
        assert_eq!(sweep(&lake).unwrap(), 1);
        assert!(claim_keys(&lake, "eval/d").is_empty());
        assert_eq!(claim_keys(&lake, "decide/c"), live_keys);
        assert!(live.guard().held());
        drop(live);
        assert!(lake.list(LEASES).unwrap().is_empty());
    }
}
