//! Pushes the job's metrics to a Prometheus Pushgateway, periodically and once
//! more at the end, so a one-shot Job's final figures outlive its pod.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::cli::MetricsArgs;
use crate::error::Failure;

/// Pushgateway grouping key used until the job name is known.
const PENDING_JOB_NAME: &str = "reencrypt";

/// A running periodic push.
pub struct Pusher {
    client: reqwest::Client,
    base_url: String,
    handle: PrometheusHandle,
    task: tokio::task::JoinHandle<()>,
    job: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Pusher {
    /// Starts pushing when a Pushgateway URL is configured.
    pub fn start(args: &MetricsArgs, handle: PrometheusHandle) -> Result<Option<Pusher>, Failure> {
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
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Failure::Config(format!("cannot build the Pushgateway client: {e}")))?;
        let base_url = url.trim_end_matches('/').to_string();
        let job = std::sync::Arc::new(std::sync::Mutex::new(PENDING_JOB_NAME.to_string()));
        let task = {
            let client = client.clone();
            let base_url = base_url.clone();
            let handle = handle.clone();
            let job = job.clone();
            let interval = Duration::from_secs(args.push_interval_secs);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let name = job.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    push(&client, &base_url, &name, &handle).await;
                }
            })
        };
        Ok(Some(Pusher {
            client,
            base_url,
            handle,
            task,
            job,
        }))
    }

    /// Sets the grouping key once the job name is known.
    pub fn set_job(&self, job: &str) {
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = job.to_string();
    }

    /// Stops the periodic push and pushes the final figures.
    pub async fn finish(self, job: Option<String>, _succeeded: bool) {
        self.task.abort();
        if let Some(job) = job {
            self.set_job(&job);
        }
        let name = self.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        push(&self.client, &self.base_url, &name, &self.handle).await;
    }
}

/// Replaces the job's group on the Pushgateway with the current metrics.
async fn push(client: &reqwest::Client, base_url: &str, job: &str, handle: &PrometheusHandle) {
    let url = format!("{base_url}/metrics/job/{}", percent_encode(job));
    let body = handle.render();
    match client
        .put(&url)
        .header("Content-Type", "text/plain; version=0.0.4")
        .body(body)
        .send()
        .await
    {
        Ok(response) if response.status().is_success() => tracing::debug!(job, "Metrics pushed."),
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            tracing::warn!(job, %status, response = %text.chars().take(300).collect::<String>(), "The Pushgateway rejected the metrics.");
        }
        Err(error) => {
            tracing::warn!(job, error = %error.without_url(), "Cannot push metrics to the Pushgateway.")
        }
    }
}

/// Percent-encodes a path segment.
fn percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
