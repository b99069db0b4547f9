//! The pass in physical order (`--scan-order physical`): it reads the table
//! block by block, counts each row once, and sweeps every row after a resume.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_reads, fill, first_target_count, last_block, plaintext, put, run_command, run_json,
    KeyFile, TestDb,
};
use reencrypt::db::{Database, Timeouts};
use reencrypt::position::RowPosition;
use reencrypt::sweep::TableState;
use tokio::sync::Mutex;

/// Physical order with one writer, which writes each window in five phases.
const PHYSICAL: [&str; 4] = ["--scan-order", "physical", "--writers", "1"];

/// Physical order with the writers `--writers auto` gives.
const PHYSICAL_AUTO: [&str; 2] = ["--scan-order", "physical"];

/// Deletes the last third of `t` and vacuums it, so that the free space is
/// in blocks ahead of the pass: rows the pass rewrites move there.
async fn free_space_ahead(db: &TestDb, rows: i64) -> i64 {
    let remaining = rows * 2 / 3;
    db.exec(&format!("DELETE FROM t WHERE id > {remaining}"))
        .await;
    db.exec("VACUUM t").await;
    remaining
}

/// Deletes every row of the first block but row 1 and vacuums, so that row
/// 1 can be rewritten twice and stay in that block. A fill factor of 50 keeps
/// half of every block for updates of its own rows, so rows moved from other
/// blocks cannot take that room. Returns the rows left.
async fn empty_first_block(db: &TestDb) -> i64 {
    db.exec("DELETE FROM t WHERE (ctid::text::point)[0] = 0 AND id <> 1")
        .await;
    db.exec("ALTER TABLE t SET (fillfactor = 50)").await;
    db.exec("VACUUM t").await;
    sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn pass_reads_each_row_once(writers: &str) {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 6000, &old.key).await;
    let rows = free_space_ahead(&db, 6000).await;
    let before = last_block(&db).await;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(PHYSICAL_AUTO)
            .args(["--batch-size", "200", "--writers", writers]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "rows_scanned"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "current"), 0, "{text}");
    assert_eq!(
        first_target_count(&summary, "sweep_reencrypted"),
        0,
        "{text}"
    );
    assert_eq!(summary["sweep_last_found"], 0, "{text}");
    assert_reads(&db, &new.key, rows, plaintext).await;
    // The rewritten rows went to the free space past the rows first read,
    // so the pass came upon them again and had to leave them.
    let moved: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM t WHERE (ctid::text::point)[0] > {before}"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(moved > 0, "no row moved past block {before}");
}

#[tokio::test]
async fn physical_pass_counts_rows_once() {
    pass_reads_each_row_once("1").await;
}

#[tokio::test]
async fn physical_pass_with_writers() {
    pass_reads_each_row_once("3").await;
}

