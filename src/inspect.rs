//! Read-only and job-control commands: `plan`, `verify`, `status`, `keys`,
//! `reset`, `release`, and the evidence record of a run.
//!
//! `plan` and `verify` only read: they never create the worker's schema, and
//! every statement runs in a `READ ONLY` transaction. The one exception is
//! that `verify` adds its evidence record to the `runs` table when that table
//! already exists on a primary server.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use crate::checkpoint::{self, Counts, JobRecord, LeaseRecord, RunRecord, TargetProgress};
use crate::classify::Keyring;
use crate::cli::{
    self, DatabaseArgs, KeyArgs, KeysArgs, OutputFormat, PlanArgs, ReleaseArgs, ResetArgs, RunArgs,
    StatusArgs, TargetArgs, TuningArgs, VerifyArgs,
};
use crate::db::{Database, Timeouts};
use crate::error::Failure;
use crate::keys::KeySet;
use crate::report::{
    self, AttentionKey, Evidence, EvidenceTarget, KeyEvidence, PlanTarget, RunSummary,
    SweepEvidence, VerifyEvidence,
};
use crate::scan::{self, ScanSettings, TargetScan};
use crate::sweep::TableState;
use crate::target::Target;

/// Connections a read-only scan uses: one page is read while another is classified.
const SCAN_CONNECTIONS: u32 = 2;

/// Counts a plan the way a run would: every row, or a sample with --sample.
pub async fn plan(args: &PlanArgs) -> Result<i32, Failure> {
    if args.sample == Some(0) {
        return Err(Failure::Config(
            "--sample must be at least 1 row; leave it out to count every row".into(),
        ));
    }
    let inputs = ScanInputs {
        database: &args.database,
        targets: &args.targets,
        keys: &args.keys,
        tuning: &args.tuning,
    };
    let plan = PlanOptions {
        order: crate::run::OrderOptions::defaults(),
        resume: None,
        keys_per_outcome: report_limit(args.report_limit)?,
        sample: args.sample,
        format: args.format,
    };
    stop_on_signal("plan", plan_targets(inputs, plan)).await
}

/// Plans exactly the run that the same options would start (`run --dry-run`).
pub async fn plan_from_run(args: &RunArgs) -> Result<i32, Failure> {
    // A dry run writes nothing: neither a report nor the job's checkpoints.
    if args.restart || args.output.report.is_some() {
        return Err(Failure::Config(
            "--dry-run writes nothing, so it takes neither --report nor --restart; use `reencrypt plan --format json` for a record of the plan".into(),
        ));
    }
    crate::run::check_options(args)?;
    // The run serves metrics on this address; a dry run only checks that it
    // is free.
    if let Some(address) = crate::run::metrics_listen(&args.metrics.metrics_listen)? {
        std::net::TcpListener::bind(address)
            .map_err(|e| Failure::Config(format!("cannot serve metrics on {address}: {e}")))?;
    }
    let inputs = ScanInputs {
        database: &args.database,
        targets: &args.targets,
        keys: &args.keys,
        tuning: &args.tuning,
    };
    let plan = PlanOptions {
        order: crate::run::OrderOptions::of_run(args, 1),
        resume: Some(args),
        keys_per_outcome: report_limit(args.output.report_limit)?,
        sample: None,
        format: args.output.format,
    };
    stop_on_signal("run --dry-run", plan_targets(inputs, plan)).await
}

/// The options a read-only scan is built from, shared by `plan`, `run --dry-run` and `verify`.
struct ScanInputs<'a> {
    database: &'a DatabaseArgs,
    targets: &'a TargetArgs,
    keys: &'a KeyArgs,
    tuning: &'a TuningArgs,
}

/// Settings, targets and keys of a read-only scan, after the options were checked.
struct Prepared {
    settings: ScanSettings,
    targets: Vec<Target>,
    keys: KeySet,
}

/// Checks `--report-limit`, the number of keys listed per outcome.
pub fn report_limit(limit: i64) -> Result<usize, Failure> {
    usize::try_from(limit)
        .map_err(|_| Failure::Config(format!("--report-limit must be zero or more, got {limit}")))
}

/// Checks the options, reads the keys and resolves the targets, all before
/// the first row is read. Nothing here writes.
async fn prepare(inputs: ScanInputs<'_>, keys_per_outcome: usize) -> Result<Prepared, Failure> {
    let (specs, unique_keys) = crate::run::parse_targets(inputs.targets)?;
    let (timeouts, sizing, retry) = crate::run::tuning(inputs.tuning)?;
    let keys = crate::keys::resolve(inputs.keys).await?;
    let crypto_pool = crate::run::crypto_pool(inputs.tuning.threads)?;
    let db = connect(inputs.database, SCAN_CONNECTIONS, timeouts).await?;
    let targets = crate::run::resolve_targets(&db, &specs, &unique_keys).await?;
    let keyring = Keyring::new(
        keys.new.key.clone(),
        keys.old.iter().map(|k| k.key.clone()).collect(),
    );
    Ok(Prepared {
        settings: ScanSettings {
            db,
            keyring: Arc::new(keyring),
            crypto_pool,
            batch_rows: sizing.rows,
            batch_max_bytes: sizing.max_bytes,
            retry,
            keys_per_outcome,
        },
        targets,
        keys,
    })
}

