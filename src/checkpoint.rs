//! The worker's own tables: schema migrations, jobs, leases (one runner at a
//! time), and the per-range checkpoints that make a run resumable.

use std::collections::BTreeMap;

use sqlx::{PgConnection, Row};

use crate::classify::Outcome;
use crate::db::Database;
use crate::target::quote_ident;

/// Default schema for the worker's tables.
pub const DEFAULT_SCHEMA: &str = "reencrypt";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the embedded migrations into `schema`, in one transaction each.
///
/// `sqlx::migrate!`'s own runner keeps its bookkeeping in the session's search
/// path and relies on session state, so the migrations are applied here with
/// `SET LOCAL search_path`, which also works through a transaction pooler. A
/// transaction-scoped advisory lock serialises concurrent workers.
pub async fn migrate(db: &Database, schema: &str) -> Result<(), sqlx::Error> {
    let quoted = quote_ident(schema);
    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('reencrypt migrations'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}; \
         CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations ( \
             version bigint PRIMARY KEY, description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> =
        sqlx::query_scalar(&format!("SELECT version FROM {quoted}.schema_migrations"))
            .fetch_all(&mut *tx)
            .await?;

    for migration in MIGRATOR.iter() {
        if applied.contains(&migration.version) {
            continue;
        }
        sqlx::raw_sql(&format!("SET LOCAL search_path TO {quoted}, pg_catalog"))
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(&migration.sql).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "INSERT INTO {quoted}.schema_migrations (version, description) VALUES ($1, $2)"
        ))
        .bind(migration.version)
        .bind(migration.description.as_ref())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Tells whether the worker's tables exist, without creating anything.
pub async fn schema_exists(conn: &mut PgConnection, schema: &str) -> Result<bool, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}.ranges", quote_ident(schema)))
        .fetch_one(conn)
        .await?;
    Ok(exists)
}

/// A job's recorded keys and layout. A resumed run must match it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobIdentity {
    pub job: String,
    pub targets: Vec<String>,
    pub new_key_fingerprint: String,
    pub old_key_fingerprints: Vec<String>,
    pub new_key_version: Option<i64>,
    pub old_key_versions: Vec<i64>,
    pub shard_count: i32,
    pub writers: i32,
}

/// Outcome counts of one range or target, as stored in `ranges`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub rows_scanned: i64,
    pub reencrypted: i64,
    pub current: i64,
    pub null: i64,
    pub not_in_format: i64,
    pub undecryptable: i64,
    pub ambiguous: i64,
    pub deleted: i64,
    pub write_rejected: i64,
    pub conflicts: i64,
    pub batches: i64,
    pub sweep_reencrypted: i64,
}

impl Counts {
    pub fn add_outcome(&mut self, outcome: Outcome, n: i64) {
        match outcome {
            Outcome::Reencrypted => self.reencrypted += n,
            Outcome::Current => self.current += n,
            Outcome::Null => self.null += n,
            Outcome::NotInFormat => self.not_in_format += n,
            Outcome::Undecryptable => self.undecryptable += n,
            Outcome::Ambiguous => self.ambiguous += n,
            Outcome::Deleted => self.deleted += n,
            Outcome::WriteRejected => self.write_rejected += n,
        }
    }

    pub fn outcome(&self, outcome: Outcome) -> i64 {
        match outcome {
            Outcome::Reencrypted => self.reencrypted,
            Outcome::Current => self.current,
            Outcome::Null => self.null,
            Outcome::NotInFormat => self.not_in_format,
            Outcome::Undecryptable => self.undecryptable,
            Outcome::Ambiguous => self.ambiguous,
            Outcome::Deleted => self.deleted,
            Outcome::WriteRejected => self.write_rejected,
        }
    }

    pub fn add(&mut self, other: &Counts) {
        self.rows_scanned += other.rows_scanned;
        for outcome in Outcome::ALL {
            self.add_outcome(outcome, other.outcome(outcome));
        }
        self.conflicts += other.conflicts;
        self.batches += other.batches;
        self.sweep_reencrypted += other.sweep_reencrypted;
    }

    /// Rows that need an operator's attention, which makes the exit code 3.
    pub fn attention(&self) -> i64 {
        self.undecryptable + self.ambiguous + self.write_rejected
    }
}

