//! Concurrency and pacing end to end: several writers in one process, several
//! shard processes on one job, the throttles, and tables with fewer rows than
//! key ranges. Every test runs the real binary against a fresh database and
//! reads every row back under the new key.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{output_text, run_command, KeyFile, TestDb};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::keys::Key;

/// The table every test rotates: a uuid key, the encrypted value, and the
/// plaintext it must read as, kept beside it for the checks.
const TARGET: &str = "creds.secret";

/// Creates `creds` with `rows` values under `old`, in one INSERT.
async fn fill_uuid(db: &TestDb, rows: usize, old: &Key) {
    db.exec(
        "CREATE TABLE creds (id uuid PRIMARY KEY, secret text NOT NULL, plaintext text NOT NULL)",
    )
    .await;
    let plaintexts: Vec<String> = (0..rows).map(|i| format!("sk_live_{i:08}")).collect();
    let secrets: Vec<String> = plaintexts
        .iter()
        .map(|plaintext| encrypt_string(old, plaintext))
        .collect();
    sqlx::query(
        "INSERT INTO creds (id, secret, plaintext) \
         SELECT gen_random_uuid(), s, p FROM unnest($1::text[], $2::text[]) AS u(s, p)",
    )
    .bind(&secrets)
    .bind(&plaintexts)
    .execute(&db.pool)
    .await
    .unwrap();
    db.exec("ANALYZE creds").await;
}

/// Number of rows whose value reads as its plaintext under `key`.
async fn rows_readable_under(db: &TestDb, key: &Key) -> usize {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT secret, plaintext FROM creds")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    rows.iter()
        .filter(|(secret, plaintext)| {
            decrypt_to_string(key, secret)
                .as_deref()
                .map(String::as_str)
                == Some(plaintext.as_str())
        })
        .count()
}

/// Asserts that all `rows` rows read as their plaintext under the new key.
async fn assert_all_rotated(db: &TestDb, rows: usize, new: &Key) {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM creds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count as usize, rows, "rows in the table");
    assert_eq!(
        rows_readable_under(db, new).await,
        rows,
        "rows that read as their plaintext under the new key"
    );
}

/// One row of `reencrypt.ranges`, with the table's own count of the rows
/// between its bounds.
#[derive(Debug)]
struct RangeRow {
    index: i32,
    status: String,
    rows_scanned: i64,
    reencrypted: i64,
    sweep_reencrypted: i64,
    rows_within_bounds: i64,
}

async fn ranges(db: &TestDb) -> Vec<RangeRow> {
    let rows: Vec<(i32, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.range_index, r.status, r.rows_scanned, r.reencrypted, r.sweep_reencrypted, \
                (SELECT count(*) FROM creds c \
                  WHERE (r.lower_key IS NULL OR c.id > r.lower_key[1]::uuid) \
                    AND (r.upper_key IS NULL OR c.id <= r.upper_key[1]::uuid)) \
         FROM reencrypt.ranges r ORDER BY r.range_index",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|row| RangeRow {
            index: row.0,
            status: row.1,
            rows_scanned: row.2,
            reencrypted: row.3,
            sweep_reencrypted: row.4,
            rows_within_bounds: row.5,
        })
        .collect()
}

/// Asserts that the ranges split the table without overlap and that each
/// scanned and rotated exactly the rows between its bounds.
fn assert_each_row_counted_once(ranges: &[RangeRow], rows: usize, expected_ranges: usize) {
    assert_eq!(ranges.len(), expected_ranges, "ranges: {ranges:#?}");
    let bounded: i64 = ranges.iter().map(|r| r.rows_within_bounds).sum();
    let scanned: i64 = ranges.iter().map(|r| r.rows_scanned).sum();
    let rotated: i64 = ranges.iter().map(|r| r.reencrypted).sum();
    let swept: i64 = ranges.iter().map(|r| r.sweep_reencrypted).sum();
    assert_eq!(
        bounded, rows as i64,
        "the ranges overlap or leave gaps: {ranges:#?}"
    );
    assert_eq!(scanned, rows as i64, "sum of rows_scanned: {ranges:#?}");
    assert_eq!(rotated, rows as i64, "sum of reencrypted: {ranges:#?}");
    assert_eq!(
        swept, 0,
        "the sweep found rows the main pass missed: {ranges:#?}"
    );
    for range in ranges {
        assert_eq!(range.status, "done", "range {}", range.index);
        assert_eq!(
            range.rows_scanned, range.rows_within_bounds,
            "range {} scanned rows outside its bounds",
            range.index
        );
    }
}

