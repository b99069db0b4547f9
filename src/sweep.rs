//! The plan of the final sweeps: which key spans a sweep reads whole, and
//! which only for rows changed since the pass read them.
//!
//! A row's `xmin` names the transaction that wrote its current version. A
//! row whose version is older than a horizon taken before the pass is the
//! version the pass read and decided. A row written by one of the pass's own
//! batch transactions still has the value the pass wrote. Every other row may have
//! changed behind the pass, and the sweep reads it again. This holds only
//! while the table and the server stay as they were, so the sweep reads
//! every row when [`TableState::allows_filter_since`] refuses.

use std::sync::Arc;

use crate::checkpoint::RangeRecord;
use crate::db::Database;
use crate::pipeline::{ChangedSince, RangeWork};

/// Transactions from the horizon to the newest one must stay within this
/// distance, well inside the 2^31 over which `age()` compares 32-bit IDs.
const MAX_XID_DISTANCE: i64 = 1 << 30;

/// Before PostgreSQL 15 the list of writers is searched row by row. Past
/// this length the sweep reads every row instead.
/// NOTE: an estimate, not measured; only PostgreSQL 15 was available to test.
const MAX_WRITERS_UNHASHED: usize = 1000;

/// The facts a filtered sweep relies on, read in one query before the pass
/// and again before each sweep round.
#[derive(Debug, Clone)]
pub struct TableState {
    /// The oldest transaction that may not be visible yet (snapshot `xmin`), 64-bit.
    pub horizon: i64,
    /// The next transaction to start (snapshot `xmax`), 64-bit.
    pub frontier: i64,
    /// The transactions running then (snapshot `xip`), 64-bit.
    pub running: Vec<i64>,
    /// `pg_postmaster_start_time()`: a restart or a failover can undo
    /// commits the pass saw acknowledged, and reuse their IDs.
    server_started: String,
    server_version: i32,
    /// The target and every table below it (inheritance or partitions), by OID.
    relations: String,
    /// Each of those tables' file: a rewrite (`VACUUM FULL`, `CLUSTER`,
    /// `TRUNCATE`, some `ALTER TABLE`) gives it a new one and moves every row.
    files: String,
    /// The reason rows' `xmin` cannot be trusted for this table, if any.
    unsuitable: Option<String>,
}

impl TableState {
    /// Reads the state of the target's table now.
    pub async fn read(db: &Database, quoted_table: &str) -> Result<TableState, sqlx::Error> {
        let mut tx = db.begin_read_only().await?;
        let row: (i64, i64, Vec<i64>, String, i32, String, String, bool, bool) =
            sqlx::query_as(STATE_QUERY)
                .bind(quoted_table)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        let (
            horizon,
            frontier,
            running,
            server_started,
            server_version,
            relations,
            files,
            storage,
            effects,
        ) = row;
        let unsuitable = if storage {
            Some("a table below the target is foreign or not stored in heap format".into())
        } else if effects {
            Some("the table has triggers or rules, which may change other rows in the same transaction".into())
        } else {
            None
        };
        Ok(TableState {
            horizon,
            frontier,
            running,
            server_started,
            server_version,
            relations,
            files,
            unsuitable,
        })
    }

    /// Returns why rows' `xmin` cannot be trusted for this table, if so.
    pub fn unsuitable(&self) -> Option<&str> {
        self.unsuitable.as_deref()
    }

    /// Tells whether the server is the same one as when `since` was read, and
    /// has not restarted since.
    pub fn same_server(&self, since: &TableState) -> bool {
        self.server_started == since.server_started
    }

    /// Returns the horizon as the 32-bit ID that a row's `xmin` contains.
    pub fn horizon_xid(&self) -> u32 {
        crate::pipeline::xid32(self.horizon)
    }

    /// Checks that a sweep now may read only rows changed since `since`, the
    /// state before the pass, with the given writers. Returns the reason
    /// when it may not.
    pub fn allows_filter_since(&self, since: &TableState, writers: usize) -> Result<(), String> {
        if let Some(reason) = since.unsuitable.as_ref().or(self.unsuitable.as_ref()) {
            return Err(reason.clone());
        }
        if !self.same_server(since) {
            return Err("the server restarted or changed since the pass began".into());
        }
        if self.relations != since.relations {
            return Err(
                "tables were attached to or detached from the target since the pass began".into(),
            );
        }
        if self.files != since.files {
            return Err(
                "the table was rewritten since the pass began, which moves its rows".into(),
            );
        }
        if self.frontier - since.horizon >= MAX_XID_DISTANCE {
            return Err(
                "too many transactions ran since the pass began to compare their IDs".into(),
            );
        }
        if self.server_version < 150_000 && writers > MAX_WRITERS_UNHASHED {
            return Err(format!(
                "before PostgreSQL 15, more than {MAX_WRITERS_UNHASHED} batch transactions are too many to look up row by row"
            ));
        }
        Ok(())
    }
}

