//! Command-line arguments. Every option has help text and, where a Kubernetes
//! Job would set it, an environment variable. Defaults are named constants.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::vault::VaultArgs;

/// Default local database for `demo`: the machine's own PostgreSQL.
pub const DEFAULT_DEMO_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Default address of the `/metrics` listener.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9464";
/// Starting rows per batch; adaptive sizing moves it between the bounds below.
pub const DEFAULT_BATCH_ROWS: usize = 2000;
pub const MIN_BATCH_ROWS: usize = 50;
pub const MAX_BATCH_ROWS: usize = 10_000;
/// A batch stops growing once its values reach this many bytes.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Adaptive sizing aims the write phase of a batch at this duration.
pub const DEFAULT_BATCH_TARGET_MS: u64 = 500;
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_MAX_RETRIES: u32 = 10;
pub const DEFAULT_RETRY_BUDGET_SECS: u64 = 300;
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 600;
pub const DEFAULT_LEASE_TTL_SECS: u64 = 30;
pub const DEFAULT_MAX_SWEEPS: u32 = 2;
pub const MAX_WRITERS: u32 = 64;
pub const DEFAULT_PROGRESS_INTERVAL_SECS: u64 = 10;
pub const DEFAULT_PUSH_INTERVAL_SECS: u64 = 15;
pub const DEFAULT_REPORT_LIMIT: i64 = 20;

/// Re-encrypts AES-256-CBC encrypted PostgreSQL text columns from old keys to
/// a new key, in resumable batches, without losing a value.
#[derive(Parser, Debug)]
#[command(name = "reencrypt", version, about, after_help = crate::exit::HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format: `text` for people, `json` for log collectors. Filter with RUST_LOG (default `info`).
    #[arg(long, global = true, env = "REENCRYPT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Rotate the target columns from the old keys to the new key.
    #[command(after_help = crate::exit::HELP)]
    Run(RunArgs),
    /// Read-only: count what a run would do, per target. Writes nothing.
    Plan(PlanArgs),
    /// Check every value: exit 0 only if none is readable under an old key and none is ambiguous. Changes no value, and records the result in the worker's runs table.
    #[command(after_help = crate::exit::HELP)]
    Verify(VerifyArgs),
    /// Show jobs and their targets from the checkpoint tables.
    Status(StatusArgs),
    /// Show where each key comes from, with its fingerprint and Vault version (never the key).
    Keys(KeysArgs),
    /// Forget a job's checkpoints so that the next run starts over.
    Reset(ResetArgs),
    /// Release a job's lease left by a runner that is gone.
    Release(ReleaseArgs),
    /// Create a demo table under a generated old key in a local database and rotate it.
    Demo(DemoArgs),
}

/// The database and the worker's schema.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL, e.g. postgres://user:password@host:5432/db.
    /// Query parameters: sslmode, sslrootcert, sslcert, sslkey (or ssl-mode,
    /// ssl-root-cert or ssl-ca, ssl-cert, ssl-key), host, hostaddr, port,
    /// dbname, user, password, application_name (default reencrypt), options
    /// and options[NAME], each once. Any other parameter is rejected, and so
    /// is a '#' fragment. Write ':', '/', '?', '#' and '@' in a password as
    /// %3A, %2F, %3F, %23 and %40.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Schema holding the worker's checkpoint tables (created if missing).
    #[arg(long, env = "REENCRYPT_SCHEMA", default_value = crate::checkpoint::DEFAULT_SCHEMA)]
    pub schema: String,
}

/// Key sources. Keys given in several ways are all used.
#[derive(Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// File holding the new key (64 hex characters; whitespace around it is ignored).
    /// The environment variable NEW_ENCRYPTION_KEY may hold the key itself instead.
    #[arg(long, env = "NEW_ENCRYPTION_KEY_FILE")]
    pub new_key_file: Option<PathBuf>,

    /// File holding an old key, such as the runbook's backup of the previous key.
    /// Repeat for keys rotated more than once. OLD_ENCRYPTION_KEY may hold
    /// comma-separated keys instead.
    #[arg(long, env = "OLD_ENCRYPTION_KEY_FILE", value_delimiter = ',')]
    pub old_key_file: Vec<PathBuf>,

    #[command(flatten)]
    pub vault: VaultArgs,
}

