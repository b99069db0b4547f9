//! Faults end to end: the real binary killed with SIGKILL, its PostgreSQL
//! restarted, its rows locked or rewritten under it, run through PgBouncer in
//! transaction mode, and given tables that reject a new value or inputs that
//! must be rejected. Every test reads every row back under the new key.
//!
//! The tests that need a cluster or a pooler of their own start them on free
//! ports of 127.0.0.1 and stop them on drop. As root, `initdb` and PgBouncer
//! run as the `postgres` OS user.

mod common;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{encrypt_only_under, output_text, run_command, KeyFile, TestDb};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::keys::Key;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

/// xorshift64: a small generator whose seed is printed, so a failing schedule
/// can be replayed with `REENCRYPT_TEST_SEED`. Timing still varies between runs.
struct Xorshift(u64);

impl Xorshift {
    fn seeded(test: &str) -> Xorshift {
        let seed = std::env::var("REENCRYPT_TEST_SEED")
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{test}: seed {seed} (REENCRYPT_TEST_SEED={seed} replays it)");
        // Zero is the one state xorshift never leaves.
        Xorshift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Returns a number in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// Runs a command and parses its `--format json` summary.
fn run_json(command: &mut Command) -> (i32, serde_json::Value, String) {
    let output = command.arg("--format").arg("json").output().unwrap();
    let text = output_text(&output);
    let code = output.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (code, json, text)
}

fn counts(summary: &serde_json::Value, target: usize) -> HashMap<String, i64> {
    summary["targets"][target]["counts"]
        .as_object()
        .unwrap_or_else(|| panic!("no counts for target {target} in {summary}"))
        .iter()
        .map(|(name, value)| (name.clone(), value.as_i64().unwrap()))
        .collect()
}

/// `reencrypt run` against any database URL, as `common::run_command` builds it.
fn run_at(url: &str, targets: &[&str], old: &[&Path], new: &Path) -> Command {
    let mut command = common::binary();
    command
        .arg("run")
        .arg("--database-url")
        .arg(url)
        .arg("--metrics-listen")
        .arg("off");
    for target in targets {
        command.arg("--target").arg(target);
    }
    for path in old {
        command.arg("--old-key-file").arg(path);
    }
    command.arg("--new-key-file").arg(new);
    command
}

/// Creates `table` (bigint key `id`, text `secret`) holding `rows` values
/// under `old` that do not decrypt under `new`; the plaintext of row `id` is
/// `plain-{id}`.
async fn fill(pool: &PgPool, table: &str, rows: i64, old: &Key, new: &Key) {
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, secret text NOT NULL)"
    ))
    .execute(pool)
    .await
    .unwrap();
    let ids: Vec<i64> = (1..=rows).collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| encrypt_only_under(old, new, &format!("plain-{id}")))
        .collect();
    sqlx::query(&format!(
        "INSERT INTO {table} SELECT * FROM unnest($1::int8[], $2::text[])"
    ))
    .bind(&ids)
    .bind(&values)
    .execute(pool)
    .await
    .unwrap();
}

/// Asserts that `table` contains exactly rows 1..=rows, each reading `plain-{id}`
/// under the new key and nothing under the old one.
async fn assert_all_rotated(pool: &PgPool, table: &str, rows: i64, old: &Key, new: &Key) {
    let after: Vec<(i64, String)> =
        sqlx::query_as(&format!("SELECT id, secret FROM {table} ORDER BY id"))
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(after.len() as i64, rows, "rows in {table}");
    for (index, (id, value)) in after.iter().enumerate() {
        assert_eq!(*id, index as i64 + 1, "{table}: ids are 1..={rows}");
        let read = decrypt_to_string(new, value);
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(format!("plain-{id}").as_str()),
            "{table} row {id} under the new key"
        );
        assert!(
            decrypt_to_string(old, value).is_none(),
            "{table} row {id} still reads under the old key"
        );
    }
}

/// Sums of `rows_scanned` and `reencrypted` over every range; zeros before the
/// checkpoint tables exist.
async fn checkpoint_totals(pool: &PgPool) -> (i64, i64) {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('reencrypt.ranges') IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap();
    if !exists {
        return (0, 0);
    }
    sqlx::query_as(
        "SELECT COALESCE(sum(rows_scanned), 0)::int8, COALESCE(sum(reencrypted), 0)::int8 \
         FROM reencrypt.ranges",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Polls the checkpoint until the rows scanned by every job pass `baseline`,
/// that is until a batch of the run in `child` has committed.
async fn wait_for_progress(
    pool: &PgPool,
    child: &mut Child,
    baseline: i64,
    limit: Duration,
) -> i64 {
    let started = Instant::now();
    loop {
        let (scanned, _) = checkpoint_totals(pool).await;
        if scanned > baseline {
            return scanned;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run exited with {status} before its first batch");
        }
        assert!(
            started.elapsed() < limit,
            "no batch committed within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns a port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, limit: Duration) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < limit,
            "nothing listens on 127.0.0.1:{port} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn running_as_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// A command run as the `postgres` OS user when the test runs as root, since
/// `initdb` and `postgres` reject root; as itself otherwise.
fn as_postgres_user(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A directory the `postgres` OS user owns when the test runs as root.
fn private_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    if running_as_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "chown of {} failed", dir.path().display());
    }
    dir
}

fn run_checked(command: &mut Command, what: &str) {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{what}: {}", output_text(&output));
}

/// The directory of `initdb` and `pg_ctl`: REENCRYPT_TEST_PG_BIN, or the
/// newest /usr/lib/postgresql/<version>/bin.
fn postgres_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("REENCRYPT_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql, or set REENCRYPT_TEST_PG_BIN")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let newest = versions.last().expect("no version in /usr/lib/postgresql");
    PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin"))
}

/// A PostgreSQL cluster of the test's own on a free port, stopped on drop.
struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        let bin = postgres_bin_dir();
        let dir = private_dir("reencrypt-cluster-");
        run_checked(
            as_postgres_user(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]),
            "initdb",
        );
        let port = free_port();
        let cluster = PrivateCluster { dir, bin, port };
        run_checked(
            cluster
                .pg_ctl()
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    cluster.dir.path().display()
                ))
                .arg("start"),
            "pg_ctl start",
        );
        cluster
    }

    /// `pg_ctl` on this cluster, waiting for each action to finish.
    fn pg_ctl(&self) -> Command {
        let mut command = as_postgres_user(&self.bin.join("pg_ctl"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .arg("-w");
        command
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url())
            .await
            .unwrap()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl().args(["-m", "immediate", "stop"]).output();
    }
}

