//! Keys from Vault KV v2. (Placeholder interface; the implementation is in progress.)

use crate::keys::SourcedKey;

/// Vault options shared by every command that needs keys.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VaultArgs {
    /// Take the new key from the current version of the Vault secret.
    #[arg(long, env = "REENCRYPT_NEW_KEY_FROM_VAULT")]
    pub new_key_from_vault: bool,
}

/// Keys read from Vault: the new key and any old keys asked for.
#[derive(Debug, Default)]
pub struct VaultKeys {
    pub new: Option<SourcedKey>,
    pub old: Vec<SourcedKey>,
}

/// A failure to read keys from Vault. Messages never contain a token or a key.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{0}")]
    Config(String),
}

impl VaultError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        crate::exit::CONFIG
    }
}

/// Reads the keys the options ask for from Vault; nothing when Vault is not used.
pub async fn load_keys(args: &VaultArgs) -> Result<VaultKeys, VaultError> {
    if args.new_key_from_vault {
        return Err(VaultError::Config("Vault support is not built yet".into()));
    }
    Ok(VaultKeys::default())
}
