//! The `run` command: validates the configuration, registers or resumes the
//! job, takes the lease, rotates every range of this shard, sweeps, and
//! returns the summary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, Counts, JobIdentity, RangeRecord};
use crate::classify::Keyring;
use crate::cli::{self, RunArgs, ScanOrder, TargetArgs, TuningArgs};
use crate::db::{Database, Timeouts};
use crate::error::Failure;
use crate::keys::KeySet;
use crate::lease::{self, Holder};
use crate::pipeline::{
    self, BatchSizing, Pass, PhysicalScan, PipelineSettings, RangeWork, RetryPolicy,
};
use crate::progress::Progress;
use crate::report::{RunSummary, TargetSummary};
use crate::statements::{could_forge, Statements};
use crate::sweep::{self, PassRecord, RangePassed, TableState};
use crate::target::{Target, TargetSpec, UniqueKeySpec};
use crate::throttle::{Throttle, ThrottleSettings};

/// Parses target and unique-key options; rejects duplicates and an empty list.
pub fn parse_targets(args: &TargetArgs) -> Result<(Vec<TargetSpec>, Vec<UniqueKeySpec>), Failure> {
    let specs: Vec<TargetSpec> = args
        .targets
        .iter()
        .flat_map(|list| crate::target::split_target_list(list))
        .filter(|t| !t.trim().is_empty())
        .map(|t| TargetSpec::parse(&t).map_err(|e| Failure::Config(e.to_string())))
        .collect::<Result<_, _>>()?;
    if specs.is_empty() {
        return Err(Failure::Config(
            "no target given: pass --target [schema.]table.column".into(),
        ));
    }
    let unique_keys = args
        .unique_keys
        .iter()
        .map(|u| UniqueKeySpec::parse(u).map_err(Failure::Config))
        .collect::<Result<_, _>>()?;
    Ok((specs, unique_keys))
}

/// Converts the reason a range stopped into the run's failure, naming the
/// target and range, so that the final message shows where the run stopped.
fn range_failure(label: &str, range_index: i32, error: pipeline::RangeError) -> Failure {
    match error {
        pipeline::RangeError::Interrupted => Failure::Interrupted,
        other => Failure::Retryable(format!("{label}, range {range_index}: {other}")),
    }
}

/// Resolves every target against the catalog, in one read-only transaction.
pub async fn resolve_targets(
    db: &Database,
    specs: &[TargetSpec],
    unique_keys: &[UniqueKeySpec],
) -> Result<Vec<Target>, Failure> {
    let mut tx = db
        .begin_read_only()
        .await
        .map_err(|e| Failure::from_database("cannot connect to the database", &e))?;
    let mut targets: Vec<Target> = Vec::new();
    for spec in specs {
        let target = Target::resolve(&mut tx, spec, unique_keys)
            .await
            .map_err(|e| match e {
                crate::target::ResolveError::Target(t) => Failure::Config(t.to_string()),
                crate::target::ResolveError::Database(d) => {
                    Failure::from_database("cannot read the catalog", &d)
                }
            })?;
        if targets.iter().any(|t| t.label() == target.label()) {
            return Err(Failure::Config(format!(
                "target {} is given twice",
                target.label()
            )));
        }
        targets.push(target);
    }
    tx.commit()
        .await
        .map_err(|e| Failure::from_database("cannot read the catalog", &e))?;
    // A unique key for a table no target is in would be ignored, which
    // hides a misspelt table name.
    if let Some(unused) = unique_keys.iter().find(|u| {
        !targets
            .iter()
            .any(|t| t.table == u.table && u.schema.as_deref().is_none_or(|s| s == t.schema))
    }) {
        let table = match &unused.schema {
            Some(schema) => format!("{schema}.{}", unused.table),
            None => unused.table.clone(),
        };
        return Err(Failure::Config(format!(
            "--unique-key names table {table}, which no --target is in; name the table of a target"
        )));
    }
    Ok(targets)
}

/// Rejects a target whose table has a DO INSTEAD rule on UPDATE: its
/// writes would not reach the rows read.
pub fn reject_instead_rules(targets: &[Target]) -> Result<(), Failure> {
    match targets.iter().find(|t| t.instead_rule) {
        Some(target) => Err(Failure::Config(
            crate::target::TargetError::InsteadRule(format!("{}.{}", target.schema, target.table))
                .to_string(),
        )),
        None => Ok(()),
    }
}

/// Divides the adaptive batch limits among the writers. Each writer holds up
/// to two batches, so memory stays the same whatever the writer count. A
/// fixed `--batch-size` is left as given.
pub fn shared_by_writers(sizing: BatchSizing, writers: u32) -> BatchSizing {
    if sizing.target_duration.is_none() {
        return sizing;
    }
    let writers = writers.max(1) as usize;
    let max_rows = (sizing.max_rows / writers).max(sizing.min_rows);
    BatchSizing {
        rows: sizing.rows.min(max_rows),
        max_rows,
        max_bytes: (sizing.max_bytes / writers).max(1),
        ..sizing
    }
}

/// The maximum of `--threads`. Decryption takes about a microsecond per
/// value, so a few threads keep up with the database.
const MAX_CRYPTO_THREADS: usize = 256;

/// Validates tuning options into timeouts, batch sizing and retry bounds.
pub fn tuning(args: &TuningArgs) -> Result<(Timeouts, BatchSizing, RetryPolicy), Failure> {
    let positive = |name: &str, value: u64| {
        if value == 0 {
            Err(Failure::Config(format!("{name} must be greater than 0")))
        } else {
            Ok(())
        }
    };
    // PostgreSQL takes a timeout in milliseconds as a 32-bit integer.
    let timeout = |name: &str, value: u64| {
        positive(name, value)?;
        if value > i32::MAX as u64 {
            return Err(Failure::Config(format!(
                "{name} must be at most {} (PostgreSQL's limit), got {value}",
                i32::MAX
            )));
        }
        Ok(())
    };
    timeout("--lock-timeout-ms", args.lock_timeout_ms)?;
    timeout("--statement-timeout-ms", args.statement_timeout_ms)?;
    timeout(
        "--idle-in-transaction-timeout-ms",
        args.idle_in_transaction_timeout_ms,
    )?;
    positive("--batch-max-bytes", args.batch_max_bytes as u64)?;
    positive("--max-retries", u64::from(args.max_retries))?;
    positive("--batch-target-ms", args.batch_target_ms)?;
    if let Some(rows) = args.batch_size {
        if rows == 0 || rows > 1_000_000 {
            return Err(Failure::Config(format!(
                "--batch-size must be between 1 and 1000000, got {rows}"
            )));
        }
    }
    if let Some(threads) = args.threads {
        if threads == 0 || threads > MAX_CRYPTO_THREADS {
            return Err(Failure::Config(format!(
                "--threads must be between 1 and {MAX_CRYPTO_THREADS}, got {threads}"
            )));
        }
    }

    let timeouts = Timeouts {
        lock_timeout_ms: args.lock_timeout_ms,
        statement_timeout_ms: args.statement_timeout_ms,
        idle_in_transaction_timeout_ms: args.idle_in_transaction_timeout_ms,
    };
    let sizing = match args.batch_size {
        Some(rows) => BatchSizing {
            rows,
            min_rows: 1,
            max_rows: rows,
            max_bytes: args.batch_max_bytes,
            target_duration: None,
        },
        None => BatchSizing {
            rows: cli::DEFAULT_BATCH_ROWS,
            min_rows: cli::MIN_BATCH_ROWS,
            max_rows: cli::MAX_BATCH_ROWS,
            max_bytes: args.batch_max_bytes,
            target_duration: Some(Duration::from_millis(args.batch_target_ms)),
        },
    };
    let retry = RetryPolicy {
        max_attempts: args.max_retries,
        max_elapsed: Duration::from_secs(args.retry_budget_secs),
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(30),
    };
    Ok((timeouts, sizing, retry))
}

