//! The main job end to end: the real binary against a fresh PostgreSQL
//! database per test.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{load_vectors, output_text, run_command, KeyFile, TestDb, AMBIGUOUS_UNDER_A_AND_B};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::keys::Key;

/// Runs a command and parses its `--format json` summary.
fn run_json(command: &mut std::process::Command) -> (i32, serde_json::Value, String) {
    let output = command.arg("--format").arg("json").output().unwrap();
    let text = output_text(&output);
    let code = output.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (code, json, text)
}

fn counts(summary: &serde_json::Value, target: usize) -> HashMap<String, i64> {
    summary["targets"][target]["counts"]
        .as_object()
        .unwrap_or_else(|| panic!("no counts in {summary}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
        .collect()
}

fn is_canonical(value: &str) -> bool {
    let Some((iv, ciphertext)) = value.split_once(':') else {
        return false;
    };
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    engine.decode(iv).is_ok_and(|b| b.len() == 16)
        && engine.decode(ciphertext).is_ok()
        && !ciphertext.contains(':')
}

/// Rotates every vector (plus a value under both A and B) from key A to `new`
/// and checks the vectors' rule; returns the summary's counts.
async fn rotate_vectors(
    new: &KeyFile,
    extra_args: &[&str],
) -> (i32, HashMap<String, i64>, Vec<String>, i64) {
    let db = TestDb::new().await;
    let vectors = load_vectors();
    let old = KeyFile::from_hex(&vectors.key_a);
    db.exec("CREATE TABLE secrets (id bigint PRIMARY KEY, value text)")
        .await;
    for (index, vector) in vectors.vectors.iter().enumerate() {
        sqlx::query("INSERT INTO secrets VALUES ($1, $2)")
            .bind(index as i64 + 1)
            .bind(&vector.value)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let ambiguous_id = vectors.vectors.len() as i64 + 1;
    sqlx::query("INSERT INTO secrets VALUES ($1, $2)")
        .bind(ambiguous_id)
        .bind(AMBIGUOUS_UNDER_A_AND_B)
        .execute(&db.pool)
        .await
        .unwrap();

    let (code, summary, text) =
        run_json(run_command(&db, &["secrets.value"], &[&old.path], &new.path).args(extra_args));
    let after: HashMap<String, Option<String>> = db
        .values("secrets", "id", "value")
        .await
        .into_iter()
        .collect();
    let mut readable = 0;
    for (index, vector) in vectors.vectors.iter().enumerate() {
        let stored = after[&(index + 1).to_string()].clone().unwrap();
        match &vector.app_reads_as {
            Some(plaintext) => {
                readable += 1;
                let read = decrypt_to_string(&new.key, &stored);
                assert_eq!(
                    read.as_deref().map(String::as_str),
                    Some(plaintext.as_str()),
                    "vector {:?}: {text}",
                    vector.name
                );
                assert!(
                    is_canonical(&stored),
                    "vector {:?} was written as {stored:?}",
                    vector.name
                );
                assert!(
                    decrypt_to_string(&old.key, &stored).is_none(),
                    "vector {:?} still reads under the old key",
                    vector.name
                );
            }
            None => assert_eq!(
                stored, vector.value,
                "vector {:?} must be left byte-for-byte",
                vector.name
            ),
        }
    }
    let ambiguous_after = after[&ambiguous_id.to_string()].clone().unwrap();
    if new.key == Key::from_hex(&vectors.key_b).unwrap() {
        assert_eq!(
            ambiguous_after, AMBIGUOUS_UNDER_A_AND_B,
            "a value readable under both keys is left unchanged"
        );
    } else {
        // Under a third key the value reads only under A, as the application reads it.
        let expected = decrypt_to_string(&old.key, AMBIGUOUS_UNDER_A_AND_B).unwrap();
        assert_eq!(
            decrypt_to_string(&new.key, &ambiguous_after).as_deref(),
            Some(&*expected)
        );
    }
    let attention: Vec<String> = summary["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a[1].as_str().unwrap().to_string())
        .collect();
    (code, counts(&summary, 0), attention, readable)
}

#[tokio::test]
async fn vectors_rotate_to_key_b() {
    // Key B is the vectors' "wrong key": that value is current under B, and
    // the value readable under both A and B is ambiguous.
    let vectors = load_vectors();
    let new = KeyFile::from_hex(&vectors.key_b);
    let (code, counts, attention, readable) = rotate_vectors(&new, &[]).await;
    let total = vectors.vectors.len() as i64 + 1;
    assert_eq!(code, 3, "an ambiguous row makes exit code 3");
    assert_eq!(counts["rows_scanned"], total);
    assert_eq!(counts["reencrypted"], readable);
    assert_eq!(counts["ambiguous"], 1);
    assert_eq!(counts["current"], 1);
    assert_eq!(counts["undecryptable"], 0);
    assert_eq!(counts["not_in_format"], total - readable - 2);
    assert!(
        attention.contains(&total.to_string()),
        "the ambiguous row's key is reported: {attention:?}"
    );
}

#[tokio::test]
async fn vectors_rotate_to_a_third_key() {
    let vectors = load_vectors();
    let new = KeyFile::generate();
    let (code, counts, _, readable) = rotate_vectors(&new, &[]).await;
    let total = vectors.vectors.len() as i64 + 1;
    assert_eq!(code, 3, "the value under key B is undecryptable");
    assert_eq!(counts["rows_scanned"], total);
    assert_eq!(counts["reencrypted"], readable + 1);
    assert_eq!(counts["undecryptable"], 1);
    assert_eq!(counts["ambiguous"], 0);
    assert_eq!(counts["not_in_format"], total - readable - 2);
}

#[tokio::test]
async fn vectors_rotate_in_physical_order() {
    // Three rows per batch: many windows, some stopped by the row limit.
    let vectors = load_vectors();
    let new = KeyFile::generate();
    let args = [
        "--scan-order",
        "physical",
        "--writers",
        "1",
        "--batch-size",
        "3",
    ];
    let (code, counts, _, readable) = rotate_vectors(&new, &args).await;
    let total = vectors.vectors.len() as i64 + 1;
    assert_eq!(code, 3, "the value under key B is undecryptable");
    assert_eq!(counts["rows_scanned"], total);
    assert_eq!(counts["reencrypted"], readable + 1);
    assert_eq!(counts["current"], 0);
    assert_eq!(counts["undecryptable"], 1);
    assert_eq!(counts["not_in_format"], total - readable - 2);
}

#[tokio::test]
async fn mixed_table_gives_exact_counts() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let stranger = Key::generate();
    db.exec("CREATE TABLE creds (id int PRIMARY KEY, secret text, note text)")
        .await;

    // 40 old-key rows (10 of them with lenient encodings), 5 current, 3 NULL,
    // 2 plaintext, 2 under an unknown key, 2 truncated.
    let mut rows: Vec<(i32, Option<String>, &str)> = Vec::new();
    let mut id = 0;
    let mut next = || {
        id += 1;
        id
    };
    for i in 0..30 {
        rows.push((
            next(),
            Some(encrypt_string(&old.key, &format!("old-plaintext-{i:06}"))),
            "old",
        ));
    }
    for i in 0..10 {
        let value = encrypt_string(&old.key, &format!("lenient-{i}"));
        let lenient = match i % 3 {
            0 => value.replace('=', ""),
            1 => value.replace('+', "-").replace('/', "_"),
            _ => format!("{}\n", value.replace(':', ":\n")),
        };
        rows.push((next(), Some(lenient), "lenient"));
    }
    for i in 0..5 {
        rows.push((
            next(),
            Some(encrypt_string(&new.key, &format!("new-{i}"))),
            "current",
        ));
    }
    for _ in 0..3 {
        rows.push((next(), None, "null"));
    }
    rows.push((next(), Some("plain text".into()), "plain"));
    rows.push((next(), Some("".into()), "plain"));
    rows.push((next(), Some(encrypt_string(&stranger, "x")), "stranger"));
    rows.push((
        next(),
        Some(encrypt_string(
            &stranger,
            "a longer plaintext for the stranger key",
        )),
        "stranger",
    ));
    let full = encrypt_string(&old.key, "truncated one");
    rows.push((
        next(),
        Some(full[..full.len() - 8].to_string()),
        "truncated",
    ));
    rows.push((
        next(),
        Some(format!("{}:", full.split(':').next().unwrap())),
        "truncated",
    ));
    for (id, value, kind) in &rows {
        sqlx::query("INSERT INTO creds VALUES ($1, $2, $3)")
            .bind(id)
            .bind(value)
            .bind(kind)
            .execute(&db.pool)
            .await
            .unwrap();
    }

    let (code, summary, text) = run_json(&mut run_command(
        &db,
        &["public.creds.secret"],
        &[&old.path],
        &new.path,
    ));
    let counts = counts(&summary, 0);
    assert_eq!(counts["rows_scanned"], 54, "{text}");
    assert_eq!(counts["reencrypted"], 40);
    assert_eq!(counts["current"], 5);
    assert_eq!(counts["null"], 3);
    assert_eq!(
        counts["not_in_format"], 4,
        "plaintext, empty and truncated values"
    );
    assert_eq!(counts["undecryptable"], 2, "values under a key not given");
    assert_eq!(counts["ambiguous"], 0);
    assert_eq!(code, 3, "{text}");

    let after: HashMap<String, Option<String>> = db
        .values("creds", "id", "secret")
        .await
        .into_iter()
        .collect();
    for (id, before, kind) in &rows {
        let now = after[&id.to_string()].clone();
        match *kind {
            "old" | "lenient" => {
                let expected = decrypt_to_string(&old.key, before.as_deref().unwrap()).unwrap();
                let read = decrypt_to_string(&new.key, now.as_deref().unwrap());
                assert_eq!(read.as_deref(), Some(&*expected), "row {id} ({kind})");
                assert!(
                    is_canonical(now.as_deref().unwrap()),
                    "row {id} written canonically"
                );
            }
            _ => assert_eq!(&now, before, "row {id} ({kind}) must be unchanged"),
        }
    }
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM creds WHERE note IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(notes, 0, "other columns are untouched");

    // A second run finds everything current and changes nothing.
    let before_second: Vec<(String, Option<String>)> = db.values("creds", "id", "secret").await;
    let (code, summary, text) = run_json(
        run_command(&db, &["public.creds.secret"], &[&old.path], &new.path).arg("--restart"),
    );
    assert_eq!(code, 3, "{text}");
    assert_eq!(counts_of(&summary)["reencrypted"], 0);
    assert_eq!(counts_of(&summary)["current"], 45);
    assert_eq!(db.values("creds", "id", "secret").await, before_second);
}

fn counts_of(summary: &serde_json::Value) -> HashMap<String, i64> {
    counts(summary, 0)
}

/// Fills `table` (bigint key `id`, text `secret`) with `rows` old-key values.
async fn fill(db: &TestDb, table: &str, rows: i64, old: &Key) {
    db.exec(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, secret text NOT NULL)"
    ))
    .await;
    let ids: Vec<i64> = (1..=rows).collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| encrypt_string(old, &format!("plaintext-of-row-{id:06}")))
        .collect();
    sqlx::query(&format!(
        "INSERT INTO {table} SELECT * FROM unnest($1::int8[], $2::text[])"
    ))
    .bind(&ids)
    .bind(&values)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn assert_all_rotated(db: &TestDb, table: &str, rows: i64, new: &Key) {
    let after = db.values(table, "id", "secret").await;
    assert_eq!(after.len() as i64, rows);
    for (id, value) in after {
        let id: i64 = id.parse().unwrap();
        let read = decrypt_to_string(new, value.as_deref().unwrap());
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(format!("plaintext-of-row-{id:06}").as_str()),
            "row {id}"
        );
    }
}

