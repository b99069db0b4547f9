//! A batch whose COMMIT succeeds but whose reply never arrives: the worker
//! retries it, finds its checkpoint already there, and neither writes the
//! batch again nor counts it twice.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{binary, first_target_count, run_json, KeyFile, TestDb};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts a TCP proxy to the local PostgreSQL. On the `drop_at`-th COMMIT
/// after a checkpoint statement, it passes the COMMIT on, lets the server
/// commit, and closes the connection before the reply reaches the client.
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

#[tokio::test]
async fn lost_commit_reply_counts_once() {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows: i64 = 1000;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, secret text NOT NULL)")
        .await;
    let ids: Vec<i64> = (1..=rows).collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| encrypt_string(&old.key, &format!("the plaintext of row number {id:06}")))
        .collect();
    sqlx::query("INSERT INTO t SELECT * FROM unnest($1::int8[], $2::text[])")
        .bind(&ids)
        .bind(&values)
        .execute(&db.pool)
        .await
        .unwrap();

    let (port, commits) = lossy_proxy(3).await;
    // Without TLS, so that the proxy can see the statements.
    let url = format!(
        "{}?sslmode=disable",
        db.url.replace(":5432/", &format!(":{port}/"))
    );
    let mut command = binary();
    command
        .args(["run", "--database-url", &url, "--target", "t.secret"])
        .args(["--metrics-listen", "off", "--batch-size", "100"])
        .arg("--old-key-file")
        .arg(&old.path)
        .arg("--new-key-file")
        .arg(&new.path);
    let (code, summary, text) = tokio::task::spawn_blocking(move || run_json(&mut command))
        .await
        .unwrap();
    assert!(
        commits.load(Ordering::SeqCst) >= 3,
        "the proxy saw no third checkpoint: {text}"
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "rows_scanned"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), rows, "{text}");
    assert_eq!(first_target_count(&summary, "current"), 0, "{text}");
    assert_eq!(first_target_count(&summary, "conflicts"), 0, "{text}");

    for (id, value) in db.values("t", "id", "secret").await {
        let read = decrypt_to_string(&new.key, value.as_deref().unwrap());
        assert_eq!(
            read.as_deref().map(String::as_str),
            Some(format!("the plaintext of row number {id:0>6}").as_str()),
            "row {id}"
        );
    }
}
