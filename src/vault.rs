//! Keys from Vault KV v2: the Vault options, the errors a caller reacts to, and
//! [`load_keys`], which logs in once and reads every requested version of the
//! key secret.
//!
//! The runbook stores the new key as the current version of one KV v2 secret,
//! so the old key is usually an earlier version of the same secret. Each key
//! read here carries [`KeyOrigin::Vault`] with the KV version it came from, so
//! that a job records exactly which versions it rotated between.
//!
//! Every setting is passed to the client explicitly. `vaultrs` would otherwise
//! read `VAULT_*` variables on its own, and then an option and a variable could
//! disagree about which server or CA is in use.

mod location;
mod session;
mod versions;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::builder::BoolishValueParser;

use crate::keys::{KeyOrigin, SourcedKey};

pub use location::KeyLocation;
pub use session::{kubernetes_login, KubernetesLogin};

/// The application's own default for ENCRYPTION_KEY_VAULT_PATH, in API form.
pub const DEFAULT_KEY_PATH: &str = "secret/data/agentidp/encryption-key";
/// Field of the secret that contains the key as 64 hex characters.
pub const DEFAULT_KEY_FIELD: &str = "encryptionKey";
/// Mount path of the AppRole auth method.
pub const DEFAULT_APPROLE_MOUNT: &str = "approle";
/// Mount path of the Kubernetes auth method.
pub const DEFAULT_K8S_MOUNT: &str = "kubernetes";
/// Path at which Kubernetes mounts a pod's service account token.
pub const DEFAULT_K8S_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Vault options shared by every command that needs keys.
///
/// Secrets never appear here as values: the token comes from VAULT_TOKEN, a
/// file or `~/.vault-token`, and the AppRole secret ID from a file or
/// REENCRYPT_VAULT_SECRET_ID, so none of them shows in `ps`.
#[derive(clap::Args, Debug, Clone)]
pub struct VaultArgs {
    /// Take the new key from the current version of the Vault secret.
    #[arg(long, env = "REENCRYPT_NEW_KEY_FROM_VAULT", value_parser = BoolishValueParser::new())]
    pub new_key_from_vault: bool,

    /// Take the new key from this KV version of the Vault secret instead of the
    /// current one. Pin it to resume a job after the secret got a newer version.
    #[arg(long, env = "REENCRYPT_NEW_KEY_VAULT_VERSION", value_name = "VERSION")]
    pub new_key_vault_version: Option<u64>,

    /// Take an old key from this KV version of the Vault secret, or from
    /// `previous`: the newest version older than the new key's version (or
    /// than the current version, when the new key is not from Vault) that is
    /// neither deleted nor destroyed. Repeatable; the variable takes a
    /// comma-separated list.
    #[arg(
        long,
        env = "REENCRYPT_OLD_KEY_VAULT_VERSION",
        value_delimiter = ',',
        value_name = "VERSION|previous"
    )]
    pub old_key_vault_version: Vec<OldVersion>,

    /// Path of the KV v2 secret that contains the key, in API form
    /// (secret/data/agentidp/encryption-key) or CLI form
    /// (secret/agentidp/encryption-key). The first segment is the mount unless
    /// --vault-kv-mount names another.
    #[arg(long, env = "ENCRYPTION_KEY_VAULT_PATH", default_value = DEFAULT_KEY_PATH)]
    pub vault_key_path: String,

    /// Mount path of the KV v2 engine, for a mount that is not the first
    /// segment of --vault-key-path (e.g. `team/kv`). The key path may then
    /// start with the mount or be relative to it.
    #[arg(long, env = "REENCRYPT_VAULT_KV_MOUNT")]
    pub vault_kv_mount: Option<String>,

    /// Field of the secret that contains the key as 64 hex characters.
    #[arg(long, env = "REENCRYPT_VAULT_KEY_FIELD", default_value = DEFAULT_KEY_FIELD)]
    pub vault_key_field: String,

    /// Vault address, e.g. https://vault.example.com:8200. Required when a key
    /// comes from Vault.
    #[arg(long, env = "VAULT_ADDR")]
    pub vault_addr: Option<String>,

    /// Vault Enterprise or OpenBao namespace for the login and every read.
    #[arg(long, env = "VAULT_NAMESPACE")]
    pub vault_namespace: Option<String>,

    /// PEM file with the CA certificate that signed Vault's TLS certificate.
    #[arg(long, env = "VAULT_CACERT")]
    pub vault_cacert: Option<PathBuf>,

    /// Directory of PEM files with CA certificates; every file in it is loaded.
    #[arg(long, env = "VAULT_CAPATH")]
    pub vault_capath: Option<PathBuf>,

    /// Do not verify Vault's TLS certificate. For tests only.
    #[arg(long, env = "VAULT_SKIP_VERIFY", value_parser = BoolishValueParser::new())]
    pub vault_skip_verify: bool,

    /// How to log in to Vault. Without it: `approle` when a role ID is given,
    /// `kubernetes` when a Kubernetes role is given, otherwise `token`.
    #[arg(long, env = "REENCRYPT_VAULT_AUTH", value_enum)]
    pub vault_auth: Option<AuthMethod>,

    /// File that contains the Vault token. Without it the token comes from VAULT_TOKEN,
    /// then from ~/.vault-token. There is no option for the token itself, so
    /// that it never shows in the process list.
    #[arg(long, env = "REENCRYPT_VAULT_TOKEN_FILE")]
    pub vault_token_file: Option<PathBuf>,

    /// AppRole role ID.
    #[arg(long, env = "REENCRYPT_VAULT_ROLE_ID")]
    pub vault_role_id: Option<String>,

    /// File that contains the AppRole role ID, instead of --vault-role-id.
    #[arg(long, env = "REENCRYPT_VAULT_ROLE_ID_FILE")]
    pub vault_role_id_file: Option<PathBuf>,

    /// File that contains the AppRole secret ID. Without it the secret ID comes from
    /// the environment variable REENCRYPT_VAULT_SECRET_ID.
    #[arg(long, env = "REENCRYPT_VAULT_SECRET_ID_FILE")]
    pub vault_secret_id_file: Option<PathBuf>,

    /// Mount path of the AppRole auth method.
    #[arg(long, env = "REENCRYPT_VAULT_APPROLE_MOUNT", default_value = DEFAULT_APPROLE_MOUNT)]
    pub vault_approle_mount: String,

    /// Vault role for Kubernetes auth. Tested against OpenBao up to the login
    /// request only, not inside a real cluster.
    #[arg(long, env = "REENCRYPT_VAULT_K8S_ROLE")]
    pub vault_k8s_role: Option<String>,

    /// File that contains the service account JWT for Kubernetes auth.
    #[arg(long, env = "REENCRYPT_VAULT_K8S_JWT_FILE", default_value = DEFAULT_K8S_JWT_FILE)]
    pub vault_k8s_jwt_file: PathBuf,

    /// Mount path of the Kubernetes auth method.
    #[arg(long, env = "REENCRYPT_VAULT_K8S_MOUNT", default_value = DEFAULT_K8S_MOUNT)]
    pub vault_k8s_mount: String,
}

