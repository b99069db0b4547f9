//! Connection failures are named at the start: an unreachable server exits 1
//! (worth retrying) and a missing database exits 2, each within seconds. A
//! URL that does not name a PostgreSQL server exits 2 before any connection.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{binary, output_text, KeyFile, TestDb};

/// Returns a local port that nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn attempt(command: &str, url: &str, old: &KeyFile, new: &KeyFile) -> (i32, String, Duration) {
    let started = Instant::now();
    let output = binary()
        .args([command, "--database-url", url, "--target", "t.secret"])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path)
        .args(if command == "run" {
            &["--metrics-listen", "off"][..]
        } else {
            &[][..]
        })
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        output_text(&output),
        started.elapsed(),
    )
}

#[test]
fn connection_failures_named_at_once() {
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    let missing = format!("{}/reencrypt_no_such_database", common::server_url());

    for command in ["run", "plan", "verify"] {
        let (code, text, took) = attempt(command, &unreachable, &old, &new);
        assert_eq!(code, 1, "{command}: {text}");
        assert!(
            text.contains("cannot connect to the database"),
            "{command}: {text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{command}: {text}");
        assert!(took < Duration::from_secs(10), "{command} took {took:?}");

        let (code, text, took) = attempt(command, &missing, &old, &new);
        assert_eq!(code, 2, "{command}: {text}");
        assert!(text.contains("does not exist"), "{command}: {text}");
        assert!(took < Duration::from_secs(10), "{command} took {took:?}");
    }
}

#[test]
fn json_log_format_ends_with_json_error() {
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    // Each case: the URL, the environment, the exit code, text of the
    // message, and text of its notes.
    let cases = [
        (
            unreachable.clone(),
            None,
            1,
            "cannot connect to the database",
            None,
        ),
        (
            unreachable,
            Some(("REENCRYPT_WRITERS", "0")),
            2,
            "--writers must be between 1 and 64",
            Some("REENCRYPT_WRITERS"),
        ),
    ];
    for (url, variable, code, message, note) in cases {
        let mut command = binary();
        command
            .args(["--log-format", "json", "run", "--database-url", &url])
            .args(["--target", "t.secret", "--metrics-listen", "off"])
            .arg("--old-key-file")
            .arg(&old.path)
            .arg("--new-key-file")
            .arg(&new.path);
        if let Some((name, value)) = variable {
            command.env(name, value);
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(code), "{}", output_text(&output));
        let stderr = String::from_utf8(output.stderr).unwrap();
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect();
        let last = lines.last().expect("an error line");
        assert_eq!(last["level"], "ERROR", "{stderr}");
        assert_eq!(last["exit_code"], code, "{stderr}");
        let text = last["message"].as_str().unwrap();
        assert!(text.contains(message), "{stderr}");
        let notes = last["notes"].as_array().unwrap();
        match note {
            Some(variable) => {
                assert_eq!(notes.len(), 1, "{stderr}");
                assert!(notes[0].as_str().unwrap().contains(variable), "{stderr}");
            }
            None => assert!(notes.is_empty(), "{stderr}"),
        }
    }
}

#[test]
fn rejected_startup_options_are_configuration_errors() {
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let server = common::server_url();
    // The server rejects each of these before a session starts, every time.
    let cases = [
        (
            format!("{server}/test?options=-cbogus%3D1"),
            "unrecognized configuration parameter",
        ),
        (
            format!("{server}/test?options=-cstatement_timeout%3Dsoon"),
            "statement_timeout",
        ),
        (
            format!("{server}/test?options=-cshared_buffers%3D1MB"),
            "shared_buffers",
        ),
    ];
    for (url, expected) in &cases {
        for command in ["run", "plan", "verify"] {
            let (code, text, _) = attempt(command, url, &old, &new);
            assert_eq!(code, 2, "{command} {url}: {text}");
            assert!(
                text.contains("cannot connect to the database"),
                "{command} {url}: {text}"
            );
            assert!(text.contains(expected), "{command} {url}: {text}");
        }
    }
}

