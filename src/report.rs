//! Summaries for people and machines, and the JSON evidence record.

use std::io::Write;
use std::path::Path;

use crate::checkpoint::{Counts, JobIdentity};
use crate::classify::Outcome;

/// One target's counts for the whole job (every run and shard so far).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TargetSummary {
    pub target: String,
    pub key_columns: Vec<String>,
    pub index: String,
    pub counts: Counts,
}

/// The result of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    pub job: String,
    /// False when other shards still have ranges to do.
    pub job_finished: bool,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
    pub duration_seconds: f64,
    pub targets: Vec<TargetSummary>,
    /// Sweeps done after the keyset pass.
    pub sweeps: u32,
    /// Values the last sweep still found under an old key (0 when sweeps converged).
    pub sweep_last_found: i64,
    /// Whether sweeps were turned off (`--max-sweeps 0`): then no one looked
    /// for values written under an old key while the pass ran.
    pub sweeps_off: bool,
    /// Each target's counts in the checkpoint when this run started: what
    /// earlier runs of the job had done (all zero for a new job).
    pub counts_before: Option<std::collections::BTreeMap<String, Counts>>,
    /// (target, key, outcome) of rows needing attention, bounded by --report-limit.
    pub attention: Vec<(String, String, String)>,
    /// Rows in the job's attention table, listed or not.
    pub attention_total: i64,
    /// Of those, the rows that need attention (all but not-in-format ones).
    pub attention_needs_action: i64,
    pub key_fingerprints: JobIdentity,
}

impl Default for JobIdentity {
    fn default() -> JobIdentity {
        JobIdentity {
            job: String::new(),
            targets: Vec::new(),
            new_key_fingerprint: String::new(),
            old_key_fingerprints: Vec::new(),
            new_key_version: None,
            old_key_versions: Vec::new(),
            shard_count: 1,
            writers: 1,
        }
    }
}

impl RunSummary {
    pub fn total(&self) -> Counts {
        crate::run::total(self)
    }

    /// Exit code of a completed run: 3 when rows need attention.
    pub fn exit_code(&self) -> i32 {
        // The attention table, not the counts, lists the rows that still
        // need attention. Every counted row is recorded there in the same
        // transaction, and a sweep may add rows the pass counted as fine. A
        // sweep that rotates a listed row (rejected before its cause was
        // fixed) removes it, while the counts keep the job's history.
        let listed = self
            .attention
            .iter()
            .any(|(_, _, outcome)| outcome != Outcome::NotInFormat.label());
        // Sweeps that still found old-key values in their last round did not
        // settle: the application may still be writing under an old key.
        let unsettled = self.sweep_last_found > 0;
        if self.attention_needs_action > 0 || listed || unsettled {
            crate::exit::NEEDS_ATTENTION
        } else {
            crate::exit::SUCCESS
        }
    }
}

/// Column headings of the outcome table, in `Outcome::ALL` order.
const OUTCOME_HEADINGS: [&str; 8] = [
    "re-encrypted",
    "current",
    "null",
    "not-in-format",
    "undecryptable",
    "ambiguous",
    "deleted",
    "rejected",
];

/// Formats rows as an aligned table with a header line.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

