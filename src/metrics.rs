//! Prometheus metrics: every name and label in one place, and one function per
//! event that records it.
//!
//! Labels come only from small fixed sets: `target` (the configured targets),
//! `outcome`, `phase`, `kind`, `state`, `reason`. Row keys, values and error
//! messages are never labels.

use std::net::SocketAddr;
use std::sync::Mutex;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::checkpoint::Counts;
use crate::classify::Outcome;
use crate::error::Failure;
use crate::report::RunSummary;

pub const ROWS_TOTAL: &str = "reencrypt_rows_total";
pub const CONFLICTS_TOTAL: &str = "reencrypt_conflicts_total";
pub const BATCHES_TOTAL: &str = "reencrypt_batches_total";
pub const BATCH_DURATION_SECONDS: &str = "reencrypt_batch_duration_seconds";
pub const ROWS_ESTIMATED: &str = "reencrypt_rows_estimated";
pub const ROWS_SCANNED: &str = "reencrypt_rows_scanned";
pub const LAST_CHECKPOINT_TIMESTAMP_SECONDS: &str = "reencrypt_last_checkpoint_timestamp_seconds";
pub const RETRIES_TOTAL: &str = "reencrypt_retries_total";
pub const ERRORS_TOTAL: &str = "reencrypt_errors_total";
pub const JOB_INFO: &str = "reencrypt_job_info";
pub const JOB_STATE: &str = "reencrypt_job_state";
pub const JOB_START_TIMESTAMP_SECONDS: &str = "reencrypt_job_start_timestamp_seconds";
pub const JOB_LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "reencrypt_job_last_success_timestamp_seconds";
pub const SWEEP_ROWS_REENCRYPTED_TOTAL: &str = "reencrypt_sweep_rows_reencrypted_total";
pub const THROTTLED: &str = "reencrypt_throttled";
/// Cumulative seconds spent waiting in the throttle (a gauge, because it is fractional).
pub const THROTTLE_WAIT_SECONDS: &str = "reencrypt_throttle_wait_seconds";

/// Batch phases timed by `reencrypt_batch_duration_seconds`.
pub const PHASES: [&str; 3] = ["fetch", "crypto", "write"];

/// Job states exported by `reencrypt_job_state`.
pub const STATES: [&str; 4] = ["running", "finished", "failed", "interrupted"];

/// Kinds counted by `reencrypt_retries_total` and `reencrypt_errors_total`: the
/// labels of `crate::db::TransientKind`, and `database` for errors that are not transient.
pub const ERROR_KINDS: [&str; 7] = [
    "connection",
    "deadlock",
    "lock_timeout",
    "statement_timeout",
    "serialization",
    "server_shutdown",
    "database",
];

/// Throttle reasons exported by `reencrypt_throttled`.
pub const THROTTLE_REASONS: [&str; 3] = ["rate_limit", "pause", "replication_lag"];

/// The job name recorded with the job info, which keys the Pushgateway group.
static JOB_NAME: Mutex<Option<String>> = Mutex::new(None);

/// Histogram buckets for batch phases, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the global recorder. With `listen`, also serves `/metrics` there;
/// the address is bound before this returns, so a taken port is an error here.
/// Must be called inside the tokio runtime.
pub fn install(listen: Option<SocketAddr>) -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(BATCH_DURATION_SECONDS.to_string()),
            &DURATION_BUCKETS,
        )
        .map_err(|e| format!("invalid histogram buckets: {e}"))?;
    let recorder = match listen {
        Some(address) => {
            let (recorder, exporter) = builder
                .with_http_listener(address)
                .build()
                .map_err(|e| format!("cannot serve metrics on {address}: {e}"))?;
            tokio::spawn(exporter);
            recorder
        }
        None => builder.build_recorder(),
    };
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;

    // Series that exist from the start make rate() and increase() see the
    // first retry or error, which a series created by that event would hide.
    for kind in ERROR_KINDS {
        counter!(RETRIES_TOTAL, "kind" => kind).absolute(0);
        counter!(ERRORS_TOTAL, "kind" => kind).absolute(0);
    }
    Ok(handle)
}

/// Records the job's identity: key fingerprints and Vault versions, never keys.
pub fn record_job_info(
    job: &str,
    new_fingerprint: &str,
    old_fingerprints: &str,
    new_version: &str,
    old_versions: &str,
) {
    gauge!(JOB_INFO,
        "job_name" => job.to_string(),
        "new_key_fingerprint" => new_fingerprint.to_string(),
        "old_key_fingerprints" => old_fingerprints.to_string(),
        "new_key_version" => new_version.to_string(),
        "old_key_versions" => old_versions.to_string(),
        "version" => env!("CARGO_PKG_VERSION"))
    .set(1.0);
    gauge!(JOB_START_TIMESTAMP_SECONDS).set(unix_now());
    *JOB_NAME.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.to_string());
}