async fn connect(
    database: &DatabaseArgs,
    connections: u32,
    timeouts: Timeouts,
) -> Result<Database, Failure> {
    let db =
        Database::connect_lazy(&database.database_url, connections, timeouts).map_err(|e| {
            Failure::Config(format!(
                "invalid --database-url: {}",
                crate::db::describe(&e)
            ))
        })?;
    db.probe()
        .await
        .map_err(|e| Failure::from_connect("cannot connect to the database", &e))?;
    Ok(db)
}

/// Returns the default timeouts, for the commands that take no tuning options.
fn default_timeouts() -> Timeouts {
    Timeouts {
        lock_timeout_ms: cli::DEFAULT_LOCK_TIMEOUT_MS,
        statement_timeout_ms: cli::DEFAULT_STATEMENT_TIMEOUT_MS,
        idle_in_transaction_timeout_ms: cli::DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS,
    }
}

/// Runs a read-only command until it ends or SIGINT or SIGTERM arrives, and
/// then stops at once with exit code 4. A run finishes its batch first, but
/// these commands have nothing to finish.
async fn stop_on_signal(
    command: &str,
    work: impl std::future::Future<Output = Result<i32, Failure>>,
) -> Result<i32, Failure> {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "Cannot listen for SIGTERM.");
                return work.await;
            }
        };
    let interrupted = || {
        crate::telemetry::print_error(
            &format!("{command} was interrupted by a signal and has no result; run it again"),
            crate::exit::INTERRUPTED,
            &[],
        );
        Ok(crate::exit::INTERRUPTED)
    };
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => interrupted(),
        _ = terminate.recv() => interrupted(),
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// The options of a plan, besides the targets and keys.
struct PlanOptions<'a> {
    /// The options that decide a new job's order.
    order: crate::run::OrderOptions,
    /// For `run --dry-run`, the run's options, to find the job it would resume.
    resume: Option<&'a RunArgs>,
    keys_per_outcome: usize,
    sample: Option<u64>,
    format: OutputFormat,
}

/// Plans a run of the targets, with the order of each target's pass: that
/// of the job the run would resume, or the one a new job would take.
async fn plan_targets(inputs: ScanInputs<'_>, plan: PlanOptions<'_>) -> Result<i32, Failure> {
    plan.order.check()?;
    let prepared = prepare(inputs, plan.keys_per_outcome).await?;
    // A plan stands for a run, which would reject such a target.
    crate::run::reject_instead_rules(&prepared.targets)?;
    // The writers a run would get, which also decide the order `auto` takes:
    // for `plan`, those of a new job with the default options.
    let (writers, _) = match plan.resume {
        Some(args) => {
            crate::run::resolve_writers(
                &prepared.settings.db,
                args,
                &prepared.targets,
                &prepared.keys,
            )
            .await?
        }
        None => {
            crate::run::new_job_writers(&prepared.settings.db, &prepared.targets, plan.order, false)
                .await?
        }
    };
    let order_options = crate::run::OrderOptions {
        writers,
        ..plan.order
    };
    let resumed = match plan.resume {
        Some(args) => {
            crate::run::resumed_job(
                &prepared.settings.db,
                args,
                writers,
                &prepared.targets,
                &prepared.keys,
            )
            .await?
        }
        None => None,
    };
    let mut orders = Vec::with_capacity(prepared.targets.len());
    for (index, target) in prepared.targets.iter().enumerate() {
        if let Some(order) = resumed.as_ref().and_then(|job| job.orders[index]) {
            orders.push(crate::run::OrderChoice {
                order,
                reason: "the job's ranges were made for this order".into(),
            });
            continue;
        }
        let state = TableState::read(&prepared.settings.db, &target.quoted_table())
            .await
            .map_err(|e| Failure::from_database("cannot read the table's state", &e))?;
        orders.push(
            crate::run::choose_order(&prepared.settings.db, target, &state, order_options).await?,
        );
    }
    let sample = plan.sample;
    let resumes = resumed.map(|job| job.job);
    let mut planned = Vec::with_capacity(prepared.targets.len());
    for (target, order) in prepared.targets.iter().zip(orders) {
        let scan = match sample {
            Some(rows) => scan::scan_sample(&prepared.settings, target, rows).await?,
            None => scan::scan_full(&prepared.settings, target).await?,
        };
        // Rows to read for the whole table, at the rate this scan measured.
        let estimated_seconds = if scan.rows_per_second > 0.0 {
            scan.counts.rows_scanned as f64 / scan.rows_per_second
        } else {
            0.0
        };
        planned.push(PlanTarget {
            scan,
            estimated_seconds,
            order,
        });
    }
    // Read after the scans, which can take long on a large table.
    let lease = match (plan.resume, &resumes) {
        (Some(args), Some(job)) => crate::lease::read_unexpired(
            &prepared.settings.db,
            &args.database.schema,
            job,
            args.shard_index as i32,
        )
        .await
        .map_err(|e| Failure::from_database("cannot read the job's lease", &e))?,
        _ => None,
    };
    let keys = KeyEvidence::from_keys(&prepared.keys);
    let throttled = match plan.resume {
        Some(args) => {
            let rows: Vec<i64> = planned.iter().map(|p| p.scan.counts.rows_scanned).collect();
            throttled_seconds(args, writers, &rows, resumes.is_some())?
        }
        None => None,
    };

    match plan.format {
        OutputFormat::Table => {
            print!("{}", report::render_plan(&keys, &planned));
            if let Some(seconds) = throttled {
                println!(
                    "with --max-rows-per-second and --pause-between-batches-ms as given, the run takes at least {}",
                    report::format_seconds(seconds)
                );
            }
            let plural = if writers == 1 { "" } else { "s" };
            match plan.resume {
                Some(_) => println!("\nThe run has {writers} writer{plural} per target."),
                None => println!(
                    "\nA new job with the default options has {writers} writer{plural} per target."
                ),
            }
            if let Some(job) = &resumes {
                println!("The run resumes job {job}.");
            }
            match &lease {
                Some(busy) if busy.is_gone_from_this_host() => println!(
                    "It would take over the lease of shard {} from pid {}, which ran on this host and is gone.",
                    busy.shard, busy.pid
                ),
                Some(busy) => println!("The job's lease is held, so a run now would stop or wait: {busy}."),
                None => {}
            }
        }
        OutputFormat::Json => {
            let mut value = plan_json(&keys, &planned);
            value["writers"] = serde_json::json!(writers);
            if plan.resume.is_some() {
                value["command"] = serde_json::json!("run --dry-run");
                value["resumes_job"] = serde_json::json!(resumes);
                value["throttled_seconds_at_least"] = serde_json::json!(throttled);
                value["lease"] = match &lease {
                    Some(busy) => serde_json::json!({
                        "shard": busy.shard,
                        "host": busy.host,
                        "pid": busy.pid,
                        "heartbeat_age_secs": busy.heartbeat_age_secs,
                        "would_take_over": busy.is_gone_from_this_host(),
                    }),
                    None => serde_json::Value::Null,
                };
            }
            print_json(&value);
        }
    }
    Ok(crate::exit::SUCCESS)
}

