//! Read-only scans of a target for `plan` and `verify`: every row in key
//! order, or a block sample. Each value is classified with every key, exactly
//! as a run classifies it, and nothing is written: every statement runs in a
//! `READ ONLY` transaction and the worker's schema is never touched.
//!
//! A full scan pages through the table one batch per transaction, so memory
//! stays bounded by the batch size and no snapshot is held for long. The next
//! page is fetched while the previous one is classified on the crypto pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use futures::TryStreamExt;
use rayon::prelude::*;
use sqlx::Row;

use crate::checkpoint::Counts;
use crate::classify::{Keyring, Outcome};
use crate::db::{self, Database, TransientKind};
use crate::error::Failure;
use crate::pipeline::{self, RetryPolicy};
use crate::statements::{key_label, Statements};
use crate::target::{quote_ident, Target};

/// Outcomes whose keys a scan keeps, in the order reports list them.
pub const LISTED_OUTCOMES: [Outcome; 4] = [
    Outcome::Reencrypted,
    Outcome::Ambiguous,
    Outcome::Undecryptable,
    Outcome::NotInFormat,
];

/// Returns the name of a listed outcome in scan reports. A value under an old
/// key is `old_key` there, because a read-only scan re-encrypts nothing.
pub fn listed_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Reencrypted => "old_key",
        other => other.label(),
    }
}

/// A sample reads at most this many times the requested rows, in case the
/// planner's row estimate is far below the table's real size.
const SAMPLE_ROW_CAP_FACTOR: u64 = 2;

/// Everything a scan needs besides the target.
#[derive(Clone)]
pub struct ScanSettings {
    pub db: Database,
    pub keyring: Arc<Keyring>,
    pub crypto_pool: Arc<rayon::ThreadPool>,
    /// Rows per page of a full scan, and per classified chunk of a sample.
    pub batch_rows: usize,
    /// A page ends at the first row that brings its values to this many bytes.
    pub batch_max_bytes: usize,
    pub retry: RetryPolicy,
    /// Keys kept per outcome in `LISTED_OUTCOMES`.
    pub keys_per_outcome: usize,
}

/// The row selection of a scan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScanMethod {
    /// Every row, in key order: the counts are exact at the time each page was read.
    Full,
    /// `TABLESAMPLE SYSTEM`: a random subset of the table's pages, with the
    /// counts scaled from the rows read to the table's estimated row count.
    Sample {
        requested_rows: u64,
        /// Percentage of the table's pages read.
        percent: f64,
        /// Rows actually read and classified.
        rows_read: i64,
        /// The row count the counts were scaled to.
        rows_total_estimate: i64,
        /// Source of `rows_total_estimate`: `reltuples` (the planner's estimate)
        /// or `count` (an exact count, for a table never analyzed).
        rows_total_source: String,
        /// Raw counts of the rows read, before scaling, named as the plan's.
        #[serde(serialize_with = "plan_counts")]
        counts_read: Counts,
    },
}

/// Serializes counts with the names a plan gives them (`rows`, `old_key`, ...).
fn plan_counts<S: serde::Serializer>(counts: &Counts, serializer: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&crate::report::outcome_counts_json(counts), serializer)
}

/// The result of scanning one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetScan {
    pub target: String,
    pub key_columns: Vec<String>,
    /// The index that paging uses: the primary key or the unique index given.
    pub index: String,
    /// Exact counts for a full scan; estimates scaled from the sample otherwise.
    pub counts: Counts,
    pub method: ScanMethod,
    /// Keys of rows with an outcome in `LISTED_OUTCOMES`, by `listed_label`,
    /// at most `keys_per_outcome` of each, in the order they were read.
    pub keys: BTreeMap<&'static str, Vec<String>>,
    /// Wall time of the scan: reading and classifying, overlapped.
    pub seconds: f64,
    /// Rows read and classified per second during this scan.
    pub rows_per_second: f64,
}

impl TargetScan {
    fn new(target: &Target, method: ScanMethod) -> TargetScan {
        TargetScan {
            target: target.label(),
            key_columns: target.key.iter().map(|k| k.name.clone()).collect(),
            index: target.index_name.clone(),
            counts: Counts::default(),
            method,
            keys: BTreeMap::new(),
            seconds: 0.0,
            rows_per_second: 0.0,
        }
    }