impl Default for VaultArgs {
    /// Returns the values clap gives when no Vault option or variable is set.
    fn default() -> VaultArgs {
        VaultArgs {
            new_key_from_vault: false,
            new_key_vault_version: None,
            old_key_vault_version: Vec::new(),
            vault_key_path: DEFAULT_KEY_PATH.to_string(),
            vault_kv_mount: None,
            vault_key_field: DEFAULT_KEY_FIELD.to_string(),
            vault_addr: None,
            vault_namespace: None,
            vault_cacert: None,
            vault_capath: None,
            vault_skip_verify: false,
            vault_auth: None,
            vault_token_file: None,
            vault_role_id: None,
            vault_role_id_file: None,
            vault_secret_id_file: None,
            vault_approle_mount: DEFAULT_APPROLE_MOUNT.to_string(),
            vault_k8s_role: None,
            vault_k8s_jwt_file: PathBuf::from(DEFAULT_K8S_JWT_FILE),
            vault_k8s_mount: DEFAULT_K8S_MOUNT.to_string(),
        }
    }
}

impl VaultArgs {
    /// Returns whether any key is to be read from Vault.
    pub fn uses_vault(&self) -> bool {
        self.new_key_from_vault
            || self.new_key_vault_version.is_some()
            || !self.old_key_vault_version.is_empty()
    }
}

/// Vault auth methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMethod {
    /// A token from VAULT_TOKEN, --vault-token-file or ~/.vault-token.
    Token,
    /// AppRole login with a role ID and a secret ID.
    Approle,
    /// Kubernetes login with the pod's service account JWT.
    Kubernetes,
}

/// KV version of the secret that an old key is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldVersion {
    /// Exactly this version.
    Pinned(u64),
    /// The newest readable version older than the new key's version.
    Previous,
}

impl fmt::Display for OldVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OldVersion::Pinned(version) => write!(f, "{version}"),
            OldVersion::Previous => write!(f, "previous"),
        }
    }
}

impl FromStr for OldVersion {
    type Err = String;

    fn from_str(text: &str) -> Result<OldVersion, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("previous") {
            return Ok(OldVersion::Previous);
        }
        match text.parse::<u64>() {
            Ok(version) if version >= 1 => Ok(OldVersion::Pinned(version)),
            _ => Err(format!(
                "invalid Vault version {text:?}: expected a KV version number from 1 up, or `previous`"
            )),
        }
    }
}

/// Keys read from Vault: the new key and any old keys asked for.
#[derive(Debug, Default)]
pub struct VaultKeys {
    pub new: Option<SourcedKey>,
    pub old: Vec<SourcedKey>,
}