/// Returns the least time in seconds that a run's throttle allows for
/// `rows` rows per target, or `None` when the run is not throttled. It is
/// also `None` for a run that resumes a job or is one of several shards,
/// because such a run reads only part of those rows.
///
/// `--max-rows-per-second` bounds the rows of all targets together. A pause
/// follows every batch, and the targets are written one after another, each
/// in at least its rows divided by the batch of all its writers together.
fn throttled_seconds(
    args: &RunArgs,
    writers: u32,
    rows: &[i64],
    resumes_job: bool,
) -> Result<Option<f64>, Failure> {
    if resumes_job || args.shard_count > 1 {
        return Ok(None);
    }
    let total: i64 = rows.iter().sum();
    let by_rate = args.max_rows_per_second.map(|rate| total as f64 / rate);
    let by_pauses = match args.pause_between_batches_ms {
        Some(pause_ms) if pause_ms > 0 => {
            let (_, sizing, _) = crate::run::tuning(&args.tuning)?;
            let writers = writers.max(1);
            let sizing = crate::run::shared_by_writers(sizing, writers);
            let rows_per_round = (sizing.max_rows * writers as usize) as f64;
            let rounds: f64 = rows
                .iter()
                .map(|&target_rows| (target_rows as f64 / rows_per_round).ceil())
                .sum();
            Some(rounds * pause_ms as f64 / 1000.0)
        }
        _ => None,
    };
    Ok(match (by_rate, by_pauses) {
        (Some(rate), Some(pauses)) => Some(rate.max(pauses)),
        (one, other) => one.or(other),
    })
}

fn plan_json(keys: &KeyEvidence, planned: &[PlanTarget]) -> serde_json::Value {
    let mut total = Counts::default();
    let targets: Vec<serde_json::Value> = planned
        .iter()
        .map(|p| {
            total.add(&p.scan.counts);
            serde_json::json!({
                "target": p.scan.target,
                "key_columns": p.scan.key_columns,
                "index": p.scan.index,
                "estimated": p.scan.is_estimate(),
                "method": p.scan.method,
                "scan_order": report::order_name(p.order.order),
                "scan_order_reason": p.order.reason,
                "counts": report::outcome_counts_json(&p.scan.counts),
                "keys": p.scan.keys,
                "scan_seconds": p.scan.seconds,
                "rows_per_second": p.scan.rows_per_second,
                "estimated_read_seconds": p.estimated_seconds,
            })
        })
        .collect();
    serde_json::json!({
        "command": "plan",
        "read_only": true,
        "written": "nothing: every statement ran in a READ ONLY transaction, and no checkpoint, lease or schema was created or changed",
        "keys": keys,
        "targets": targets,
        "total": report::outcome_counts_json(&total),
        "estimated_read_seconds": planned.iter().map(|p| p.estimated_seconds).sum::<f64>(),
        "estimate_note": "read and classify time only, at the rate measured by this plan; a run also writes every old-key value",
    })
}

/// Scans every row of every target; exits 5 when a value is still readable
/// under an old key or is ambiguous.
pub async fn verify(args: &VerifyArgs) -> Result<i32, Failure> {
    stop_on_signal("verify", verify_targets(args)).await
}