/// Builds the rayon pool for decryption and encryption.
pub fn crypto_pool(threads: Option<usize>) -> Result<Arc<rayon::ThreadPool>, Failure> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("reencrypt-crypto-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Failure::Config(format!("cannot start {threads} crypto threads: {e}")))
}

/// The default job name: stable for the same targets and new key, so that
/// rerunning the same command resumes the same job.
pub fn default_job_name(targets: &[Target], keys: &KeySet) -> String {
    let mut hash = Sha256::new();
    for target in targets {
        hash.update(target.label().as_bytes());
        hash.update([0]);
    }
    let digest = hex::encode(hash.finalize());

    // A new key from Vault is named by its location, not its fingerprint, so
    // that a rerun after the secret gets a new version finds the same job and
    // its stored version check rejects the resume instead of starting afresh.
    let new_key = match &keys.new.origin {
        crate::keys::KeyOrigin::Vault {
            mount, path, field, ..
        } => {
            let location = Sha256::digest(format!("{mount}\0{path}\0{field}").as_bytes());
            format!("vault{}", &hex::encode(location)[..8])
        }
        _ => keys.new.key.fingerprint()[..8].to_string(),
    };
    format!("rotate-{new_key}-{}", &digest[..8])
}

/// Ensures the target's ranges exist (the first runner of a job computes them),
/// and returns them.
async fn ensure_ranges(
    db: &Database,
    schema: &str,
    job: &str,
    target: &Target,
    statements: &Statements,
    range_count: usize,
    order: ScanOrder,
) -> Result<(Vec<RangeRecord>, bool), sqlx::Error> {
    let label = target.label();
    let mut tx = db.begin().await?;
    checkpoint::lock_job(&mut tx, job).await?;
    let existing = checkpoint::load_ranges(&mut tx, schema, job, &label).await?;
    if !existing.is_empty() {
        tx.commit().await?;
        return Ok((existing, false));
    }
    if order == ScanOrder::Physical {
        insert_block_ranges(&mut tx, schema, job, target, range_count).await?;
        let ranges = checkpoint::load_ranges(&mut tx, schema, job, &label).await?;
        tx.commit().await?;
        return Ok((ranges, true));
    }

    // The upper bound is fixed now, so the scan ends while the application
    // keeps inserting rows (it writes those under the new key).
    let upper: Option<Vec<String>> =
        fetch_key(&mut tx, &statements.max_key, statements.key_len).await?;
    let key_columns: Vec<String> = target.key.iter().map(|k| k.name.clone()).collect();
    let bounds = match &upper {
        // An empty table: every range is empty, and done at once below.
        None => vec![(None, None); range_count],
        Some(upper) if range_count == 1 => vec![(None, Some(upper.clone()))],
        Some(upper) => split_bounds(&mut tx, statements, upper, range_count).await?,
    };
    checkpoint::insert_ranges(
        &mut tx,
        schema,
        job,
        &label,
        &key_columns,
        &bounds,
        target.estimated_rows,
    )
    .await?;
    if upper.is_none() {
        // An empty table: every range is done at once.
        for index in 0..range_count {
            checkpoint::set_range_status(&mut tx, schema, job, &label, index as i32, "done")
                .await?;
        }
    }
    let ranges = checkpoint::load_ranges(&mut tx, schema, job, &label).await?;
    tx.commit().await?;
    Ok((ranges, true))
}

/// The key columns recorded for ranges of row positions.
const POSITION_COLUMNS: [&str; 1] = ["ctid"];

/// Inserts ranges of row positions for a pass in physical order: the table's
/// blocks now, split into `range_count` runs of about equal length. Every
/// row version in a later block was written after the horizon of a pass
/// that read it before this.
async fn insert_block_ranges(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    job: &str,
    target: &Target,
    range_count: usize,
) -> Result<(), sqlx::Error> {
    let blocks = table_blocks(conn, &target.quoted_table()).await?;
    let at = |index: usize| {
        Some(vec![pipeline::block_start(
            blocks * index as u64 / range_count as u64,
        )])
    };
    let bounds: Vec<checkpoint::RangeBounds> =
        (0..range_count).map(|i| (at(i), at(i + 1))).collect();
    let columns: Vec<String> = POSITION_COLUMNS.iter().map(|c| c.to_string()).collect();
    checkpoint::insert_ranges(
        conn,
        schema,
        job,
        &target.label(),
        &columns,
        &bounds,
        target.estimated_rows,
    )
    .await
}

/// Splits the keys up to `upper` into `range_count` ranges of about equal row
/// counts. A table with fewer rows than ranges gets empty trailing ranges.
async fn split_bounds(
    conn: &mut sqlx::PgConnection,
    statements: &Statements,
    upper: &[String],
    range_count: usize,
) -> Result<Vec<checkpoint::RangeBounds>, sqlx::Error> {
    let total: i64 = sqlx::query_scalar(&statements.count)
        .fetch_one(&mut *conn)
        .await?;
    let step = (total / range_count as i64).max(1);
    let mut query = sqlx::query(&statements.split_points);
    for part in upper {
        query = query.bind(part);
    }
    let rows = query.bind(step).fetch_all(&mut *conn).await?;

    let mut bounds = Vec::with_capacity(range_count);
    let mut lower: Option<Vec<String>> = None;
    for row in rows.iter().take(range_count - 1) {
        let point = (0..statements.key_len)
            .map(|i| sqlx::Row::try_get::<String, _>(row, i))
            .collect::<Result<Vec<_>, _>>()?;
        if point.as_slice() == upper {
            break;
        }
        bounds.push((lower.clone(), Some(point.clone())));
        lower = Some(point);
    }
    bounds.push((lower, Some(upper.to_vec())));
    while bounds.len() < range_count {
        bounds.push((Some(upper.to_vec()), Some(upper.to_vec())));
    }
    Ok(bounds)
}

async fn fetch_key(
    conn: &mut sqlx::PgConnection,
    sql: &str,
    key_len: usize,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let row = sqlx::query(sql).fetch_optional(conn).await?;
    row.map(|row| {
        (0..key_len)
            .map(|i| sqlx::Row::try_get::<String, _>(&row, i))
            .collect()
    })
    .transpose()
}

/// Under `--scan-order auto`, a table read in physical order must be larger
/// than this many times the server's `shared_buffers`. It was measured on
/// one 2-core machine with 128 MiB of shared buffers and 1 writer, in rows/s
/// as a ratio to a plain `UPDATE` of the same table. On a table 1.4 times
/// that size, key order was faster (0.89 against 0.72 in physical order).
/// At 1.85 times, the two were even (0.67 and 0.68). At 2.5 and 3.6 times,
/// physical order was faster (0.70 against 0.60, and 0.74 against 0.58).
const AUTO_PHYSICAL_FACTOR_ALONE: f64 = 2.0;