/// A local listener that counts and closes every connection made to it.
struct CountingListener {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CountingListener {
    fn start() -> CountingListener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let connections = connections.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        // Dropping the stream closes it, so a client fails at once.
                        Ok(_) => {
                            connections.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        CountingListener {
            port,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `reencrypt <command>` with `url` and every other option it needs.
fn run_with_url(command: &str, url: &str, old: &KeyFile, new: &KeyFile) -> (i32, String) {
    let mut process = binary();
    process.args([command, "--database-url", url]);
    match command {
        "run" | "plan" | "verify" => {
            process
                .args(["--target", "t.secret", "--old-key-file"])
                .arg(&old.path)
                .arg("--new-key-file")
                .arg(&new.path);
            if command == "run" {
                process.args(["--metrics-listen", "off"]);
            }
        }
        "reset" => {
            process.args(["--job", "j", "--yes"]);
        }
        "release" => {
            process.args(["--job", "j"]);
        }
        "demo" => {
            process.args(["--rows", "10"]);
        }
        _ => {}
    }
    let output = process.stdin(std::process::Stdio::null()).output().unwrap();
    (output.status.code().unwrap_or(-1), output_text(&output))
}

/// Runs every command with each URL of `cases` and checks that it exits 2
/// with the case's text and every text of `common`, shows none of
/// `hidden`, and never connects to `listener`.
fn assert_rejected_before_connecting(
    listener: &CountingListener,
    cases: &[(String, &str)],
    common: &[&str],
    hidden: &[&str],
) {
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    for command in [
        "run", "plan", "verify", "status", "reset", "release", "demo",
    ] {
        for (url, expected) in cases {
            let (code, text) = run_with_url(command, url, &old, &new);
            assert_eq!(code, 2, "{command} {expected}: {text}");
            assert!(text.contains("invalid --database-url"), "{command}: {text}");
            assert!(text.contains(expected), "{command} {expected}: {text}");
            for part in common {
                assert!(text.contains(part), "{command} {expected}: {text}");
            }
            for secret in hidden {
                assert!(!text.contains(secret), "{command} shows {secret}: {text}");
            }
        }
    }
    assert_eq!(
        listener.connections(),
        0,
        "a command connected with a URL it should have rejected"
    );
}

#[test]
fn database_url_scheme_rejected_before_connecting() {
    let listener = CountingListener::start();
    let port = listener.port;
    let password = "S3cretPassw0rd";
    let cases = [
        (
            format!("http://app:{password}@127.0.0.1:{port}/test"),
            "unsupported scheme http://",
        ),
        (
            format!("mysql://app:{password}@127.0.0.1:{port}/test"),
            "unsupported scheme mysql://",
        ),
        (
            format!("app:{password}@127.0.0.1:{port}/test"),
            "unsupported scheme app://",
        ),
        (
            format!("127.0.0.1:{port}/test?password={password}"),
            "no valid URL scheme",
        ),
    ];

    assert_rejected_before_connecting(
        &listener,
        &cases,
        &["postgres:// or postgresql://"],
        &[password],
    );
}

#[test]
fn database_url_unsupported_parameters_rejected() {
    let listener = CountingListener::start();
    let port = listener.port;
    let base = format!("postgres://app:S3cretPassw0rd@127.0.0.1:{port}/test");
    let long_name = "a".repeat(41);
    // Each case: the URL, and the text the error shows for it.
    let cases = [
        (
            format!("{base}?sslmdoe=require"),
            "unsupported parameter 'sslmdoe'",
        ),
        (
            format!("{base}?Sslmode=require"),
            "unsupported parameter 'Sslmode'",
        ),
        (
            format!("{base}?sslmode=require&connect_timeout=5"),
            "unsupported parameter 'connect_timeout'",
        ),
        (
            format!("{base}?statement-cache-capacity=100"),
            "unsupported parameter 'statement-cache-capacity'",
        ),
        (
            format!("{base}?passwrod=Hunter2Hunter2"),
            "unsupported parameter 'passwrod'",
        ),
        (
            format!("{base}?sslmode=prefer&Hunter2Hunter2/x"),
            "unsupported parameter 2 of the query (its name is not shown",
        ),
        (
            format!("{base}?Hunter2Hunter2"),
            "unsupported parameter 1 of the query (its name is not shown",
        ),
        (
            format!("{base}?{long_name}=1"),
            "unsupported parameter 1 of the query (its name is not shown",
        ),
        // A password with an unencoded '?' or '/' puts its tail in the
        // query or the path, where the driver or the server would echo it.
        (
            format!("postgres://app:?Hunter2Hunter2&x@127.0.0.1:{port}/test"),
            "the URL has an '@' after its host",
        ),
        (
            format!("postgres://127.0.0.1:{port}?sslmode=Hunter2Hunter2@x/test"),
            "the URL has an '@' after its host",
        ),
        (
            format!("postgres://127.0.0.1:{port}?dbname=Hunter2Hunter2@x/test"),
            "the URL has an '@' after its host",
        ),
        (
            format!("postgres://app:{port}/Hunter2Hunter2@127.0.0.1:{port}/test"),
            "the URL has an '@' after its host",
        ),
        (
            format!("postgres://app:Hunter2/Hunter2@127.0.0.1:{port}/test"),
            "invalid port number; write a ':', '/', '?', '#' or '@'",
        ),
        (
            format!("postgres://app@127.0.0.1,127.0.0.2:{port}/test"),
            "the URL names several hosts",
        ),
        (format!("{base}?application_name=a%00b"), "NUL character"),
        (
            format!("{base}?sslmode=require&sslmode=disable"),
            "sets the setting sslmode a second time",
        ),
        (
            format!("{base}?dbname=other"),
            "sets the database name that the URL already gives",
        ),
        (
            format!("{base}?sslmode"),
            "the parameter 'sslmode' has no value",
        ),
        (
            format!("{base}#sslmode=verify-full"),
            "the URL has a fragment",
        ),
        (
            format!("postgres://app#Hunter2@127.0.0.1:{port}/test"),
            "the URL has a fragment",
        ),
    ];

    assert_rejected_before_connecting(
        &listener,
        &cases,
        &[],
        &["S3cretPassw0rd", "Hunter2", &long_name],
    );
}

#[tokio::test]
async fn database_url_postgres_schemes_accepted() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let socket_directory = "/var/run/postgresql";
    let mut urls = vec![
        db.url.clone(),
        db.url.replacen("postgres://", "postgresql://", 1),
        db.url.replacen("postgres://", "POSTGRES://", 1),
        format!(
            "{}?sslmode=prefer&application_name=nightly&options[statement_timeout]=0",
            db.url
        ),
    ];
    // NOTE: the socket forms are checked only against the default server,
    // and only where it has its socket in the Debian default directory.
    let default_server = std::env::var_os("REENCRYPT_TEST_PG").is_none();
    if default_server
        && std::path::Path::new(socket_directory)
            .join(".s.PGSQL.5432")
            .exists()
    {
        urls.push(format!(
            "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/{}",
            db.name
        ));
        urls.push(format!(
            "postgresql:///{}?host={socket_directory}&user=postgres",
            db.name
        ));
    }

    for url in &urls {
        let (code, text) = run_with_url("status", url, &old, &new);
        assert_eq!(code, 0, "{url}: {text}");
        assert!(text.contains("no jobs"), "{url}: {text}");
    }
}

#[tokio::test]
async fn untrusted_server_certificate_exits_2() {
    let db = TestDb::new().await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "the local PostgreSQL must serve TLS (Debian's default) with a certificate no public CA signed"
    );
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let url = format!("{}?sslmode=verify-full", db.url);
    for command in ["run", "plan"] {
        let (code, text, _) = attempt(command, &url, &old, &new);
        assert_eq!(
            code, 2,
            "{command}: no retry can fix the certificate: {text}"
        );
        assert!(text.contains("invalid peer certificate"), "{text}");
    }
}