#[tokio::test]
async fn physical_pass_with_concurrent_writes() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 4000;
    fill(&db, rows, &old.key).await;

    let child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(PHYSICAL)
        .args(["--batch-size", "100", "--max-rows-per-second", "2000"])
        .args(["--progress", "off", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Meanwhile the application rewrites rows under the old key, ahead of
    // the pass and behind it, and inserts new ones.
    let written: Arc<Mutex<HashMap<i64, String>>> = Arc::default();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_millis(1200) {
        round += 1;
        for id in [
            1 + round * 37 % rows,
            rows - round * 53 % rows,
            rows + round,
        ] {
            let value = format!("rewritten {id} in round {round}");
            put(&db, id, &old.key, &value).await;
            written.lock().await.insert(id, value);
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let output = child.wait_with_output().unwrap();
    let text = common::output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");

    let written = written.lock().await.clone();
    let total = rows + round;
    assert_reads(&db, &new.key, total, |id| {
        written.get(&id).cloned().unwrap_or_else(|| plaintext(id))
    })
    .await;
}

#[tokio::test]
async fn physical_resume_sweeps_every_row() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 6000, &old.key).await;
    // Rows the first run rewrites move ahead of its stopping point, where
    // the second run meets them again. Room in the first block lets row 1
    // stay there when it is rewritten, behind the stopping point.
    let remaining = free_space_ahead(&db, 6000).await;
    let rows = empty_first_block(&db).await;

    // The first run stops part-way.
    let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(PHYSICAL)
        .args(["--batch-size", "100", "--max-rows-per-second", "1500"])
        .args(["--progress", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::terminate(&child);
    assert_eq!(child.wait().unwrap().code(), Some(4));
    let last: Option<Vec<String>> =
        sqlx::query_scalar("SELECT last_key FROM reencrypt.ranges WHERE range_index = 0")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let last = last.expect("the first run committed a batch");
    assert!(
        last[0].starts_with('(') && last[0] != "(0,0)",
        "the checkpoint is a row position: {last:?}"
    );
    let rotated: i64 =
        sqlx::query_scalar("SELECT rows_scanned FROM reencrypt.ranges WHERE range_index = 0")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(rotated > 0, "the first run rotated nothing");
    assert!(
        rotated < rows,
        "the first run did not stop part-way: {rotated}"
    );

    // Between the runs the application writes under the old key, where the
    // first run passed and past the end of the table.
    put(&db, 1, &old.key, "rewritten 1").await;
    put(&db, remaining + 1, &old.key, "inserted past the end").await;
    let block: i64 =
        sqlx::query_scalar("SELECT (ctid::text::point)[0]::bigint FROM t WHERE id = 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(block, 0, "row 1 stays behind the stopping point");

    let (code, summary, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).args(PHYSICAL));
    assert_eq!(code, 0, "{text}");
    // The rewritten row and the inserted one are rotated by the pass when
    // they landed ahead of the resume point, by the sweep otherwise. The
    // rows the first run rewrote are not counted again.
    assert_eq!(
        first_target_count(&summary, "rows_scanned")
            + first_target_count(&summary, "sweep_reencrypted"),
        rows + 2,
        "{text}"
    );
    assert_eq!(first_target_count(&summary, "current"), 0, "{text}");
    assert_reads(&db, &new.key, rows + 1, |id| match id {
        1 => "rewritten 1".to_string(),
        id if id == remaining + 1 => "inserted past the end".to_string(),
        id => plaintext(id),
    })
    .await;
}

#[tokio::test]
async fn physical_order_refuses_what_it_cannot_do() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 50, &old.key).await;
    db.exec(
        "CREATE TABLE p (id bigint PRIMARY KEY, secret text) PARTITION BY RANGE (id); \
         CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)",
    )
    .await;
    let rejected = |target: &str, args: &[&str], expected: &str| {
        let (code, _, text) = run_json(
            run_command(&db, &[target], &[&old.path], &new.path)
                .args(PHYSICAL)
                .args(args),
        );
        assert_eq!(code, 2, "{text}");
        assert!(text.contains(expected), "expected {expected:?} in {text}");
    };
    rejected(
        "p.secret",
        &[],
        "public.p.secret is partitioned or has child tables",
    );
    rejected("t.secret", &["--shard-count", "2"], "runs as one shard");
    rejected(
        "t.secret",
        &["--max-sweeps", "0"],
        "--max-sweeps of 1 or more",
    );

    // A job keeps the order it started with.
    let (code, _, text) = run_json(&mut run_command(
        &db,
        &["t.secret"],
        &[&old.path],
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    rejected("t.secret", &[], "was started with --scan-order key");
    assert_reads(&db, &new.key, 50, plaintext).await;
}

#[tokio::test]
async fn table_state_detects_rewrite() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    fill(&db, 100, &old.key).await;
    let timeouts = Timeouts {
        lock_timeout_ms: 5000,
        statement_timeout_ms: 30_000,
        idle_in_transaction_timeout_ms: 60_000,
    };
    let database = Database::connect_lazy(&db.url, 1, timeouts).unwrap();
    let before = TableState::read(&database, "public.t").await.unwrap();
    assert_eq!(
        TableState::read(&database, "public.t")
            .await
            .unwrap()
            .allows_filter_since(&before, 1),
        Ok(())
    );
    db.exec("VACUUM FULL t").await;
    let after = TableState::read(&database, "public.t").await.unwrap();
    let reason = after.allows_filter_since(&before, 1).unwrap_err();
    assert!(reason.contains("rewritten"), "{reason}");
}

#[tokio::test]
async fn physical_pass_crosses_empty_blocks() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 6000, &old.key).await;
    // A mass delete leaves a long run of empty blocks between the rows.
    db.exec("DELETE FROM t WHERE id BETWEEN 101 AND 5900").await;
    db.exec("VACUUM t").await;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(PHYSICAL)
            .args(["--batch-size", "50"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "rows_scanned"), 200, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), 200, "{text}");
    assert_reads(&db, &new.key, 200, plaintext).await;
}