#[tokio::test]
async fn typmod_keys_page_forward() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    // A cast to `character` without its length cuts a key to one character.
    // Both tables page only with their keys' full declared types.
    db.exec(
        "CREATE TABLE fixed (k char(8) PRIMARY KEY, secret text); \
         CREATE TABLE bits (k bit(6), n numeric(6,2), secret text, PRIMARY KEY (k, n))",
    )
    .await;

    for id in 0..60i64 {
        let value = encrypt_string(&old.key, &format!("plaintext-of-row-{id:06}"));
        sqlx::query("INSERT INTO fixed VALUES (lpad($1::text, 8, 'x'), $2)")
            .bind(id)
            .bind(&value)
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO bits VALUES (($1 % 64)::int::bit(6), $1 / 7.0, $2)")
            .bind(id)
            .bind(&value)
            .execute(&db.pool)
            .await
            .unwrap();
    }

    let (code, summary, text) = run_json(
        run_command(
            &db,
            &["fixed.secret", "bits.secret"],
            &[&old.path],
            &new.path,
        )
        .args(["--batch-size", "7"]),
    );
    assert_eq!(code, 0, "{text}");
    for target in 0..2 {
        let counts = counts(&summary, target);
        assert_eq!(counts["rows_scanned"], 60, "{text}");
        assert_eq!(counts["reencrypted"], 60, "{text}");
    }

    let output = common::binary()
        .args([
            "verify",
            "--database-url",
            &db.url,
            "--target",
            "fixed.secret",
        ])
        .args(["--target", "bits.secret", "--batch-size", "7"])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
}

