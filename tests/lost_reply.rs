//! A batch whose COMMIT succeeds but whose reply never arrives: the worker
//! reads the status of the batch's transaction from the server, and neither
//! writes the batch again nor counts it twice. In physical order each window
//! is written in several transactions, and all but the last leave the
//! checkpoint's position as it was. A worker killed between two of them
//! leaves a job that resumes with every row counted once.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    assert_reads, binary, fill, first_target_count, plaintext, put, run_command, run_json, KeyFile,
    TestDb,
};
use reencrypt::classify::decrypt_to_string;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Physical order with one writer, which writes each window in five phases.
const PHYSICAL: [&str; 4] = ["--scan-order", "physical", "--writers", "1"];

/// Starts a TCP proxy to the local PostgreSQL. On the `drop_at`-th COMMIT
/// after a checkpoint statement, it passes the COMMIT on, lets the server
/// commit, and closes the connection before the reply reaches the client.
/// Returns its port and the count of such COMMITs seen.
async fn lossy_proxy(drop_at: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let commits = Arc::new(AtomicUsize::new(0));
    let seen = commits.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect("127.0.0.1:5432").await.unwrap();
            tokio::spawn(relay(client, server, seen.clone(), drop_at));
        }
    });
    (port, commits)
}

async fn relay(client: TcpStream, server: TcpStream, commits: Arc<AtomicUsize>, drop_at: usize) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let replies = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    let mut after_checkpoint = false;
    loop {
        let read = match client_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let chunk = &buffer[..read];
        if contains(chunk, b"ranges SET last_key") {
            after_checkpoint = true;
        }
        if after_checkpoint && contains(chunk, b"COMMIT") {
            after_checkpoint = false;
            if commits.fetch_add(1, Ordering::SeqCst) + 1 == drop_at {
                // Replies stop first, so that the COMMIT's never gets through.
                replies.abort();
                let _ = server_write.write_all(chunk).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                return;
            }
        }
        if server_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    replies.abort();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Returns `reencrypt run` on `t.secret` of `db` with batches of 100 rows
/// and the extra `args`, through a proxy on `port`. It connects without TLS,
/// so that the proxy can see the statements.
fn proxied_run(db: &TestDb, port: u16, old: &KeyFile, new: &KeyFile, args: &[&str]) -> Command {
    let url = format!(
        "{}?sslmode=disable",
        db.url.replace(":5432/", &format!(":{port}/"))
    );
    let mut command = binary();
    command
        .args(["run", "--database-url", &url, "--target", "t.secret"])
        .args(["--metrics-listen", "off", "--batch-size", "100"])
        .args(args)
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path);
    command
}

/// Loses the reply to the `drop_at`-th checkpointed COMMIT of a run with
/// `args`, and checks that every row is rotated and counted once.
async fn counts_once(args: &[&str], drop_at: usize) {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows: i64 = 1000;
    fill(&db, rows, &old.key).await;

    let (port, commits) = lossy_proxy(drop_at).await;
    let mut command = proxied_run(&db, port, &old, &new, args);
    let (code, summary, text) = tokio::task::spawn_blocking(move || run_json(&mut command))
        .await
        .unwrap();
    assert!(
        commits.load(Ordering::SeqCst) >= drop_at,
        "the proxy saw no checkpoint number {drop_at}: {text}"
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "rows_scanned"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "current"), 0, "{text}");
    assert_eq!(first_target_count(&summary, "conflicts"), 0, "{text}");
    assert_reads(&db, &new.key, rows, plaintext).await;
}

#[tokio::test]
async fn lost_commit_reply_counts_once() {
    counts_once(&[], 3).await;
}

#[tokio::test]
async fn lost_reply_first_phase_counts_once() {
    // The first checkpointed COMMIT is the first phase of the first window.
    counts_once(&PHYSICAL, 1).await;
}

#[tokio::test]
async fn lost_reply_middle_phase_counts_once() {
    counts_once(&PHYSICAL, 3).await;
}

#[tokio::test]
async fn lost_reply_last_phase_counts_once() {
    // The fifth phase is the window's last for a writer alone, and its
    // checkpoint moves the position.
    counts_once(&PHYSICAL, 5).await;
}

