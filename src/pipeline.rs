//! One key range, end to end: keyset fetch, classification on the rayon pool,
//! and compare-and-swap writes committed together with the range's checkpoint.
//!
//! The fetch of the next batch and its classification overlap the write of
//! the previous one. At most two batches are in memory, the one being written
//! and the next one, and each batch is capped in rows and in bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use rayon::prelude::*;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Postgres, Row, Transaction};
use tokio::sync::mpsc;

use crate::checkpoint::Counts;
use crate::classify::{Decision, Keyring, Outcome};
use crate::db::{self, Database, TransientKind};
use crate::lease::Holder;
use crate::metrics;
use crate::position::RowPosition;
use crate::statements::{display_key, key_label, Statements};
use crate::throttle::Throttle;

/// Settings shared by every range of a run.
#[derive(Clone)]
pub struct PipelineSettings {
    pub db: Database,
    pub schema: String,
    pub job: String,
    pub shard: i32,
    pub holder: Holder,
    pub keyring: Arc<Keyring>,
    pub crypto_pool: Arc<rayon::ThreadPool>,
    pub batch: BatchSizing,
    pub retry: RetryPolicy,
    /// Set on SIGTERM/SIGINT: finish the current batch, then stop.
    pub stop: Arc<AtomicBool>,
    /// Set when the lease is lost: stop without writing.
    pub lease_lost: Arc<AtomicBool>,
    pub throttle: Arc<Throttle>,
    pub progress: Arc<crate::progress::Progress>,
    /// Writers of this process that may write side by side (`--writers`).
    pub writers: usize,
}

/// Batch size limits and the adaptive sizing target.
#[derive(Debug, Clone, Copy)]
pub struct BatchSizing {
    /// Starting (and, when not adaptive, fixed) number of rows per batch.
    pub rows: usize,
    pub min_rows: usize,
    pub max_rows: usize,
    /// A batch stops growing once its values reach this many bytes.
    pub max_bytes: usize,
    /// Adaptive sizing aims the write phase at this duration.
    pub target_duration: Option<Duration>,
}

/// Bounds for retrying transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_elapsed: Duration,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Full-jitter exponential backoff for the given attempt (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponential = self.base_delay.saturating_mul(1u32 << attempt.min(16));
        let capped = exponential.min(self.max_delay);
        capped.mul_f64(rand::random::<f64>().max(0.1))
    }
}

/// The reason a range stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error("stopped by a signal after the last committed batch")]
    Interrupted,
    #[error("this runner lost the job's lease to another runner")]
    LeaseLost,
    #[error("gave up after {attempts} attempts over {elapsed_secs:.1}s; last error: {last}")]
    RetriesExhausted {
        attempts: u32,
        elapsed_secs: f64,
        last: String,
    },
    #[error("database error: {0}")]
    Database(String),
}

/// Full pages of changed rows after which a sweep stops filtering and reads
/// the rest of its span in key order.
const FULL_CHANGED_PAGES_BEFORE_KEYSET: usize = 8;

/// The kind of pass over a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The keyset pass: checkpoints its position and counts every outcome.
    Main,
    /// A final sweep: rewrites what is still under an old key, counts only that.
    Sweep,
}

/// The key range one worker processes.
#[derive(Debug, Clone)]
pub struct RangeWork {
    pub target_label: String,
    pub range_index: i32,
    /// Exclusive lower bound (resume point or range start).
    pub after: Option<Vec<String>>,
    /// Inclusive upper bound; `None` means no bound (sweeps of the last range).
    pub upper: Option<Vec<String>>,
    /// Read only rows changed since this point (a sweep after a pass).
    pub changed_since: Option<Arc<ChangedSince>>,
    /// Read in physical order: `after` and `upper` are then row positions
    /// (`ctid`), both exclusive.
    pub physical: Option<PhysicalScan>,
}

/// A pass in physical order, block by block. A row that is not updated
/// stays where it is, so the pass reads it once. An updated row gets a new
/// version, maybe in a block the pass has already passed. The sweep after
/// the pass reads every row written since the horizon. It also detects a
/// rewrite of the table, which moves every row.
///
/// The pass reads every row it meets. Among the rows written since the
/// pass started it meets again the ones it rewrote itself: those already
/// under the new key are left out of the batch, so that no row counts twice.
#[derive(Debug, Clone)]
pub struct PhysicalScan {
    /// The first transaction ID not yet assigned when the pass started (the
    /// `xmax` of a snapshot), as a 32-bit ID. Every row the pass rewrites
    /// has a version from that ID on.
    pub frontier: u32,
    /// The transactions running when the pass started (the snapshot's
    /// `xip`), as 32-bit IDs in text. A row version below the frontier and
    /// not from one of these was written before the pass started, so it
    /// counts when the pass reads it. A version from one of these, written
    /// during the pass, may be met again after it moved, as the pass's own.
    /// NOTE: the list has no subtransaction IDs, so a row that a running
    /// subtransaction moves ahead of the pass can still count twice.
    pub running: Arc<Vec<String>>,
}

/// Blocks in the first window of a pass in physical order; later windows
/// are sized from the rows found per block.
const FIRST_WINDOW_BLOCKS: u64 = 16;

/// The largest window of a pass in physical order, in blocks (128 MiB of
/// 8 KiB blocks). Empty blocks, after a large delete, still take a fetch per
/// window to pass over.
const MAX_WINDOW_BLOCKS: u64 = 1 << 14;

/// Formats the position at the start of `block`, before its first row.
pub fn block_start(block: u64) -> String {
    format!("({block},0)")
}

/// Reads the block number of a row position such as `(12,3)`.
pub fn block_of(position: &str) -> Option<u64> {
    let inner = position.strip_prefix('(')?.strip_suffix(')')?;
    let (block, offset) = inner.split_once(',')?;
    offset.parse::<u16>().ok()?;
    block.parse().ok()
}

/// The filter of a sweep after a pass of this process. The sweep reads the
/// rows whose current version was written by a transaction that may not have
/// been visible when the pass started. It skips rows written by the
/// transactions of the pass's own batches.
///
/// A row whose version is older than the horizon is the version the pass
/// read, so the pass already decided it. A row written by one of `writers`
/// still has the value the pass wrote. Any other change since (an update, an
/// insert, a key change) gives the row a newer version, which the filter
/// keeps. Only key ranges the pass of this process covered may be filtered;
/// see the `sweep` module.
#[derive(Debug, Clone)]
pub struct ChangedSince {
    /// The oldest transaction that may have been running when the pass started
    /// (the `xmin` of a snapshot taken before its first read), as a 32-bit ID.
    pub horizon: u32,
    /// IDs of this process's transactions whose rows need no second look.
    pub writers: Vec<u32>,
}

impl ChangedSince {
    fn writer_list(&self) -> Vec<String> {
        self.writers.iter().map(u32::to_string).collect()
    }
}

/// The result of a pass over one range: its counts, and the transactions
/// that wrote its batches (for the filter of a later sweep).
#[derive(Debug, Default)]
pub struct RangeOutcome {
    pub counts: Counts,
    pub writers: Vec<u32>,
}

/// Converts an epoch-qualified transaction ID, such as `txid_current()`
/// returns, to the 32-bit ID that a row's `xmin` contains.
pub(crate) fn xid32(full: i64) -> u32 {
    (full as u64 & u64::from(u32::MAX)) as u32
}

/// Rows read from the table, column by column.
struct Batch {
    /// `keys[c][r]`: key column `c` of row `r`, as text.
    keys: Vec<Vec<String>>,
    values: Vec<Option<String>>,
    /// Each row's `ctid` when it was read.
    positions: Vec<RowPosition>,
    /// The batch's end, for the checkpoint: the last key, or in physical
    /// order the position the next batch reads after.
    end: Vec<String>,
    /// Read in physical order.
    physical: bool,
    /// Written in the key's order. In physical order, the rows that add
    /// entries to the key's index are written so, and each index page is
    /// reached once (see `Phase`).
    in_key_order: bool,
    /// In physical order, whether each row's version is as new as the
    /// pass's frontier or newer; empty otherwise.
    newer: Vec<bool>,
    fetch_seconds: f64,
}

impl Batch {
    fn len(&self) -> usize {
        self.values.len()
    }

    /// Tells whether the fetch stopped at the row limit or the byte limit.
    fn is_full(&self, limit: usize, max_bytes: usize) -> bool {
        self.len() >= limit
            || self.values.iter().flatten().map(String::len).sum::<usize>() >= max_bytes
    }

    fn key_of(&self, row: usize) -> Vec<String> {
        self.keys.iter().map(|column| column[row].clone()).collect()
    }

    /// Returns the end of a batch whose last row is `row`, for the checkpoint.
    fn end_at(&self, row: usize) -> Vec<String> {
        if self.physical {
            vec![self.positions[row].to_string()]
        } else {
            self.key_of(row)
        }
    }

    /// Returns where to split the batch in two: near its middle, and in key
    /// order never inside a run of rows with the same key, since the head's
    /// checkpoint is its last key. `None` when every row has the same key.
    fn split_point(&self) -> Option<usize> {
        let boundary = |at: usize| self.physical || self.key_of(at - 1) != self.key_of(at);
        let middle = self.len() / 2;
        (middle.max(1)..self.len())
            .find(|&at| boundary(at))
            .or_else(|| (1..middle).rev().find(|&at| boundary(at)))
    }

    /// Splits before row `half`, first part first.
    fn split(mut self, half: usize) -> (Batch, Batch) {
        let tail_keys = self.keys.iter_mut().map(|c| c.split_off(half)).collect();
        let tail_values = self.values.split_off(half);
        let tail_positions = self.positions.split_off(half);
        let tail_newer = self.newer.split_off(half.min(self.newer.len()));
        let tail = Batch {
            keys: tail_keys,
            values: tail_values,
            positions: tail_positions,
            end: std::mem::take(&mut self.end),
            physical: self.physical,
            in_key_order: self.in_key_order,
            newer: tail_newer,
            fetch_seconds: 0.0,
        };
        if half > 0 {
            self.end = self.end_at(half - 1);
        }
        (self, tail)
    }