/// Tables and columns to rotate.
#[derive(Args, Debug, Clone, Default)]
pub struct TargetArgs {
    /// Column to rotate, as [schema.]table.column; quote parts with double quotes
    /// as in SQL, e.g. acc."Webhook Configs"."Signing Secret". Repeatable.
    /// A value may list several targets separated by commas; commas inside
    /// double quotes belong to the name.
    #[arg(long = "target", env = "REENCRYPT_TARGETS", required = true)]
    pub targets: Vec<String>,

    /// Paging key for a table without a primary key: [schema.]table=col[,col].
    /// The columns must be NOT NULL and carry a unique index. Repeatable.
    #[arg(long = "unique-key")]
    pub unique_keys: Vec<String>,
}

/// Timeouts, retries and batch sizing.
#[derive(Args, Debug, Clone)]
pub struct TuningArgs {
    /// Fixed rows per batch. Without it the size adapts, starting at 2000 and
    /// aiming at a write phase of --batch-target-ms.
    #[arg(long, env = "REENCRYPT_BATCH_SIZE")]
    pub batch_size: Option<usize>,

    /// Maximum bytes of values fetched in one batch; a batch ends at the first row past it.
    #[arg(long, env = "REENCRYPT_BATCH_MAX_BYTES", default_value_t = DEFAULT_BATCH_MAX_BYTES)]
    pub batch_max_bytes: usize,

    /// Duration of a batch's write phase that adaptive sizing aims at, in milliseconds.
    #[arg(long, env = "REENCRYPT_BATCH_TARGET_MS", default_value_t = DEFAULT_BATCH_TARGET_MS)]
    pub batch_target_ms: u64,

    /// Threads for decryption and encryption, 1 to 256 (default: the available cores).
    #[arg(long, env = "REENCRYPT_THREADS")]
    pub threads: Option<usize>,

    /// lock_timeout of every transaction, in milliseconds (at most 2147483647).
    #[arg(long, env = "REENCRYPT_LOCK_TIMEOUT_MS", default_value_t = DEFAULT_LOCK_TIMEOUT_MS)]
    pub lock_timeout_ms: u64,

    /// statement_timeout of every transaction, in milliseconds (at most
    /// 2147483647). A batch that
    /// times out is split in two and retried.
    #[arg(long, env = "REENCRYPT_STATEMENT_TIMEOUT_MS", default_value_t = DEFAULT_STATEMENT_TIMEOUT_MS)]
    pub statement_timeout_ms: u64,

    /// idle_in_transaction_session_timeout of every transaction, in
    /// milliseconds (at most 2147483647).
    #[arg(long, env = "REENCRYPT_IDLE_IN_TRANSACTION_TIMEOUT_MS", default_value_t = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS)]
    pub idle_in_transaction_timeout_ms: u64,

    /// Attempts for one batch before giving up with exit code 1.
    #[arg(long, env = "REENCRYPT_MAX_RETRIES", default_value_t = DEFAULT_MAX_RETRIES)]
    pub max_retries: u32,

    /// Seconds one batch may spend retrying before giving up with exit code 1.
    #[arg(long, env = "REENCRYPT_RETRY_BUDGET_SECS", default_value_t = DEFAULT_RETRY_BUDGET_SECS)]
    pub retry_budget_secs: u64,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,

    /// Job name, the key of the checkpoints (default: derived from the targets
    /// and the new key's fingerprint, so the same command resumes the same job).
    #[arg(long, env = "REENCRYPT_JOB")]
    pub job: Option<String>,

    /// Forget this job's checkpoints and start over, even with other keys or settings.
    #[arg(long)]
    pub restart: bool,

    /// Read-only: report what a run would do, as `plan` does.
    #[arg(long)]
    pub dry_run: bool,

    /// Concurrent writers per target, each on its own key range and
    /// connection: a number from 1 to 64, or `auto`. `auto` takes 2 for a
    /// new job that reads a target in physical order, where one writer
    /// leaves the server's other cores idle, and 1 otherwise or with
    /// --pause-between-batches-ms, whose pause applies to each writer. A job
    /// that resumes keeps its count. Fixed for the life of a job. With adaptive
    /// batch sizing the writers share the batch limits, so memory does not
    /// grow with their number; a fixed --batch-size applies to each writer.
    #[arg(long, env = "REENCRYPT_WRITERS", default_value = "auto")]
    pub writers: Writers,

    /// This process's shard, from 0 (Indexed Jobs set JOB_COMPLETION_INDEX).
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    pub shard_index: u32,