    /// Returns whether the counts are estimates rather than exact counts.
    pub fn is_estimate(&self) -> bool {
        matches!(self.method, ScanMethod::Sample { .. })
    }
}

/// Rows of one page, column by column.
struct Page {
    /// `keys[c][r]`: key column `c` of row `r`, as text.
    keys: Vec<Vec<String>>,
    values: Vec<Option<String>>,
}

impl Page {
    fn with_capacity(key_len: usize, rows: usize) -> Page {
        Page {
            keys: vec![Vec::with_capacity(rows); key_len],
            values: Vec::with_capacity(rows),
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }

    fn key_of(&self, row: usize) -> Vec<String> {
        self.keys.iter().map(|column| column[row].clone()).collect()
    }

    fn pop(&mut self) {
        for column in &mut self.keys {
            column.pop();
        }
        self.values.pop();
    }

    fn push_row(&mut self, row: &sqlx::postgres::PgRow) -> Result<usize, sqlx::Error> {
        for (column, keys) in self.keys.iter_mut().enumerate() {
            keys.push(row.try_get::<String, _>(column)?);
        }
        let value: Option<String> = row.try_get(self.keys.len())?;
        let bytes = value.as_ref().map_or(0, String::len);
        self.values.push(value);
        Ok(bytes)
    }
}

/// The keys of a classified page, column by column, and one outcome per row.
type Classified = (Vec<Vec<String>>, Vec<Outcome>);

/// Classifies a page on the crypto pool. The values stay on the pool's side
/// and only the keys come back, with one outcome per row.
fn spawn_classify(settings: &ScanSettings, page: Page) -> tokio::task::JoinHandle<Classified> {
    let keyring = settings.keyring.clone();
    let pool = settings.crypto_pool.clone();
    tokio::spawn(async move {
        let Page { keys, values } = page;
        let outcomes = pipeline::on_crypto_pool(&pool, move || {
            values
                .par_iter()
                .with_min_len(64)
                .map(|value| keyring.classify(value.as_deref()).outcome)
                .collect::<Vec<Outcome>>()
        })
        .await;
        (keys, outcomes)
    })
}

/// Adds classified rows to the scan's counts and keeps the keys it lists.
fn tally(
    scan: &mut Counts,
    listed: &mut BTreeMap<&'static str, Vec<String>>,
    keys: &[Vec<String>],
    outcomes: &[Outcome],
    keys_per_outcome: usize,
) {
    for (row, outcome) in outcomes.iter().enumerate() {
        scan.add_outcome(*outcome, 1);
        if !LISTED_OUTCOMES.contains(outcome) {
            continue;
        }
        let kept = listed.entry(listed_label(*outcome)).or_default();
        if kept.len() < keys_per_outcome {
            let key: Vec<String> = keys.iter().map(|column| column[row].clone()).collect();
            kept.push(key_label(&key));
        }
    }
    scan.rows_scanned += outcomes.len() as i64;
    scan.batches += 1;
}

/// Reads and classifies every row of the target, in key order.
pub async fn scan_full(settings: &ScanSettings, target: &Target) -> Result<TargetScan, Failure> {
    let started = Instant::now();
    let label = target.label();
    // The checkpoint statements are built but never run, so the schema name is irrelevant.
    let statements = Statements::new(target, crate::checkpoint::DEFAULT_SCHEMA);
    let mut scan = TargetScan::new(target, ScanMethod::Full);
    let mut limit = settings.batch_rows.max(1);
    let mut after: Option<Vec<String>> = None;
    let mut classifying: Option<tokio::task::JoinHandle<Classified>> = None;

    loop {
        let page =
            fetch_page_with_retry(settings, &statements, &label, after.as_deref(), &mut limit)
                .await?;

        // The previous page was classified while this one was read.
        if let Some(task) = classifying.take() {
            let (keys, outcomes) = task.await.map_err(|e| {
                Failure::Retryable(format!("classification of {label} failed: {e}"))
            })?;
            tally(
                &mut scan.counts,
                &mut scan.keys,
                &keys,
                &outcomes,
                settings.keys_per_outcome,
            );
        }
        if page.len() == 0 {
            break;
        }
        let next = Some(page.key_of(page.len() - 1));
        if next == after {
            return Err(Failure::Retryable(format!(
                "scanning {label}: the paging key did not advance; its type may not round-trip through text"
            )));
        }
        after = next;
        classifying = Some(spawn_classify(settings, page));
    }

    scan.seconds = started.elapsed().as_secs_f64();
    scan.rows_per_second = scan.counts.rows_scanned as f64 / scan.seconds.max(1e-6);
    tracing::info!(target = %label, rows = scan.counts.rows_scanned, seconds = scan.seconds, "Full read-only scan done.");
    Ok(scan)
}

/// Fetches the next page, retrying transient errors within the retry policy.
/// A page that hits the statement timeout is retried at half the size.
async fn fetch_page_with_retry(
    settings: &ScanSettings,
    statements: &Statements,
    label: &str,
    after: Option<&[String]>,
    limit: &mut usize,
) -> Result<Page, Failure> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match fetch_page(settings, statements, after, *limit).await {
            Ok(page) => return Ok(page),
            Err(error) => error,
        };
        let context = format!("cannot read {label}");
        let Some(kind) = db::transient_kind(&error) else {
            return Err(Failure::from_database(&context, &error));
        };
        let elapsed = started.elapsed();
        if attempt >= settings.retry.max_attempts || elapsed >= settings.retry.max_elapsed {
            return Err(Failure::Retryable(format!(
                "{context}: gave up after {attempt} attempts over {:.1}s; last error: {}",
                elapsed.as_secs_f64(),
                db::describe(&error)
            )));
        }
        if kind == TransientKind::StatementTimeout {
            *limit = (*limit / 2).max(1);
        }
        let delay = settings.retry.delay(attempt);
        tracing::warn!(target = %label, kind = kind.label(), attempt, limit = *limit, delay_ms = delay.as_millis() as u64, error = %db::describe(&error), "Transient database error while scanning; retrying.");
        tokio::time::sleep(delay).await;
    }
}

