//! Checks on the shipping and monitoring files: the Dockerfile, the Compose
//! files and their .env.example, the Kubernetes manifests, the Prometheus
//! configuration and the Grafana provisioning and dashboard.
//!
//! The files are parsed from the repository, so these tests need no Docker
//! engine, cluster or Prometheus server. deploy/validate.sh runs the
//! schema validators and linters on the same files.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use reencrypt::{exit, metrics};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const COMPOSE_FILES: [&str; 2] = ["compose.yaml", "compose.monitoring.yaml"];
const JOB_FILE: &str = "deploy/kubernetes/job.yaml";
const INDEXED_JOB_FILE: &str = "deploy/kubernetes/indexed-job.yaml";
const DASHBOARD_FILE: &str = "grafana/dashboards/reencrypt.json";
/// Words that mark a variable as a secret, which must never hold a literal value.
const SECRET_WORDS: [&str; 3] = ["PASSWORD", "TOKEN", "SECRET"];
const APP_UID: i64 = 1001;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

fn read_yaml(relative: &str) -> Yaml {
    serde_yaml::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

fn read_json(relative: &str) -> Json {
    serde_json::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid JSON: {e}"))
}

/// Follows a path of mapping keys and sequence indexes, e.g. `"spec.template.spec"`.
fn at<'a>(value: &'a Yaml, path: &str) -> &'a Yaml {
    let mut current = value;
    for part in path.split('.') {
        current = match part.parse::<usize>() {
            Ok(index) => &current[index],
            Err(_) => &current[part],
        };
    }
    current
}

fn as_str<'a>(value: &'a Yaml, description: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{description} is missing or not a string: {value:?}"))
}

fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_WORDS.iter().any(|word| upper.contains(word))
}

/// Checks that an image reference names a version: a tag with a digit that
/// is not `latest`, or a digest.
fn assert_image_pinned(image: &str, location: &str) {
    if image.contains("@sha256:") {
        return;
    }
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    let tag = image[name_start..]
        .split_once(':')
        .map(|(_, tag)| tag)
        .unwrap_or_else(|| panic!("{location}: image {image} has no tag"));
    assert_ne!(
        tag, "latest",
        "{location}: image {image} uses the tag latest"
    );
    assert!(
        tag.chars().any(|c| c.is_ascii_digit()),
        "{location}: image {image} has tag {tag}, which names no version"
    );
}

/// Collects the names of `${NAME...}` and `$NAME` interpolations in one
/// Compose string. `$$` is Compose's escape for a literal `$`.
fn interpolated_names(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'$') {
            i += 2;
            continue;
        }
        let start = if chars.get(i + 1) == Some(&'{') {
            i + 2
        } else {
            i + 1
        };
        let end = (start..chars.len())
            .find(|&j| !(chars[j].is_ascii_alphanumeric() || chars[j] == '_'))
            .unwrap_or(chars.len());
        if end > start {
            names.push(chars[start..end].iter().collect());
        }
        i = end.max(i + 1);
    }
    names
}

/// Visits every string in a YAML tree together with the mapping key above it.
fn visit_strings<'a>(value: &'a Yaml, key: &str, visit: &mut dyn FnMut(&str, &'a str)) {
    match value {
        Yaml::String(text) => visit(key, text),
        Yaml::Sequence(items) => items
            .iter()
            .for_each(|item| visit_strings(item, key, visit)),
        Yaml::Mapping(mapping) => {
            for (child_key, child) in mapping {
                let child_key = child_key.as_str().unwrap_or(key);
                visit_strings(child, child_key, visit);
            }
        }
        _ => {}
    }
}

/// Checks that a secret's value is a required interpolation, `${NAME}`,
/// `${NAME:?message}` or `${NAME?message}`, with no default value.
fn assert_secret_interpolated(name: &str, value: &str, location: &str) {
    let inner = value
        .strip_prefix("${")
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or_else(|| panic!("{location}: {name} is a literal value, expected ${{VARIABLE}}"));
    let variable_end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let modifier = &inner[variable_end..];
    assert!(
        modifier.is_empty() || modifier.starts_with(":?") || modifier.starts_with('?'),
        "{location}: {name} has a default value in {value}; secrets must come from .env"
    );
}