    /// Number of shards the key space is split into; fixed for the life of a job.
    #[arg(long, env = "REENCRYPT_SHARD_COUNT", default_value_t = 1)]
    pub shard_count: u32,

    /// Order of the pass. `key` pages through the key's index. `physical`
    /// reads the table block by block, without random reads of the table,
    /// but its writes reach the key's index at random. `physical` needs
    /// PostgreSQL 14 or later, a table without partitions or child tables,
    /// one shard and at least one sweep: a row the application updates
    /// during the pass may move behind it. A run that resumes the pass ends
    /// with a sweep of every row. `auto` takes `physical` where it can for a
    /// table over 2 times the server's `shared_buffers` (1.2 times for a job
    /// with more than one writer, where physical order gains more from the
    /// other writers), `key` otherwise.
    /// Fixed for the life of a job.
    #[arg(long, env = "REENCRYPT_SCAN_ORDER", value_enum, ignore_case = true, default_value_t = ScanOrder::Auto)]
    pub scan_order: ScanOrder,

    /// Final sweeps after the keyset pass: read the rows changed since the pass
    /// read them, for values under an old key (written by stale application
    /// replicas), and rotate them. 0 turns sweeps off. Then values written
    /// under an old key during the pass are not looked for, and exit code 0
    /// means only that the pass finished, so run `verify` before retiring the key.
    #[arg(long, env = "REENCRYPT_MAX_SWEEPS", default_value_t = DEFAULT_MAX_SWEEPS)]
    pub max_sweeps: u32,

    /// Exit with code 1 when no batch commits for this many seconds.
    #[arg(long, env = "REENCRYPT_STALL_TIMEOUT_SECS", default_value_t = DEFAULT_STALL_TIMEOUT_SECS)]
    pub stall_timeout_secs: u64,

    /// Seconds a runner's lease lasts without a heartbeat; a runner that was
    /// killed on another host blocks the job at most this long.
    #[arg(long, env = "REENCRYPT_LEASE_TTL_SECS", default_value_t = DEFAULT_LEASE_TTL_SECS)]
    pub lease_ttl_secs: u64,

    /// Upper bound on rows read per second by this process, whether they
    /// need rewriting or not.
    #[arg(long, env = "REENCRYPT_MAX_ROWS_PER_SECOND")]
    pub max_rows_per_second: Option<f64>,

    /// Pause after every batch, in milliseconds.
    #[arg(long, env = "REENCRYPT_PAUSE_BETWEEN_BATCHES_MS")]
    pub pause_between_batches_ms: Option<u64>,

    /// Pause while a replica's replay lag (pg_stat_replication) exceeds this many seconds.
    #[arg(long, env = "REENCRYPT_MAX_REPLICATION_LAG_SECS")]
    pub max_replication_lag_secs: Option<f64>,

    #[command(flatten)]
    pub output: OutputArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// Reports and output.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Summary format on standard output.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,

    /// Write a JSON evidence record of the run to this file.
    #[arg(long, env = "REENCRYPT_REPORT")]
    pub report: Option<PathBuf>,

    /// Who performs the run, for the evidence record (default: the OS user).
    #[arg(long, env = "REENCRYPT_OPERATOR")]
    pub operator: Option<String>,

    /// At most this many keys of rows needing attention are printed.
    #[arg(long, default_value_t = DEFAULT_REPORT_LIMIT)]
    pub report_limit: i64,

    /// Progress display: bars on a terminal, log lines elsewhere, or none.
    #[arg(long, env = "REENCRYPT_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,

    /// Seconds between progress log lines when not on a terminal.
    #[arg(long, env = "REENCRYPT_PROGRESS_INTERVAL_SECS", default_value_t = DEFAULT_PROGRESS_INTERVAL_SECS)]
    pub progress_interval_secs: u64,
}

/// The number of writers requested with `--writers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Chosen by the run: the job's count when it resumes one, and
    /// otherwise by the order of its pass.
    Auto,
    /// This many.
    Count(u32),
}

impl std::str::FromStr for Writers {
    type Err = String;

    fn from_str(text: &str) -> Result<Writers, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Writers::Auto);
        }
        text.parse()
            .map(Writers::Count)
            .map_err(|_| format!("expected a number from 1 to {MAX_WRITERS} or auto, got {text:?}"))
    }
}