    /// Deals the rows out into `parts` batches, row `r` to `part_of[r]`,
    /// each in its order. Only the last part has the batch's end: the
    /// checkpoints of the others leave the range's position where it is.
    fn deal_out(self, part_of: &[usize], parts: usize) -> Vec<Batch> {
        let mut keys: Vec<Vec<Vec<String>>> = (0..parts).map(|_| Vec::new()).collect();
        for column in self.keys {
            for (part, items) in deal(column, part_of, parts).into_iter().enumerate() {
                keys[part].push(items);
            }
        }
        let values = deal(self.values, part_of, parts);
        let positions = deal(self.positions, part_of, parts);
        let newer = deal(self.newer, part_of, parts);
        let mut end = Some(self.end);
        keys.into_iter()
            .zip(values)
            .zip(positions.into_iter().zip(newer))
            .enumerate()
            .map(|(part, ((keys, values), (positions, newer)))| Batch {
                keys,
                values,
                positions,
                end: if part + 1 == parts {
                    end.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
                physical: self.physical,
                // Only the first part's rows go to other pages.
                in_key_order: self.in_key_order && part == 0,
                newer,
                fetch_seconds: if part == 0 { self.fetch_seconds } else { 0.0 },
            })
            .collect()
    }
}

/// Deals `items` out into `parts` lists, item `r` to `part_of[r]`, keeping
/// their order. Items past the end of `part_of` go to the last list.
fn deal<T>(items: Vec<T>, part_of: &[usize], parts: usize) -> Vec<Vec<T>> {
    let part = |row: usize| {
        let part = part_of.get(row).copied().unwrap_or(parts - 1);
        debug_assert!(part < parts, "row {row} dealt to part {part} of {parts}");
        part.min(parts - 1)
    };
    // Each list is made its final size at once, not grown row by row.
    let mut sizes = vec![0; parts];
    for row in 0..items.len() {
        sizes[part(row)] += 1;
    }
    let mut dealt: Vec<Vec<T>> = sizes.into_iter().map(Vec::with_capacity).collect();
    for (row, item) in items.into_iter().enumerate() {
        dealt[part(row)].push(item);
    }
    dealt
}

/// The transactions a window read in physical order is written in.
///
/// Updating a row puts its new version on the same page when the page has
/// room (a HOT update), and then PostgreSQL adds no entry to the key's
/// index. A page read from a table that was just loaded has no room, so the
/// first update of each of its rows goes to another page, and inserts an
/// index entry at a random place in a large index. Writing a window in
/// several transactions (`phases_per_window`) cuts those inserts to one row
/// in that many. The first rewrites one row in that many of those that
/// need it on each page, those with the lowest keys (`phase_of_rows`), and
/// counts only those. A page with fewer such rows than phases has one in
/// the first phase. A read of the window then prunes the old versions they
/// left, and the next phase
/// rewrites as many rows again into the room that made, and so on. The last
/// phase also counts the rows with nothing to write. So a resumed pass that
/// reads the window again leaves out the rows of the phases that committed.
/// Only the first phase is written in the key's order, which makes its index
/// inserts reach each index page once. The later phases add few entries,
/// and sorting their rows measured slower than not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Written in one transaction.
    Whole,
    /// Phase `number`, from 1, of a window written in `of` phases. Phases
    /// after the first have `revisit` set until the window's pages have been
    /// read again.
    Part {
        number: usize,
        of: usize,
        revisit: bool,
    },
}

impl Phase {
    /// Returns the phase as the batch log shows it: `whole`, or `2/3` for
    /// the second phase of three.
    fn label(self) -> String {
        match self {
            Phase::Whole => "whole".to_string(),
            Phase::Part { number, of, .. } => format!("{number}/{of}"),
        }
    }

    /// Tells whether the batch ends the window's writes, so that its
    /// checkpoint may move the range's position.
    fn is_final(self) -> bool {
        match self {
            Phase::Whole => true,
            Phase::Part { number, of, .. } => number == of,
        }
    }
}

/// Returns how many transactions each window of a pass in physical order
/// is written in, by a writer beside `writers - 1` others (see `Phase`).
///
/// More phases leave fewer rows to move to other pages, so fewer index
/// entries to add and fewer index pages for the server to write out of
/// `shared_buffers`. With one writer, five phases were 3 to 6% faster than
/// three on a table 7 times `shared_buffers`, and even on one 1.4 times.
/// With two writers, five phases were even on the larger table and 10%
/// slower on the smaller one, so writers beside others keep three.
fn phases_per_window(writers: usize) -> usize {
    if writers > 1 {
        PHASES_BESIDE_OTHERS
    } else {
        PHASES_ALONE
    }
}

/// Number of phases per window of a writer alone.
const PHASES_ALONE: usize = 5;

/// Number of phases per window of a writer beside others.
const PHASES_BESIDE_OTHERS: usize = 3;

/// Number of windows a writer beside others keeps open at once (see
/// `WriteSchedule`).
const OPEN_WINDOWS_BESIDE_OTHERS: usize = 3;

/// Rows to rewrite below which a window is written in one transaction.
const MIN_ROWS_FOR_PHASES: usize = 64;

/// Reads the pages of a window's rows, so that PostgreSQL prunes the old
/// versions the window's earlier phases left there. Only an optimization:
/// when it fails, the next phase's updates go to other pages, as the first's
/// did.
async fn revisit(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    batch: &Batch,
) {
    let (Some(first), Some(last)) = (batch.positions.first(), batch.positions.last()) else {
        return;
    };
    read_again(settings, statements, work, *first, *last).await;
}

/// Reads again the windows whose writes have all committed since the last
/// call (see `WrittenWindows`), unless the run is stopping.
async fn read_written_windows(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    written: &WrittenWindows,
) {
    let spans = std::mem::take(&mut *lock_written(written));
    for (first, last) in spans {
        if settings.stop.load(Ordering::SeqCst) || settings.lease_lost.load(Ordering::SeqCst) {
            return;
        }
        // After one failure the others would most likely fail the same way,
        // and each would wait up to `READ_AGAIN_TIMEOUT`.
        if !read_again(settings, statements, work, first, last).await {
            return;
        }
    }
}

/// How long a read of a written window may take. The read only saves the
/// server work, so it must not hold up a stop or an error for long when the
/// database does not respond.
const READ_AGAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Locks the list of written windows. The list stays whole even if a task
/// panicked while holding it, since each change is one push or one take.
fn lock_written(
    written: &WrittenWindows,
) -> std::sync::MutexGuard<'_, Vec<(RowPosition, RowPosition)>> {
    written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the rows from position `first` to `last` again, so that PostgreSQL
/// prunes the old versions written there (see `revisit`). Returns whether
/// the read succeeded within `READ_AGAIN_TIMEOUT`. A failure is only logged.
async fn read_again(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    first: RowPosition,
    last: RowPosition,
) -> bool {
    let read = async {
        let mut tx = settings.db.begin_read_only().await?;
        sqlx::query_scalar::<_, i64>(&statements.revisit)
            .bind(first)
            .bind(last)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await
    };
    let error = match tokio::time::timeout(READ_AGAIN_TIMEOUT, read).await {
        Ok(Ok(())) => return true,
        Ok(Err(error)) => db::describe(&error),
        Err(_) => format!("timed out after {} seconds", READ_AGAIN_TIMEOUT.as_secs()),
    };
    tracing::debug!(target = %work.target_label, range = work.range_index, %first, %last, error = %error, "Failed to read a window's rows again, so the final sweep prunes their old versions instead.");
    false
}

struct ClassifiedBatch {
    batch: Batch,
    decisions: Vec<Decision>,
    crypto_seconds: f64,
    phase: Phase,
    /// Rows in the batch as read, before any split, for sizing the next one.
    read_rows: usize,
}

impl ClassifiedBatch {
    /// Leaves out the rows of a pass in physical order that are as new as
    /// its frontier and already under the new key: rows the pass rewrote and
    /// then met again, or rows written under the new key since. Rows under
    /// an old key stay, whatever their age.
    fn without_rewritten(mut self) -> ClassifiedBatch {
        let keep: Vec<bool> = (0..self.batch.len())
            .map(|r| {
                !(self.batch.newer.get(r).copied().unwrap_or(false)
                    && self.decisions[r].outcome == Outcome::Current)
            })
            .collect();
        if keep.iter().all(|k| *k) {
            return self;
        }
        fn retain<T>(items: &mut Vec<T>, keep: &[bool]) {
            let mut row = 0;
            items.retain(|_| {
                row += 1;
                keep[row - 1]
            });
        }
        for column in &mut self.batch.keys {
            retain(column, &keep);
        }
        retain(&mut self.batch.values, &keep);
        retain(&mut self.batch.positions, &keep);
        retain(&mut self.batch.newer, &keep);
        retain(&mut self.decisions, &keep);
        self
    }

    fn split(self, half: usize) -> (ClassifiedBatch, ClassifiedBatch) {
        let mut decisions = self.decisions;
        let tail_decisions = decisions.split_off(half);
        let (mut head, tail) = self.batch.split(half);
        // The rows of a phase other than the last are spread over the window,
        // so no part of them may move the position.
        if !self.phase.is_final() {
            head.end.clear();
        }
        (
            ClassifiedBatch {
                batch: head,
                decisions,
                crypto_seconds: self.crypto_seconds,
                phase: self.phase,
                read_rows: self.read_rows,
            },
            ClassifiedBatch {
                batch: tail,
                decisions: tail_decisions,
                crypto_seconds: 0.0,
                phase: self.phase,
                read_rows: self.read_rows,
            },
        )
    }

    /// Tells whether the batch is a window of a pass in physical order with
    /// rows enough to rewrite for several writes to pay.
    fn worth_phases(&self, pass: Pass) -> bool {
        pass == Pass::Main
            && self.phase == Phase::Whole
            && self.batch.physical
            && !self.batch.end.is_empty()
            && self
                .decisions
                .iter()
                .filter(|d| d.new_value.is_some())
                .count()
                >= MIN_ROWS_FOR_PHASES
    }

    /// Splits a window into at most `of` phases, in the order they are
    /// written (see `Phase`). A phase left empty, as when every page has
    /// fewer rows to rewrite than there are phases, is left out, except the
    /// last, which carries the window's end.
    fn into_phases(self, of: usize) -> Vec<ClassifiedBatch> {
        let part_of = phase_of_rows(&self.batch, &self.decisions, of);
        let decisions = deal(self.decisions, &part_of, of);
        let batches = self.batch.deal_out(&part_of, of);
        let parts: Vec<(Batch, Vec<Decision>)> = batches
            .into_iter()
            .zip(decisions)
            .enumerate()
            .filter(|(part, (batch, _))| batch.len() > 0 || part + 1 == of)
            .map(|(_, part)| part)
            .collect();
        let written = parts.len();
        let mut crypto_seconds = self.crypto_seconds;
        parts
            .into_iter()
            .enumerate()
            .map(|(part, (batch, decisions))| ClassifiedBatch {
                batch,
                decisions,
                crypto_seconds: std::mem::take(&mut crypto_seconds),
                phase: Phase::Part {
                    number: part + 1,
                    of: written,
                    revisit: part > 0,
                },
                read_rows: self.read_rows,
            })
            .collect()
    }
}

