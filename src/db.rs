//! Connections: the pool, per-transaction timeouts, and which database errors
//! are worth retrying.
//!
//! Everything that talks to PostgreSQL runs inside an explicit transaction,
//! and no setting is made outside a transaction. That keeps the worker correct
//! behind a transaction-pooling proxy such as PgBouncer, where consecutive
//! transactions may run on different server connections.
//!
//! sqlx 0.8 prepares every `sqlx::query` as a named statement (`sqlx_s_1`,
//! `sqlx_s_2`, ... counted per client connection), even with the statement
//! cache off, and never closes it. So every transaction starts with
//! `DEALLOCATE ALL`: behind a pooler the server connection may still hold
//! another client's statements under the same names, which would fail with
//! SQLSTATE 42P05, and on a direct connection they would pile up.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Postgres, Transaction};

/// Minimum statement timeout of a sweep's sequential scan for changed rows:
/// one hour.
pub const CHANGED_SCAN_TIMEOUT_MS: u64 = 3_600_000;

/// How long the first connection may take before the server counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Timeouts applied to every transaction with `SET LOCAL`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub lock_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub idle_in_transaction_timeout_ms: u64,
}

/// A pool and the timeouts every transaction from it gets.
#[derive(Clone)]
pub struct Database {
    pub pool: PgPool,
    pub timeouts: Timeouts,
}

