//! Reading KV v2 versions of the key secret: the current one, a pinned one,
//! and `previous`, the newest readable version older than a given one.

use serde_json::Value;
use vaultrs::api::kv2::requests::ReadSecretRequest;
use vaultrs::api::kv2::responses::ReadSecretResponse;
use zeroize::{Zeroize, Zeroizing};

use super::session::{RequestError, Session};
use super::{origin, KeyLocation, VaultError};
use crate::keys::{Key, SourcedKey};

/// The result of reading one version.
enum Fetched {
    Key(SourcedKey),
    Deleted {
        version: u64,
        deletion_time: String,
    },
    Destroyed {
        version: u64,
    },
    /// No such secret or version: never written, or removed by `max_versions`
    /// or `vault kv metadata delete`.
    Missing,
}

/// Reads versions of the secret at one location.
pub(super) struct Reader<'a> {
    session: &'a Session,
    location: &'a KeyLocation,
}

impl<'a> Reader<'a> {
    pub(super) fn new(session: &'a Session, location: &'a KeyLocation) -> Reader<'a> {
        Reader { session, location }
    }

    /// Reads the current version. `role` names the key in messages, e.g. "the new key".
    pub(super) async fn read_current(&self, role: &str) -> Result<SourcedKey, VaultError> {
        let secret = self.cli_path();
        match self.fetch(None, role).await? {
            Fetched::Key(key) => Ok(key),
            Fetched::Deleted {
                version,
                deletion_time,
            } => Err(VaultError::Secret(format!(
                "cannot read {role} from Vault: the current version {version} of {secret} was deleted \
                 at {deletion_time}; undelete it (vault kv undelete -versions={version} {}) or pin an \
                 older version with --new-key-vault-version",
                self.cli_path()
            ))),
            Fetched::Destroyed { version } => Err(VaultError::Secret(format!(
                "cannot read {role} from Vault: the current version {version} of {secret} is destroyed; \
                 write the key again or pin an older version with --new-key-vault-version"
            ))),
            Fetched::Missing => Err(self.not_found(role)),
        }
    }

    /// Reads exactly `version`.
    pub(super) async fn read_pinned(
        &self,
        version: u64,
        role: &str,
    ) -> Result<SourcedKey, VaultError> {
        let secret = self.cli_path();
        match self.fetch(Some(version), role).await? {
            Fetched::Key(key) => Ok(key),
            Fetched::Deleted { deletion_time, .. } => Err(VaultError::Secret(format!(
                "cannot read {role} from Vault: version {version} of {secret} was deleted at \
                 {deletion_time}; undelete it (vault kv undelete -versions={version} {}) or choose \
                 another version",
                self.cli_path()
            ))),
            Fetched::Destroyed { .. } => Err(VaultError::Secret(format!(
                "cannot read {role} from Vault: version {version} of {secret} is destroyed and cannot \
                 be read again; choose another version, or pass the key from a backup file"
            ))),
            Fetched::Missing => Err(VaultError::Secret(format!(
                "cannot read {role} from Vault: {secret} has no version {version} (nothing at {} \
                 version {version}); check the version and --vault-key-path",
                self.location.data_path()
            ))),
        }
    }

    /// Returns the number of the current version, whether or not it can be read.
    pub(super) async fn current_version(&self, role: &str) -> Result<u64, VaultError> {
        match self.fetch(None, role).await? {
            Fetched::Key(key) => Ok(key
                .origin
                .vault_version()
                .expect("a key read from Vault has a version")),
            Fetched::Deleted { version, .. } | Fetched::Destroyed { version } => Ok(version),
            Fetched::Missing => Err(self.not_found(role)),
        }
    }

    /// Reads the newest version older than `newer` that is neither deleted
    /// nor destroyed.
    ///
    /// Versions are tried from `newer - 1` down, so only `read` on the data
    /// path is needed, not on the metadata path. Versions are numbered without
    /// gaps and `max_versions` removes the oldest first, so the first version
    /// that does not exist ends the search.
    pub(super) async fn read_previous(
        &self,
        newer: u64,
        role: &str,
    ) -> Result<SourcedKey, VaultError> {
        let secret = self.cli_path();
        let mut skipped = Vec::new();
        for version in (1..newer).rev() {
            match self.fetch(Some(version), role).await? {
                Fetched::Key(key) => {
                    tracing::debug!(
                        version,
                        newer,
                        "Old key taken from the previous Vault version."
                    );
                    return Ok(key);
                }
                Fetched::Deleted { .. } => {
                    tracing::info!(version, "Vault version is deleted; trying an older one.");
                    skipped.push(format!("version {version} is deleted"));
                }
                Fetched::Destroyed { .. } => {
                    tracing::info!(version, "Vault version is destroyed; trying an older one.");
                    skipped.push(format!("version {version} is destroyed"));
                }
                Fetched::Missing => {
                    skipped.push(format!("version {version} and older do not exist"));
                    break;
                }
            }
        }
        let reason = if skipped.is_empty() {
            format!("version {newer} is the first version")
        } else {
            skipped.join(", ")
        };
        Err(VaultError::Secret(format!(
            "cannot read {role} from Vault: {secret} has no readable version older than version \
             {newer} ({reason}); pin an old version with --old-key-vault-version, or pass the old key \
             with --old-key-file"
        )))
    }

    /// Reads one version (the current one for `None`) and takes the key from it.
    async fn fetch(&self, version: Option<u64>, role: &str) -> Result<Fetched, VaultError> {
        let location = self.location;
        let request_name = match version {
            Some(version) => format!("read {} version {version}", location.data_path()),
            None => format!("read {}", location.data_path()),
        };
        let result = self
            .session
            .call(&request_name, || {
                let endpoint = ReadSecretRequest::builder()
                    .mount(location.mount.as_str())
                    .path(location.path.as_str())
                    .version(version)
                    .build()
                    .expect("mount and path are set");
                vaultrs::api::exec_with_result(self.session.client(), endpoint)
            })
            .await;

        match result {
            Ok(response) => self.take_key(response, role).map(Fetched::Key),
            Err(RequestError::Status {
                code: 404,
                version: Some(state),
                ..
            }) => Ok(if state.destroyed {
                Fetched::Destroyed {
                    version: state.version,
                }
            } else {
                Fetched::Deleted {
                    version: state.version,
                    deletion_time: state.deletion_time,
                }
            }),
            Err(RequestError::Status {
                code: 404, errors, ..
            }) if errors.is_empty() => Ok(Fetched::Missing),
            // A 404 with errors is Vault's own: no mount at that path.
            Err(RequestError::Status { code: 404, errors, .. }) => Err(VaultError::Secret(format!(
                "cannot read {role} from Vault: no KV v2 mount {:?} found at {} ({}); check \
                 --vault-key-path, and --vault-kv-mount when the mount is not the first path segment",
                location.mount,
                self.session_address(),
                errors.join("; ")
            ))),
            Err(error) => Err(self.session.failure(
                error,
                &format!("cannot read {role} from Vault {}", self.secret()),
                &format!(
                    "its policy must grant `read` on {}",
                    location.data_path()
                ),
            )),
        }
    }

    /// Takes the key field out of a response and wipes every other value.
    ///
    /// NOTE: the HTTP response body that vaultrs parsed this from is freed
    /// without being zeroed, so a copy of the key stays in freed memory.
    fn take_key(&self, response: ReadSecretResponse, role: &str) -> Result<SourcedKey, VaultError> {
        let version = response.metadata.version;
        let mut data = response.data;
        let text = take_string_field(&mut data, &self.location.field);
        wipe(&mut data);

        let at = format!("{} version {version}", self.secret());
        let text = text.map_err(|problem| {
            VaultError::Secret(format!("cannot read {role} from Vault {at}: {problem}"))
        })?;
        let key = Key::from_hex(&text)
            .map_err(|e| VaultError::Secret(format!("cannot read {role} from Vault {at}: {e}")))?;
        Ok(SourcedKey {
            key,
            origin: origin(self.location, version),
        })
    }

    fn not_found(&self, role: &str) -> VaultError {
        VaultError::Secret(format!(
            "cannot read {role} from Vault: {} not found (nothing at {} on {}); check --vault-key-path \
             (ENCRYPTION_KEY_VAULT_PATH) and --vault-kv-mount, and that the mount is KV version 2",
            self.cli_path(),
            self.location.data_path(),
            self.session_address()
        ))
    }

    /// Describes the secret for messages, e.g. "secret/agentidp/encryption-key field encryptionKey".
    fn secret(&self) -> String {
        self.location.to_string()
    }

    /// Returns the secret's path in the form the `vault kv` commands take.
    fn cli_path(&self) -> String {
        format!("{}/{}", self.location.mount, self.location.path)
    }

    fn session_address(&self) -> String {
        self.session.address().to_string()
    }
}