/// Returns the phase, from 0, that each row of a window written in `of`
/// phases goes to. On each page, the rows to rewrite go to the phases by
/// key, the lowest `1/of` first. The first phase's rows move to other pages
/// and add index entries, and with keys in random order on the pages (uuids)
/// those entries then gather in the low part of the index, which the
/// server's cache keeps better than the whole index. With five phases at 5M rows and 128 MiB of shared
/// buffers, the backends wrote half as many buffers themselves. The rows
/// with nothing to write go to the last phase, which counts them.
///
/// When a page's rows do not divide evenly, the phases that take one row
/// more come first (see `phase_of_rank`).
fn phase_of_rows(batch: &Batch, decisions: &[Decision], of: usize) -> Vec<usize> {
    let mut part_of = vec![of - 1; decisions.len()];
    let rewrites: Vec<usize> = (0..decisions.len())
        .filter(|&row| decisions[row].new_value.is_some())
        .collect();
    let page = |row: usize| batch.positions.get(row).map(|position| position.block);
    // Each text is parsed once here, not at each of the sort's comparisons.
    let numbers: Vec<Vec<Option<i128>>> = batch
        .keys
        .iter()
        .map(|column| column.iter().map(|text| text.parse().ok()).collect())
        .collect();
    for rows in rewrites.chunk_by(|&a, &b| page(a) == page(b)) {
        let mut ranked = rows.to_vec();
        ranked.sort_by(|&a, &b| compare_in_index_order(&batch.keys, &numbers, a, b));
        for (rank, &row) in ranked.iter().enumerate() {
            part_of[row] = phase_of_rank(rank, ranked.len(), of);
        }
    }
    part_of
}

/// Returns the phase, from 0, of the row of rank `rank` among a page's
/// `rows` rows to rewrite in `of` phases. The phases take `rows / of` rows
/// each, and the first `rows % of` of them one more.
///
/// Each phase after the first rewrites its rows in the room that the old
/// versions pruned from the page leave, but each of its rows also takes a
/// new line pointer of 4 bytes, which pruning keeps. So the room shrinks
/// from phase to phase, and the larger phases must come first. On pages of
/// 43 rows of 184 bytes, the phases once took 9, 9, 8, 9 and 8 rows. The
/// fourth phase did not fit, and one of its rows per page moved to another
/// page and added an index entry. With 9, 9, 9, 8 and 8 rows, every phase
/// fits.
fn phase_of_rank(rank: usize, rows: usize, of: usize) -> usize {
    debug_assert!(of > 0 && rank < rows);
    let size = rows / of;
    let larger_phases = rows % of;
    let rows_in_larger = larger_phases * (size + 1);
    if rank < rows_in_larger {
        rank / (size + 1)
    } else {
        larger_phases + (rank - rows_in_larger) / size
    }
}

/// Compares the keys of rows `a` and `b` in an order close to the index's,
/// column by column (see `column_order_key`). `numbers[c][r]` is the text
/// `keys[c][r]` parsed as an integer, if it is one. Only the placement of
/// index entries depends on it, never which rows are written.
fn compare_in_index_order(
    keys: &[Vec<String>],
    numbers: &[Vec<Option<i128>>],
    a: usize,
    b: usize,
) -> std::cmp::Ordering {
    keys.iter()
        .zip(numbers)
        .map(|(texts, numbers)| {
            column_order_key(numbers[a], &texts[a]).cmp(&column_order_key(numbers[b], &texts[b]))
        })
        .find(|order| order.is_ne())
        .unwrap_or(std::cmp::Ordering::Equal)
}

/// Returns the sort key of one key column's text, given the integer it
/// parses as, if any: integers first and by value, then other texts byte by
/// byte, which is the order of uuids. It is a total order whatever the
/// texts, as a sort requires.
fn column_order_key(number: Option<i128>, text: &str) -> (bool, i128, &str) {
    match number {
        Some(number) => (false, number, text),
        None => (true, 0, text),
    }
}

/// Returns the batch size to read after a write of `rows` rows timed out:
/// half its window, so that each phase of the next window is half as large.
/// A phase of `of` counts as `rows * of` rows, at most `read_rows`, the
/// size of the window it came from. The result is at least `min_rows`.
fn rows_after_timeout(phase: Phase, rows: usize, read_rows: usize, min_rows: usize) -> usize {
    let window_rows = match phase {
        Phase::Whole => rows,
        Phase::Part { of, .. } => rows.saturating_mul(of).min(read_rows),
    };
    (window_rows / 2).max(min_rows)
}

/// The first and last positions of windows whose writes have all committed.
/// The reader reads each of them once again before it fetches its next
/// window, while the writer writes (see `read_again`), so that PostgreSQL
/// prunes the old versions that the window's last write left. Otherwise the
/// final sweep's scan prunes them. Most pages have then been written out at
/// a checkpoint since the pass wrote them, so the server logs a full-page
/// image for each page it prunes. At 5M rows on a server with 1 GB of
/// `max_wal_size` (`bench/run.sh`), those images took a fifth of the run's
/// WAL.
type WrittenWindows = Arc<std::sync::Mutex<Vec<(RowPosition, RowPosition)>>>;

/// A batch read for the writer: its phases still to write, in order.
struct OpenWindow {
    parts: VecDeque<ClassifiedBatch>,
    /// The first and last positions of a pass's window in physical order
    /// with rows to rewrite, for `WrittenWindows`.
    span: Option<(RowPosition, RowPosition)>,
    /// The window's number among those the range's writer read, from 1,
    /// for the batch log.
    number: u64,
    /// Set once a write of the window has begun.
    begun: bool,
    /// Time spent writing the window's phases since its last sizing.
    seconds: f64,
}

impl OpenWindow {
    fn new(batch: ClassifiedBatch, pass: Pass, number: u64, phases: usize) -> OpenWindow {
        let rewrites = pass == Pass::Main
            && batch.batch.physical
            && batch.decisions.iter().any(|d| d.new_value.is_some());
        let positions = &batch.batch.positions;
        let span = if rewrites {
            positions.first().copied().zip(positions.last().copied())
        } else {
            None
        };
        let parts = if batch.worth_phases(pass) {
            batch.into_phases(phases).into()
        } else {
            VecDeque::from([batch])
        };
        OpenWindow {
            parts,
            span,
            number,
            begun: false,
            seconds: 0.0,
        }
    }
}

/// The order a range's writer takes the phases of its windows in.
///
/// Up to `max_open` windows are open at once. Each round writes the next
/// phase of every open window, oldest first, after which the next window
/// read joins the round at its end. With several windows open, other
/// windows' writes lie between two phases of a window. So the transactions
/// that were running when a phase committed, a second writer's above all,
/// have ended by the next phase. Its read of the window can then prune what
/// the earlier phase left. A writer alone keeps one window open, and writes its
/// phases one after another: nothing else holds back the pruning then, and
/// that order was measured about a tenth faster.
///
/// Only the oldest window may write a last phase, whose checkpoint moves the
/// range's position: a younger window's last phase waits its turn, so
/// positions only move forward, even after a phase is split in two.
struct WriteSchedule {
    /// Oldest first.
    open: VecDeque<OpenWindow>,
    max_open: usize,
    /// Number of phases each window read is written in.
    phases: usize,
    /// The window whose turn it is, as an index into `open`.
    turn: usize,
}

impl WriteSchedule {
    /// Creates the schedule of a range written beside `writers - 1` others.
    fn new(writers: usize) -> WriteSchedule {
        WriteSchedule {
            open: VecDeque::new(),
            max_open: if writers > 1 {
                OPEN_WINDOWS_BESIDE_OTHERS
            } else {
                1
            },
            phases: phases_per_window(writers),
            turn: 0,
        }
    }

    /// Returns the window whose phase is to be written next, or `None` when
    /// the round is over.
    fn next(&mut self) -> Option<&mut OpenWindow> {
        while self.turn < self.open.len() {
            let window = &self.open[self.turn];
            match window.parts.front() {
                None => {
                    self.open.remove(self.turn);
                }
                Some(part) if self.turn > 0 && part.phase.is_final() => self.turn += 1,
                Some(_) => return self.open.get_mut(self.turn),
            }
        }
        None
    }

    /// Moves on once the window that `next` returned has written a phase.
    fn written(&mut self) {
        if self.open[self.turn].parts.is_empty() {
            self.open.remove(self.turn);
        } else {
            self.turn += 1;
        }
    }

    /// Tells whether a new round may take another window.
    fn has_room(&self) -> bool {
        self.open.len() < self.max_open
    }

    /// Begins a new round, with `window` at its end if one was read.
    fn new_round(&mut self, window: Option<OpenWindow>) {
        self.turn = 0;
        self.open.extend(window);
    }

    /// Leaves out the windows not begun, for a stop request. The round goes
    /// on with the windows left.
    fn drop_unbegun(&mut self) {
        self.open.retain(|window| window.begun);
        self.turn = self.turn.min(self.open.len());
    }

    fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// Runs a closure on the crypto pool and waits for it without blocking tokio.
pub async fn on_crypto_pool<T: Send + 'static>(
    pool: &rayon::ThreadPool,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (send, receive) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    pool.spawn(move || {
        let _entered = span.enter();
        let _ = send.send(work());
    });
    receive.await.expect("the crypto pool dropped a task")
}