/// A PgBouncer in transaction pooling mode on a free port, in front of one
/// database of the shared test server; killed on drop.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer with two server connections per database, fewer than
    /// a run opens, so that consecutive transactions of one client connection
    /// land on different server connections.
    fn start(database: &str) -> PgBouncer {
        let server = PgConnectOptions::from_str(&common::server_url()).unwrap();
        let dir = private_dir("reencrypt-pgbouncer-");
        let port = free_port();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();

        // sqlx sends extra_float_digits at startup, which PgBouncer must ignore.
        let ini = format!(
            "[databases]\n\
             {database} = host={host} port={server_port} dbname={database}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = transaction\n\
             default_pool_size = 2\n\
             max_client_conn = 200\n\
             ignore_startup_parameters = extra_float_digits\n",
            host = server.get_host(),
            server_port = server.get_port(),
            users = users.display(),
        );
        let config = dir.path().join("pgbouncer.ini");
        std::fs::write(&config, ini).unwrap();

        let mut command = Command::new("/usr/sbin/pgbouncer");
        if running_as_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "PgBouncer must be installed at /usr/sbin/pgbouncer (Debian package pgbouncer)",
            );
        wait_for_port(port, Duration::from_secs(10));
        PgBouncer {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks, after a run was killed, that the checkpoint describes the table
/// exactly: every row up to a range's `last_key` was rewritten, no row past
/// it was, and the counts match the rows rewritten. `original` contains each
/// row's value from before the job.
async fn assert_checkpoint_matches_table(db: &TestDb) -> i64 {
    // A killed client's server backend may still be committing its last
    // batch. Wait for it, so the totals and the rows are read at the same point.
    for _ in 0..200 {
        let backends: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'reencrypt'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if backends == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (scanned, reencrypted) = checkpoint_totals(&db.pool).await;
    let has_ranges = scanned > 0
        || sqlx::query_scalar::<_, bool>("SELECT to_regclass('reencrypt.ranges') IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let (changed, changed_past, unchanged_before): (i64, i64, i64) = if has_ranges {
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE t.secret <> o.secret), \
                    count(*) FILTER (WHERE t.secret <> o.secret AND NOT COALESCE(r.done, false)), \
                    count(*) FILTER (WHERE t.secret = o.secret AND COALESCE(r.done, false)) \
             FROM t JOIN original o USING (id) \
             LEFT JOIN LATERAL ( \
                 SELECT r.last_key IS NOT NULL AND t.id <= r.last_key[1]::int8 AS done \
                 FROM reencrypt.ranges r \
                 WHERE (r.lower_key IS NULL OR t.id > r.lower_key[1]::int8) \
                   AND (r.upper_key IS NULL OR t.id <= r.upper_key[1]::int8)) r ON true",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    } else {
        let changed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM t JOIN original o USING (id) WHERE t.secret <> o.secret",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (changed, changed, 0)
    };
    assert_eq!(changed_past, 0, "rows rewritten past the checkpoint");
    assert_eq!(unchanged_before, 0, "rows left old before the checkpoint");
    assert_eq!(scanned, changed, "rows_scanned against rows rewritten");
    assert_eq!(reencrypted, changed, "reencrypted against rows rewritten");
    scanned
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_nothing() {
    const KILLS: usize = 12;
    // Odd kills count their delay from the run's start, so they can land in
    // its startup (migrations, lease takeover, range split). Even kills count
    // from the run's first committed batch, so they land among batches. At
    // 1200 rows/s an odd run does at most about 1100 rows before its kill (a
    // free first batch and 0.7 s of rows), and an even one about 1800 (also a
    // batch in flight and the polling lag). So twelve runs cannot finish the
    // 20000 rows, and every kill lands while a run is going.
    const RATE: &str = "1200";
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 20_000;
    fill(&db.pool, "t", rows, &old.key, &new.key).await;
    db.exec("CREATE TABLE original AS SELECT id, secret FROM t; ALTER TABLE original ADD PRIMARY KEY (id)")
        .await;
    let mut random = Xorshift::seeded("sigkill_at_random_moments_loses_nothing");

    let mut previous = 0;
    let mut moments = Vec::new();
    for kill in 1..=KILLS {
        let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(["--batch-size", "300", "--writers", "2", "--max-sweeps", "0"])
            .args(["--max-rows-per-second", RATE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let after_first_batch = kill % 2 == 0;
        if after_first_batch {
            wait_for_progress(&db.pool, &mut child, previous, Duration::from_secs(60)).await;
        }
        let delay = random.between(100, 700);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "run {kill} ended before its kill after {delay} ms"
        );
        child.kill().unwrap();
        child.wait().unwrap();

        let scanned = assert_checkpoint_matches_table(&db).await;
        assert!(
            scanned >= previous,
            "kill {kill}: the checkpoint went back from {previous} to {scanned}"
        );
        assert!(scanned < rows, "kill {kill}: the job was already done");
        moments.push((after_first_batch, delay, scanned));
        previous = scanned;
    }
    println!("kills (after the first batch, delay ms, rows scanned): {moments:?}");
    assert!(previous > 0, "no batch committed in {KILLS} runs");

    // An unthrottled run finishes; every row was counted exactly once.
    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--batch-size",
            "300",
            "--writers",
            "2",
            "--max-sweeps",
            "0",
        ]),
    );
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary, 0);
    assert_eq!(counts["rows_scanned"], rows, "{text}");
    assert_eq!(counts["reencrypted"], rows, "{text}");
    assert_eq!(counts["current"], 0, "{text}");
    assert_eq!(counts["conflicts"], 0, "{text}");
    assert_eq!(checkpoint_totals(&db.pool).await, (rows, rows));
    assert_all_rotated(&db.pool, "t", rows, &old.key, &new.key).await;
}