/// The state query. It reads the horizon, frontier and running transactions
/// of a fresh snapshot, the server's start time and version, and the tables of the target. Each
/// table comes with the `xmin` of its inheritance link, which changes when it
/// is detached and attached again, and with its file. It also reports whether any table is stored
/// outside heap tables, and whether any has a trigger or rule that could
/// write other rows in a batch's transaction.
/// Only the triggers that enforce foreign keys without changing rows, and
/// the recheck of deferred unique constraints, are known to be harmless.
/// Before PostgreSQL 15 a trigger cloned from a partitioned parent is marked
/// internal, so `tgisinternal` cannot tell them apart.
const STATE_QUERY: &str = "\
WITH RECURSIVE tree AS ( \
  SELECT $1::text::regclass::oid AS oid, '' AS link \
  UNION SELECT i.inhrelid, i.xmin::text FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid \
) \
SELECT txid_snapshot_xmin(txid_current_snapshot()), \
       txid_snapshot_xmax(txid_current_snapshot()), \
       ARRAY(SELECT txid_snapshot_xip(txid_current_snapshot())), \
       pg_postmaster_start_time()::text, \
       current_setting('server_version_num')::int, \
       (SELECT string_agg(oid::text || '/' || link, ',' ORDER BY oid, link) FROM tree), \
       (SELECT string_agg(oid::text || '/' || coalesce(pg_relation_filenode(oid)::text, ''), ',' ORDER BY oid) FROM tree), \
       EXISTS (SELECT 1 FROM tree JOIN pg_class c ON c.oid = tree.oid \
               WHERE c.relkind NOT IN ('r', 'p') \
                  OR (c.relkind = 'r' AND c.relam <> (SELECT oid FROM pg_am WHERE amname = 'heap'))), \
       EXISTS (SELECT 1 FROM pg_trigger g JOIN tree ON g.tgrelid = tree.oid \
               WHERE g.tgfoid NOT IN ( \
                 '\"RI_FKey_check_ins\"'::regproc, '\"RI_FKey_check_upd\"'::regproc, \
                 '\"RI_FKey_noaction_del\"'::regproc, '\"RI_FKey_noaction_upd\"'::regproc, \
                 '\"RI_FKey_restrict_del\"'::regproc, '\"RI_FKey_restrict_upd\"'::regproc, \
                 '\"RI_FKey_cascade_del\"'::regproc, '\"RI_FKey_setnull_del\"'::regproc, \
                 '\"RI_FKey_setdefault_del\"'::regproc, 'unique_key_recheck'::regproc)) \
         OR EXISTS (SELECT 1 FROM pg_rewrite r JOIN tree ON r.ev_class = tree.oid)";

/// One range's pass in this process: where it started and which
/// transactions wrote its batches.
pub struct RangePassed {
    pub range_index: i32,
    pub start: Option<Vec<String>>,
    pub writers: Vec<u32>,
}

/// The part of one target that this process's pass covered, for its sweeps.
pub struct PassRecord {
    /// The table before the pass read anything.
    pub before: TableState,
    /// Why a sweep could not filter, once one could not: from then on every
    /// round reads the whole target, since the pass's writers may have done
    /// more than the pass while the reason held.
    unfiltered_reason: Option<String>,
    /// Taken before the pass, then before each sweep round.
    pub horizon: TableState,
    /// This process's transactions that wrote rows of the target.
    pub writers: Vec<u32>,
    /// The ranges this process passed over, and the key each pass started
    /// after: rows from there to the range's end were read after the horizon.
    pub started_from: Vec<(i32, Option<Vec<String>>)>,
}

impl PassRecord {
    pub fn new(before: TableState) -> PassRecord {
        PassRecord {
            horizon: before.clone(),
            before,
            unfiltered_reason: None,
            writers: Vec::new(),
            started_from: Vec::new(),
        }
    }

