//! One runner per job and shard: a lease row renewed by a heartbeat.
//!
//! Session advisory locks do not survive a transaction-pooling proxy, so the
//! guard is a row in `leases` with an expiry time. Every batch commit checks,
//! in its own transaction, that this runner still holds the lease, so a runner
//! that lost it (paused too long, network partition) cannot write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::db::Database;
use crate::target::quote_ident;

/// This process's identity in a lease.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Random per process, so a restarted process never mistakes an old lease for its own.
    pub token: String,
    pub host: String,
    pub pid: i32,
}

impl Holder {
    pub fn current() -> Holder {
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random).expect("the operating system's random source failed");
        Holder {
            token: hex::encode(random),
            host: crate::report::host_name(),
            pid: std::process::id() as i32,
        }
    }
}

/// The lease is held by another live runner.
#[derive(Debug, thiserror::Error)]
#[error("job {job} shard {shard} is already running on host {host} (pid {pid}, lease renewed {heartbeat_age_secs}s ago); wait for it to finish, or if that process is gone run `reencrypt release --job {job}`")]
pub struct Busy {
    pub job: String,
    pub shard: i32,
    pub host: String,
    pub pid: i32,
    pub heartbeat_age_secs: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Tells whether a process with this pid exists on this host.
pub(crate) fn process_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Tries to take the lease once. Returns the current holder when it is taken.
async fn try_acquire(
    db: &Database,
    schema: &str,
    job: &str,
    shard: i32,
    holder: &Holder,
    ttl: Duration,
) -> Result<Option<(String, String, i32, i64, f64)>, sqlx::Error> {
    let q = quote_ident(schema);
    let mut tx = db.begin().await?;
    let taken: Option<(String,)> = sqlx::query_as(&format!(
        "INSERT INTO {q}.leases (job, shard, holder, host, pid, expires_at) \
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) \
         ON CONFLICT (job, shard) DO UPDATE SET holder = EXCLUDED.holder, host = EXCLUDED.host, pid = EXCLUDED.pid, \
             acquired_at = now(), heartbeat_at = now(), expires_at = EXCLUDED.expires_at \
         WHERE {q}.leases.expires_at < now() OR {q}.leases.holder = EXCLUDED.holder \
         RETURNING holder"
    ))
    .bind(job)
    .bind(shard)
    .bind(&holder.token)
    .bind(&holder.host)
    .bind(holder.pid)
    .bind(ttl.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    if taken.is_some() {
        tx.commit().await?;
        return Ok(None);
    }
    let current: (String, String, i32, i64, f64) = sqlx::query_as(&format!(
        "SELECT holder, host, pid, extract(epoch FROM now() - heartbeat_at)::int8, \
         extract(epoch FROM heartbeat_at)::float8 FROM {q}.leases WHERE job = $1 AND shard = $2"
    ))
    .bind(job)
    .bind(shard)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(current))
}

/// Reads the unexpired lease on a job's shard, for a dry run to tell
/// whether a run now would find the shard taken.
pub async fn read_unexpired(
    db: &Database,
    schema: &str,
    job: &str,
    shard: i32,
) -> Result<Option<Busy>, sqlx::Error> {
    let q = quote_ident(schema);
    let mut tx = db.begin_read_only().await?;
    let lease: Option<(String, i32, i64)> = sqlx::query_as(&format!(
        "SELECT host, pid, extract(epoch FROM now() - heartbeat_at)::int8 \
         FROM {q}.leases WHERE job = $1 AND shard = $2 AND expires_at > now()"
    ))
    .bind(job)
    .bind(shard)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(lease.map(|(host, pid, heartbeat_age_secs)| Busy {
        job: job.to_string(),
        shard,
        host,
        pid,
        heartbeat_age_secs,
    }))
}

impl Busy {
    /// Tells whether the lease's runner ran on this host and is gone, so
    /// that a run here would take the lease over at once (see `acquire`).
    /// A lease with this process's own pid counts as gone, as after a
    /// container restart.
    pub fn is_gone_from_this_host(&self) -> bool {
        self.host == crate::report::host_name()
            && (self.pid == std::process::id() as i32 || !process_alive(self.pid))
    }
}

/// Takes the lease of a job's shard.
///
/// A lease left by a process that is gone is taken over: at once when that
/// process ran on this host (its pid no longer exists, or is this process's own
/// pid as after a container restart), otherwise once it expires. A lease whose
/// heartbeat advances belongs to a live runner, and the call fails with `Busy`.
pub async fn acquire(
    db: &Database,
    schema: &str,
    job: &str,
    shard: i32,
    holder: &Holder,
    ttl: Duration,
) -> Result<(), LeaseError> {
    let mut first_heartbeat: Option<f64> = None;
    loop {
        let Some((_, host, pid, age, heartbeat)) =
            try_acquire(db, schema, job, shard, holder, ttl).await?
        else {
            return Ok(());
        };
        let busy = || Busy {
            job: job.to_string(),
            shard,
            host: host.clone(),
            pid,
            heartbeat_age_secs: age,
        };

        if host == holder.host && (pid == holder.pid || !process_alive(pid)) {
            tracing::warn!(
                job,
                shard,
                pid,
                "Taking over the lease of a runner on this host that is gone."
            );
            release(db, schema, job, Some(shard)).await?;
            continue;
        }
        match first_heartbeat {
            None => {
                tracing::info!(job, shard, host = %host, pid, heartbeat_age_secs = age, "The job's lease is held by another runner; waiting to see whether it is alive.");
                first_heartbeat = Some(heartbeat);
            }
            Some(seen) if heartbeat > seen => return Err(busy().into()),
            Some(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Renews the lease; returns false when this runner no longer holds it.
pub async fn renew(
    db: &Database,
    schema: &str,
    job: &str,
    shard: i32,
    holder: &Holder,
    ttl: Duration,
) -> Result<bool, sqlx::Error> {
    let q = quote_ident(schema);
    let mut tx = db.begin().await?;
    let renewed = sqlx::query(&format!(
        "UPDATE {q}.leases SET heartbeat_at = now(), expires_at = now() + make_interval(secs => $4) \
         WHERE job = $1 AND shard = $2 AND holder = $3"
    ))
    .bind(job)
    .bind(shard)
    .bind(&holder.token)
    .bind(ttl.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(renewed == 1)
}

/// Deletes a job's leases: one shard's, or all of them.
pub async fn release(
    db: &Database,
    schema: &str,
    job: &str,
    shard: Option<i32>,
) -> Result<u64, sqlx::Error> {
    let q = quote_ident(schema);
    let mut tx = db.begin().await?;
    let deleted = sqlx::query(&format!(
        "DELETE FROM {q}.leases WHERE job = $1 AND ($2::int4 IS NULL OR shard = $2)"
    ))
    .bind(job)
    .bind(shard)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(deleted)
}

/// Deletes this runner's own lease at the end of a run.
pub async fn release_own(
    db: &Database,
    schema: &str,
    job: &str,
    shard: i32,
    holder: &Holder,
) -> Result<(), sqlx::Error> {
    let q = quote_ident(schema);
    let mut tx = db.begin().await?;
    sqlx::query(&format!(
        "DELETE FROM {q}.leases WHERE job = $1 AND shard = $2 AND holder = $3"
    ))
    .bind(job)
    .bind(shard)
    .bind(&holder.token)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Renews the lease every `ttl / 6` until stopped. When the lease is lost, or
/// cannot be renewed before it expires, sets `lost` so the writers stop.
pub fn spawn_heartbeat(
    db: Database,
    schema: String,
    job: String,
    shard: i32,
    holder: Holder,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let interval = ttl / 6;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            match renew(&db, &schema, &job, shard, &holder, ttl).await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(job = %job, shard, "Lost the job's lease to another runner; stopping.");
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                Err(error) => {
                    tracing::warn!(job = %job, shard, error = %crate::db::describe(&error), "Could not renew the job's lease; retrying.");
                    if last_renewed.elapsed() >= ttl {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
    })
}