const COUNT_COLUMNS: &str =
    "rows_scanned, reencrypted, current, null_values, not_in_format, undecryptable, \
     ambiguous, deleted, write_rejected, conflicts, batches, sweep_reencrypted";

fn counts_from_row(row: &sqlx::postgres::PgRow) -> Result<Counts, sqlx::Error> {
    Ok(Counts {
        rows_scanned: row.try_get("rows_scanned")?,
        reencrypted: row.try_get("reencrypted")?,
        current: row.try_get("current")?,
        null: row.try_get("null_values")?,
        not_in_format: row.try_get("not_in_format")?,
        undecryptable: row.try_get("undecryptable")?,
        ambiguous: row.try_get("ambiguous")?,
        deleted: row.try_get("deleted")?,
        write_rejected: row.try_get("write_rejected")?,
        conflicts: row.try_get("conflicts")?,
        batches: row.try_get("batches")?,
        sweep_reencrypted: row.try_get("sweep_reencrypted")?,
    })
}

/// A mismatch between a job's stored identity and this run, which blocks the resume.
#[derive(Debug, thiserror::Error)]
pub enum IdentityMismatch {
    #[error("job {job} is running (its lease is live), so --restart would pull it from under that runner; stop it first, or after a crash on another host wait for the lease to expire or run `reencrypt release --job {job}`")]
    Running { job: String },
    #[error("--schema {schema} holds tables named like the worker's that reencrypt did not create; choose another --schema")]
    ForeignSchema { schema: String },
    #[error("job {job} was started with a different {what} (stored {stored}, now {given}); resume with the same settings, or pass --restart to start the job over")]
    Differs {
        job: String,
        what: &'static str,
        stored: String,
        given: String,
    },
}

/// Creates the job if it does not exist, or checks that this run matches it.
/// With `restart`, deletes the job's checkpoints first.
pub async fn register_job(
    conn: &mut PgConnection,
    schema: &str,
    identity: &JobIdentity,
    key_origins: &serde_json::Value,
    restart: bool,
) -> Result<Result<(), IdentityMismatch>, sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("reencrypt job {}", identity.job))
        .execute(&mut *conn)
        .await?;
    if restart {
        // Restarting must not pull the job from under a live runner.
        // A lease left on this host by a process that is gone does not count.
        let leases: Vec<(String, i32)> = sqlx::query_as(&format!(
            "SELECT host, pid FROM {q}.leases WHERE job = $1 AND expires_at > now()"
        ))
        .bind(&identity.job)
        .fetch_all(&mut *conn)
        .await?;
        let this_host = crate::report::host_name();
        let live = leases.iter().any(|(host, pid)| {
            *host != this_host
                || (*pid != std::process::id() as i32 && crate::lease::process_alive(*pid))
        });
        if live {
            return Ok(Err(IdentityMismatch::Running {
                job: identity.job.clone(),
            }));
        }
        sqlx::query(&format!("DELETE FROM {q}.jobs WHERE job = $1"))
            .bind(&identity.job)
            .execute(&mut *conn)
            .await?;
    }

    let stored = sqlx::query(&format!(
        "SELECT targets, new_key_fingerprint, old_key_fingerprints, new_key_version, old_key_versions, \
         shard_count, writers FROM {q}.jobs WHERE job = $1"
    ))
    .bind(&identity.job)
    .fetch_optional(&mut *conn)
    .await?;

    let Some(row) = stored else {
        sqlx::query(&format!(
            "INSERT INTO {q}.jobs (job, targets, new_key_fingerprint, old_key_fingerprints, new_key_version, \
             old_key_versions, key_origins, shard_count, writers, status) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'running')"
        ))
        .bind(&identity.job)
        .bind(&identity.targets)
        .bind(&identity.new_key_fingerprint)
        .bind(&identity.old_key_fingerprints)
        .bind(identity.new_key_version)
        .bind(&identity.old_key_versions)
        .bind(key_origins)
        .bind(identity.shard_count)
        .bind(identity.writers)
        .execute(&mut *conn)
        .await?;
        return Ok(Ok(()));
    };

    if let Err(mismatch) = compare_identity(&row, identity)? {
        return Ok(Err(mismatch));
    }
    sqlx::query(&format!(
        "UPDATE {q}.jobs SET status = 'running', updated_at = now(), finished_at = NULL WHERE job = $1 AND status <> 'finished'"
    ))
    .bind(&identity.job)
    .execute(&mut *conn)
    .await?;
    Ok(Ok(()))
}

