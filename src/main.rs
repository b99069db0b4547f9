use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use reencrypt::cli::{Cli, Command, OutputFormat};
use reencrypt::error::Failure;
use reencrypt::{exit, report, telemetry};

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of standard
    // output goes away (`reencrypt status | head`) instead of panicking on
    // the failed write. Commands print only after their work is committed.
    // SAFETY: setting a signal's disposition to the default before any
    // thread starts has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let arguments: Vec<String> = std::env::args().collect();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            if error.use_stderr() {
                print_environment_notes(&error.to_string(), &arguments);
            }
            return ExitCode::from(if error.use_stderr() {
                exit::CONFIG as u8
            } else {
                exit::SUCCESS as u8
            });
        }
    };
    telemetry::init(cli.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(exit::RETRYABLE as u8);
        }
    };
    let code = runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        spawn_signal_handler(stop.clone());
        match dispatch(cli.command, stop).await {
            Ok(code) => code,
            Err(failure) => {
                let notes = match &failure {
                    Failure::Config(message) => {
                        reencrypt::cli::environment_notes(message, &arguments)
                    }
                    _ => Vec::new(),
                };
                let code = failure.exit_code();
                telemetry::print_error(&failure.to_string(), code, &notes);
                code
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code as u8)
}

/// Prints which options named in an error message took their value from
/// the environment, since the message names only their flags.
fn print_environment_notes(message: &str, arguments: &[String]) {
    for note in reencrypt::cli::environment_notes(message, arguments) {
        eprintln!("{note}");
    }
}

/// First SIGTERM/SIGINT: finish the current batch, then exit 4. Second: exit 4 at once,
/// which is safe because every batch commits atomically with its checkpoint.
fn spawn_signal_handler(stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "Cannot listen for SIGTERM.");
                    return;
                }
            };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            if stop.swap(true, Ordering::SeqCst) {
                telemetry::print_error(
                    "interrupted again; exiting now, the last committed batch is checkpointed",
                    exit::INTERRUPTED,
                    &[],
                );
                std::process::exit(exit::INTERRUPTED);
            }
            tracing::warn!("Stop requested; finishing the current batch.");
        }
    });
}

async fn dispatch(command: Command, stop: Arc<AtomicBool>) -> Result<i32, Failure> {
    match command {
        Command::Run(args) => {
            if args.dry_run {
                return reencrypt::inspect::plan_from_run(&args).await;
            }
            let listen = reencrypt::run::metrics_listen(&args.metrics.metrics_listen)?;
            let handle = reencrypt::metrics::install(listen).map_err(Failure::Config)?;
            let pusher =
                reencrypt::push::Pusher::start(&args.metrics, args.shard_index, handle.clone())?;
            let result = reencrypt::run::run_to_record(&args, stop).await;
            reencrypt::metrics::record_end(result.as_ref().map_err(|stopped| &stopped.failure));
            if let Some(pusher) = pusher {
                pusher.finish().await;
            }
            let summary = match result {
                Ok(summary) => summary,
                Err(stopped) => {
                    // A failed or interrupted run is recorded as well, with its exit code.
                    if let Some(summary) = &stopped.summary {
                        let code = stopped.failure.exit_code();
                        if let Err(error) =
                            reencrypt::inspect::record_run(&args, summary, code).await
                        {
                            tracing::warn!(error = %error, "Could not record the stopped run.");
                        }
                        // A machine reading the output gets the job as the run left it.
                        if args.output.format == OutputFormat::Json {
                            println!(
                                "{}",
                                serde_json::to_string_pretty(summary).unwrap_or_default()
                            );
                        }
                    }
                    return Err(stopped.failure);
                }
            };
            let code = summary.exit_code();
            reencrypt::inspect::record_run(&args, &summary, code).await?;
            match args.output.format {
                OutputFormat::Table => print!("{}", report::render_run(&summary)),
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                ),
            }
            Ok(code)
        }
        Command::Demo(args) => {
            let _ = reencrypt::metrics::install(None);
            let (summary, checked) = reencrypt::demo::demo(&args, stop).await?;
            print!("{}", report::render_run(&summary));
            println!("checked: all {checked} rows read back as expected (old-key rows under the new key, the rest unchanged)");
            Ok(summary.exit_code())
        }
        Command::Plan(args) => reencrypt::inspect::plan(&args).await,
        Command::Verify(args) => reencrypt::inspect::verify(&args).await,
        Command::Status(args) => reencrypt::inspect::status(&args).await,
        Command::Keys(args) => reencrypt::inspect::keys(&args).await,
        Command::Reset(args) => reencrypt::inspect::reset(&args).await,
        Command::Release(args) => reencrypt::inspect::release(&args).await,
    }
}