#[tokio::test]
async fn physical_resume_sweeps_with_writers() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 4000;
    fill(&db, rows, &old.key).await;
    // Room in the first block keeps row 1 there when it is rewritten,
    // behind where the first run stopped.
    let remaining = empty_first_block(&db).await;

    let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(PHYSICAL_AUTO)
        .args(["--writers", "2", "--batch-size", "100"])
        .args(["--max-rows-per-second", "1500", "--progress", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::terminate(&child);
    assert_eq!(child.wait().unwrap().code(), Some(4));

    // Between the runs, rows at both ends and in the middle of the key
    // space change under the old key.
    let changed = [1, rows / 2, rows, rows + 1];
    for id in changed {
        put(&db, id, &old.key, &format!("changed {id}")).await;
    }
    let block: i64 =
        sqlx::query_scalar("SELECT (ctid::text::point)[0]::bigint FROM t WHERE id = 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(block, 0, "row 1 stays behind where the first run stopped");

    // The second run's sweep reads every row, split by key among 2 writers.
    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(PHYSICAL_AUTO)
            .args(["--writers", "2"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(summary["sweep_last_found"], 0, "{text}");
    assert_reads(&db, &new.key, remaining + 1, |id| {
        if changed.contains(&id) {
            format!("changed {id}")
        } else {
            plaintext(id)
        }
    })
    .await;
}

#[tokio::test]
async fn dry_run_order_and_rejections() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 50, &old.key).await;
    db.exec(
        "CREATE TABLE p (id bigint PRIMARY KEY, secret text) PARTITION BY RANGE (id); \
         CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)",
    )
    .await;
    let dry_run = |target: &str, args: &[&str]| {
        run_json(
            run_command(&db, &[target], &[&old.path], &new.path)
                .arg("--dry-run")
                .args(args),
        )
    };
    let order_of = |args: &[&str]| {
        let (code, plan, text) = dry_run("t.secret", args);
        assert_eq!(code, 0, "{text}");
        plan["targets"][0]["scan_order"]
            .as_str()
            .unwrap_or_else(|| panic!("no scan_order in {text}"))
            .to_string()
    };
    // The table fits the server's cache, so `auto` takes key order, and
    // `--writers auto` one writer.
    assert_eq!(order_of(&[]), "key");
    let writers_of = |args: &[&str]| {
        let (code, plan, text) = dry_run("t.secret", args);
        assert_eq!(code, 0, "{text}");
        plan["writers"]
            .as_i64()
            .unwrap_or_else(|| panic!("no writers in {text}"))
    };
    assert_eq!(writers_of(&[]), 1);
    assert_eq!(writers_of(&["--writers", "auto"]), 1);
    assert_eq!(writers_of(&PHYSICAL_AUTO), 2);
    // A pause after each batch applies to each writer, so `auto` keeps one.
    let paused = [
        "--scan-order",
        "physical",
        "--pause-between-batches-ms",
        "5",
    ];
    assert_eq!(writers_of(&paused), 1);
    assert_eq!(writers_of(&["--writers", "3"]), 3);
    let (_, plan, text) = dry_run("t.secret", &[]);
    let reason = plan["targets"][0]["scan_order_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("for 2 times shared_buffers"), "{text}");
    // With several writers, physical order pays on a smaller table.
    let (code, plan, text) = dry_run("t.secret", &["--writers", "2"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(plan["targets"][0]["scan_order"], "key", "{text}");
    let reason = plan["targets"][0]["scan_order_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("for 1.2 times shared_buffers"), "{text}");
    assert_eq!(order_of(&["--scan-order", "key"]), "key");
    assert_eq!(order_of(&PHYSICAL_AUTO), "physical");

    // `plan` shows the order a run with no order options would take.
    let output = common::binary()
        .args(["plan", "--database-url", &db.url, "--target", "t.secret"])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let header = text
        .lines()
        .find(|line| line.contains("pass order"))
        .unwrap_or_else(|| panic!("no order column in {text}"));
    let row = text
        .lines()
        .skip_while(|line| *line != header)
        .find(|line| line.contains("public.t.secret"))
        .unwrap_or_else(|| panic!("no paging row in {text}"));
    assert!(row.contains(" key "), "{row}");
    assert!(
        text.contains("A new job with the default options has 1 writer per target."),
        "{text}"
    );

    // The environment takes the order in any case.
    let (code, plan, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .arg("--dry-run")
            .env("REENCRYPT_SCAN_ORDER", "Physical"),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(plan["targets"][0]["scan_order"], "physical", "{text}");
    assert_eq!(plan["writers"], 2, "{text}");

    // A dry run rejects what the run would reject, with the same exit code.
    let rejected = |target: &str, args: &[&str], expected: &str| {
        let (code, _, text) = dry_run(target, args);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains(expected), "expected {expected:?} in {text}");
    };
    rejected(
        "p.secret",
        &PHYSICAL_AUTO,
        "is partitioned or has child tables",
    );
    rejected(
        "t.secret",
        &["--scan-order", "physical", "--shard-count", "2"],
        "runs as one shard",
    );
    rejected(
        "t.secret",
        &["--scan-order", "physical", "--max-sweeps", "0"],
        "--max-sweeps of 1 or more",
    );
    rejected("t.secret", &["--writers", "0"], "--writers must be between");
    rejected(
        "t.secret",
        &["--writers", "65"],
        "--writers must be between",
    );
    rejected(
        "t.secret",
        &["--writers", "two"],
        "expected a number from 1 to 64 or auto",
    );
    rejected(
        "t.secret",
        &["--shard-count", "2", "--shard-index", "2"],
        "--shard-index must be below --shard-count",
    );
    rejected("t.secret", &["--job", " "], "--job must not be empty");
    rejected("t.secret", &["--lease-ttl-secs", "1"], "--lease-ttl-secs");
    rejected(
        "t.secret",
        &["--pushgateway-url", "gateway:9091"],
        "invalid --pushgateway-url",
    );
    // The run would serve metrics on the address, so one in use is rejected.
    let in_use = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = in_use.local_addr().unwrap().to_string();
    let output = common::binary()
        .args([
            "run",
            "--dry-run",
            "--database-url",
            &db.url,
            "--target",
            "t.secret",
        ])
        .args(["--metrics-listen", &address, "--old-key-file"])
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .output()
        .unwrap();
    let text = common::output_text(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("cannot serve metrics"), "{text}");
    drop(in_use);

    let schema: Option<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname = 'reencrypt'")
            .fetch_optional(&db.pool)
            .await
            .unwrap();
    assert_eq!(schema, None, "a dry run created the checkpoint schema");

    // Once a job exists, a dry run shows the order its pass started with,
    // and rejects the options the run would reject to resume it with. With
    // physical order, `--writers auto` gave the job 2 writers, which a
    // resume without `--writers` keeps.
    let (code, _, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).args(PHYSICAL_AUTO));
    assert_eq!(code, 0, "{text}");
    let (code, plan, text) = dry_run("t.secret", &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(plan["writers"], 2, "{text}");
    assert_eq!(plan["targets"][0]["scan_order"], "physical", "{text}");
    assert_eq!(
        plan["targets"][0]["scan_order_reason"], "the job's ranges were made for this order",
        "{text}"
    );
    assert_eq!(plan["command"], "run --dry-run", "{text}");
    assert!(
        plan["resumes_job"]
            .as_str()
            .is_some_and(|job| job.starts_with("rotate-")),
        "{text}"
    );
    rejected(
        "t.secret",
        &["--scan-order", "key"],
        "was started with --scan-order physical",
    );
    rejected(
        "t.secret",
        &["--writers", "1"],
        "different number of writers",
    );
    rejected("t.secret", &["--max-sweeps", "0"], "which needs the sweep");
    let other = KeyFile::generate();
    let (code, _, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path, &other.path], &new.path).arg("--dry-run"),
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("different set of old keys"), "{text}");
    // A new job, under another name, takes the order `auto` chooses.
    let (code, plan, text) = dry_run("t.secret", &["--job", "another"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(plan["targets"][0]["scan_order"], "key", "{text}");
    assert_eq!(plan["resumes_job"], serde_json::Value::Null, "{text}");
    assert_eq!(plan["writers"], 1, "{text}");

    // A job started with one writer in physical order keeps it when a run
    // leaves `--writers` to `auto`.
    let job = ["--job", "one-writer"];
    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(PHYSICAL_AUTO)
            .args(job)
            .args(["--writers", "1"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(summary["key_fingerprints"]["writers"], 1, "{text}");
    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(PHYSICAL_AUTO)
            .args(job),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(summary["job"], "one-writer", "{text}");
    assert_eq!(summary["key_fingerprints"]["writers"], 1, "{text}");
    let ranges: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reencrypt.ranges WHERE job = 'one-writer'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(ranges, 1);

    // A job with more writers than `auto` gives a new one keeps them too.
    let job = ["--job", "four-writers"];
    let (code, _, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(job)
            .args(["--writers", "4"]),
    );
    assert_eq!(code, 0, "{text}");
    let (code, summary, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).args(job));
    assert_eq!(code, 0, "{text}");
    assert_eq!(summary["key_fingerprints"]["writers"], 4, "{text}");
    assert_reads(&db, &new.key, 50, plaintext).await;
}

/// Checks that a run counted each of `rows` rows once: `current` of them
/// under the new key already, the others rotated.
fn assert_exact_counts(summary: &serde_json::Value, text: &str, rows: i64, current: i64) {
    assert_eq!(first_target_count(summary, "rows_scanned"), rows, "{text}");
    assert_eq!(first_target_count(summary, "current"), current, "{text}");
    assert_eq!(
        first_target_count(summary, "reencrypted"),
        rows - current,
        "{text}"
    );
}

#[tokio::test]
async fn physical_pass_counts_rows_older_than_its_start() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows: i64 = 400;
    fill(&db, rows, &old.key).await;
    // A session that took a transaction ID before the rows below were
    // written, and keeps its transaction open through the run: the oldest
    // running transaction is then older than those rows.
    let mut older = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT txid_current()")
        .execute(&mut older)
        .await
        .unwrap();
    for id in (4..=rows).step_by(4) {
        put(&db, id, &new.key, &plaintext(id)).await;
    }
    let current = rows / 4;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(PHYSICAL)
            .args(["--batch-size", "100"]),
    );
    sqlx::raw_sql("ROLLBACK").execute(&mut older).await.unwrap();
    assert_eq!(code, 0, "{text}");
    assert_exact_counts(&summary, &text, rows, current);
    assert_reads(&db, &new.key, rows, plaintext).await;
}

#[tokio::test]
async fn physical_order_ignores_dropped_child() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 50, &old.key).await;
    // PostgreSQL keeps the parent's `relhassubclass` set after the last
    // child is gone, until the next VACUUM or ANALYZE.
    db.exec("CREATE TABLE t_child () INHERITS (t); DROP TABLE t_child")
        .await;

    let (code, summary, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).args(PHYSICAL));
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), 50, "{text}");
    assert_reads(&db, &new.key, 50, plaintext).await;
}

