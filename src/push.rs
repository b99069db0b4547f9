//! Pushes the job's metrics to a Prometheus Pushgateway, periodically and once
//! more at the end, so a one-shot Job's final figures outlive its pod.
//!
//! The group is keyed by job name and shard, so shards of one job do not
//! overwrite each other. Every push replaces the whole group, so it shows the
//! latest run: the last-success time is there only if that run finished the job.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::cli::MetricsArgs;
use crate::error::Failure;

/// A running periodic push.
pub struct Pusher {
    client: reqwest::Client,
    base_url: String,
    shard: u32,
    handle: PrometheusHandle,
    task: tokio::task::JoinHandle<()>,
}

/// Checks the Pushgateway options; returns the URL, or `None` when pushing is off.
pub fn gateway_url(args: &MetricsArgs) -> Result<Option<&str>, Failure> {
    let Some(url) = args
        .pushgateway_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        return Ok(None);
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Failure::Config(format!(
            "invalid --pushgateway-url {url:?}: expected an http:// or https:// URL"
        )));
    }
    if args.push_interval_secs == 0 {
        return Err(Failure::Config(
            "--push-interval-secs must be greater than 0".into(),
        ));
    }
    Ok(Some(url))
}

impl Pusher {
    /// Starts pushing when a Pushgateway URL is configured. Pushes wait until
    /// the job name is known, because the group's key is the job name and the shard.
    pub fn start(
        args: &MetricsArgs,
        shard: u32,
        handle: PrometheusHandle,
    ) -> Result<Option<Pusher>, Failure> {
        let Some(url) = gateway_url(args)? else {
            return Ok(None);
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Failure::Config(format!("cannot build the Pushgateway client: {e}")))?;
        let base_url = url.trim_end_matches('/').to_string();
        let task = {
            let client = client.clone();
            let base_url = base_url.clone();
            let handle = handle.clone();
            let interval = Duration::from_secs(args.push_interval_secs);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    if let Some(job) = crate::metrics::job_name() {
                        push(&client, &base_url, &job, shard, &handle).await;
                    }
                }
            })
        };
        Ok(Some(Pusher {
            client,
            base_url,
            shard,
            handle,
            task,
        }))
    }

    /// Stops the periodic push and pushes the final figures. Call it after
    /// `crate::metrics::record_end`, so the push carries the final state.
    pub async fn finish(self) {
        self.task.abort();
        match crate::metrics::job_name() {
            Some(job) => push(&self.client, &self.base_url, &job, self.shard, &self.handle).await,
            None => {
                tracing::warn!("Metrics not pushed: the run ended before the job was registered.")
            }
        }
    }
}

/// Replaces the group of this job and shard on the Pushgateway with the
/// current metrics. A failed push is logged and the run goes on.
async fn push(
    client: &reqwest::Client,
    base_url: &str,
    job: &str,
    shard: u32,
    handle: &PrometheusHandle,
) {
    let url = group_url(base_url, job, shard);
    let body = handle.render();
    match client
        .put(&url)
        .header("Content-Type", "text/plain; version=0.0.4")
        .body(body)
        .send()
        .await
    {
        Ok(response) if response.status().is_success() => {
            tracing::debug!(job, shard, "Metrics pushed.")
        }
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            tracing::warn!(job, shard, %status, response = %text.chars().take(300).collect::<String>(), "The Pushgateway rejected the metrics.");
        }
        Err(error) => {
            tracing::warn!(job, shard, error = %error.without_url(), "Cannot push metrics to the Pushgateway.")
        }
    }
}

/// Returns the URL of a group. The job name is sent in the Pushgateway's
/// base64 form, because the Pushgateway decodes a percent-encoded `/` before
/// it splits the path into labels.
fn group_url(base_url: &str, job: &str, shard: u32) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(job);
    format!("{base_url}/metrics/job@base64/{encoded}/shard/{shard}")
}

#[cfg(test)]
mod tests {
    use super::group_url;

    #[test]
    fn group_url_encodes_the_job_name() {
        assert_eq!(
            group_url("http://pushgateway:9091", "nightly/rotate ü", 2),
            "http://pushgateway:9091/metrics/job@base64/bmlnaHRseS9yb3RhdGUgw7w/shard/2"
        );
    }
}