/// The order a pass reads a table in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScanOrder {
    /// Physical order for a table much larger than the server's cache,
    /// where it is possible; key order otherwise.
    Auto,
    /// By key, through the key's index.
    Key,
    /// By row position (`ctid`), block by block.
    Physical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    Auto,
    Bars,
    Log,
    Off,
}

/// Prometheus metrics.
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Address of the /metrics listener, or `off`.
    #[arg(long, env = "REENCRYPT_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: String,

    /// Pushgateway base URL, e.g. http://pushgateway:9091. Metrics are pushed
    /// periodically and once more at the end, grouped by job name.
    #[arg(long, env = "REENCRYPT_PUSHGATEWAY_URL")]
    pub pushgateway_url: Option<String>,

    /// Seconds between pushes to the Pushgateway.
    #[arg(long, env = "REENCRYPT_PUSH_INTERVAL_SECS", default_value_t = DEFAULT_PUSH_INTERVAL_SECS)]
    pub push_interval_secs: u64,
}

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,

    /// Classify only about this many rows per target, read with TABLESAMPLE
    /// SYSTEM (random whole pages, about N / estimated rows of them), and scale
    /// the counts to the planner's row estimate. The counts are then estimates.
    /// Default: every row, with exact counts.
    #[arg(long)]
    pub sample: Option<u64>,

    /// Output format: `table` for people, `json` for machines.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,

    /// At most this many keys are listed per outcome that needs attention.
    #[arg(long, default_value_t = DEFAULT_REPORT_LIMIT)]
    pub report_limit: i64,
}

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    /// Job name for the evidence record (default: the name `run` derives from
    /// the targets and the new key, so the record joins that job's records).
    #[arg(long, env = "REENCRYPT_JOB")]
    pub job: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Show only this job.
    #[arg(long)]
    pub job: Option<String>,

    /// Output format: `table` for people, `json` for machines.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Args, Debug, Clone)]
pub struct KeysArgs {
    #[command(flatten)]
    pub keys: KeyArgs,

    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Args, Debug, Clone)]
pub struct ResetArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The job to forget.
    #[arg(long)]
    pub job: String,

    /// Do not ask for confirmation. Required when standard input is not a terminal.
    #[arg(long)]
    pub yes: bool,

    /// Reset even while a runner holds a live lease on the job. That runner
    /// loses its lease and stops with exit code 1 at its next batch.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The job whose lease to release.
    #[arg(long)]
    pub job: String,

    /// Release only this shard's lease (default: all shards).
    #[arg(long)]
    pub shard: Option<i32>,

    /// Release even a lease that has not expired yet (its runner may still
    /// be alive; it stops with exit code 1 at its next batch).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Database to create the demo table in.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = DEFAULT_DEMO_DATABASE_URL)]
    pub database_url: String,

    /// Rows in the demo table.
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,

    /// Name of the demo table (replaced if it exists).
    #[arg(long, default_value = "reencrypt_demo_credentials")]
    pub table: String,
}

/// Returns a note for each option that `message` names and whose value came
/// from its environment variable rather than from `arguments`, the command
/// line. Error messages name options by their flags, which misleads a user
/// who set only the variable.
pub fn environment_notes(message: &str, arguments: &[String]) -> Vec<String> {
    let command = <Cli as clap::CommandFactory>::command();
    let mut variables: Vec<(String, String)> = Vec::new();
    for subcommand in std::iter::once(&command).chain(command.get_subcommands()) {
        for argument in subcommand.get_arguments() {
            let (Some(long), Some(variable)) = (argument.get_long(), argument.get_env()) else {
                continue;
            };
            let flag = format!("--{long}");
            let variable = variable.to_string_lossy().into_owned();
            if !variables.contains(&(flag.clone(), variable.clone())) {
                variables.push((flag, variable));
            }
        }
    }

    let mut notes = Vec::new();
    let named = message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--"));
    for flag in named {
        let on_command_line = arguments
            .iter()
            .any(|argument| argument == flag || argument.starts_with(&format!("{flag}=")));
        if on_command_line {
            continue;
        }
        for (_, variable) in variables.iter().filter(|(f, _)| f == flag) {
            let note = format!(
                "note: {flag} was not given on the command line, so its value came from the environment variable {variable}"
            );
            if std::env::var_os(variable).is_some_and(|value| !value.is_empty())
                && !notes.contains(&note)
            {
                notes.push(note);
            }
        }
    }
    notes
}