async fn job_status(db: &TestDb) -> String {
    sqlx::query_scalar("SELECT status FROM reencrypt.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Runs to completion and returns the exit code, the parsed `--format json`
/// summary, the full output for messages, and the wall time.
fn run_json(command: &mut Command) -> (i32, serde_json::Value, String, Duration) {
    let started = Instant::now();
    let output = command.arg("--format").arg("json").output().unwrap();
    let elapsed = started.elapsed();
    let code = output.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (code, json, output_text(&output), elapsed)
}

fn counts(summary: &serde_json::Value) -> HashMap<String, i64> {
    summary["targets"][0]["counts"]
        .as_object()
        .unwrap_or_else(|| panic!("no counts in {summary}"))
        .iter()
        .map(|(name, value)| (name.clone(), value.as_i64().unwrap()))
        .collect()
}

fn rotate(db: &TestDb, old: &KeyFile, new: &KeyFile) -> Command {
    run_command(db, &[TARGET], &[&old.path], &new.path)
}

#[tokio::test]
async fn four_writers_rotate_each_row_once() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 20_000;
    fill_uuid(&db, rows, &old.key).await;

    // A fixed batch size gives every writer several batches to interleave.
    let (code, summary, text, _) =
        run_json(rotate(&db, &old, &new).args(["--writers", "4", "--batch-size", "1000"]));
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary);
    assert_eq!(counts["rows_scanned"], rows as i64, "{text}");
    assert_eq!(counts["reencrypted"], rows as i64, "{text}");
    assert_eq!(counts["conflicts"], 0, "{text}");
    assert_eq!(summary["job_finished"], true, "{text}");

    let ranges = ranges(&db).await;
    assert_each_row_counted_once(&ranges, rows, 4);
    for range in &ranges {
        // Split points come from row positions, so each range contains a quarter.
        assert_eq!(range.rows_within_bounds, 5000, "range {}", range.index);
    }
    assert_all_rotated(&db, rows, &new.key).await;
    assert_eq!(rows_readable_under(&db, &old.key).await, 0);
}