/// Waits until the job's ranges of `target` have counted at least `rows`.
async fn wait_for_scanned(db: &TestDb, target: &str, rows: i64) {
    let started = Instant::now();
    loop {
        let scanned: Option<i64> = sqlx::query_scalar(
            "SELECT sum(rows_scanned)::int8 FROM reencrypt.ranges WHERE target = $1",
        )
        .bind(target)
        .fetch_one(&db.pool)
        .await
        .unwrap_or(None);
        if scanned.unwrap_or(0) >= rows {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the pass over {target} did not reach {rows} rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn physical_pass_counts_moved_row_once() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 6000, &old.key).await;
    // Rows 1 to 100 under the new key fill the first blocks, which the pass
    // then reads without writing to them. Free space lies in blocks in the
    // middle of the table, ahead of the pass.
    let current = 100;
    for id in 1..=current {
        put(&db, id, &new.key, &plaintext(id)).await;
    }
    db.exec("CLUSTER t USING t_pkey").await;
    db.exec("DELETE FROM t WHERE id BETWEEN 3001 AND 4500")
        .await;
    db.exec("VACUUM t").await;
    let rows = 4500;

    // An application transaction that began before the pass.
    let mut application = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT txid_current()")
        .execute(&mut application)
        .await
        .unwrap();
    let child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(PHYSICAL)
        .args(["--batch-size", "100", "--max-rows-per-second", "2000"])
        .args(["--progress", "off", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the pass has read row 1, the application rewrites it as it is.
    // The first block has no room, so its new version goes ahead of the pass.
    wait_for_scanned(&db, "public.t.secret", 300).await;
    let block_of_row_1 = || async {
        sqlx::query_scalar::<_, i64>("SELECT ((ctid::text::point)[0])::int8 FROM t WHERE id = 1")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(block_of_row_1().await, 0);
    sqlx::raw_sql("UPDATE t SET secret = secret WHERE id = 1; COMMIT")
        .execute(&mut application)
        .await
        .unwrap();
    let moved_to = block_of_row_1().await;
    assert!(moved_to > 0, "row 1 stayed in the first block");

    let output = child.wait_with_output().unwrap();
    let text = common::output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_exact_counts(&summary, &text, rows, current);
    assert_reads(&db, &new.key, rows, plaintext).await;
}

#[tokio::test]
async fn physical_pass_never_started_counts_every_row() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows: i64 = 3000;
    // Two encrypted columns of one table. Room on every page keeps the
    // rewrites of the first column's pass on their pages.
    db.exec("CREATE TABLE u (id bigint PRIMARY KEY, a text, b text) WITH (fillfactor = 40)")
        .await;
    let ids: Vec<i64> = (1..=rows).collect();
    let a: Vec<String> = ids
        .iter()
        .map(|id| reencrypt::classify::encrypt_string(&old.key, &plaintext(*id)))
        .collect();
    // Every other value of `b` is under the new key already.
    let b: Vec<String> = ids
        .iter()
        .map(|id| {
            let key = if id % 2 == 0 { &new.key } else { &old.key };
            reencrypt::classify::encrypt_string(key, &plaintext(*id))
        })
        .collect();
    sqlx::query("INSERT INTO u SELECT * FROM unnest($1::int8[], $2::text[], $3::text[])")
        .bind(&ids)
        .bind(&a)
        .bind(&b)
        .execute(&db.pool)
        .await
        .unwrap();
    db.exec("VACUUM ANALYZE u").await;

    // The first run stops during the pass over `a`, before the pass over `b`.
    let targets = ["u.a", "u.b"];
    let mut child = run_command(&db, &targets, &[&old.path], &new.path)
        .args(PHYSICAL)
        .args(["--batch-size", "100", "--max-rows-per-second", "1500"])
        .args(["--progress", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_scanned(&db, "public.u.a", 300).await;
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(4));

    let (code, summary, text) =
        run_json(run_command(&db, &targets, &[&old.path], &new.path).args(PHYSICAL));
    assert_eq!(code, 0, "{text}");
    let count = |target: usize, name: &str| summary["targets"][target]["counts"][name].as_i64();
    assert_eq!(count(0, "rows_scanned"), Some(rows), "{text}");
    assert_eq!(count(0, "reencrypted"), Some(rows), "{text}");
    assert_eq!(count(1, "rows_scanned"), Some(rows), "{text}");
    assert_eq!(count(1, "current"), Some(rows / 2), "{text}");
    assert_eq!(count(1, "reencrypted"), Some(rows / 2), "{text}");
}

#[tokio::test]
async fn resume_with_other_unique_key_rejected() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 200, &old.key).await;
    db.exec(
        "ALTER TABLE t ADD COLUMN id2 bigint; UPDATE t SET id2 = -id; \
             ALTER TABLE t ALTER COLUMN id2 SET NOT NULL; CREATE UNIQUE INDEX t_id2 ON t (id2)",
    )
    .await;
    // A job in key order, paged by the primary key.
    let (code, _, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args(["--scan-order", "key"]),
    );
    assert_eq!(code, 0, "{text}");

    // Its ranges hold values of `id`: paging them by `id2` would skip rows.
    for dry_run in [&[][..], &["--dry-run"][..]] {
        let (code, _, text) = run_json(
            run_command(&db, &["t.secret"], &[&old.path], &new.path)
                .args(["--unique-key", "t=id2"])
                .args(dry_run),
        );
        assert_eq!(code, 2, "{dry_run:?}: {text}");
        assert!(text.contains("pages public.t.secret by (id)"), "{text}");
    }
}

/// Keys that mix integers and other texts in one column, in random order on
/// the pages: each window's rows are dealt to its writes by key, and every
/// row is rotated once.
#[tokio::test]
async fn physical_pass_with_mixed_text_keys() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec("CREATE TABLE m (code text PRIMARY KEY, secret text NOT NULL)")
        .await;
    let rows: i64 = 3000;
    let code = |i: i64| match i % 3 {
        0 => i.to_string(),
        1 => format!("{i}.5"),
        _ => format!("c-{i}"),
    };
    let codes: Vec<String> = (0..rows).map(code).collect();
    let values: Vec<String> = (0..rows)
        .map(|i| reencrypt::classify::encrypt_string(&old.key, &plaintext(i)))
        .collect();
    sqlx::query(
        "INSERT INTO m SELECT * FROM unnest($1::text[], $2::text[]) AS u(code, secret) ORDER BY random()",
    )
    .bind(&codes)
    .bind(&values)
    .execute(&db.pool)
    .await
    .unwrap();
    db.exec("VACUUM ANALYZE m").await;

    let (code, summary, text) = run_json(
        run_command(&db, &["m.secret"], &[&old.path], &new.path)
            .args(PHYSICAL)
            .args(["--batch-size", "1000"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "rows_scanned"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), rows, "{text}");
    // The windows were written in phases, several per window.
    assert!(first_target_count(&summary, "batches") > 3, "{text}");

    let stored: Vec<(String, String)> = sqlx::query_as("SELECT code, secret FROM m")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored.len() as i64, rows);
    for (code, secret) in stored {
        let i = codes.iter().position(|c| *c == code).unwrap() as i64;
        let read = reencrypt::classify::decrypt_to_string(&new.key, &secret).map(|p| p.to_string());
        assert_eq!(read.as_deref(), Some(plaintext(i).as_str()), "{code}");
    }
}

/// Row positions travel in PostgreSQL's binary form. Positions with the
/// smallest and largest values of both fields read back as PostgreSQL
/// writes them, alone and in an array.
#[tokio::test]
async fn row_positions_match_postgresql() {
    let db = TestDb::new().await;
    let positions = [
        RowPosition {
            block: 0,
            offset: 1,
        },
        RowPosition {
            block: u32::MAX,
            offset: u16::MAX,
        },
        RowPosition {
            block: 70_000,
            offset: 291,
        },
    ];
    for position in positions {
        let text: String = sqlx::query_scalar("SELECT $1::tid::text")
            .bind(position)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(text, position.to_string());
        let read: RowPosition = sqlx::query_scalar("SELECT $1::text::tid")
            .bind(position.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(read, position);
    }
    let texts: Vec<String> = sqlx::query_scalar("SELECT p::text FROM unnest($1::tid[]) AS p")
        .bind(positions.to_vec())
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(texts, ["(0,1)", "(4294967295,65535)", "(70000,291)"]);
}