/// A failure to read keys from Vault, by how the caller must react. Messages
/// name the Vault address, path and version, and never contain a token, a
/// secret ID, a JWT or a key.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// An option, variable or local file is invalid or missing.
    #[error("{0}")]
    Config(String),
    /// Vault rejected the login or the read (HTTP 403, or invalid credentials).
    #[error("{0}")]
    Denied(String),
    /// The secret, version or field is missing, deleted or destroyed, or its
    /// value is not a key.
    #[error("{0}")]
    Secret(String),
    /// Vault could not be reached or was unavailable after every retry.
    #[error("{0}")]
    Unavailable(String),
}

impl VaultError {
    /// Returns the process exit code: 1 when Vault was unavailable, so that a
    /// rerun may pass, and 2 for everything an operator has to fix first.
    pub fn exit_code(&self) -> i32 {
        match self {
            VaultError::Unavailable(_) => crate::exit::RETRYABLE,
            VaultError::Config(_) | VaultError::Denied(_) | VaultError::Secret(_) => {
                crate::exit::CONFIG
            }
        }
    }
}

/// Reads the keys the options ask for from Vault. Returns no keys, and
/// contacts nothing, when no key is to come from Vault.
pub async fn load_keys(args: &VaultArgs) -> Result<VaultKeys, VaultError> {
    if !args.uses_vault() {
        return Ok(VaultKeys::default());
    }

    // Everything local is checked before the first request.
    let location = KeyLocation::parse(
        &args.vault_key_path,
        args.vault_kv_mount.as_deref(),
        &args.vault_key_field,
    )
    .map_err(VaultError::Config)?;
    let session = session::Session::open(args).await?;
    let reader = versions::Reader::new(&session, &location);

    // The new key: a pinned version, or the current one.
    let new = if let Some(version) = args.new_key_vault_version {
        Some(reader.read_pinned(version, "the new key").await?)
    } else if args.new_key_from_vault {
        Some(reader.read_current("the new key").await?)
    } else {
        None
    };

    // Old keys, in the order given. `previous` counts back from the new key's
    // version, or from the current version when the new key is not from Vault.
    let mut newer_than_previous = new.as_ref().and_then(|key| key.origin.vault_version());
    let mut old = Vec::new();
    for selector in &args.old_key_vault_version {
        let role = format!("the old key of --old-key-vault-version {selector}");
        let key = match selector {
            OldVersion::Pinned(version) => reader.read_pinned(*version, &role).await?,
            OldVersion::Previous => {
                let base = match newer_than_previous {
                    Some(version) => version,
                    None => reader.current_version(&role).await?,
                };
                newer_than_previous = Some(base);
                reader.read_previous(base, &role).await?
            }
        };
        old.push(key);
    }

    Ok(VaultKeys { new, old })
}

/// Builds the origin recorded for a key read from `location` at `version`.
fn origin(location: &KeyLocation, version: u64) -> KeyOrigin {
    KeyOrigin::Vault {
        mount: location.mount.clone(),
        path: location.path.clone(),
        field: location.field.clone(),
        version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_version_parses_numbers_and_previous() {
        assert_eq!("3".parse::<OldVersion>(), Ok(OldVersion::Pinned(3)));
        assert_eq!(" previous ".parse::<OldVersion>(), Ok(OldVersion::Previous));
        assert_eq!("Previous".parse::<OldVersion>(), Ok(OldVersion::Previous));
    }

    #[test]
    fn old_version_rejects_zero_and_words() {
        for text in ["0", "-1", "latest", ""] {
            let error = text.parse::<OldVersion>().unwrap_err();
            assert!(error.contains("from 1 up"), "{text}: {error}");
        }
    }

    #[test]
    fn exit_codes_follow_caller_reaction() {
        assert_eq!(VaultError::Unavailable(String::new()).exit_code(), 1);
        assert_eq!(VaultError::Denied(String::new()).exit_code(), 2);
        assert_eq!(VaultError::Secret(String::new()).exit_code(), 2);
        assert_eq!(VaultError::Config(String::new()).exit_code(), 2);
    }

    #[test]
    fn default_matches_clap_defaults() {
        use clap::Parser;

        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            vault: VaultArgs,
        }
        let parsed = Wrapper::try_parse_from(["test"]).unwrap().vault;
        let default = VaultArgs::default();
        assert_eq!(parsed.vault_key_path, default.vault_key_path);
        assert_eq!(parsed.vault_key_field, default.vault_key_field);
        assert_eq!(parsed.vault_approle_mount, default.vault_approle_mount);
        assert_eq!(parsed.vault_k8s_mount, default.vault_k8s_mount);
        assert_eq!(parsed.vault_k8s_jwt_file, default.vault_k8s_jwt_file);
    }
}
