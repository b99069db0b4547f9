//! The final sweep: after a pass, it reads again only the rows that changed
//! since the pass read them, and reads whole every key span this process did
//! not pass over itself.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::{
    assert_reads, fill, first_target_count, output_text, plaintext, put, run_command, run_json,
    KeyFile, TestDb,
};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::db::{Database, Timeouts};
use reencrypt::keys::Key;
use reencrypt::sweep::TableState;

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
async fn sweep_rereads_spans_before_resume() {
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
async fn sweep_rereads_ranges_done_earlier() {
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
async fn sweep_with_triggers_reads_all() {
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
async fn sweep_after_inherit_reads_all() {
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
    assert!(
        !text.contains('\u{1b}'),
        "text logs to a pipe carry no colour codes: {text}"
    );
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

async fn state(db: &TestDb, table: &str) -> TableState {
    let timeouts = Timeouts {
        lock_timeout_ms: 5000,
        statement_timeout_ms: 30_000,
        idle_in_transaction_timeout_ms: 60_000,
    };
    let database = Database::connect_lazy(&db.url, 1, timeouts).unwrap();
    TableState::read(&database, table).await.unwrap()
}

#[tokio::test]
async fn table_state_detects_untrusted_xmin() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE p (id bigint PRIMARY KEY, secret text) PARTITION BY RANGE (id); \
         CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100); \
         CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (100) TO (200); \
         CREATE TABLE child (id bigint PRIMARY KEY, p_id bigint REFERENCES p (id))",
    )
    .await;

    // Foreign-key checks on either side change no row, so they are harmless.
    let before = state(&db, "public.p").await;
    assert_eq!(
        state(&db, "public.p")
            .await
            .allows_filter_since(&before, 10),
        Ok(())
    );
    let child = state(&db, "public.child").await;
    assert_eq!(child.allows_filter_since(&child, 10), Ok(()));

    // A partition detached and attached again keeps its OID, not its link.
    db.exec(
        "ALTER TABLE p DETACH PARTITION p2; \
         ALTER TABLE p ATTACH PARTITION p2 FOR VALUES FROM (100) TO (200)",
    )
    .await;
    let reason = state(&db, "public.p")
        .await
        .allows_filter_since(&before, 10);
    assert!(reason.unwrap_err().contains("attached to or detached"));

    // A cascading key action writes rows of the referencing table.
    let before = state(&db, "public.p").await;
    db.exec(
        "CREATE TABLE audit (id bigint PRIMARY KEY, secret text UNIQUE); \
         CREATE TABLE copy (secret text REFERENCES audit (secret) ON UPDATE CASCADE)",
    )
    .await;
    let audit = state(&db, "public.audit").await;
    assert!(audit
        .allows_filter_since(&audit, 10)
        .unwrap_err()
        .contains("triggers or rules"));

    // A row trigger on the partitioned parent reaches each partition.
    db.exec(
        "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'; \
         CREATE TRIGGER keep BEFORE UPDATE ON p FOR EACH ROW EXECUTE FUNCTION keep()",
    )
    .await;
    let partition = state(&db, "public.p1").await;
    assert!(partition
        .allows_filter_since(&partition, 10)
        .unwrap_err()
        .contains("triggers or rules"));
    assert!(state(&db, "public.p")
        .await
        .allows_filter_since(&before, 10)
        .is_err());

    // Before PostgreSQL 15 the writers are looked up row by row.
    let plain = state(&db, "public.child").await;
    let many = plain.allows_filter_since(&plain, 5000);
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(many.is_ok(), version >= 150_000, "{many:?}");
}

#[tokio::test]
async fn sweep_findings_past_limit_exit_3() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 100;
    fill(&db, rows, &old.key).await;
    // Plaintext values come first in the attention list.
    db.exec("UPDATE t SET secret = 'plain ' || id WHERE id <= 3")
        .await;

    let (code, _, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--job",
            "limited",
            "--max-sweeps",
            "0",
        ]),
    );
    assert_eq!(code, 0, "{text}");
    // A value under a key the run does not have, written after the pass.
    put(&db, 50, &Key::generate(), "under a stranger's key").await;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--job",
            "limited",
            "--report-limit",
            "2",
        ]),
    );
    assert_eq!(code, 3, "{text}");
    assert_eq!(summary["attention"].as_array().unwrap().len(), 2, "{text}");
    assert_eq!(summary["attention_total"], 4, "{text}");
    assert_eq!(summary["attention_needs_action"], 1, "{text}");

    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--job", "limited", "--report-limit", "2"])
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains("the first 2 of 4"), "{text}");
}