async fn verify_targets(args: &VerifyArgs) -> Result<i32, Failure> {
    let started_at = chrono::Utc::now();
    let limit = report_limit(args.output.report_limit)?;
    if args.job.as_deref().is_some_and(|j| j.trim().is_empty()) {
        return Err(Failure::Config("--job must not be empty".into()));
    }
    check_report_path(args.output.report.as_deref())?;
    let inputs = ScanInputs {
        database: &args.database,
        targets: &args.targets,
        keys: &args.keys,
        tuning: &args.tuning,
    };
    let prepared = prepare(inputs, limit).await?;
    let job = args
        .job
        .clone()
        .unwrap_or_else(|| crate::run::default_job_name(&prepared.targets, &prepared.keys));

    let mut scans = Vec::with_capacity(prepared.targets.len());
    for target in &prepared.targets {
        scans.push(scan::scan_full(&prepared.settings, target).await?);
    }
    let mut total = Counts::default();
    for scan in &scans {
        total.add(&scan.counts);
    }
    let verdict = VerifyEvidence::from_counts(&total);
    // Values under no key given may be under a key that was not given (a
    // wrong --old-key-file, a forgotten older key), so they keep the
    // verification from passing cleanly.
    let code = if !verdict.passed {
        crate::exit::VERIFY_FAILED
    } else if verdict.undecryptable > 0 {
        crate::exit::NEEDS_ATTENTION
    } else {
        crate::exit::SUCCESS
    };
    let listed = listed_keys(&scans, limit);
    let keys = KeyEvidence::from_keys(&prepared.keys);

    let finished_at = chrono::Utc::now();
    let evidence = Evidence {
        record_version: report::EVIDENCE_RECORD_VERSION,
        command: "verify".into(),
        job: job.clone(),
        started_at,
        finished_at,
        duration_seconds: (finished_at - started_at).num_milliseconds() as f64 / 1000.0,
        operator: report::operator(args.output.operator.as_deref()),
        host: report::host_name(),
        tool: env!("CARGO_PKG_NAME").into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        keys: keys.clone(),
        targets: scans
            .iter()
            .map(|s| EvidenceTarget {
                target: s.target.clone(),
                key_columns: s.key_columns.clone(),
                index: s.index.clone(),
                before: None,
                after: report::outcome_counts_json(&s.counts),
            })
            .collect(),
        before_source: None,
        sweeps: None,
        job_finished: None,
        verify: Some(verdict),
        attention: listed.clone(),
        exit_code: code,
    };
    let recorded = record_verify(&prepared.settings.db, &args.database.schema, &evidence).await;
    if let Some(path) = &args.output.report {
        write_report(path, &evidence)?;
    }

    match args.output.format {
        OutputFormat::Table => {
            print!(
                "{}",
                report::render_verify(&keys, &scans, &listed, args.output.report_limit)
            );
            println!("{recorded}");
        }
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&evidence).unwrap_or_default();
            value["recorded"] = serde_json::Value::String(recorded);
            print_json(&value);
        }
    }
    Ok(code)
}

/// Picks the keys to list: old-key and ambiguous rows first, then undecryptable
/// and not-in-format ones, target by target, at most `limit` in all.
fn listed_keys(scans: &[TargetScan], limit: usize) -> Vec<AttentionKey> {
    let mut listed = Vec::new();
    for outcome in scan::LISTED_OUTCOMES {
        for scan in scans {
            let label = scan::listed_label(outcome);
            for key in scan.keys.get(label).into_iter().flatten() {
                if listed.len() >= limit {
                    return listed;
                }
                listed.push(AttentionKey {
                    target: scan.target.clone(),
                    key: key.clone(),
                    outcome: label.to_string(),
                });
            }
        }
    }
    listed
}

/// Adds a verification to the `runs` table if the worker's schema exists and
/// the server accepts writes. Returns a line saying where it was recorded.
/// A failure is logged and reported, but does not change the verdict.
async fn record_verify(db: &Database, schema: &str, evidence: &Evidence) -> String {
    let attempt = async {
        let mut tx = db.begin_read_only().await?;
        let exists = checkpoint::schema_exists(&mut tx, schema).await?;
        let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        if !exists {
            return Ok(format!(
                "not recorded in the runs table: schema {schema} has no checkpoint tables, and verify does not create them"
            ));
        }
        if in_recovery {
            return Ok(
                "not recorded in the runs table: the server is a read-only standby".to_string(),
            );
        }
        let mut tx = db.begin().await?;
        let id = checkpoint::insert_run(&mut tx, schema, &run_record(evidence)).await?;
        tx.commit().await?;
        Ok::<String, sqlx::Error>(format!("recorded in {schema}.runs with id {id}"))
    };
    match attempt.await {
        Ok(line) => line,
        Err(error) => {
            let description = crate::db::describe(&error);
            tracing::warn!(error = %description, "Could not record the verification in the runs table.");
            format!("not recorded in the runs table: {description}")
        }
    }
}

fn run_record(evidence: &Evidence) -> RunRecord {
    RunRecord {
        job: evidence.job.clone(),
        command: evidence.command.clone(),
        started_at: evidence.started_at,
        finished_at: evidence.finished_at,
        operator: evidence.operator.clone(),
        host: evidence.host.clone(),
        exit_code: evidence.exit_code,
        report: serde_json::to_value(evidence).unwrap_or_default(),
    }
}

