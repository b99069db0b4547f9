//! Encryption keys: parsing, fingerprints, and where each key came from.
//!
//! A key is 32 bytes written as 64 hexadecimal characters. Key bytes live in a
//! zeroized buffer and no type here implements `Display` or prints key bytes in
//! `Debug`, so a key cannot reach a log line or an error message by accident.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

/// Length of a key in bytes (AES-256).
pub const KEY_BYTES: usize = 32;

/// Label hashed under the key to make its fingerprint. Changing it changes every
/// fingerprint stored in existing checkpoints.
const FINGERPRINT_LABEL: &[u8] = b"reencrypt key fingerprint v1";

/// Number of hexadecimal characters shown of a fingerprint.
const FINGERPRINT_HEX_CHARS: usize = 16;

/// The reason a key text was rejected. Messages never contain the key text itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("invalid encryption key: expected a 64-character hex string, got {0} characters")]
    WrongLength(usize),
    #[error("invalid encryption key: expected a 64-character hex string, found a non-hex character at position {0}")]
    NotHex(usize),
}

/// A 256-bit AES key. The bytes are zeroed when the key is dropped.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<[u8; KEY_BYTES]>,
}

impl Key {
    /// Parses 64 hex characters. Surrounding whitespace (such as the trailing
    /// newline of `vault kv get -field=... > file`) is ignored, and so is a
    /// byte order mark, which some editors put at the start of a file.
    pub fn from_hex(text: &str) -> Result<Key, KeyError> {
        let trimmed = text.trim().trim_start_matches('\u{feff}').trim();
        let length = trimmed.chars().count();
        if length != KEY_BYTES * 2 {
            return Err(KeyError::WrongLength(length));
        }
        if let Some(position) = trimmed.bytes().position(|b| !b.is_ascii_hexdigit()) {
            return Err(KeyError::NotHex(position + 1));
        }

        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        hex::decode_to_slice(trimmed, bytes.as_mut_slice()).map_err(|_| KeyError::NotHex(0))?;
        Ok(Key { bytes })
    }

    /// Wraps raw key bytes, for example freshly generated ones.
    pub fn from_bytes(mut raw: [u8; KEY_BYTES]) -> Key {
        let key = Key {
            bytes: Zeroizing::new(raw),
        };
        raw.zeroize();
        key
    }

    /// Generates a key from the operating system's CSPRNG.
    pub fn generate() -> Key {
        let mut raw = [0u8; KEY_BYTES];
        getrandom::getrandom(&mut raw).expect("the operating system's random source failed");
        Key::from_bytes(raw)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }

    /// Returns the key as 64 lowercase hex characters, in a zeroized buffer.
    /// Only the demo and the tests need this, to hand keys to other programs.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.bytes.as_slice()))
    }

    /// A short identifier of the key: HMAC-SHA256 keyed with the key over a fixed
    /// label, truncated. It identifies a key without revealing anything about it,
    /// so it can be stored in checkpoints, logs and metrics.
    pub fn fingerprint(&self) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.bytes.as_slice())
            .expect("HMAC accepts any key length");
        mac.update(FINGERPRINT_LABEL);
        let digest = mac.finalize().into_bytes();
        hex::encode(digest)[..FINGERPRINT_HEX_CHARS].to_string()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        // Constant-time comparison is not needed: both keys are the operator's own.
        self.bytes.as_slice() == other.bytes.as_slice()
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(fingerprint {})", self.fingerprint())
    }
}

/// The source a key was read from, shown by `reencrypt keys` and stored with the job.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KeyOrigin {
    File {
        path: PathBuf,
    },
    Env {
        variable: String,
    },
    Vault {
        mount: String,
        path: String,
        field: String,
        version: u64,
    },
    Generated,
}

impl KeyOrigin {
    /// The KV version when the key came from Vault.
    pub fn vault_version(&self) -> Option<u64> {
        match self {
            KeyOrigin::Vault { version, .. } => Some(*version),
            _ => None,
        }
    }
}

impl fmt::Display for KeyOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyOrigin::File { path } => write!(f, "file {}", path.display()),
            KeyOrigin::Env { variable } => write!(f, "environment variable {variable}"),
            KeyOrigin::Vault {
                mount,
                path,
                field,
                version,
            } => write!(f, "vault {mount}/{path} field {field} version {version}"),
            KeyOrigin::Generated => write!(f, "generated"),
        }
    }
}

/// A key together with where it came from.
#[derive(Clone, Debug)]
pub struct SourcedKey {
    pub key: Key,
    pub origin: KeyOrigin,
}

/// Reads a key file as written by `vault kv get -field=encryptionKey ... > file`
/// or `openssl rand -hex 32 > file`.
pub fn read_key_file(path: &Path) -> Result<SourcedKey, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?,
    );
    let key = Key::from_hex(&text).map_err(|e| format!("key file {}: {e}", path.display()))?;
    Ok(SourcedKey {
        key,
        origin: KeyOrigin::File {
            path: path.to_path_buf(),
        },
    })
}

/// Reads a key from an environment variable holding 64 hex characters.
pub fn read_key_env(variable: &str, text: &str) -> Result<SourcedKey, String> {
    let key = Key::from_hex(text).map_err(|e| format!("environment variable {variable}: {e}"))?;
    Ok(SourcedKey {
        key,
        origin: KeyOrigin::Env {
            variable: variable.to_string(),
        },
    })
}