#[tokio::test]
async fn estimate_counts_unanalyzed_table() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    // Autovacuum would analyze the table and set the estimate itself.
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, secret text NOT NULL) WITH (autovacuum_enabled = false)")
        .await;
    sqlx::query("INSERT INTO t SELECT g, $1 FROM generate_series(1, 1000) g")
        .bind(encrypt_string(&old.key, "one value for every row"))
        .execute(&db.pool)
        .await
        .unwrap();
    let reltuples: f32 = sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE relname = 't'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(reltuples < 0.0, "the new table was analyzed already");

    let (code, _, text) = run_json(&mut run_command(
        &db,
        &["t.secret"],
        &[&old.path],
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    let estimated: i64 =
        sqlx::query_scalar("SELECT sum(rows_estimated)::int8 FROM reencrypt.ranges")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(estimated, 1000);
}

#[tokio::test]
async fn resume_after_kill_and_signal() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 6000;
    fill(&db, "t", rows, &old.key).await;
    let slow = |command: &mut std::process::Command| {
        command.args([
            "--batch-size",
            "200",
            "--max-rows-per-second",
            "2000",
            "--max-sweeps",
            "0",
        ]);
    };

    // SIGKILL part-way.
    let mut command = run_command(&db, &["t.secret"], &[&old.path], &new.path);
    slow(&mut command);
    let mut child = command.stdout(std::process::Stdio::null()).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let scanned: i64 = sqlx::query_scalar("SELECT rows_scanned FROM reencrypt.ranges")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        scanned > 0 && scanned < rows,
        "killed part-way, scanned {scanned}"
    );

    // SIGTERM part-way: exits 4 after a clean checkpoint, and prints the
    // job as the run left it.
    let mut command = run_command(&db, &["t.secret"], &[&old.path], &new.path);
    slow(&mut command);
    command.args(["--format", "json"]);
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let pid = child.id() as i32;
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", output_text(&output));
    let resumed: i64 = sqlx::query_scalar("SELECT rows_scanned FROM reencrypt.ranges")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        resumed > scanned && resumed < rows,
        "second run resumed: {scanned} then {resumed}"
    );
    let stopped: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("no JSON summary: {}", output_text(&output)));
    assert_eq!(stopped["job_finished"], false);
    assert_eq!(counts(&stopped, 0)["rows_scanned"], resumed);

    // The third run finishes; the counts add up to the table.
    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args(["--max-sweeps", "0"]),
    );
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary, 0);
    assert_eq!(counts["rows_scanned"], rows, "{text}");
    assert_eq!(counts["reencrypted"] + counts["current"], rows, "{text}");
    assert_all_rotated(&db, "t", rows, &new.key).await;
}