#[tokio::test]
async fn postgres_restart_mid_run_recovers() {
    let cluster = PrivateCluster::start();
    let pool = cluster.pool().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 8000;
    fill(&pool, "t", rows, &old.key, &new.key).await;
    let url = cluster.url();

    let mut child = run_at(&url, &["t.secret"], &[&old.path], &new.path)
        .args(["--batch-size", "200", "--max-rows-per-second", "2000"])
        .args(["--max-sweeps", "0", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let before = wait_for_progress(&pool, &mut child, 0, Duration::from_secs(30)).await;
    pool.close().await;
    run_checked(
        cluster.pg_ctl().args(["-m", "fast", "restart"]),
        "pg_ctl restart",
    );
    let pool = cluster.pool().await;
    let (at_restart, _) = checkpoint_totals(&pool).await;
    assert!(
        at_restart < rows,
        "the run was done before the restart ({before} then {at_restart} rows)"
    );

    // The run either rides over the restart or fails as retryable.
    let output = child.wait_with_output().unwrap();
    let text = output_text(&output);
    let code = output.status.code();
    println!("run across the restart: exit {code:?}, {at_restart} rows scanned at the restart");
    assert!(code == Some(0) || code == Some(1), "{text}");
    if code == Some(1) {
        assert!(text.contains("error:"), "exit 1 without an error: {text}");
    }

    let (code, summary, text) =
        run_json(run_at(&url, &["t.secret"], &[&old.path], &new.path).args(["--max-sweeps", "0"]));
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary, 0);
    assert_eq!(counts["reencrypted"], rows, "{text}");
    // A batch whose commit reply was lost in the restart is written again and
    // its rows then count as current, so only the sum is exact.
    assert_eq!(
        counts["rows_scanned"],
        counts["reencrypted"] + counts["current"],
        "{text}"
    );
    assert_all_rotated(&pool, "t", rows, &old.key, &new.key).await;
    pool.close().await;
}

/// Opens a session that begins a transaction with `statement` (which takes
/// row locks) and keeps it open until the caller commits.
async fn lock_rows(db: &TestDb, statement: &str) -> sqlx::PgConnection {
    let mut locker =
        sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(&db.url).unwrap())
            .await
            .unwrap();
    sqlx::raw_sql(&format!("BEGIN; {statement}"))
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}

/// Runs `command` with `--format json` and warnings logged, commits the
/// `locker`'s transaction after `hold`, and returns the run's output.
async fn run_while_locked(
    command: &mut Command,
    mut locker: sqlx::PgConnection,
    hold: Duration,
) -> std::process::Output {
    let child = command
        .args(["--format", "json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(hold).await;
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    locker.close().await.unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn lock_held_past_retries_names_range() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 100;
    fill(&db.pool, "t", rows, &old.key, &new.key).await;

    // Row 50 stays locked for longer than every retry of its batch.
    let locker = lock_rows(&db, "SELECT id FROM t WHERE id = 50 FOR UPDATE").await;
    let output = run_while_locked(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--batch-size",
            "10",
            "--lock-timeout-ms",
            "200",
            "--max-retries",
            "2",
            "--retry-budget-secs",
            "3",
        ]),
        locker,
        Duration::from_secs(6),
    )
    .await;
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("public.t.secret, range 0: gave up after 2 attempts"),
        "{text}"
    );
    assert!(last.contains("55P03"), "{text}");

    // The batches before the one with the locked row committed, and every
    // later row is unchanged. So the rows under the new key are the first
    // ones, ending before row 50.
    let values: Vec<(i64, String)> = sqlx::query_as("SELECT id, secret FROM t ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(values.len() as i64, rows);
    let read = |key: &Key, value: &str| decrypt_to_string(key, value).map(|p| p.to_string());
    let rotated = values
        .iter()
        .take_while(|(_, value)| read(&new.key, value).is_some())
        .count();
    assert!(
        (10..50).contains(&rotated),
        "{rotated} rows rotated: {text}"
    );
    for (index, (id, value)) in values.iter().enumerate() {
        let key = if index < rotated { &new.key } else { &old.key };
        assert_eq!(read(key, value), Some(format!("plain-{id}")), "row {id}");
    }
}

#[tokio::test]
async fn lock_wait_logs_no_sql() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 500;
    fill(&db.pool, "t", rows, &old.key, &new.key).await;

    // Another session holds a row lock for longer than a second, shorter
    // than the lock timeout: the batch with that row waits, then commits.
    let locker = lock_rows(&db, "SELECT id FROM t WHERE id = 250 FOR UPDATE").await;
    let output = run_while_locked(
        &mut run_command(&db, &["t.secret"], &[&old.path], &new.path),
        locker,
        Duration::from_millis(2500),
    )
    .await;
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("slow statement"), "{text}");
    assert!(!stderr.contains("UPDATE"), "SQL in the log: {text}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(counts(&summary, 0)["reencrypted"], rows, "{text}");
    // The run waited for the lock: without the wait it takes well under a second.
    let seconds = summary["duration_seconds"].as_f64().unwrap_or_default();
    assert!(seconds > 1.5, "the run took {seconds} s: no lock wait");
}

#[tokio::test]
async fn row_locks_past_lock_timeout_are_retried() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill(&db.pool, "t", rows, &old.key, &new.key).await;

    // Another session locks rows 1000..=1100 and, before it commits, rewrites
    // ten of them under the old key.
    let mut locker = lock_rows(
        &db,
        "SELECT id FROM t WHERE id BETWEEN 1000 AND 1100 FOR UPDATE",
    )
    .await;
    for id in 1000..1010i64 {
        sqlx::query("UPDATE t SET secret = $2 WHERE id = $1")
            .bind(id)
            .bind(encrypt_only_under(
                &old.key,
                &new.key,
                &format!("locked-{id}"),
            ))
            .execute(&mut locker)
            .await
            .unwrap();
    }

    let output = run_while_locked(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--batch-size",
            "300",
            "--lock-timeout-ms",
            "200",
        ]),
        locker,
        Duration::from_secs(3),
    )
    .await;
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("lock_timeout") && stderr.contains("retrying"),
        "no lock_timeout retry logged: {text}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let counts = counts(&summary, 0);
    assert_eq!(counts["rows_scanned"], rows, "{text}");
    assert_eq!(counts["reencrypted"], rows, "{text}");

    let after: Vec<(i64, String)> = sqlx::query_as("SELECT id, secret FROM t ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(after.len() as i64, rows);
    for (id, value) in after {
        let expected = if (1000..1010).contains(&id) {
            format!("locked-{id}")
        } else {
            format!("plain-{id}")
        };
        assert_eq!(
            decrypt_to_string(&new.key, &value)
                .as_deref()
                .map(String::as_str),
            Some(expected.as_str()),
            "row {id}"
        );
    }
}