/// Processes one range until it is exhausted, stopped or failed. Returns the
/// counts of this run's work on the range.
pub async fn run_range(
    settings: &PipelineSettings,
    statements: Arc<Statements>,
    work: RangeWork,
    pass: Pass,
) -> Result<RangeOutcome, RangeError> {
    let (sender, mut receiver) = mpsc::channel::<Result<ClassifiedBatch, RangeError>>(1);
    let batch_rows = Arc::new(std::sync::atomic::AtomicUsize::new(settings.batch.rows));
    let written_windows = WrittenWindows::default();

    // Fetch and classify ahead of the writer.
    let reader = {
        let settings = settings.clone();
        let statements = statements.clone();
        let work = work.clone();
        let batch_rows = batch_rows.clone();
        let written_windows = written_windows.clone();
        tokio::spawn(async move {
            let mut after = work.after.clone();
            let mut work = work;
            let mut full_changed_pages = 0;
            let mut window = FIRST_WINDOW_BLOCKS;
            // Returns true once the range is exhausted, false when it stopped early.
            loop {
                if settings.stop.load(Ordering::SeqCst)
                    || settings.lease_lost.load(Ordering::SeqCst)
                {
                    return false;
                }
                // Fetch only once the channel has room, so that the next batch
                // is the only one waiting besides the one being written.
                let Ok(permit) = sender.reserve().await else {
                    return false;
                };
                // The server prunes the windows written since the last fetch
                // while the writer works on the next one.
                read_written_windows(&settings, &statements, &work, &written_windows).await;
                let limit = batch_rows.load(Ordering::Relaxed);
                let batch = if let Some(scan) = &work.physical {
                    match next_in_physical_order(
                        &settings,
                        &statements,
                        &work,
                        scan,
                        &mut after,
                        &mut window,
                        limit,
                    )
                    .await
                    {
                        Ok(Some(batch)) => batch,
                        Ok(None) => return true,
                        Err(error) => {
                            permit.send(Err(error));
                            return false;
                        }
                    }
                } else {
                    let mut fetched = None;
                    if work.changed_since.is_some() {
                        match fetch(&settings, &statements, &work, after.as_deref(), limit).await {
                            Ok(batch) => fetched = Some(Ok(batch)),
                            Err(error)
                                if db::transient_kind(&error)
                                    == Some(TransientKind::StatementTimeout) =>
                            {
                                tracing::info!(target = %work.target_label, "The scan for changed rows timed out; the sweep reads the rest of the span whole, in key order.");
                                work.changed_since = None;
                            }
                            // Other errors take the retries below.
                            Err(_) => {}
                        }
                    }
                    let fetched = match fetched {
                        Some(batch) => batch,
                        None => {
                            fetch_with_retry(&settings, &statements, &work, after.as_deref(), limit)
                                .await
                        }
                    };
                    let batch = match fetched {
                        Ok(batch) => batch,
                        Err(error) => {
                            permit.send(Err(error));
                            return false;
                        }
                    };
                    if batch.len() == 0 {
                        return true;
                    }
                    let next = Some(batch.key_of(batch.len() - 1));
                    // Keyset paging must move forward. A key that reads back as
                    // the same bound would fetch the same rows forever.
                    if next == after {
                        permit.send(Err(RangeError::Database(format!(
                        "the paging key did not advance past {}; the key's type may not round-trip through text",
                        display_key(&next.as_deref().map(key_label).unwrap_or_default())
                    ))));
                        return false;
                    }
                    after = next;
                    // Each page of changed rows costs a sequential scan of the
                    // table. When many rows changed, reading the rest in key order
                    // costs less.
                    if work.changed_since.is_some()
                        && batch.is_full(limit, settings.batch.max_bytes)
                    {
                        full_changed_pages += 1;
                        if full_changed_pages >= FULL_CHANGED_PAGES_BEFORE_KEYSET {
                            tracing::info!(target = %work.target_label, "Many rows changed since the pass; the sweep reads the rest of the span whole, in key order.");
                            work.changed_since = None;
                        }
                    }
                    batch
                };

                let keyring = settings.keyring.clone();
                let started = Instant::now();
                let (batch, decisions) = on_crypto_pool(&settings.crypto_pool, move || {
                    let decisions: Vec<Decision> = batch
                        .values
                        .par_iter()
                        .with_min_len(64)
                        .map(|value| keyring.classify(value.as_deref()))
                        .collect();
                    (batch, decisions)
                })
                .await;
                let crypto_seconds = started.elapsed().as_secs_f64();
                let mut classified = ClassifiedBatch {
                    batch,
                    decisions,
                    crypto_seconds,
                    phase: Phase::Whole,
                    read_rows: 0,
                };
                if classified.batch.physical {
                    classified = classified.without_rewritten();
                }
                classified.read_rows = classified.batch.len();
                permit.send(Ok(classified));
            }
        })
    };

    // Write batches in the order of a `WriteSchedule`, and split a batch
    // that timed out.
    let mut totals = RangeOutcome::default();
    let mut schedule = WriteSchedule::new(settings.writers);
    let mut windows_read = 0;
    let mut received_all = false;
    // A failed read ends the range once the windows read before it are written.
    let mut read_error = None;
    let result = loop {
        let stopping = settings.stop.load(Ordering::SeqCst);
        if stopping {
            // A stop request finishes the windows begun. The others are left
            // for the next run.
            schedule.drop_unbegun();
        }
        let Some(window) = schedule.next() else {
            let mut read = None;
            if stopping {
                if schedule.is_empty() {
                    break Err(RangeError::Interrupted);
                }
            } else if !received_all && schedule.has_room() {
                match receiver.recv().await {
                    Some(Ok(batch)) => {
                        windows_read += 1;
                        read = Some(OpenWindow::new(batch, pass, windows_read, schedule.phases));
                    }
                    Some(Err(error)) => {
                        read_error = Some(error);
                        received_all = true;
                    }
                    None => received_all = true,
                }
            }
            schedule.new_round(read);
            if schedule.is_empty() {
                break read_error.map_or(Ok(()), Err);
            }
            continue;
        };
        let mut next = window
            .parts
            .pop_front()
            .expect("the schedule returns windows with phases to write");
        if settings.lease_lost.load(Ordering::SeqCst) {
            break Err(RangeError::LeaseLost);
        }
        // A stop request ends a throttle wait at once, and a window not begun
        // is not written. A window begun is finished first, without waiting.
        if !window.begun {
            let stopped = tokio::select! {
                _ = settings.throttle.wait(&work.target_label, next.batch.len()) => false,
                _ = stop_requested(&settings.stop) => true,
            };
            if stopped {
                window.parts.push_front(next);
                continue;
            }
        } else if !stopping {
            tokio::select! {
                _ = settings.throttle.wait(&work.target_label, next.batch.len()) => {}
                _ = stop_requested(&settings.stop) => {}
            }
        }
        window.begun = true;

        let rows = next.batch.len();
        let physical = next.batch.physical;
        let fetch_seconds = next.batch.fetch_seconds;
        let crypto_seconds = next.crypto_seconds;
        let read_rows = next.read_rows;
        let started = Instant::now();
        if let Phase::Part {
            revisit: read_again,
            ..
        } = &mut next.phase
        {
            if std::mem::take(read_again) {
                revisit(settings, &statements, &work, &next.batch).await;
            }
        }
        let phase = next.phase;
        match write_with_retry(settings, &statements, &work, pass, next).await {
            Ok(WriteResult::Committed(counts, writer)) => {
                let write_seconds = started.elapsed().as_secs_f64();
                totals.counts.add(&counts);
                totals.writers.extend(writer);
                metrics::record_batch(
                    &work.target_label,
                    &counts,
                    fetch_seconds,
                    crypto_seconds,
                    write_seconds,
                );
                tracing::debug!(
                    target = %work.target_label,
                    range = work.range_index,
                    pass = ?pass,
                    phase = %phase.label(),
                    window = window.number,
                    rows,
                    fetch_ms = fetch_seconds * 1000.0,
                    crypto_ms = crypto_seconds * 1000.0,
                    write_ms = write_seconds * 1000.0,
                    "Batch committed."
                );
                settings
                    .progress
                    .advance(&work.target_label, pass, counts.rows_scanned as u64);
                // The next window is sized by this one's write time, over
                // all its phases.
                window.seconds += write_seconds;
                if phase.is_final() {
                    let rows = if phase == Phase::Whole {
                        rows
                    } else {
                        read_rows
                    };
                    adapt_batch_size(
                        &settings.batch,
                        &batch_rows,
                        rows,
                        physical,
                        std::mem::take(&mut window.seconds),
                    );
                }
                // The window's last write has committed, so its old versions
                // may now be pruned.
                if window.parts.is_empty() {
                    if let Some(span) = window.span.take() {
                        lock_written(&written_windows).push(span);
                    }
                }
                schedule.written();
            }
            Ok(WriteResult::Split(halves)) => {
                let (head, tail) = *halves;
                tracing::warn!(target = %work.target_label, rows, "Batch timed out; retrying it as two smaller batches.");
                let smaller = rows_after_timeout(phase, rows, read_rows, settings.batch.min_rows);
                batch_rows.store(smaller, Ordering::Relaxed);
                window.parts.push_front(tail);
                window.parts.push_front(head);
            }
            Err(error) => break Err(error),
        }
    };

    drop(receiver);
    let exhausted = match reader.await {
        Ok(exhausted) => exhausted,
        Err(error) => {
            return Err(RangeError::Database(format!(
                "the fetch task failed: {error}"
            )))
        }
    };
    // The windows whose last write committed after the reader's last read.
    if result.is_ok() && exhausted {
        read_written_windows(settings, &statements, &work, &written_windows).await;
    }
    // The reader also ends without an error on a stop request, maybe before
    // its first batch, and then the range is not done.
    if result.is_ok() && !exhausted {
        return Err(if settings.lease_lost.load(Ordering::SeqCst) {
            RangeError::LeaseLost
        } else {
            RangeError::Interrupted
        });
    }
    result.map(|_| totals)
}

/// Adjusts the next batch size toward the target write duration.
fn adapt_batch_size(
    sizing: &BatchSizing,
    batch_rows: &std::sync::atomic::AtomicUsize,
    rows: usize,
    physical: bool,
    write_seconds: f64,
) {
    let Some(target) = sizing.target_duration else {
        return;
    };
    let current = batch_rows.load(Ordering::Relaxed);
    // A short batch (end of range, byte cap) says nothing about the right
    // size. In physical order a window of blocks contains about the limit,
    // a little more or less, so a batch within a tenth of it counts as full.
    let full = if physical {
        current - current / 10
    } else {
        current
    };
    if rows < full {
        return;
    }
    let target = target.as_secs_f64();
    let next = if write_seconds < target / 2.0 {
        current + current / 2
    } else if write_seconds > target * 2.0 {
        current / 2
    } else {
        current
    };
    batch_rows.store(
        next.clamp(sizing.min_rows, sizing.max_rows),
        Ordering::Relaxed,
    );
}

/// Returns the kind of a transient error; any other error ends the range.
fn transient_or_fail(error: &sqlx::Error) -> Result<TransientKind, RangeError> {
    db::transient_kind(error).ok_or_else(|| {
        metrics::record_error("database");
        RangeError::Database(db::describe(error))
    })
}

/// Waits before the next attempt after a transient error, or gives up once
/// the retry limits are reached.
async fn retry_after(
    settings: &PipelineSettings,
    target: &str,
    operation: &str,
    kind: TransientKind,
    error: &sqlx::Error,
    attempt: u32,
    started: Instant,
) -> Result<(), RangeError> {
    let elapsed = started.elapsed();
    if attempt >= settings.retry.max_attempts || elapsed >= settings.retry.max_elapsed {
        metrics::record_error(kind.label());
        return Err(RangeError::RetriesExhausted {
            attempts: attempt,
            elapsed_secs: elapsed.as_secs_f64(),
            last: db::describe(error),
        });
    }
    let delay = settings.retry.delay(attempt);
    metrics::record_retry(kind.label());
    tracing::warn!(target = %target, operation, kind = kind.label(), attempt, delay_ms = delay.as_millis() as u64, error = %db::describe(error), "Transient database error; retrying.");
    wait_to_retry(settings, delay).await
}

/// Resolves once a stop is requested.
async fn stop_requested(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sleeps for `delay` before a retry. A stop request ends the wait at once,
/// and the range stops instead of retrying, for example, a wait on a row
/// lock. A batch commits together with its checkpoint, so whether or not
/// the failed attempt committed, a rerun resumes at the right place.
async fn wait_to_retry(settings: &PipelineSettings, delay: Duration) -> Result<(), RangeError> {
    let until = Instant::now() + delay;
    loop {
        if settings.stop.load(Ordering::SeqCst) {
            return Err(RangeError::Interrupted);
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(100))).await;
    }
}

/// Runs `operation` with bounded, jittered retries of transient errors.
async fn with_retry<T, F, Fut>(
    settings: &PipelineSettings,
    what: &str,
    target: &str,
    mut operation: F,
) -> Result<T, RangeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match operation().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                let kind = transient_or_fail(&error)?;
                retry_after(settings, target, what, kind, &error, attempt, started).await?;
            }
        }
    }
}

async fn fetch_with_retry(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    after: Option<&[String]>,
    limit: usize,
) -> Result<Batch, RangeError> {
    with_retry(settings, "fetch", &work.target_label, || {
        fetch(settings, statements, work, after, limit)
    })
    .await
}