/// Compares this run with a job's stored row (`targets`, keys, versions,
/// shards and writers).
fn compare_identity(
    row: &sqlx::postgres::PgRow,
    identity: &JobIdentity,
) -> Result<Result<(), IdentityMismatch>, sqlx::Error> {
    let differs = |what: &'static str, stored: String, given: String| {
        Ok(Err(IdentityMismatch::Differs {
            job: identity.job.clone(),
            what,
            stored,
            given,
        }))
    };
    let targets: Vec<String> = row.try_get("targets")?;
    if targets != identity.targets {
        return differs("target list", targets.join(" "), identity.targets.join(" "));
    }
    let new_version: Option<i64> = row.try_get("new_key_version")?;
    if new_version != identity.new_key_version {
        return differs(
            "Vault version of the new key (the current version may have moved on since the job started; pin it with --new-key-vault-version)",
            version_text(new_version),
            version_text(identity.new_key_version),
        );
    }
    let new_fp: String = row.try_get("new_key_fingerprint")?;
    if new_fp != identity.new_key_fingerprint {
        return differs(
            "new key",
            format!("fingerprint {new_fp}"),
            format!("fingerprint {}", identity.new_key_fingerprint),
        );
    }
    let old_fps: Vec<String> = row.try_get("old_key_fingerprints")?;
    if old_fps != identity.old_key_fingerprints {
        return differs(
            "set of old keys",
            format!("fingerprints {}", old_fps.join(",")),
            format!("fingerprints {}", identity.old_key_fingerprints.join(",")),
        );
    }
    let old_versions: Vec<i64> = row.try_get("old_key_versions")?;
    if old_versions != identity.old_key_versions {
        return differs(
            "Vault versions of the old keys",
            format!("{old_versions:?}"),
            format!("{:?}", identity.old_key_versions),
        );
    }
    let shards: i32 = row.try_get("shard_count")?;
    if shards != identity.shard_count {
        return differs(
            "shard count",
            shards.to_string(),
            identity.shard_count.to_string(),
        );
    }
    let writers: i32 = row.try_get("writers")?;
    if writers != identity.writers {
        return differs(
            "number of writers",
            writers.to_string(),
            identity.writers.to_string(),
        );
    }
    Ok(Ok(()))
}

/// Reads, without writing, whether the job exists in `schema` and matches
/// this run as `register_job` would check it. Returns `None` when the
/// schema or the job does not exist.
pub async fn check_stored_job(
    conn: &mut PgConnection,
    schema: &str,
    identity: &JobIdentity,
) -> Result<Option<Result<(), IdentityMismatch>>, sqlx::Error> {
    let q = quote_ident(schema);
    // The worker's tables in a schema without its bookkeeping belong to
    // someone else, and a run would fail to create its own.
    let (bookkeeping, tables, jobs): (bool, i64, bool) = sqlx::query_as(
        "SELECT to_regclass($1 || '.schema_migrations') IS NOT NULL, \
                (SELECT count(*) FROM unnest(ARRAY['jobs', 'leases', 'ranges', 'attention', 'runs']) AS n \
                 WHERE to_regclass($1 || '.' || n) IS NOT NULL), \
                to_regclass($1 || '.jobs') IS NOT NULL",
    )
    .bind(&q)
    .fetch_one(&mut *conn)
    .await?;
    if !bookkeeping && tables > 0 {
        return Ok(Some(Err(IdentityMismatch::ForeignSchema {
            schema: schema.to_string(),
        })));
    }
    if !jobs {
        return Ok(None);
    }
    let stored = sqlx::query(&format!(
        "SELECT targets, new_key_fingerprint, old_key_fingerprints, new_key_version, old_key_versions, \
         shard_count, writers FROM {q}.jobs WHERE job = $1"
    ))
    .bind(&identity.job)
    .fetch_optional(&mut *conn)
    .await?;
    match stored {
        Some(row) => compare_identity(&row, identity).map(Some),
        None => Ok(None),
    }
}

