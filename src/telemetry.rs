//! Logging: text or JSON on standard error, filtered by RUST_LOG (default `info`).

use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Standard error, written with the progress bars hidden for the moment.
struct StandardError;

impl Write for StandardError {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::progress::suspend_bars(|| std::io::stderr().write(buf))
    }

    // The formatter writes each event with one `write_all`, so the bars are
    // hidden and redrawn once per log line.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        crate::progress::suspend_bars(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The log format `init` installed, for `print_error`.
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Prints an error that ends the command, with its exit code and notes on
/// it. With `--log-format json` it is one JSON line like the log's, printed
/// whatever the log filter, so that a log collector can parse every line.
pub fn print_error(message: &str, code: i32, notes: &[String]) {
    match FORMAT.get().copied().unwrap_or(LogFormat::Text) {
        LogFormat::Text => {
            eprintln!("error: {message}");
            for note in notes {
                eprintln!("{note}");
            }
        }
        LogFormat::Json => {
            let line = serde_json::json!({
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": "ERROR",
                "message": format!("error: {message}"),
                "exit_code": code,
                "notes": notes,
            });
            eprintln!("{line}");
        }
    }
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Colours only on a terminal: a log file or collector would keep the
    // escape codes as text. NO_COLOR turns them off on a terminal too.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(|| StandardError);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        // Events carry their own `target` field (the table column), which the
        // flattened JSON would repeat beside tracing's module path under the
        // same key, so the module path is left out of JSON lines.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_target(false)
            .try_init(),
    };
}