/// What one application writer did: the last plaintext it wrote per row
/// (`None` once deleted) and the rows whose last write went, under the old
/// key, behind the run's checkpoint.
#[derive(Default)]
struct WriterLog {
    last: HashMap<i64, Option<String>>,
    old_key_behind_checkpoint: HashMap<i64, bool>,
    operations: u64,
}

/// Writes each `(id, plaintext)` under `old` only, in one transaction.
async fn write_in_one_transaction(
    pool: &PgPool,
    writes: &[(i64, String)],
    old: &Key,
    new: &Key,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for (id, text) in writes {
        sqlx::query("UPDATE t SET secret = $2 WHERE id = $1")
            .bind(id)
            .bind(encrypt_only_under(old, new, text))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Plays one application writer: makes `operations` updates, inserts and
/// deletes, under either key, of the rows up to `rows` whose id is `index`
/// modulo `writers`, and of rows it inserts.
async fn application_writer(
    pool: PgPool,
    index: i64,
    writers: i64,
    rows: i64,
    keys: (Key, Key),
    seed: u64,
    operations: u64,
) -> WriterLog {
    let (old, new) = keys;
    let mut random = Xorshift(seed | 1);
    let mut live: Vec<i64> = (1..=rows).filter(|id| id % writers == index).collect();
    let mut next_insert = 1_000_000 + index;
    let mut log = WriterLog::default();

    while log.operations < operations {
        log.operations += 1;
        let n = log.operations;
        let plaintext = format!("w{index}-op{n}");
        let choice = random.between(0, 99);
        if choice < 40 {
            // Update any of its rows under a random key.
            let id = live[random.between(0, live.len() as u64 - 1) as usize];
            let under_old = random.between(0, 1) == 0;
            let value = if under_old {
                encrypt_only_under(&old, &new, &plaintext)
            } else {
                encrypt_only_under(&new, &old, &plaintext)
            };
            sqlx::query("UPDATE t SET secret = $2 WHERE id = $1")
                .bind(id)
                .bind(value)
                .execute(&pool)
                .await
                .unwrap();
            log.last.insert(id, Some(plaintext));
            log.old_key_behind_checkpoint.insert(id, false);
        } else if choice < 70 {
            // Write under the old key to a row the main pass has passed, as a
            // stale application replica would; only a sweep can rotate it.
            let behind: Option<i64> = sqlx::query_scalar(
                "SELECT max(last_key[1]::int8) FROM reencrypt.ranges WHERE last_key IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .ok()
            .flatten();
            let Some(behind) = behind else {
                tokio::task::yield_now().await;
                continue;
            };
            let candidates: Vec<i64> = live.iter().copied().filter(|id| *id <= behind).collect();
            if candidates.is_empty() {
                continue;
            }
            let id = candidates[random.between(0, candidates.len() as u64 - 1) as usize];
            sqlx::query("UPDATE t SET secret = $2 WHERE id = $1")
                .bind(id)
                .bind(encrypt_only_under(&old, &new, &plaintext))
                .execute(&pool)
                .await
                .unwrap();
            log.last.insert(id, Some(plaintext));
            log.old_key_behind_checkpoint.insert(id, true);
        } else if choice < 80 {
            // Several rows in one transaction, under the old key, in random
            // order. A batch of the run may lock the same rows in key order,
            // and PostgreSQL may then end this transaction as a deadlock.
            // The application retries it, as a real one would, and logs its
            // writes once it commits.
            let writes: Vec<(i64, String)> = (0..5)
                .map(|part| {
                    let id = live[random.between(0, live.len() as u64 - 1) as usize];
                    (id, format!("{plaintext}-{part}"))
                })
                .collect();
            let mut attempts = 0;
            while let Err(error) = write_in_one_transaction(&pool, &writes, &old, &new).await {
                let deadlock = error
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| code == "40P01");
                assert!(deadlock, "the application's transaction failed: {error}");
                attempts += 1;
                assert!(
                    attempts < 10,
                    "the application's transaction deadlocked {attempts} times"
                );
            }
            for (id, text) in writes {
                log.last.insert(id, Some(text));
                log.old_key_behind_checkpoint.insert(id, false);
            }
        } else if choice < 90 {
            // Insert a row past the range the run fixed at its start.
            let id = next_insert;
            next_insert += writers;
            let under_old = random.between(0, 1) == 0;
            let value = if under_old {
                encrypt_only_under(&old, &new, &plaintext)
            } else {
                encrypt_only_under(&new, &old, &plaintext)
            };
            sqlx::query("INSERT INTO t VALUES ($1, $2)")
                .bind(id)
                .bind(value)
                .execute(&pool)
                .await
                .unwrap();
            live.push(id);
            log.last.insert(id, Some(plaintext));
            log.old_key_behind_checkpoint.insert(id, false);
        } else if live.len() > 1 {
            let position = random.between(0, live.len() as u64 - 1) as usize;
            let id = live.swap_remove(position);
            sqlx::query("DELETE FROM t WHERE id = $1")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            log.last.insert(id, None);
            log.old_key_behind_checkpoint.insert(id, false);
        }
    }
    log
}

#[tokio::test]
async fn concurrent_writers_lose_no_update() {
    const WRITERS: i64 = 4;
    const OPERATIONS: u64 = 300;
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 8000;
    fill(&db.pool, "t", rows, &old.key, &new.key).await;
    let mut random = Xorshift::seeded("concurrent_writers_lose_no_update");

    // Another session locks the last row until every writer is done, so the
    // main pass cannot end before the last write, and the sweeps come after
    // all of them. The run waits on the lock instead of timing out. Its
    // blocked batch locks the rows before the last one, so the writers keep
    // to the rows up to `rows - 1000`.
    let mut locker =
        sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(&db.url).unwrap())
            .await
            .unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT id FROM t WHERE id = {rows} FOR UPDATE"
    ))
    .execute(&mut locker)
    .await
    .unwrap();

    let mut child = run_command(&db, &["t.secret"], &[&old.path], &new.path)
        .args(["--batch-size", "200", "--max-rows-per-second", "2500"])
        .args([
            "--lock-timeout-ms",
            "300000",
            "--statement-timeout-ms",
            "300000",
        ])
        .args(["--max-sweeps", "3", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The writers start once the run has committed a batch, so that some of
    // their writes go behind its checkpoint.
    wait_for_progress(&db.pool, &mut child, 0, Duration::from_secs(60)).await;
    let writer_pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32)
        .connect(&db.url)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|index| {
            tokio::spawn(application_writer(
                writer_pool.clone(),
                index,
                WRITERS,
                rows - 1000,
                (old.key.clone(), new.key.clone()),
                random.next(),
                OPERATIONS,
            ))
        })
        .collect();
    let mut last: HashMap<i64, Option<String>> = HashMap::new();
    let mut behind = 0;
    let mut operations = 0;
    for task in tasks {
        let log = task.await.unwrap();
        operations += log.operations;
        behind += log
            .old_key_behind_checkpoint
            .values()
            .filter(|b| **b)
            .count();
        last.extend(log.last);
    }
    let open_ranges: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reencrypt.ranges WHERE status <> 'done'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(open_ranges > 0, "the main pass ended past the row lock");
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    locker.close().await.unwrap();
    println!(
        "{operations} writes, {behind} rows last written under the old key behind the checkpoint"
    );
    assert!(behind > 0, "no write went behind the checkpoint");

    let output = child.wait_with_output().unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let counts = counts(&summary, 0);
    assert!(
        counts["sweep_reencrypted"] >= behind as i64,
        "the sweeps rotated {} values, but {behind} rows were written behind the checkpoint: {text}",
        counts["sweep_reencrypted"]
    );
    assert_eq!(
        summary["sweep_last_found"], 0,
        "the sweeps converged: {text}"
    );

    let after: HashMap<i64, String> =
        sqlx::query_as::<_, (i64, String)>("SELECT id, secret FROM t")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut expected_rows = 0;
    for id in 1..=rows {
        let expected = match last.get(&id) {
            Some(expected) => expected.clone(),
            None => Some(format!("plain-{id}")),
        };
        match expected {
            None => assert!(!after.contains_key(&id), "deleted row {id} came back"),
            Some(plaintext) => {
                expected_rows += 1;
                let value = after
                    .get(&id)
                    .unwrap_or_else(|| panic!("row {id} is missing"));
                assert_eq!(
                    decrypt_to_string(&new.key, value)
                        .as_deref()
                        .map(String::as_str),
                    Some(plaintext.as_str()),
                    "row {id}"
                );
            }
        }
    }
    for (id, expected) in last.iter().filter(|(id, _)| **id > rows) {
        match expected {
            None => assert!(!after.contains_key(id), "deleted row {id} came back"),
            Some(plaintext) => {
                expected_rows += 1;
                let value = after
                    .get(id)
                    .unwrap_or_else(|| panic!("inserted row {id} is missing"));
                assert_eq!(
                    decrypt_to_string(&new.key, value)
                        .as_deref()
                        .map(String::as_str),
                    Some(plaintext.as_str()),
                    "inserted row {id}"
                );
            }
        }
    }
    assert_eq!(after.len(), expected_rows, "rows in the table");
    writer_pool.close().await;
}