/// Returns the number of writers a job was started with, or `None` when the
/// job does not exist or the schema does not hold this worker's tables
/// (which `check_stored_job` reports).
pub async fn stored_writers(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
) -> Result<Option<i32>, sqlx::Error> {
    let q = quote_ident(schema);
    let jobs: bool = sqlx::query_scalar(
        "SELECT to_regclass($1 || '.schema_migrations') IS NOT NULL \
         AND to_regclass($1 || '.jobs') IS NOT NULL",
    )
    .bind(&q)
    .fetch_one(&mut *conn)
    .await?;
    if !jobs {
        return Ok(None);
    }
    sqlx::query_scalar(&format!("SELECT writers FROM {q}.jobs WHERE job = $1"))
        .bind(job)
        .fetch_optional(&mut *conn)
        .await
}

/// Returns the key columns of a target's ranges in a job, or `None` when
/// the job has no ranges for it yet.
pub async fn range_key_columns(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    target: &str,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query_scalar(&format!(
        "SELECT key_columns FROM {q}.ranges WHERE job = $1 AND target = $2 ORDER BY range_index LIMIT 1"
    ))
    .bind(job)
    .bind(target)
    .fetch_optional(conn)
    .await
}

/// Formats a stored Vault version, or notes that the key did not come from Vault.
fn version_text(version: Option<i64>) -> String {
    version.map_or_else(
        || "none: not from Vault".to_string(),
        |v| format!("version {v}"),
    )
}

/// Sets a job's status (`running`, `finished`, `failed`, `interrupted`).
pub async fn set_job_status(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    status: &str,
) -> Result<(), sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query(&format!(
        "UPDATE {q}.jobs SET status = $2, updated_at = now(), \
         finished_at = CASE WHEN $2 = 'finished' THEN now() ELSE finished_at END WHERE job = $1"
    ))
    .bind(job)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(())
}

/// The bounds of one key range: exclusive lower key, inclusive upper key.
/// `None` means unbounded on that side.
pub type RangeBounds = (Option<Vec<String>>, Option<Vec<String>>);

/// One key range of a target, as stored.
#[derive(Debug, Clone)]
pub struct RangeRecord {
    pub target: String,
    pub range_index: i32,
    /// The key columns the bounds are in; `ctid` alone for a pass in physical order.
    pub key_columns: Vec<String>,
    pub lower_key: Option<Vec<String>>,
    pub upper_key: Option<Vec<String>>,
    pub last_key: Option<Vec<String>>,
    pub status: String,
    pub rows_estimated: i64,
    pub counts: Counts,
}

/// Reads the ranges of a target, in range order.
pub async fn load_ranges(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    target: &str,
) -> Result<Vec<RangeRecord>, sqlx::Error> {
    let q = quote_ident(schema);
    let rows = sqlx::query(&format!(
        "SELECT target, range_index, key_columns, lower_key, upper_key, last_key, status, rows_estimated, {COUNT_COLUMNS} \
         FROM {q}.ranges WHERE job = $1 AND target = $2 ORDER BY range_index"
    ))
    .bind(job)
    .bind(target)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(RangeRecord {
                target: row.try_get("target")?,
                range_index: row.try_get("range_index")?,
                key_columns: row.try_get("key_columns")?,
                lower_key: row.try_get("lower_key")?,
                upper_key: row.try_get("upper_key")?,
                last_key: row.try_get("last_key")?,
                status: row.try_get("status")?,
                rows_estimated: row.try_get("rows_estimated")?,
                counts: counts_from_row(row)?,
            })
        })
        .collect()
}