/// Reads the next batch after `after`, up to the range's end, capped in rows
/// and bytes; in a sweep of changed rows, only those.
async fn fetch(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    after: Option<&[String]>,
    limit: usize,
) -> Result<Batch, sqlx::Error> {
    let started = Instant::now();
    let upper = work.upper.as_deref();
    let changed = work.changed_since.as_deref();
    let mut tx = match changed {
        Some(_) => settings.db.begin_changed_scan().await?,
        None => settings.db.begin_read_only().await?,
    };
    let mut query =
        sqlx::query(statements.fetch(after.is_some(), upper.is_some(), changed.is_some()));
    for part in after
        .into_iter()
        .flatten()
        .chain(upper.into_iter().flatten())
    {
        query = query.bind(part);
    }
    query = query.bind(limit as i64);
    if let Some(changed) = changed {
        query = query
            .bind(changed.horizon.to_string())
            .bind(changed.writer_list());
    }

    let mut batch = read_batch(
        &mut tx,
        query,
        statements.key_len,
        settings.batch.max_bytes,
        false,
    )
    .await?;
    if batch.is_full(limit, settings.batch.max_bytes) {
        complete_key_group(&mut tx, statements, &mut batch, changed.is_some()).await?;
    }
    release_buffers(&mut tx);
    tx.commit().await?;
    if batch.len() > 0 {
        batch.end = batch.key_of(batch.len() - 1);
    }
    batch.fetch_seconds = started.elapsed().as_secs_f64();
    Ok(batch)
}

/// Reads the next batch of a pass in physical order and moves `after` past
/// it. Each fetch reads one window of blocks, so that it touches only those.
/// `window` is resized toward `limit` rows per window, and halved when a
/// fetch times out. A batch may be empty: its checkpoint still records that
/// the pass moved on. Returns `None` at the range's end.
async fn next_in_physical_order(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    scan: &PhysicalScan,
    after: &mut Option<Vec<String>>,
    window: &mut u64,
    limit: usize,
) -> Result<Option<Batch>, RangeError> {
    let block = |bound: Option<&Vec<String>>| {
        bound
            .and_then(|parts| parts.first())
            .and_then(|position| block_of(position))
            .ok_or_else(|| {
                RangeError::Database(format!(
                    "the range's row position {bound:?} is not a position (block,offset)"
                ))
            })
    };
    let end = block(work.upper.as_ref())?;
    let from = after.as_ref().map_or(Ok(0), |_| block(after.as_ref()))?;
    if from >= end {
        return Ok(None);
    }
    let lower = after
        .as_ref()
        .map_or_else(|| block_start(0), |p| p[0].clone());
    let (until, mut batch) = loop {
        let until = from.saturating_add(*window).min(end);
        let upper = block_start(until);
        match fetch_physical(settings, statements, &lower, &upper, scan, limit).await {
            Ok(batch) => break (until, batch),
            Err(error)
                if *window > 1
                    && db::transient_kind(&error) == Some(TransientKind::StatementTimeout) =>
            {
                *window /= 2;
                tracing::info!(target = %work.target_label, blocks = *window, "A window of the pass timed out; it is read in smaller windows.");
            }
            // Other errors take the retries below.
            Err(_) => {
                let batch = with_retry(settings, "fetch", &work.target_label, || {
                    fetch_physical(settings, statements, &lower, &upper, scan, limit)
                })
                .await?;
                break (until, batch);
            }
        }
    };
    if batch.is_full(limit, settings.batch.max_bytes) {
        // The window contains more than a batch, so the next one starts after
        // the last row read, in a smaller window.
        *window = (*window / 2).max(1);
        batch.end = batch.end_at(batch.len() - 1);
    } else {
        let blocks = until - from;
        *window = if batch.len() == 0 {
            blocks.saturating_mul(4)
        } else {
            (blocks.saturating_mul(limit as u64) / batch.len() as u64)
                .clamp(1, blocks.saturating_mul(4))
        }
        .clamp(1, MAX_WINDOW_BLOCKS);
        batch.end = vec![block_start(until)];
    }
    *after = Some(batch.end.clone());
    Ok(Some(batch))
}

/// Reads the rows between two positions, both exclusive, in position order,
/// with whether each is as new as the pass's frontier; capped in rows and bytes.
async fn fetch_physical(
    settings: &PipelineSettings,
    statements: &Statements,
    lower: &str,
    upper: &str,
    scan: &PhysicalScan,
    limit: usize,
) -> Result<Batch, sqlx::Error> {
    let started = Instant::now();
    let mut tx = settings.db.begin_read_only().await?;
    let query = sqlx::query(&statements.physical_fetch)
        .bind(lower)
        .bind(upper)
        .bind(scan.frontier.to_string())
        .bind(limit as i64)
        .bind(scan.running.as_slice());
    let mut batch = read_batch(
        &mut tx,
        query,
        statements.key_len,
        settings.batch.max_bytes,
        true,
    )
    .await?;
    release_buffers(&mut tx);
    tx.commit().await?;
    batch.fetch_seconds = started.elapsed().as_secs_f64();
    Ok(batch)
}

/// Completes a batch that stopped at its row limit or byte cap with every
/// row whose key equals its last key. Paging continues after that key, so
/// without this, rows of child tables that repeat it would be skipped.
async fn complete_key_group(
    tx: &mut Transaction<'static, Postgres>,
    statements: &Statements,
    batch: &mut Batch,
    changed_scan: bool,
) -> Result<(), sqlx::Error> {
    if changed_scan {
        // A scan for changed rows turns index scans off; this lookup needs one.
        for setting in ["enable_indexscan", "enable_bitmapscan"] {
            sqlx::query(&format!("SET LOCAL {setting} = on"))
                .execute(&mut **tx)
                .await?;
        }
    }
    let last = batch.key_of(batch.len() - 1);
    let mut group_start = batch.len();
    while group_start > 0 && batch.key_of(group_start - 1) == last {
        group_start -= 1;
    }

    let mut query = sqlx::query(&statements.key_group);
    for part in &last {
        query = query.bind(part);
    }
    let group = read_batch(tx, query, statements.key_len, usize::MAX, false).await?;
    // The lookup shares the page's snapshot, so it finds at least the rows
    // read. Should it find none, the page stays as read: an empty page
    // would end the range.
    if group.len() == 0 {
        return Ok(());
    }
    for (column, keys) in batch.keys.iter_mut().enumerate() {
        keys.truncate(group_start);
        keys.extend_from_slice(&group.keys[column]);
    }
    batch.values.truncate(group_start);
    batch.values.extend(group.values);
    batch.positions.truncate(group_start);
    batch.positions.extend(group.positions);
    Ok(())
}