#[tokio::test]
async fn three_concurrent_shards_finish_the_job() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 6000;
    fill_uuid(&db, rows, &old.key).await;

    let children: Vec<_> = (0..3)
        .map(|shard| {
            rotate(&db, &old, &new)
                .args(["--shard-count", "3", "--shard-index", &shard.to_string()])
                .args(["--batch-size", "500", "--format", "json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    for (shard, output) in outputs.iter().enumerate() {
        assert_eq!(
            output.status.code(),
            Some(0),
            "shard {shard}: {}",
            output_text(output)
        );
    }
    // Whichever shard ended last saw every range done.
    let finished_flags: Vec<bool> = outputs
        .iter()
        .map(|output| {
            let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            summary["job_finished"].as_bool().unwrap()
        })
        .collect();
    assert!(
        finished_flags.contains(&true),
        "no shard reported the job finished: {finished_flags:?}"
    );

    assert_each_row_counted_once(&ranges(&db).await, rows, 3);
    assert_eq!(job_status(&db).await, "finished");
    assert_all_rotated(&db, rows, &new.key).await;
}

#[tokio::test]
async fn job_finishes_only_after_the_last_shard() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill_uuid(&db, rows, &old.key).await;

    // Kubernetes Indexed Jobs pass the shard in JOB_COMPLETION_INDEX. The
    // shards run out of order and one at a time, so each step can be checked.
    let mut done_rows = 0;
    for (step, shard) in ["2", "0", "1"].into_iter().enumerate() {
        let (code, summary, text, _) = run_json(
            rotate(&db, &old, &new)
                .args(["--shard-count", "3"])
                .env("JOB_COMPLETION_INDEX", shard),
        );
        assert_eq!(code, 0, "shard {shard}: {text}");

        let ranges = ranges(&db).await;
        let mine = &ranges[shard.parse::<usize>().unwrap()];
        assert_eq!(mine.status, "done", "shard {shard}: {ranges:#?}");
        assert_eq!(mine.rows_scanned, mine.rows_within_bounds, "shard {shard}");
        done_rows += mine.rows_within_bounds as usize;
        assert_eq!(
            rows_readable_under(&db, &new.key).await,
            done_rows,
            "after shard {shard}, only the finished shards' rows are rotated"
        );

        let last = step == 2;
        assert_eq!(summary["job_finished"], last, "shard {shard}: {text}");
        let expected_status = if last { "finished" } else { "running" };
        assert_eq!(
            job_status(&db).await,
            expected_status,
            "after shard {shard}"
        );
    }
    assert_each_row_counted_once(&ranges(&db).await, rows, 3);
    assert_all_rotated(&db, rows, &new.key).await;
}

#[tokio::test]
async fn layout_change_needs_restart() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 900;
    fill_uuid(&db, rows, &old.key).await;

    let output = rotate(&db, &old, &new)
        .args(["--shard-count", "2", "--shard-index", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));

    // Another shard count or writer count would split the key space differently.
    for (changed, expected) in [
        (
            ["--shard-count", "3", "--writers", "1"],
            "different shard count",
        ),
        (
            ["--shard-count", "2", "--writers", "2"],
            "different number of writers",
        ),
    ] {
        let output = rotate(&db, &old, &new)
            .args(changed)
            .args(["--shard-index", "1"])
            .output()
            .unwrap();
        let text = output_text(&output);
        assert_eq!(output.status.code(), Some(2), "{changed:?}: {text}");
        assert!(text.contains(expected), "{changed:?}: {text}");
        assert!(text.contains("--restart"), "{changed:?}: {text}");
    }
    let ranges_before = ranges(&db).await;
    assert_eq!(ranges_before.len(), 2, "a refused run changes no range");
    assert_eq!(
        ranges_before[1].rows_scanned, 0,
        "a refused run scans nothing"
    );

    // --restart on one shard discards the old layout, and the others join the new one.
    for shard in 0..3 {
        let mut command = rotate(&db, &old, &new);
        command.args(["--shard-count", "3", "--shard-index", &shard.to_string()]);
        if shard == 0 {
            command.arg("--restart");
        }
        let output = command.output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "shard {shard}: {}",
            output_text(&output)
        );
    }
    let ranges_after = ranges(&db).await;
    assert_eq!(ranges_after.len(), 3);
    let scanned: i64 = ranges_after.iter().map(|r| r.rows_scanned).sum();
    let within: i64 = ranges_after.iter().map(|r| r.rows_within_bounds).sum();
    assert_eq!(scanned, rows as i64, "{ranges_after:#?}");
    assert_eq!(within, rows as i64, "{ranges_after:#?}");
    assert_eq!(job_status(&db).await, "finished");
    assert_all_rotated(&db, rows, &new.key).await;
}