/// Records where the pass in physical order of each of a target's ranges
/// started, for the ranges that have no record yet, in one statement (see
/// `PhysicalScan`): `frontier`, and the transactions `running` then. A
/// range whose pass an earlier version started keeps its recorded horizon
/// in place of a frontier, with no running transactions. Returns each
/// range's index, recorded frontier, running transactions and upper bound.
pub async fn pin_pass_start(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    target: &str,
    frontier: i64,
    running: &[i64],
) -> Result<Vec<PinnedPass>, sqlx::Error> {
    let q = quote_ident(schema);
    // The right-hand sides read the row as it was before the update.
    sqlx::query_as(&format!(
        "UPDATE {q}.ranges SET \
           pass_frontier = CASE WHEN pass_horizon IS NULL THEN COALESCE(pass_frontier, $3) END, \
           pass_running = CASE WHEN pass_horizon IS NULL AND pass_frontier IS NULL THEN $4 ELSE pass_running END \
         WHERE job = $1 AND target = $2 \
         RETURNING range_index, COALESCE(pass_frontier, pass_horizon), COALESCE(pass_running, '{{}}'), upper_key"
    ))
    .bind(job)
    .bind(target)
    .bind(frontier)
    .bind(running)
    .fetch_all(conn)
    .await
}

/// A range's pass in physical order as pinned: index, frontier (or an
/// earlier version's horizon), transactions running at its start, upper bound.
pub type PinnedPass = (i32, i64, Vec<i64>, Option<Vec<String>>);

/// Tells whether the pass of a target's ranges in a job has started, that
/// is whether where it started was recorded.
pub async fn pass_started(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    target: &str,
) -> Result<bool, sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {q}.ranges WHERE job = $1 AND target = $2 \
           AND (pass_frontier IS NOT NULL OR pass_horizon IS NOT NULL))"
    ))
    .bind(job)
    .bind(target)
    .fetch_one(conn)
    .await
}

/// Moves a range's upper bound.
pub async fn set_range_upper(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    target: &str,
    range_index: i32,
    upper: &[String],
) -> Result<(), sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query(&format!(
        "UPDATE {q}.ranges SET upper_key = $4 WHERE job = $1 AND target = $2 AND range_index = $3"
    ))
    .bind(job)
    .bind(target)
    .bind(range_index)
    .bind(upper)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts the layout of a target's ranges. Callers hold the job's advisory