/// Fails with exit 2 before any work when `--report` names a file that
/// cannot be written.
pub fn check_report_path(path: Option<&std::path::Path>) -> Result<(), Failure> {
    let Some(path) = path else {
        return Ok(());
    };
    report::check_writable(path).map_err(|e| {
        Failure::Config(format!(
            "--report {} cannot be written: {e}",
            path.display()
        ))
    })
}

fn write_report(path: &std::path::Path, evidence: &Evidence) -> Result<(), Failure> {
    let value = serde_json::to_value(evidence).unwrap_or_default();
    report::write_json(path, &value).map_err(|e| {
        Failure::Retryable(format!(
            "cannot write the evidence record to {}: {e}",
            path.display()
        ))
    })
}

/// Shows jobs, their targets and leases from the checkpoint tables. With
/// `--job`, fails with exit code 2 when that job does not exist.
pub async fn status(args: &StatusArgs) -> Result<i32, Failure> {
    if args.job.as_deref().is_some_and(|j| j.trim().is_empty()) {
        return Err(Failure::Config("--job must not be empty".into()));
    }
    let db = connect(&args.database, 1, default_timeouts()).await?;
    let schema = &args.database.schema;
    let context = "cannot read the checkpoint tables";
    let fail = |e: sqlx::Error| Failure::from_database(context, &e);

    let mut tx = db.begin_read_only().await.map_err(fail)?;
    if !checkpoint::schema_exists(&mut tx, schema)
        .await
        .map_err(fail)?
    {
        tx.commit().await.map_err(fail)?;
        if let Some(job) = &args.job {
            return Err(job_not_found(job, schema, false));
        }
        match args.format {
            OutputFormat::Table => println!("no jobs (schema {schema} has no checkpoint tables)"),
            OutputFormat::Json => print_json(&serde_json::json!({ "jobs": [] })),
        }
        return Ok(crate::exit::SUCCESS);
    }
    let jobs = checkpoint::load_jobs(&mut tx, schema, args.job.as_deref())
        .await
        .map_err(fail)?;
    if let Some(job) = &args.job {
        if jobs.is_empty() {
            return Err(job_not_found(job, schema, true));
        }
    }
    let progress = checkpoint::load_target_progress(&mut tx, schema, args.job.as_deref())
        .await
        .map_err(fail)?;
    let leases = checkpoint::load_leases(&mut tx, schema, args.job.as_deref(), None, false)
        .await
        .map_err(fail)?;
    let mut records = Vec::new();
    for job in &jobs {
        records.push(
            checkpoint::latest_runs(&mut tx, schema, &job.job)
                .await
                .map_err(fail)?,
        );
    }
    tx.commit().await.map_err(fail)?;

    match args.format {
        OutputFormat::Table => {
            if jobs.is_empty() {
                println!("no jobs");
            }
            for (job, records) in jobs.iter().zip(&records) {
                print!("{}", render_job(job, &progress, &leases, records));
            }
        }
        OutputFormat::Json => {
            let value: Vec<serde_json::Value> = jobs
                .iter()
                .zip(&records)
                .map(|(job, records)| job_json(job, &progress, &leases, records))
                .collect();
            print_json(&serde_json::json!({ "jobs": value }));
        }
    }
    Ok(crate::exit::SUCCESS)
}

/// Rows per second of a target: rows scanned over the time from its first
/// batch to its latest checkpoint, pauses between runs included.
fn rows_per_second(target: &TargetProgress) -> Option<f64> {
    let started = target.started_at?;
    let seconds = (target.updated_at - started).num_milliseconds() as f64 / 1000.0;
    (seconds > 0.0).then(|| target.counts.rows_scanned as f64 / seconds)
}

/// Fraction of the estimated rows scanned; `None` without an estimate. A
/// target whose ranges are all done is complete whatever the estimate was
/// (rows deleted since, or a stale estimate). An unfinished one shows at
/// most 99.9%.
fn progress_fraction(target: &TargetProgress) -> Option<f64> {
    if target.ranges > 0 && target.ranges_done == target.ranges {
        return Some(1.0);
    }
    (target.rows_estimated > 0)
        .then(|| (target.counts.rows_scanned as f64 / target.rows_estimated as f64).min(0.999))
}

fn job_json(
    job: &JobRecord,
    progress: &[TargetProgress],
    leases: &[LeaseRecord],
    records: &[(i64, RunRecord)],
) -> serde_json::Value {
    let targets: Vec<serde_json::Value> = progress
        .iter()
        .filter(|t| t.job == job.job)
        .map(|t| {
            serde_json::json!({
                "target": t.target,
                "ranges": t.ranges,
                "ranges_done": t.ranges_done,
                "rows_scanned": t.counts.rows_scanned,
                "rows_estimated": t.rows_estimated,
                "progress": progress_fraction(t),
                "rows_per_second": rows_per_second(t),
                "started_at": t.started_at,
                "last_checkpoint_at": t.updated_at,
                "counts": t.counts,
            })
        })
        .collect();
    let live = live_runners(job, leases);
    let leases: Vec<&LeaseRecord> = leases.iter().filter(|l| l.job == job.job).collect();
    let records: Vec<serde_json::Value> = records
        .iter()
        .map(|(id, r)| {
            serde_json::json!({
                "id": id,
                "command": r.command,
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "operator": r.operator,
                "host": r.host,
                "exit_code": r.exit_code,
            })
        })
        .collect();
    let mut value = serde_json::to_value(job).unwrap_or_default();
    value["targets"] = serde_json::Value::Array(targets);
    value["live_runners"] = serde_json::json!(live);
    value["leases"] = serde_json::to_value(leases).unwrap_or_default();
    value["latest_records"] = serde_json::Value::Array(records);
    value
}