#[tokio::test]
async fn lost_reply_writers_in_turns_counts_once() {
    // Two writers take the phases of their windows in turns, so the 5th
    // checkpointed COMMIT falls among windows still open.
    counts_once(&["--scan-order", "physical", "--writers", "2"], 5).await;
}

#[tokio::test]
async fn killed_after_first_phase_resumes() {
    killed_between_phases_resumes(1).await;
}

#[tokio::test]
async fn killed_after_second_phase_resumes() {
    killed_between_phases_resumes(2).await;
}

#[tokio::test]
async fn killed_before_last_phase_resumes() {
    killed_between_phases_resumes(4).await;
}

/// Kills a run in physical order once `phases` phases of its first window
/// have committed, before the last, and checks that a resumed run rotates
/// and counts every row once.
async fn killed_between_phases_resumes(phases: usize) {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows: i64 = 1000;
    fill(&db, rows, &old.key).await;
    // Every fourth row is under the new key already: the phases of a window
    // leave such rows to the last, so a resume counts them once.
    for id in (4..=rows).step_by(4) {
        put(&db, id, &new.key, &plaintext(id)).await;
    }
    let current = rows / 4;

    // The first run is killed as soon as the chosen phase of the first
    // window has committed. Losing that COMMIT's reply delays the next one.
    let (port, commits) = lossy_proxy(phases).await;
    let mut child = proxied_run(&db, port, &old, &new, &PHYSICAL)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while commits.load(Ordering::SeqCst) < phases {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first run committed nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The server may still be committing the phase whose reply was lost:
    // wait until the killed run's sessions are gone.
    let started = std::time::Instant::now();
    loop {
        let sessions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'reencrypt'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if sessions == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the killed run's sessions stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (position, scanned): (Option<Vec<String>>, i64) =
        sqlx::query_as("SELECT last_key, rows_scanned FROM reencrypt.ranges WHERE range_index = 0")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(position, None, "a phase before the last moved the position");
    assert!(
        scanned > 0 && scanned <= rows - current,
        "the committed phases counted {scanned} rows"
    );
    // The rows those phases wrote read under the new key already.
    let rotated = db
        .values("t", "id", "secret")
        .await
        .into_iter()
        .filter(|(id, value)| {
            decrypt_to_string(&new.key, value.as_deref().unwrap())
                .as_deref()
                .map(String::as_str)
                == Some(plaintext(id.parse().unwrap()).as_str())
        })
        .count() as i64;
    assert_eq!(
        rotated,
        current + scanned,
        "rows under the new key after the kill"
    );

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path).args([
            "--scan-order",
            "physical",
            "--batch-size",
            "100",
        ]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "rows_scanned"), rows, "{text}");
    assert_eq!(
        first_target_count(&summary, "reencrypted"),
        rows - current,
        "{text}"
    );
    assert_eq!(first_target_count(&summary, "current"), current, "{text}");
    assert_reads(&db, &new.key, rows, plaintext).await;
}

#[tokio::test]
async fn lost_reply_after_trigger_counts_once() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows: i64 = 1000;
    fill(&db, rows, &old.key).await;
    let before = db.values("t", "id", "secret").await;
    // The trigger changes every value written, so each batch is written
    // again without its rows and commits nothing but its counts.
    db.exec(
        "CREATE FUNCTION mangle() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN NEW.secret := NEW.secret || 'x'; RETURN NEW; END $$; \
         CREATE TRIGGER mangle BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION mangle()",
    )
    .await;

    let (port, commits) = lossy_proxy(1).await;
    let mut command = proxied_run(&db, port, &old, &new, &PHYSICAL);
    let (code, summary, text) = tokio::task::spawn_blocking(move || run_json(&mut command))
        .await
        .unwrap();
    assert!(
        commits.load(Ordering::SeqCst) >= 1,
        "the proxy saw no checkpoint: {text}"
    );
    assert_eq!(code, 3, "{text}");
    assert_eq!(first_target_count(&summary, "rows_scanned"), rows, "{text}");
    assert_eq!(
        first_target_count(&summary, "write_rejected"),
        rows,
        "{text}"
    );
    assert_eq!(db.values("t", "id", "secret").await, before);
}
