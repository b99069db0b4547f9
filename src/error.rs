//! Failures of a command, grouped by how the caller must react.

use crate::exit;

/// The reason a command did not complete. The variant decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad input or configuration: fix it, do not retry. Nothing was written.
    #[error("{0}")]
    Config(String),
    /// A failure that may pass: a rerun resumes from the last checkpoint.
    #[error("{0}")]
    Retryable(String),
    /// Stopped by a signal after the last committed batch.
    #[error("interrupted by a signal; the last committed batch is checkpointed, rerun the same command to resume")]
    Interrupted,
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Config(_) => exit::CONFIG,
            Failure::Retryable(_) => exit::RETRYABLE,
            Failure::Interrupted => exit::INTERRUPTED,
        }
    }

    /// Classifies a failed first connection: as `from_database`, and a TLS
    /// certificate the client cannot verify is a configuration error too.
    pub fn from_connect(context: &str, error: &sqlx::Error) -> Failure {
        if matches!(error, sqlx::Error::Tls(_)) || is_certificate_error(error) {
            let message = format!("{context}: {}", crate::db::describe(error));
            return Failure::Config(message);
        }
        if let sqlx::Error::Database(db) = error {
            if db
                .code()
                .is_some_and(|code| !is_transient_at_connect(&code))
            {
                let message = format!("{context}: {}", crate::db::describe(error));
                return Failure::Config(message);
            }
        }
        Failure::from_database(context, error)
    }

    /// Classifies a failure to create the worker's tables in `schema`. An
    /// error of class 42 (a name already taken, a reserved schema, a missing
    /// privilege) comes back on every retry, so it is a configuration error.
    pub fn from_migration(schema: &str, error: &sqlx::Error) -> Failure {
        let context = format!("cannot create the checkpoint tables in schema {schema:?}");
        if let sqlx::Error::Database(db) = error {
            if db.code().is_some_and(|code| code.starts_with("42")) {
                return Failure::Config(format!(
                    "{context}: {}; choose a schema for the worker's own tables with --schema",
                    crate::db::describe(error)
                ));
            }
        }
        Failure::from_database(&context, error)
    }

    /// Classifies a database error met outside a batch: authentication and
    /// unknown-database errors are configuration errors, the rest may pass.
    pub fn from_database(context: &str, error: &sqlx::Error) -> Failure {
        let message = format!("{context}: {}", crate::db::describe(error));
        if let sqlx::Error::Database(db) = error {
            if let Some(code) = db.code() {
                // 28: invalid authorization; 3D000: database does not exist;
                // 42501: insufficient privilege; 3F000: invalid schema name.
                if code.starts_with("28") || code == "3D000" || code == "42501" || code == "3F000" {
                    return Failure::Config(message);
                }
            }
        }
        if matches!(error, sqlx::Error::Configuration(_)) {
            return Failure::Config(message);
        }
        Failure::Retryable(message)
    }
}

/// Tells whether an error that rejects a new session may pass on a later
/// attempt. The server checks the login and the startup options (the URL's
/// `options`) before a session starts, and those errors recur every time.
/// The classes that may pass are 08 connection exception, 53 insufficient
/// resources (too many connections), 57 operator intervention (starting up,
/// shutting down), 58 system error and XX internal error.
fn is_transient_at_connect(code: &str) -> bool {
    ["08", "53", "57", "58", "XX"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// Tells whether a connection failed because TLS rejected a certificate
/// (an unknown issuer, a wrong host name, an expired certificate), which no
/// retry can fix.
fn is_certificate_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Io(io) = error else {
        return false;
    };
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}