/// Reads `.env.example` as (name, value, comment line above it) entries.
fn env_example_entries() -> Vec<(String, String, Option<String>)> {
    let text = read(".env.example");
    let mut entries = Vec::new();
    let mut previous_line: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some((name, value)) = trimmed
            .split_once('=')
            .filter(|_| !trimmed.starts_with('#'))
        {
            let comment = previous_line
                .filter(|p| p.starts_with('#'))
                .map(str::to_string);
            entries.push((name.trim().to_string(), value.trim().to_string(), comment));
        }
        previous_line = Some(trimmed);
    }
    entries
}

fn compose_services(file: &str) -> Vec<(String, Yaml)> {
    let compose = read_yaml(file);
    let services = compose["services"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{file} has no services mapping"));
    services
        .iter()
        .map(|(name, service)| (as_str(name, "service name").to_string(), service.clone()))
        .collect()
}

/// Returns a service's environment as (name, value) pairs, from either the
/// mapping form or the `NAME=value` list form.
fn service_environment(service: &Yaml) -> Vec<(String, String)> {
    match &service["environment"] {
        Yaml::Mapping(mapping) => mapping
            .iter()
            .map(|(name, value)| {
                let value = match value {
                    Yaml::String(text) => text.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                };
                (as_str(name, "environment name").to_string(), value)
            })
            .collect(),
        Yaml::Sequence(items) => items
            .iter()
            .map(|item| {
                let entry = as_str(item, "environment entry");
                let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
                (name.to_string(), value.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn environment_value(service: &Yaml, name: &str) -> Option<String> {
    service_environment(service)
        .into_iter()
        .find(|(candidate, _)| candidate == name)
        .map(|(_, value)| value)
}

// --- Compose ---------------------------------------------------------------

#[test]
fn compose_images_are_pinned() {
    for file in COMPOSE_FILES {
        for (name, service) in compose_services(file) {
            if let Some(image) = service["image"].as_str() {
                assert_image_pinned(image, &format!("{file} service {name}"));
            }
        }
    }
}

#[test]
fn compose_base_services_have_image_or_build() {
    for (name, service) in compose_services("compose.yaml") {
        let has_image = service["image"].is_string();
        let has_build = !service["build"].is_null();
        assert!(
            has_image || has_build,
            "compose.yaml service {name} has neither image nor build"
        );
    }
}

#[test]
fn compose_secrets_are_not_inline() {
    for file in COMPOSE_FILES {
        for (service_name, service) in compose_services(file) {
            for (name, value) in service_environment(&service) {
                if is_secret_name(&name) {
                    assert_secret_interpolated(
                        &name,
                        &value,
                        &format!("{file} service {service_name}"),
                    );
                }
            }
        }
    }
}

#[test]
fn compose_volume_names_are_kebab_case() {
    let mut declared = BTreeSet::new();
    for file in COMPOSE_FILES {
        if let Some(volumes) = read_yaml(file)["volumes"].as_mapping() {
            for name in volumes.keys() {
                let name = as_str(name, "volume name");
                assert!(!name.contains('_'), "{file}: volume {name} contains '_'");
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                    "{file}: volume {name} is not kebab-case"
                );
                declared.insert(name.to_string());
            }
        }
    }

    for file in COMPOSE_FILES {
        for (service_name, service) in compose_services(file) {
            for mount in service["volumes"].as_sequence().into_iter().flatten() {
                let source = as_str(mount, "volume entry")
                    .split(':')
                    .next()
                    .unwrap_or("");
                let is_path = source.starts_with('.') || source.starts_with('/');
                if !is_path {
                    assert!(
                        declared.contains(source),
                        "{file} service {service_name} mounts volume {source}, which no volumes: section declares"
                    );
                }
            }
        }
    }
}

#[test]
fn compose_variables_are_in_env_example() {
    let defined: BTreeSet<String> = env_example_entries()
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    for file in COMPOSE_FILES {
        let mut used = BTreeSet::new();
        visit_strings(&read_yaml(file), "", &mut |_, text| {
            used.extend(interpolated_names(text))
        });
        for name in used {
            assert!(
                defined.contains(&name),
                "{file} uses ${{{name}}}, which .env.example does not define"
            );
        }
    }
}

#[test]
fn env_example_documents_every_variable() {
    let entries = env_example_entries();
    assert!(!entries.is_empty(), ".env.example defines no variables");
    for (name, _, comment) in &entries {
        assert!(
            comment.is_some(),
            ".env.example: {name} has no comment line above it"
        );
    }
}

#[test]
fn env_example_holds_placeholders_only() {
    for (name, value, _) in env_example_entries() {
        if is_secret_name(&name) {
            assert_eq!(
                value, "change-me",
                ".env.example: {name} must hold the placeholder change-me"
            );
        }
    }
}

#[test]
fn compose_reencrypt_waits_for_its_inputs() {
    let services: Vec<(String, Yaml)> = compose_services("compose.yaml");
    let reencrypt = &services
        .iter()
        .find(|(name, _)| name == "reencrypt")
        .expect("no reencrypt service")
        .1;
    let depends_on = &reencrypt["depends_on"];

    for healthy in ["postgres", "openbao"] {
        assert_eq!(
            depends_on[healthy]["condition"].as_str(),
            Some("service_healthy"),
            "reencrypt must wait for {healthy} to be healthy"
        );
    }
    let seeds: Vec<&String> = services
        .iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("seed"))
        .collect();
    assert!(!seeds.is_empty(), "compose.yaml has no seed service");
    for seed in seeds {
        assert_eq!(
            depends_on[seed.as_str()]["condition"].as_str(),
            Some("service_completed_successfully"),
            "reencrypt must wait for {seed} to complete"
        );
    }
}

#[test]
fn compose_reencrypt_reads_keys_from_vault() {
    let services = compose_services("compose.yaml");
    let reencrypt = &services
        .iter()
        .find(|(name, _)| name == "reencrypt")
        .expect("no reencrypt service")
        .1;

    let command: Vec<&str> = reencrypt["command"]
        .as_sequence()
        .expect("reencrypt command is not a list")
        .iter()
        .map(|part| as_str(part, "command part"))
        .collect();
    assert_eq!(command.first(), Some(&"run"));
    assert!(
        command.contains(&"--target"),
        "reencrypt command has no --target: {command:?}"
    );

    let expected = [
        ("VAULT_ADDR", "http://openbao:8200"),
        ("REENCRYPT_NEW_KEY_FROM_VAULT", "true"),
        ("REENCRYPT_OLD_KEY_VAULT_VERSION", "previous"),
        ("REENCRYPT_METRICS_LISTEN", "0.0.0.0:9464"),
    ];
    for (name, value) in expected {
        assert_eq!(
            environment_value(reencrypt, name).as_deref(),
            Some(value),
            "reencrypt {name}"
        );
    }
    let database_url =
        environment_value(reencrypt, "DATABASE_URL").expect("reencrypt has no DATABASE_URL");
    assert!(
        database_url.starts_with("postgres://"),
        "DATABASE_URL is {database_url}"
    );
    assert!(
        database_url.contains("@postgres:5432/"),
        "DATABASE_URL does not point at the postgres service"
    );
}

#[test]
fn monitoring_overlay_pushes_to_pushgateway() {
    let services = compose_services("compose.monitoring.yaml");
    let reencrypt = &services
        .iter()
        .find(|(name, _)| name == "reencrypt")
        .expect("overlay does not extend reencrypt")
        .1;
    assert_eq!(
        environment_value(reencrypt, "REENCRYPT_PUSHGATEWAY_URL").as_deref(),
        Some("http://pushgateway:9091")
    );
    for name in ["prometheus", "pushgateway", "grafana"] {
        assert!(
            services.iter().any(|(service, _)| service == name),
            "overlay has no {name} service"
        );
    }
}

// --- Dockerfile ------------------------------------------------------------

/// Returns the Dockerfile's instructions with continuation lines joined and
/// comments removed.
fn dockerfile_instructions() -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(current.trim().to_string());
                current.clear();
            }
        }
    }
    instructions
}