#[tokio::test]
async fn pgbouncer_transaction_mode_run_and_lease() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 3000;
    fill(&db.pool, "t", rows, &old.key, &new.key).await;
    fill(&db.pool, "t2", rows, &old.key, &new.key).await;
    let bouncer = PgBouncer::start(&db.name);
    let url = bouncer.url(&db.name);

    // A whole run through the pooler, with more client connections than
    // server connections.
    let (code, summary, text) =
        run_json(run_at(&url, &["t.secret"], &[&old.path], &new.path).args([
            "--batch-size",
            "250",
            "--writers",
            "2",
        ]));
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary, 0);
    assert_eq!(counts["rows_scanned"], rows, "{text}");
    assert_eq!(counts["reencrypted"], rows, "{text}");
    assert_all_rotated(&db.pool, "t", rows, &old.key, &new.key).await;

    // Two runs of one job through the pooler: the second is rejected.
    let job = |command: &mut Command| {
        command.args(["--job", "through-pgbouncer", "--lease-ttl-secs", "6"]);
    };
    let mut first = run_at(&url, &["t2.secret"], &[&old.path], &new.path);
    job(&mut first);
    let mut first = first
        .args(["--batch-size", "100", "--max-rows-per-second", "1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_progress(&db.pool, &mut first, rows, Duration::from_secs(30)).await;
    let mut second = run_at(&url, &["t2.secret"], &[&old.path], &new.path);
    job(&mut second);
    let output = second.output().unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("already running"), "{text}");

    let output = first.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
    assert_all_rotated(&db.pool, "t2", rows, &old.key, &new.key).await;

    // The read-only commands go through the pooler too.
    let output = common::binary()
        .args(["verify", "--database-url", &url, "--target", "t.secret"])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify: {}",
        output_text(&output)
    );
    let output = common::binary()
        .args(["status", "--database-url", &url, "--format", "json"])
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "status: {text}");
    assert!(
        text.contains("through-pgbouncer"),
        "status lists the job: {text}"
    );
    drop(bouncer);
}

#[tokio::test]
async fn statement_timeout_splits_the_batch() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 600;
    fill(&db.pool, "t", rows, &old.key, &new.key).await;
    // Each rewritten row costs 4 ms, so a batch of 300 rows takes 1.2 s and
    // only batches of at most about 120 rows fit in 500 ms.
    db.exec(
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.004); RETURN NEW; END $$;
         CREATE TRIGGER slow_row BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION slow_row();",
    )
    .await;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--batch-size",
            "300",
            "--statement-timeout-ms",
            "500",
        ]),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("Batch timed out"),
        "no batch was split: {text}"
    );
    let counts = counts(&summary, 0);
    assert_eq!(counts["rows_scanned"], rows, "{text}");
    assert_eq!(counts["reencrypted"], rows, "{text}");
    assert!(
        counts["batches"] > 2,
        "the halves commit on their own: {text}"
    );
    assert_all_rotated(&db.pool, "t", rows, &old.key, &new.key).await;
}

