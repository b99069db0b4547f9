//! How a pass in physical order leaves the table's pages: each later phase
//! of a window fits into the room the earlier ones freed on its page, and
//! each window is pruned during the pass.
//!
//! Both depend on PostgreSQL pruning a page as soon as the old versions on
//! it are dead. A transaction open at that moment, even in another
//! database, can put the pruning off. So these tests run one at a time, in
//! a test binary of their own. When a run shows less pruning than expected,
//! a test tries again in a new database, up to `ATTEMPTS` runs in all.

mod common;

use common::{
    assert_reads, fill, first_target_count, last_block, plaintext, run_command, run_json, KeyFile,
    TestDb,
};
use tokio::sync::Mutex;

const PHYSICAL: [&str; 2] = ["--scan-order", "physical"];

/// The lock that each test takes, so that the tests run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Runs of a test's scenario, each in a new database, before it fails.
const ATTEMPTS: usize = 3;

/// Runs `scenario` until it returns `Ok`, at most `ATTEMPTS` times, and
/// fails with what each run found otherwise.
async fn in_attempts<F, Fut>(scenario: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut found = Vec::new();
    for _ in 0..ATTEMPTS {
        match scenario().await {
            Ok(()) => return,
            Err(finding) => found.push(finding),
        }
    }
    panic!("no run of {ATTEMPTS} showed the pruning expected: {found:?}");
}

/// Returns the position in the WAL of the last change to each of `table`'s
/// pages from `first` to `last`, read from the raw pages.
async fn page_lsns(db: &TestDb, table: &str, first: i64, last: i64) -> Vec<String> {
    db.exec("CREATE EXTENSION IF NOT EXISTS pageinspect").await;
    sqlx::query_scalar(&format!(
        "SELECT (page_header(get_raw_page('{table}', b::int))).lsn::text \
         FROM generate_series({first}::int8, {last}) AS b ORDER BY b"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The pass reads each window again once its writes have committed, so
/// PostgreSQL prunes the old versions that its last write left during the
/// pass. Otherwise the final sweep's scan prunes them, mostly after a
/// checkpoint, when the server logs a full-page image for each page it
/// prunes. A page's LSN is that of its last change, so the first window's
/// pages must have changed last before the pass's last writes, which add
/// rows to the table's last page.
#[tokio::test]
async fn pass_prunes_the_windows_it_wrote() {
    let _alone = ONE_AT_A_TIME.lock().await;
    in_attempts(pass_prunes_first_window).await;
}

/// Runs a pass over a new table, checks its result, and returns `Err` when
/// a page of its first window changed after its last block.
async fn pass_prunes_first_window() -> Result<(), String> {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    let rows = 6000;
    fill(&db, rows, &old.key).await;
    // Autovacuum would prune the pages too.
    db.exec("ALTER TABLE t SET (autovacuum_enabled = false)")
        .await;
    db.exec("VACUUM ANALYZE t").await;
    // On a table this small, PostgreSQL may plan a write as a scan of the
    // whole table, which prunes every page it passes. Generic plans go
    // straight to each row, as the plans for a large table do.
    db.exec(&format!(
        "ALTER DATABASE {} SET plan_cache_mode = force_generic_plan",
        db.name
    ))
    .await;

    let (code, summary, text) = run_json(
        run_command(&db, &["t.secret"], &[&old.path], &new.path)
            .args(PHYSICAL)
            .args(["--batch-size", "2000", "--writers", "1"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), rows, "{text}");
    assert_reads(&db, &new.key, rows, plaintext).await;
    let last = last_block(&db).await;
    let last_lsn = &page_lsns(&db, "t", last, last).await[0];
    // The pass's first window is its first 16 blocks, fewer rows than a
    // batch: 61 rows per block.
    for (block, lsn) in page_lsns(&db, "t", 0, 15).await.iter().enumerate() {
        let earlier: bool = sqlx::query_scalar("SELECT $1::pg_lsn < $2::pg_lsn")
            .bind(lsn)
            .bind(last_lsn)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if !earlier {
            return Err(format!(
                "block {block} last changed at {lsn}, after the last block ({last_lsn})"
            ));
        }
    }
    Ok(())
}

/// A writer alone writes each page's rows in five phases. The first moves
/// its rows to other pages. Each later one rewrites its rows as HOT updates
/// in the room the old versions left, although each of its rows also takes
/// a new line pointer. Rows of a uuid key, a uuid, a text of 113 characters
/// and a timestamp take 184 bytes, 43 to a page. The phases take 9, 9, 9, 8
/// and 8 rows of each page, and only the first phase's rows may move. The
/// table is one window of the pass, so no read of the next window holds
/// back the pruning between phases.
#[tokio::test]
async fn later_phases_fit_in_their_page() {
    let _alone = ONE_AT_A_TIME.lock().await;
    in_attempts(phases_over_new_table).await;
}

/// Runs a pass over a new table of 16 full pages, checks its result, and
/// returns `Err` when more rows than the first phase's left their page.
async fn phases_over_new_table() -> Result<(), String> {
    let db = TestDb::new().await;
    let old = KeyFile::generate();
    let new = KeyFile::generate();
    db.exec(
        "CREATE TABLE c (id uuid PRIMARY KEY, agent_id uuid NOT NULL, \
         client_secret text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()) \
         WITH (autovacuum_enabled = false)",
    )
    .await;
    let pages = 16;
    let rows = 43 * pages;
    let secret = |i: i64| format!("sk_live_{i:048x}");
    let values: Vec<String> = (0..rows)
        .map(|i| reencrypt::classify::encrypt_string(&old.key, &secret(i)))
        .collect();
    sqlx::query(
        "INSERT INTO c (id, agent_id, client_secret) \
         SELECT gen_random_uuid(), gen_random_uuid(), v FROM unnest($1::text[]) AS v",
    )
    .bind(&values)
    .execute(&db.pool)
    .await
    .unwrap();
    db.exec("VACUUM ANALYZE c").await;
    let per_page: Vec<i64> =
        sqlx::query_scalar("SELECT count(*) FROM c GROUP BY (ctid::text::point)[0] ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(per_page, vec![43; pages as usize], "the rows' size changed");

    let (code, summary, text) = run_json(
        run_command(&db, &["c.client_secret"], &[&old.path], &new.path)
            .args(PHYSICAL)
            .args(["--batch-size", "5000", "--writers", "1"]),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(first_target_count(&summary, "reencrypted"), rows, "{text}");
    let moved: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM c WHERE (ctid::text::point)[0] >= {pages}"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let stored: Vec<String> = sqlx::query_scalar("SELECT client_secret FROM c")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut read: Vec<String> = stored
        .iter()
        .map(|value| {
            reencrypt::classify::decrypt_to_string(&new.key, value)
                .map(|p| p.to_string())
                .unwrap_or_default()
        })
        .collect();
    read.sort();
    let mut expected: Vec<String> = (0..rows).map(secret).collect();
    expected.sort();
    assert_eq!(read, expected);
    if moved != 9 * pages {
        return Err(format!("{moved} rows left their page, not {}", 9 * pages));
    }
    Ok(())
}