/// The keys of one rotation: the new key and one or more old keys.
#[derive(Clone, Debug)]
pub struct KeySet {
    pub new: SourcedKey,
    pub old: Vec<SourcedKey>,
}

impl KeySet {
    /// Checks what makes a rotation meaningless or unsafe: no old key, an old
    /// key equal to the new key, or the same old key given twice.
    pub fn validate(&self) -> Result<(), String> {
        if self.old.is_empty() {
            return Err("no old key given: pass --old-key-file, set OLD_ENCRYPTION_KEY, or take one from Vault with --old-key-vault-version N|previous".into());
        }
        for (index, old) in self.old.iter().enumerate() {
            if old.key == self.new.key {
                return Err(format!(
                    "old key {} ({}) is equal to the new key ({}): nothing to rotate",
                    index + 1,
                    old.origin,
                    self.new.origin
                ));
            }
            if self.old[..index].iter().any(|o| o.key == old.key) {
                return Err(format!(
                    "old key {} ({}) is given twice (fingerprint {})",
                    index + 1,
                    old.origin,
                    old.key.fingerprint()
                ));
            }
        }
        Ok(())
    }

    pub fn old_fingerprints(&self) -> Vec<String> {
        self.old.iter().map(|k| k.key.fingerprint()).collect()
    }
}

/// Environment variable that may hold the new key itself (for Kubernetes Secrets).
pub const NEW_KEY_ENV: &str = "NEW_ENCRYPTION_KEY";
/// Environment variable that may hold comma-separated old keys.
pub const OLD_KEY_ENV: &str = "OLD_ENCRYPTION_KEY";

/// Collects the new key and the old keys from files, the environment and Vault,
/// and checks them. Errors name the source and never contain key material.
pub async fn resolve(args: &crate::cli::KeyArgs) -> Result<KeySet, crate::error::Failure> {
    use crate::error::Failure;

    let from_vault =
        crate::vault::load_keys(&args.vault)
            .await
            .map_err(|e| match e.exit_code() {
                crate::exit::CONFIG => Failure::Config(e.to_string()),
                _ => Failure::Retryable(e.to_string()),
            })?;

    // The new key: exactly one source.
    let mut new_keys = Vec::new();
    if let Some(path) = &args.new_key_file {
        new_keys.push(read_key_file(path).map_err(Failure::Config)?);
    }
    if let Ok(text) = std::env::var(NEW_KEY_ENV) {
        let text = Zeroizing::new(text);
        if !text.trim().is_empty() {
            new_keys.push(read_key_env(NEW_KEY_ENV, &text).map_err(Failure::Config)?);
        }
    }
    if let Some(key) = from_vault.new {
        new_keys.push(key);
    }
    let new = match new_keys.len() {
        0 => return Err(Failure::Config(format!(
            "no new key given: pass --new-key-file, set {NEW_KEY_ENV}, or take it from Vault with --new-key-from-vault"
        ))),
        1 => new_keys.pop().expect("one new key"),
        _ => return Err(Failure::Config(format!(
            "the new key is given more than once ({}); give exactly one source",
            new_keys.iter().map(|k| k.origin.to_string()).collect::<Vec<_>>().join(", ")
        ))),
    };

    // Old keys: every source, in a stable order.
    let mut old = Vec::new();
    for path in &args.old_key_file {
        old.push(read_key_file(path).map_err(Failure::Config)?);
    }
    if let Ok(text) = std::env::var(OLD_KEY_ENV) {
        let text = Zeroizing::new(text);
        for (index, part) in text.split(',').filter(|p| !p.trim().is_empty()).enumerate() {
            let variable = if index == 0 {
                OLD_KEY_ENV.to_string()
            } else {
                format!("{OLD_KEY_ENV} (item {})", index + 1)
            };
            old.push(read_key_env(&variable, part).map_err(Failure::Config)?);
        }
    }
    old.extend(from_vault.old);

    let keys = KeySet { new, old };
    keys.validate().map_err(Failure::Config)?;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_A: &str = "7f14aa0fe5569517d3bae57a4b2dcbed15a635f8382f64330c39e35ad25650ae";

    #[test]
    fn key_accepts_surrounding_whitespace() {
        let key = Key::from_hex(&format!("  {HEX_A}\n")).unwrap();
        assert_eq!(key.to_hex().as_str(), HEX_A);
    }

    #[test]
    fn key_accepts_byte_order_mark() {
        let key = Key::from_hex(&format!("\u{feff}{HEX_A}\r\n")).unwrap();
        assert_eq!(key.to_hex().as_str(), HEX_A);
    }

    #[test]
    fn key_rejects_wrong_length_without_echoing_it() {
        let error = Key::from_hex(&HEX_A[..63]).unwrap_err();
        assert_eq!(error, KeyError::WrongLength(63));
        assert!(!error.to_string().contains(&HEX_A[..63]));
    }

    #[test]
    fn key_rejects_non_hex() {
        let text = format!("{}zz", &HEX_A[..62]);
        assert_eq!(Key::from_hex(&text).unwrap_err(), KeyError::NotHex(63));
    }

    #[test]
    fn fingerprint_is_stable_and_not_the_key() {
        let key = Key::from_hex(HEX_A).unwrap();
        let fingerprint = key.fingerprint();
        assert_eq!(fingerprint.len(), FINGERPRINT_HEX_CHARS);
        assert_eq!(fingerprint, Key::from_hex(HEX_A).unwrap().fingerprint());
        assert!(!HEX_A.contains(&fingerprint));
        assert!(!format!("{key:?}").contains(&HEX_A[..16]));
    }
}