#[tokio::test]
async fn one_mib_values_rotate() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, secret text)")
        .await;
    let mut random = Xorshift::seeded("one_mib_values_rotate");
    let mut expected: HashMap<i64, String> = HashMap::new();
    for id in 1..=40i64 {
        let plaintext = if id % 13 == 5 {
            // 1 MiB of printable ASCII, different in rows 5, 18 and 31.
            (0..1 << 20)
                .map(|_| char::from(b' ' + random.between(0, 94) as u8))
                .collect()
        } else {
            format!("small-{id}")
        };
        sqlx::query("INSERT INTO t VALUES ($1, $2)")
            .bind(id)
            .bind(encrypt_only_under(&old.key, &new.key, &plaintext))
            .execute(&db.pool)
            .await
            .unwrap();
        expected.insert(id, plaintext);
    }

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--batch-max-bytes",
            "2097152",
            "--batch-size",
            "50",
        ]),
    );
    assert_eq!(code, 0, "{text}");
    let counts = counts(&summary, 0);
    assert_eq!(counts["rows_scanned"], 40, "{text}");
    assert_eq!(counts["reencrypted"], 40, "{text}");
    // A batch ends at the first row past 2 MiB of values: rows 1..=18, then 19..=40.
    assert_eq!(counts["batches"], 2, "{text}");
    let after: Vec<(i64, String)> = sqlx::query_as("SELECT id, secret FROM t ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(after.len(), 40);
    for (id, value) in after {
        let read = decrypt_to_string(&new.key, &value);
        assert!(
            read.as_deref().map(String::as_str) == Some(expected[&id].as_str()),
            "row {id} ({} bytes) does not read back under the new key",
            expected[&id].len()
        );
    }
}

#[tokio::test]
async fn rejected_row_spares_its_batch() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();

    // Three tables of 60 rows, each with one row the database rejects once
    // rewritten: too long for varchar(68), a CHECK constraint, a trigger.
    // Short plaintexts give 16-byte ciphertexts, 49 characters canonical.
    db.exec(
        "CREATE TABLE narrow (id int PRIMARY KEY, secret varchar(68));
         CREATE TABLE checked (id int PRIMARY KEY, secret text);
         CREATE TABLE guarded (id int PRIMARY KEY, secret text);
         CREATE FUNCTION reject_row_21() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.id = 21 THEN RAISE EXCEPTION 'row 21 is frozen'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER reject_row_21 BEFORE UPDATE ON guarded
             FOR EACH ROW EXECUTE FUNCTION reject_row_21();",
    )
    .await;
    let mut bad_values: HashMap<&str, (i32, String)> = HashMap::new();
    for table in ["narrow", "checked", "guarded"] {
        for id in 1..=60i32 {
            let value = encrypt_only_under(&old.key, &new.key, &format!("plain-{id}"));
            sqlx::query(&format!("INSERT INTO {table} VALUES ($1, $2)"))
                .bind(id)
                .bind(&value)
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }
    // A 20-byte plaintext gives a 32-byte ciphertext: 69 characters canonical,
    // 66 without base64 padding, which the application reads all the same.
    let lenient = encrypt_only_under(&old.key, &new.key, "twenty bytes of text").replace('=', "");
    assert_eq!(lenient.len(), 66);
    sqlx::query("UPDATE narrow SET secret = $1 WHERE id = 13")
        .bind(&lenient)
        .execute(&db.pool)
        .await
        .unwrap();
    bad_values.insert("narrow", (13, lenient));
    let checked_value: String = sqlx::query_scalar("SELECT secret FROM checked WHERE id = 7")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    db.exec(&format!(
        "ALTER TABLE checked ADD CONSTRAINT row_7_frozen CHECK (id <> 7 OR secret = '{checked_value}')"
    ))
    .await;
    bad_values.insert("checked", (7, checked_value));
    let guarded_value: String = sqlx::query_scalar("SELECT secret FROM guarded WHERE id = 21")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    bad_values.insert("guarded", (21, guarded_value));

    let tables = ["narrow", "checked", "guarded"];
    let targets: Vec<String> = tables.iter().map(|t| format!("{t}.secret")).collect();
    let target_refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    let (code, summary, text) = run_json(
        run_command(&db, &target_refs, &[&old.path], &new.path).args(["--batch-size", "300"]),
    );
    assert_eq!(code, 3, "rejected rows make exit code 3: {text}");
    let attention: Vec<(String, String, String)> =
        serde_json::from_value(summary["attention"].clone()).unwrap();

    for (index, table) in tables.iter().enumerate() {
        let counts = counts(&summary, index);
        assert_eq!(counts["write_rejected"], 1, "{table}: {text}");
        assert_eq!(counts["reencrypted"], 59, "{table}: {text}");
        assert_eq!(counts["batches"], 1, "{table}: one batch: {text}");
        let (bad_id, bad_value) = &bad_values[table];
        assert!(
            attention.contains(&(
                format!("public.{table}.secret"),
                bad_id.to_string(),
                "write_rejected".to_string()
            )),
            "{table}: row {bad_id} is not listed for attention: {attention:?}"
        );

        let after: Vec<(i32, String)> =
            sqlx::query_as(&format!("SELECT id, secret FROM {table} ORDER BY id"))
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(after.len(), 60);
        for (id, value) in after {
            if id == *bad_id {
                assert_eq!(
                    &value, bad_value,
                    "{table}: row {id} must stay byte-for-byte"
                );
            } else {
                assert_eq!(
                    decrypt_to_string(&new.key, &value)
                        .as_deref()
                        .map(String::as_str),
                    Some(format!("plain-{id}").as_str()),
                    "{table}: row {id}"
                );
            }
        }
    }
}