/// Rows the pass has scanned so far by its checkpoints, or 0 before the run
/// has made its checkpoint tables.
async fn scanned_so_far(db: &TestDb) -> i64 {
    let table_exists: bool =
        sqlx::query_scalar("SELECT to_regclass('reencrypt.ranges') IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    if !table_exists {
        return 0;
    }
    sqlx::query_scalar("SELECT COALESCE(sum(rows_scanned), 0)::int8 FROM reencrypt.ranges")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_writer_is_never_overwritten() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill(&db, "t", rows, &old.key).await;

    let mut command = run_command(&db, &["t.secret"], &[&old.path], &new.path);
    command.args([
        "--batch-size",
        "100",
        "--max-rows-per-second",
        "1000",
        "--format",
        "json",
    ]);
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // The application updates rows under either key while the run goes on,
    // inserts new rows and deletes some. It stops once the pass has scanned
    // two thirds of the rows, so that on a slow machine its last writes still
    // come before the run's sweeps, which then find them all.
    let mut last: HashMap<i64, Option<String>> = HashMap::new();
    let writer_old = old.key.clone();
    let writer_new = new.key.clone();
    let mut rounds = 0;
    for round in 0..200i64 {
        if round % 10 == 0 && scanned_so_far(&db).await >= rows * 2 / 3 {
            break;
        }
        rounds += 1;
        let id = (round * 37) % rows + 1;
        let plaintext = format!("updated-{round}");
        let key = if round % 2 == 0 {
            &writer_old
        } else {
            &writer_new
        };
        sqlx::query("UPDATE t SET secret = $2 WHERE id = $1")
            .bind(id)
            .bind(encrypt_string(key, &plaintext))
            .execute(&db.pool)
            .await
            .unwrap();
        last.insert(id, Some(plaintext));
        if round % 50 == 0 {
            let inserted = rows + 1 + round;
            sqlx::query("INSERT INTO t VALUES ($1, $2)")
                .bind(inserted)
                .bind(encrypt_string(&writer_old, "inserted"))
                .execute(&db.pool)
                .await
                .unwrap();
            last.insert(inserted, Some("inserted".into()));
            let deleted = (round * 11) % rows + 1;
            sqlx::query("DELETE FROM t WHERE id = $1")
                .bind(deleted)
                .execute(&db.pool)
                .await
                .unwrap();
            last.insert(deleted, None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
    assert!(
        rounds >= 10,
        "the application wrote in only {rounds} rounds"
    );

    let after: HashMap<i64, String> =
        sqlx::query_as::<_, (i64, String)>("SELECT id, secret FROM t")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for id in 1..=rows + 200 {
        let expected = match last.get(&id) {
            Some(expected) => expected.clone(),
            None if id <= rows => Some(format!("plaintext-of-row-{id:06}")),
            None => continue,
        };
        match expected {
            None => assert!(!after.contains_key(&id), "deleted row {id} came back"),
            Some(plaintext) => {
                let value = after
                    .get(&id)
                    .unwrap_or_else(|| panic!("row {id} is missing"));
                let read = decrypt_to_string(&new.key, value);
                assert_eq!(
                    read.as_deref().map(String::as_str),
                    Some(plaintext.as_str()),
                    "row {id}"
                );
            }
        }
    }
}

#[tokio::test]
async fn key_types_and_quoted_identifiers() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec(
        "CREATE SCHEMA acc;
         CREATE TABLE acc.\"Webhook Configs\" (\"Id\" uuid PRIMARY KEY, \"Signing Secret\" text);
         CREATE TABLE by_text (k text PRIMARY KEY, v varchar(200));
         CREATE TABLE by_pair (tenant int, name text, v text, PRIMARY KEY (tenant, name));
         CREATE TABLE by_int (id integer PRIMARY KEY, v text);",
    )
    .await;
    for i in 0..300 {
        let value = encrypt_string(&old.key, &format!("plaintext-number-{i:04}"));
        sqlx::query("INSERT INTO acc.\"Webhook Configs\" VALUES (gen_random_uuid(), $1)")
            .bind(&value)
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO by_text VALUES ($1, $2)")
            .bind(format!("key {i} ü"))
            .bind(&value)
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO by_pair VALUES ($1, $2, $3)")
            .bind(i % 7)
            .bind(format!("n{i}"))
            .bind(&value)
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO by_int VALUES ($1, $2)")
            .bind(i - 150)
            .bind(&value)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let targets = [
        "acc.\"Webhook Configs\".\"Signing Secret\"",
        "by_text.v",
        "by_pair.v",
        "by_int.v",
    ];

    // `plan` shows each paging key and its index as they would be typed
    // in SQL.
    let output = common::scan_command("plan", &db, &targets, &old.path, &new.path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let paging_row = |target: &str| {
        text.lines()
            .skip_while(|line| !line.contains("paging key"))
            .find(|line| line.trim_start().starts_with(target))
            .unwrap_or_else(|| panic!("no paging row for {target} in {text}"))
            .to_string()
    };
    let quoted = paging_row("acc.\"Webhook Configs\"");
    assert!(quoted.contains(" \"Id\" "), "{text}");
    assert!(quoted.contains(" \"Webhook Configs_pkey\" "), "{text}");
    assert!(
        paging_row("public.by_pair").contains(" tenant, name "),
        "{text}"
    );
    let (code, summary, text) =
        run_json(run_command(&db, &targets, &[&old.path], &new.path).args(["--batch-size", "37"]));
    assert_eq!(code, 0, "{text}");
    for index in 0..targets.len() {
        let counts = counts(&summary, index);
        assert_eq!(counts["rows_scanned"], 300, "target {index}: {text}");
        assert_eq!(counts["reencrypted"], 300, "target {index}: {text}");
    }
    for (table, column) in [
        ("acc.\"Webhook Configs\"", "\"Signing Secret\""),
        ("by_text", "v"),
        ("by_pair", "v"),
        ("by_int", "v"),
    ] {
        let values: Vec<Option<String>> =
            sqlx::query_scalar(&format!("SELECT {column}::text FROM {table}"))
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let mut plaintexts: Vec<String> = values
            .iter()
            .map(|v| {
                decrypt_to_string(&new.key, v.as_deref().unwrap())
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            })
            .collect();
        plaintexts.sort();
        let mut expected: Vec<String> = (0..300)
            .map(|i| format!("plaintext-number-{i:04}"))
            .collect();
        expected.sort();
        assert_eq!(plaintexts, expected, "{table}");
    }
}

#[tokio::test]
async fn bad_input_exits_2_and_writes_nothing() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec(
        "CREATE DOMAIN cents AS integer;
         CREATE TABLE t (id int PRIMARY KEY, secret text, amount int, price cents,
             shown text GENERATED ALWAYS AS (upper(secret)) STORED);
         CREATE TABLE nokey (secret text);
         CREATE VIEW v AS SELECT * FROM t;",
    )
    .await;
    let value = encrypt_string(&old.key, "keep");
    sqlx::query("INSERT INTO t VALUES (1, $1, 5)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, &new.key.to_hex()[..62]).unwrap();
    let non_hex = dir.path().join("nonhex.key");
    std::fs::write(&non_hex, format!("{}zz", &new.key.to_hex()[..62])).unwrap();
    let missing = dir.path().join("missing.key");

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "equal keys",
            args(&["t.secret"], &old.path, &old.path),
            "equal to the new key",
        ),
        (
            "short key",
            args(&["t.secret"], &old.path, &short),
            "expected a 64-character hex string",
        ),
        (
            "non-hex key",
            args(&["t.secret"], &non_hex, &new.path),
            "expected a 64-character hex string",
        ),
        (
            "missing key file",
            args(&["t.secret"], &old.path, &missing),
            "cannot read key file",
        ),
        (
            "missing table",
            args(&["nosuch.secret"], &old.path, &new.path),
            "table nosuch not found",
        ),
        (
            "missing column",
            args(&["t.nosuch"], &old.path, &new.path),
            "column nosuch not found",
        ),
        (
            "non-text column",
            args(&["t.amount"], &old.path, &new.path),
            "has type integer",
        ),
        (
            "domain over a non-text type",
            args(&["t.price"], &old.path, &new.path),
            "has type cents (a domain over integer)",
        ),
        (
            "unique key of a table no target is in",
            [
                args(&["t.secret"], &old.path, &new.path),
                vec!["--unique-key".into(), "nosuch=id".into()],
            ]
            .concat(),
            "no --target is in",
        ),
        (
            "generated column",
            args(&["t.shown"], &old.path, &new.path),
            "is a generated column",
        ),
        (
            "no primary key",
            args(&["nokey.secret"], &old.path, &new.path),
            "has no primary key",
        ),
        (
            "view",
            args(&["v.secret"], &old.path, &new.path),
            "is a view",
        ),
        (
            "empty target",
            args(&[""], &old.path, &new.path),
            "no target given",
        ),
        (
            "semicolon",
            args(&["t.secret; DROP TABLE t"], &old.path, &new.path),
            "invalid target",
        ),
        (
            "unbalanced quote",
            args(&["t.\"secret"], &old.path, &new.path),
            "unterminated double quote",
        ),
        (
            "key column",
            args(&["t.id"], &old.path, &new.path),
            "has type integer",
        ),
        (
            "duplicate target",
            args(&["t.secret", "public.t.secret"], &old.path, &new.path),
            "given twice",
        ),
        (
            "report in a missing directory",
            with_report(
                args(&["t.secret"], &old.path, &new.path),
                &dir.path().join("no/such/dir/report.json"),
            ),
            "cannot be written",
        ),
        (
            "report path is a directory",
            with_report(args(&["t.secret"], &old.path, &new.path), dir.path()),
            "it is a directory",
        ),
        (
            "report path is a device",
            with_report(
                args(&["t.secret"], &old.path, &new.path),
                std::path::Path::new("/dev/null"),
            ),
            "not a regular file",
        ),
    ];
    for (name, arguments, expected) in cases {
        let output = common::binary()
            .args(&arguments)
            .arg("--database-url")
            .arg(&db.url)
            .output()
            .unwrap();
        let text = output_text(&output);
        assert_eq!(output.status.code(), Some(2), "{name}: {text}");
        assert!(
            text.contains(expected),
            "{name}: expected {expected:?} in\n{text}"
        );
        for key in [&old.key, &new.key] {
            assert!(
                !text.contains(&key.to_hex()[..16]),
                "{name}: key material in the output"
            );
        }
    }
    let stored: String = sqlx::query_scalar("SELECT secret FROM t")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, value);
    let schema: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('reencrypt')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(schema, None, "no checkpoint schema is created on bad input");
}

fn with_report(mut arguments: Vec<String>, path: &std::path::Path) -> Vec<String> {
    arguments.push("--report".into());
    arguments.push(path.display().to_string());
    arguments
}

fn args(targets: &[&str], old: &std::path::Path, new: &std::path::Path) -> Vec<String> {
    let mut out = vec!["run".to_string(), "--metrics-listen".into(), "off".into()];
    for target in targets {
        out.push("--target".into());
        out.push(target.to_string());
    }
    out.extend([
        "--old-key-file".into(),
        old.display().to_string(),
        "--new-key-file".into(),
        new.display().to_string(),
    ]);
    out
}

#[tokio::test]
async fn second_runner_of_a_job_is_refused() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, "t", 3000, &old.key).await;
    let mut first = run_command(&db, &["t.secret"], &[&old.path], &new.path);
    first.args(["--batch-size", "100", "--max-rows-per-second", "150"]);
    let mut first = first
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;

    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("already running"), "{text}");

    // A dry run reports the lease, in JSON and in text.
    let (code, plan, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).arg("--dry-run"));
    assert_eq!(code, 0, "{text}");
    assert_eq!(plan["lease"]["pid"], i64::from(first.id()), "{text}");
    assert_eq!(plan["lease"]["shard"], 0, "{text}");
    assert_eq!(plan["lease"]["would_take_over"], false, "{text}");
    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .arg("--dry-run")
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("lease is held, so a run now would stop or wait: job "),
        "{text}"
    );
    assert!(text.contains(&format!("(pid {}", first.id())), "{text}");

    first.kill().unwrap();
    first.wait().unwrap();

    // Once the runner is gone, the dry run reports that the lease would be
    // taken over.
    let (code, plan, text) =
        run_json(run_command(&db, &["t.secret"], &[&old.path], &new.path).arg("--dry-run"));
    assert_eq!(code, 0, "{text}");
    assert_eq!(plan["lease"]["would_take_over"], true, "{text}");
    // The killed runner's lease is taken over at once on the same host.
    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
    assert_all_rotated(&db, "t", 3000, &new.key).await;
}