/// Reads a fetch's rows (keys, value, position) into a batch, stopping once
/// the values reach `max_bytes`.
async fn read_batch(
    tx: &mut Transaction<'static, Postgres>,
    query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    key_len: usize,
    max_bytes: usize,
    physical: bool,
) -> Result<Batch, sqlx::Error> {
    let mut batch = Batch {
        keys: vec![Vec::new(); key_len],
        values: Vec::new(),
        positions: Vec::new(),
        end: Vec::new(),
        physical,
        in_key_order: physical,
        newer: Vec::new(),
        fetch_seconds: 0.0,
    };
    let mut bytes = 0usize;
    let mut rows = query.fetch(&mut **tx);
    while let Some(row) = rows.try_next().await? {
        for (column, keys) in batch.keys.iter_mut().enumerate() {
            keys.push(row.try_get::<String, _>(column)?);
        }
        let value: Option<String> = row.try_get(key_len)?;
        batch.positions.push(row.try_get(key_len + 1)?);
        if physical {
            batch.newer.push(row.try_get(key_len + 2)?);
        }
        bytes += value.as_ref().map_or(0, String::len);
        batch.values.push(value);
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(batch)
}

/// Shrinks the connection's read and write buffers back to their default
/// size. A batch's messages grow them to megabytes, and every pooled
/// connection would otherwise keep that capacity for the rest of the run.
fn release_buffers(tx: &mut Transaction<'static, Postgres>) {
    sqlx::Connection::shrink_buffers(&mut **tx);
}

enum WriteResult {
    /// Committed; the transaction's ID when every row it wrote carries it.
    Committed(Counts, Option<u32>),
    /// The batch timed out: process these halves instead.
    Split(Box<(ClassifiedBatch, ClassifiedBatch)>),
}

async fn write_with_retry(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    pass: Pass,
    batch: ClassifiedBatch,
) -> Result<WriteResult, RangeError> {
    let started = Instant::now();
    let mut attempt = 0;
    let mut isolate = false;
    // The ID of a transaction whose COMMIT failed: it may have committed.
    let mut failed_commit: Option<i64> = None;
    loop {
        attempt += 1;
        if let Some(transaction) = failed_commit {
            // A reason to wait before asking again, if any.
            let wait = match commit_status(settings, transaction).await {
                Err(error) => Some((transient_or_fail(&error)?, error)),
                Ok(status) => match status.as_deref() {
                    Some("committed") => {
                        tracing::info!(target = %work.target_label, range = work.range_index, transaction, "The batch had committed before its connection failed; it is not written again.");
                        return Ok(WriteResult::Committed(tally(&batch), None));
                    }
                    Some("in progress") => Some((
                        TransientKind::Connection,
                        sqlx::Error::Protocol(format!(
                            "the COMMIT of transaction {transaction} is still in progress"
                        )),
                    )),
                    Some(_) => None,
                    // NOTE: only for a transaction older than the server keeps
                    // status for, so not expected within the retry budget.
                    None => {
                        tracing::warn!(target = %work.target_label, range = work.range_index, transaction, "The server no longer knows whether the batch's transaction committed; writing the batch again, which may count it twice.");
                        None
                    }
                },
            };
            if let Some((kind, error)) = wait {
                retry_after(
                    settings,
                    &work.target_label,
                    "write",
                    kind,
                    &error,
                    attempt,
                    started,
                )
                .await?;
                continue;
            }
            failed_commit = None;
        }

        let error = match write(settings, statements, work, pass, &batch, isolate).await {
            Ok((counts, writer)) => return Ok(WriteResult::Committed(counts, writer)),
            Err(WriteError::LeaseLost) => return Err(RangeError::LeaseLost),
            Err(WriteError::RowRejected) => {
                // Some row's new value was rejected: write again with each part
                // under a savepoint, to find the row and let the rest through.
                isolate = true;
                continue;
            }
            Err(WriteError::AtCommit(transaction, error)) => {
                failed_commit = Some(transaction);
                error
            }
            Err(WriteError::Database(error)) => error,
        };
        let kind = transient_or_fail(&error)?;
        // A batch that timed out before its COMMIT is written again in halves.
        if kind == TransientKind::StatementTimeout && failed_commit.is_none() {
            if let Some(half) = batch.batch.split_point() {
                metrics::record_retry(kind.label());
                let (head, tail) = batch.split(half);
                return Ok(WriteResult::Split(Box::new((head, tail))));
            }
        }
        retry_after(
            settings,
            &work.target_label,
            "write",
            kind,
            &error,
            attempt,
            started,
        )
        .await?;
    }
}

/// Reads the status of the transaction with this ID: `committed`,
/// `aborted`, `in progress`, or `None` when the server no longer keeps it.
async fn commit_status(
    settings: &PipelineSettings,
    transaction: i64,
) -> Result<Option<String>, sqlx::Error> {
    let mut tx = settings.db.begin_read_only().await?;
    let status = sqlx::query_scalar("SELECT txid_status($1)")
        .bind(transaction)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(status)
}

/// Counts a batch as classified, for a batch whose commit is known only from
/// its transaction's status.
fn tally(classified: &ClassifiedBatch) -> Counts {
    let mut counts = Counts::default();
    for decision in &classified.decisions {
        counts.add_outcome(decision.outcome, 1);
    }
    counts.rows_scanned = classified.batch.len() as i64;
    counts.batches = 1;
    counts
}

#[derive(Debug)]
enum WriteError {
    LeaseLost,
    /// The database rejected the batch because of some row's new value.
    RowRejected,
    Database(sqlx::Error),
    /// The COMMIT of the transaction with this ID failed, so it may or may
    /// not have committed.
    AtCommit(i64, sqlx::Error),
}

impl From<sqlx::Error> for WriteError {
    fn from(error: sqlx::Error) -> WriteError {
        WriteError::Database(error)
    }
}

/// Writes one classified batch and its checkpoint in one transaction.
/// Returns the counts and, when no row was written under a savepoint, the
/// transaction's ID, which every written row then carries as its `xmin`.
///
/// The first attempt writes the batch in one statement. When the database
/// rejects a row, `isolate` retries it with bisection under savepoints.
async fn write(
    settings: &PipelineSettings,
    statements: &Statements,
    work: &RangeWork,
    pass: Pass,
    classified: &ClassifiedBatch,
    isolate: bool,
) -> Result<(Counts, Option<u32>), WriteError> {
    let batch = &classified.batch;
    // Rows whose stored value a trigger changed from the one written. Each
    // such write is undone with its whole transaction, and the batch is
    // written again without those rows, which stay as they were.
    let mut altered = vec![false; batch.len()];
    let (mut tx, outcomes, conflicted, savepoints) = loop {
        let mut outcomes: Vec<Outcome> = classified
            .decisions
            .iter()
            .zip(&altered)
            .map(|(d, &altered)| match altered {
                true => Outcome::WriteRejected,
                false => d.outcome,
            })
            .collect();
        let mut tx = settings.db.begin().await?;

        // Compare-and-swap: rows whose value changed since it was read stay untouched.
        let to_write: Vec<usize> = (0..batch.len())
            .filter(|&r| classified.decisions[r].new_value.is_some() && !altered[r])
            .collect();
        let new_value = |r: usize| {
            classified.decisions[r]
                .new_value
                .as_deref()
                .unwrap_or_default()
        };
        let mut written = write_batch_rows(
            &mut tx,
            statements,
            batch,
            &to_write,
            new_value,
            &mut outcomes,
            isolate,
        )
        .await?;

        // Conflicts: lock the rows that changed, re-read and re-classify them.
        // A flag per row keeps this check linear in the batch size.
        let mut is_written = vec![false; batch.len()];
        for &row in &written {
            is_written[row] = true;
        }
        let conflicted: Vec<usize> = to_write
            .iter()
            .copied()
            .filter(|&r| !is_written[r] && outcomes[r] != Outcome::WriteRejected)
            .collect();
        // Rows written under a savepoint carry a subtransaction's ID instead.
        let mut savepoints = isolate && !to_write.is_empty();
        if !conflicted.is_empty() {
            savepoints |= isolate;
            written.extend(
                resolve_conflicts(
                    settings,
                    &mut tx,
                    statements,
                    batch,
                    &conflicted,
                    &mut outcomes,
                    isolate,
                )
                .await?,
            );
        }

        // A written row marked rejected stores another value than the one written.
        let changed_by_trigger: Vec<usize> = written
            .into_iter()
            .filter(|&r| outcomes[r] == Outcome::WriteRejected)
            .collect();
        if changed_by_trigger.is_empty() {
            break (tx, outcomes, conflicted, savepoints);
        }
        tx.rollback().await?;
        for row in changed_by_trigger {
            altered[row] = true;
        }
    };

    // Tally, and record the keys of rows that need attention.
    let mut counts = Counts::default();
    let mut attention_keys: Vec<String> = Vec::new();
    let mut attention_outcomes: Vec<Outcome> = Vec::new();
    // Keys repeat across an inheritance tree, but one statement cannot
    // insert a key twice, so the list has one entry per key. An outcome
    // that needs action replaces one that does not.
    let mut entry_of_key: HashMap<String, usize> = HashMap::new();
    for (row, outcome) in outcomes.iter().enumerate() {
        counts.add_outcome(*outcome, 1);
        if !outcome.is_reported() {
            continue;
        }
        let key = key_label(&batch.key_of(row));
        match entry_of_key.get(&key) {
            Some(&entry) => {
                if outcome.needs_attention() && !attention_outcomes[entry].needs_attention() {
                    attention_outcomes[entry] = *outcome;
                }
            }
            None => {
                entry_of_key.insert(key.clone(), attention_keys.len());
                attention_keys.push(key);
                attention_outcomes.push(*outcome);
            }
        }
    }
    let attention_outcomes: Vec<&str> = attention_outcomes.iter().map(|o| o.label()).collect();
    counts.rows_scanned = batch.len() as i64;
    counts.conflicts = conflicted.len() as i64;
    counts.batches = 1;
    // A row listed by an earlier run (rejected, say) and rotated by this
    // sweep needs no more attention. The sweep reads such rows again when
    // the job is run after its pass finished.
    if pass == Pass::Sweep {
        let rotated: Vec<String> = (0..batch.len())
            .filter(|&row| outcomes[row] == Outcome::Reencrypted)
            .map(|row| key_label(&batch.key_of(row)))
            .collect();
        if !rotated.is_empty() {
            sqlx::query(&statements.clear_attention)
                .bind(&settings.job)
                .bind(&work.target_label)
                .bind(&rotated)
                .execute(&mut *tx)
                .await?;
        }
    }
    if !attention_keys.is_empty() {
        sqlx::query(&statements.attention)
            .bind(&settings.job)
            .bind(&work.target_label)
            .bind(&attention_keys)
            .bind(&attention_outcomes)
            .execute(&mut *tx)
            .await?;
    }

    // The checkpoint commits with the batch, and only while the lease is ours.
    let transaction: Option<i64> = match pass {
        Pass::Main => {
            // A phase before a window's last has no end and keeps the position.
            let last_key = (!batch.end.is_empty()).then_some(&batch.end);
            sqlx::query_scalar(&statements.checkpoint)
                .bind(&settings.job)
                .bind(&work.target_label)
                .bind(work.range_index)
                .bind(settings.shard)
                .bind(&settings.holder.token)
                .bind(last_key)
                .bind(counts.rows_scanned)
                .bind(counts.reencrypted)
                .bind(counts.current)
                .bind(counts.null)
                .bind(counts.not_in_format)
                .bind(counts.undecryptable)
                .bind(counts.ambiguous)
                .bind(counts.deleted)
                .bind(counts.write_rejected)
                .bind(counts.conflicts)
                .fetch_optional(&mut *tx)
                .await?
        }
        Pass::Sweep => {
            sqlx::query_scalar(&statements.sweep_checkpoint)
                .bind(&settings.job)
                .bind(&work.target_label)
                .bind(work.range_index)
                .bind(settings.shard)
                .bind(&settings.holder.token)
                .bind(counts.reencrypted)
                .bind(counts.conflicts)
                .fetch_optional(&mut *tx)
                .await?
        }
    };
    let Some(transaction) = transaction else {
        tx.rollback().await?;
        return Err(WriteError::LeaseLost);
    };
    release_buffers(&mut tx);
    if let Err(error) = tx.commit().await {
        return Err(WriteError::AtCommit(transaction, error));
    }
    let writer = (!savepoints).then(|| xid32(transaction));

    // A sweep re-reads rows the main pass already counted, so it reports only
    // what it rotated; summaries and metrics then count every row once.
    let counts = match pass {
        Pass::Main => counts,
        Pass::Sweep => Counts {
            sweep_reencrypted: counts.reencrypted,
            conflicts: counts.conflicts,
            batches: 1,
            ..Counts::default()
        },
    };
    Ok((counts, writer))
}

/// Writes rows with compare-and-swap, in one statement without savepoints
/// unless `isolate`, so that every row written carries the transaction's
/// ID for the sweep's filter. Without `isolate`, a rejected row fails the
/// whole batch with `RowRejected`, and the caller retries it isolated.
async fn write_batch_rows<'a>(
    tx: &mut Transaction<'static, Postgres>,
    statements: &Statements,
    batch: &Batch,
    rows: &[usize],
    new_value: impl Fn(usize) -> &'a str + Copy,
    outcomes: &mut [Outcome],
    isolate: bool,
) -> Result<Vec<usize>, WriteError> {
    if isolate {
        return Ok(write_rows(tx, statements, batch, rows, new_value, outcomes).await?);
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    match update(tx, statements, batch, rows, new_value, outcomes).await {
        Ok(written) => Ok(written),
        Err(error) if db::is_row_error(&error) => Err(WriteError::RowRejected),
        Err(error) => Err(error.into()),
    }
}

/// Writes the given rows with compare-and-swap. A row-specific failure (a
/// constraint, a trigger, a value too long) is isolated by bisection under
/// savepoints, and the rows that cause it are marked `WriteRejected`. Returns
/// the rows actually written.
async fn write_rows<'a>(
    tx: &mut Transaction<'static, Postgres>,
    statements: &Statements,
    batch: &Batch,
    rows: &[usize],
    new_value: impl Fn(usize) -> &'a str + Copy,
    outcomes: &mut [Outcome],
) -> Result<Vec<usize>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut savepoint = sqlx::Connection::begin(&mut **tx).await?;
    match update(&mut savepoint, statements, batch, rows, new_value, outcomes).await {
        Ok(written) => {
            savepoint.commit().await?;
            Ok(written)
        }
        Err(error) if db::is_row_error(&error) => {
            savepoint.rollback().await?;
            if rows.len() == 1 {
                tracing::warn!(key = %display_key(&key_label(&batch.key_of(rows[0]))), error = %db::describe(&error), "The database rejected the new value of a row; the row is left unchanged.");
                outcomes[rows[0]] = Outcome::WriteRejected;
                return Ok(Vec::new());
            }
            let (head, tail) = rows.split_at(rows.len() / 2);
            let mut written =
                Box::pin(write_rows(tx, statements, batch, head, new_value, outcomes)).await?;
            written.extend(
                Box::pin(write_rows(tx, statements, batch, tail, new_value, outcomes)).await?,
            );
            Ok(written)
        }
        Err(error) => Err(error),
    }
}