/// The same factor for a job with several writers, where physical order
/// gains more from the second writer than key order. On the same machine
/// with 2 writers, key order was faster on a table 1.0 times
/// `shared_buffers` (115,700 rows/s against 108,800) and on one that fit in
/// 4 GB of them (125,300 against 121,300). Physical order was faster at
/// 1.4 times (116,700 against 110,300, and 123,400 against 111,200 with
/// the build before). 1.2 is an estimate of where the orders are even.
const AUTO_PHYSICAL_FACTOR_BESIDE_OTHERS: f64 = 1.2;

/// Returns the factor of `shared_buffers` over which `auto` takes physical
/// order for a job of `writers` writers.
fn auto_physical_factor(writers: u32) -> f64 {
    if writers > 1 {
        AUTO_PHYSICAL_FACTOR_BESIDE_OTHERS
    } else {
        AUTO_PHYSICAL_FACTOR_ALONE
    }
}

/// Writers that `--writers auto` gives a new job that reads a target in
/// physical order. There a writer alone keeps one server process busy with
/// its statements, one at a time, and leaves the other cores idle. At 5M
/// rows on a 2-core machine, 2 writers gave 1.03 to 1.18 times the rows/s
/// of one, and 3 or 4 nothing more. In key order a writer alone already
/// kept both cores busy.
/// NOTE: measured on one 2-core machine only. A server with more cores may
/// gain from more writers, which `--writers` then has to ask for.
pub const AUTO_WRITERS_PHYSICAL: u32 = 2;

/// Returns the number of writers of a run and why: `--writers` when it is
/// a number. For `auto`, the job's own count when the run resumes a job,
/// 1 with `--pause-between-batches-ms`, and otherwise
/// `AUTO_WRITERS_PHYSICAL` when the order `auto` takes for a writer alone
/// is physical for some target, 1 if for none.
pub async fn resolve_writers(
    db: &Database,
    args: &RunArgs,
    targets: &[Target],
    keys: &KeySet,
) -> Result<(u32, String), Failure> {
    let cli::Writers::Count(count) = args.writers else {
        return auto_writers(db, args, targets, keys).await;
    };
    Ok((count, "--writers".into()))
}

async fn auto_writers(
    db: &Database,
    args: &RunArgs,
    targets: &[Target],
    keys: &KeySet,
) -> Result<(u32, String), Failure> {
    if !args.restart {
        let job = match &args.job {
            Some(job) => job.clone(),
            None => default_job_name(targets, keys),
        };
        let context = "cannot read the job's number of writers";
        let fail = |e: sqlx::Error| Failure::from_database(context, &e);
        let mut tx = db.begin_read_only().await.map_err(fail)?;
        let stored = checkpoint::stored_writers(&mut tx, &args.database.schema, &job)
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        if let Some(stored) = stored {
            return match u32::try_from(stored) {
                Ok(count) if (1..=cli::MAX_WRITERS).contains(&count) => Ok((
                    count,
                    format!("--writers auto: job {job} was started with {count}"),
                )),
                _ => Err(Failure::Config(format!(
                    "job {job} has an invalid number of writers ({stored}); use --restart to start it again"
                ))),
            };
        }
    }
    let paused = args.pause_between_batches_ms.is_some_and(|pause| pause > 0);
    new_job_writers(db, targets, OrderOptions::of_run(args, 1), paused).await
}

/// Returns the writers `--writers auto` gives a new job of these order
/// options, and why (see `resolve_writers`). `paused` is true when the run
/// pauses after every batch.
pub async fn new_job_writers(
    db: &Database,
    targets: &[Target],
    options: OrderOptions,
    paused: bool,
) -> Result<(u32, String), Failure> {
    // A pause after every batch applies to each writer, so a second one
    // would double the load that the pause was set to limit.
    if paused {
        return Ok((
            1,
            "--writers auto: --pause-between-batches-ms is set".into(),
        ));
    }
    let options = OrderOptions {
        writers: 1,
        ..options
    };
    for target in targets {
        let state = TableState::read(db, &target.quoted_table())
            .await
            .map_err(|e| Failure::from_database("cannot read the table's state", &e))?;
        let choice = choose_order(db, target, &state, options).await?;
        if choice.order == ScanOrder::Physical {
            return Ok((
                AUTO_WRITERS_PHYSICAL,
                format!(
                    "--writers auto: {} is read in physical order",
                    target.label()
                ),
            ));
        }
    }
    Ok((
        1,
        "--writers auto: no target is read in physical order".into(),
    ))
}

/// The options that decide the order of a new job's pass.
#[derive(Debug, Clone, Copy)]
pub struct OrderOptions {
    pub requested: ScanOrder,
    pub shard_count: u32,
    pub max_sweeps: u32,
    pub writers: u32,
}

impl OrderOptions {
    /// Returns the options of `run` as given, with its number of writers.
    pub fn of_run(args: &RunArgs, writers: u32) -> OrderOptions {
        OrderOptions {
            requested: args.scan_order,
            shard_count: args.shard_count,
            max_sweeps: args.max_sweeps,
            writers,
        }
    }

    /// Rejects a physical order that the other options rule out.
    pub fn check(&self) -> Result<(), Failure> {
        if self.requested != ScanOrder::Physical {
            return Ok(());
        }
        if self.shard_count > 1 {
            return Err(Failure::Config(
                "--scan-order physical runs as one shard; split the work with --writers, or use --scan-order key with --shard-count".into(),
            ));
        }
        if self.max_sweeps == 0 {
            return Err(Failure::Config(
                "--scan-order physical needs the sweep, since a row the application updates during the pass may move behind it; use --max-sweeps of 1 or more".into(),
            ));
        }
        Ok(())
    }

    /// Returns the options of a `run` given none of them.
    pub fn defaults() -> OrderOptions {
        OrderOptions {
            requested: ScanOrder::Auto,
            shard_count: 1,
            max_sweeps: crate::cli::DEFAULT_MAX_SWEEPS,
            writers: 1,
        }
    }
}

/// The order of a new job's pass over a target, and why it was chosen.
#[derive(Debug, Clone)]
pub struct OrderChoice {
    pub order: ScanOrder,
    pub reason: String,
}

impl OrderChoice {
    fn new(order: ScanOrder, reason: impl Into<String>) -> OrderChoice {
        OrderChoice {
            order,
            reason: reason.into(),
        }
    }
}