/// Counts the job's leases that have not expired.
fn live_runners(job: &JobRecord, leases: &[LeaseRecord]) -> usize {
    leases
        .iter()
        .filter(|lease| lease.job == job.job && lease.is_live())
        .count()
}

fn render_job(
    job: &JobRecord,
    progress: &[TargetProgress],
    leases: &[LeaseRecord],
    records: &[(i64, RunRecord)],
) -> String {
    let identity = checkpoint::JobIdentity {
        job: job.job.clone(),
        targets: job.targets.clone(),
        new_key_fingerprint: job.new_key_fingerprint.clone(),
        old_key_fingerprints: job.old_key_fingerprints.clone(),
        new_key_version: job.new_key_version,
        old_key_versions: job.old_key_versions.clone(),
        shard_count: job.shard_count,
        writers: job.writers,
    };
    // A job stays `running` in its record after its runner is killed, so
    // the status line also shows when no runner holds a live lease.
    let status = if job.status == "running" && live_runners(job, leases) == 0 {
        "running, no live runner".to_string()
    } else {
        job.status.clone()
    };
    let mut out = format!(
        "job {} ({}): created {}, updated {}{}; {} shard(s) x {} writer(s)\n{}\n",
        job.job,
        status,
        job.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
        job.updated_at.format("%Y-%m-%d %H:%M:%S UTC"),
        job.finished_at
            .map(|f| format!(", finished {}", f.format("%Y-%m-%d %H:%M:%S UTC")))
            .unwrap_or_default(),
        job.shard_count,
        job.writers,
        KeyEvidence::from_identity(&identity).describe(),
    );

    let rows: Vec<Vec<String>> = progress
        .iter()
        .filter(|t| t.job == job.job)
        .map(|t| {
            vec![
                t.target.clone(),
                format!("{}/{}", t.ranges_done, t.ranges),
                t.counts.rows_scanned.to_string(),
                t.rows_estimated.to_string(),
                progress_fraction(t).map_or("-".into(), |f| format!("{:.1}%", f * 100.0)),
                rows_per_second(t).map_or("-".into(), |r| format!("{r:.0}")),
                t.counts.reencrypted.to_string(),
                t.counts.sweep_reencrypted.to_string(),
                t.counts.attention().to_string(),
                t.updated_at.format("%H:%M:%S").to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no ranges laid out yet\n");
    } else {
        out.push_str(&report::table(
            &[
                "target",
                "ranges done",
                "scanned",
                "estimated",
                "progress",
                "rows/s",
                "re-encrypted",
                "swept",
                "attention",
                "last checkpoint",
            ],
            &rows,
        ));
    }

    for lease in leases.iter().filter(|l| l.job == job.job) {
        out.push_str(&format!(
            "lease: shard {} held by host {} pid {}, heartbeat {:.0}s ago, {}\n",
            lease.shard,
            lease.host,
            lease.pid,
            lease.heartbeat_age_secs,
            if lease.is_live() {
                format!("expires in {:.0}s", lease.expires_in_secs)
            } else {
                format!("expired {:.0}s ago", -lease.expires_in_secs)
            }
        ));
    }
    for (id, record) in records {
        out.push_str(&format!(
            "latest {}: record {id}, exit code {}, finished {} by {} on {}\n",
            record.command,
            record.exit_code,
            record.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
            record.operator,
            record.host
        ));
    }
    out.push('\n');
    out
}

/// Reads a job and its leases, or fails with exit code 2 when it does not exist.
async fn find_job(
    db: &Database,
    schema: &str,
    job: &str,
) -> Result<(JobRecord, Vec<TargetProgress>, Vec<LeaseRecord>), Failure> {
    if job.trim().is_empty() {
        return Err(Failure::Config("--job must not be empty".into()));
    }
    let fail = |e: sqlx::Error| Failure::from_database("cannot read the checkpoint tables", &e);
    let mut tx = db.begin_read_only().await.map_err(fail)?;
    if !checkpoint::schema_exists(&mut tx, schema)
        .await
        .map_err(fail)?
    {
        return Err(job_not_found(job, schema, false));
    }
    let Some(record) = checkpoint::load_jobs(&mut tx, schema, Some(job))
        .await
        .map_err(fail)?
        .pop()
    else {
        return Err(job_not_found(job, schema, true));
    };
    let progress = checkpoint::load_target_progress(&mut tx, schema, Some(job))
        .await
        .map_err(fail)?;
    let leases = checkpoint::load_leases(&mut tx, schema, Some(job), None, false)
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    Ok((record, progress, leases))
}

/// Builds the error for a `--job` that names no job in `schema`.
fn job_not_found(job: &str, schema: &str, schema_exists: bool) -> Failure {
    if schema_exists {
        Failure::Config(format!(
            "no job named {job}; `reencrypt status` lists the jobs"
        ))
    } else {
        Failure::Config(format!(
            "no job named {job}: schema {schema} has no checkpoint tables"
        ))
    }
}

/// Describes a live lease for a refusal message.
fn describe_live_lease(lease: &LeaseRecord) -> String {
    format!(
        "shard {} is held by host {} pid {} (heartbeat {:.0}s ago, expires in {:.0}s)",
        lease.shard, lease.host, lease.pid, lease.heartbeat_age_secs, lease.expires_in_secs
    )
}

/// Asks a yes/no question on the terminal; returns true for yes.
fn confirm(question: &str) -> Result<bool, Failure> {
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{question} [y/N] ");
    let _ = stderr.flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::Config(format!("cannot read the confirmation: {e}")))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// Deletes a job and everything its runs checkpointed, after confirmation.
pub async fn reset(args: &ResetArgs) -> Result<i32, Failure> {
    let db = connect(&args.database, 1, default_timeouts()).await?;
    let schema = &args.database.schema;
    let (job, progress, leases) = find_job(&db, schema, &args.job).await?;
    print!("{}", render_job(&job, &progress, &leases, &[]));

    let live: Vec<&LeaseRecord> = leases.iter().filter(|l| l.is_live()).collect();
    if let Some(lease) = live.first() {
        if !args.force {
            return Err(Failure::Config(format!(
                "job {} is running: {}; stop that runner first, or pass --force",
                job.job,
                describe_live_lease(lease)
            )));
        }
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::Config(format!(
                "standard input is not a terminal, so reset cannot ask for confirmation; pass --yes to reset job {}",
                job.job
            )));
        }
        let question = format!(
            "Reset job {}? Its checkpoints are deleted and the next run starts over.",
            job.job
        );
        if !confirm(&question)? {
            return Err(Failure::Config(format!(
                "reset cancelled; job {} is unchanged",
                job.job
            )));
        }
    }

    // Delete under the job's advisory lock, re-checking the leases, so that a
    // runner starting meanwhile is either seen here or finds no job.
    let fail = |e: sqlx::Error| Failure::from_database("cannot reset the job", &e);
    let mut tx = db.begin().await.map_err(fail)?;
    checkpoint::lock_job(&mut tx, &job.job)
        .await
        .map_err(fail)?;
    let leases = checkpoint::load_leases(&mut tx, schema, Some(&job.job), None, true)
        .await
        .map_err(fail)?;
    if let Some(lease) = leases.iter().find(|l| l.is_live()) {
        if !args.force {
            return Err(Failure::Config(format!(
                "job {} was started meanwhile: {}; nothing was deleted",
                job.job,
                describe_live_lease(lease)
            )));
        }
    }
    let existed = checkpoint::delete_job(&mut tx, schema, &job.job)
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    if existed {
        println!(
            "job {} reset: its ranges, leases and attention rows are deleted (evidence records in {schema}.runs are kept); the next run starts over",
            job.job
        );
    } else {
        println!("job {} was already deleted by another command", job.job);
    }
    Ok(crate::exit::SUCCESS)
}