/// lock, so concurrent shards agree on one layout.
pub async fn insert_ranges(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    target: &str,
    key_columns: &[String],
    bounds: &[RangeBounds],
    rows_estimated: i64,
) -> Result<(), sqlx::Error> {
    let q = quote_ident(schema);
    let per_range = rows_estimated / bounds.len().max(1) as i64;
    for (index, (lower, upper)) in bounds.iter().enumerate() {
        sqlx::query(&format!(
            "INSERT INTO {q}.ranges (job, target, range_index, key_columns, lower_key, upper_key, rows_estimated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(job)
        .bind(target)
        .bind(index as i32)
        .bind(key_columns)
        .bind(lower.as_ref())
        .bind(upper.as_ref())
        .bind(per_range)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Marks a range as started or finished.
pub async fn set_range_status(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    target: &str,
    range_index: i32,
    status: &str,
) -> Result<(), sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query(&format!(
        "UPDATE {q}.ranges SET status = $4, updated_at = now(), \
         started_at = COALESCE(started_at, now()), \
         finished_at = CASE WHEN $4 = 'done' THEN now() ELSE NULL END \
         WHERE job = $1 AND target = $2 AND range_index = $3"
    ))
    .bind(job)
    .bind(target)
    .bind(range_index)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sums the counts of every range of a job, by target.
pub async fn job_counts(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
) -> Result<BTreeMap<String, Counts>, sqlx::Error> {
    let q = quote_ident(schema);
    let rows = sqlx::query(&format!(
        "SELECT target, {} FROM {q}.ranges WHERE job = $1 GROUP BY target",
        COUNT_COLUMNS
            .split(", ")
            .map(|c| format!("sum({c})::int8 AS {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .bind(job)
    .fetch_all(conn)
    .await?;
    let mut out = BTreeMap::new();
    for row in &rows {
        out.insert(row.try_get::<String, _>("target")?, counts_from_row(row)?);
    }
    Ok(out)
}

/// Primary keys of rows needing attention, at most `limit`, by target.
pub async fn attention_keys(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    limit: i64,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query_as(&format!(
        "SELECT target, key, outcome FROM {q}.attention WHERE job = $1 ORDER BY target, outcome = 'not_in_format', outcome, length(key), key LIMIT $2"
    ))
    .bind(job)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Counts a job's rows in the attention table: all of them, and those that
/// need attention (every outcome but not-in-format).
pub async fn attention_counts(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
) -> Result<(i64, i64), sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE outcome <> 'not_in_format') FROM {q}.attention WHERE job = $1"
    ))
    .bind(job)
    .fetch_one(conn)
    .await
}

/// One job as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRecord {
    pub job: String,
    pub status: String,
    pub targets: Vec<String>,
    pub new_key_fingerprint: String,
    pub old_key_fingerprints: Vec<String>,
    pub new_key_version: Option<i64>,
    pub old_key_versions: Vec<i64>,
    pub shard_count: i32,
    pub writers: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Reads every job, or only `job`, ordered by creation time.
pub async fn load_jobs(
    conn: &mut PgConnection,
    schema: &str,
    job: Option<&str>,
) -> Result<Vec<JobRecord>, sqlx::Error> {
    let q = quote_ident(schema);
    let rows = sqlx::query(&format!(
        "SELECT job, status, targets, new_key_fingerprint, old_key_fingerprints, new_key_version, \
         old_key_versions, shard_count, writers, created_at, updated_at, finished_at \
         FROM {q}.jobs WHERE $1::text IS NULL OR job = $1 ORDER BY created_at, job"
    ))
    .bind(job)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(JobRecord {
                job: row.try_get("job")?,
                status: row.try_get("status")?,
                targets: row.try_get("targets")?,
                new_key_fingerprint: row.try_get("new_key_fingerprint")?,
                old_key_fingerprints: row.try_get("old_key_fingerprints")?,
                new_key_version: row.try_get("new_key_version")?,
                old_key_versions: row.try_get("old_key_versions")?,
                shard_count: row.try_get("shard_count")?,
                writers: row.try_get("writers")?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
                finished_at: row.try_get("finished_at")?,
            })
        })
        .collect()
}

/// A target's progress within a job: its ranges summed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetProgress {
    pub job: String,
    pub target: String,
    pub ranges: i64,
    pub ranges_done: i64,
    /// The planner's row estimate when the ranges were laid out.
    pub rows_estimated: i64,
    pub counts: Counts,
    /// When the first batch of any range started; `None` before the first batch.
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The latest checkpoint of any range.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Sums the ranges of every job, or of `job`, by job and target.
pub async fn load_target_progress(
    conn: &mut PgConnection,
    schema: &str,
    job: Option<&str>,
) -> Result<Vec<TargetProgress>, sqlx::Error> {
    let q = quote_ident(schema);
    let sums = COUNT_COLUMNS
        .split(", ")
        .map(|c| format!("sum({c})::int8 AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(&format!(
        "SELECT job, target, count(*)::int8 AS ranges, \
         count(*) FILTER (WHERE status = 'done')::int8 AS ranges_done, \
         sum(rows_estimated)::int8 AS rows_estimated, {sums}, \
         min(started_at) AS started_at, max(updated_at) AS updated_at \
         FROM {q}.ranges WHERE $1::text IS NULL OR job = $1 GROUP BY job, target ORDER BY job, target"
    ))
    .bind(job)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(TargetProgress {
                job: row.try_get("job")?,
                target: row.try_get("target")?,
                ranges: row.try_get("ranges")?,
                ranges_done: row.try_get("ranges_done")?,
                rows_estimated: row.try_get("rows_estimated")?,
                counts: counts_from_row(row)?,
                started_at: row.try_get("started_at")?,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .collect()
}

/// A lease row with its ages computed by the database clock.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeaseRecord {
    pub job: String,
    pub shard: i32,
    pub host: String,
    pub pid: i32,
    pub acquired_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// Seconds since the last heartbeat.
    pub heartbeat_age_secs: f64,
    /// Seconds until the lease expires; negative once it has expired.
    pub expires_in_secs: f64,
}

impl LeaseRecord {
    /// Returns whether the lease still guards its shard, by the database clock.
    pub fn is_live(&self) -> bool {
        self.expires_in_secs > 0.0
    }
}

/// Reads the leases of every job, or of `job` (and only `shard` when given).
/// With `lock`, the rows stay locked until the transaction ends, so a caller
/// can delete exactly the leases it inspected.
pub async fn load_leases(
    conn: &mut PgConnection,
    schema: &str,
    job: Option<&str>,
    shard: Option<i32>,
    lock: bool,
) -> Result<Vec<LeaseRecord>, sqlx::Error> {
    let q = quote_ident(schema);
    let rows = sqlx::query(&format!(
        "SELECT job, shard, host, pid, acquired_at, heartbeat_at, expires_at, \
         extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_secs, \
         extract(epoch FROM expires_at - now())::float8 AS expires_in_secs \
         FROM {q}.leases WHERE ($1::text IS NULL OR job = $1) AND ($2::int4 IS NULL OR shard = $2) \
         ORDER BY job, shard{}",
        if lock { " FOR UPDATE" } else { "" }
    ))
    .bind(job)
    .bind(shard)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(LeaseRecord {
                job: row.try_get("job")?,
                shard: row.try_get("shard")?,
                host: row.try_get("host")?,
                pid: row.try_get("pid")?,
                acquired_at: row.try_get("acquired_at")?,
                heartbeat_at: row.try_get("heartbeat_at")?,
                expires_at: row.try_get("expires_at")?,
                heartbeat_age_secs: row.try_get("heartbeat_age_secs")?,
                expires_in_secs: row.try_get("expires_in_secs")?,
            })
        })
        .collect()
}

/// Deletes leases by job and shard; returns how many were deleted.
pub async fn delete_leases(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
    shards: &[i32],
) -> Result<u64, sqlx::Error> {
    let q = quote_ident(schema);
    let deleted = sqlx::query(&format!(
        "DELETE FROM {q}.leases WHERE job = $1 AND shard = ANY($2)"
    ))
    .bind(job)
    .bind(shards)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(deleted)
}

/// Takes the job's advisory lock (the one `register_job` takes) for the rest
/// of the transaction, so that no runner registers or lays out the job meanwhile.
pub async fn lock_job(conn: &mut PgConnection, job: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("reencrypt job {job}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes a job; its leases, ranges and attention rows go with it (ON DELETE
/// CASCADE). Evidence records in `runs` are kept. Returns whether the job existed.
pub async fn delete_job(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
) -> Result<bool, sqlx::Error> {
    let q = quote_ident(schema);
    let deleted = sqlx::query(&format!("DELETE FROM {q}.jobs WHERE job = $1"))
        .bind(job)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(deleted == 1)
}

/// One evidence record of a run or a verification, as stored in `runs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub job: String,
    /// `run` or `verify`.
    pub command: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
    pub operator: String,
    pub host: String,
    pub exit_code: i32,
    pub report: serde_json::Value,
}

/// Inserts an evidence record; returns its id.
pub async fn insert_run(
    conn: &mut PgConnection,
    schema: &str,
    record: &RunRecord,
) -> Result<i64, sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query_scalar(&format!(
        "INSERT INTO {q}.runs (job, command, started_at, finished_at, operator, host, exit_code, report) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id"
    ))
    .bind(&record.job)
    .bind(&record.command)
    .bind(record.started_at)
    .bind(record.finished_at)
    .bind(&record.operator)
    .bind(&record.host)
    .bind(record.exit_code)
    .bind(&record.report)
    .fetch_one(conn)
    .await
}

/// Reads the latest evidence record of each command (`run`, `verify`) of a job.
pub async fn latest_runs(
    conn: &mut PgConnection,
    schema: &str,
    job: &str,
) -> Result<Vec<(i64, RunRecord)>, sqlx::Error> {
    let q = quote_ident(schema);
    let rows = sqlx::query(&format!(
        "SELECT DISTINCT ON (command) id, job, command, started_at, finished_at, operator, host, exit_code, report \
         FROM {q}.runs WHERE job = $1 ORDER BY command, finished_at DESC, id DESC"
    ))
    .bind(job)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                RunRecord {
                    job: row.try_get("job")?,
                    command: row.try_get("command")?,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                    operator: row.try_get("operator")?,
                    host: row.try_get("host")?,
                    exit_code: row.try_get("exit_code")?,
                    report: row.try_get("report")?,
                },
            ))
        })
        .collect()
}