/// Renders the run summary for a terminal.
pub fn render_run(summary: &RunSummary) -> String {
    let mut headers = vec!["target", "scanned"];
    headers.extend(OUTCOME_HEADINGS);
    headers.extend(["conflicts", "swept"]);
    let mut rows: Vec<Vec<String>> = summary
        .targets
        .iter()
        .map(|t| {
            let mut row = vec![t.target.clone(), t.counts.rows_scanned.to_string()];
            row.extend(
                Outcome::ALL
                    .iter()
                    .map(|o| t.counts.outcome(*o).to_string()),
            );
            row.push(t.counts.conflicts.to_string());
            row.push(t.counts.sweep_reencrypted.to_string());
            row
        })
        .collect();
    if summary.targets.len() > 1 {
        let total = summary.total();
        let mut row = vec!["total".to_string(), total.rows_scanned.to_string()];
        row.extend(Outcome::ALL.iter().map(|o| total.outcome(*o).to_string()));
        row.push(total.conflicts.to_string());
        row.push(total.sweep_reencrypted.to_string());
        rows.push(row);
    }

    let mut out = format!("job {}\n", summary.job);
    out.push_str(&table(&headers, &rows));
    let rate = summary.total().rows_scanned as f64 / summary.duration_seconds.max(0.001);
    out.push_str(&format!(
        "duration {:.1}s, {:.0} rows/s (rows scanned by the whole job over this run's duration), sweeps {}\n",
        summary.duration_seconds, rate, summary.sweeps
    ));
    if summary.sweep_last_found > 0 {
        out.push_str(&format!(
            "the last sweep still rotated {} values written under an old key (exit code 3): the application may still write under an old key; run `reencrypt run` again once it writes only under the new key, then `reencrypt verify`\n",
            summary.sweep_last_found
        ));
    }
    if summary.sweeps_off && summary.job_finished {
        out.push_str("sweeps are off (--max-sweeps 0): values the application wrote under an old key while the pass ran were not looked for; run `reencrypt verify` before retiring the old key\n");
    }
    if !summary.job_finished {
        out.push_str("other shards of this job still have ranges to do\n");
    }
    if !summary.attention.is_empty() {
        let listed = summary.attention.len() as i64;
        // Rows not in the format are listed too, but need no action, so the
        // header says how many of the rows need attention, as `status` does.
        let need = summary.attention_needs_action;
        if summary.attention_total > listed {
            out.push_str(&format!(
                "rows left unchanged, the first {listed} of {}, of which {need} need attention (target, key, outcome; `--report-limit` shows more):\n",
                summary.attention_total
            ));
        } else {
            out.push_str(&format!(
                "rows left unchanged, of which {need} need attention (target, key, outcome):\n"
            ));
        }
        for (target, key, outcome) in &summary.attention {
            let key = crate::statements::display_key(key);
            out.push_str(&format!("  {target}  {key}  {outcome}\n"));
        }
    }
    out
}

/// The host name, for leases and evidence records.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The operator for evidence records: the option, else the OS user from
/// `USER` or `LOGNAME`, else the process's account (containers often set
/// neither variable).
pub fn operator(option: Option<&str>) -> String {
    option
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
        .or_else(process_account)
        .unwrap_or_else(|| "unknown".to_string())
}

/// Names the account the process runs as: its name in `/etc/passwd`, or
/// `uid N` when it has no entry there.
fn process_account() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    Some(account_name(uid, &passwd).unwrap_or_else(|| format!("uid {uid}")))
}

/// Finds the name of `uid` in the text of a passwd file.
fn account_name(uid: u32, passwd: &str) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let entry_uid: u32 = fields.nth(1)?.parse().ok()?;
        (entry_uid == uid && !name.is_empty()).then(|| name.to_string())
    })
}

/// Writes a JSON document to `path` atomically (temporary file, then rename).
/// Checks, before any work, that `write_json` will be able to write `path`:
/// it is not a directory, and its directory takes a new file.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a directory",
        ));
    }
    // The record replaces the file by renaming a new one over it, which
    // would replace a device or a pipe instead of writing into it.
    if path.exists() && !path.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    let path = report_target(path)?;
    let temporary = path.with_extension("tmp");
    std::fs::File::create(&temporary)?;
    std::fs::remove_file(&temporary)
}

/// Resolves a report path to the file to replace: the target of a symbolic
/// link, so that the link itself is kept.
fn report_target(path: &Path) -> std::io::Result<std::path::PathBuf> {
    if path.is_symlink() && path.exists() {
        std::fs::canonicalize(path)
    } else {
        Ok(path.to_path_buf())
    }
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let path = report_target(path)?;
    let temporary = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&temporary)?;
        serde_json::to_writer_pretty(&mut file, value)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    std::fs::rename(temporary, &path)
}

/// Labels of the outcomes a read-only scan reports, with the keys of
/// `outcome_counts_json`, in table order.
const SCAN_COLUMNS: [(&str, Outcome); 6] = [
    ("old-key", Outcome::Reencrypted),
    ("current", Outcome::Current),
    ("null", Outcome::Null),
    ("not-in-format", Outcome::NotInFormat),
    ("undecryptable", Outcome::Undecryptable),
    ("ambiguous", Outcome::Ambiguous),
];

/// Returns the counts of a read-only scan, named for what they mean before any
/// write: `old_key` is the number of values a run would re-encrypt.
pub fn outcome_counts_json(counts: &Counts) -> serde_json::Value {
    serde_json::json!({
        "rows": counts.rows_scanned,
        "old_key": counts.reencrypted,
        "current": counts.current,
        "null": counts.null,
        "not_in_format": counts.not_in_format,
        "undecryptable": counts.undecryptable,
        "ambiguous": counts.ambiguous,
    })
}