fn instruction_arguments<'a>(instructions: &'a [String], keyword: &str) -> Vec<&'a str> {
    instructions
        .iter()
        .filter_map(|line| {
            let (first, rest) = line.split_once(char::is_whitespace)?;
            first.eq_ignore_ascii_case(keyword).then_some(rest.trim())
        })
        .collect()
}

#[test]
fn dockerfile_stages_are_pinned() {
    let instructions = dockerfile_instructions();
    let stages = instruction_arguments(&instructions, "FROM");
    assert!(
        stages.len() >= 2,
        "the Dockerfile is not multi-stage: {stages:?}"
    );
    for stage in &stages {
        let image = stage
            .split_whitespace()
            .find(|word| !word.starts_with("--"))
            .unwrap_or("");
        assert_image_pinned(image, "Dockerfile FROM");
    }
    assert!(
        stages[0].to_ascii_lowercase().contains(" as "),
        "the build stage has no name: {}",
        stages[0]
    );
}

#[test]
fn dockerfile_builds_locked_with_migrations() {
    let instructions = dockerfile_instructions();
    let last_build = instructions
        .iter()
        .rposition(|line| line.contains("cargo build") && line.contains("--release"))
        .expect("the Dockerfile never runs cargo build --release");
    assert!(
        instructions[last_build].contains("--locked"),
        "cargo build without --locked"
    );

    let migrations_copy = instructions
        .iter()
        .position(|line| line.starts_with("COPY") && line.contains("migrations"))
        .expect("the Dockerfile does not copy migrations/");
    assert!(
        migrations_copy < last_build,
        "migrations/ must be copied before the build, because sqlx::migrate! embeds it"
    );
}

