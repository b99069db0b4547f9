//! `reencrypt` re-encrypts AES-256-CBC encrypted PostgreSQL text columns from
//! old keys to a new key, in resumable, checkpointed batches.
//!
//! Modules, from the value up to the command:
//! - [`envelope`]: the stored value format, read as the Node.js application reads it.
//! - [`keys`]: keys, fingerprints, and where keys come from; [`vault`]: keys from Vault KV v2.
//! - [`classify`]: the safety core, deciding per value with every key.
//! - [`target`]: `[schema.]table.column` parsing and catalog lookup.
//! - [`statements`]: the SQL of one target; [`db`]: pool, timeouts, retryable errors.
//! - [`checkpoint`]: the worker's tables (jobs, ranges, attention, runs); [`lease`]: one runner per job.
//! - [`pipeline`]: fetch, classify and write one key range; [`position`]: row positions;
//!   [`throttle`]: rate limits.
//! - [`sweep`]: which key spans the final sweeps read whole or only for changed rows.
//! - [`scan`]: read-only scans that classify every row (or a sample) and write nothing.
//! - [`run`]: the `run` command; [`inspect`]: `plan`, `verify`, `status`, `reset`, `release`, `keys`.
//! - [`metrics`], [`push`], [`progress`], [`telemetry`]: what an operator watches.
//! - [`report`]: summaries and evidence records; [`demo`]: the self-contained demo.
//! - [`cli`]: arguments; [`error`] and [`exit`]: failures and exit codes.

pub mod checkpoint;
pub mod classify;
pub mod cli;
pub mod db;
pub mod demo;
pub mod envelope;
pub mod error;
pub mod exit;
pub mod inspect;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod pipeline;
pub mod position;
pub mod progress;
pub mod push;
pub mod report;
pub mod run;
pub mod scan;
pub mod statements;
pub mod sweep;
pub mod target;
pub mod telemetry;
pub mod throttle;
pub mod vault;
