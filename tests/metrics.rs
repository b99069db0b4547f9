//! What an operator watches: the `/metrics` listener, the Pushgateway push,
//! the Grafana dashboard's queries in a real Prometheus, and the progress log
//! lines. The real binary runs against a fresh PostgreSQL database. The
//! Pushgateway and Prometheus are the Debian packages' binaries, started on
//! free loopback ports and killed when the test ends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, KeyFile, TestDb};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::keys::Key;

const PUSHGATEWAY: &str = "/usr/bin/prometheus-pushgateway";
const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// The target every test rotates, as the binary labels it.
const TARGET: &str = "public.t.secret";

/// Outcome labels of `reencrypt_rows_total`, which are also the keys of the
/// summary's counts.
const OUTCOMES: [&str; 8] = [
    "reencrypted",
    "current",
    "null",
    "not_in_format",
    "undecryptable",
    "ambiguous",
    "deleted",
    "write_rejected",
];

const STATES: [&str; 4] = ["running", "finished", "failed", "interrupted"];
const PHASES: [&str; 3] = ["fetch", "crypto", "write"];

/// Kinds of `reencrypt_retries_total` and `reencrypt_errors_total`.
const ERROR_KINDS: [&str; 7] = [
    "connection",
    "deadlock",
    "lock_timeout",
    "statement_timeout",
    "serialization",
    "server_shutdown",
    "database",
];

/// Every label name the product may export. Anything else (a row key, an
/// error message, Prometheus' own `job`) is a defect.
const ALLOWED_LABELS: [&str; 13] = [
    "target",
    "outcome",
    "phase",
    "kind",
    "state",
    "reason",
    "le",
    "job_name",
    "new_key_fingerprint",
    "old_key_fingerprints",
    "new_key_version",
    "old_key_versions",
    "version",
];

// ---------------------------------------------------------------------------
// Processes