#[test]
fn dockerfile_runs_as_uid_1001() {
    let instructions = dockerfile_instructions();
    let runs = instruction_arguments(&instructions, "RUN").join(" ");
    let uid = APP_UID.to_string();
    let creates_user =
        runs.contains(&format!("--uid {uid}")) || runs.contains(&format!("-u {uid}"));
    let creates_group =
        runs.contains(&format!("--gid {uid}")) || runs.contains(&format!("-g {uid}"));
    assert!(
        creates_user,
        "the Dockerfile creates no user with uid {uid}"
    );
    assert!(
        creates_group,
        "the Dockerfile creates no group with gid {uid}"
    );

    let users = instruction_arguments(&instructions, "USER");
    let user = users
        .last()
        .expect("the Dockerfile has no USER instruction");
    let user_name = user.split(':').next().unwrap_or("");
    assert!(
        user_name == uid || user_name == "reencrypt",
        "the final USER is {user}, expected {uid} or reencrypt"
    );
}

#[test]
fn dockerfile_entrypoint_is_reencrypt() {
    let instructions = dockerfile_instructions();
    let entrypoints = instruction_arguments(&instructions, "ENTRYPOINT");
    let entrypoint = entrypoints
        .last()
        .expect("the Dockerfile has no ENTRYPOINT");
    let parsed: Vec<String> = serde_json::from_str(entrypoint)
        .unwrap_or_else(|e| panic!("ENTRYPOINT {entrypoint} is not the JSON (exec) form: {e}"));
    assert!(
        parsed
            .first()
            .is_some_and(|program| program.ends_with("/reencrypt")),
        "ENTRYPOINT runs {parsed:?}"
    );
}

#[test]
fn dockerignore_excludes_build_output_and_secrets() {
    let ignored: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(|line| line.trim().trim_end_matches('/').to_string())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for required in ["target", ".git", ".env"] {
        assert!(
            ignored.contains(required),
            ".dockerignore does not exclude {required}"
        );
    }
}

// --- Kubernetes ------------------------------------------------------------

fn pod_spec(job: &Yaml) -> &Yaml {
    at(job, "spec.template.spec")
}

fn container<'a>(job: &'a Yaml, name: &str) -> &'a Yaml {
    pod_spec(job)["containers"]
        .as_sequence()
        .expect("no containers")
        .iter()
        .find(|container| container["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container named {name}"))
}

