//! Shared test harness: a fresh PostgreSQL database per test, key files, the
//! real binary, and the known-answer vectors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::keys::Key;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Server URL without a database; override with REENCRYPT_TEST_PG.
pub fn server_url() -> String {
    std::env::var("REENCRYPT_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A fresh database, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// The server's URL without a database.
    server: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::on(&server_url()).await
    }

    /// Creates a fresh database on the server at `server`, a URL without a database.
    pub async fn on(server: &str) -> TestDb {
        let mut random = [0u8; 6];
        getrandom::getrandom(&mut random).unwrap();
        let name = format!("reencrypt_test_{}", hex::encode(random));
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{server}/postgres"))
            .await
            .expect("PostgreSQL must be running on 127.0.0.1:5432 (see README)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = format!("{server}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap();
        TestDb {
            name,
            url,
            pool,
            server: server.to_string(),
        }
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Values of `column` keyed by the text of `key`, ordered by key.
    pub async fn values(
        &self,
        table: &str,
        key: &str,
        column: &str,
    ) -> Vec<(String, Option<String>)> {
        sqlx::query_as(&format!(
            "SELECT {key}::text, {column}::text FROM {table} ORDER BY {key}"
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let url = format!("{}/postgres", self.server);
        // Dropping needs its own runtime: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(admin) = PgPoolOptions::new().max_connections(1).connect(&url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A key and the file holding it.
pub struct KeyFile {
    pub key: Key,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl KeyFile {
    pub fn new(key: Key) -> KeyFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        std::fs::write(&path, format!("{}\n", key.to_hex().as_str())).unwrap();
        KeyFile {
            key,
            path,
            _dir: dir,
        }
    }

    pub fn generate() -> KeyFile {
        KeyFile::new(Key::generate())
    }

    pub fn from_hex(hex: &str) -> KeyFile {
        KeyFile::new(Key::from_hex(hex).unwrap())
    }
}

/// The binary under test.
pub fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reencrypt"));
    command.env_remove("DATABASE_URL");
    command.env_remove("NEW_ENCRYPTION_KEY");
    command.env_remove("OLD_ENCRYPTION_KEY");
    command.env_remove("VAULT_ADDR");
    command.env_remove("VAULT_TOKEN");
    command.env("RUST_LOG", "warn");
    command
}

/// `reencrypt <subcommand>` with a database, targets and key files.
pub fn scan_command(
    subcommand: &str,
    db: &TestDb,
    targets: &[&str],
    old: &Path,
    new: &Path,
) -> Command {
    let mut command = binary();
    command.arg(subcommand).arg("--database-url").arg(&db.url);
    for target in targets {
        command.arg("--target").arg(target);
    }
    command
        .arg("--old-key-file")
        .arg(old)
        .arg("--new-key-file")
        .arg(new);
    command
}

/// `reencrypt run` on one or more targets with the given key files.
pub fn run_command(db: &TestDb, targets: &[&str], old: &[&Path], new: &Path) -> Command {
    let mut command = binary();
    command
        .arg("run")
        .arg("--database-url")
        .arg(&db.url)
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

pub fn output_text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The known-answer vectors made with Node's crypto.
pub struct Vectors {
    pub key_a: String,
    pub key_b: String,
    pub vectors: Vec<Vector>,
}

pub struct Vector {
    pub name: String,
    pub value: String,
    /// What the application reads with key A; `None` when it cannot read the value.
    pub app_reads_as: Option<String>,
}

/// Path of the shared vectors file, beside the repository.
pub fn vectors_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/cbc-vectors.json")
}

pub fn load_vectors() -> Vectors {
    let text = std::fs::read_to_string(vectors_path())
        .expect("../shared/fixtures/cbc-vectors.json must exist beside the repository");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vectors = json["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Vector {
            name: v["name"].as_str().unwrap().to_string(),
            value: v["value"].as_str().unwrap().to_string(),
            app_reads_as: v["app_reads_as"].as_str().map(str::to_string),
        })
        .collect();
    Vectors {
        key_a: json["keys"]["A"].as_str().unwrap().to_string(),
        key_b: json["keys"]["B"].as_str().unwrap().to_string(),
        vectors,
    }
}

/// A value under key A of the vectors file that also decrypts under key B
/// (found by search: about one random single-block value in 2^23 does).
pub const AMBIGUOUS_UNDER_A_AND_B: &str = "x+vMN2XjzNbHj2yYHTzyIQ==:80YZpAsQyn/e8oWEHN+C7g==";

/// Runs a command with `--format json`; returns the exit code, the parsed
/// summary (`Null` when there is none) and the whole output for messages.
pub fn run_json(command: &mut Command) -> (i32, serde_json::Value, String) {
    let output = command.arg("--format").arg("json").output().unwrap();
    let text = output_text(&output);
    let code = output.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (code, json, text)
}

/// Returns a count from the summary's first target.
pub fn first_target_count(summary: &serde_json::Value, name: &str) -> i64 {
    summary["targets"][0]["counts"][name]
        .as_i64()
        .unwrap_or_else(|| panic!("no count {name} in {summary}"))
}

// A table `t` (bigint key `id`, text `secret`) for tests of whole runs.

/// Fills `t` (bigint key `id`, text `secret`) with old-key values.
pub async fn fill(db: &TestDb, rows: i64, old: &Key) {
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

/// Returns the highest block that contains a row of `t`.
pub async fn last_block(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT max((ctid::text::point)[0])::bigint FROM t")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

pub fn plaintext(id: i64) -> String {
    format!("the plaintext of row number {id:06}")
}

/// Writes `plaintext` under `key` into row `id`, inserting it if missing.
pub async fn put(db: &TestDb, id: i64, key: &Key, plaintext: &str) {
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
pub async fn assert_reads(db: &TestDb, new: &Key, rows: i64, expected: impl Fn(i64) -> String) {
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

/// Sends SIGTERM to a child process, as Kubernetes does to stop a pod.
pub fn terminate(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM failed");
}

/// Encrypts under `key` with fresh IVs until the value does not also decrypt
/// under `other`. By an estimate, one single-block value in 1.6 million also
/// decrypts under a second key (valid padding, about 1 in 256, and 15 random
/// bytes of valid UTF-8, about 1 in 6000). A run rightly leaves such a value
/// as ambiguous, so the tests' data avoids them.
pub fn encrypt_only_under(key: &Key, other: &Key, plaintext: &str) -> String {
    loop {
        let value = encrypt_string(key, plaintext);
        if decrypt_to_string(other, &value).is_none() {
            return value;
        }
    }
}

/// A primary server and a streaming standby of one test's own, on free
/// loopback ports, in a temporary directory. Both are stopped when the value
/// is dropped. The standby applies each change `recovery_min_apply_delay`
/// late, so the primary's `pg_stat_replication` shows a real replay lag.
pub struct ReplicatedServers {
    programs: PathBuf,
    dir: tempfile::TempDir,
    pub primary_port: u16,
}

impl ReplicatedServers {
    /// Starts both servers, the standby applying changes `delay` late.
    pub fn start(delay: std::time::Duration) -> ReplicatedServers {
        let programs = server_programs();
        let dir = tempfile::Builder::new()
            .prefix("reencrypt-replica-")
            .tempdir()
            .unwrap();
        if is_root() {
            // initdb and postgres do not run as root; they run as postgres.
            run_checked(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.path()),
            );
        }
        let servers = ReplicatedServers {
            programs,
            dir,
            primary_port: free_port(),
        };

        let primary = servers.data("primary");
        let standby = servers.data("standby");
        // initdb's -A also applies to replication connections.
        run_checked(
            servers
                .program("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&primary),
        );
        servers.start_server(&primary, servers.primary_port);

        run_checked(
            servers
                .program("pg_basebackup")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-R", "--no-sync", "-p"])
                .arg(servers.primary_port.to_string())
                .arg("-D")
                .arg(&standby),
        );
        servers.set_apply_delay(delay);
        servers.start_server(&standby, free_port());
        servers
    }

    /// Returns the primary's URL, without a database.
    pub fn primary_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.primary_port)
    }

    /// Sets how late the standby applies changes, and reloads its settings
    /// when it runs.
    pub fn set_apply_delay(&self, delay: std::time::Duration) {
        let standby = self.data("standby");
        let settings = standby.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&settings).unwrap_or_default();
        // The last line of a setting wins.
        text.push_str(&format!(
            "recovery_min_apply_delay = '{}ms'\n",
            delay.as_millis()
        ));
        std::fs::write(&settings, text).unwrap();
        if standby.join("postmaster.pid").exists() {
            run_checked(self.program("pg_ctl").arg("reload").arg("-D").arg(&standby));
        }
    }

    fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Returns a command for a server program, run as postgres when this
    /// process is root.
    fn program(&self, name: &str) -> Command {
        let path = self.programs.join(name);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn start_server(&self, data: &Path, port: u16) {
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.dir.path().display()
        );
        run_checked(
            self.program("pg_ctl")
                .args(["start", "-w", "-D"])
                .arg(data)
                .arg("-l")
                .arg(data.with_extension("log"))
                .arg("-o")
                .arg(options),
        );
    }
}

impl Drop for ReplicatedServers {
    fn drop(&mut self) {
        for name in ["standby", "primary"] {
            let data = self.data(name);
            if data.join("postmaster.pid").exists() {
                let _ = self
                    .program("pg_ctl")
                    .args(["stop", "-m", "immediate", "-w", "-D"])
                    .arg(&data)
                    .output();
            }
        }
    }
}

/// Returns the directory of PostgreSQL's server programs, the newest installed.
fn server_programs() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(|version| version.file_name())
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
    });
    found.pop().expect(
        "PostgreSQL's server programs (initdb, pg_ctl, pg_basebackup) must be installed \
         under /usr/lib/postgresql/VERSION/bin",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns a loopback port that was free a moment ago. Another process may
/// take it before the caller binds it, which is unlikely enough for tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command and panics with its output if it fails.
fn run_checked(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        output_text(&output)
    );
}