/// A child process whose standard output and error go to files, so a long run
/// never blocks on a full pipe. Dropping it kills the process.
struct Running {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a [`Running`] process ended.
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn text(&self) -> String {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Running {
    fn spawn(name: &str, command: &mut Command) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        let child = command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Running {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM, as Kubernetes does when it stops a pod.
    fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", self.name);
    }

    /// Waits for the process to exit, at most `timeout`.
    async fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs after {timeout:?}; stderr:\n{}",
                self.name,
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Finished {
            code: status.code(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `url` until it returns 200, failing early if the server exits.
async fn wait_until_ready(server: &mut Running, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = reqwest::get(url).await {
            if response.status().is_success() {
                return;
            }
        }
        assert!(
            server.is_running(),
            "{} exited before it was ready:\n{}",
            server.name,
            server.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "{} not ready at {url} after 30 s:\n{}",
            server.name,
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a Pushgateway on a free loopback port, without persistence, and
/// returns it with its base URL.
async fn start_pushgateway() -> (Running, String) {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut server = Running::spawn(
        "prometheus-pushgateway",
        Command::new(PUSHGATEWAY)
            .arg(format!("--web.listen-address={address}"))
            .arg("--persistence.file="),
    );
    let url = format!("http://{address}");
    wait_until_ready(&mut server, &format!("{url}/-/ready")).await;
    (server, url)
}

async fn get_text(url: &str) -> String {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.text().await.unwrap()
}

/// TCP ports on which process `pid` listens, from its socket inodes in
/// /proc/PID/fd and the listening sockets (state 0A) in /proc/net/tcp{,6}.
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(link) = std::fs::read_link(entry.unwrap().path()) else {
            continue;
        };
        let link = link.to_string_lossy().to_string();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

// ---------------------------------------------------------------------------
// The Prometheus text format

/// One sample of the Prometheus text exposition format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// Parses the text format: comments are skipped, label values unescaped.
fn parse_samples(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inside) = rest.strip_prefix('{') {
            let mut chars = inside.char_indices().peekable();
            let mut end = inside.len();
            loop {
                // A label name up to `=`, or the closing brace.
                let mut label = String::new();
                let mut closed = false;
                for (i, c) in chars.by_ref() {
                    match c {
                        '}' => {
                            end = i + 1;
                            closed = true;
                            break;
                        }
                        '=' => break,
                        ',' | ' ' => {}
                        _ => label.push(c),
                    }
                }
                if closed {
                    break;
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "in {line}");
                let mut value = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => panic!("unterminated escape in {line}"),
                        },
                        '"' => break,
                        _ => value.push(c),
                    }
                }
                labels.insert(label, value);
            }
            rest = &inside[end..];
        }
        let value_text = rest.split_whitespace().next().unwrap_or_else(|| {
            panic!("no value in {line}");
        });
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("invalid value in {line}")),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// Samples named `name` whose labels include every pair of `labels`.
fn matching<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .collect()
}

/// Returns the value of the one sample that matches, and fails unless exactly one does.
fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = matching(samples, name, labels);
    assert_eq!(
        found.len(),
        1,
        "expected one sample {name}{labels:?}, found {found:?}"
    );
    found[0].value
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Asserts that no form of either key's hex text occurs in `text`.
fn assert_no_key_material(text: &str, keys: &[&Key], context: &str) {
    for key in keys {
        let hex = key.to_hex();
        for form in [hex.to_lowercase(), hex.to_uppercase()] {
            assert!(
                !text.contains(&form[..16]),
                "{context}: key material in the output"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The database and the binary

/// Rows of the test table by outcome, as a run that rotates it must count them.
struct Expected {
    rows: i64,
    reencrypted: i64,
    current: i64,
    null: i64,
}

/// Creates table `t` with `rows` rows: every tenth under the new key, every
/// tenth NULL, the rest under the old key, mixed along the key order so that
/// every batch contains every kind.
async fn fill(db: &TestDb, rows: i64, old: &Key, new: &Key) -> Expected {
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, secret text)")
        .await;
    let mut expected = Expected {
        rows,
        reencrypted: 0,
        current: 0,
        null: 0,
    };
    let ids: Vec<i64> = (1..=rows).collect();
    let values: Vec<Option<String>> = ids
        .iter()
        .map(|id| match id % 10 {
            3 => {
                expected.current += 1;
                Some(encrypt_string(new, &format!("plaintext-of-row-{id:06}")))
            }
            7 => {
                expected.null += 1;
                None
            }
            _ => {
                expected.reencrypted += 1;
                Some(encrypt_string(old, &format!("plaintext-of-row-{id:06}")))
            }
        })
        .collect();
    sqlx::query("INSERT INTO t SELECT * FROM unnest($1::int8[], $2::text[])")
        .bind(&ids)
        .bind(&values)
        .execute(&db.pool)
        .await
        .unwrap();
    // The row estimate comes from the planner's statistics.
    db.exec("ANALYZE t").await;
    expected
}

/// `reencrypt run` on the test table, without a metrics option, so each test
/// chooses how metrics are served.
fn run_command(db: &TestDb, old: &KeyFile, new: &KeyFile) -> Command {
    let mut command = common::binary();
    command
        .arg("run")
        .arg("--database-url")
        .arg(&db.url)
        .arg("--target")
        .arg(TARGET)
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path);
    command
}

/// Scrapes `url` until `ready` accepts the samples, while `run` is still running.
async fn scrape_until(
    run: &mut Running,
    url: &str,
    description: &str,
    ready: impl Fn(&[Sample]) -> bool,
) -> (String, Vec<Sample>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            run.is_running(),
            "the run ended before {description}:\n{}",
            run.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "no {description} after 30 s:\n{}",
            run.stderr()
        );
        if let Ok(response) = reqwest::get(url).await {
            if response.status().is_success() {
                let body = response.text().await.unwrap();
                let samples = parse_samples(&body);
                if ready(&samples) {
                    return (body, samples);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn scrape_during_run_has_every_series() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = fill(&db, 3000, &old.key, &new.key).await;
    let port = free_port();
    let started = unix_now();

    // The listener address comes from the environment variable here.
    let mut run = Running::spawn(
        "reencrypt run",
        run_command(&db, &old, &new)
            .env("REENCRYPT_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .args(["--batch-size", "100", "--max-rows-per-second", "600"]),
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    let (body, samples) = scrape_until(&mut run, &url, "batch in /metrics", |samples| {
        matching(samples, "reencrypt_rows_scanned", &[("target", TARGET)])
            .iter()
            .any(|s| s.value > 0.0)
    })
    .await;
    assert_eq!(
        listening_ports(run.child.id()),
        BTreeSet::from([port]),
        "the process listens on the configured port only"
    );

    // Mid-run: some rows done, not all.
    let scanned = value_of(&samples, "reencrypt_rows_scanned", &[("target", TARGET)]);
    assert!(
        scanned > 0.0 && scanned < expected.rows as f64,
        "scraped mid-run, rows scanned {scanned}"
    );
    assert_eq!(
        value_of(&samples, "reencrypt_rows_estimated", &[("target", TARGET)]),
        expected.rows as f64
    );
    for outcome in OUTCOMES {
        value_of(
            &samples,
            "reencrypt_rows_total",
            &[("target", TARGET), ("outcome", outcome)],
        );
    }
    assert!(
        value_of(
            &samples,
            "reencrypt_rows_total",
            &[("target", TARGET), ("outcome", "reencrypted")]
        ) > 0.0
    );
    let batches = value_of(&samples, "reencrypt_batches_total", &[("target", TARGET)]);
    assert!(batches > 0.0, "batches {batches}");

    // One histogram per phase, with every batch so far in its +Inf bucket.
    for phase in PHASES {
        let labels = [("target", TARGET), ("phase", phase)];
        let count = value_of(&samples, "reencrypt_batch_duration_seconds_count", &labels);
        assert!(count > 0.0, "phase {phase}: count {count}");
        let infinite = value_of(
            &samples,
            "reencrypt_batch_duration_seconds_bucket",
            &[("target", TARGET), ("phase", phase), ("le", "+Inf")],
        );
        assert_eq!(infinite, count, "phase {phase}");
        let sum = value_of(&samples, "reencrypt_batch_duration_seconds_sum", &labels);
        assert!(sum >= 0.0, "phase {phase}: sum {sum}");
    }

    let checkpoint = value_of(
        &samples,
        "reencrypt_last_checkpoint_timestamp_seconds",
        &[("target", TARGET)],
    );
    assert!(
        checkpoint >= started - 1.0 && checkpoint <= unix_now() + 1.0,
        "last checkpoint {checkpoint}, test started {started}"
    );
    for kind in ERROR_KINDS {
        assert_eq!(
            value_of(&samples, "reencrypt_retries_total", &[("kind", kind)]),
            0.0
        );
        assert_eq!(
            value_of(&samples, "reencrypt_errors_total", &[("kind", kind)]),
            0.0
        );
    }

    // The job: identified by fingerprints, running, and never by key bytes.
    let info = matching(&samples, "reencrypt_job_info", &[]);
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].value, 1.0);
    assert!(
        info[0].label("job_name").is_some_and(|j| !j.is_empty()),
        "{info:?}"
    );
    assert_eq!(
        info[0].label("new_key_fingerprint"),
        Some(new.key.fingerprint().as_str())
    );
    assert_eq!(
        info[0].label("old_key_fingerprints"),
        Some(old.key.fingerprint().as_str())
    );
    assert_eq!(info[0].label("new_key_version"), Some(""));
    for state in STATES {
        let expected_value = if state == "running" { 1.0 } else { 0.0 };
        assert_eq!(
            value_of(&samples, "reencrypt_job_state", &[("state", state)]),
            expected_value,
            "state {state}"
        );
    }
    let job_started = value_of(&samples, "reencrypt_job_start_timestamp_seconds", &[]);
    assert!(job_started >= started - 1.0, "job start {job_started}");
    assert!(
        matching(
            &samples,
            "reencrypt_job_last_success_timestamp_seconds",
            &[]
        )
        .is_empty(),
        "no success time while running"
    );

    // Names and labels come from the fixed sets.
    for sample in &samples {
        assert!(
            sample.name.starts_with("reencrypt_"),
            "unexpected metric {}",
            sample.name
        );
        for label in sample.labels.keys() {
            assert!(
                ALLOWED_LABELS.contains(&label.as_str()),
                "unexpected label {label} on {}",
                sample.name
            );
        }
    }
    assert_no_key_material(&body, &[&old.key, &new.key], "/metrics");

    let finished = run.wait(Duration::from_secs(30)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.text());
}

#[tokio::test]
async fn replication_lag_pauses_writes() {
    // The standby applies each change 6 s late, over the run's 2 s limit.
    let servers = common::ReplicatedServers::start(Duration::from_secs(6));
    let db = TestDb::on(&servers.primary_url()).await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = fill(&db, 300, &old.key, &new.key).await;

    // Writes on the primary keep the lag up until the run has paused.
    db.exec("CREATE TABLE activity (at timestamptz)").await;
    let keep_writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let pool = db.pool.clone();
        let keep_writing = keep_writing.clone();
        tokio::spawn(async move {
            while keep_writing.load(std::sync::atomic::Ordering::SeqCst) {
                sqlx::query("INSERT INTO activity VALUES (now())")
                    .execute(&pool)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag: f64 = sqlx::query_scalar(
            "SELECT COALESCE(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if lag > 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby's replay lag stayed at {lag} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let port = free_port();
    let mut run = Running::spawn(
        "reencrypt run",
        run_command(&db, &old, &new)
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .args(["--max-replication-lag-secs", "2", "--batch-size", "100"])
            .args(["--format", "json"])
            .env("RUST_LOG", "info"),
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    let labels = [("reason", "replication_lag")];
    scrape_until(&mut run, &url, "a pause for replication lag", |samples| {
        matching(samples, "reencrypt_throttled", &labels)
            .iter()
            .any(|s| s.value == 1.0)
    })
    .await;
    // The first check comes before the first write, so nothing is written yet.
    let values: Vec<Option<String>> = sqlx::query_scalar("SELECT secret FROM t")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let under_new = values
        .iter()
        .flatten()
        .filter(|value| decrypt_to_string(&new.key, value).is_some())
        .count() as i64;
    assert_eq!(
        under_new, expected.current,
        "rows under the new key during the pause"
    );

    // Once the standby catches up, the run goes on and finishes.
    keep_writing.store(false, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    servers.set_apply_delay(Duration::ZERO);
    let finished = run.wait(Duration::from_secs(120)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.text());
    assert!(
        finished
            .stderr
            .contains("Replication lag above the limit; pausing writes."),
        "{}",
        finished.text()
    );
    let summary: serde_json::Value = serde_json::from_str(&finished.stdout).unwrap();
    let counts = &summary["targets"][0]["counts"];
    assert_eq!(counts["reencrypted"], expected.reencrypted, "{summary}");
    assert_eq!(counts["current"], expected.current, "{summary}");
    assert_eq!(counts["null"], expected.null, "{summary}");
    let values: Vec<(i64, Option<String>)> = sqlx::query_as("SELECT id, secret FROM t ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for (id, value) in values {
        let read = value.map(|v| decrypt_to_string(&new.key, &v).map(|p| p.to_string()));
        match id % 10 {
            7 => assert_eq!(read, None, "row {id}"),
            _ => assert_eq!(
                read,
                Some(Some(format!("plaintext-of-row-{id:06}"))),
                "row {id}"
            ),
        }
    }
}

#[tokio::test]
async fn listener_off_and_bad_addresses() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    fill(&db, 1000, &old.key, &new.key).await;

    // A port already taken and an address that does not parse are both
    // configuration errors, reported before the database is touched.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap().to_string();
    for (address, message) in [
        (taken_address.as_str(), "cannot serve metrics on"),
        ("localhost:http", "invalid --metrics-listen"),
        ("9464", "invalid --metrics-listen"),
    ] {
        let output = run_command(&db, &old, &new)
            .args(["--metrics-listen", address])
            .output()
            .unwrap();
        let text = common::output_text(&output);
        assert_eq!(output.status.code(), Some(2), "{address}: {text}");
        assert!(text.contains(message), "{address}: {text}");
    }
    let schema: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('reencrypt')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(schema, None, "no checkpoint schema after a bad address");

    // `off`, here from the environment variable, serves nothing.
    let mut run = Running::spawn(
        "reencrypt run",
        run_command(&db, &old, &new)
            .env("REENCRYPT_METRICS_LISTEN", "off")
            .args(["--batch-size", "50", "--max-rows-per-second", "500"]),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(run.is_running(), "{}", run.stderr());
    assert_eq!(listening_ports(run.child.id()), BTreeSet::new());
    let finished = run.wait(Duration::from_secs(30)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.text());
}

#[tokio::test]
async fn pushgateway_has_final_counts() {
    let (_pushgateway, pushgateway_url) = start_pushgateway().await;
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = fill(&db, 2000, &old.key, &new.key).await;
    let started = unix_now();

    let run = Running::spawn(
        "reencrypt run",
        run_command(&db, &old, &new)
            .args(["--metrics-listen", "off"])
            .args(["--pushgateway-url", &pushgateway_url])
            .args(["--push-interval-secs", "1", "--batch-size", "150"])
            .args(["--format", "json"]),
    );
    let finished = run.wait(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.text());
    let summary: serde_json::Value = serde_json::from_str(&finished.stdout)
        .unwrap_or_else(|e| panic!("invalid summary ({e}): {}", finished.text()));
    let job = summary["job"].as_str().unwrap().to_string();
    let counts = &summary["targets"][0]["counts"];
    assert_eq!(counts["rows_scanned"], expected.rows, "{summary}");
    assert_eq!(counts["reencrypted"], expected.reencrypted, "{summary}");
    assert_eq!(counts["current"], expected.current, "{summary}");
    assert_eq!(counts["null"], expected.null, "{summary}");

    // The final push is in the job's group and matches the summary exactly.
    let body = get_text(&format!("{pushgateway_url}/metrics")).await;
    let all = parse_samples(&body);
    let group: Vec<Sample> = all
        .iter()
        .filter(|s| s.name.starts_with("reencrypt_"))
        .cloned()
        .collect();
    for sample in &group {
        assert_eq!(sample.label("job"), Some(job.as_str()), "{sample:?}");
        assert_eq!(sample.label("shard"), Some("0"), "{sample:?}");
    }
    for outcome in OUTCOMES {
        assert_eq!(
            value_of(
                &group,
                "reencrypt_rows_total",
                &[("target", TARGET), ("outcome", outcome)]
            ),
            counts[outcome].as_f64().unwrap(),
            "outcome {outcome}"
        );
    }
    assert_eq!(
        value_of(&group, "reencrypt_rows_scanned", &[("target", TARGET)]),
        expected.rows as f64
    );
    assert_eq!(
        value_of(&group, "reencrypt_conflicts_total", &[("target", TARGET)]),
        counts["conflicts"].as_f64().unwrap()
    );
    assert_eq!(
        value_of(
            &group,
            "reencrypt_sweep_rows_reencrypted_total",
            &[("target", TARGET)]
        ),
        counts["sweep_reencrypted"].as_f64().unwrap()
    );
    // The summary counts the main pass's batches; the metric also counts the sweep's.
    let batches = value_of(&group, "reencrypt_batches_total", &[("target", TARGET)]);
    assert!(
        batches >= counts["batches"].as_f64().unwrap(),
        "{batches} batches in the metric, {} in the summary",
        counts["batches"]
    );
    let info = matching(&group, "reencrypt_job_info", &[]);
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].label("job_name"), Some(job.as_str()));
    for state in STATES {
        let expected_value = if state == "finished" { 1.0 } else { 0.0 };
        assert_eq!(
            value_of(&group, "reencrypt_job_state", &[("state", state)]),
            expected_value,
            "state {state}"
        );
    }
    let success = value_of(&group, "reencrypt_job_last_success_timestamp_seconds", &[]);
    assert!(
        success >= started && success <= unix_now(),
        "last success {success}, test started {started}"
    );
    value_of(&all, "push_time_seconds", &[("job", job.as_str())]);
    assert_no_key_material(&body, &[&old.key, &new.key], "Pushgateway");
}

#[tokio::test]
async fn interrupted_run_pushes_no_success_time() {
    let (_pushgateway, pushgateway_url) = start_pushgateway().await;
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = fill(&db, 6000, &old.key, &new.key).await;
    let metrics_url = format!("{pushgateway_url}/metrics");
    let command = || {
        let mut command = run_command(&db, &old, &new);
        command
            .args(["--metrics-listen", "off"])
            .args(["--pushgateway-url", &pushgateway_url])
            .args(["--push-interval-secs", "1"]);
        command
    };

    // A periodic push shows the running job under its own name.
    let mut run = Running::spawn(
        "reencrypt run",
        command().args(["--batch-size", "100", "--max-rows-per-second", "1000"]),
    );
    let (_, samples) = scrape_until(&mut run, &metrics_url, "periodic push", |samples| {
        matching(samples, "reencrypt_job_state", &[("state", "running")])
            .iter()
            .any(|s| s.value == 1.0)
    })
    .await;
    let info = matching(&samples, "reencrypt_job_info", &[]);
    assert_eq!(info.len(), 1, "{info:?}");
    let job = info[0].label("job_name").unwrap().to_string();
    for sample in samples.iter().filter(|s| s.name.starts_with("reencrypt_")) {
        assert_eq!(sample.label("job"), Some(job.as_str()), "{sample:?}");
    }

    // SIGTERM: exit 4, and the final push records that state, without a success time.
    run.terminate();
    let finished = run.wait(Duration::from_secs(30)).await;
    assert_eq!(finished.code, Some(4), "{}", finished.text());
    let samples = parse_samples(&get_text(&metrics_url).await);
    for state in STATES {
        let expected_value = if state == "interrupted" { 1.0 } else { 0.0 };
        assert_eq!(
            value_of(
                &samples,
                "reencrypt_job_state",
                &[("job", job.as_str()), ("state", state)]
            ),
            expected_value,
            "state {state} after SIGTERM"
        );
    }
    assert!(
        matching(
            &samples,
            "reencrypt_job_last_success_timestamp_seconds",
            &[]
        )
        .is_empty(),
        "an interrupted run pushes no success time"
    );
    let done = value_of(
        &samples,
        "reencrypt_rows_total",
        &[("job", job.as_str()), ("outcome", "reencrypted")],
    );
    assert!(
        done > 0.0 && done < expected.reencrypted as f64,
        "interrupted part-way, {done} rows re-encrypted"
    );

    // The rerun resumes the same job and replaces its group with success.
    let finished = Running::spawn("reencrypt run", &mut command())
        .wait(Duration::from_secs(60))
        .await;
    assert_eq!(finished.code, Some(0), "{}", finished.text());
    let samples = parse_samples(&get_text(&metrics_url).await);
    assert_eq!(
        value_of(
            &samples,
            "reencrypt_job_state",
            &[("job", job.as_str()), ("state", "finished")]
        ),
        1.0
    );
    value_of(
        &samples,
        "reencrypt_job_last_success_timestamp_seconds",
        &[("job", job.as_str())],
    );
    let rerun_done = value_of(
        &samples,
        "reencrypt_rows_total",
        &[("job", job.as_str()), ("outcome", "reencrypted")],
    );
    assert_eq!(
        done + rerun_done,
        expected.reencrypted as f64,
        "the two runs' counters add up to the table"
    );
}

#[tokio::test]
async fn progress_log_lines_are_json() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = fill(&db, 3000, &old.key, &new.key).await;

    // Standard error is a file, not a terminal, so progress comes as log lines.
    let run = Running::spawn(
        "reencrypt run",
        run_command(&db, &old, &new)
            .env("RUST_LOG", "warn,reencrypt::progress=info")
            .args(["--log-format", "json", "--metrics-listen", "off"])
            .args(["--progress-interval-secs", "1"])
            .args(["--batch-size", "100", "--max-rows-per-second", "800"]),
    );
    let finished = run.wait(Duration::from_secs(30)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.text());

    let mut progress = Vec::new();
    for line in finished.stderr.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert_ne!(
            event["message"], "Job started.",
            "RUST_LOG hides reencrypt::run's info lines"
        );
        if event["message"] == "Progress." {
            progress.push(event);
        }
    }
    assert!(
        progress.len() >= 2,
        "expected a progress line a second: {}",
        finished.stderr
    );

    let mut previous = 0;
    let mut mid_run = 0;
    for event in &progress {
        assert_eq!(event["level"], "INFO", "{event}");
        assert_eq!(event["target"], TARGET, "{event}");
        assert_eq!(event["rows_estimated"], expected.rows, "{event}");
        let done = event["rows_done"]
            .as_i64()
            .unwrap_or_else(|| panic!("no rows_done: {event}"));
        assert!(done >= previous, "rows_done went back: {event}");
        previous = done;
        let rate = event["rows_per_second"]
            .as_i64()
            .unwrap_or_else(|| panic!("no rows_per_second: {event}"));
        assert!(rate <= 1200, "above the 800 rows/s limit: {event}");
        if done > 0 && done < expected.rows {
            mid_run += 1;
            assert!(rate > 0, "{event}");
            let eta = event["eta_seconds"]
                .as_i64()
                .unwrap_or_else(|| panic!("no eta_seconds: {event}"));
            let remaining = (expected.rows - done) as f64 / rate as f64;
            assert!(
                (eta as f64 - remaining).abs() <= 1.0,
                "ETA {eta} s for {remaining:.1} s of rows left: {event}"
            );
        }
    }
    assert!(mid_run >= 1, "no progress line mid-run: {progress:?}");
}

/// Grafana's built-in variables and the values the test gives them.
const GRAFANA_BUILT_INS: [(&str, &str); 8] = [
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("${__interval_ms}", "60000"),
    ("$__interval_ms", "60000"),
    ("${__interval}", "1m"),
    ("$__interval", "1m"),
    ("${__range}", "5m"),
    ("$__range", "5m"),
];

/// Replaces Grafana's built-in variables and any dashboard variable
/// (`$target`, `${target}`, `[[target]]`) with the regex `.*`, which selects
/// every value.
fn substitute_variables(expr: &str) -> String {
    let mut text = expr.to_string();
    for (variable, value) in GRAFANA_BUILT_INS {
        text = text.replace(variable, value);
    }
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' if chars.peek() == Some(&'{') => {
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                }
                out.push_str(".*");
            }
            // `$1` in a label_replace() replacement is not a variable.
            '$' if chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_') =>
            {
                while chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    chars.next();
                }
                out.push_str(".*");
            }
            '[' if chars.peek() == Some(&'[') => {
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                }
                chars.next();
                out.push_str(".*");
            }
            _ => out.push(c),
        }
    }
    out
}

/// Collects every (panel title, query) of a dashboard, rows and nested panels included.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut queries = Vec::new();
    walk(&dashboard["panels"], &mut queries);
    queries
}

/// Rewrites the shipped Prometheus configuration to scrape this test's
/// servers every second. Scrape jobs keep their names and labels.
fn test_prometheus_config(shipped: &Path, addresses: &BTreeMap<&str, String>) -> String {
    let text = std::fs::read_to_string(shipped).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    config["global"]["scrape_interval"] = "1s".into();
    config["global"]["scrape_timeout"] = "1s".into();
    config["global"]["evaluation_interval"] = "1s".into();
    let jobs = config["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs is a list");
    for job in jobs.iter_mut() {
        let name = job["job_name"].as_str().unwrap().to_string();
        let address = addresses.get(name.as_str()).unwrap_or_else(|| {
            panic!("the test cannot point scrape job {name:?} at a loopback server")
        });
        let job = job.as_mapping_mut().unwrap();
        job.insert("scrape_interval".into(), "1s".into());
        job.remove("scrape_timeout");
        let statics = job
            .get_mut("static_configs")
            .and_then(|s| s.as_sequence_mut())
            .unwrap_or_else(|| panic!("scrape job {name:?} has no static_configs"));
        for group in statics.iter_mut() {
            group["targets"] = serde_yaml::Value::Sequence(vec![address.clone().into()]);
        }
    }
    serde_yaml::to_string(&config).unwrap()
}

/// Runs one instant query and returns the result vector.
async fn prometheus_query(
    prometheus_url: &str,
    query: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let response = reqwest::Client::new()
        .get(format!("{prometheus_url}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let text = response
        .text()
        .await
        .map_err(|e| format!("cannot read the response: {e}"))?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("invalid response ({e}): {text}"))?;
    if body["status"] != "success" {
        return Err(format!("{} {}", body["errorType"], body["error"]));
    }
    let data = &body["data"];
    match data["resultType"].as_str() {
        Some("vector") | Some("matrix") => {
            Ok(data["result"].as_array().cloned().unwrap_or_default())
        }
        // A scalar or a string is one value.
        _ => Ok(vec![data["result"].clone()]),
    }
}

#[tokio::test]
async fn dashboard_queries_return_data() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped_config = root.join("deploy/monitoring/prometheus.yml");
    let dashboard_path = root.join("grafana/dashboards/reencrypt.json");

    // The shipped configuration is valid as it is.
    let check = Command::new(PROMTOOL)
        .arg("check")
        .arg("config")
        .arg(&shipped_config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check config: {}",
        common::output_text(&check)
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&dashboard_path)
            .unwrap_or_else(|e| panic!("{}: {e}", dashboard_path.display())),
    )
    .unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(!queries.is_empty(), "the dashboard has no queries");

    // Pushgateway, then Prometheus scraping it and the run's listener.
    let (_pushgateway, pushgateway_url) = start_pushgateway().await;
    let metrics_port = free_port();
    let prometheus_port = free_port();
    let prometheus_dir = tempfile::tempdir().unwrap();
    let config_path = prometheus_dir.path().join("prometheus.yml");
    let addresses = BTreeMap::from([
        ("reencrypt", format!("127.0.0.1:{metrics_port}")),
        (
            "pushgateway",
            pushgateway_url.trim_start_matches("http://").to_string(),
        ),
    ]);
    std::fs::write(
        &config_path,
        test_prometheus_config(&shipped_config, &addresses),
    )
    .unwrap();
    let prometheus_url = format!("http://127.0.0.1:{prometheus_port}");
    let mut prometheus = Running::spawn(
        "prometheus",
        Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prometheus_dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}")),
    );
    wait_until_ready(&mut prometheus, &format!("{prometheus_url}/-/ready")).await;

