//! Throttling for live systems: a row rate limit, a pause between batches, and
//! waiting while replicas lag behind. Every wait is logged and exported.

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::db::Database;
use crate::metrics;

/// Throttle settings; all off by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThrottleSettings {
    /// Upper bound on rows per second across all writers of this process.
    pub max_rows_per_second: Option<f64>,
    /// Sleep after every batch.
    pub pause_between_batches: Option<Duration>,
    /// Wait while the largest replay lag in `pg_stat_replication` exceeds this.
    pub max_replication_lag: Option<Duration>,
}

/// Shared by every writer of a process.
pub struct Throttle {
    settings: ThrottleSettings,
    db: Database,
    /// The end of the last slot given out under the rate limit.
    next_slot: Mutex<Instant>,
    /// When replication lag was last checked.
    lag_checked: Mutex<Option<Instant>>,
}

/// How often replication lag is read while it is within bounds.
const LAG_CHECK_INTERVAL: Duration = Duration::from_secs(5);

impl Throttle {
    pub fn new(settings: ThrottleSettings, db: Database) -> Throttle {
        for reason in metrics::THROTTLE_REASONS {
            metrics::record_throttle(reason, false);
        }
        Throttle {
            settings,
            db,
            next_slot: Mutex::new(Instant::now()),
            lag_checked: Mutex::new(None),
        }
    }

    /// Waits as the settings require before writing a batch of `rows` rows.
    pub async fn wait(&self, target: &str, rows: usize) {
        if let Some(pause) = self.settings.pause_between_batches {
            self.sleep("pause", target, pause).await;
        }
        if let Some(rate) = self.settings.max_rows_per_second {
            // A batch waits until the end of its own slot, so that no window
            // from the start ever contains more rows than the rate allows.
            let delay = {
                let mut next = self.next_slot.lock().await;
                let now = Instant::now();
                let start = (*next).max(now);
                *next = start + Duration::from_secs_f64(rows as f64 / rate.max(0.001));
                *next - now
            };
            if !delay.is_zero() {
                self.sleep("rate_limit", target, delay).await;
            }
        }
        if let Some(max_lag) = self.settings.max_replication_lag {
            self.wait_for_replicas(target, max_lag).await;
        }
    }

    async fn sleep(&self, reason: &'static str, target: &str, delay: Duration) {
        metrics::record_throttle(reason, true);
        tracing::debug!(target = %target, reason, delay_ms = delay.as_millis() as u64, "Throttling.");
        tokio::time::sleep(delay).await;
        metrics::record_throttle(reason, false);
        metrics::record_throttle_wait(reason, delay.as_secs_f64());
    }

    async fn wait_for_replicas(&self, target: &str, max_lag: Duration) {
        let mut checked = self.lag_checked.lock().await;
        if checked.is_some_and(|at| at.elapsed() < LAG_CHECK_INTERVAL) {
            return;
        }
        loop {
            let lag = match self.replication_lag().await {
                Ok(lag) => lag,
                Err(error) => {
                    tracing::warn!(error = %crate::db::describe(&error), "Could not read replication lag; not throttling on it.");
                    break;
                }
            };
            if lag <= max_lag {
                break;
            }
            tracing::info!(target = %target, lag_seconds = lag.as_secs_f64(), max_lag_seconds = max_lag.as_secs_f64(), "Replication lag above the limit; pausing writes.");
            self.sleep("replication_lag", target, LAG_CHECK_INTERVAL)
                .await;
        }
        *checked = Some(Instant::now());
    }

    /// The largest replay lag among connected replicas (zero without replicas).
    async fn replication_lag(&self) -> Result<Duration, sqlx::Error> {
        let mut tx = self.db.begin_read_only().await?;
        let seconds: f64 = sqlx::query_scalar(
            "SELECT COALESCE(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Duration::from_secs_f64(seconds.max(0.0)))
    }
}
