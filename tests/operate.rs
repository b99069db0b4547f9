//! Operating a rotation end to end: `plan`, `verify`, `status`, `reset`,
//! `release`, the evidence record, and the final sweep of `run`. Each test
//! runs the real binary against a fresh PostgreSQL database.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    binary, encrypt_only_under, load_vectors, output_text, run_command, scan_command, KeyFile,
    TestDb, AMBIGUOUS_UNDER_A_AND_B,
};
use reencrypt::classify::{decrypt_to_string, encrypt_string, Keyring, Outcome};
use reencrypt::keys::Key;

const TARGET: &str = "public.creds.secret";

/// Runs a command with `--format json`; returns the exit code, the parsed
/// standard output and the whole output for failure messages.
/// A range's status and last checkpointed key.
type RangeCheckpoint = (String, Option<Vec<String>>);

fn json_output(command: &mut Command) -> (i32, serde_json::Value, String) {
    let output = command.arg("--format").arg("json").output().unwrap();
    let text = output_text(&output);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (output.status.code().unwrap_or(-1), json, text)
}

/// Runs a command as it is; returns the exit code and the whole output.
fn plain_output(command: &mut Command) -> (i32, String) {
    let output = command.stdin(Stdio::null()).output().unwrap();
    (output.status.code().unwrap_or(-1), output_text(&output))
}

/// `reencrypt <subcommand>` with only a database, for the job commands.
fn job_command(subcommand: &str, db: &TestDb) -> Command {
    let mut command = binary();
    command.arg(subcommand).arg("--database-url").arg(&db.url);
    command
}

fn number(value: &serde_json::Value, field: &str) -> i64 {
    value[field]
        .as_i64()
        .unwrap_or_else(|| panic!("no number {field} in {value}"))
}

/// Encrypts under `stranger` until the keyring cannot read the value. A wrong
/// key passes the padding check now and then, so one draw is not enough.
fn undecryptable_value(keyring: &Keyring, stranger: &Key, plaintext: &str) -> String {
    loop {
        let value = encrypt_string(stranger, plaintext);
        if keyring.classify(Some(&value)).outcome == Outcome::Undecryptable {
            return value;
        }
    }
}

/// Expected counts of a mixed table, as a read-only scan names them.
struct Mixed {
    old_key: i64,
    current: i64,
    null: i64,
    not_in_format: i64,
    undecryptable: i64,
    ambiguous: i64,
}

impl Mixed {
    fn rows(&self) -> i64 {
        self.old_key
            + self.current
            + self.null
            + self.not_in_format
            + self.undecryptable
            + self.ambiguous
    }
}

/// Creates `creds (id int PRIMARY KEY, secret text)` with old-key, current,
/// NULL, plaintext and undecryptable rows, and one ambiguous row when
/// `ambiguous` is given. Ids are 1, 2, ... in that order.
async fn mixed_table(db: &TestDb, old: &Key, new: &Key, ambiguous: Option<&str>) -> Mixed {
    db.exec("CREATE TABLE creds (id int PRIMARY KEY, secret text)")
        .await;
    let keyring = Keyring::new(new.clone(), vec![old.clone()]);
    let stranger = Key::generate();

    let mut values: Vec<Option<String>> = Vec::new();
    for i in 0..30 {
        values.push(Some(encrypt_string(old, &format!("old-plaintext-{i:06}"))));
    }
    for i in 0..5 {
        values.push(Some(encrypt_string(new, &format!("new-{i}"))));
    }
    values.extend([None, None, None]);
    values.push(Some("plain text".into()));
    values.push(Some("not:base64!".into()));
    for i in 0..2 {
        values.push(Some(undecryptable_value(
            &keyring,
            &stranger,
            &format!("stranger-{i}"),
        )));
    }
    if let Some(value) = ambiguous {
        values.push(Some(value.to_string()));
    }

    for (index, value) in values.iter().enumerate() {
        sqlx::query("INSERT INTO creds VALUES ($1, $2)")
            .bind(index as i32 + 1)
            .bind(value)
            .execute(&db.pool)
            .await
            .unwrap();
    }

    Mixed {
        old_key: 30,
        current: 5,
        null: 3,
        not_in_format: 2,
        undecryptable: 2,
        ambiguous: i64::from(ambiguous.is_some()),
    }
}

/// Returns pg_dump's path: the version-15 one when present, because pg_dump
/// must not be older than the server (15 on the machines this runs on).
fn pg_dump() -> String {
    let versioned = "/usr/lib/postgresql/15/bin/pg_dump";
    if Path::new(versioned).exists() {
        versioned.to_string()
    } else {
        "pg_dump".to_string()
    }
}

/// Everything in the database that a write could change: pg_dump's full
/// output (schemas, tables, rows, sequences) and whether the worker's
/// schema exists. Recent pg_dump minor releases write `\restrict` lines with a
/// random token per dump, so those lines are left out.
async fn snapshot(db: &TestDb) -> Vec<String> {
    let output = Command::new(pg_dump())
        .arg("--dbname")
        .arg(&db.url)
        .arg("--no-owner")
        .output()
        .expect("pg_dump must be installed");
    assert!(
        output.status.success(),
        "pg_dump failed: {}",
        output_text(&output)
    );
    let schema: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('reencrypt')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut lines = vec![format!("reencrypt schema: {schema:?}")];
    lines.extend(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.starts_with("\\restrict") && !line.starts_with("\\unrestrict"))
            .map(str::to_string),
    );
    lines
}