/// Runs the compare-and-swap UPDATE for `rows`; returns the rows written.
/// A row the UPDATE matched but that stores another value than the one
/// written (a trigger changed or kept it) is marked `WriteRejected`.
async fn update<'a>(
    conn: &mut PgConnection,
    statements: &Statements,
    batch: &Batch,
    rows: &[usize],
    new_value: impl Fn(usize) -> &'a str,
    outcomes: &mut [Outcome],
) -> Result<Vec<usize>, sqlx::Error> {
    let statement = match batch.in_key_order {
        true => &statements.write_in_key_order,
        false => &statements.write,
    };
    let mut query = sqlx::query(statement);
    for column in &batch.keys {
        let keys: Vec<&str> = rows.iter().map(|&r| column[r].as_str()).collect();
        query = query.bind(keys);
    }
    let old: Vec<&str> = rows
        .iter()
        .map(|&r| batch.values[r].as_deref().unwrap_or_default())
        .collect();
    let new: Vec<&str> = rows.iter().map(|&r| new_value(r)).collect();
    query = query.bind(old).bind(new);
    if statements.by_position {
        let positions: Vec<RowPosition> = rows.iter().map(|&r| batch.positions[r]).collect();
        query = query.bind(positions);
    }
    let (written, not_stored) = if statements.write_returns_each_row {
        let returned = query
            .try_map(|row: PgRow| <(i64, bool)>::from_row(&row))
            .fetch_all(conn)
            .await?;
        let not_stored = returned
            .iter()
            .filter(|(_, stored)| !stored)
            .map(|&(ord, _)| ord)
            .collect();
        let written = returned.into_iter().map(|(ord, _)| ord).collect();
        (written, not_stored)
    } else {
        query
            .try_map(|row: PgRow| <(Vec<i64>, Vec<i64>)>::from_row(&row))
            .fetch_one(conn)
            .await?
    };
    let row_of = |ord: i64| rows[(ord - 1) as usize];
    for row in not_stored.into_iter().map(row_of) {
        tracing::warn!(key = %display_key(&key_label(&batch.key_of(row))), "The row contains another value than the one written, so a trigger changed it; the write is undone and the row left unchanged.");
        outcomes[row] = Outcome::WriteRejected;
    }
    Ok(written.into_iter().map(row_of).collect())
}