impl Database {
    /// Opens a pool. Connections are made lazily and re-made after failures, so
    /// the pool recovers by itself when PostgreSQL comes back.
    pub fn connect_lazy(
        url: &str,
        max_connections: u32,
        timeouts: Timeouts,
    ) -> Result<Database, sqlx::Error> {
        let mut options = connect_options(url)?;
        // A name set in the URL is kept, so that operators can distinguish
        // this run from others. `PGAPPNAME`, which sqlx also reads, is not.
        if !names_application(url) {
            options = options.application_name("reencrypt");
        }
        let options = options
            // No statement outlives its transaction: a cached one would be
            // missing on the next server connection a pooler hands out, and
            // `DEALLOCATE ALL` in `begin` would drop it anyway.
            .statement_cache_capacity(0)
            // A statement that waits for a lock or reads a whole table for
            // the sweep takes seconds by design. sqlx would warn of each one
            // with its SQL; the run's own logs tell of waits, retries and
            // stalls, so those lines show only with debug logging.
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(30))
            .test_before_acquire(true)
            .connect_lazy_with(options);
        Ok(Database { pool, timeouts })
    }

    /// Opens and closes one connection, so that an unreachable server, a
    /// rejected login or a missing database is reported as such at the
    /// start, instead of as a pool timeout at the first statement.
    pub async fn probe(&self) -> Result<(), sqlx::Error> {
        let options = self.pool.connect_options();
        let connect = sqlx::ConnectOptions::connect(options.as_ref());
        match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
            Ok(connection) => sqlx::Connection::close(connection?).await,
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} seconds", PROBE_TIMEOUT.as_secs()),
            ))),
        }
    }

    /// Begins a transaction with this job's timeouts, in one round trip.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        // A commit is acknowledged only once it is on disk, even where the
        // server's default is `synchronous_commit = off`. The sweep trusts
        // that a batch acknowledged as committed stays committed. Deferred
        // constraints are checked at each statement, so that a row they
        // reject fails its UPDATE, where it can be found and left out, and
        // not the COMMIT of the whole batch.
        let begin = self.begin_statement("BEGIN");
        self.pool
            .begin_with(format!(
                "{begin}; SET LOCAL synchronous_commit = on; SET CONSTRAINTS ALL IMMEDIATE"
            ))
            .await
    }

    /// Begins a read-only transaction with this job's timeouts. Its
    /// statements share one snapshot, so a page and the rest of its last
    /// key are read from the same state of the table.
    pub async fn begin_read_only(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool
            .begin_with(self.begin_statement("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            .await
    }

    /// Begins a read-only transaction for reading rows changed since a
    /// horizon. Such a filter cannot use an index, and an index scan in key
    /// order would visit every row of the table in random order, so the plan
    /// is held to one sequential scan. Each statement is planned with its
    /// parameters, which lets PostgreSQL 15 and later look the list of
    /// transaction IDs up in a hash table. A scan of a whole large table can
    /// outlast the statement timeout, so these statements get at least
    /// `CHANGED_SCAN_TIMEOUT_MS`.
    pub async fn begin_changed_scan(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let begin = self.begin_statement("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
        let timeout = self
            .timeouts
            .statement_timeout_ms
            .max(CHANGED_SCAN_TIMEOUT_MS);
        self.pool
            .begin_with(format!(
                "{begin}; SET LOCAL statement_timeout = '{timeout}ms'; \
                 SET LOCAL enable_indexscan = off; SET LOCAL enable_indexonlyscan = off; \
                 SET LOCAL enable_bitmapscan = off; SET LOCAL plan_cache_mode = force_custom_plan"
            ))
            .await
    }

    /// The statement that opens a transaction: `begin`, then the removal of
    /// statements left on the server connection, then the timeouts.
    fn begin_statement(&self, begin: &str) -> String {
        let t = self.timeouts;
        format!(
            "{begin}; DEALLOCATE ALL; SET LOCAL lock_timeout = '{}ms'; \
             SET LOCAL statement_timeout = '{}ms'; \
             SET LOCAL idle_in_transaction_session_timeout = '{}ms'",
            t.lock_timeout_ms, t.statement_timeout_ms, t.idle_in_transaction_timeout_ms
        )
    }
}

/// URL schemes that name a PostgreSQL server.
const URL_SCHEMES: [&str; 2] = ["postgres", "postgresql"];

/// Parses a connection URL. Any scheme but `postgres` and `postgresql` is
/// rejected before anything connects: the URL parser reads the host and
/// database of any URL (`http://...` too) and would connect to them. The
/// error names the scheme but never the rest of the URL, which may contain a
/// password.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    // The URL parser also ignores leading spaces and control characters.
    let trimmed = url.trim_start_matches(|c: char| c <= ' ');
    let scheme = trimmed.split_once(':').map(|(scheme, _)| scheme);
    if !scheme.is_some_and(|s| URL_SCHEMES.iter().any(|k| s.eq_ignore_ascii_case(k))) {
        let found = match scheme {
            Some(s) if is_scheme(s) => format!("unsupported scheme {s}://"),
            _ => "no valid URL scheme".to_string(),
        };
        return Err(sqlx::Error::Configuration(
            format!("{found}; expected a URL that starts with postgres:// or postgresql://").into(),
        ));
    }
    check_url(url).map_err(|message| sqlx::Error::Configuration(message.into()))?;
    PgConnectOptions::from_str(url)
}

/// Query parameters of a connection URL that sqlx reads, besides
/// `options[NAME]`. It skips any other with a log line that shows the value,
/// so a misspelt `sslmode` would connect without the TLS it requests.
/// `statement-cache-capacity` is left out: every connection keeps no
/// statement cache (see `Database::connect_lazy`).
const URL_PARAMETERS: [&str; 17] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Maximum length of a parameter name that an error message shows.
const MAX_SHOWN_NAME: usize = 40;

/// How to write the characters that end a part of a URL, for error messages.
const ENCODING_HINT: &str = "write a ':', '/', '?', '#' or '@' in a user name or password \
                             as %3A, %2F, %3F, %23 or %40";

/// Checks a connection URL before sqlx reads it, and returns an error
/// message for the first problem. The URL is parsed and its query decoded
/// as sqlx does. sqlx ignores a fragment, an unknown query parameter and
/// every occurrence of a repeated one but the last, so each is rejected.
///
/// An unencoded `?`, `/` or `#` in a password moves the rest of it into the
/// query, the path or the fragment, where an error or the server could echo
/// it. The `@` that follows the password moves with it, so a URL with an
/// `@` after its host is rejected without showing any of it. A parameter's
/// name is shown only if it was written as `name=value` and has the
/// characters of a parameter name.
fn check_url(text: &str) -> Result<(), String> {
    // The URL parser's errors are fixed texts, which quote nothing of the URL.
    let url = url::Url::parse(text).map_err(|error| format!("{error}; {ENCODING_HINT}"))?;
    if url.fragment().is_some() {
        return Err(format!(
            "the URL has a fragment (a '#' and what follows it), which the driver ignores; \
             {ENCODING_HINT}"
        ));
    }
    let after_host = format!("{}{}", url.path(), url.query().unwrap_or_default());
    if after_host.contains('@') {
        return Err(format!(
            "the URL has an '@' after its host, so part of a password may be in its path or \
             query; {ENCODING_HINT}, and an '@' in a database name or parameter value as %40"
        ));
    }
    if url.host_str().is_some_and(|host| host.contains(',')) {
        return Err("the URL names several hosts; give one host".to_string());
    }
    let components = [
        url.username(),
        url.password().unwrap_or_default(),
        url.path(),
    ];
    let has_nul = components.iter().any(|part| part.contains("%00"))
        || url
            .query_pairs()
            .any(|(name, value)| name.contains('\0') || value.contains('\0'));
    if has_nul {
        return Err("the URL contains a NUL character (%00), which PostgreSQL rejects".to_string());
    }

    let query = url.query().unwrap_or_default();
    let supported = "sslmode (or ssl-mode), sslrootcert (or ssl-root-cert, ssl-ca), \
                     sslcert (or ssl-cert), sslkey (or ssl-key), host, hostaddr, port, dbname, \
                     user, password, application_name, options and options[NAME]";
    let mut seen: Vec<String> = Vec::new();
    let pairs = query.split('&').filter(|pair| !pair.is_empty());
    for (position, pair) in pairs.enumerate() {
        let Some((name, value)) = url::form_urlencoded::parse(pair.as_bytes()).next() else {
            continue;
        };
        let known = URL_PARAMETERS.contains(&name.as_ref())
            || name.starts_with("options[") && name.ends_with(']');
        if known {
            // Known names come from the list above, so they are safe to show.
            if value.is_empty() {
                return Err(format!("the parameter '{name}' has no value"));
            }
            let setting = setting_of(&name);
            let in_url = match setting {
                "host" => url.host_str().is_some_and(|host| !host.is_empty()),
                "port" => url.port().is_some(),
                "dbname" => !url.path().trim_start_matches('/').is_empty(),
                "user" => !url.username().is_empty(),
                "password" => url.password().is_some(),
                _ => false,
            };
            if in_url {
                return Err(format!(
                    "the parameter '{name}' sets the {} that the URL already gives before its \
                     query; give it once",
                    describe_setting(setting)
                ));
            }
            // Each occurrence of `options` adds to the others. Of any other
            // setting, the last would replace the earlier ones.
            if setting != "options" && seen.iter().any(|earlier| earlier == setting) {
                return Err(format!(
                    "the parameter '{name}' sets the {} a second time; give it once",
                    describe_setting(setting)
                ));
            }
            seen.push(setting.to_string());
            continue;
        }
        let looks_like_a_name = pair.contains('=')
            && !name.is_empty()
            && name.len() <= MAX_SHOWN_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        let description = match looks_like_a_name {
            true => format!("'{name}'"),
            false => format!(
                "{} of the query (its name is not shown, because it may contain a secret)",
                position + 1
            ),
        };
        return Err(format!(
            "unsupported parameter {description}; the supported ones are {supported}"
        ));
    }
    Ok(())
}

/// Returns the setting that a known query parameter sets: its own name,
/// or for an alias the name it stands for. `hostaddr` sets the host too.
fn setting_of(name: &str) -> &str {
    match name {
        "ssl-mode" => "sslmode",
        "ssl-root-cert" | "ssl-ca" => "sslrootcert",
        "ssl-cert" => "sslcert",
        "ssl-key" => "sslkey",
        "hostaddr" => "host",
        other => other,
    }
}

/// Returns the words for a setting in error messages.
fn describe_setting(setting: &str) -> String {
    match setting {
        "dbname" => "database name".to_string(),
        "user" => "user name".to_string(),
        "host" | "port" | "password" => setting.to_string(),
        other => format!("setting {other}"),
    }
}

/// Returns whether a connection URL sets a non-empty `application_name`.
fn names_application(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|url| {
        url.query_pairs()
            .any(|(name, value)| name == "application_name" && !value.is_empty())
    })
}