/// Asserts that two snapshots are equal, showing only the lines that differ.
fn assert_same_snapshot(before: &[String], after: &[String], message: &str) {
    let removed: Vec<&String> = before.iter().filter(|line| !after.contains(line)).collect();
    let added: Vec<&String> = after.iter().filter(|line| !before.contains(line)).collect();
    assert!(
        before == after,
        "{message}\nlines gone: {removed:#?}\nlines new: {added:#?}"
    );
}

async fn schema_exists(db: &TestDb) -> bool {
    sqlx::query_scalar("SELECT to_regnamespace('reencrypt') IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test]
async fn plan_leaves_database_unchanged() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = mixed_table(&db, &old.key, &new.key, None).await;
    let before = snapshot(&db).await;
    assert_eq!(before[0], "reencrypt schema: None");

    let (code, text) = plain_output(&mut scan_command(
        "plan",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("nothing was written"), "{text}");
    assert!(
        text.contains("creds_pkey"),
        "the index used for paging: {text}"
    );
    let (code, _, text) = json_output(
        scan_command("plan", &db, &[TARGET], &old.path, &new.path)
            .arg("--sample")
            .arg("10"),
    );
    assert_eq!(code, 0, "{text}");
    let (code, plan, text) =
        json_output(run_command(&db, &[TARGET], &[&old.path], &new.path).arg("--dry-run"));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        number(&plan["total"], "old_key"),
        expected.old_key,
        "{text}"
    );
    // Options that would write are rejected, not ignored.
    let report = tempfile::tempdir().unwrap();
    let report_path = report.path().join("report.json");
    for extra in [
        vec!["--restart".to_string()],
        vec!["--report".to_string(), report_path.display().to_string()],
    ] {
        let (code, _, text) = json_output(
            run_command(&db, &[TARGET], &[&old.path], &new.path)
                .arg("--dry-run")
                .args(&extra),
        );
        assert_eq!(code, 2, "{extra:?}: {text}");
        assert!(text.contains("--dry-run writes nothing"), "{text}");
    }
    assert!(!report_path.exists());

    assert_same_snapshot(
        &before,
        &snapshot(&db).await,
        "plan and run --dry-run must write nothing",
    );
}

#[tokio::test]
async fn plan_leaves_existing_checkpoints_unchanged() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    mixed_table(&db, &old.key, &new.key, None).await;
    let (code, text) = plain_output(
        run_command(&db, &[TARGET], &[&old.path], &new.path)
            .arg("--job")
            .arg("earlier"),
    );
    assert_eq!(code, 3, "undecryptable rows need attention: {text}");
    db.exec("UPDATE creds SET secret = NULL WHERE id = 1").await;
    let value = encrypt_string(&old.key, "written later");
    sqlx::query("INSERT INTO creds VALUES (100, $1)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();
    let before = snapshot(&db).await;
    assert!(
        before
            .iter()
            .any(|line| line == "CREATE TABLE reencrypt.jobs ("),
        "the run created the checkpoint tables"
    );

    let (code, plan, text) = json_output(&mut scan_command(
        "plan",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    assert_eq!(number(&plan["total"], "old_key"), 1, "{text}");

    assert_same_snapshot(
        &before,
        &snapshot(&db).await,
        "plan must not touch the checkpoint tables",
    );
}

#[tokio::test]
async fn plan_lists_keys_up_to_the_report_limit() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let other = KeyFile::generate();
    db.exec("CREATE TABLE creds (id int PRIMARY KEY, secret text)")
        .await;
    // Six values under a key that was not given: undecryptable.
    for id in 1..=6 {
        sqlx::query("INSERT INTO creds VALUES ($1, $2)")
            .bind(id)
            .bind(encrypt_string(&other.key, &format!("v-{id}")))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let listed = |plan: &serde_json::Value| {
        plan["targets"][0]["keys"]["undecryptable"]
            .as_array()
            .map_or(0, Vec::len)
    };

    let (code, plan, text) = json_output(
        scan_command("plan", &db, &[TARGET], &old.path, &new.path).args(["--report-limit", "2"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(number(&plan["total"], "undecryptable"), 6, "{text}");
    assert_eq!(listed(&plan), 2, "{text}");

    let (code, plan, text) =
        json_output(run_command(&db, &[TARGET], &[&old.path], &new.path).args([
            "--dry-run",
            "--report-limit",
            "3",
        ]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(listed(&plan), 3, "{text}");

    // The table lists them too.
    let (code, text) = plain_output(
        scan_command("plan", &db, &[TARGET], &old.path, &new.path).args(["--report-limit", "2"]),
    );
    assert_eq!(code, 0, "{text}");
    let line = text
        .lines()
        .find(|line| line.contains("undecryptable keys"))
        .unwrap_or_else(|| panic!("no keys listed: {text}"));
    assert!(line.ends_with("1, 2"), "{line}");

    let (code, text) = plain_output(
        scan_command("plan", &db, &[TARGET], &old.path, &new.path).arg("--report-limit=-1"),
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--report-limit must be zero or more"),
        "{text}"
    );
}

#[tokio::test]
async fn plan_counts_equal_run_counts() {
    let db = TestDb::new().await;
    let vectors = load_vectors();
    let old = KeyFile::from_hex(&vectors.key_a);
    let new = KeyFile::from_hex(&vectors.key_b);
    let expected = mixed_table(&db, &old.key, &new.key, Some(AMBIGUOUS_UNDER_A_AND_B)).await;

    let (code, plan, text) = json_output(&mut scan_command(
        "plan",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    let planned = &plan["targets"][0]["counts"];
    assert_eq!(plan["targets"][0]["estimated"], false);
    assert_eq!(plan["targets"][0]["index"], "creds_pkey");
    assert_eq!(plan["targets"][0]["key_columns"], serde_json::json!(["id"]));
    assert_eq!(plan["read_only"], true);
    assert_eq!(number(planned, "rows"), expected.rows());
    assert_eq!(number(planned, "old_key"), expected.old_key);
    assert_eq!(number(planned, "current"), expected.current);
    assert_eq!(number(planned, "null"), expected.null);
    assert_eq!(number(planned, "not_in_format"), expected.not_in_format);
    assert_eq!(number(planned, "undecryptable"), expected.undecryptable);
    assert_eq!(number(planned, "ambiguous"), expected.ambiguous);
    assert_eq!(
        plan["targets"][0]["keys"]["ambiguous"],
        serde_json::json!([expected.rows().to_string()])
    );

    let (code, dry_run, text) =
        json_output(run_command(&db, &[TARGET], &[&old.path], &new.path).arg("--dry-run"));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        dry_run["targets"][0]["counts"], *planned,
        "run --dry-run is the same plan"
    );

    let (code, summary, text) =
        json_output(&mut run_command(&db, &[TARGET], &[&old.path], &new.path));
    assert_eq!(code, 3, "{text}");
    let counted = &summary["targets"][0]["counts"];
    assert_eq!(number(counted, "rows_scanned"), number(planned, "rows"));
    assert_eq!(number(counted, "reencrypted"), number(planned, "old_key"));
    assert_eq!(number(counted, "current"), number(planned, "current"));
    assert_eq!(number(counted, "null"), number(planned, "null"));
    assert_eq!(
        number(counted, "not_in_format"),
        number(planned, "not_in_format")
    );
    assert_eq!(
        number(counted, "undecryptable"),
        number(planned, "undecryptable")
    );
    assert_eq!(number(counted, "ambiguous"), number(planned, "ambiguous"));
}

#[tokio::test]
async fn plan_sample_scales_counts() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec("CREATE TABLE creds (id int PRIMARY KEY, secret text)")
        .await;
    // Old-key and current values alternate, so every page contains both.
    // None reads under the other key too, so the counts are exact.
    let ids: Vec<i32> = (1..=20_000).collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| {
            let (key, other) = if id % 2 == 0 {
                (&old.key, &new.key)
            } else {
                (&new.key, &old.key)
            };
            encrypt_only_under(key, other, &format!("v-{id}"))
        })
        .collect();
    sqlx::query("INSERT INTO creds SELECT * FROM unnest($1::int4[], $2::text[])")
        .bind(&ids)
        .bind(&values)
        .execute(&db.pool)
        .await
        .unwrap();
    db.exec("ANALYZE creds").await;

    let (code, plan, text) = json_output(
        scan_command("plan", &db, &[TARGET], &old.path, &new.path)
            .arg("--sample")
            .arg("2000"),
    );
    assert_eq!(code, 0, "{text}");
    let target = &plan["targets"][0];
    assert_eq!(target["estimated"], true, "{text}");
    assert_eq!(target["method"]["kind"], "sample");
    assert_eq!(target["method"]["rows_total_source"], "reltuples");
    assert_eq!(number(&target["method"], "rows_total_estimate"), 20_000);
    let read = number(&target["method"], "rows_read");
    // The raw counts carry the plan's names, and add up to the rows read.
    let raw = &target["method"]["counts_read"];
    assert_eq!(number(raw, "rows"), read, "{text}");
    assert_eq!(
        number(raw, "old_key") + number(raw, "current"),
        read,
        "{text}"
    );
    assert!(read > 0, "rows read: {read}");
    assert!(read <= 4000, "rows read: {read}");
    assert_eq!(number(&target["counts"], "rows"), 20_000);
    let old_key = number(&target["counts"], "old_key");
    let current = number(&target["counts"], "current");
    assert!(
        (8_000..=12_000).contains(&old_key),
        "old-key estimate {old_key}"
    );
    assert!(
        (old_key + current - 20_000).abs() <= 2,
        "{old_key} + {current}"
    );

    let (code, plan, text) = json_output(
        scan_command("plan", &db, &[TARGET], &old.path, &new.path)
            .arg("--sample")
            .arg("50000"),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        plan["targets"][0]["method"]["kind"], "full",
        "a sample past the table's size reads every row"
    );
    assert_eq!(number(&plan["targets"][0]["counts"], "old_key"), 10_000);

    let (code, text) = plain_output(
        scan_command("plan", &db, &[TARGET], &old.path, &new.path)
            .arg("--sample")
            .arg("0"),
    );
    assert_eq!(code, 2, "{text}");
}

#[tokio::test]
async fn verify_fails_before_run_and_passes_after() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = mixed_table(&db, &old.key, &new.key, None).await;

    let (code, result, text) = json_output(
        scan_command("verify", &db, &[TARGET], &old.path, &new.path)
            .arg("--report-limit")
            .arg("3"),
    );
    assert_eq!(code, 5, "{text}");
    assert_eq!(result["verify"]["passed"], false);
    assert_eq!(number(&result["verify"], "old_key"), expected.old_key);
    assert_eq!(number(&result["verify"], "ambiguous"), 0);
    let listed: Vec<(String, String)> = result["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["key"].as_str().unwrap().to_string(),
                a["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("1".into(), "old_key".into()),
            ("2".into(), "old_key".into()),
            ("3".into(), "old_key".into())
        ],
        "--report-limit bounds the list, old-key rows first"
    );
    assert!(
        !schema_exists(&db).await,
        "verify must not create the worker's schema"
    );
    let (code, text) = plain_output(&mut scan_command(
        "verify",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 5, "{text}");
    assert!(text.contains("verify failed: 30 values"), "{text}");

    // With a wrong old key, the old-key values decrypt under no key given:
    // nothing is found under an old key, and yet the verification must not pass.
    let wrong = KeyFile::generate();
    let (code, result, text) = json_output(&mut scan_command(
        "verify",
        &db,
        &[TARGET],
        &wrong.path,
        &new.path,
    ));
    assert_eq!(code, 3, "{text}");
    assert_eq!(number(&result["verify"], "old_key"), 0);
    assert_eq!(
        number(&result["verify"], "undecryptable"),
        expected.old_key + expected.undecryptable
    );

    let (code, text) = plain_output(&mut run_command(&db, &[TARGET], &[&old.path], &new.path));
    assert_eq!(code, 3, "{text}");

    let (code, result, text) = json_output(&mut scan_command(
        "verify",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 3, "the undecryptable rows remain: {text}");
    assert_eq!(result["verify"]["passed"], true);
    let after = &result["targets"][0]["after"];
    assert_eq!(number(after, "rows"), expected.rows());
    assert_eq!(number(after, "old_key"), 0);
    assert_eq!(
        number(after, "current"),
        expected.current + expected.old_key
    );
    assert_eq!(number(after, "undecryptable"), expected.undecryptable);
    assert_eq!(number(after, "not_in_format"), expected.not_in_format);
    let outcomes: Vec<&str> = result["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "undecryptable",
            "undecryptable",
            "not_in_format",
            "not_in_format"
        ]
    );

    // Once the undecryptable rows are gone, the verification passes cleanly.
    for attention in result["attention"].as_array().unwrap() {
        if attention["outcome"] == "undecryptable" {
            sqlx::query("DELETE FROM creds WHERE id = $1::text::bigint")
                .bind(attention["key"].as_str().unwrap())
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }
    let (code, text) = plain_output(&mut scan_command(
        "verify",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verify passed"), "{text}");
}

#[tokio::test]
async fn verify_catches_late_old_key_value() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    mixed_table(&db, &old.key, &new.key, None).await;
    let (code, text) = plain_output(&mut run_command(&db, &[TARGET], &[&old.path], &new.path));
    assert_eq!(code, 3, "{text}");
    let (code, text) = plain_output(&mut scan_command(
        "verify",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 3, "only the undecryptable rows remain: {text}");
    assert!(text.contains("verify passed"), "{text}");

    // A stale application replica writes under the old key after the run.
    let value = encrypt_string(&old.key, "written by a stale replica");
    sqlx::query("INSERT INTO creds VALUES (500, $1)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();

    let (code, result, text) = json_output(&mut scan_command(
        "verify",
        &db,
        &[TARGET],
        &old.path,
        &new.path,
    ));
    assert_eq!(code, 5, "{text}");
    assert_eq!(number(&result["verify"], "old_key"), 1);
    assert_eq!(result["attention"][0]["key"], "500");
    assert_eq!(result["attention"][0]["outcome"], "old_key");
}

#[tokio::test]
async fn verify_stops_on_first_signal() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 5_000, &old.key).await;

    // One row per page makes the scan take far longer than the wait below.
    let child = scan_command("verify", &db, &[TARGET], &old.path, &new.path)
        .args(["--batch-size", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A connection named reencrypt means the scan has started, and the
    // command listens for signals before it connects.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(
        &db,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'reencrypt'",
    )
    .await
        == 0
    {
        assert!(Instant::now() < deadline, "verify never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = Instant::now();
    let output = child.wait_with_output().unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(4), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "verify took {:?} to stop",
        started.elapsed()
    );
    assert!(
        text.contains("verify was interrupted by a signal"),
        "{text}"
    );
}

/// Fills `creds (id bigint PRIMARY KEY, secret text NOT NULL)` with `rows`
/// values under `key`, the plaintext of row `id` being `first-plaintext-{id:06}`.
/// Plaintexts of two AES blocks make a value that also reads under another
/// key (an ambiguous row) vanishingly rare.
async fn fill(db: &TestDb, rows: i64, key: &Key) {
    db.exec("CREATE TABLE creds (id bigint PRIMARY KEY, secret text NOT NULL)")
        .await;
    let ids: Vec<i64> = (1..=rows).collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| encrypt_string(key, &format!("first-plaintext-{id:06}")))
        .collect();
    sqlx::query("INSERT INTO creds SELECT * FROM unnest($1::int8[], $2::text[])")
        .bind(&ids)
        .bind(&values)
        .execute(&db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn status_shows_progress_of_running_job() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 2000, &old.key).await;
    db.exec("ANALYZE creds").await;

    let (code, status, text) = json_output(&mut job_command("status", &db));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        status["jobs"],
        serde_json::json!([]),
        "no schema yet: no jobs"
    );

    let child = run_command(&db, &[TARGET], &[&old.path], &new.path)
        .args([
            "--job",
            "slow",
            "--batch-size",
            "100",
            "--max-rows-per-second",
            "200",
            "--progress",
            "off",
        ])
        .args(["--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Poll from this process while the run works.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Option<serde_json::Value> = None;
    while Instant::now() < deadline {
        let (code, status, text) = json_output(job_command("status", &db).args(["--job", "slow"]));
        // Until the run creates the job, status exits 2 for the unknown name.
        if code == 2 && text.contains("no job named slow") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        assert_eq!(code, 0, "{text}");
        let scanned = status["jobs"][0]["targets"][0]["rows_scanned"]
            .as_i64()
            .unwrap_or(0);
        if scanned > 0 && scanned < 2000 {
            seen = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = seen.expect("status never showed the run part-way");
    let job = &status["jobs"][0];
    assert_eq!(job["status"], "running");
    assert_eq!(job["new_key_fingerprint"], new.key.fingerprint());
    assert_eq!(
        job["old_key_fingerprints"],
        serde_json::json!([old.key.fingerprint()])
    );
    let target = &job["targets"][0];
    assert_eq!(number(target, "rows_estimated"), 2000);
    let progress = target["progress"].as_f64().unwrap();
    assert!(progress > 0.0, "progress {progress}");
    assert!(progress < 1.0, "progress {progress}");
    assert!(target["last_checkpoint_at"].is_string());
    assert_eq!(number(&job["leases"][0], "pid"), i64::from(child.id()));
    assert!(job["leases"][0]["heartbeat_age_secs"].as_f64().unwrap() < 30.0);
    let (code, text) = plain_output(job_command("status", &db).args(["--job", "slow"]));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("job slow (running)"), "{text}");
    assert!(text.contains(&format!("pid {}", child.id())), "{text}");

    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
    let (code, status, text) = json_output(job_command("status", &db).args(["--job", "slow"]));
    assert_eq!(code, 0, "{text}");
    let job = &status["jobs"][0];
    assert_eq!(job["status"], "finished");
    assert_eq!(number(&job["targets"][0], "rows_scanned"), 2000);
    assert_eq!(job["targets"][0]["progress"].as_f64(), Some(1.0));
    assert!(job["targets"][0]["rows_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(job["leases"], serde_json::json!([]));
    assert_eq!(job["latest_records"][0]["command"], "run");
    assert_eq!(number(&job["latest_records"][0], "exit_code"), 0);
}

#[tokio::test]
async fn status_rejects_unknown_job() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();

    // No checkpoint tables yet: a named job is missing, and the list is empty.
    let (code, text) = plain_output(job_command("status", &db).args(["--job", "nosuch"]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no job named nosuch"), "{text}");
    assert!(text.contains("has no checkpoint tables"), "{text}");
    let (code, status, text) = json_output(job_command("status", &db).args(["--job", "nosuch"]));
    assert_eq!(code, 2, "{text}");
    assert_eq!(
        status,
        serde_json::Value::Null,
        "no JSON on an error: {text}"
    );
    let (code, text) = plain_output(&mut job_command("status", &db));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no jobs"), "{text}");
    assert!(
        !schema_exists(&db).await,
        "status must not create the schema"
    );

    fill(&db, 50, &old.key).await;
    let (code, text) =
        plain_output(run_command(&db, &[TARGET], &[&old.path], &new.path).args(["--job", "done"]));
    assert_eq!(code, 0, "{text}");

    // The tables exist and hold another job.
    let (code, text) = plain_output(job_command("status", &db).args(["--job", "nosuch"]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no job named nosuch"), "{text}");
    assert!(!text.contains("job done"), "{text}");
    let (code, status, text) = json_output(job_command("status", &db).args(["--job", "nosuch"]));
    assert_eq!(code, 2, "{text}");
    assert_eq!(
        status,
        serde_json::Value::Null,
        "no JSON on an error: {text}"
    );
    let (code, text) = plain_output(job_command("status", &db).args(["--job", " "]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--job must not be empty"), "{text}");
    let (code, text) = plain_output(job_command("status", &db).args(["--job", "done"]));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("job done (finished)"), "{text}");

    // The tables exist but hold no job.
    let (code, text) = plain_output(job_command("reset", &db).args(["--job", "done", "--yes"]));
    assert_eq!(code, 0, "{text}");
    let (code, text) = plain_output(&mut job_command("status", &db));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no jobs"), "{text}");
    let (code, status, text) = json_output(&mut job_command("status", &db));
    assert_eq!(code, 0, "{text}");
    assert_eq!(status["jobs"], serde_json::json!([]), "{text}");
    let (code, text) = plain_output(job_command("status", &db).args(["--job", "done"]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no job named done"), "{text}");
}

#[tokio::test]
async fn reset_requires_confirmation() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 50, &old.key).await;
    let (code, text) =
        plain_output(run_command(&db, &[TARGET], &[&old.path], &new.path).args(["--job", "done"]));
    assert_eq!(code, 0, "{text}");

    let (code, text) = plain_output(job_command("reset", &db).args(["--job", "done"]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("pass --yes"), "{text}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reencrypt.jobs WHERE job = 'done'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reencrypt.ranges WHERE job = 'done'"
        )
        .await,
        1
    );

    let (code, text) = plain_output(job_command("reset", &db).args(["--job", "missing", "--yes"]));
    assert_eq!(code, 2, "{text}");

    let (code, text) = plain_output(job_command("reset", &db).args(["--job", "done", "--yes"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reencrypt.jobs WHERE job = 'done'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reencrypt.ranges WHERE job = 'done'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reencrypt.runs WHERE job = 'done'"
        )
        .await,
        1,
        "evidence is kept"
    );
}

#[tokio::test]
async fn release_refuses_live_lease() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 50, &old.key).await;
    let (code, text) =
        plain_output(run_command(&db, &[TARGET], &[&old.path], &new.path).args(["--job", "held"]));
    assert_eq!(code, 0, "{text}");
    // A runner on another host that renewed its lease a moment ago.
    db.exec(
        "INSERT INTO reencrypt.leases (job, shard, holder, host, pid, expires_at) \
         VALUES ('held', 0, 'other-runner', 'elsewhere', 4242, now() + interval '1 hour')",
    )
    .await;
    let leases = "SELECT count(*) FROM reencrypt.leases WHERE job = 'held'";

    let (code, text) = plain_output(job_command("release", &db).args(["--job", "held"]));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("host elsewhere pid 4242"), "{text}");
    assert!(text.contains("--force"), "{text}");
    assert_eq!(count(&db, leases).await, 1);

    let (code, text) = plain_output(job_command("reset", &db).args(["--job", "held", "--yes"]));
    assert_eq!(
        code, 2,
        "reset must not delete a job under a live runner: {text}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reencrypt.jobs WHERE job = 'held'"
        )
        .await,
        1
    );

    let (code, text) = plain_output(
        job_command("release", &db).args(["--job", "held", "--shard", "0", "--force"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(count(&db, leases).await, 0);

    // An expired lease needs no --force.
    db.exec(
        "INSERT INTO reencrypt.leases (job, shard, holder, host, pid, expires_at) \
         VALUES ('held', 0, 'gone-runner', 'elsewhere', 4243, now() - interval '1 second')",
    )
    .await;
    let (code, text) = plain_output(job_command("release", &db).args(["--job", "held"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(count(&db, leases).await, 0);

    let (code, text) = plain_output(job_command("release", &db).args(["--job", "held"]));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("holds no lease"), "{text}");
    let (code, text) = plain_output(job_command("release", &db).args(["--job", "unknown"]));
    assert_eq!(code, 2, "{text}");
}

/// Reads a JSON file, and checks that no key's hex text appears in it.
fn read_report(path: &Path, keys: &[&Key]) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    for key in keys {
        let hex = key.to_hex();
        assert!(
            !text.to_lowercase().contains(hex.as_str()),
            "key material in {}",
            path.display()
        );
        assert!(
            !text.to_uppercase().contains(&hex.to_uppercase()),
            "key material in {}",
            path.display()
        );
    }
    serde_json::from_str(&text).unwrap()
}

const EVIDENCE_FIELDS: [&str; 18] = [
    "record_version",
    "command",
    "job",
    "started_at",
    "finished_at",
    "duration_seconds",
    "operator",
    "host",
    "tool",
    "tool_version",
    "keys",
    "targets",
    "before_source",
    "sweeps",
    "job_finished",
    "verify",
    "attention",
    "exit_code",
];

#[tokio::test]
async fn interrupted_run_records_evidence() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    common::fill(&db, rows, &old.key).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");

    let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--job", "stopped", "--batch-size", "100"])
        .args(["--max-rows-per-second", "1000", "--progress", "off"])
        .arg("--report")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    common::terminate(&child);
    assert_eq!(child.wait().unwrap().code(), Some(4));

    let report = read_report(&path, &[&old.key, &new.key]);
    assert_eq!(report["exit_code"], 4, "{report}");
    assert_eq!(report["job"], "stopped");
    assert_eq!(report["job_finished"], false);
    let scanned = number(&report["targets"][0]["after"], "rows_scanned");
    assert!(scanned > 0, "{report}");
    assert!(scanned < rows, "{report}");
    let recorded: Vec<i32> =
        sqlx::query_scalar("SELECT exit_code FROM reencrypt.runs WHERE job = 'stopped'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, vec![4]);
}

#[tokio::test]
async fn operator_defaults_to_process_account() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    mixed_table(&db, &old.key, &new.key, None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");

    let (code, _, text) = json_output(
        run_command(&db, &[TARGET], &[&old.path], &new.path)
            .env_remove("USER")
            .env_remove("LOGNAME")
            .arg("--report")
            .arg(&path),
    );
    assert_eq!(code, 3, "{text}");
    let report = read_report(&path, &[&old.key, &new.key]);
    let operator = report["operator"].as_str().unwrap();
    assert_ne!(operator, "unknown", "{report}");
    assert!(!operator.is_empty(), "{report}");
}

#[tokio::test]
async fn run_report_records_evidence() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = mixed_table(&db, &old.key, &new.key, None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");

    let (code, summary, text) = json_output(
        run_command(&db, &[TARGET], &[&old.path], &new.path)
            .args(["--job", "audited", "--operator", "alice"])
            .arg("--report")
            .arg(&path),
    );
    assert_eq!(code, 3, "{text}");
    let report = read_report(&path, &[&old.key, &new.key]);
    let fields = report.as_object().unwrap();
    for field in EVIDENCE_FIELDS {
        assert!(fields.contains_key(field), "no {field} in {report}");
    }
    assert_eq!(report["record_version"], 1);
    assert_eq!(report["command"], "run");
    assert_eq!(report["job"], "audited");
    assert_eq!(report["operator"], "alice");
    assert_eq!(report["host"], reencrypt::report::host_name());
    assert_eq!(report["tool"], "reencrypt");
    assert_eq!(report["tool_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["started_at"], summary["started_at"]);
    assert_eq!(report["finished_at"], summary["finished_at"]);
    assert_eq!(report["keys"]["new_key_fingerprint"], new.key.fingerprint());
    assert_eq!(
        report["keys"]["old_key_fingerprints"],
        serde_json::json!([old.key.fingerprint()])
    );
    assert_eq!(report["keys"]["new_key_version"], serde_json::Value::Null);
    assert_eq!(report["targets"][0]["target"], TARGET);
    assert_eq!(
        report["targets"][0]["after"], summary["targets"][0]["counts"],
        "the report's counts are the summary's"
    );
    assert_eq!(
        number(&report["targets"][0]["after"], "reencrypted"),
        expected.old_key
    );
    assert_eq!(number(&report["targets"][0]["before"], "reencrypted"), 0);
    assert!(
        report["before_source"]
            .as_str()
            .unwrap()
            .starts_with("checkpoint"),
        "{report}"
    );
    assert_eq!(report["sweeps"]["sweeps"], summary["sweeps"]);
    assert_eq!(report["job_finished"], true);
    assert_eq!(report["verify"], serde_json::Value::Null);
    assert_eq!(
        report["attention"].as_array().unwrap().len(),
        4,
        "2 undecryptable, 2 not in format"
    );
    assert_eq!(report["exit_code"], 3);

    let (command, operator, exit_code, stored): (String, String, i32, serde_json::Value) =
        sqlx::query_as(
            "SELECT command, operator, exit_code, report FROM reencrypt.runs WHERE job = 'audited'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (command.as_str(), operator.as_str(), exit_code),
        ("run", "alice", 3)
    );
    assert_eq!(stored, report, "the runs table holds the same record");

    // A second run of the finished job starts from the first one's counts.
    let second = dir.path().join("second.json");
    let (code, _, text) = json_output(
        run_command(&db, &[TARGET], &[&old.path], &new.path)
            .args(["--job", "audited"])
            .arg("--report")
            .arg(&second),
    );
    assert_eq!(code, 3, "{text}");
    let report_second = read_report(&second, &[&old.key, &new.key]);
    assert_eq!(
        report_second["targets"][0]["before"],
        report["targets"][0]["after"]
    );
    assert!(
        report_second["before_source"]
            .as_str()
            .unwrap()
            .starts_with("checkpoint"),
        "{report_second}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reencrypt.runs WHERE job = 'audited'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn verify_report_records_evidence() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = mixed_table(&db, &old.key, &new.key, None).await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("verify-before.json");

    let (code, text) = plain_output(
        scan_command("verify", &db, &[TARGET], &old.path, &new.path)
            .args(["--job", "audited", "--operator", "bob", "--report"])
            .arg(&first),
    );
    assert_eq!(code, 5, "{text}");
    assert!(text.contains("not recorded in the runs table"), "{text}");
    assert!(
        !schema_exists(&db).await,
        "verify must not create the worker's schema"
    );
    let report = read_report(&first, &[&old.key, &new.key]);
    for field in EVIDENCE_FIELDS {
        assert!(
            report.as_object().unwrap().contains_key(field),
            "no {field} in {report}"
        );
    }
    assert_eq!(report["command"], "verify");
    assert_eq!(report["operator"], "bob");
    assert_eq!(report["exit_code"], 5);
    assert_eq!(report["verify"]["passed"], false);
    assert_eq!(number(&report["verify"], "old_key"), expected.old_key);
    assert_eq!(
        number(&report["targets"][0]["after"], "old_key"),
        expected.old_key
    );
    assert_eq!(report["targets"][0]["before"], serde_json::Value::Null);
    assert_eq!(report["sweeps"], serde_json::Value::Null);

    let (code, text) = plain_output(
        run_command(&db, &[TARGET], &[&old.path], &new.path).args(["--job", "audited"]),
    );
    assert_eq!(code, 3, "{text}");
    let second = dir.path().join("verify-after.json");
    let (code, text) = plain_output(
        scan_command("verify", &db, &[TARGET], &old.path, &new.path)
            .args(["--job", "audited", "--operator", "bob", "--report"])
            .arg(&second),
    );
    assert_eq!(code, 3, "the undecryptable rows remain: {text}");
    assert!(
        text.contains("recorded in reencrypt.runs with id"),
        "{text}"
    );
    let report = read_report(&second, &[&old.key, &new.key]);
    assert_eq!(report["verify"]["passed"], true);
    assert_eq!(report["exit_code"], 3);
    let (exit_code, stored): (i32, serde_json::Value) = sqlx::query_as(
        "SELECT exit_code, report FROM reencrypt.runs WHERE job = 'audited' AND command = 'verify'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(exit_code, 3);
    assert_eq!(stored, report);
}

/// Writes old-key values into rows the run has already passed, and inserts
/// new old-key rows, until the run marks its range done. Returns the latest
/// plaintext of every row it wrote.
///
/// Each write holds a share lock on the range's checkpoint row, so the run
/// cannot mark the range done (and start its sweeps) while a write is open:
/// every write lands before the first sweep reads the table.
async fn write_behind_the_run(
    db: &TestDb,
    old: &Key,
    child: &mut std::process::Child,
) -> HashMap<i64, String> {
    let mut latest: HashMap<i64, String> = HashMap::new();
    let mut round = 0i64;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let mut tx = db.pool.begin().await.unwrap();
        let checkpoint: Result<Option<RangeCheckpoint>, _> = sqlx::query_as(
            "SELECT status, last_key FROM reencrypt.ranges WHERE job = 'swept' FOR SHARE",
        )
        .fetch_optional(&mut *tx)
        .await;
        let (status, last_key) = match checkpoint {
            Ok(Some(row)) => row,
            // No checkpoint tables or no range yet.
            _ => {
                drop(tx);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if status == "done" {
            tx.commit().await.unwrap();
            break;
        }
        let Some(passed) = last_key.and_then(|k| k[0].parse::<i64>().ok()) else {
            tx.commit().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        round += 1;
        let id = 1 + (round * 37) % passed;
        let plaintext = format!("v{round}-{id}");
        sqlx::query("UPDATE creds SET secret = $2 WHERE id = $1")
            .bind(id)
            .bind(encrypt_string(old, &plaintext))
            .execute(&mut *tx)
            .await
            .unwrap();
        latest.insert(id, plaintext);
        if round % 5 == 0 {
            let id = 100_000 + round;
            let plaintext = format!("inserted-{id}");
            sqlx::query("INSERT INTO creds VALUES ($1, $2)")
                .bind(id)
                .bind(encrypt_string(old, &plaintext))
                .execute(&mut *tx)
                .await
                .unwrap();
            latest.insert(id, plaintext);
        }
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latest
}

#[tokio::test]
async fn final_sweep_rotates_concurrent_writes() {
    let stderr = sweep_after_concurrent_writes("100").await;
    assert!(
        !stderr.contains("Many rows changed since the pass"),
        "{stderr}"
    );
}

#[tokio::test]
async fn many_changes_sweep_in_key_order() {
    // Pages of 5 rows fill up after a few dozen rows written behind the run.
    let stderr = sweep_after_concurrent_writes("5").await;
    assert!(
        stderr.contains("Many rows changed since the pass"),
        "{stderr}"
    );
}

/// Runs a job while another session writes old-key values behind it, checks
/// that the sweep rotates every one of them, and returns the run's log.
async fn sweep_after_concurrent_writes(batch_size: &str) -> String {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill(&db, rows, &old.key).await;
    let rate = if batch_size == "5" { "300" } else { "1000" };

    let mut child = run_command(&db, &[TARGET], &[&old.path], &new.path)
        .args(["--job", "swept", "--batch-size", batch_size])
        .args(["--max-rows-per-second", rate, "--progress", "off"])
        .env("RUST_LOG", "reencrypt=info")
        .args(["--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let written = write_behind_the_run(&db, &old.key, &mut child).await;
    let output = child.wait_with_output().unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(!written.is_empty(), "the writer never wrote behind the run");

    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let counts = &summary["targets"][0]["counts"];
    assert_eq!(number(counts, "rows_scanned"), rows, "{text}");
    assert_eq!(number(counts, "reencrypted"), rows);
    assert_eq!(
        number(counts, "conflicts"),
        0,
        "the writer only touched rows already passed"
    );
    assert_eq!(
        number(counts, "sweep_reencrypted"),
        written.len() as i64,
        "each row written behind the run is swept once"
    );
    assert!(number(counts, "sweep_reencrypted") > 0);
    assert_eq!(
        number(&summary, "sweeps"),
        2,
        "the second sweep finds nothing and stops"
    );
    assert_eq!(number(&summary, "sweep_last_found"), 0);

    let inserted = written.keys().filter(|id| **id > rows).count() as i64;
    let after = db.values("creds", "id", "secret").await;
    assert_eq!(after.len() as i64, rows + inserted);
    let keyring = Keyring::new(new.key.clone(), vec![old.key.clone()]);
    for (id, value) in after {
        let id: i64 = id.parse().unwrap();
        let value = value.unwrap();
        let expected = written
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("first-plaintext-{id:06}"));
        assert_eq!(
            keyring.classify(Some(&value)).outcome,
            Outcome::Current,
            "row {id} is under the new key only"
        );
        let read = decrypt_to_string(&new.key, &value).unwrap();
        assert_eq!(
            read.as_str(),
            expected,
            "row {id} holds its latest plaintext"
        );
    }
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn status_running_job_without_runner() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 50, &old.key).await;
    let (code, text) =
        plain_output(run_command(&db, &[TARGET], &[&old.path], &new.path).args(["--job", "left"]));
    assert_eq!(code, 0, "{text}");
    // What a runner killed part-way leaves: the job running, its lease expired.
    db.exec(
        "UPDATE reencrypt.jobs SET status = 'running', finished_at = NULL WHERE job = 'left'; \
         INSERT INTO reencrypt.leases (job, shard, holder, host, pid, expires_at) \
         VALUES ('left', 0, 'gone-runner', 'elsewhere', 4243, now() - interval '1 second')",
    )
    .await;
    let (code, text) = plain_output(job_command("status", &db).args(["--job", "left"]));
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("job left (running, no live runner)"),
        "{text}"
    );
    let (code, status, text) = json_output(job_command("status", &db).args(["--job", "left"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(status["jobs"][0]["status"], "running", "{text}");
    assert_eq!(status["jobs"][0]["live_runners"], 0, "{text}");

    db.exec(
        "UPDATE reencrypt.leases SET expires_at = now() + interval '1 hour' WHERE job = 'left'",
    )
    .await;
    let (code, text) = plain_output(job_command("status", &db).args(["--job", "left"]));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("job left (running)"), "{text}");
    let (code, status, text) = json_output(job_command("status", &db).args(["--job", "left"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(status["jobs"][0]["live_runners"], 1, "{text}");
}