fn container_env<'a>(container: &'a Yaml, name: &str) -> &'a Yaml {
    container["env"]
        .as_sequence()
        .expect("container has no env list")
        .iter()
        .find(|entry| entry["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("container has no env {name}"))
}

/// Returns the exit codes of the podFailurePolicy rules with this action.
fn exit_codes_for_action(job: &Yaml, action: &str) -> Vec<i64> {
    at(job, "spec.podFailurePolicy.rules")
        .as_sequence()
        .expect("no podFailurePolicy rules")
        .iter()
        .filter(|rule| rule["action"].as_str() == Some(action))
        .filter_map(|rule| {
            let codes = &rule["onExitCodes"];
            if codes.is_null() {
                return None;
            }
            assert_eq!(
                codes["containerName"].as_str(),
                Some("reencrypt"),
                "{action} rule container"
            );
            assert_eq!(
                codes["operator"].as_str(),
                Some("In"),
                "{action} rule operator"
            );
            Some(
                codes["values"]
                    .as_sequence()
                    .expect("no values")
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

fn assert_disruptions_ignored(job: &Yaml, file: &str) {
    let rules = at(job, "spec.podFailurePolicy.rules")
        .as_sequence()
        .expect("no podFailurePolicy rules");
    let ignores_disruption = rules.iter().any(|rule| {
        rule["action"].as_str() == Some("Ignore")
            && rule["onPodConditions"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|condition| condition["type"].as_str() == Some("DisruptionTarget"))
    });
    assert!(
        ignores_disruption,
        "{file}: no Ignore rule for the DisruptionTarget condition"
    );
}

#[test]
fn exit_codes_match_the_documented_table() {
    assert_eq!(exit::SUCCESS, 0);
    assert_eq!(exit::RETRYABLE, 1);
    assert_eq!(exit::CONFIG, 2);
    assert_eq!(exit::NEEDS_ATTENTION, 3);
    assert_eq!(exit::INTERRUPTED, 4);
    assert_eq!(exit::VERIFY_FAILED, 5);
}

#[test]
fn job_fails_fast_on_config_and_attention() {
    let job = read_yaml(JOB_FILE);
    let fail_job = exit_codes_for_action(&job, "FailJob");
    assert_eq!(fail_job, vec![2, 3], "{JOB_FILE}: FailJob exit codes");
    assert_eq!(
        fail_job,
        vec![i64::from(exit::CONFIG), i64::from(exit::NEEDS_ATTENTION)]
    );
    assert_disruptions_ignored(&job, JOB_FILE);
}

#[test]
fn indexed_job_fails_on_config_and_attention() {
    let job = read_yaml(INDEXED_JOB_FILE);
    let fail_job = exit_codes_for_action(&job, "FailJob");
    assert!(
        fail_job.contains(&i64::from(exit::CONFIG)),
        "{INDEXED_JOB_FILE}: a configuration error must fail the whole Job"
    );
    let mut stopping: Vec<i64> = fail_job
        .iter()
        .copied()
        .chain(exit_codes_for_action(&job, "FailIndex"))
        .collect();
    stopping.sort_unstable();
    assert_eq!(
        stopping,
        vec![i64::from(exit::CONFIG), i64::from(exit::NEEDS_ATTENTION)],
        "{INDEXED_JOB_FILE}: exit codes that stop retries"
    );
    assert_disruptions_ignored(&job, INDEXED_JOB_FILE);
}

#[test]
fn job_settings_match_the_runbook() {
    let job = read_yaml(JOB_FILE);
    assert_eq!(at(&job, "spec.backoffLimit").as_i64(), Some(6));
    assert_eq!(at(&job, "spec.activeDeadlineSeconds").as_i64(), Some(21600));

    let pod = pod_spec(&job);
    assert_eq!(pod["restartPolicy"].as_str(), Some("Never"));
    assert_eq!(pod["terminationGracePeriodSeconds"].as_i64(), Some(120));
    assert_eq!(pod["serviceAccountName"].as_str(), Some("reencrypt"));

    let reencrypt = container(&job, "reencrypt");
    assert_eq!(reencrypt["args"][0].as_str(), Some("run"));
    let database_url = &container_env(reencrypt, "DATABASE_URL")["valueFrom"]["secretKeyRef"];
    assert_eq!(database_url["name"].as_str(), Some("reencrypt-database"));
    assert_eq!(database_url["key"].as_str(), Some("url"));
    assert_eq!(
        container_env(reencrypt, "REENCRYPT_VAULT_AUTH")["value"].as_str(),
        Some("kubernetes")
    );
    assert_eq!(
        container_env(reencrypt, "REENCRYPT_METRICS_LISTEN")["value"].as_str(),
        Some("0.0.0.0:9464")
    );

    let port = &reencrypt["ports"][0];
    assert_eq!(port["name"].as_str(), Some("metrics"));
    assert_eq!(port["containerPort"].as_i64(), Some(9464));

    let annotations = at(&job, "spec.template.metadata.annotations");
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("9464"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
}

#[test]
fn indexed_job_shard_count_matches_completions() {
    let job = read_yaml(INDEXED_JOB_FILE);
    assert_eq!(at(&job, "spec.completionMode").as_str(), Some("Indexed"));
    let completions = at(&job, "spec.completions")
        .as_i64()
        .expect("no completions");
    assert_eq!(at(&job, "spec.parallelism").as_i64(), Some(completions));
    let shard_count = as_str(
        &container_env(container(&job, "reencrypt"), "REENCRYPT_SHARD_COUNT")["value"],
        "REENCRYPT_SHARD_COUNT",
    );
    assert_eq!(shard_count, completions.to_string());
}

#[test]
fn jobs_run_as_restricted_non_root() {
    for file in [JOB_FILE, INDEXED_JOB_FILE] {
        let job = read_yaml(file);
        let pod = &pod_spec(&job)["securityContext"];
        assert_eq!(
            pod["runAsNonRoot"].as_bool(),
            Some(true),
            "{file}: pod runAsNonRoot"
        );
        assert_eq!(
            pod["runAsUser"].as_i64(),
            Some(APP_UID),
            "{file}: pod runAsUser"
        );
        assert_eq!(
            pod["runAsGroup"].as_i64(),
            Some(APP_UID),
            "{file}: pod runAsGroup"
        );
        assert_eq!(
            pod["fsGroup"].as_i64(),
            Some(APP_UID),
            "{file}: pod fsGroup"
        );
        assert_eq!(
            at(pod, "seccompProfile.type").as_str(),
            Some("RuntimeDefault"),
            "{file}: pod seccompProfile"
        );

        let reencrypt = container(&job, "reencrypt");
        let security = &reencrypt["securityContext"];
        assert_eq!(
            security["runAsNonRoot"].as_bool(),
            Some(true),
            "{file}: container runAsNonRoot"
        );
        assert_eq!(
            security["runAsUser"].as_i64(),
            Some(APP_UID),
            "{file}: container runAsUser"
        );
        assert_eq!(
            security["runAsGroup"].as_i64(),
            Some(APP_UID),
            "{file}: container runAsGroup"
        );
        assert_eq!(
            security["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{file}: readOnlyRootFilesystem"
        );
        assert_eq!(
            security["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{file}: allowPrivilegeEscalation"
        );
        let dropped: Vec<&str> = at(security, "capabilities.drop")
            .as_sequence()
            .expect("no dropped capabilities")
            .iter()
            .map(|c| as_str(c, "capability"))
            .collect();
        assert_eq!(dropped, vec!["ALL"], "{file}: capabilities.drop");
        assert_eq!(
            at(security, "seccompProfile.type").as_str(),
            Some("RuntimeDefault"),
            "{file}: container seccompProfile"
        );

        // A read-only root file system needs a writable /tmp.
        let tmp_mount = reencrypt["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|mount| mount["mountPath"].as_str() == Some("/tmp"))
            .unwrap_or_else(|| panic!("{file}: nothing is mounted at /tmp"));
        let volume_name = as_str(&tmp_mount["name"], "volume name");
        let volume = pod_spec(&job)["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|volume| volume["name"].as_str() == Some(volume_name))
            .unwrap_or_else(|| panic!("{file}: volume {volume_name} is not defined"));
        assert!(
            volume["emptyDir"].is_mapping(),
            "{file}: /tmp is not an emptyDir"
        );
    }
}

#[test]
fn jobs_take_secrets_from_secret_refs() {
    for file in [JOB_FILE, INDEXED_JOB_FILE] {
        let job = read_yaml(file);
        for entry in container(&job, "reencrypt")["env"]
            .as_sequence()
            .expect("no env")
        {
            let name = as_str(&entry["name"], "env name");
            if is_secret_name(name) || name == "DATABASE_URL" {
                assert!(
                    entry["value"].is_null(),
                    "{file}: {name} has a literal value"
                );
                assert!(
                    entry["valueFrom"].is_mapping(),
                    "{file}: {name} has no valueFrom"
                );
            }
        }
    }
}

#[test]
fn kubernetes_images_are_pinned() {
    for file in [JOB_FILE, INDEXED_JOB_FILE] {
        let job = read_yaml(file);
        for container in pod_spec(&job)["containers"]
            .as_sequence()
            .expect("no containers")
        {
            assert_image_pinned(as_str(&container["image"], "image"), file);
        }
    }
    let kustomization = read_yaml("deploy/kubernetes/kustomization.yaml");
    for image in kustomization["images"].as_sequence().into_iter().flatten() {
        let tag = as_str(&image["newTag"], "kustomization newTag");
        let name = as_str(&image["newName"], "kustomization newName");
        assert_image_pinned(&format!("{name}:{tag}"), "kustomization.yaml images");
    }
}

#[test]
fn kustomization_resources_exist_without_examples() {
    let kustomization = read_yaml("deploy/kubernetes/kustomization.yaml");
    let resources: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .expect("no resources")
        .iter()
        .map(|r| as_str(r, "resource"))
        .collect();
    for resource in &resources {
        let path = format!("deploy/kubernetes/{resource}");
        assert!(
            repo_path(&path).is_file(),
            "kustomization resource {path} does not exist"
        );
    }
    assert!(
        resources.contains(&"job.yaml"),
        "kustomization does not create the Job"
    );
    assert!(
        resources.contains(&"serviceaccount.yaml"),
        "kustomization does not create the ServiceAccount"
    );
    for excluded in ["secret.example.yaml", "podmonitor.yaml", "indexed-job.yaml"] {
        assert!(
            !resources.contains(&excluded),
            "kustomization must not apply {excluded}"
        );
    }
}

#[test]
fn service_account_mounts_its_token() {
    let account = read_yaml("deploy/kubernetes/serviceaccount.yaml");
    assert_eq!(account["kind"].as_str(), Some("ServiceAccount"));
    assert_eq!(at(&account, "metadata.name").as_str(), Some("reencrypt"));
    assert_eq!(
        account["automountServiceAccountToken"].as_bool(),
        Some(true)
    );
}

#[test]
fn secret_example_holds_a_placeholder() {
    let text = read("deploy/kubernetes/secret.example.yaml");
    assert!(
        text.contains("EXAMPLE"),
        "secret.example.yaml is not marked as an example"
    );
    let secret = read_yaml("deploy/kubernetes/secret.example.yaml");
    assert_eq!(
        at(&secret, "metadata.name").as_str(),
        Some("reencrypt-database")
    );
    let url = as_str(at(&secret, "stringData.url"), "stringData.url");
    assert!(
        url.contains("REPLACE-ME"),
        "the example URL must hold the placeholder REPLACE-ME"
    );
}

// --- Prometheus and Grafana --------------------------------------------------

/// Names of every metric the binary exports, as its Prometheus series names.
fn exported_metric_names() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = [
        metrics::ROWS_TOTAL,
        metrics::CONFLICTS_TOTAL,
        metrics::BATCHES_TOTAL,
        metrics::ROWS_ESTIMATED,
        metrics::ROWS_SCANNED,
        metrics::LAST_CHECKPOINT_TIMESTAMP_SECONDS,
        metrics::RETRIES_TOTAL,
        metrics::ERRORS_TOTAL,
        metrics::JOB_INFO,
        metrics::JOB_STATE,
        metrics::JOB_START_TIMESTAMP_SECONDS,
        metrics::JOB_LAST_SUCCESS_TIMESTAMP_SECONDS,
        metrics::SWEEP_ROWS_REENCRYPTED_TOTAL,
        metrics::THROTTLED,
        metrics::THROTTLE_WAIT_SECONDS,
    ]
    .iter()
    .map(|name| name.to_string())
    .collect();
    for suffix in ["_bucket", "_sum", "_count"] {
        names.insert(format!("{}{suffix}", metrics::BATCH_DURATION_SECONDS));
    }
    names
}

fn dashboard_panels() -> Vec<Json> {
    let dashboard = read_json(DASHBOARD_FILE);
    let mut panels = Vec::new();
    for panel in dashboard["panels"]
        .as_array()
        .expect("dashboard has no panels")
    {
        // Collapsed rows keep their panels inside the row.
        for nested in panel["panels"].as_array().into_iter().flatten() {
            panels.push(nested.clone());
        }
        if panel["type"] != "row" {
            panels.push(panel.clone());
        }
    }
    panels
}

fn panel_expressions(panel: &Json) -> Vec<String> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|target| target["expr"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn dashboard_panels_query_reencrypt_metrics() {
    let panels = dashboard_panels();
    assert!(!panels.is_empty(), "the dashboard has no panels");
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let expressions = panel_expressions(panel);
        assert!(
            expressions.iter().any(|expr| expr.contains("reencrypt_")),
            "panel {title} queries no reencrypt_ metric"
        );
    }
}

#[test]
fn dashboard_uses_datasource_uid_prometheus() {
    for panel in dashboard_panels() {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "panel {title} data source"
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "prometheus",
                "panel {title} target data source"
            );
        }
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let exported = exported_metric_names();
    for panel in dashboard_panels() {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for expr in panel_expressions(&panel) {
            for (start, _) in expr.match_indices("reencrypt_") {
                let name: String = expr[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&name),
                    "panel {title} queries {name}, which reencrypt does not export"
                );
            }
        }
    }
}

#[test]
fn dashboard_counters_created_lazily_fall_back_to_zero() {
    // These series appear only after the first error, retry or throttle wait,
    // so their panels need a fallback to show data on a clean run.
    let lazy = [
        metrics::ERRORS_TOTAL,
        metrics::RETRIES_TOTAL,
        metrics::THROTTLE_WAIT_SECONDS,
    ];
    for panel in dashboard_panels() {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for expr in panel_expressions(&panel) {
            if lazy.iter().any(|name| expr.contains(name)) {
                assert!(
                    expr.contains("vector(0)"),
                    "panel {title}: {expr} has no `or ... vector(0)` fallback"
                );
            }
        }
    }
}

#[test]
fn grafana_datasource_uid_is_prometheus() {
    let provisioning = read_yaml("grafana/provisioning/datasources/prometheus.yaml");
    let datasource = &provisioning["datasources"][0];
    assert_eq!(datasource["uid"].as_str(), Some("prometheus"));
    assert_eq!(datasource["type"].as_str(), Some("prometheus"));
}

#[test]
fn grafana_dashboard_path_matches_compose_mount() {
    let provider = read_yaml("grafana/provisioning/dashboards/reencrypt.yaml");
    let path = as_str(
        at(&provider, "providers.0.options.path"),
        "dashboard provider path",
    );

    let services = compose_services("compose.monitoring.yaml");
    let grafana = &services
        .iter()
        .find(|(name, _)| name == "grafana")
        .expect("no grafana service")
        .1;
    let mounted = grafana["volumes"]
        .as_sequence()
        .expect("grafana has no volumes")
        .iter()
        .map(|mount| as_str(mount, "grafana volume"))
        .any(|mount| {
            let mut parts = mount.split(':');
            parts.next() == Some("./grafana/dashboards") && parts.next() == Some(path)
        });
    assert!(
        mounted,
        "grafana/dashboards is not mounted at the provider path {path}"
    );
}

#[test]
fn prometheus_scrapes_reencrypt_and_pushgateway() {
    let config = read_yaml("deploy/monitoring/prometheus.yml");
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("no scrape_configs");
    let targets_of = |job: &Yaml| -> Vec<String> {
        job["static_configs"]
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(|group| group["targets"].as_sequence().cloned().unwrap_or_default())
            .map(|target| as_str(&target, "scrape target").to_string())
            .collect()
    };

    let direct = jobs
        .iter()
        .find(|job| targets_of(job).contains(&"reencrypt:9464".to_string()));
    assert!(direct.is_some(), "no scrape job for reencrypt:9464");

    let pushgateway = jobs
        .iter()
        .find(|job| targets_of(job).contains(&"pushgateway:9091".to_string()))
        .expect("no scrape job for pushgateway:9091");
    assert_eq!(
        pushgateway["honor_labels"].as_bool(),
        Some(true),
        "the Pushgateway job must honor pushed labels"
    );
}