/// Fills `t` with 200 rows under the old key, runs `setup`, adds a trigger
/// that keeps the value of every tenth row, and rotates in batches of 50.
/// Checks the counts, and that the kept rows still read under the old key
/// and the others under the new one. Returns the database, the new key and
/// the run's summary.
async fn rotate_keeping_every_tenth_row(setup: &str) -> (TestDb, KeyFile, serde_json::Value) {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 200, &old.key).await;
    if !setup.is_empty() {
        db.exec(setup).await;
    }
    db.exec(
        "CREATE FUNCTION keep_some() RETURNS trigger LANGUAGE plpgsql AS \
         'BEGIN IF NEW.id % 10 = 0 THEN NEW.secret := OLD.secret; END IF; RETURN NEW; END'; \
         CREATE TRIGGER keep_some BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION keep_some()",
    )
    .await;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args(["--batch-size", "50"]),
    );
    assert_eq!(code, 3, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), 180, "{text}");
    assert_eq!(first_target_count(&summary, "write_rejected"), 20, "{text}");

    for (id, value) in db.values("t", "id", "secret").await {
        let id: i64 = id.parse().unwrap();
        let key = if id % 10 == 0 { &old.key } else { &new.key };
        let read = decrypt_to_string(key, value.as_deref().unwrap());
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(plaintext(id).as_str()),
            "row {id}"
        );
    }
    (db, new, summary)
}

#[tokio::test]
async fn trigger_kept_rows_are_reported() {
    let (_db, _new, summary) = rotate_keeping_every_tenth_row("").await;
    assert_eq!(summary["attention_needs_action"], 20, "{summary}");
}

/// A table with a DO ALSO rule on UPDATE cannot be updated inside a `WITH`
/// query, so its batches take the write that returns one row for each row
/// written, which must report the kept rows too.
#[tokio::test]
async fn update_rule_table_is_rotated() {
    let (db, new, _summary) = rotate_keeping_every_tenth_row(
        "CREATE TABLE t_log (id bigint, secret text); \
         CREATE RULE log_update AS ON UPDATE TO t DO ALSO INSERT INTO t_log VALUES (new.id, new.secret)",
    )
    .await;

    // The rule logged each committed rewrite once, with the value written.
    let logged: Vec<(i64, String)> = sqlx::query_as("SELECT id, secret FROM t_log ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(logged.len(), 180);
    for (id, secret) in logged {
        assert_ne!(id % 10, 0, "row {id}");
        let read = decrypt_to_string(&new.key, &secret);
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(plaintext(id).as_str()),
            "row {id}"
        );
    }
}

/// Runs with a trigger on `t` (200 rows) that runs the PL/pgSQL `body`,
/// created by `CREATE {kind} TRIGGER meddle {when} ON t ...`. Checks that the
/// rows whose id is a multiple of `every` keep their old value byte for
/// byte and are rejected, and that the rest read under the new key.
async fn trigger_rejects_every(kind: &str, when: &str, body: &str, every: i64) {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 200;
    fill(&db, rows, &old.key).await;
    let before: HashMap<String, Option<String>> =
        db.values("t", "id", "secret").await.into_iter().collect();
    let deferred = match kind {
        "CONSTRAINT" => "DEFERRABLE INITIALLY DEFERRED",
        _ => "",
    };
    db.exec(&format!(
        "CREATE FUNCTION meddle() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$; \
         CREATE {kind} TRIGGER meddle {when} ON t {deferred} FOR EACH ROW EXECUTE FUNCTION meddle()"
    ))
    .await;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args(["--batch-size", "50"]),
    );
    let rejected = rows / every;
    assert_eq!(code, 3, "{text}");
    assert_eq!(
        first_target_count(&summary, "reencrypted"),
        rows - rejected,
        "{text}"
    );
    assert_eq!(
        first_target_count(&summary, "write_rejected"),
        rejected,
        "{text}"
    );
    assert_eq!(first_target_count(&summary, "undecryptable"), 0, "{text}");
    assert_eq!(summary["attention_needs_action"], rejected, "{text}");

    for (id, value) in db.values("t", "id", "secret").await {
        let number: i64 = id.parse().unwrap();
        if number % every == 0 {
            assert_eq!(value, before[&id], "row {id} changed");
            continue;
        }
        let read = decrypt_to_string(&new.key, value.as_deref().unwrap());
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(plaintext(number).as_str()),
            "row {id}"
        );
    }
}

#[tokio::test]
async fn trigger_changed_rows_stay_unchanged() {
    // The trigger stores another value than the one written: committing it
    // would leave a value that no key reads.
    trigger_rejects_every(
        "",
        "BEFORE UPDATE",
        "IF NEW.id % 10 = 0 THEN NEW.secret := lower(NEW.secret); END IF; RETURN NEW;",
        10,
    )
    .await;
}