#[tokio::test]
async fn hostile_identifiers_are_quoted() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec(
        r#"CREATE SCHEMA "my ""schema"";";
           CREATE TABLE "my ""schema"";"."we""ird; t" ("i""d" int PRIMARY KEY, "c c" text);
           CREATE TABLE public."we""ird; t" ("i""d" int PRIMARY KEY, "c c" text);"#,
    )
    .await;
    let tables = [r#""my ""schema"";"."we""ird; t""#, r#"public."we""ird; t""#];
    for table in tables {
        for id in 1..=50i32 {
            sqlx::query(&format!("INSERT INTO {table} VALUES ($1, $2)"))
                .bind(id)
                .bind(encrypt_only_under(
                    &old.key,
                    &new.key,
                    &format!("plain-{id}"),
                ))
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }

    let targets = [
        r#"public."we""ird; t"."c c""#,
        r#""my ""schema"";"."we""ird; t"."c c""#,
    ];
    // The checkpoint schema's name is hostile too.
    let (code, summary, text) =
        run_json(run_command(&db, &targets, &[&old.path], &new.path).args([
            "--batch-size",
            "7",
            "--schema",
            "ck\"pt; drop",
        ]));
    assert_eq!(code, 0, "{text}");

    for index in 0..targets.len() {
        let counts = counts(&summary, index);
        assert_eq!(counts["rows_scanned"], 50, "target {index}: {text}");
        assert_eq!(counts["reencrypted"], 50, "target {index}: {text}");
    }
    let checkpoints: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "ck""pt; drop".ranges"#)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checkpoints, 2, "one range per target in the hostile schema");

    for table in tables {
        let after: Vec<(i32, String)> =
            sqlx::query_as(&format!(r#"SELECT "i""d", "c c" FROM {table} ORDER BY 1"#))
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(after.len(), 50);
        for (id, value) in after {
            assert_eq!(
                decrypt_to_string(&new.key, &value)
                    .as_deref()
                    .map(String::as_str),
                Some(format!("plain-{id}").as_str()),
                "{table} row {id}"
            );
        }
    }
}

#[tokio::test]
async fn hostile_inputs_exit_2_and_write_nothing() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec(r#"CREATE TABLE "we""ird; t" (id int PRIMARY KEY, "c c" text)"#)
        .await;
    let value = encrypt_string(&old.key, "keep");
    sqlx::query(r#"INSERT INTO "we""ird; t" VALUES (1, $1)"#)
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write_key = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let new_hex = new.key.to_hex();
    let long = write_key("long.key", format!("{}ab", new_hex.as_str()));
    let inner_space = write_key(
        "space.key",
        format!("{} {}", &new_hex[..32], &new_hex[32..62]),
    );
    let empty = write_key("empty.key", String::new());
    let unicode = write_key("unicode.key", format!("{}é", &new_hex[..63]));
    let good_target = r#"public."we""ird; t"."c c""#;

    // Each case: name, arguments, environment variables, expected message.
    let cases: Vec<(&str, Vec<String>, Environment, &str)> = vec![
        (
            "key two characters too long",
            key_args(good_target, &old.path, &long),
            vec![],
            "got 66 characters",
        ),
        (
            "key with a space inside",
            key_args(good_target, &old.path, &inner_space),
            vec![],
            "expected a 64-character hex string",
        ),
        (
            "empty key file",
            key_args(good_target, &old.path, &empty),
            vec![],
            "got 0 characters",
        ),
        (
            "non-ASCII character in the key",
            key_args(good_target, &old.path, &unicode),
            vec![],
            "non-hex character at position 64",
        ),
        (
            "bad hex in NEW_ENCRYPTION_KEY",
            target_args(good_target, Some(&old.path), None),
            vec![("NEW_ENCRYPTION_KEY", format!("{}xy", &new_hex[..62]))],
            "non-hex character at position 63",
        ),
        (
            "one bad key in OLD_ENCRYPTION_KEY",
            target_args(good_target, None, Some(&new.path)),
            vec![(
                "OLD_ENCRYPTION_KEY",
                format!("{},{}", old.key.to_hex().as_str(), &new_hex[..10]),
            )],
            "got 10 characters",
        ),
        (
            "unquoted semicolon",
            key_args(r#"public.we"ird; t.c c"#, &old.path, &new.path),
            vec![],
            "invalid target",
        ),
        (
            "unescaped quote inside quotes",
            key_args(r#"public."we"ird; t"."c c""#, &old.path, &new.path),
            vec![],
            "invalid target",
        ),
        (
            "four parts",
            key_args(r#"db.public."we""ird; t"."c c""#, &old.path, &new.path),
            vec![],
            "invalid target",
        ),
        (
            "empty quoted identifier",
            key_args(r#"public."".secret"#, &old.path, &new.path),
            vec![],
            "invalid target",
        ),
        (
            "batch size zero",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--batch-size", "0"],
            ),
            vec![],
            "--batch-size must be between 1 and 1000000",
        ),
        (
            "zero lock timeout",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--lock-timeout-ms", "0"],
            ),
            vec![],
            "--lock-timeout-ms must be greater than 0",
        ),
        (
            "rate not a number",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--max-rows-per-second", "NaN"],
            ),
            vec![],
            "--max-rows-per-second must be a positive number",
        ),
        (
            "shard index past the count",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--shard-index", "2", "--shard-count", "2"],
            ),
            vec![],
            "--shard-index must be below --shard-count",
        ),
        (
            "no shards",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--shard-count", "0"],
            ),
            vec![],
            "--shard-count must be at least 1",
        ),
        (
            "writers zero",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--writers", "0"],
            ),
            vec![],
            "--writers must be between 1 and 64",
        ),
        (
            "empty job name",
            with(key_args(good_target, &old.path, &new.path), &["--job", " "]),
            vec![],
            "--job must not be empty",
        ),
        (
            "job name with a line break",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--job", "rotate\njob rotate-2 done"],
            ),
            vec![],
            "contains a control or invisible character",
        ),
        (
            "job name that reorders text",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--job", "abc\u{202e}def"],
            ),
            vec![],
            "contains a control or invisible character",
        ),
        (
            "empty checkpoint schema",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--schema", ""],
            ),
            vec![],
            "--schema must not be empty",
        ),
        (
            "lock timeout past PostgreSQL's limit",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--lock-timeout-ms", "2147483648"],
            ),
            vec![],
            "--lock-timeout-ms must be at most 2147483647",
        ),
        (
            "statement timeout past PostgreSQL's limit",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--statement-timeout-ms", "9999999999"],
            ),
            vec![],
            "--statement-timeout-ms must be at most",
        ),
        (
            "too many crypto threads",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--threads", "100000"],
            ),
            vec![],
            "--threads must be between 1 and 256",
        ),
        (
            "negative report limit",
            with(
                key_args(good_target, &old.path, &new.path),
                &["--report-limit=-5"],
            ),
            vec![],
            "--report-limit must be zero or more",
        ),
    ];
    // A dry run rejects each case as the run does.
    let dry_runs: Vec<_> = cases
        .iter()
        .filter(|(_, arguments, _, _)| arguments.first().is_some_and(|a| a == "run"))
        .map(|(name, arguments, environment, expected)| {
            (
                *name,
                with(arguments.clone(), &["--dry-run"]),
                environment.clone(),
                *expected,
            )
        })
        .collect();
    for (name, arguments, environment, expected) in cases.into_iter().chain(dry_runs) {
        let mut command = common::binary();
        command.args(&arguments).arg("--database-url").arg(&db.url);
        for (variable, value) in &environment {
            command.env(variable, value);
        }
        let output = command.output().unwrap();
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

    let stored: String = sqlx::query_scalar(r#"SELECT "c c" FROM "we""ird; t""#)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, value, "the row is unchanged");
    let schema: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('reencrypt')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(schema, None, "no checkpoint schema is created on bad input");
}

/// A run whose options come partly from the environment: the error it
/// must exit with, the notes it must print, and notes it must not print.
struct EnvironmentCase {
    extra: Vec<&'static str>,
    environment: Environment,
    expected: &'static str,
    notes: Vec<String>,
    absent: Vec<String>,
}

#[test]
fn values_from_environment_named_in_notes() {
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let url = "postgres://postgres@127.0.0.1:1/none";
    let note = |flag: &str, variable: &str| {
        format!(
            "note: {flag} was not given on the command line, so its value came from the environment variable {variable}"
        )
    };
    let cases = vec![
        EnvironmentCase {
            extra: vec![],
            environment: vec![("REENCRYPT_WRITERS", "0".into())],
            expected: "--writers must be between 1 and 64",
            notes: vec![note("--writers", "REENCRYPT_WRITERS")],
            absent: vec![],
        },
        EnvironmentCase {
            extra: vec![],
            environment: vec![("JOB_COMPLETION_INDEX", "3".into())],
            expected: "--shard-index must be below --shard-count",
            notes: vec![note("--shard-index", "JOB_COMPLETION_INDEX")],
            absent: vec![note("--shard-count", "REENCRYPT_SHARD_COUNT")],
        },
        EnvironmentCase {
            extra: vec![],
            environment: vec![("REENCRYPT_SCAN_ORDER", "bogus".into())],
            expected: "invalid value 'bogus' for '--scan-order",
            notes: vec![note("--scan-order", "REENCRYPT_SCAN_ORDER")],
            absent: vec![],
        },
        EnvironmentCase {
            extra: vec!["--writers", "0"],
            environment: vec![("REENCRYPT_WRITERS", "0".into())],
            expected: "--writers must be between 1 and 64",
            notes: vec![],
            absent: vec![note("--writers", "REENCRYPT_WRITERS")],
        },
        EnvironmentCase {
            extra: vec!["--writers=0"],
            environment: vec![("REENCRYPT_WRITERS", "0".into())],
            expected: "--writers must be between 1 and 64",
            notes: vec![],
            absent: vec![note("--writers", "REENCRYPT_WRITERS")],
        },
    ];
    for EnvironmentCase {
        extra,
        environment,
        expected,
        notes,
        absent,
    } in cases
    {
        let mut command = common::binary();
        command
            .args(with(key_args("t.c", &old.path, &new.path), &extra))
            .args(["--database-url", url]);
        for (variable, value) in &environment {
            command.env(variable, value);
        }
        let output = command.output().unwrap();
        let text = output_text(&output);
        assert_eq!(output.status.code(), Some(2), "{environment:?}: {text}");
        assert!(text.contains(expected), "{environment:?}: {text}");
        for note in &notes {
            assert!(text.contains(note.as_str()), "missing {note:?} in\n{text}");
        }
        for note in &absent {
            assert!(
                !text.contains(note.as_str()),
                "unexpected {note:?} in\n{text}"
            );
        }
    }
}

/// Environment variables of one invocation, as (name, value).
type Environment = Vec<(&'static str, String)>;

/// `run` arguments with key files for the old and the new key.
fn key_args(target: &str, old: &Path, new: &Path) -> Vec<String> {
    target_args(target, Some(old), Some(new))
}

/// `run` arguments; a key left out is expected from the environment.
fn target_args(target: &str, old: Option<&Path>, new: Option<&Path>) -> Vec<String> {
    let mut arguments = vec![
        "run".to_string(),
        "--metrics-listen".into(),
        "off".into(),
        "--target".into(),
        target.to_string(),
    ];
    if let Some(old) = old {
        arguments.extend(["--old-key-file".into(), old.display().to_string()]);
    }
    if let Some(new) = new {
        arguments.extend(["--new-key-file".into(), new.display().to_string()]);
    }
    arguments
}

fn with(mut arguments: Vec<String>, extra: &[&str]) -> Vec<String> {
    arguments.extend(extra.iter().map(|a| a.to_string()));
    arguments
}

#[tokio::test]
async fn taken_schema_exits_2() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec("CREATE TABLE t (id int PRIMARY KEY, secret text)")
        .await;
    let value = encrypt_string(&old.key, "kept");
    sqlx::query("INSERT INTO t VALUES (1, $1)")
        .bind(&value)
        .execute(&db.pool)
        .await
        .unwrap();
    // The application already has tables named like the worker's.
    db.exec("CREATE SCHEMA appx; CREATE TABLE appx.runs (id int)")
        .await;
    db.exec("CREATE SCHEMA appj; CREATE TABLE appj.jobs (id int)")
        .await;

    // A dry run rejects them as the run does.
    for dry_run in [&[][..], &["--dry-run"][..]] {
        for schema in ["appx", "appj", "pg_catalog", "pg_toast"] {
            let output = run_command(&db, &["t.secret"], &[&old.path], &new.path)
                .args(["--schema", schema])
                .args(dry_run)
                .output()
                .unwrap();
            let text = output_text(&output);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{schema} {dry_run:?}: {text}"
            );
            assert!(text.contains("--schema"), "{schema}: {text}");
        }
    }
    let after: String = sqlx::query_scalar("SELECT secret FROM t")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, value);
}