#[tokio::test]
async fn resume_with_other_keys_is_refused() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let other_old = KeyFile::generate();
    fill(&db, "t", 50, &old.key).await;
    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--job", "j1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
    let output = run_command(&db, &["t.secret"], &[&other_old.path], &new.path)
        .args(["--job", "j1"])
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("different set of old keys") && text.contains("--restart"),
        "{text}"
    );
    let output = run_command(&db, &["t.secret"], &[&other_old.path], &new.path)
        .args(["--job", "j1", "--restart"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
}

#[tokio::test]
async fn row_level_security_is_rejected() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let role = format!("{}_app", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN;
         CREATE TABLE t (id int PRIMARY KEY, tenant text, secret text);
         ALTER TABLE t OWNER TO {role};
         ALTER TABLE t ENABLE ROW LEVEL SECURITY;
         ALTER TABLE t FORCE ROW LEVEL SECURITY;
         CREATE POLICY tenant_a ON t USING (tenant = 'a');
         GRANT CREATE ON DATABASE {} TO {role};",
        db.name
    ))
    .await;
    let value = encrypt_string(&old.key, "hidden-plaintext-0001");
    sqlx::query("INSERT INTO t VALUES (1, 'b', $1)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();

    let url = format!(
        "{}/{}",
        common::server_url().replace("postgres@", &format!("{role}@")),
        db.name
    );
    let output = common::binary()
        .args([
            "run",
            "--metrics-listen",
            "off",
            "--target",
            "t.secret",
            "--database-url",
            &url,
        ])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .output()
        .unwrap();
    let text = output_text(&output);
    sqlx::raw_sql(&format!(
        "DROP OWNED BY {role}; REVOKE ALL ON DATABASE {} FROM {role}; DROP ROLE {role}",
        db.name
    ))
    .execute(&db.pool)
    .await
    .ok();
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("row-level security"), "{text}");
}