/// Chooses the order of a new job's pass over `target`, `key` or `physical`.
/// With `physical`, rejects a target that cannot be read by row position: a
/// table with partitions or child tables, or a server before PostgreSQL 14,
/// which has no range scans by row position. With `auto`, such a target, a
/// job with several shards or without sweeps, a table whose sweep reads
/// every row (see `TableState`), and a table that fits the server's cache
/// get key order (see `auto_physical_factor`).
pub async fn choose_order(
    db: &Database,
    target: &Target,
    state: &TableState,
    options: OrderOptions,
) -> Result<OrderChoice, Failure> {
    let explicit = match options.requested {
        ScanOrder::Key => return Ok(OrderChoice::new(ScanOrder::Key, "--scan-order key")),
        ScanOrder::Physical => true,
        ScanOrder::Auto => false,
    };
    let key_order = |why: String| Ok(OrderChoice::new(ScanOrder::Key, why));
    let reject = |why: String, rejection: String| {
        if explicit {
            Err(Failure::Config(format!(
                "--scan-order physical {rejection}; use --scan-order key"
            )))
        } else {
            key_order(why)
        }
    };

    if !target.single_table {
        return reject(
            "the table is partitioned or has child tables".into(),
            format!(
                "reads one table by row position, but {} is partitioned or has child tables",
                target.label()
            ),
        );
    }
    // `run` rejects these settings with `physical` before any work.
    if options.shard_count > 1 {
        return key_order("the job runs as several shards".into());
    }
    if options.max_sweeps == 0 {
        return key_order("sweeps are off (--max-sweeps 0)".into());
    }
    if let (false, Some(unsuitable)) = (explicit, state.unsuitable()) {
        // The sweep would read every row in key order after the pass.
        return key_order(format!("the sweep reads every row: {unsuitable}"));
    }

    let context = "cannot read the table's size";
    let mut tx = db
        .begin_read_only()
        .await
        .map_err(|e| Failure::from_database(context, &e))?;
    let (version, cache, size): (i32, i64, i64) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int, \
                pg_size_bytes(current_setting('shared_buffers')), \
                pg_relation_size($1::text::regclass)",
    )
    .bind(target.quoted_table())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| Failure::from_database(context, &e))?;
    tx.commit()
        .await
        .map_err(|e| Failure::from_database(context, &e))?;

    if version < 140_000 {
        return reject(
            format!("the server is version {version}, before PostgreSQL 14"),
            format!(
                "needs PostgreSQL 14 or later for range scans by row position, and the server is version {version}"
            ),
        );
    }
    tracing::debug!(target = %target.label(), table_bytes = size, shared_buffers_bytes = cache, "Table size read for the scan order.");
    if explicit {
        return Ok(OrderChoice::new(
            ScanOrder::Physical,
            "--scan-order physical",
        ));
    }
    let factor = auto_physical_factor(options.writers);
    let limit = (cache as f64 * factor) as i64;
    let sizes = format!(
        "the table takes {}, against {} for {factor} times shared_buffers",
        size_text(size),
        size_text(limit)
    );
    if size > limit {
        Ok(OrderChoice::new(ScanOrder::Physical, sizes))
    } else {
        key_order(sizes)
    }
}

/// Formats a size in bytes for a person: KiB below a MiB, MiB above.
fn size_text(bytes: i64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", (bytes + 1023) >> 10)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Checks the options of `run` that need no I/O, for a run and for a dry
/// run alike. The targets and tuning options are checked where they are
/// parsed.
pub fn check_options(args: &RunArgs) -> Result<(), Failure> {
    if args.job.as_ref().is_some_and(|job| job.trim().is_empty()) {
        return Err(Failure::Config("--job must not be empty".into()));
    }
    // Reports, logs and `status` print the job's name as it is.
    if let Some(job) = args.job.as_ref().filter(|job| job.chars().any(could_forge)) {
        return Err(Failure::Config(format!(
            "invalid --job {job:?}: it contains a control or invisible character; use a name without one"
        )));
    }
    if args.database.schema.is_empty() {
        return Err(Failure::Config("--schema must not be empty".into()));
    }
    if args.database.schema.starts_with("pg_") {
        return Err(Failure::Config(format!(
            "--schema {:?} starts with pg_, which PostgreSQL reserves for its own schemas",
            args.database.schema
        )));
    }

    crate::inspect::check_report_path(args.output.report.as_deref())?;
    crate::inspect::report_limit(args.output.report_limit)?;

    if let cli::Writers::Count(count) = args.writers {
        if count == 0 || count > cli::MAX_WRITERS {
            return Err(Failure::Config(format!(
                "--writers must be between 1 and {} or auto, got {count}",
                cli::MAX_WRITERS
            )));
        }
    }
    if args.shard_count == 0 {
        return Err(Failure::Config("--shard-count must be at least 1".into()));
    }
    if args.shard_index >= args.shard_count {
        return Err(Failure::Config(format!(
            "--shard-index must be below --shard-count (got index {} of {})",
            args.shard_index, args.shard_count
        )));
    }
    OrderOptions::of_run(args, 1).check()?;

    if args.lease_ttl_secs < 3 {
        return Err(Failure::Config(
            "--lease-ttl-secs must be at least 3".into(),
        ));
    }

    if let Some(rate) = args.max_rows_per_second {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(Failure::Config(
                "--max-rows-per-second must be a positive number".into(),
            ));
        }
    }
    if let Some(lag) = args.max_replication_lag_secs {
        if !(lag >= 0.0 && lag.is_finite()) {
            return Err(Failure::Config(
                "--max-replication-lag-secs must be zero or a positive number".into(),
            ));
        }
    }

    metrics_listen(&args.metrics.metrics_listen)?;
    crate::push::gateway_url(&args.metrics)?;
    Ok(())
}

/// Reads `--metrics-listen`: an address to serve metrics on, or `None` for `off`.
pub fn metrics_listen(listen: &str) -> Result<Option<std::net::SocketAddr>, Failure> {
    match listen.trim() {
        "off" | "" => Ok(None),
        address => address.parse().map(Some).map_err(|_| {
            Failure::Config(format!(
                "invalid --metrics-listen {address:?}: expected HOST:PORT or off"
            ))
        }),
    }
}

/// Returns the identity a run of these options gives its job.
fn job_identity(args: &RunArgs, writers: u32, targets: &[Target], keys: &KeySet) -> JobIdentity {
    let job = match &args.job {
        Some(job) => job.clone(),
        None => default_job_name(targets, keys),
    };
    let evidence = crate::report::KeyEvidence::from_keys(keys);
    JobIdentity {
        job,
        targets: targets.iter().map(Target::label).collect(),
        new_key_fingerprint: evidence.new_key_fingerprint,
        old_key_fingerprints: evidence.old_key_fingerprints,
        new_key_version: evidence.new_key_version,
        old_key_versions: evidence.old_key_versions,
        shard_count: args.shard_count as i32,
        writers: writers as i32,
    }
}

/// The job that `run --dry-run` found for its options.
pub struct ResumedJob {
    pub job: String,
    /// Each target's order, `None` where the job has no ranges for it yet.
    pub orders: Vec<Option<ScanOrder>>,
}

