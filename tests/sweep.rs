//! The final sweep: after a pass, it reads again only the rows that changed
//! since the pass read them, and reads whole every key span this process did
//! not pass over itself.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{first_target_count, output_text, run_command, run_json, KeyFile, TestDb};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::keys::Key;

/// Fills `t` (bigint key `id`, text `secret`) with old-key values.
async fn fill(db: &TestDb, rows: i64, old: &Key) {
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, secret text NOT NULL)")
        .await;
    let ids: Vec<i64> = (1..=rows).collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| encrypt_string(old, &plaintext(*id)))
        .collect();
    sqlx::query("INSERT INTO t SELECT * FROM unnest($1::int8[], $2::text[])")
        .bind(&ids)
        .bind(&values)
        .execute(&db.pool)
        .await
        .unwrap();
}

fn plaintext(id: i64) -> String {
    format!("the plaintext of row number {id:06}")
}

/// Writes `plaintext` under `key` into row `id`, inserting it if missing.
async fn put(db: &TestDb, id: i64, key: &Key, plaintext: &str) {
    sqlx::query(
        "INSERT INTO t VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET secret = EXCLUDED.secret",
    )
    .bind(id)
    .bind(encrypt_string(key, plaintext))
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Asserts every row reads under the new key as `expected(id)`.
async fn assert_reads(db: &TestDb, new: &Key, rows: i64, expected: impl Fn(i64) -> String) {
    let after = db.values("t", "id", "secret").await;
    assert_eq!(after.len() as i64, rows);
    for (id, value) in after {
        let id: i64 = id.parse().unwrap();
        let read = decrypt_to_string(new, value.as_deref().unwrap());
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(expected(id).as_str()),
            "row {id}"
        );
    }
}

/// Counts the sweep's committed batches in a debug log in JSON.
fn sweep_batches(stderr: &[u8]) -> usize {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|line| line.contains("Batch committed.") && line.contains("Sweep"))
        .count()
}

#[tokio::test]
async fn sweep_reads_nothing_when_nothing_changed() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill(&db, rows, &old.key).await;

    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--batch-size", "100", "--writers", "2", "--format", "json"])
        .args(["--log-format", "json", "--progress", "off"])
        .env("RUST_LOG", "reencrypt=debug")
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(first_target_count(&summary, "reencrypted"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "sweep_reencrypted"), 0);
    assert_eq!(summary["sweeps"], 1, "{text}");
    // Every row now carries the ID of the batch that wrote it, so the sweep
    // of changed rows finds none (reading them all would take 30 batches).
    assert_eq!(sweep_batches(&output.stderr), 0, "{text}");
    assert_reads(&db, &new.key, rows, plaintext).await;
}

#[tokio::test]
async fn sweep_after_a_resume_reads_what_an_earlier_run_passed() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 4000;
    fill(&db, rows, &old.key).await;

    // The first run stops part-way through both of its ranges.
    let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--batch-size", "100", "--writers", "2"])
        .args(["--max-rows-per-second", "1500", "--progress", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4));
    let passed: Vec<(i32, Option<Vec<String>>)> =
        sqlx::query_as("SELECT range_index, last_key FROM reencrypt.ranges ORDER BY range_index")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let first_of = |range: usize| -> i64 {
        match range {
            0 => 1,
            _ => rows / 2 + 1,
        }
    };
    for (index, last_key) in &passed {
        let last: i64 = last_key.as_ref().expect("each range wrote a batch")[0]
            .parse()
            .unwrap();
        assert!(
            last > first_of(*index as usize) && last < rows,
            "range {index} stopped part-way, at {last}"
        );
    }

    // Between the runs, the application writes under the old key where the
    // first run already passed, and past the highest key the job started with.
    let behind = [1, rows / 2 + 1];
    for id in behind {
        put(&db, id, &old.key, &format!("rewritten {id}")).await;
    }
    put(&db, rows + 1, &old.key, "inserted past the end").await;

    let (code, summary, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).args(["--writers", "2"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        first_target_count(&summary, "sweep_reencrypted"),
        3,
        "the two rows behind the resume points and the inserted one: {text}"
    );
    assert_eq!(summary["sweep_last_found"], 0, "{text}");
    assert_reads(&db, &new.key, rows + 1, |id| {
        if behind.contains(&id) {
            format!("rewritten {id}")
        } else if id == rows + 1 {
            "inserted past the end".to_string()
        } else {
            plaintext(id)
        }
    })
    .await;
}

#[tokio::test]
async fn sweep_reads_whole_ranges_passed_by_an_earlier_run() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 600;
    fill(&db, rows, &old.key).await;

    // A run with no sweep finishes the pass; the application then writes
    // under the old key before a second run of the same job.
    let (code, _, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--job",
            "twice",
            "--max-sweeps",
            "0",
        ]),
    );
    assert_eq!(code, 0, "{text}");
    put(&db, 300, &old.key, "rewritten after the pass").await;

    let (code, summary, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).args(["--job", "twice"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        first_target_count(&summary, "sweep_reencrypted"),
        1,
        "{text}"
    );
    assert_reads(&db, &new.key, rows, |id| {
        if id == 300 {
            "rewritten after the pass".to_string()
        } else {
            plaintext(id)
        }
    })
    .await;
}

#[tokio::test]
async fn sweep_reads_every_row_of_a_table_with_triggers() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill(&db, rows, &old.key).await;
    // A trigger may write other rows inside the batch's transaction, which
    // would then carry a batch's ID without holding what the batch wrote.
    db.exec(
        "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'; \
         CREATE TRIGGER keep BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION keep()",
    )
    .await;

    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--batch-size", "100", "--format", "json"])
        .args(["--log-format", "json", "--progress", "off"])
        .env("RUST_LOG", "reencrypt=debug")
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("triggers or rules"), "{text}");
    assert_eq!(sweep_batches(&output.stderr), 30, "{text}");
    assert_reads(&db, &new.key, rows, plaintext).await;
}

#[tokio::test]
async fn sweep_reads_every_row_after_a_table_joins_the_target() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill(&db, rows, &old.key).await;
    // A table filled before the run, with a key the pass will have passed
    // when the table joins the target as a child.
    db.exec("CREATE TABLE late (id bigint NOT NULL, secret text NOT NULL)")
        .await;
    sqlx::query("INSERT INTO late VALUES (0, $1)")
        .bind(encrypt_string(&old.key, "the plaintext of the late row"))
        .execute(&db.pool)
        .await
        .unwrap();

    let mut command = run_command(&db, &["t.secret"], &[&old.path], &new.path);
    command.args(["--batch-size", "100", "--max-rows-per-second", "1500"]);
    command.args(["--progress", "off", "--format", "json"]);
    command.env("RUST_LOG", "reencrypt=info");
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    db.exec("ALTER TABLE late INHERIT t").await;
    let output = child.wait_with_output().unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("attached to or detached"), "{text}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        first_target_count(&summary, "sweep_reencrypted"),
        1,
        "{text}"
    );

    let late: String = sqlx::query_scalar("SELECT secret FROM ONLY late WHERE id = 0")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        decrypt_to_string(&new.key, &late)
            .as_deref()
            .map(String::as_str),
        Some("the plaintext of the late row")
    );
}