#[tokio::test]
async fn restart_leaves_live_runner_alone() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, "t", 3000, &old.key).await;
    let mut first = run_command(&db, &["t.secret"], &[&old.path], &new.path);
    first.args(["--batch-size", "100", "--max-rows-per-second", "300"]);
    let mut first = first
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .arg("--restart")
        .output()
        .unwrap();
    let text = output_text(&output);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("is running"), "{text}");
}

#[tokio::test]
async fn quoted_commas_stay_in_target_names() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec("CREATE TABLE \"odd, name\" (id int PRIMARY KEY, \"se,cret\" text); CREATE TABLE plain (id int PRIMARY KEY, v text);")
        .await;
    let value = encrypt_string(&old.key, "comma-plaintext-00001");
    sqlx::query("INSERT INTO \"odd, name\" VALUES (1, $1)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO plain VALUES (1, $1)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut command = common::binary();
    command
        .args(["run", "--metrics-listen", "off", "--database-url", &db.url])
        .env("REENCRYPT_TARGETS", "\"odd, name\".\"se,cret\",plain.v")
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path);
    let (code, summary, text) = run_json(&mut command);
    assert_eq!(code, 0, "{text}");
    assert_eq!(counts(&summary, 0)["reencrypted"], 1, "{text}");
    assert_eq!(counts(&summary, 1)["reencrypted"], 1, "{text}");
}

#[tokio::test]
async fn sweep_findings_set_exit_code_3() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, "t", 20, &old.key).await;
    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));

    // After the job finished, a row is rewritten under a key the run was not given.
    let stranger = Key::generate();
    sqlx::query("UPDATE t SET secret = $1 WHERE id = 3")
        .bind(encrypt_string(&stranger, "stranger-plaintext-0001"))
        .execute(&db.pool)
        .await
        .unwrap();
    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains("undecryptable"), "{text}");
}