    // About 24 s of work at 150 rows/s, so Prometheus scrapes the listener
    // many times. The sweep reads only changed rows, and none change here.
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let expected = fill(&db, 3600, &old.key, &new.key).await;

    // A row lock held by "the application" makes one batch retry on lock_timeout.
    let mut application = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM t WHERE id = 2000 FOR UPDATE")
        .execute(&mut *application)
        .await
        .unwrap();
    let mut run = Running::spawn(
        "reencrypt run",
        run_command(&db, &old, &new)
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--pushgateway-url", &pushgateway_url])
            .args(["--push-interval-secs", "1", "--lock-timeout-ms", "200"])
            .args(["--batch-size", "100", "--max-rows-per-second", "150"])
            .args(["--format", "json"]),
    );
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    scrape_until(&mut run, &metrics_url, "lock_timeout retry", |samples| {
        matching(
            samples,
            "reencrypt_retries_total",
            &[("kind", "lock_timeout")],
        )
        .iter()
        .any(|s| s.value > 0.0)
    })
    .await;
    application.commit().await.unwrap();
    let finished = run.wait(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.text());
    let summary: serde_json::Value = serde_json::from_str(&finished.stdout).unwrap();
    let job = summary["job"].as_str().unwrap().to_string();
    assert_eq!(
        summary["targets"][0]["counts"]["reencrypted"],
        expected.reencrypted
    );

