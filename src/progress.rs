//! Progress for people: bars on a terminal, a periodic log line otherwise.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pipeline::Pass;

/// The bars being drawn, if any, so that log lines can be written above them.
static DRAWN_BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Runs `write` with the bars hidden while bars are drawn, so that a log line
/// lands above them instead of tearing through a bar.
pub fn suspend_bars<R>(write: impl FnOnce() -> R) -> R {
    let bars = DRAWN_BARS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match bars {
        Some(bars) => bars.suspend(write),
        None => write(),
    }
}

/// Per-target progress of the main pass.
struct TargetProgress {
    estimated: u64,
    /// Rows scanned before this run started (from the checkpoint).
    resumed: u64,
    /// Rows scanned by this run.
    scanned: u64,
    /// When this run's first batch of the target committed, and its rows. The
    /// rate counts from there, so a target that waited for others is not slow.
    first_batch: Option<(Instant, u64)>,
    bar: Option<ProgressBar>,
}

/// Progress of every target of a run.
pub struct Progress {
    /// When the last batch of any pass committed, for the stall watchdog.
    last_commit: Mutex<Instant>,
    targets: Mutex<BTreeMap<String, TargetProgress>>,
    bars: Option<MultiProgress>,
}

impl Progress {
    /// Shows bars when standard error is a terminal and `bars` is allowed.
    pub fn new(bars: bool) -> Progress {
        let bars = (bars && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        *DRAWN_BARS.lock().unwrap_or_else(|e| e.into_inner()) = bars.clone();
        Progress {
            last_commit: Mutex::new(Instant::now()),
            targets: Mutex::new(BTreeMap::new()),
            bars,
        }
    }

    pub fn add_target(&self, target: &str, estimated: u64, resumed: u64) {
        let bar = self.bars.as_ref().map(|multi| {
            let bar = multi.add(ProgressBar::new(estimated.max(resumed)));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} rows {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(target.to_string());
            bar.set_position(resumed);
            bar
        });
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                target.to_string(),
                TargetProgress {
                    estimated,
                    resumed,
                    scanned: 0,
                    first_batch: None,
                    bar,
                },
            );
    }

    pub fn advance(&self, target: &str, pass: Pass, rows: u64) {
        *self.last_commit.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if pass != Pass::Main {
            return;
        }
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(progress) = targets.get_mut(target) {
            progress.first_batch.get_or_insert((Instant::now(), rows));
            progress.scanned += rows;
            let done = progress.resumed + progress.scanned;
            crate::metrics::set_rows_scanned(target, done);
            if let Some(bar) = &progress.bar {
                if done > bar.length().unwrap_or(0) {
                    bar.set_length(done);
                }
                bar.set_position(done);
            }
        }
    }

    /// Ends the bars: at their end when the run `completed`, else where
    /// they stopped.
    pub fn finish(&self, completed: bool) {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        for progress in targets.values() {
            if let Some(bar) = &progress.bar {
                // A run that stopped early leaves its bars where they were.
                if completed {
                    bar.finish();
                } else {
                    bar.abandon();
                }
            }
        }
        *DRAWN_BARS.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Logs one line per target: rows done, rate and ETA. The ETA is left out
    /// while the rate is unknown (before a target's second batch).
    pub fn log(&self) {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        for (target, progress) in targets.iter() {
            let done = progress.resumed + progress.scanned;
            let rate = match progress.first_batch {
                Some((at, rows)) if progress.scanned > rows => {
                    (progress.scanned - rows) as f64 / at.elapsed().as_secs_f64().max(0.001)
                }
                _ => 0.0,
            };
            let remaining = progress.estimated.saturating_sub(done);
            let percent = if progress.estimated > 0 {
                (done as f64 * 100.0 / progress.estimated as f64).min(100.0)
            } else {
                0.0
            };
            let percent = format!("{percent:.1}");
            let rows_per_second = rate.round() as u64;
            if rate > 0.0 || remaining == 0 {
                let eta_seconds = if remaining == 0 {
                    0
                } else {
                    (remaining as f64 / rate).round() as u64
                };
                tracing::info!(target = %target, rows_done = done, rows_estimated = progress.estimated, percent, rows_per_second, eta_seconds, "Progress.");
            } else {
                tracing::info!(target = %target, rows_done = done, rows_estimated = progress.estimated, percent, rows_per_second, "Progress.");
            }
        }
    }

    /// Time since the last committed batch (or since the start).
    pub fn idle_for(&self) -> Duration {
        self.last_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Whether bars are drawn (then periodic log lines are not needed).
    pub fn has_bars(&self) -> bool {
        self.bars.is_some()
    }
}

/// Logs progress every `interval` until the task is aborted.
pub fn spawn_logger(
    progress: std::sync::Arc<Progress>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            progress.log();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_run_leaves_bars_in_place() {
        for (completed, position) in [(false, 10), (true, 100)] {
            let progress = Progress {
                last_commit: Mutex::new(Instant::now()),
                targets: Mutex::new(BTreeMap::new()),
                bars: Some(MultiProgress::with_draw_target(ProgressDrawTarget::hidden())),
            };
            progress.add_target("t", 100, 0);
            progress.advance("t", Pass::Main, 10);
            progress.finish(completed);
            let targets = progress.targets.lock().unwrap();
            let bar = targets["t"].bar.as_ref().unwrap();
            assert_eq!(bar.position(), position, "completed: {completed}");
        }
    }
}