/// Re-reads conflicted rows under a row lock, classifies their current values,
/// and rewrites those now under an old key. Deleted rows become `Deleted`.
/// Returns the batch's rows written.
async fn resolve_conflicts(
    settings: &PipelineSettings,
    tx: &mut Transaction<'static, Postgres>,
    statements: &Statements,
    batch: &Batch,
    conflicted: &[usize],
    outcomes: &mut [Outcome],
    isolate: bool,
) -> Result<Vec<usize>, WriteError> {
    let mut query = sqlx::query(&statements.lock);
    for column in &batch.keys {
        let keys: Vec<&str> = conflicted.iter().map(|&r| column[r].as_str()).collect();
        query = query.bind(keys);
    }
    let locked = query.fetch_all(&mut **tx).await?;

    for &row in conflicted {
        outcomes[row] = Outcome::Deleted;
    }
    let mut current: Vec<(usize, Option<String>)> = Vec::with_capacity(locked.len());
    let mut positions: Vec<RowPosition> = Vec::with_capacity(locked.len());
    for row in &locked {
        let ord: i64 = row.try_get(0)?;
        current.push((conflicted[(ord - 1) as usize], row.try_get(1)?));
        positions.push(row.try_get(2)?);
    }

    let keyring = settings.keyring.clone();
    let current = Arc::new(current);
    let decisions = {
        let current = current.clone();
        on_crypto_pool(&settings.crypto_pool, move || {
            current
                .iter()
                .map(|(_, value)| keyring.classify(value.as_deref()))
                .collect::<Vec<_>>()
        })
        .await
    };

    // The rows are locked, so the compare-and-swap cannot miss now; build a
    // batch of the current values and write it.
    let reread = Batch {
        keys: batch
            .keys
            .iter()
            .map(|column| current.iter().map(|(r, _)| column[*r].clone()).collect())
            .collect(),
        values: current.iter().map(|(_, v)| v.clone()).collect(),
        positions,
        end: Vec::new(),
        physical: false,
        in_key_order: false,
        newer: Vec::new(),
        fetch_seconds: 0.0,
    };
    let mut reread_outcomes: Vec<Outcome> = decisions.iter().map(|d| d.outcome).collect();
    let to_write: Vec<usize> = (0..reread.len())
        .filter(|&i| decisions[i].new_value.is_some())
        .collect();
    let new_value = |i: usize| decisions[i].new_value.as_deref().unwrap_or_default();
    let written = write_batch_rows(
        tx,
        statements,
        &reread,
        &to_write,
        new_value,
        &mut reread_outcomes,
        isolate,
    )
    .await?;
    let mut is_written = vec![false; current.len()];
    for &i in &written {
        is_written[i] = true;
    }
    for (i, (row, _)) in current.iter().enumerate() {
        outcomes[*row] = reread_outcomes[i];
        if decisions[i].new_value.is_some()
            && !is_written[i]
            && reread_outcomes[i] != Outcome::WriteRejected
        {
            // The row is locked and still contains the value read, so the
            // UPDATE matched it and a trigger skipped the change.
            tracing::warn!(key = %display_key(&key_label(&batch.key_of(*row))), "The database did not apply the update to the row (a trigger skipped it); the row is left unchanged.");
            outcomes[*row] = Outcome::WriteRejected;
        }
    }
    Ok(written.iter().map(|&i| current[i].0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(block: u32, offset: usize) -> RowPosition {
        let offset = u16::try_from(offset).unwrap();
        RowPosition { block, offset }
    }

    fn batch(keys: &[&str], physical: bool) -> Batch {
        Batch {
            keys: vec![keys.iter().map(|k| k.to_string()).collect()],
            values: vec![None; keys.len()],
            positions: (0..keys.len()).map(|i| at(0, i + 1)).collect(),
            end: Vec::new(),
            physical,
            in_key_order: physical,
            newer: Vec::new(),
            fetch_seconds: 0.0,
        }
    }

    #[test]
    fn split_keeps_repeated_keys_together() {
        assert_eq!(batch(&["1", "2", "3", "4"], false).split_point(), Some(2));
        // The middle falls inside the run of 2s: split after it.
        assert_eq!(
            batch(&["1", "2", "2", "2", "3"], false).split_point(),
            Some(4)
        );
        // No boundary after the middle: split before the run.
        assert_eq!(batch(&["1", "2", "2", "2"], false).split_point(), Some(1));
        assert_eq!(batch(&["5", "5", "5"], false).split_point(), None);
        assert_eq!(batch(&["5"], false).split_point(), None);
        // Row positions never repeat.
        assert_eq!(batch(&["5", "5", "5"], true).split_point(), Some(1));

        let (head, tail) = batch(&["1", "2", "2", "3"], false).split(3);
        assert_eq!(head.end, vec!["2".to_string()]);
        assert_eq!(tail.len(), 1);
    }

    fn classified(rows: usize, end: &str) -> ClassifiedBatch {
        let keys: Vec<String> = (1..=rows).map(|k| k.to_string()).collect();
        let mut batch = batch(&keys.iter().map(String::as_str).collect::<Vec<_>>(), true);
        batch.end = vec![end.to_string()];
        batch.values = keys.iter().map(|k| Some(format!("old {k}"))).collect();
        ClassifiedBatch {
            decisions: keys
                .iter()
                .map(|k| Decision {
                    outcome: Outcome::Reencrypted,
                    new_value: Some(format!("new {k}")),
                    old_key_index: Some(0),
                })
                .collect(),
            batch,
            crypto_seconds: 0.0,
            phase: Phase::Whole,
            read_rows: rows,
        }
    }

    #[test]
    fn window_phases_split_rows() {
        let window = classified(MIN_ROWS_FOR_PHASES + 1, "(9,0)");
        assert!(window.worth_phases(Pass::Main));
        assert!(!window.worth_phases(Pass::Sweep));
        assert!(!classified(MIN_ROWS_FOR_PHASES - 1, "(9,0)").worth_phases(Pass::Main));

        // Row 3 is under the new key already: it has nothing to write.
        let mut window = window;
        window.decisions[2] = Decision {
            outcome: Outcome::Current,
            new_value: None,
            old_key_index: None,
        };
        let phases = window.into_phases(3);
        assert_eq!(phases.len(), 3);
        let [first, second, last] = &phases[..] else {
            unreachable!()
        };
        for (number, phase) in phases.iter().enumerate() {
            assert_eq!(
                phase.phase,
                Phase::Part {
                    number: number + 1,
                    of: 3,
                    revisit: number > 0
                }
            );
            assert!(!phase.worth_phases(Pass::Main));
        }
        assert_eq!(first.phase.label(), "1/3");
        assert!(!first.phase.is_final());
        assert!(!second.phase.is_final());
        assert!(last.phase.is_final());
        // All rows are on one page. The 64 rows to rewrite go to the
        // phases by key, a third each, and row 3 goes last.
        assert_eq!(first.batch.keys[0][..3], ["1", "2", "4"]);
        assert_eq!(first.batch.len(), 22);
        assert_eq!(second.batch.keys[0][..3], ["24", "25", "26"]);
        assert_eq!(second.batch.len(), 21);
        assert_eq!(last.batch.keys[0][..3], ["3", "45", "46"]);
        assert_eq!(last.batch.len(), 22);
        assert_eq!(first.batch.positions[1], at(0, 2));
        assert_eq!(last.batch.positions[1], at(0, 45));
        assert!(first.decisions.iter().all(|d| d.new_value.is_some()));
        assert!(second.decisions.iter().all(|d| d.new_value.is_some()));
        let rows: usize = phases.iter().map(|p| p.batch.len()).sum();
        assert_eq!(rows, MIN_ROWS_FOR_PHASES + 1);
        // Each row keeps its own value and decision.
        for part in &phases {
            assert_eq!(part.decisions.len(), part.batch.len());
            for (row, key) in part.batch.keys[0].iter().enumerate() {
                assert_eq!(
                    part.batch.values[row].as_deref(),
                    Some(format!("old {key}").as_str())
                );
                let expected = (key != "3").then(|| format!("new {key}"));
                assert_eq!(part.decisions[row].new_value, expected);
            }
        }
        assert!(first.batch.end.is_empty());
        assert!(second.batch.end.is_empty());
        assert_eq!(last.batch.end, vec!["(9,0)".to_string()]);

        // A phase before the last, split after a timeout, still leaves the
        // position alone. The head of the last ends at its own last row.
        let mut phases = phases;
        let last = phases.pop().unwrap();
        let second = phases.pop().unwrap();
        let (head, tail) = second.split(10);
        assert!(head.batch.end.is_empty());
        assert!(tail.batch.end.is_empty());
        let (head, tail) = last.split(10);
        assert_eq!(head.batch.end, vec![head.batch.positions[9].to_string()]);
        assert_eq!(tail.batch.end, vec!["(9,0)".to_string()]);
    }

    #[test]
    fn phases_take_each_pages_lowest_keys_first() {
        let rewrite = Decision {
            outcome: Outcome::Reencrypted,
            new_value: Some("new".to_string()),
            old_key_index: Some(0),
        };
        let current = Decision {
            outcome: Outcome::Current,
            new_value: None,
            old_key_index: None,
        };
        // Page 7 contains six rows, one of them with nothing to write, and
        // page 8 contains three. Integer keys compare as numbers: 9 comes before 10.
        let mut window = batch(&["30", "10", "9", "50", "20", "40", "3", "1", "2"], true);
        window.positions = (1..=6)
            .map(|offset| at(7, offset))
            .chain((1..=3).map(|offset| at(8, offset)))
            .collect();
        let mut decisions = vec![rewrite.clone(); 9];
        decisions[5] = current;
        assert_eq!(
            phase_of_rows(&window, &decisions, 3),
            [1, 0, 0, 2, 1, 2, 2, 0, 1]
        );
        assert_eq!(phase_of_rows(&window, &decisions, 1), [0; 9]);

        // Text keys such as uuids compare byte by byte, column after column.
        let mut window = batch(&["b", "a", "a", "c"], true);
        window
            .keys
            .push(["x", "z", "y", "w"].map(String::from).to_vec());
        assert_eq!(phase_of_rows(&window, &vec![rewrite; 4], 4), [2, 1, 0, 3]);
    }

    #[test]
    fn larger_phases_come_first() {
        let sizes = |rows: usize, of: usize| {
            let mut sizes = vec![0; of];
            for rank in 0..rows {
                sizes[phase_of_rank(rank, rows, of)] += 1;
            }
            sizes
        };
        assert_eq!(sizes(43, 5), [9, 9, 9, 8, 8]);
        assert_eq!(sizes(43, 3), [15, 14, 14]);
        assert_eq!(sizes(40, 5), [8; 5]);
        assert_eq!(sizes(3, 5), [1, 1, 1, 0, 0]);
        assert_eq!(sizes(7, 1), [7]);
        // Ranks go to the phases in order.
        let phases: Vec<usize> = (0..11).map(|rank| phase_of_rank(rank, 11, 4)).collect();
        assert_eq!(phases, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]);
    }

    #[test]
    fn phases_sort_mixed_keys() {
        // Integers and other texts in one column, on one page: the sort
        // needs a total order, which comparing integers as numbers and the
        // rest as bytes, pair by pair, would not be ("2" < "10" < "10.5" <
        // "2").
        let mut keys: Vec<String> = (0..30).map(|i| ((i * 7) % 30).to_string()).collect();
        keys.extend((0..28).map(|i| format!("{i}.5")));
        keys.push("1234567890123456789012345678901234567890".to_string());
        keys.push("abc".to_string());
        let window = batch(&keys.iter().map(String::as_str).collect::<Vec<_>>(), true);
        let rewrite = Decision {
            outcome: Outcome::Reencrypted,
            new_value: Some("new".to_string()),
            old_key_index: Some(0),
        };
        let part_of = phase_of_rows(&window, &vec![rewrite; keys.len()], 2);
        // The 30 integers come first, so they make the first half.
        for (row, key) in keys.iter().enumerate() {
            let integer = key.parse::<i128>().is_ok();
            assert_eq!(part_of[row], usize::from(!integer), "{key}");
        }
    }

    #[test]
    fn empty_phases_are_left_out() {
        // One row on each page: every row goes to the first phase, and the
        // last, empty, keeps the window's end.
        let mut window = classified(MIN_ROWS_FOR_PHASES + 1, "(99,0)");
        window.batch.positions = (0..window.batch.len())
            .map(|page| at(u32::try_from(page).unwrap(), 1))
            .collect();
        let phases = window.into_phases(5);
        assert_eq!(phases.len(), 2);
        assert_eq!(phases[0].batch.len(), MIN_ROWS_FOR_PHASES + 1);
        assert_eq!(phases[0].phase.label(), "1/2");
        assert!(phases[0].batch.end.is_empty());
        assert_eq!(phases[1].batch.len(), 0);
        assert_eq!(phases[1].phase.label(), "2/2");
        assert!(phases[1].phase.is_final());
        assert_eq!(phases[1].batch.end, vec!["(99,0)".to_string()]);
    }

    #[test]
    fn timeout_halves_the_window() {
        let part = |number| Phase::Part {
            number,
            of: 5,
            revisit: false,
        };
        // A phase of a fifth of a 10,000-row window: the next window is half.
        assert_eq!(rows_after_timeout(part(1), 2000, 10_000, 10), 5000);
        // The head of that phase after a split timed out as well.
        assert_eq!(rows_after_timeout(part(1), 1000, 10_000, 10), 2500);
        // The last phase also contains the rows with nothing to write.
        assert_eq!(rows_after_timeout(part(5), 4000, 10_000, 10), 5000);
        assert_eq!(rows_after_timeout(Phase::Whole, 800, 800, 10), 400);
        assert_eq!(rows_after_timeout(Phase::Whole, 15, 15, 10), 10);
    }

    #[test]
    fn phases_depend_on_writers() {
        assert_eq!(phases_per_window(1), 5);
        assert_eq!(phases_per_window(2), 3);
        assert_eq!(phases_per_window(8), 3);
    }

    /// Builds a window of `phases` phases, tagged `tag` in `read_rows`.
    fn open_window(tag: usize, phases: usize) -> OpenWindow {
        let mut batch = classified(MIN_ROWS_FOR_PHASES + 1, &format!("({tag},0)"));
        batch.read_rows = tag;
        OpenWindow::new(batch, Pass::Main, tag as u64, phases)
    }

    /// Runs a schedule over `windows` as the writer does, splitting the
    /// parts whose write number is in `splits`, and returns each part
    /// written: its window's tag, its phase label and whether it was final.
    fn drive(writers: usize, windows: usize, splits: &[usize]) -> Vec<(usize, String, bool)> {
        let mut schedule = WriteSchedule::new(writers);
        let mut unread = 1..=windows;
        let mut written = Vec::new();
        let mut attempt = 0;
        loop {
            let Some(window) = schedule.next() else {
                let read = if schedule.has_room() {
                    unread.next().map(|tag| open_window(tag, schedule.phases))
                } else {
                    None
                };
                schedule.new_round(read);
                if schedule.is_empty() {
                    return written;
                }
                continue;
            };
            let part = window.parts.pop_front().unwrap();
            attempt += 1;
            if splits.contains(&attempt) {
                let half = part.batch.len() / 2;
                let (head, tail) = part.split(half);
                window.parts.push_front(tail);
                window.parts.push_front(head);
                continue;
            }
            window.begun = true;
            written.push((part.read_rows, part.phase.label(), part.phase.is_final()));
            schedule.written();
        }
    }

    #[test]
    fn schedule_puts_a_write_between_phases() {
        let order = |writers| -> Vec<String> {
            drive(writers, 4, &[])
                .into_iter()
                .map(|(tag, phase, _)| format!("{tag}:{phase}"))
                .collect()
        };
        assert_eq!(
            order(2),
            [
                "1:1/3", "1:2/3", "2:1/3", "1:3/3", "2:2/3", "3:1/3", "2:3/3", "3:2/3", "4:1/3",
                "3:3/3", "4:2/3", "4:3/3"
            ]
        );
        // A writer alone writes the five phases of each window one after another.
        let alone = order(1);
        assert_eq!(alone.len(), 20);
        assert_eq!(
            alone[..7],
            ["1:1/5", "1:2/5", "1:3/5", "1:4/5", "1:5/5", "2:1/5", "2:2/5"]
        );
        assert_eq!(alone[19], "4:5/5");
    }

    #[test]
    fn schedule_moves_positions_in_order_after_splits() {
        // Each case lists the write attempts to split: with two writers the
        // 4th is the first window's last phase and the 5th its head. A writer
        // alone writes five phases, so [5, 6] splits its first window's last
        // phase and then that phase's head.
        let cases = [
            vec![4],
            vec![4, 5],
            vec![4, 5, 9],
            vec![2, 3, 7],
            vec![5, 6],
        ];
        for (writers, splits) in [1, 2]
            .into_iter()
            .flat_map(|w| cases.clone().map(|s| (w, s)))
        {
            let written = drive(writers, 5, &splits);
            let number = |label: &str| label.split('/').next().unwrap().parse::<usize>().unwrap();
            let of = phases_per_window(writers);
            let labels: Vec<String> = (1..=of).map(|number| format!("{number}/{of}")).collect();
            let last_write = |tag: usize| written.iter().rposition(|(t, _, _)| *t == tag).unwrap();
            for (row, (tag, phase, last)) in written.iter().enumerate() {
                // A window's phases come in order.
                let earlier = written[..row].iter().filter(|(t, _, _)| t == tag);
                assert!(
                    earlier.clone().all(|(_, p, _)| number(p) <= number(phase)),
                    "{splits:?}: phase {phase} of window {tag} out of order: {written:?}"
                );
                // A last phase waits for every older window to end.
                if *last {
                    assert!(
                        (1..*tag).all(|older| last_write(older) < row),
                        "{splits:?}: window {tag} wrote {phase} before an older window ended: {written:?}"
                    );
                }
            }
            // Every phase was written, and a split one twice, once per half.
            for tag in 1..=5 {
                let phases: Vec<&str> = written
                    .iter()
                    .filter(|(t, _, _)| *t == tag)
                    .map(|(_, phase, _)| phase.as_str())
                    .collect();
                assert!(
                    labels.iter().all(|p| phases.contains(&p.as_str())),
                    "{splits:?}: window {tag} wrote {phases:?}"
                );
                assert!(phases.len() <= of + splits.len(), "{splits:?}: {phases:?}");
            }
            assert_eq!(written.len(), 5 * of + splits.len(), "{splits:?}");
        }
    }

    #[test]
    fn schedule_stop_finishes_windows_begun() {
        let mut schedule = WriteSchedule::new(2);
        schedule.new_round(Some(open_window(1, 3)));
        let window = schedule.next().unwrap();
        window.parts.pop_front();
        window.begun = true;
        schedule.written();
        assert!(schedule.next().is_none());
        schedule.new_round(Some(open_window(2, 3)));
        // Window 1 writes its second phase, and window 2 has not begun.
        let window = schedule.next().unwrap();
        window.parts.pop_front();
        schedule.written();
        schedule.drop_unbegun();
        let mut left = Vec::new();
        loop {
            let Some(window) = schedule.next() else {
                if schedule.is_empty() {
                    break;
                }
                schedule.new_round(None);
                continue;
            };
            let part = window.parts.pop_front().unwrap();
            left.push((part.read_rows, part.phase.label()));
            schedule.written();
        }
        assert_eq!(left, [(1, "3/3".to_string())]);
    }
}