/// Builds a row of a scan table: target, rows, then the counts of `SCAN_COLUMNS`.
fn scan_row(target: &str, counts: &Counts) -> Vec<String> {
    let mut row = vec![target.to_string(), counts.rows_scanned.to_string()];
    row.extend(
        SCAN_COLUMNS
            .iter()
            .map(|(_, outcome)| counts.outcome(*outcome).to_string()),
    );
    row
}

/// Formats a duration in seconds as `1h02m03s`, `2m03s` or `3.4s`.
pub fn format_seconds(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_string();
    }
    let whole = seconds.round() as u64;
    if whole >= 3600 {
        format!(
            "{}h{:02}m{:02}s",
            whole / 3600,
            whole % 3600 / 60,
            whole % 60
        )
    } else if whole >= 60 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{seconds:.1}s")
    }
}

/// One target of a plan, as `plan` prints it.
#[derive(Debug, Clone)]
pub struct PlanTarget {
    pub scan: crate::scan::TargetScan,
    /// Read-and-classify time for all the target's rows at the measured rate.
    pub estimated_seconds: f64,
    /// The order of the target's pass, and why: that of the job the run
    /// would resume, or the one a new job would take.
    pub order: crate::run::OrderChoice,
}

/// Returns the name of a pass's order, as `--scan-order` spells it.
pub fn order_name(order: crate::cli::ScanOrder) -> &'static str {
    match order {
        crate::cli::ScanOrder::Auto => "auto",
        crate::cli::ScanOrder::Key => "key",
        crate::cli::ScanOrder::Physical => "physical",
    }
}