/// Reads the rows after `after`, in key order, capped in rows and bytes.
async fn fetch_page(
    settings: &ScanSettings,
    statements: &Statements,
    after: Option<&[String]>,
    limit: usize,
) -> Result<Page, sqlx::Error> {
    let mut tx = settings.db.begin_read_only().await?;
    let mut query = sqlx::query(statements.fetch(after.is_some(), false, false));
    for part in after.into_iter().flatten() {
        query = query.bind(part);
    }
    query = query.bind(limit as i64);

    let mut page = Page::with_capacity(statements.key_len, limit);
    let mut bytes = 0usize;
    {
        let mut rows = query.fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            bytes += page.push_row(&row)?;
            if bytes >= settings.batch_max_bytes {
                break;
            }
        }
    }
    // A page cut short by a limit ends with every row of its last key, so
    // that keys repeated across child tables are not skipped.
    if page.len() >= limit || bytes >= settings.batch_max_bytes {
        let last = page.key_of(page.len() - 1);
        while page.len() > 0 && page.key_of(page.len() - 1) == last {
            page.pop();
        }
        let mut group = sqlx::query(&statements.key_group);
        for part in &last {
            group = group.bind(part);
        }
        let mut rows = group.fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            page.push_row(&row)?;
        }
        // The lookup shares the page's snapshot, so it finds at least the
        // rows read; an empty page would end the scan.
        if page.len() == 0 {
            return Err(sqlx::Error::Protocol(format!(
                "the rows of key {} vanished from the page's own snapshot",
                crate::statements::display_key(&crate::statements::key_label(&last))
            )));
        }
    }
    tx.commit().await?;
    Ok(page)
}