/// Deletes a job's lease(s); refuses a lease that has not expired unless --force.
pub async fn release(args: &ReleaseArgs) -> Result<i32, Failure> {
    let db = connect(&args.database, 1, default_timeouts()).await?;
    let schema = &args.database.schema;
    let (job, _, _) = find_job(&db, schema, &args.job).await?;
    let shard_text = args.shard.map_or(String::new(), |s| format!(" shard {s}"));

    // The leases stay locked from the check to the delete, so a lease cannot
    // be renewed in between and then deleted as if it had expired.
    let fail = |e: sqlx::Error| Failure::from_database("cannot release the lease", &e);
    let mut tx = db.begin().await.map_err(fail)?;
    let leases = checkpoint::load_leases(&mut tx, schema, Some(&job.job), args.shard, true)
        .await
        .map_err(fail)?;
    if leases.is_empty() {
        tx.commit().await.map_err(fail)?;
        println!(
            "job {}{shard_text} holds no lease; nothing to release",
            job.job
        );
        return Ok(crate::exit::SUCCESS);
    }
    for lease in &leases {
        println!(
            "lease: job {} shard {} held by host {} pid {} since {}, heartbeat {:.0}s ago, {}",
            lease.job,
            lease.shard,
            lease.host,
            lease.pid,
            lease.acquired_at.format("%Y-%m-%d %H:%M:%S UTC"),
            lease.heartbeat_age_secs,
            if lease.is_live() {
                format!("expires in {:.0}s", lease.expires_in_secs)
            } else {
                format!("expired {:.0}s ago", -lease.expires_in_secs)
            }
        );
    }
    if let Some(lease) = leases.iter().find(|l| l.is_live()) {
        if !args.force {
            tx.rollback().await.map_err(fail)?;
            return Err(Failure::Config(format!(
                "not released: job {} {}. A live runner renews its lease; if that runner is gone, wait until the lease expires, or pass --force",
                job.job,
                describe_live_lease(lease)
            )));
        }
    }
    let shards: Vec<i32> = leases.iter().map(|l| l.shard).collect();
    let released = checkpoint::delete_leases(&mut tx, schema, &job.job, &shards)
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    println!(
        "released {released} lease(s) of job {}{shard_text}",
        job.job
    );
    Ok(crate::exit::SUCCESS)
}