/// Checks that `text` has the form of a URL scheme (RFC 3986, section 3.1),
/// so that it can be shown without showing other parts of a malformed URL.
fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Kinds of transient failure, as used in logs and the retries metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransientKind {
    Connection,
    Deadlock,
    LockTimeout,
    StatementTimeout,
    Serialization,
    ServerShutdown,
}

impl TransientKind {
    pub fn label(self) -> &'static str {
        match self {
            TransientKind::Connection => "connection",
            TransientKind::Deadlock => "deadlock",
            TransientKind::LockTimeout => "lock_timeout",
            TransientKind::StatementTimeout => "statement_timeout",
            TransientKind::Serialization => "serialization",
            TransientKind::ServerShutdown => "server_shutdown",
        }
    }
}

/// Returns the kind of a transient error, or `None` when retrying cannot help.
pub fn transient_kind(error: &sqlx::Error) -> Option<TransientKind> {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => Some(TransientKind::Connection),
        sqlx::Error::Protocol(_) => Some(TransientKind::Connection),
        sqlx::Error::Database(db) => {
            let code = db.code()?;
            match code.as_ref() {
                "40P01" => Some(TransientKind::Deadlock),
                "55P03" => Some(TransientKind::LockTimeout),
                "57014" => Some(TransientKind::StatementTimeout),
                "40001" => Some(TransientKind::Serialization),
                // admin_shutdown, crash_shutdown, cannot_connect_now, idle session timeouts
                "57P01" | "57P02" | "57P03" | "57P05" | "25P03" => {
                    Some(TransientKind::ServerShutdown)
                }
                // connection_exception class, and too_many_connections
                c if c.starts_with("08") || c == "53300" => Some(TransientKind::Connection),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether a database error is tied to the values of particular rows (a check
/// constraint, a trigger's exception, a value too long for the column), so that
/// finding and skipping the row lets the rest of the batch through.
pub fn is_row_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    let Some(code) = db.code() else {
        return false;
    };
    // Class 22 data exception, class 23 integrity constraint violation,
    // P0001 raise_exception from a trigger.
    code.starts_with("22") || code.starts_with("23") || code == "P0001"
}

/// Describes a database error without any row data: the SQLSTATE and the
/// server's message, never the statement's parameters.
pub fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_parameters_accepted() {
        let url = "postgres:///?sslmode=require&ssl-root-cert=/ca.pem&sslcert=/c.pem\
                   &ssl-key=/k.pem&host=%2Ftmp&port=5433&dbname=d&user=u&password=p\
                   &application_name=a&options=-c%20x%3D1&options[lock_timeout]=5s";
        assert_eq!(check_url(url), Ok(()));
    }

    #[test]
    fn parameter_names_decoded_as_sqlx_does() {
        assert_eq!(check_url("postgres://h/db?ssl%6Dode=require"), Ok(()));
        let error = check_url("postgres://h/db?ssl+mode=require").unwrap_err();
        assert!(error.contains("parameter 1 of the query"), "{error}");
    }

    #[test]
    fn fragment_rejected_unshown() {
        let error = check_url("postgres://h/db#sslmode=verify-full").unwrap_err();
        assert!(error.contains("fragment"), "{error}");
        assert!(!error.contains("verify-full"), "{error}");
    }

    #[test]
    fn password_after_host_unshown() {
        // A password with an unencoded '?' or '/' after a number: the URL
        // parser reads the user name as the host and the number as the port.
        let urls = [
            "postgres://app:?Tr0ub4dor&x@db/agentidp",
            "postgres://app:2024?sslmode=Tr0ub4dor@db/agentidp",
            "postgres://app:2024?dbname=Tr0ub4dor@db/agentidp",
            "postgres://app:2024/Tr0ub4dor@db/agentidp",
        ];
        for url in urls {
            let error = check_url(url).unwrap_err();
            assert!(error.contains("an '@' after its host"), "{url}: {error}");
            assert!(!error.contains("Tr0ub4dor"), "{url}: {error}");
        }
        let error = check_url("postgres://h/db?Tr0ub4dor").unwrap_err();
        assert!(error.contains("parameter 1 of the query"), "{error}");
        assert!(!error.contains("Tr0ub4dor"), "{error}");
    }

    #[test]
    fn unparseable_url_gets_encoding_hint() {
        let error = check_url("postgres://app:Tr0ub/4dor@db/x").unwrap_err();
        assert!(error.starts_with("invalid port number; "), "{error}");
        assert!(error.contains("%2F"), "{error}");
        assert!(!error.contains("Tr0ub"), "{error}");
    }

    #[test]
    fn settings_given_once() {
        let cases = [
            (
                "postgres://h/db?sslmode=require&sslmode=disable",
                "sets the setting sslmode a second time",
            ),
            (
                "postgres://h/db?sslmode=require&ssl-mode=disable",
                "sets the setting sslmode a second time",
            ),
            (
                "postgres://h/db?ssl-ca=/a&sslrootcert=/b",
                "sets the setting sslrootcert a second time",
            ),
            (
                "postgres:///db?host=a&hostaddr=127.0.0.1",
                "sets the host a second time",
            ),
            (
                "postgres://h/db?host=other",
                "sets the host that the URL already gives",
            ),
            (
                "postgres://h:5433/db?port=5432",
                "sets the port that the URL already gives",
            ),
            (
                "postgres://h/db?dbname=other",
                "sets the database name that the URL already gives",
            ),
            (
                "postgres://u@h/db?user=other",
                "sets the user name that the URL already gives",
            ),
            (
                "postgres://u:p@h/db?password=other",
                "sets the password that the URL already gives",
            ),
            (
                "postgres://h/db?options[a]=1&options[a]=2",
                "sets the setting options[a] a second time",
            ),
        ];
        for (url, expected) in cases {
            let error = check_url(url).unwrap_err();
            assert!(error.contains(expected), "{url}: {error}");
        }
        let repeated_options = "postgres://h/db?options=-ca%3D1&options=-cb%3D2";
        assert_eq!(check_url(repeated_options), Ok(()));
        let socket = "postgresql:///db?host=/var/run/postgresql&user=postgres&password=p";
        assert_eq!(check_url(socket), Ok(()));
    }

    #[test]
    fn empty_values_rejected() {
        for url in [
            "postgres://h/db?sslmode",
            "postgres://h/db?application_name=",
        ] {
            let error = check_url(url).unwrap_err();
            assert!(error.contains("has no value"), "{url}: {error}");
        }
    }

    #[test]
    fn several_hosts_and_nul_rejected() {
        let error = check_url("postgres://h1,h2/db").unwrap_err();
        assert!(error.contains("several hosts"), "{error}");
        let urls = [
            "postgres://u%00x@h/db",
            "postgres://u:p%00@h/db",
            "postgres://h/d%00b",
            "postgres://h/db?application_name=a%00b",
        ];
        for url in urls {
            let error = check_url(url).unwrap_err();
            assert!(error.contains("NUL character"), "{url}: {error}");
        }
    }

    #[test]
    fn application_name_must_be_nonempty() {
        assert!(names_application(
            "postgres://h/db?application_name=nightly"
        ));
        assert!(!names_application("postgres://h/db?application_name="));
        assert!(!names_application("postgres://h/db"));
    }

    #[tokio::test]
    async fn application_name_from_url_kept() {
        let timeouts = Timeouts {
            lock_timeout_ms: 1,
            statement_timeout_ms: 1,
            idle_in_transaction_timeout_ms: 1,
        };
        let named = Database::connect_lazy("postgres://h/db?application_name=nightly", 1, timeouts)
            .unwrap();
        assert_eq!(
            named.pool.connect_options().get_application_name(),
            Some("nightly")
        );
        let unnamed = Database::connect_lazy("postgres://h/db", 1, timeouts).unwrap();
        assert_eq!(
            unnamed.pool.connect_options().get_application_name(),
            Some("reencrypt")
        );
    }
}