/// Renders a plan for a terminal.
pub fn render_plan(keys: &KeyEvidence, targets: &[PlanTarget]) -> String {
    let mut out = String::from(
        "plan: read-only, nothing was written (every statement ran in a READ ONLY transaction; no checkpoint, lease or schema was created)\n",
    );
    out.push_str(&format!("{}\n\n", keys.describe()));

    let mut headers = vec!["target", "rows"];
    headers.extend(SCAN_COLUMNS.iter().map(|(label, _)| *label));
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut total = Counts::default();
    for target in targets {
        let marker = if target.scan.is_estimate() {
            " (est.)"
        } else {
            ""
        };
        rows.push(scan_row(
            &format!("{}{marker}", target.scan.target),
            &target.scan.counts,
        ));
        total.add(&target.scan.counts);
    }
    if targets.len() > 1 {
        rows.push(scan_row("total", &total));
    }
    out.push_str(&table(&headers, &rows));

    out.push('\n');
    let paging: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            vec![
                t.scan.target.clone(),
                t.scan
                    .key_columns
                    .iter()
                    .map(|column| crate::target::display_ident(column))
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::target::display_ident(&t.scan.index),
                order_name(t.order.order).to_string(),
                format!("{:.0}", t.scan.rows_per_second),
                format_seconds(t.estimated_seconds),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "target",
            "paging key",
            "index",
            "pass order",
            "rows/s read",
            "est. read time",
        ],
        &paging,
    ));
    for target in targets {
        out.push_str(&format!(
            "{} order for {}: {}\n",
            order_name(target.order.order),
            target.scan.target,
            target.order.reason
        ));
    }

    out.push('\n');
    for target in targets {
        if let crate::scan::ScanMethod::Sample {
            percent,
            rows_read,
            rows_total_estimate,
            rows_total_source,
            ..
        } = &target.scan.method
        {
            let source = match rows_total_source.as_str() {
                "count" => "an exact count(*), because the table was never analyzed",
                _ => "the planner's estimate, pg_class.reltuples",
            };
            out.push_str(&format!(
                "{}: estimates from TABLESAMPLE SYSTEM ({percent:.4}% of the pages, {rows_read} rows read), scaled to {rows_total_estimate} rows from {source}\n",
                target.scan.target
            ));
            if *rows_read == 0 {
                out.push_str(&format!(
                    "{}: the sample read no row, so the counts say nothing; rerun with a larger --sample\n",
                    target.scan.target
                ));
            }
        }
    }
    for target in targets {
        for (outcome, keys) in &target.scan.keys {
            if !keys.is_empty() {
                out.push_str(&format!(
                    "{}: {outcome} keys (at most --report-limit): {}\n",
                    target.scan.target,
                    keys.iter()
                        .map(|key| crate::statements::display_key(key))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    if targets.iter().all(|t| !t.scan.is_estimate()) {
        out.push_str("counts are exact: every row was read in key order\n");
    }
    let total_seconds: f64 = targets.iter().map(|t| t.estimated_seconds).sum();
    out.push_str(&format!(
        "estimated run time: {} or more. This is an estimate: it is the time to read and classify every row at the rate measured now, and a run also writes every old-key value, which a read-only plan cannot measure\n",
        format_seconds(total_seconds)
    ));
    out
}

/// Renders a verification for a terminal.
pub fn render_verify(
    keys: &KeyEvidence,
    scans: &[crate::scan::TargetScan],
    listed: &[AttentionKey],
    limit: i64,
) -> String {
    let mut out = format!(
        "verify: read-only scan of every row\n{}\n\n",
        keys.describe()
    );
    let mut headers = vec!["target", "rows"];
    headers.extend(SCAN_COLUMNS.iter().map(|(label, _)| *label));
    let mut total = Counts::default();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for scan in scans {
        rows.push(scan_row(&scan.target, &scan.counts));
        total.add(&scan.counts);
    }
    if scans.len() > 1 {
        rows.push(scan_row("total", &total));
    }
    out.push_str(&table(&headers, &rows));

    if !listed.is_empty() {
        out.push_str(&format!(
            "\nrows that need attention (at most {limit}; old-key and ambiguous first):\n"
        ));
        let cells: Vec<Vec<String>> = listed
            .iter()
            .map(|a| {
                vec![
                    a.target.clone(),
                    crate::statements::display_key(&a.key),
                    a.outcome.clone(),
                ]
            })
            .collect();
        out.push_str(&table(&["target", "key", "outcome"], &cells));
    }

    out.push('\n');
    if total.reencrypted == 0 && total.ambiguous == 0 {
        out.push_str(&format!(
            "verify passed: none of the {} rows holds a value readable under an old key, and none is ambiguous\n",
            total.rows_scanned
        ));
    } else {
        if total.reencrypted > 0 {
            out.push_str(&format!(
                "verify failed: {} values are still readable under an old key; keep the old keys, run `reencrypt run` again, then verify again\n",
                total.reencrypted
            ));
        }
        if total.ambiguous > 0 {
            out.push_str(&format!(
                "verify failed: {} values decrypt under more than one key given; keep the old keys and inspect the rows listed\n",
                total.ambiguous
            ));
        }
    }
    if total.undecryptable > 0 {
        out.push_str(&format!(
            "{} values decrypt under no key given (exit code 3): they may be under a key that was not given; make sure no old key is missing before retiring one\n",
            total.undecryptable
        ));
    }
    out
}

/// Key fingerprints and Vault KV versions for reports (never key material).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KeyEvidence {
    pub new_key_fingerprint: String,
    pub new_key_version: Option<i64>,
    pub old_key_fingerprints: Vec<String>,
    pub old_key_versions: Vec<i64>,
}

impl KeyEvidence {
    pub fn from_identity(identity: &JobIdentity) -> KeyEvidence {
        KeyEvidence {
            new_key_fingerprint: identity.new_key_fingerprint.clone(),
            new_key_version: identity.new_key_version,
            old_key_fingerprints: identity.old_key_fingerprints.clone(),
            old_key_versions: identity.old_key_versions.clone(),
        }
    }

    pub fn from_keys(keys: &crate::keys::KeySet) -> KeyEvidence {
        KeyEvidence {
            new_key_fingerprint: keys.new.key.fingerprint(),
            new_key_version: keys.new.origin.vault_version().map(|v| v as i64),
            old_key_fingerprints: keys.old_fingerprints(),
            old_key_versions: keys
                .old
                .iter()
                .filter_map(|k| k.origin.vault_version())
                .map(|v| v as i64)
                .collect(),
        }
    }

    /// One line: the new key and the old keys, by fingerprint and KV version.
    pub fn describe(&self) -> String {
        let version = |v: Option<i64>| v.map_or(String::new(), |v| format!(" (kv version {v})"));
        format!(
            "keys: new {}{}, old {}{}",
            self.new_key_fingerprint,
            version(self.new_key_version),
            self.old_key_fingerprints.join(", "),
            if self.old_key_versions.is_empty() {
                String::new()
            } else {
                format!(
                    " (kv versions {})",
                    self.old_key_versions
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    }
}

/// A row that needs attention, by key (never its value).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttentionKey {
    pub target: String,
    pub key: String,
    pub outcome: String,
}

/// One target in an evidence record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvidenceTarget {
    pub target: String,
    pub key_columns: Vec<String>,
    pub index: String,
    /// For `run`: the job's counts when the run started, if known (see
    /// `Evidence::before_source`). For `verify`: always `None`.
    pub before: Option<serde_json::Value>,
    /// For `run`: the job's counts at the end (every run and shard so far).
    /// For `verify`: the verify scan's counts, as `outcome_counts_json` names them.
    pub after: serde_json::Value,
}

/// The result of a verification inside an evidence record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyEvidence {
    pub passed: bool,
    pub rows: i64,
    pub old_key: i64,
    pub ambiguous: i64,
    pub undecryptable: i64,
    pub not_in_format: i64,
}

impl VerifyEvidence {
    pub fn from_counts(total: &Counts) -> VerifyEvidence {
        VerifyEvidence {
            passed: total.reencrypted == 0 && total.ambiguous == 0,
            rows: total.rows_scanned,
            old_key: total.reencrypted,
            ambiguous: total.ambiguous,
            undecryptable: total.undecryptable,
            not_in_format: total.not_in_format,
        }
    }
}

/// Final sweeps of a run inside an evidence record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepEvidence {
    pub sweeps: u32,
    /// Values the last sweep still found under an old key.
    pub last_found: i64,
    pub sweep_reencrypted: i64,
}

/// The evidence record of a run or a verification, written with `--report`
/// and stored in the `runs` table. It contains key fingerprints, never keys,
/// and row keys, never values.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evidence {
    /// Version of this record's layout.
    pub record_version: u32,
    /// `run` or `verify`.
    pub command: String,
    pub job: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
    pub duration_seconds: f64,
    pub operator: String,
    pub host: String,
    pub tool: String,
    pub tool_version: String,
    pub keys: KeyEvidence,
    pub targets: Vec<EvidenceTarget>,
    /// Source of the `before` counts of the targets.
    pub before_source: Option<String>,
    /// For `run`: the final sweeps. For `verify`: `None`.
    pub sweeps: Option<SweepEvidence>,
    /// For `run`: false when other shards of the job still have ranges to do.
    pub job_finished: Option<bool>,
    /// For `verify`: the verdict. For `run`: `None`, because a run does not verify.
    pub verify: Option<VerifyEvidence>,
    /// Rows that need attention, bounded by --report-limit.
    pub attention: Vec<AttentionKey>,
    pub exit_code: i32,
}

/// Layout version written to `Evidence::record_version`.
pub const EVIDENCE_RECORD_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::{account_name, render_run, RunSummary};

    #[test]
    fn run_text_counts_rows_needing_attention() {
        let listed = |outcome: &str, key: &str| {
            ("t.secret".to_string(), key.to_string(), outcome.to_string())
        };
        let summary = RunSummary {
            job: "job".to_string(),
            job_finished: true,
            started_at: chrono::Utc::now(),
            finished_at: chrono::Utc::now(),
            duration_seconds: 1.0,
            targets: Vec::new(),
            sweeps: 1,
            sweep_last_found: 0,
            sweeps_off: false,
            counts_before: None,
            attention: vec![listed("undecryptable", "7"), listed("not_in_format", "9")],
            attention_total: 5,
            attention_needs_action: 1,
            key_fingerprints: Default::default(),
        };
        let text = render_run(&summary);
        assert!(
            text.contains("rows left unchanged, the first 2 of 5, of which 1 need attention"),
            "{text}"
        );
        assert!(text.contains("  t.secret  9  not_in_format\n"), "{text}");

        let all_listed = RunSummary {
            attention_total: 2,
            ..summary
        };
        let text = render_run(&all_listed);
        assert!(
            text.contains("rows left unchanged, of which 1 need attention (target, key, outcome):"),
            "{text}"
        );
    }

    #[test]
    fn account_name_reads_passwd_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      # a comment\n\
                      broken line\n\
                      app:x:1000:1000::/home/app:/bin/sh\n";
        assert_eq!(account_name(0, passwd).as_deref(), Some("root"));
        assert_eq!(account_name(1000, passwd).as_deref(), Some("app"));
        assert_eq!(account_name(1001, passwd), None);
        assert_eq!(account_name(0, ""), None);
    }
}