#[tokio::test]
async fn instead_rule_target_is_rejected() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let value = encrypt_string(&old.key, "kept as it is");
    db.exec(
        "CREATE TABLE ruled (id int PRIMARY KEY, secret text); \
         CREATE TABLE ruled_log (id int, secret text); \
         CREATE RULE ruled_update AS ON UPDATE TO ruled WHERE old.id > 0 \
           DO INSTEAD INSERT INTO ruled_log VALUES (new.id, new.secret)",
    )
    .await;
    sqlx::query("INSERT INTO ruled VALUES (1, $1)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();

    let output = run_command(&db, &["ruled.secret"], &[&old.path], &new.path)
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("table public.ruled has a DO INSTEAD rule on UPDATE"),
        "{text}"
    );
    let output = common::binary()
        .args([
            "plan",
            "--database-url",
            &db.url,
            "--target",
            "ruled.secret",
        ])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "plan stands for a run: {text}"
    );
    assert!(text.contains("DO INSTEAD rule on UPDATE"), "{text}");
    let after = db.values("ruled", "id", "secret").await;
    assert_eq!(after, vec![("1".to_string(), Some(value))]);
}

#[tokio::test]
async fn domain_over_text_is_rotated() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec(
        "CREATE DOMAIN sealed AS text CHECK (VALUE LIKE '%:%'); \
         CREATE DOMAIN sealed_secret AS sealed; \
         CREATE TABLE wrapped (id int PRIMARY KEY, secret sealed_secret)",
    )
    .await;
    for id in 1..=3 {
        sqlx::query("INSERT INTO wrapped VALUES ($1, $2)")
            .bind(id)
            .bind(encrypt_string(&old.key, &format!("wrapped {id}")))
            .execute(&db.pool)
            .await
            .unwrap();
    }

    let (code, summary, text) = run_json(&mut run_command(
        &db,
        &["wrapped.secret"],
        &[&old.path],
        &new.path,
    ));
    assert_eq!(code, 0, "{text}");
    assert_eq!(counts(&summary, 0)["reencrypted"], 3, "{text}");
    for (id, value) in db.values("wrapped", "id", "secret").await {
        let read = decrypt_to_string(&new.key, value.as_deref().unwrap());
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(format!("wrapped {id}").as_str())
        );
    }
}

#[tokio::test]
async fn stop_ends_retries_on_row_lock() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    common::fill(&db, 50, &old.key).await;
    let before = db.values("t", "id", "secret").await;

    // The application holds a row lock that the first batch needs.
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM t WHERE id = 1 FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--lock-timeout-ms", "300", "--max-retries", "50"])
        .args(["--retry-budget-secs", "120", "--progress", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::terminate(&child);
    let status = child.wait().unwrap();
    // Still locked: the run stopped without waiting for the lock or its retries.
    assert_eq!(status.code(), Some(4), "interrupted, not failed");
    lock.rollback().await.unwrap();
    assert_eq!(db.values("t", "id", "secret").await, before);
}

/// Rows of a parent and its child that share a key and are both reported
/// get one entry in the attention list: the outcome that needs action.
#[tokio::test]
async fn repeated_keys_reported_once() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let unknown = Key::generate();
    // Under a key the run is not given, and readable under neither of its keys.
    let foreign = loop {
        let value = encrypt_string(&unknown, "parent 3");
        if decrypt_to_string(&old.key, &value).is_none()
            && decrypt_to_string(&new.key, &value).is_none()
        {
            break value;
        }
    };
    db.exec(
        "CREATE TABLE parent (id bigint PRIMARY KEY, secret text); \
         CREATE TABLE child () INHERITS (parent)",
    )
    .await;
    let rows: Vec<(&str, i64, String)> = vec![
        ("parent", 1, "not encrypted".to_string()),
        ("child", 1, "not encrypted either".to_string()),
        ("parent", 2, encrypt_string(&old.key, "parent 2")),
        ("child", 2, encrypt_string(&old.key, "child 2")),
        ("parent", 3, foreign),
        ("child", 3, "not encrypted".to_string()),
    ];
    for (table, id, value) in &rows {
        sqlx::query(&format!("INSERT INTO {table} VALUES ($1, $2)"))
            .bind(id)
            .bind(value)
            .execute(&db.pool)
            .await
            .unwrap();
    }

    let (code, summary, text) = run_json(&mut run_command(
        &db,
        &["parent.secret"],
        &[&old.path],
        &new.path,
    ));
    assert_eq!(code, 3, "{text}");
    assert_eq!(counts(&summary, 0)["rows_scanned"], 6, "{text}");
    assert_eq!(counts(&summary, 0)["reencrypted"], 2, "{text}");
    assert_eq!(counts(&summary, 0)["not_in_format"], 3, "{text}");
    assert_eq!(counts(&summary, 0)["undecryptable"], 1, "{text}");

    let listed: Vec<(String, String)> =
        sqlx::query_as("SELECT key, outcome FROM reencrypt.attention ORDER BY key")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expected = [
        ("1".to_string(), "not_in_format".to_string()),
        ("3".to_string(), "undecryptable".to_string()),
    ];
    assert_eq!(listed, expected, "{text}");

    for (table, id, value) in &rows {
        let stored: String =
            sqlx::query_scalar(&format!("SELECT secret FROM ONLY {table} WHERE id = $1"))
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if *id == 2 {
            let read = decrypt_to_string(&new.key, &stored);
            let expected = format!("{table} 2");
            assert_eq!(read.as_deref().map(String::as_str), Some(expected.as_str()));
        } else {
            assert_eq!(&stored, value, "{table} {id}");
        }
    }
}