/// Reads, without writing, the job that a run of these options would
/// resume, for `run --dry-run`. Returns `None` for a new job. Rejects, as
/// the run does, options that differ from the job's.
pub async fn resumed_job(
    db: &Database,
    args: &RunArgs,
    writers: u32,
    targets: &[Target],
    keys: &KeySet,
) -> Result<Option<ResumedJob>, Failure> {
    let identity = job_identity(args, writers, targets, keys);
    let schema = &args.database.schema;
    let context = "cannot read the job's checkpoints";
    let fail = |e: sqlx::Error| Failure::from_database(context, &e);
    let mut tx = db.begin_read_only().await.map_err(fail)?;
    let Some(matched) = checkpoint::check_stored_job(&mut tx, schema, &identity)
        .await
        .map_err(fail)?
    else {
        return Ok(None);
    };
    matched.map_err(|e| Failure::Config(e.to_string()))?;
    let mut orders = Vec::with_capacity(targets.len());
    for target in targets {
        let columns =
            checkpoint::range_key_columns(&mut tx, schema, &identity.job, &target.label())
                .await
                .map_err(fail)?;
        let Some(columns) = columns else {
            orders.push(None);
            continue;
        };
        let physical = columns == POSITION_COLUMNS;
        check_job_order(&identity.job, args.scan_order, physical)?;
        check_job_sweeps(&identity.job, &target.label(), physical, args.max_sweeps)?;
        check_job_key(&identity.job, target, &columns)?;
        orders.push(Some(match physical {
            true => ScanOrder::Physical,
            false => ScanOrder::Key,
        }));
    }
    tx.commit().await.map_err(fail)?;
    Ok(Some(ResumedJob {
        job: identity.job,
        orders,
    }))
}

/// Rejects a resume of a job's pass over `target` with another paging key than
/// the one its ranges were made for: their bounds are values of that key.
fn check_job_key(job: &str, target: &Target, key_columns: &[String]) -> Result<(), Failure> {
    if key_columns == POSITION_COLUMNS {
        return Ok(());
    }
    let paged_by: Vec<&str> = target.key.iter().map(|k| k.name.as_str()).collect();
    if key_columns
        .iter()
        .map(String::as_str)
        .eq(paged_by.iter().copied())
    {
        return Ok(());
    }
    Err(Failure::Config(format!(
        "job {job} pages {} by ({}), but this run would page it by ({}); use the settings the job started with (--unique-key), or --restart",
        target.label(),
        key_columns.join(", "),
        paged_by.join(", ")
    )))
}

/// Rejects a resume of a job's pass in physical order without sweeps.
fn check_job_sweeps(
    job: &str,
    label: &str,
    physical: bool,
    max_sweeps: u32,
) -> Result<(), Failure> {
    if physical && max_sweeps == 0 {
        return Err(Failure::Config(format!(
            "job {job} reads {label} in physical order, which needs the sweep; use --max-sweeps of 1 or more"
        )));
    }
    Ok(())
}

/// Rejects a `--scan-order` other than the one a job's pass started with.
fn check_job_order(job: &str, requested: ScanOrder, physical: bool) -> Result<(), Failure> {
    let requested = match requested {
        ScanOrder::Auto => return Ok(()),
        ScanOrder::Key => false,
        ScanOrder::Physical => true,
    };
    if requested == physical {
        return Ok(());
    }
    let started = if physical { "physical" } else { "key" };
    Err(Failure::Config(format!(
        "job {job} was started with --scan-order {started}; use the settings the job started with, or --restart"
    )))
}

/// Runs the job to completion or to the first failure.
pub async fn run(args: &RunArgs, stop: Arc<AtomicBool>) -> Result<RunSummary, Failure> {
    run_to_record(args, stop)
        .await
        .map_err(|stopped| stopped.failure)
}

/// A run that failed or was interrupted, with the job as the run left it
/// when the job had been registered by then, for the evidence record.
pub struct RunStopped {
    pub failure: Failure,
    pub summary: Option<RunSummary>,
}

/// Runs the job as `run` does; a failure comes with the job's summary when
/// it could be read.
pub async fn run_to_record(
    args: &RunArgs,
    stop: Arc<AtomicBool>,
) -> Result<RunSummary, RunStopped> {
    let mut stopped_summary = None;
    run_job(args, stop, &mut stopped_summary)
        .await
        .map_err(|failure| RunStopped {
            failure,
            summary: stopped_summary,
        })
}