#[tokio::test]
async fn rate_limit_bounds_rows_per_second() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 4000;
    fill_uuid(&db, rows, &old.key).await;

    // 20 batches of 200 at 2000 rows/s: the last one may end 2 s in.
    let (code, summary, text, elapsed) = run_json(rotate(&db, &old, &new).args([
        "--max-rows-per-second",
        "2000",
        "--batch-size",
        "200",
        "--max-sweeps",
        "0",
    ]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(counts(&summary)["reencrypted"], rows as i64, "{text}");
    assert!(
        elapsed >= Duration::from_millis(1500),
        "4000 rows at 2000 rows/s took only {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "4000 rows at 2000 rows/s took {elapsed:?}"
    );
    assert_all_rotated(&db, rows, &new.key).await;
}

#[tokio::test]
async fn rate_limit_holds_from_the_start() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill_uuid(&db, rows, &old.key).await;

    // 3 batches of 1000 at 1000 rows/s: each waits for its own second, the
    // first one too, so no second has more than 1000 rows.
    let (code, summary, text, elapsed) = run_json(rotate(&db, &old, &new).args([
        "--max-rows-per-second",
        "1000",
        "--batch-size",
        "1000",
        "--max-sweeps",
        "0",
    ]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(counts(&summary)["reencrypted"], rows as i64, "{text}");
    assert!(
        elapsed >= Duration::from_millis(2900),
        "3000 rows at 1000 rows/s took only {elapsed:?}"
    );
}

#[tokio::test]
async fn pause_between_batches_is_applied() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 1000;
    fill_uuid(&db, rows, &old.key).await;

    let (code, summary, text, elapsed) = run_json(rotate(&db, &old, &new).args([
        "--pause-between-batches-ms",
        "150",
        "--batch-size",
        "100",
        "--max-sweeps",
        "0",
    ]));
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary);
    assert_eq!(counts["reencrypted"], rows as i64, "{text}");
    assert_eq!(counts["batches"], 10, "{text}");
    assert!(
        elapsed >= Duration::from_millis(1500),
        "10 batches with 150 ms pauses took only {elapsed:?}"
    );
    assert_all_rotated(&db, rows, &new.key).await;
}

#[tokio::test]
async fn replication_lag_limit_without_replicas() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 1000;
    fill_uuid(&db, rows, &old.key).await;

    // A wait for lag lasts at least 5 s and logs "Throttling." at debug level.
    let (code, summary, text, elapsed) = run_json(
        rotate(&db, &old, &new)
            .args(["--max-replication-lag-secs", "5", "--batch-size", "100"])
            .env("RUST_LOG", "reencrypt=debug"),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(counts(&summary)["reencrypted"], rows as i64, "{text}");
    assert!(
        !text.contains("Could not read replication lag"),
        "the lag query failed: {text}"
    );
    assert!(
        !text.contains("replication_lag"),
        "the run waited for replicas: {text}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "without replicas the run took {elapsed:?}"
    );
    assert_all_rotated(&db, rows, &new.key).await;

    let output = rotate(&db, &old, &new)
        .args(["--max-replication-lag-secs", "-1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", output_text(&output));
}

#[tokio::test]
async fn more_writers_than_rows() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3;
    fill_uuid(&db, rows, &old.key).await;

    let (code, summary, text, _) = run_json(rotate(&db, &old, &new).args(["--writers", "8"]));
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary);
    assert_eq!(counts["rows_scanned"], rows as i64, "{text}");
    assert_eq!(counts["reencrypted"], rows as i64, "{text}");
    assert_each_row_counted_once(&ranges(&db).await, rows, 8);
    assert_eq!(job_status(&db).await, "finished");
    assert_all_rotated(&db, rows, &new.key).await;
}

#[tokio::test]
async fn empty_table_finishes() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill_uuid(&db, 0, &old.key).await;

    let (code, summary, text, _) = run_json(rotate(&db, &old, &new).args(["--writers", "4"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(counts(&summary)["rows_scanned"], 0, "{text}");
    assert_eq!(summary["job_finished"], true, "{text}");
    assert_each_row_counted_once(&ranges(&db).await, 0, 4);
    assert_eq!(job_status(&db).await, "finished");
}
