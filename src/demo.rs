//! The `demo` command: builds a table of realistic encrypted rows under a
//! generated old key, as the application would write them, rotates it with the
//! real pipeline, and reads every row back under the new key.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::classify::{decrypt_to_string, encrypt_string};
use crate::cli::{self, DemoArgs};
use crate::error::Failure;
use crate::keys::Key;
use crate::report::RunSummary;
use crate::target::quote_ident;

/// Rows inserted per statement while building the table.
const INSERT_CHUNK_ROWS: usize = 10_000;

/// The plaintext of demo row `id`: a client secret derived from the id, so the
/// check at the end needs no stored copy.
pub fn demo_plaintext(id: i64) -> String {
    let digest = Sha256::digest(id.to_le_bytes());
    format!("sk_live_{}", &hex::encode(digest)[..48])
}

/// What the demo builds: most rows under the old key, and a few of every other kind.
fn demo_value(id: i64, old: &Key, new: &Key) -> Option<String> {
    match id % 1000 {
        0 => None,
        1 => Some(encrypt_string(new, &demo_plaintext(id))),
        2 => Some("legacy-plaintext-value".to_string()),
        _ => Some(encrypt_string(old, &demo_plaintext(id))),
    }
}

/// Runs the demo and returns the run's summary and the number of rows checked.
pub async fn demo(args: &DemoArgs, stop: Arc<AtomicBool>) -> Result<(RunSummary, u64), Failure> {
    if args.rows == 0 || args.rows > 50_000_000 {
        return Err(Failure::Config(format!(
            "--rows must be between 1 and 50000000, got {}",
            args.rows
        )));
    }
    let old = Key::generate();
    let new = Key::generate();
    let table = quote_ident(&args.table);

    // Build the table.
    let options = crate::db::connect_options(&args.database_url).map_err(|e| {
        Failure::Config(format!(
            "invalid --database-url: {}",
            crate::db::describe(&e)
        ))
    })?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .map_err(|e| {
            Failure::from_connect(
                &format!("cannot connect to {}", redact_url(&args.database_url)),
                &e,
            )
        })?;
    let setup = format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (id bigint PRIMARY KEY, client_secret text, updated_at timestamptz NOT NULL DEFAULT now())"
    );
    sqlx::raw_sql(&setup)
        .execute(&pool)
        .await
        .map_err(|e| Failure::from_database("cannot create the demo table", &e))?;
    let insert = format!(
        "INSERT INTO {table} (id, client_secret) SELECT * FROM unnest($1::int8[], $2::text[])"
    );
    let mut next = 1i64;
    let last = args.rows as i64;
    while next <= last {
        let end = (next + INSERT_CHUNK_ROWS as i64 - 1).min(last);
        let ids: Vec<i64> = (next..=end).collect();
        let values: Vec<Option<String>> = ids
            .par_iter()
            .map(|id| demo_value(*id, &old, &new))
            .collect();
        sqlx::query(&insert)
            .bind(&ids)
            .bind(&values)
            .execute(&pool)
            .await
            .map_err(|e| Failure::from_database("cannot fill the demo table", &e))?;
        next = end + 1;
    }
    sqlx::raw_sql(&format!("ANALYZE {table}"))
        .execute(&pool)
        .await
        .map_err(|e| Failure::from_database("cannot analyze the demo table", &e))?;
    eprintln!(
        "Created {} with {} rows under a generated old key (fingerprint {}).",
        args.table,
        args.rows,
        old.fingerprint()
    );

    // Rotate with the real pipeline; the keys reach it through files, as in production.
    let directory = tempfile_dir()?;
    let old_path = directory.join("old.key");
    let new_path = directory.join("new.key");
    write_private(&old_path, old.to_hex().as_str())?;
    write_private(&new_path, new.to_hex().as_str())?;
    let argv = [
        "reencrypt".to_string(),
        "run".to_string(),
        "--database-url".to_string(),
        args.database_url.clone(),
        "--target".to_string(),
        format!("public.{}.client_secret", quote_ident(&args.table)),
        "--old-key-file".to_string(),
        old_path.display().to_string(),
        "--new-key-file".to_string(),
        new_path.display().to_string(),
        "--restart".to_string(),
        "--metrics-listen".to_string(),
        "off".to_string(),
    ];
    let parsed = <cli::Cli as clap::Parser>::try_parse_from(argv)
        .map_err(|e| Failure::Config(e.to_string()))?;
    let cli::Command::Run(run_args) = parsed.command else {
        unreachable!("the demo builds a run command");
    };
    let result = crate::run::run(&run_args, stop).await;
    let _ = std::fs::remove_dir_all(&directory);
    let summary = result?;

    // Read every row back as the application would, under the new key.
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as(&format!(
        "SELECT id, client_secret FROM {table} ORDER BY id"
    ))
    .fetch_all(&pool)
    .await
    .map_err(|e| Failure::from_database("cannot read the demo table back", &e))?;
    let mismatches = rows
        .par_iter()
        .filter(|(id, value)| match id % 1000 {
            0 => value.is_some(),
            2 => value.as_deref() != Some("legacy-plaintext-value"),
            _ => value
                .as_deref()
                .and_then(|v| decrypt_to_string(&new, v))
                .is_none_or(|plain| plain.as_str() != demo_plaintext(*id)),
        })
        .count();
    if mismatches > 0 {
        return Err(Failure::Retryable(format!(
            "{mismatches} demo rows do not read back as expected under the new key"
        )));
    }
    Ok((summary, rows.len() as u64))
}

/// Removes passwords from a connection string for messages: the one in a
/// URL's `user:password@`, and every `password=` parameter, whether in a
/// URL's query or in `key=value` form.
pub fn redact_url(url: &str) -> String {
    let masked = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    };
    redact_password_parameters(&masked)
}

/// Replaces the value of each `password=` parameter with `***`. A value ends
/// at `&`, at whitespace, or, when quoted, at its closing quote.
fn redact_password_parameters(text: &str) -> String {
    const NAME: &str = "password=";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    while let Some(found) = lower[rest..].find(NAME) {
        let value_start = rest + found + NAME.len();
        out.push_str(&text[rest..value_start]);
        out.push_str("***");
        let value = &text[value_start..];
        let length = if let Some(quoted) = value.strip_prefix('\'') {
            quoted.find('\'').map_or(value.len(), |end| end + 2)
        } else {
            value
                .find(|c: char| c == '&' || c.is_whitespace())
                .unwrap_or(value.len())
        };
        rest = value_start + length;
    }
    out.push_str(&text[rest..]);
    out
}

fn tempfile_dir() -> Result<std::path::PathBuf, Failure> {
    let mut random = [0u8; 8];
    getrandom::getrandom(&mut random)
        .map_err(|e| Failure::Retryable(format!("random source failed: {e}")))?;
    let path = std::env::temp_dir().join(format!("reencrypt-demo-{}", hex::encode(random)));
    create_private_dir(&path)
        .map_err(|e| Failure::Retryable(format!("cannot create {}: {e}", path.display())))?;
    Ok(path)
}

fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Failure::Retryable(format!("cannot write {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(|e| Failure::Retryable(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_removed_from_connection_strings() {
        assert_eq!(
            redact_url("postgres://app:S3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=S3cret&a=b"),
            "postgres://app@db/x?sslmode=require&password=***&a=b"
        );
        assert_eq!(
            redact_url("host=db PASSWORD='a b c' dbname=x"),
            "host=db PASSWORD=*** dbname=x"
        );
        assert_eq!(
            redact_url("host=db password=S3cret"),
            "host=db password=***"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    }
}
