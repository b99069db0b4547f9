//! Connection failures are named at the start: an unreachable server exits 1
//! (worth retrying) and a missing database exits 2, each within seconds.

mod common;

use std::time::{Duration, Instant};

use common::{binary, output_text, KeyFile};

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