#[tokio::test]
async fn trigger_skipped_rows_are_rejected() {
    trigger_rejects_every(
        "",
        "BEFORE UPDATE",
        "IF NEW.id % 7 = 0 THEN RETURN NULL; END IF; RETURN NEW;",
        7,
    )
    .await;
}

#[tokio::test]
async fn deferred_trigger_rejects_rows() {
    // Checked at COMMIT, the error would fail the whole batch on every run.
    trigger_rejects_every(
        "CONSTRAINT",
        "AFTER UPDATE",
        "IF NEW.id % 50 = 0 THEN RAISE EXCEPTION 'row % is frozen', NEW.id; END IF; RETURN NULL;",
        50,
    )
    .await;
}

#[tokio::test]
async fn rejected_rows_rotate_once_fixed() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 200;
    fill(&db, rows, &old.key).await;
    db.exec(
        "CREATE FUNCTION frozen_rows() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.id % 10 = 0 THEN RAISE EXCEPTION 'frozen'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER frozen_rows BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION frozen_rows()",
    )
    .await;
    let (code, summary, text) = run_json(&mut run_command(
        &db,
        &["t.secret"],
        &[&old.path],
        &new.path,
    ));
    assert_eq!(code, 3, "{text}");
    assert_eq!(first_target_count(&summary, "write_rejected"), 20, "{text}");

    // The operator removes the cause and runs the same command again.
    db.exec("DROP TRIGGER frozen_rows ON t").await;
    let (code, summary, text) = run_json(&mut run_command(
        &db,
        &["t.secret"],
        &[&old.path],
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        first_target_count(&summary, "sweep_reencrypted"),
        20,
        "{text}"
    );
    assert_eq!(summary["attention_needs_action"], 0, "{text}");
    assert_eq!(summary["attention_total"], 0, "{text}");
    assert_reads(&db, &new.key, rows, plaintext).await;
}

#[tokio::test]
async fn unsettled_sweeps_exit_3() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 100, &old.key).await;
    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--job",
            "unsettled",
            "--max-sweeps",
            "0",
        ]),
    );
    assert_eq!(code, 0, "{text}");
    // Without sweeps the run reports that nothing looked for late writes.
    assert_eq!(summary["sweeps_off"], true, "{text}");
    assert!(text.contains("Sweeps are off"), "{text}");
    put(&db, 40, &old.key, "written after the pass").await;

    // One sweep rotates the row. No further sweep shows that none remain,
    // so the run cannot claim that every value is under the new key.
    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--job",
            "unsettled",
            "--max-sweeps",
            "1",
        ]),
    );
    assert_eq!(code, 3, "{text}");
    assert_eq!(summary["sweep_last_found"], 1, "{text}");
    assert_eq!(summary["sweeps_off"], false, "{text}");
    assert_reads(&db, &new.key, 100, |id| {
        if id == 40 {
            "written after the pass".to_string()
        } else {
            plaintext(id)
        }
    })
    .await;
}

#[tokio::test]
async fn sweep_skips_rows_rewritten_after_conflicts() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 2000;
    fill(&db, rows, &old.key).await;

    // Each batch waits for its throttle slot between its fetch and its
    // write, so rows the application rewrites meanwhile conflict.
    let child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--batch-size", "100", "--max-rows-per-second", "500"])
        .args([
            "--progress",
            "off",
            "--format",
            "json",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "reencrypt=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Four rows a quarter of the table apart each round, so that on a slow
    // machine too some land in a batch between its fetch and its write.
    let mut rewritten = std::collections::BTreeMap::new();
    for round in 0..30_i64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for quarter in 0..4 {
            let id = 1 + (round * 67 + quarter * rows / 4) % rows;
            let value = format!("rewritten {id} in round {round}");
            put(&db, id, &old.key, &value).await;
            rewritten.insert(id, value);
        }
    }
    let output = child.wait_with_output().unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        first_target_count(&summary, "conflicts") > 0,
        "no write conflicted: {text}"
    );

    // The sweep reads the rows the application wrote, not the whole batches
    // whose conflicts were resolved.
    let swept: i64 = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "Batch committed." && event["pass"] == "Sweep")
        .map(|event| event["rows"].as_i64().unwrap())
        .sum();
    assert!(
        swept <= rewritten.len() as i64,
        "the sweep read {swept} rows for {} rewritten: {text}",
        rewritten.len()
    );
    assert_reads(&db, &new.key, rows, |id| {
        rewritten.get(&id).cloned().unwrap_or_else(|| plaintext(id))
    })
    .await;
}