/// Prints where each key comes from, its fingerprint and Vault version.
pub async fn keys(args: &KeysArgs) -> Result<i32, Failure> {
    let keys = crate::keys::resolve(&args.keys).await?;
    let mut rows = vec![vec![
        "new".to_string(),
        keys.new.key.fingerprint(),
        keys.new
            .origin
            .vault_version()
            .map_or("-".into(), |v| v.to_string()),
        keys.new.origin.to_string(),
    ]];
    for (index, old) in keys.old.iter().enumerate() {
        rows.push(vec![
            format!("old {}", index + 1),
            old.key.fingerprint(),
            old.origin
                .vault_version()
                .map_or("-".into(), |v| v.to_string()),
            old.origin.to_string(),
        ]);
    }
    match args.format {
        OutputFormat::Table => print!(
            "{}",
            crate::report::table(&["key", "fingerprint", "kv version", "source"], &rows)
        ),
        OutputFormat::Json => {
            let value: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| serde_json::json!({"role": r[0], "fingerprint": r[1], "kv_version": r[2], "source": r[3]}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
    }
    Ok(crate::exit::SUCCESS)
}

/// Records the run, with --report in a JSON file first, then in the runs
/// table, so that the file is written even when the database is gone.
///
/// The `before` counts are exact zeros when this run created (or restarted)
/// the job, and otherwise the `after` counts of the job's latest earlier
/// evidence record. A run whose record could not be written leaves none,
/// so the next run's `before` counts miss its work. `before_source` names
/// the case that applies.
pub async fn record_run(args: &RunArgs, summary: &RunSummary, code: i32) -> Result<(), Failure> {
    let (timeouts, _, _) = crate::run::tuning(&args.tuning)?;
    let schema = &args.database.schema;
    let fail =
        |e: sqlx::Error| Failure::from_database("cannot record the run in the runs table", &e);
    let (before, before_source) = counts_before(summary);
    let evidence = Evidence {
        record_version: report::EVIDENCE_RECORD_VERSION,
        command: "run".into(),
        job: summary.job.clone(),
        started_at: summary.started_at,
        finished_at: summary.finished_at,
        duration_seconds: summary.duration_seconds,
        operator: report::operator(args.output.operator.as_deref()),
        host: report::host_name(),
        tool: env!("CARGO_PKG_NAME").into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        keys: KeyEvidence::from_identity(&summary.key_fingerprints),
        targets: summary
            .targets
            .iter()
            .map(|t| EvidenceTarget {
                target: t.target.clone(),
                key_columns: t.key_columns.clone(),
                index: t.index.clone(),
                before: before.as_ref().map(|b| {
                    b.get(&t.target).cloned().unwrap_or_else(|| {
                        serde_json::to_value(Counts::default()).unwrap_or_default()
                    })
                }),
                after: serde_json::to_value(t.counts).unwrap_or_default(),
            })
            .collect(),
        before_source: Some(before_source),
        sweeps: Some(SweepEvidence {
            sweeps: summary.sweeps,
            last_found: summary.sweep_last_found,
            sweep_reencrypted: summary.total().sweep_reencrypted,
        }),
        job_finished: Some(summary.job_finished),
        verify: None,
        attention: summary
            .attention
            .iter()
            .map(|(target, key, outcome)| AttentionKey {
                target: target.clone(),
                key: key.clone(),
                outcome: outcome.clone(),
            })
            .collect(),
        exit_code: code,
    };
    if let Some(path) = &args.output.report {
        write_report(path, &evidence)?;
    }

    let db = connect(&args.database, 1, timeouts).await?;
    let mut tx = db.begin().await.map_err(fail)?;
    let id = checkpoint::insert_run(&mut tx, schema, &run_record(&evidence))
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    tracing::info!(job = %summary.job, record = id, "Run recorded in the runs table.");
    Ok(())
}

/// Each target's counts when the run started, as JSON, and where they come from.
fn counts_before(
    summary: &RunSummary,
) -> (
    Option<std::collections::BTreeMap<String, serde_json::Value>>,
    String,
) {
    let Some(before) = &summary.counts_before else {
        return (
            None,
            "unknown: the run did not record its starting counts".into(),
        );
    };
    let counts = summary
        .targets
        .iter()
        .map(|t| {
            let counts = before.get(&t.target).copied().unwrap_or_default();
            (
                t.target.clone(),
                serde_json::to_value(counts).unwrap_or_default(),
            )
        })
        .collect();
    (
        Some(counts),
        "checkpoint: the job's counts when this run started (zero for a new or restarted job)"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ranges_done: i64, scanned: i64, estimated: i64) -> TargetProgress {
        TargetProgress {
            job: "j".into(),
            target: "t".into(),
            ranges: 2,
            ranges_done,
            rows_estimated: estimated,
            counts: Counts {
                rows_scanned: scanned,
                ..Counts::default()
            },
            started_at: None,
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn progress_follows_ranges_not_estimates() {
        // Rows deleted during the run: done is done.
        assert_eq!(progress_fraction(&target(2, 766, 1000)), Some(1.0));
        // More rows than estimated: not done yet, so below 100%.
        assert_eq!(progress_fraction(&target(1, 1500, 1000)), Some(0.999));
        assert_eq!(progress_fraction(&target(0, 250, 1000)), Some(0.25));
        assert_eq!(progress_fraction(&target(0, 250, 0)), None);
    }
}
