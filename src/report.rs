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
    /// (target, key, outcome) of rows needing attention, bounded by --report-limit.
    pub attention: Vec<(String, String, String)>,
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
        if self.total().attention() > 0 {
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
            "the last sweep still rotated {} values written under an old key; run `reencrypt verify` once the application writes only under the new key\n",
            summary.sweep_last_found
        ));
    }
    if !summary.job_finished {
        out.push_str("other shards of this job still have ranges to do\n");
    }
    if !summary.attention.is_empty() {
        out.push_str("rows left unchanged that need attention (target, key, outcome):\n");
        for (target, key, outcome) in &summary.attention {
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

/// The operator for evidence records: the option, else the OS user.
pub fn operator(option: Option<&str>) -> String {
    option
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Writes a JSON document to `path` atomically (temporary file, then rename).
pub fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&temporary)?;
        serde_json::to_writer_pretty(&mut file, value)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    std::fs::rename(temporary, path)
}