    // Let Prometheus scrape the final push.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let direct = prometheus_query(
        &prometheus_url,
        "count_over_time(reencrypt_rows_scanned{job=\"reencrypt\"}[5m])",
    )
    .await
    .unwrap();
    let scrapes: f64 = direct
        .first()
        .and_then(|r| r["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        scrapes >= 10.0,
        "Prometheus scraped the listener {scrapes} times: {direct:?}"
    );

    // Every panel's query, and every metric it names, returns data.
    let mut failures = Vec::new();
    let mut names = BTreeSet::new();
    for (title, expr) in &queries {
        let query = substitute_variables(expr);
        let mut rest = query.as_str();
        while let Some(start) = rest.find("reencrypt_") {
            let name: String = rest[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[start + name.len()..];
            names.insert(name);
        }
        match prometheus_query(&prometheus_url, &query).await {
            Err(error) => failures.push(format!("{title}: {query}: {error}")),
            Ok(result) if result.is_empty() => failures.push(format!("{title}: {query}: no data")),
            Ok(result) if query.contains("reencrypt_job_info") => {
                for series in &result {
                    if series["metric"]["job_name"] != job.as_str() {
                        failures.push(format!(
                            "{title}: {query}: expected job_name {job:?} in {series}"
                        ));
                    }
                }
            }
            Ok(_) => {}
        }
    }
    for name in &names {
        let query = format!("count({name})");
        match prometheus_query(&prometheus_url, &query).await {
            Ok(result) if !result.is_empty() => {}
            other => failures.push(format!("metric {name} has no series: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries without data:\n{}",
        failures.join("\n")
    );
    assert!(
        names.contains("reencrypt_rows_total"),
        "the dashboard shows rows by outcome: {names:?}"
    );
}
