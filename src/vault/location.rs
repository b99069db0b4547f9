//! The key's location in KV v2: mount, secret path and field, parsed from the
//! API form or the CLI form of a path.

use std::fmt;

/// A field of a KV v2 secret. `path` is relative to the mount and has no `data/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLocation {
    pub mount: String,
    pub path: String,
    pub field: String,
}

impl KeyLocation {
    /// Parses a secret path given as `mount/data/path` (API form) or
    /// `mount/path` (CLI form). The mount is `kv_mount` when given, and the
    /// first segment otherwise. With `kv_mount`, the path may start with the
    /// mount or be relative to it.
    ///
    /// One `data/` right after the mount is always taken as the API form, so a
    /// secret whose own path starts with `data/` must be given in API form
    /// (`secret/data/data/...`).
    pub fn parse(
        key_path: &str,
        kv_mount: Option<&str>,
        field: &str,
    ) -> Result<KeyLocation, String> {
        let full = key_path.trim().trim_matches('/');
        check_segments(full, "Vault key path")?;

        let (mount, rest) = match kv_mount.map(|m| m.trim().trim_matches('/')) {
            Some("") => return Err("--vault-kv-mount must not be empty".into()),
            Some(mount) => {
                check_segments(mount, "Vault KV mount")?;
                let rest = if full == mount {
                    ""
                } else {
                    full.strip_prefix(&format!("{mount}/")).unwrap_or(full)
                };
                (mount, rest)
            }
            None => full.split_once('/').unwrap_or((full, "")),
        };
        let path = rest.strip_prefix("data/").unwrap_or(rest);
        if path.is_empty() || path == "data" {
            return Err(format!(
                "Vault key path {key_path:?} names the mount {mount:?} but no secret under it; \
                 expected e.g. {mount}/data/agentidp/encryption-key"
            ));
        }

        let field = field.trim();
        if field.is_empty() {
            return Err("the Vault key field (--vault-key-field) must not be empty".into());
        }
        Ok(KeyLocation {
            mount: mount.to_string(),
            path: path.to_string(),
            field: field.to_string(),
        })
    }

    /// Returns the API path of the secret's data, as a policy has to grant it.
    pub fn data_path(&self) -> String {
        format!("{}/data/{}", self.mount, self.path)
    }
}

impl fmt::Display for KeyLocation {
    /// Formats the CLI form with the field, e.g. `secret/agentidp/encryption-key field encryptionKey`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} field {}", self.mount, self.path, self.field)
    }
}

/// Rejects empty, `.` and `..` segments, which Vault would not read as written.
fn check_segments(text: &str, name: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!("{name} must not be empty"));
    }
    if text
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(format!(
            "invalid {name} {text:?}: empty, `.` and `..` segments are not allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str, mount: Option<&str>) -> Result<(String, String), String> {
        KeyLocation::parse(path, mount, "encryptionKey").map(|l| (l.mount, l.path))
    }

    fn pair(mount: &str, path: &str) -> Result<(String, String), String> {
        Ok((mount.to_string(), path.to_string()))
    }

    #[test]
    fn api_and_cli_forms_are_the_same_secret() {
        let expected = pair("secret", "agentidp/encryption-key");
        assert_eq!(parse("secret/data/agentidp/encryption-key", None), expected);
        assert_eq!(parse("secret/agentidp/encryption-key", None), expected);
        assert_eq!(parse("/secret/agentidp/encryption-key/", None), expected);
    }

    #[test]
    fn nested_mount_needs_kv_mount() {
        let expected = pair("team/kv", "app/key");
        assert_eq!(parse("team/kv/data/app/key", Some("team/kv")), expected);
        assert_eq!(parse("team/kv/app/key", Some("/team/kv/")), expected);
        assert_eq!(parse("app/key", Some("team/kv")), expected);
        assert_eq!(parse("data/app/key", Some("team/kv")), expected);
        assert_eq!(parse("team/kv/app/key", None), pair("team", "kv/app/key"));
    }

    #[test]
    fn data_prefix_is_removed_once() {
        assert_eq!(parse("secret/data/data/x", None), pair("secret", "data/x"));
    }

    #[test]
    fn mount_without_secret_is_rejected() {
        for path in ["secret", "secret/", "secret/data", "secret/data/"] {
            let error = parse(path, None).unwrap_err();
            assert!(error.contains("no secret"), "{path}: {error}");
        }
        assert!(parse("team/kv", Some("team/kv"))
            .unwrap_err()
            .contains("no secret"));
    }

    #[test]
    fn empty_and_dot_segments_are_rejected() {
        for path in ["", "secret//x", "secret/../x", "secret/./x"] {
            assert!(parse(path, None).is_err(), "{path}");
        }
        assert!(parse("secret/x", Some("")).is_err());
    }

    #[test]
    fn empty_field_is_rejected() {
        let error = KeyLocation::parse("secret/x", None, " ").unwrap_err();
        assert!(error.contains("--vault-key-field"), "{error}");
    }

    #[test]
    fn display_and_data_path() {
        let location = KeyLocation::parse("kv2/data/app/key", None, "k").unwrap();
        assert_eq!(location.to_string(), "kv2/app/key field k");
        assert_eq!(location.data_path(), "kv2/data/app/key");
    }
}