/// Estimates the counts from about `rows` rows read with `TABLESAMPLE SYSTEM`,
/// scaled to the table's estimated row count. Falls back to a full scan when
/// the table has no more rows than that.
///
/// SYSTEM sampling picks whole pages, so rows stored together (inserted
/// together) are sampled together; the estimate is coarser than a row-level
/// sample of the same size would give.
pub async fn scan_sample(
    settings: &ScanSettings,
    target: &Target,
    rows: u64,
) -> Result<TargetScan, Failure> {
    let started = Instant::now();
    let label = target.label();
    let context = format!("cannot sample {label}");
    let fail = |e: sqlx::Error| Failure::from_database(&context, &e);
    let mut tx = settings.db.begin_read_only().await.map_err(fail)?;

    // The row count to scale to: the planner's estimate, or an exact count
    // when the table was never analyzed (reltuples is then unknown).
    let (total, source) = if target.estimated_rows > 0 {
        (target.estimated_rows, "reltuples")
    } else {
        let counted: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {}", target.quoted_table()))
                .fetch_one(&mut *tx)
                .await
                .map_err(fail)?;
        (counted, "count")
    };
    if total as u64 <= rows {
        tx.commit().await.map_err(fail)?;
        tracing::info!(target = %label, rows_total_estimate = total, requested_rows = rows, "The sample would cover the table; scanning every row.");
        return scan_full(settings, target).await;
    }
    let percent = (rows as f64 / total as f64 * 100.0).clamp(0.000_001, 100.0);

    // Stream the sample and classify it chunk by chunk, so memory stays bounded.
    let key_text = target
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{}::text AS k{}", quote_ident(&k.name), i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {key_text}, t.{}::text AS value FROM {} AS t TABLESAMPLE SYSTEM ($1::float4) LIMIT $2",
        target.quoted_column(),
        target.quoted_table()
    );
    let cap = rows
        .saturating_mul(SAMPLE_ROW_CAP_FACTOR)
        .min(i64::MAX as u64) as i64;
    let chunk_rows = settings.batch_rows.max(1);
    let mut counts_read = Counts::default();
    let mut keys = BTreeMap::new();
    {
        let mut stream = sqlx::query(&sql)
            .bind(percent as f32)
            .bind(cap)
            .fetch(&mut *tx);
        let mut page = Page::with_capacity(target.key.len(), chunk_rows);
        loop {
            let row = stream.try_next().await.map_err(fail)?;
            if let Some(row) = &row {
                page.push_row(row).map_err(fail)?;
            }
            let full = page.len() >= chunk_rows;
            if (full || row.is_none()) && page.len() > 0 {
                let ready =
                    std::mem::replace(&mut page, Page::with_capacity(target.key.len(), chunk_rows));
                let (chunk_keys, outcomes) =
                    spawn_classify(settings, ready).await.map_err(|e| {
                        Failure::Retryable(format!("classification of {label} failed: {e}"))
                    })?;
                tally(
                    &mut counts_read,
                    &mut keys,
                    &chunk_keys,
                    &outcomes,
                    settings.keys_per_outcome,
                );
            }
            if row.is_none() {
                break;
            }
        }
    }
    tx.commit().await.map_err(fail)?;

    let mut scan = TargetScan::new(target, ScanMethod::Full);
    scan.counts = scale_counts(&counts_read, total);
    scan.keys = keys;
    scan.seconds = started.elapsed().as_secs_f64();
    scan.rows_per_second = counts_read.rows_scanned as f64 / scan.seconds.max(1e-6);
    scan.method = ScanMethod::Sample {
        requested_rows: rows,
        percent,
        rows_read: counts_read.rows_scanned,
        rows_total_estimate: total,
        rows_total_source: source.to_string(),
        counts_read,
    };
    tracing::info!(target = %label, rows_read = counts_read.rows_scanned, percent, rows_total_estimate = total, "Sampled read-only scan done.");
    Ok(scan)
}

/// Scales the outcome counts of the rows read to `total` rows. Each count is
/// rounded on its own, so the scaled counts may not add up to `total` exactly.
/// With no row read, every outcome count stays 0.
fn scale_counts(read: &Counts, total: i64) -> Counts {
    let mut scaled = Counts {
        rows_scanned: total,
        batches: read.batches,
        ..Counts::default()
    };
    if read.rows_scanned == 0 {
        return scaled;
    }
    let factor = total as f64 / read.rows_scanned as f64;
    for outcome in Outcome::ALL {
        scaled.add_outcome(
            outcome,
            (read.outcome(outcome) as f64 * factor).round() as i64,
        );
    }
    scaled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_counts_keeps_proportions() {
        let read = Counts {
            rows_scanned: 200,
            reencrypted: 150,
            null: 50,
            ..Counts::default()
        };
        let scaled = scale_counts(&read, 10_000);
        assert_eq!(scaled.rows_scanned, 10_000);
        assert_eq!(scaled.reencrypted, 7_500);
        assert_eq!(scaled.null, 2_500);
        assert_eq!(scaled.current, 0);
    }

    #[test]
    fn scale_counts_of_empty_sample_is_zero() {
        let scaled = scale_counts(&Counts::default(), 10_000);
        assert_eq!(scaled.rows_scanned, 10_000);
        assert_eq!(scaled.reencrypted, 0);
    }
}