#[tokio::test]
async fn keys_repeated_in_child_tables() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    // The parent's primary key does not cover its child, so every key
    // appears twice; batch boundaries fall inside such pairs.
    db.exec(
        "CREATE TABLE parent (id bigint PRIMARY KEY, secret text); \
         CREATE TABLE child () INHERITS (parent); \
         ALTER TABLE child ADD PRIMARY KEY (id)",
    )
    .await;
    let rows = 2000_i64;
    for table in ["parent", "child"] {
        let ids: Vec<i64> = (1..=rows).collect();
        let values: Vec<String> = ids
            .iter()
            .map(|id| encrypt_string(&old.key, &format!("{table} {id}")))
            .collect();
        sqlx::query(&format!(
            "INSERT INTO {table} SELECT * FROM unnest($1::int8[], $2::text[])"
        ))
        .bind(&ids)
        .bind(&values)
        .execute(&db.pool)
        .await
        .unwrap();
    }

    // A read-only scan counts every row.
    let output = common::binary()
        .args([
            "verify",
            "--database-url",
            &db.url,
            "--target",
            "parent.secret",
        ])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .args(["--batch-size", "333", "--format", "json"])
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(5), "{text}");
    let verify: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verify["targets"][0]["after"]["old_key"], 2 * rows, "{text}");

    let (code, summary, text) = run_json(
        run_command(&db, &["parent.secret"], &[&old.path], &new.path).args(["--batch-size", "333"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(counts(&summary, 0)["rows_scanned"], 2 * rows, "{text}");
    assert_eq!(counts(&summary, 0)["reencrypted"], 2 * rows, "{text}");
    for table in ["parent", "child"] {
        let values: Vec<(i64, String)> =
            sqlx::query_as(&format!("SELECT id, secret FROM ONLY {table} ORDER BY id"))
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(values.len() as i64, rows);
        for (id, value) in values {
            let read = decrypt_to_string(&new.key, &value);
            assert_eq!(
                read.as_deref().map(String::as_str),
                Some(format!("{table} {id}").as_str()),
                "{table} row {id}"
            );
        }
    }
}

#[tokio::test]
async fn stop_ends_throttle_wait() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    common::fill(&db, 200, &old.key).await;
    let before = db.values("t", "id", "secret").await;

    // The first batch waits 10 s for its slot under the rate limit.
    let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--batch-size", "100", "--max-rows-per-second", "10"])
        .args(["--progress", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::terminate(&child);
    assert_eq!(child.wait().unwrap().code(), Some(4));
    // The batch that was waiting was not written.
    assert_eq!(db.values("t", "id", "secret").await, before);
}

#[tokio::test]
async fn text_output_escapes_keys() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let other = KeyFile::generate();
    db.exec("CREATE TABLE k (code text PRIMARY KEY, secret text)")
        .await;
    // Values under a key the run is not given, so every row is listed.
    let forged = "fake\n  public.k.secret  999  ambiguous";
    for code in [forged, "", "\u{1b}[2J"] {
        sqlx::query("INSERT INTO k VALUES ($1, $2)")
            .bind(code)
            .bind(encrypt_string(&other.key, "a secret"))
            .execute(&db.pool)
            .await
            .unwrap();
    }

    let plan = common::scan_command("plan", &db, &["k.secret"], &old.path, &new.path)
        .output()
        .unwrap();
    let run = run_command(&db, &["k.secret"], &[&old.path], &new.path)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(3), "{}", output_text(&run));
    let verify = common::scan_command("verify", &db, &["k.secret"], &old.path, &new.path)
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(3), "{}", output_text(&verify));
    for output in [plan, run, verify] {
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            text.contains(r#""fake\n  public.k.secret  999  ambiguous""#),
            "{text}"
        );
        assert!(text.contains(r#""\u{1b}[2J""#), "{text}");
        assert!(text.contains(r#""""#), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            !text
                .lines()
                .any(|line| line.trim() == "public.k.secret  999  ambiguous"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn dry_run_estimate_counts_throttle() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, "t", 400, &old.key).await;
    let least = |args: &[&str]| {
        let (code, plan, text) = run_json(
            run_command(&db, &["t.secret"], &[&old.path], &new.path)
                .arg("--dry-run")
                .args(args),
        );
        assert_eq!(code, 0, "{text}");
        plan["throttled_seconds_at_least"].as_f64()
    };
    assert_eq!(least(&[]), None);
    // 400 rows at 10 per second.
    assert_eq!(least(&["--max-rows-per-second", "10"]), Some(40.0));
    // One batch can hold every row, and a pause of a minute follows it.
    assert_eq!(least(&["--pause-between-batches-ms", "60000"]), Some(60.0));
    // Two writers of 100 rows per batch: 2 batches each, in parallel.
    assert_eq!(
        least(&[
            "--pause-between-batches-ms",
            "1000",
            "--batch-size",
            "100",
            "--writers",
            "2"
        ]),
        Some(2.0)
    );
    assert_eq!(
        least(&[
            "--pause-between-batches-ms",
            "1000",
            "--max-rows-per-second",
            "100"
        ]),
        Some(4.0)
    );
    // One shard of two reads only part of the rows: no figure.
    assert_eq!(
        least(&[
            "--max-rows-per-second",
            "10",
            "--shard-count",
            "2",
            "--shard-index",
            "0"
        ]),
        None
    );

    let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--dry-run", "--max-rows-per-second", "10"])
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("the run takes at least 40.0s"), "{text}");
}