/// Moves a string field out of a secret's data. The error describes what is
/// wrong with the field and never shows a value.
fn take_string_field(data: &mut Value, field: &str) -> Result<Zeroizing<String>, String> {
    let Value::Object(fields) = data else {
        return Err("the secret's data is not a JSON object".into());
    };
    let mut names: Vec<&String> = fields.keys().collect();
    names.sort();
    let present = names
        .iter()
        .map(|name| name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match fields.get_mut(field) {
        Some(Value::String(text)) => Ok(Zeroizing::new(std::mem::take(text))),
        Some(Value::Null) => Err(format!("field {field:?} is null")),
        Some(other) => Err(format!(
            "field {field:?} is {}, not a string",
            json_kind(other)
        )),
        None if present.is_empty() => Err(format!(
            "field {field:?} not found: the secret has no fields; check --vault-key-field"
        )),
        None => Err(format!(
            "field {field:?} not found (fields present: {present}); check --vault-key-field"
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Zeroes every string in a JSON value: the other fields of the secret may be
/// secrets too.
fn wipe(value: &mut Value) {
    match value {
        Value::String(text) => text.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe),
        Value::Object(fields) => fields.values_mut().for_each(wipe),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_is_moved_out_and_rest_wiped() {
        let mut data = serde_json::json!({"encryptionKey": "abc", "other": ["x", {"y": "z"}]});
        let text = take_string_field(&mut data, "encryptionKey").unwrap();
        assert_eq!(text.as_str(), "abc");
        wipe(&mut data);
        assert_eq!(
            data,
            serde_json::json!({"encryptionKey": "", "other": ["", {"y": ""}]})
        );
    }

    #[test]
    fn missing_field_lists_names_not_values() {
        let mut data = serde_json::json!({"b": "value-b", "a": "value-a"});
        let error = take_string_field(&mut data, "encryptionKey").unwrap_err();
        assert_eq!(
            error,
            "field \"encryptionKey\" not found (fields present: a, b); check --vault-key-field"
        );
    }

    #[test]
    fn non_string_field_is_rejected_without_value() {
        let mut data = serde_json::json!({"encryptionKey": 12345});
        let error = take_string_field(&mut data, "encryptionKey").unwrap_err();
        assert_eq!(error, "field \"encryptionKey\" is a number, not a string");
    }
}