/// Returns the job name recorded by [`record_job_info`], if the run got that far.
pub fn job_name() -> Option<String> {
    JOB_NAME.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Sets the job state: 1 for the current state, 0 for the others.
pub fn record_state(state: &str) {
    for s in STATES {
        gauge!(JOB_STATE, "state" => s).set(if s == state { 1.0 } else { 0.0 });
    }
}

/// Records how the run ended, before the final push. Only a run that leaves
/// the whole job finished sets the last-success time. A run whose shard is done
/// while other shards still work stays `running`.
pub fn record_end(result: Result<&RunSummary, &Failure>) {
    match result {
        Ok(summary) if summary.job_finished => {
            record_state("finished");
            gauge!(JOB_LAST_SUCCESS_TIMESTAMP_SECONDS).set(unix_now());
        }
        Ok(_) => record_state("running"),
        Err(Failure::Interrupted) => record_state("interrupted"),
        Err(_) => record_state("failed"),
    }
}

/// Registers a target with zeroed series, so dashboards show it before its first batch.
pub fn register_target(target: &str, estimated_rows: i64, already_scanned: i64) {
    for outcome in Outcome::ALL {
        counter!(ROWS_TOTAL, "target" => target.to_string(), "outcome" => outcome.label())
            .absolute(0);
    }
    counter!(CONFLICTS_TOTAL, "target" => target.to_string()).absolute(0);
    counter!(BATCHES_TOTAL, "target" => target.to_string()).absolute(0);
    counter!(SWEEP_ROWS_REENCRYPTED_TOTAL, "target" => target.to_string()).absolute(0);
    gauge!(ROWS_ESTIMATED, "target" => target.to_string()).set(estimated_rows as f64);
    gauge!(ROWS_SCANNED, "target" => target.to_string()).set(already_scanned as f64);
}

/// Records a committed batch: outcome counters, phase durations, progress.
pub fn record_batch(
    target: &str,
    counts: &Counts,
    fetch_seconds: f64,
    crypto_seconds: f64,
    write_seconds: f64,
) {
    for outcome in Outcome::ALL {
        let n = counts.outcome(outcome);
        if n > 0 {
            counter!(ROWS_TOTAL, "target" => target.to_string(), "outcome" => outcome.label())
                .increment(n as u64);
        }
    }
    if counts.conflicts > 0 {
        counter!(CONFLICTS_TOTAL, "target" => target.to_string())
            .increment(counts.conflicts as u64);
    }
    if counts.sweep_reencrypted > 0 {
        counter!(SWEEP_ROWS_REENCRYPTED_TOTAL, "target" => target.to_string())
            .increment(counts.sweep_reencrypted as u64);
    }
    counter!(BATCHES_TOTAL, "target" => target.to_string()).increment(1);
    histogram!(BATCH_DURATION_SECONDS, "target" => target.to_string(), "phase" => PHASES[0])
        .record(fetch_seconds);
    histogram!(BATCH_DURATION_SECONDS, "target" => target.to_string(), "phase" => PHASES[1])
        .record(crypto_seconds);
    histogram!(BATCH_DURATION_SECONDS, "target" => target.to_string(), "phase" => PHASES[2])
        .record(write_seconds);
    gauge!(LAST_CHECKPOINT_TIMESTAMP_SECONDS, "target" => target.to_string()).set(unix_now());
}

/// Sets a target's rows scanned so far (main pass, including earlier runs).
pub fn set_rows_scanned(target: &str, rows: u64) {
    gauge!(ROWS_SCANNED, "target" => target.to_string()).set(rows as f64);
}

pub fn record_retry(kind: &'static str) {
    counter!(RETRIES_TOTAL, "kind" => kind).increment(1);
}

pub fn record_error(kind: &'static str) {
    counter!(ERRORS_TOTAL, "kind" => kind).increment(1);
}

/// Sets whether the job is throttled, and why.
pub fn record_throttle(reason: &'static str, active: bool) {
    gauge!(THROTTLED, "reason" => reason).set(if active { 1.0 } else { 0.0 });
}

pub fn record_throttle_wait(reason: &'static str, seconds: f64) {
    gauge!(THROTTLE_WAIT_SECONDS, "reason" => reason).increment(seconds);
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::ERROR_KINDS;
    use crate::db::TransientKind;

    #[test]
    fn every_transient_kind_is_registered() {
        let kinds = [
            TransientKind::Connection,
            TransientKind::Deadlock,
            TransientKind::LockTimeout,
            TransientKind::StatementTimeout,
            TransientKind::Serialization,
            TransientKind::ServerShutdown,
        ];
        for kind in kinds {
            // A new variant makes this match fail to compile, so the list above stays complete.
            match kind {
                TransientKind::Connection
                | TransientKind::Deadlock
                | TransientKind::LockTimeout
                | TransientKind::StatementTimeout
                | TransientKind::Serialization
                | TransientKind::ServerShutdown => {}
            }
            assert!(
                ERROR_KINDS.contains(&kind.label()),
                "{} is missing from ERROR_KINDS",
                kind.label()
            );
        }
    }
}