/// Runs the job. On a failure after the job was registered, leaves the
/// job's summary in `stopped_summary`.
async fn run_job(
    args: &RunArgs,
    stop: Arc<AtomicBool>,
    stopped_summary: &mut Option<RunSummary>,
) -> Result<RunSummary, Failure> {
    let started_at = chrono::Utc::now();
    let started = Instant::now();

    // Everything the user typed is checked before any I/O.
    let (specs, unique_keys) = parse_targets(&args.targets)?;
    let (timeouts, sizing, retry) = tuning(&args.tuning)?;
    check_options(args)?;
    let keys = crate::keys::resolve(&args.keys).await?;
    let pool = crypto_pool(args.tuning.threads)?;

    // Database, schema, targets. The pool opens connections only as they
    // are needed, so it may allow for more writers than the run gets.
    let pool_writers = match args.writers {
        cli::Writers::Count(count) => count,
        cli::Writers::Auto => AUTO_WRITERS_PHYSICAL,
    };
    let connect = |writers: u32| {
        Database::connect_lazy(&args.database.database_url, writers * 2 + 3, timeouts).map_err(
            |e| {
                Failure::Config(format!(
                    "invalid --database-url: {}",
                    crate::db::describe(&e)
                ))
            },
        )
    };
    let mut db = connect(pool_writers)?;
    db.probe()
        .await
        .map_err(|e| Failure::from_connect("cannot connect to the database", &e))?;
    let targets = resolve_targets(&db, &specs, &unique_keys).await?;
    reject_instead_rules(&targets)?;
    checkpoint::migrate(&db, &args.database.schema)
        .await
        .map_err(|e| Failure::from_migration(&args.database.schema, &e))?;
    let schema = args.database.schema.clone();
    let (writers, why) = resolve_writers(&db, args, &targets, &keys).await?;
    if args.writers == cli::Writers::Auto {
        tracing::info!(writers, reason = %why, "Writers chosen.");
    }
    // A job resumed with `auto` may have more writers than the pool allows for.
    if writers > pool_writers {
        db = connect(writers)?;
    }
    let sizing = shared_by_writers(sizing, writers);

    // The job: created, or resumed when everything matches.
    let identity = job_identity(args, writers, &targets, &keys);
    let job = identity.job.clone();
    let origins = serde_json::json!({
        "new": { "fingerprint": keys.new.key.fingerprint(), "origin": keys.new.origin },
        "old": keys.old.iter().map(|k| serde_json::json!({ "fingerprint": k.key.fingerprint(), "origin": k.origin })).collect::<Vec<_>>(),
    });
    let counts_before = {
        let mut tx = db
            .begin()
            .await
            .map_err(|e| Failure::from_database("cannot register the job", &e))?;
        checkpoint::register_job(&mut tx, &schema, &identity, &origins, args.restart)
            .await
            .map_err(|e| Failure::from_database("cannot register the job", &e))?
            .map_err(|e| Failure::Config(e.to_string()))?;
        let counts_before = checkpoint::job_counts(&mut tx, &schema, &job)
            .await
            .map_err(|e| Failure::from_database("cannot read the job's checkpoints", &e))?;
        tx.commit()
            .await
            .map_err(|e| Failure::from_database("cannot register the job", &e))?;
        counts_before
    };
    crate::metrics::record_job_info(
        &job,
        &identity.new_key_fingerprint,
        &identity.old_key_fingerprints.join(","),
        &identity
            .new_key_version
            .map_or_else(String::new, |v| v.to_string()),
        &identity
            .old_key_versions
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    crate::metrics::record_state("running");

    // One runner per job and shard.
    let shard = args.shard_index as i32;
    let holder = Holder::current();
    let ttl = Duration::from_secs(args.lease_ttl_secs);
    lease::acquire(&db, &schema, &job, shard, &holder, ttl)
        .await
        .map_err(|e| match e {
            lease::LeaseError::Busy(busy) => Failure::Retryable(busy.to_string()),
            lease::LeaseError::Database(d) => {
                Failure::from_database("cannot take the job's lease", &d)
            }
        })?;
    let lease_lost = Arc::new(AtomicBool::new(false));
    let heartbeat = lease::spawn_heartbeat(
        db.clone(),
        schema.clone(),
        job.clone(),
        shard,
        holder.clone(),
        ttl,
        lease_lost.clone(),
    );
    tracing::info!(job = %job, shard, shard_count = args.shard_count, writers, targets = targets.len(), "Job started.");

    let progress = Arc::new(Progress::new(
        args.output.progress != cli::ProgressMode::Off
            && args.output.progress != cli::ProgressMode::Log,
    ));
    let settings = PipelineSettings {
        db: db.clone(),
        schema: schema.clone(),
        job: job.clone(),
        shard,
        holder: holder.clone(),
        keyring: Arc::new(Keyring::new(
            keys.new.key.clone(),
            keys.old.iter().map(|k| k.key.clone()).collect(),
        )),
        crypto_pool: pool,
        batch: sizing,
        retry,
        stop: stop.clone(),
        lease_lost: lease_lost.clone(),
        throttle: Arc::new(Throttle::new(
            ThrottleSettings {
                max_rows_per_second: args.max_rows_per_second,
                pause_between_batches: args.pause_between_batches_ms.map(Duration::from_millis),
                max_replication_lag: args.max_replication_lag_secs.map(Duration::from_secs_f64),
            },
            db.clone(),
        )),
        progress: progress.clone(),
        writers: writers as usize,
    };
    let logger =
        (args.output.progress != cli::ProgressMode::Off && !progress.has_bars()).then(|| {
            crate::progress::spawn_logger(
                progress.clone(),
                Duration::from_secs(args.output.progress_interval_secs.max(1)),
            )
        });

    // The work itself, watched for stalls.
    let work = rotate_all(&settings, &targets, args);
    let stall = Duration::from_secs(args.stall_timeout_secs.max(1));
    let outcome = tokio::select! {
        result = work => result,
        reason = watch_for_stall(progress.clone(), stall) => Err(Failure::Retryable(reason)),
    };
    if let Some(logger) = logger {
        logger.abort();
    }
    progress.finish(outcome.is_ok());
    heartbeat.abort();

    // Record the job's state and release the lease, whatever happened.
    let (sweeps, sweep_remaining) = match &outcome {
        Ok(sweeps) => *sweeps,
        Err(_) => (0, 0),
    };
    let lease_was_lost = lease_lost.load(Ordering::SeqCst);
    let state = match &outcome {
        Ok(_) => "finished",
        Err(Failure::Interrupted) => "interrupted",
        Err(_) => "failed",
    };
    let summary = finish(
        &db,
        &schema,
        &job,
        &targets,
        state,
        lease_was_lost,
        shard,
        &holder,
        args.output.report_limit,
    )
    .await;
    crate::metrics::record_state(
        if state == "finished" && summary.as_ref().is_ok_and(|s| !s.job_finished) {
            "running"
        } else {
            state
        },
    );
    let complete = |mut summary: RunSummary| {
        summary.started_at = started_at;
        summary.finished_at = chrono::Utc::now();
        summary.duration_seconds = started.elapsed().as_secs_f64();
        summary.sweeps = sweeps;
        summary.counts_before = Some(counts_before);
        summary.sweep_last_found = sweep_remaining;
        summary.sweeps_off = args.max_sweeps == 0;
        summary.key_fingerprints = identity.clone();
        summary
    };
    match (outcome, summary) {
        (Err(failure), Ok(summary)) => {
            *stopped_summary = Some(complete(summary));
            Err(failure)
        }
        (Err(failure), Err(_)) | (Ok(_), Err(failure)) => Err(failure),
        (Ok(_), Ok(summary)) => Ok(complete(summary)),
    }
}

/// Resolves after `stall` passes with no committed batch.
async fn watch_for_stall(progress: Arc<Progress>, stall: Duration) -> String {
    loop {
        tokio::time::sleep(Duration::from_secs(1).min(stall)).await;
        let idle = progress.idle_for();
        if idle >= stall {
            let reason = format!("no batch committed for {}s (stall timeout); a rerun resumes from the last checkpoint", idle.as_secs());
            tracing::error!(idle_seconds = idle.as_secs(), "{reason}");
            return reason;
        }
    }
}

/// One target, ready for its pass.
struct Prepared {
    label: String,
    statements: Arc<Statements>,
    /// This shard's ranges of the target.
    mine: Vec<RangeRecord>,
    total_ranges: usize,
    table: String,
    /// The table before the ranges were made or loaded.
    before: TableState,
    /// The pass starts in this run: its ranges were made in this run, or by
    /// an earlier run that stopped before this target's pass began. Its
    /// bounds are then read after `before`.
    bounds_after_horizon: bool,
    /// The pass reads the target in physical order.
    physical: bool,
}

/// Tells whether the pass in physical order over a target of the job has
/// started, in this run or an earlier one.
async fn pass_started(settings: &PipelineSettings, label: &str) -> Result<bool, Failure> {
    let fail = |e: sqlx::Error| Failure::from_database("cannot read the target's key ranges", &e);
    let mut conn = settings.db.pool.acquire().await.map_err(fail)?;
    checkpoint::pass_started(&mut conn, &settings.schema, &settings.job, label)
        .await
        .map_err(fail)
}

/// Prepares a target's pass in physical order. With `extend`, for ranges
/// made in this run, it extends the last one to the table's blocks now,
/// read after the horizon `before`, so that every row past the last bound
/// is newer than `before`. It then pins the frontier of every range's pass:
/// that of `before`, or the one pinned by the run that started the pass.
/// Returns each range's frontier and upper bound.
async fn prepare_physical(
    settings: &PipelineSettings,
    label: &str,
    table: &str,
    ranges: &[RangeRecord],
    before: &TableState,
    extend: bool,
) -> Result<Vec<(i32, PhysicalScan, Option<Vec<String>>)>, Failure> {
    let fail =
        |e: sqlx::Error| Failure::from_database("cannot prepare the pass in physical order", &e);
    let mut tx = settings.db.begin().await.map_err(fail)?;
    if let (true, Some(last)) = (extend, ranges.last()) {
        let blocks = table_blocks(&mut tx, table).await.map_err(fail)?;
        let stored = last
            .upper_key
            .as_ref()
            .and_then(|upper| upper.first())
            .and_then(|position| pipeline::block_of(position))
            .unwrap_or(0);
        if blocks > stored {
            checkpoint::set_range_upper(
                &mut tx,
                &settings.schema,
                &settings.job,
                label,
                last.range_index,
                &[pipeline::block_start(blocks)],
            )
            .await
            .map_err(fail)?;
        }
    }
    let pinned = checkpoint::pin_pass_start(
        &mut tx,
        &settings.schema,
        &settings.job,
        label,
        before.frontier,
        &before.running,
    )
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    Ok(pinned
        .into_iter()
        .map(|(index, frontier, running, upper)| {
            let scan = PhysicalScan {
                frontier: pipeline::xid32(frontier),
                running: Arc::new(
                    running
                        .into_iter()
                        .map(|xid| pipeline::xid32(xid).to_string())
                        .collect(),
                ),
            };
            (index, scan, upper)
        })
        .collect())
}

/// Splits a sweep that reads a whole target in key order, after a pass in
/// physical order, into `writers` key ranges read side by side. The last
/// range has no upper bound, so it also covers keys added since.
async fn split_whole_sweep(
    settings: &PipelineSettings,
    statements: &Statements,
    parts: Vec<RangeWork>,
    writers: usize,
) -> Result<Vec<RangeWork>, Failure> {
    let [whole] = parts.as_slice() else {
        return Ok(parts);
    };
    if writers < 2
        || whole.changed_since.is_some()
        || whole.after.is_some()
        || whole.upper.is_some()
    {
        return Ok(parts);
    }
    let fail = |e: sqlx::Error| Failure::from_database("cannot split the sweep", &e);
    let mut tx = settings.db.begin_read_only().await.map_err(fail)?;
    let Some(upper) = fetch_key(&mut tx, &statements.max_key, statements.key_len)
        .await
        .map_err(fail)?
    else {
        return Ok(parts);
    };
    let mut bounds = split_bounds(&mut tx, statements, &upper, writers)
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    if let Some(last) = bounds.last_mut() {
        last.1 = None;
    }
    tracing::info!(target = %whole.target_label, parts = bounds.len(), "The sweep reads every row, in key ranges side by side.");
    Ok(bounds
        .into_iter()
        .map(|(after, upper)| RangeWork {
            after,
            upper,
            ..whole.clone()
        })
        .collect())
}

/// Reads the table's size in blocks.
async fn table_blocks(conn: &mut sqlx::PgConnection, table: &str) -> Result<u64, sqlx::Error> {
    let blocks: i64 = sqlx::query_scalar(
        "SELECT pg_relation_size($1::text::regclass) / current_setting('block_size')::bigint",
    )
    .bind(table)
    .fetch_one(conn)
    .await?;
    Ok(blocks.max(0) as u64)
}

/// Rotates every range of this shard, target by target, then sweeps.
/// Returns the number of sweeps done and the old-key values the last one found.
async fn rotate_all(
    settings: &PipelineSettings,
    targets: &[Target],
    args: &RunArgs,
) -> Result<(u32, i64), Failure> {
    let writers = settings.writers;
    let range_count = writers * args.shard_count as usize;
    let first = args.shard_index as usize * writers;
    let mut prepared = Vec::new();

    for target in targets {
        let label = target.label();
        let statements = Arc::new(Statements::new(target, &settings.schema));
        // The horizon comes before the ranges' bounds, so that in physical
        // order every row past the last bound is newer than the horizon.
        let before = TableState::read(&settings.db, &target.quoted_table())
            .await
            .map_err(|e| Failure::from_database("cannot start the keyset pass", &e))?;
        let choice = choose_order(
            &settings.db,
            target,
            &before,
            OrderOptions::of_run(args, writers as u32),
        )
        .await?;
        let (ranges, created) = ensure_ranges(
            &settings.db,
            &settings.schema,
            &settings.job,
            target,
            &statements,
            range_count,
            choice.order,
        )
        .await
        .map_err(|e| Failure::from_database("cannot prepare the target's key ranges", &e))?;
        // A job keeps the order its ranges were made for.
        let physical = ranges
            .first()
            .is_some_and(|r| r.key_columns == POSITION_COLUMNS);
        check_job_order(&settings.job, args.scan_order, physical)?;
        let reason = match created {
            true => choice.reason.as_str(),
            false => "the job's ranges were made for this order",
        };
        tracing::info!(target = %label, order = if physical { "physical" } else { "key" }, new_job = created, reason, "Scan order.");
        check_job_sweeps(&settings.job, &label, physical, args.max_sweeps)?;
        if let Some(first) = ranges.first() {
            check_job_key(&settings.job, target, &first.key_columns)?;
        }
        if ranges.len() != range_count {
            return Err(Failure::Config(format!(
                "job {} has {} ranges for {label}, but {} shards x {} writers need {range_count}; use the settings the job started with, or --restart",
                settings.job, ranges.len(), args.shard_count, writers
            )));
        }
        // Ranges made by an earlier run whose pass never started (it stopped
        // during an earlier target's) start as new ones: their bounds and
        // the pass's start are taken when the pass begins.
        let fresh_start = created || (physical && !pass_started(settings, &label).await?);
        let mine: Vec<RangeRecord> = ranges[first..first + writers].to_vec();
        let estimated: i64 = mine.iter().map(|r| r.rows_estimated).sum();
        let resumed: i64 = mine.iter().map(|r| r.counts.rows_scanned).sum();
        crate::metrics::register_target(&label, estimated, resumed);
        settings
            .progress
            .add_target(&label, estimated.max(0) as u64, resumed.max(0) as u64);
        prepared.push(Prepared {
            label,
            statements,
            mine,
            total_ranges: ranges.len(),
            table: target.quoted_table(),
            before,
            bounds_after_horizon: fresh_start,
            physical,
        });
    }

    // The pass, range by range, `writers` ranges at a time. Each target's
    // horizon was taken before its pass reads anything, for the sweep.
    let mut passes: Vec<PassRecord> = Vec::with_capacity(prepared.len());
    for Prepared {
        label,
        statements,
        mine,
        table,
        before,
        physical,
        bounds_after_horizon,
        ..
    } in &prepared
    {
        // A fresh horizon, so that the writes of earlier targets' passes do
        // not count as changes to this one. A resumed pass in physical order
        // keeps its bounds, and its sweep reads every row in any case.
        let before = if !*physical || *bounds_after_horizon {
            TableState::read(&settings.db, table)
                .await
                .map_err(|e| Failure::from_database("cannot start the pass", &e))?
        } else {
            before.clone()
        };
        let scans = match *physical {
            true => Some(
                prepare_physical(settings, label, table, mine, &before, *bounds_after_horizon)
                    .await?,
            ),
            false => None,
        };
        let scans = &scans;
        let pending: Vec<&RangeRecord> = mine.iter().filter(|r| r.status != "done").collect();
        let results: Vec<Result<RangePassed, Failure>> =
            futures::stream::iter(pending)
            .map(|range| {
                let statements = statements.clone();
                async move {
                    // In physical order the last range's bound may have been extended just now.
                    let pinned = scans.iter().flatten().find(|(index, _, _)| *index == range.range_index);
                    let physical = pinned.map(|(_, scan, _)| scan.clone());
                    let upper = match pinned {
                        Some((_, _, upper)) => upper.clone(),
                        None => range.upper_key.clone(),
                    };
                    let work = RangeWork {
                        target_label: label.clone(),
                        range_index: range.range_index,
                        after: range.last_key.clone().or_else(|| range.lower_key.clone()),
                        upper,
                        changed_since: None,
                        physical,
                    };
                    // The range's first key, or where an earlier run stopped.
                    let after = work.after.as_ref().map(|k| crate::statements::display_key(&crate::statements::key_label(k))).unwrap_or_default();
                    tracing::info!(target = %label, range = range.range_index, after = %after, resumed = range.last_key.is_some(), "Range started.");
                    let start = work.after.clone();
                    let outcome = pipeline::run_range(settings, statements, work, Pass::Main)
                        .await
                        .map_err(|e| range_failure(label, range.range_index, e))?;
                    let mut tx = settings.db.begin().await.map_err(|e| Failure::from_database("cannot mark the range done", &e))?;
                    checkpoint::set_range_status(&mut tx, &settings.schema, &settings.job, label, range.range_index, "done")
                        .await
                        .map_err(|e| Failure::from_database("cannot mark the range done", &e))?;
                    tx.commit().await.map_err(|e| Failure::from_database("cannot mark the range done", &e))?;
                    tracing::info!(target = %label, range = range.range_index, "Range done.");
                    Ok(RangePassed { range_index: range.range_index, start, writers: outcome.writers })
                }
            })
            .buffer_unordered(writers)
            .collect()
            .await;
        // Report an interruption over other failures only when nothing else failed.
        let mut interrupted = false;
        let mut record = PassRecord::new(before);
        for result in results {
            match result {
                Ok(passed) => record.add(passed),
                Err(Failure::Interrupted) => interrupted = true,
                Err(other) => return Err(other),
            }
        }
        if interrupted {
            return Err(Failure::Interrupted);
        }
        passes.push(record);
    }

    // Final sweeps: values written under an old key while the pass ran.
    if args.max_sweeps == 0 {
        tracing::warn!("Sweeps are off (--max-sweeps 0): values written under an old key while the pass ran are not looked for; run `reencrypt verify` before retiring the old key.");
    }
    let mut sweeps = 0;
    let mut last_found = 0;
    for round in 0..args.max_sweeps {
        let mut found = 0;
        for (
            Prepared {
                label,
                statements,
                mine,
                total_ranges,
                table,
                bounds_after_horizon,
                physical,
                ..
            },
            record,
        ) in prepared.iter().zip(&mut passes)
        {
            let now = TableState::read(&settings.db, table)
                .await
                .map_err(|e| Failure::from_database("cannot start the sweep", &e))?;
            let filter = match record.may_filter(&now) {
                Ok(()) => true,
                Err(reason) => {
                    tracing::info!(target = %label, %reason, "The sweep reads every row of the target.");
                    false
                }
            };
            let parts = if *physical {
                // The first round after a resumed pass reads every row, so
                // later rounds may read only the rows changed since.
                let filter = filter && (*bounds_after_horizon || round > 0);
                let parts = sweep::physical_parts(label, mine, record, round == 0, filter);
                split_whole_sweep(settings, statements, parts, writers).await?
            } else {
                sweep::parts(label, mine, *total_ranges, record, round == 0, filter)
            };
            let results: Vec<Result<pipeline::RangeOutcome, Failure>> =
                futures::stream::iter(parts)
                    .map(|work| {
                        let statements = statements.clone();
                        let (label, range_index) = (work.target_label.clone(), work.range_index);
                        async move {
                            pipeline::run_range(settings, statements, work, Pass::Sweep)
                                .await
                                .map_err(|e| range_failure(&label, range_index, e))
                        }
                    })
                    .buffer_unordered(writers)
                    .collect()
                    .await;
            // The next round reads only what changed since this one started.
            let mut round_writers = Vec::new();
            for result in results {
                let outcome = result?;
                found += outcome.counts.sweep_reencrypted;
                round_writers.extend(outcome.writers);
            }
            record.advance(now, round_writers);
        }
        sweeps = round + 1;
        last_found = found;
        tracing::info!(sweep = sweeps, rotated = found, "Sweep done.");
        if found == 0 {
            break;
        }
    }

    // A failover during the last sweep may have undone its writes; a rerun
    // sweeps every row of a finished job.
    if sweeps > 0 {
        for (Prepared { label, table, .. }, record) in prepared.iter().zip(&passes) {
            let now = TableState::read(&settings.db, table)
                .await
                .map_err(|e| Failure::from_database("cannot finish the sweep", &e))?;
            if !now.same_server(&record.horizon) {
                return Err(Failure::Retryable(format!(
                    "the database server restarted or failed over during the run of {label}; run the job again to sweep every row"
                )));
            }
        }
    }
    Ok((sweeps, last_found))
}

/// Marks the job's state, releases the lease, and reads the summary.
#[allow(clippy::too_many_arguments)]
async fn finish(
    db: &Database,
    schema: &str,
    job: &str,
    targets: &[Target],
    state: &str,
    lease_lost: bool,
    shard: i32,
    holder: &Holder,
    report_limit: i64,
) -> Result<RunSummary, Failure> {
    let context = "cannot record the end of the run";
    let mut tx = db
        .begin()
        .await
        .map_err(|e| Failure::from_database(context, &e))?;
    // Shards that finish together take turns. The last one to count the open
    // ranges then finds every other shard's ranges done and marks the job finished.
    checkpoint::lock_job(&mut tx, job)
        .await
        .map_err(|e| Failure::from_database(context, &e))?;
    let open: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.ranges WHERE job = $1 AND status <> 'done'",
        crate::target::quote_ident(schema)
    ))
    .bind(job)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| Failure::from_database(context, &e))?;
    let job_state = match state {
        "finished" if open > 0 => "running",
        other => other,
    };
    if !lease_lost {
        checkpoint::set_job_status(&mut tx, schema, job, job_state)
            .await
            .map_err(|e| Failure::from_database(context, &e))?;
    }
    let counts = checkpoint::job_counts(&mut tx, schema, job)
        .await
        .map_err(|e| Failure::from_database(context, &e))?;
    let attention = checkpoint::attention_keys(&mut tx, schema, job, report_limit)
        .await
        .map_err(|e| Failure::from_database(context, &e))?;
    let (attention_total, attention_needs_action) =
        checkpoint::attention_counts(&mut tx, schema, job)
            .await
            .map_err(|e| Failure::from_database(context, &e))?;
    tx.commit()
        .await
        .map_err(|e| Failure::from_database(context, &e))?;
    if !lease_lost {
        if let Err(error) = lease::release_own(db, schema, job, shard, holder).await {
            tracing::warn!(error = %crate::db::describe(&error), "Could not release the job's lease; it expires by itself.");
        }
    }

    Ok(RunSummary {
        job: job.to_string(),
        job_finished: open == 0,
        targets: targets
            .iter()
            .map(|t| TargetSummary {
                target: t.label(),
                key_columns: t.key.iter().map(|k| k.name.clone()).collect(),
                index: t.index_name.clone(),
                counts: counts.get(&t.label()).copied().unwrap_or_default(),
            })
            .collect(),
        attention,
        attention_total,
        attention_needs_action,
        ..RunSummary::default()
    })
}

/// Sums the counts of every target.
pub fn total(summary: &RunSummary) -> Counts {
    let mut total = Counts::default();
    for target in &summary.targets {
        total.add(&target.counts);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_factor_depends_on_writers() {
        assert_eq!(auto_physical_factor(1), 2.0);
        assert_eq!(auto_physical_factor(2), 1.2);
        assert_eq!(auto_physical_factor(64), 1.2);
        // The factors print as the help text gives them.
        assert_eq!(format!("{}", auto_physical_factor(1)), "2");
        assert_eq!(format!("{}", auto_physical_factor(2)), "1.2");
    }
}