    /// Checks that the sweep round about to start may read only changed
    /// rows, given the table's state `now`; returns the reason when it may not.
    pub fn may_filter(&mut self, now: &TableState) -> Result<(), String> {
        if self.unfiltered_reason.is_none() {
            if let Err(reason) = now.allows_filter_since(&self.before, self.writers.len()) {
                self.unfiltered_reason = Some(reason);
            }
        }
        match &self.unfiltered_reason {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    pub fn add(&mut self, passed: RangePassed) {
        self.started_from.push((passed.range_index, passed.start));
        self.writers.extend(passed.writers);
    }

    /// Moves the horizon to `now`, taken before a sweep round, and adds the
    /// round's writers.
    pub fn advance(&mut self, now: TableState, writers: impl IntoIterator<Item = u32>) {
        self.horizon = now;
        self.writers.extend(writers);
        self.writers.sort_unstable();
        self.writers.dedup();
    }
}

/// Lists the parts of this shard's key space a sweep round reads.
///
/// When `filter` holds, the key spans this process has read since the
/// horizon are read only for changed rows, in one part over the whole shard.
/// On the first round every other span is read whole:
/// - a range passed by an earlier process, whose sweep never ran;
/// - the part of a resumed range before the resume point;
/// - in the last range, keys past the bound fixed when the job started
///   (rows inserted since then, maybe before the horizon).
///
/// Without `filter`, every range is read whole.
pub fn parts(
    label: &str,
    mine: &[RangeRecord],
    total_ranges: usize,
    record: &PassRecord,
    first_round: bool,
    filter: bool,
) -> Vec<RangeWork> {
    let is_last = |range: &RangeRecord| range.range_index as usize == total_ranges - 1;
    // A range other than the last one has no upper bound only when the table
    // was empty at the job's start, so the last range covers its keys.
    let reaches = |range: &RangeRecord| is_last(range) || range.upper_key.is_some();
    let end = |range: &RangeRecord| {
        if is_last(range) {
            None
        } else {
            range.upper_key.clone()
        }
    };
    let work =
        |range: &RangeRecord, after: Option<Vec<String>>, upper: Option<Vec<String>>| RangeWork {
            target_label: label.to_string(),
            range_index: range.range_index,
            after,
            upper,
            changed_since: None,
            physical: None,
        };

    let mut parts = Vec::new();
    if !filter {
        for range in mine.iter().filter(|r| reaches(r)) {
            parts.push(work(range, range.lower_key.clone(), end(range)));
        }
        return parts;
    }
    if first_round {
        for range in mine.iter().filter(|r| reaches(r)) {
            let start = record
                .started_from
                .iter()
                .find(|(index, _)| *index == range.range_index)
                .map(|(_, start)| start.clone());
            match start {
                None => parts.push(work(range, range.lower_key.clone(), end(range))),
                Some(start) => {
                    if start != range.lower_key {
                        parts.push(work(range, range.lower_key.clone(), start));
                    }
                    if is_last(range) && range.upper_key.is_some() {
                        parts.push(work(range, range.upper_key.clone(), None));
                    }
                }
            }
        }
    }
    // With nothing passed by this process, the first round reads every
    // range whole, and a filtered scan would add nothing.
    let nothing_passed = first_round && record.started_from.is_empty();
    if let (Some(first), Some(last)) = (mine.first(), mine.last()) {
        if reaches(last) && !nothing_passed {
            let mut changed = work(first, first.lower_key.clone(), end(last));
            changed.changed_since = Some(Arc::new(ChangedSince {
                horizon: record.horizon.horizon_xid(),
                writers: record.writers.clone(),
            }));
            parts.push(changed);
        }
    }
    parts
}

/// Lists the parts a sweep round reads after a pass in physical order.
///
/// Row positions do not follow keys, so the sweep reads the whole key
/// space in one part. With `filter`, it reads only changed rows. On the
/// first round that needs this process to have passed over every range
/// from its start, or else the round reads every row. The caller clears
/// `filter` when the ranges' bounds were read before the horizon.
pub fn physical_parts(
    label: &str,
    mine: &[RangeRecord],
    record: &PassRecord,
    first_round: bool,
    filter: bool,
) -> Vec<RangeWork> {
    let Some(first) = mine.first() else {
        return Vec::new();
    };
    let passed_all = mine.iter().all(|range| {
        record
            .started_from
            .iter()
            .any(|(index, start)| *index == range.range_index && *start == range.lower_key)
    });
    let changed_since = (filter && (passed_all || !first_round)).then(|| {
        Arc::new(ChangedSince {
            horizon: record.horizon.horizon_xid(),
            writers: record.writers.clone(),
        })
    });
    vec![RangeWork {
        target_label: label.to_string(),
        range_index: first.range_index,
        after: None,
        upper: None,
        changed_since,
        physical: None,
    }]
}
