//! The safety core: decides what to do with one stored value, using every key.
//!
//! A wrong key passes the PKCS#7 padding check about one time in 256, so a
//! value's key is never decided from one trial decryption. The value is tried
//! under the new key and under every old key, and only a value that decrypts
//! under exactly one old key and not under the new key is rewritten.
//! "Decrypts" means: in the format, valid padding, and valid UTF-8 plaintext.

use std::cell::RefCell;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::Aes256;
use zeroize::Zeroizing;

use crate::envelope::{self, Envelope, IV_BYTES};
use crate::keys::Key;

// The hot path borrows each key schedule instead of copying it per value.
type Decryptor<'k> = cbc::Decryptor<&'k Aes256>;
type Encryptor<'k> = cbc::Encryptor<&'k Aes256>;

/// How many fresh IVs to try before giving up on a new value that also
/// decrypts under an old key (each try fails with probability below 1/256).
const MAX_IV_ATTEMPTS: usize = 16;

/// The outcome of classifying one value. Ordered as reported in summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Decrypted under one old key only, and rewritten under the new key.
    Reencrypted,
    /// Decrypts under the new key only: left as it is.
    Current,
    /// SQL NULL: left as it is.
    Null,
    /// Not `base64(16-byte IV):base64(whole blocks)`: left byte-for-byte.
    NotInFormat,
    /// In the format but decrypts under no key given: left byte-for-byte.
    Undecryptable,
    /// Decrypts under more than one key given: left byte-for-byte.
    Ambiguous,
    /// Deleted by another session between read and write.
    Deleted,
    /// The database rejected the new value for this row (a constraint, a
    /// trigger, a column length): left as it was.
    WriteRejected,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Reencrypted,
        Outcome::Current,
        Outcome::Null,
        Outcome::NotInFormat,
        Outcome::Undecryptable,
        Outcome::Ambiguous,
        Outcome::Deleted,
        Outcome::WriteRejected,
    ];

    /// The label used in metrics, tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Reencrypted => "reencrypted",
            Outcome::Current => "current",
            Outcome::Null => "null",
            Outcome::NotInFormat => "not_in_format",
            Outcome::Undecryptable => "undecryptable",
            Outcome::Ambiguous => "ambiguous",
            Outcome::Deleted => "deleted",
            Outcome::WriteRejected => "write_rejected",
        }
    }

    /// Whether a row with this outcome needs an operator's attention, which
    /// makes the exit code 3. Not-in-format values are reported by key but do
    /// not count here: plaintext or empty legacy values are common and expected.
    pub fn needs_attention(self) -> bool {
        matches!(
            self,
            Outcome::Undecryptable | Outcome::Ambiguous | Outcome::WriteRejected
        )
    }

    /// Whether the row's key is recorded in the attention table and reported.
    pub fn is_reported(self) -> bool {
        self.needs_attention() || self == Outcome::NotInFormat
    }
}

/// The result of classifying one value: the outcome and, for `Reencrypted`,
/// the new canonical value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub new_value: Option<String>,
    /// Index of the old key that decrypted the value, for `Reencrypted`.
    pub old_key_index: Option<usize>,
}

impl Decision {
    fn leave(outcome: Outcome) -> Decision {
        Decision {
            outcome,
            new_value: None,
            old_key_index: None,
        }
    }
}

/// Internal failure while producing a new value. Never expected; a row that
/// hits it is left unchanged and reported as undecryptable.
#[derive(Debug, thiserror::Error)]
enum EncryptError {
    #[error("the new value did not decrypt back to the plaintext")]
    RoundTrip,
    #[error("every fresh IV gave a value that also decrypts under an old key")]
    NoUnambiguousIv,
    #[error("the operating system's random source failed")]
    Random,
}

/// The new key and the old keys, ready to classify values. Each key's AES
/// key schedule is expanded once here rather than once per value; the
/// schedules are zeroized when dropped.
#[derive(Clone)]
pub struct Keyring {
    new: Aes256,
    old: Vec<Aes256>,
}

impl Keyring {
    pub fn new(new: Key, old: Vec<Key>) -> Keyring {
        let schedule = |key: &Key| Aes256::new(key.as_bytes().into());
        Keyring {
            new: schedule(&new),
            old: old.iter().map(schedule).collect(),
        }
    }

    /// Classifies a stored value and, when it is under an old key, produces its
    /// replacement under the new key.
    pub fn classify(&self, value: Option<&str>) -> Decision {
        let Some(value) = value else {
            return Decision::leave(Outcome::Null);
        };
        let Ok(envelope) = envelope::parse(value) else {
            return Decision::leave(Outcome::NotInFormat);
        };

        let under_new = decrypt(&self.new, &envelope);
        let mut old_match: Option<(usize, Zeroizing<Vec<u8>>)> = None;
        let mut old_matches = 0;
        for (index, key) in self.old.iter().enumerate() {
            if let Some(plaintext) = decrypt(key, &envelope) {
                old_matches += 1;
                old_match = Some((index, plaintext));
            }
        }

        match (under_new.is_some(), old_matches) {
            (true, 0) => Decision::leave(Outcome::Current),
            (false, 0) => Decision::leave(Outcome::Undecryptable),
            (false, 1) => {
                let (index, plaintext) = old_match.expect("one old key matched");
                match self.encrypt_verified(&plaintext) {
                    Ok(new_value) => Decision {
                        outcome: Outcome::Reencrypted,
                        new_value: Some(new_value),
                        old_key_index: Some(index),
                    },
                    Err(error) => {
                        tracing::error!(%error, "Could not produce a verified new value; the row is left unchanged.");
                        Decision::leave(Outcome::Undecryptable)
                    }
                }
            }
            _ => Decision::leave(Outcome::Ambiguous),
        }
    }

    /// Tells whether a value decrypts under the new key only. Used to check a
    /// value after it was written.
    pub fn reads_as_current(&self, value: &str) -> bool {
        self.classify(Some(value)).outcome == Outcome::Current
    }

    /// Encrypts under the new key with a fresh IV, then checks that the result
    /// decrypts under the new key to the same plaintext and under no old key,
    /// so the written value can never be classified as ambiguous later.
    fn encrypt_verified(&self, plaintext: &[u8]) -> Result<String, EncryptError> {
        for _ in 0..MAX_IV_ATTEMPTS {
            let iv = fresh_iv().map_err(|_| EncryptError::Random)?;
            let ciphertext = Encryptor::inner_iv_init(&self.new, &iv.into())
                .encrypt_padded_vec_mut::<Pkcs7>(plaintext);
            let envelope = Envelope { iv, ciphertext };

            let round_trip = decrypt(&self.new, &envelope);
            if round_trip.as_deref().map(Vec::as_slice) != Some(plaintext) {
                return Err(EncryptError::RoundTrip);
            }
            if self.old.iter().any(|key| decrypt(key, &envelope).is_some()) {
                continue;
            }
            return Ok(envelope::format(&envelope.iv, &envelope.ciphertext));
        }
        Err(EncryptError::NoUnambiguousIv)
    }
}

/// IVs drawn from the operating system in one system call.
const IVS_PER_DRAW: usize = 256;

/// Random bytes for IVs, drawn from the operating system `IVS_PER_DRAW` IVs
/// at a time instead of with one system call per value.
struct IvPool {
    bytes: [u8; IV_BYTES * IVS_PER_DRAW],
    next: usize,
}

thread_local! {
    static IV_POOL: RefCell<IvPool> = const {
        RefCell::new(IvPool {
            bytes: [0; IV_BYTES * IVS_PER_DRAW],
            next: IV_BYTES * IVS_PER_DRAW,
        })
    };
}

/// Returns a fresh random IV. Each IV is handed out once and then erased
/// from the pool.
fn fresh_iv() -> Result<[u8; IV_BYTES], getrandom::Error> {
    IV_POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.next == pool.bytes.len() {
            getrandom::getrandom(&mut pool.bytes)?;
            pool.next = 0;
        }
        let start = pool.next;
        let mut iv = [0u8; IV_BYTES];
        iv.copy_from_slice(&pool.bytes[start..start + IV_BYTES]);
        pool.bytes[start..start + IV_BYTES].fill(0);
        pool.next += IV_BYTES;
        Ok(iv)
    })
}

/// Decrypts under a key schedule, returning the plaintext only if the
/// padding is valid and the plaintext is valid UTF-8.
fn decrypt(key: &Aes256, envelope: &Envelope) -> Option<Zeroizing<Vec<u8>>> {
    let plaintext = Zeroizing::new(
        Decryptor::inner_iv_init(key, &envelope.iv.into())
            .decrypt_padded_vec_mut::<Pkcs7>(&envelope.ciphertext)
            .ok()?,
    );
    std::str::from_utf8(&plaintext).ok()?;
    Some(plaintext)
}

/// Decrypts a value under a key and returns the UTF-8 plaintext, for tests,
/// the demo and verification. `None` when the value does not decrypt.
pub fn decrypt_to_string(key: &Key, value: &str) -> Option<Zeroizing<String>> {
    let envelope = envelope::parse(value).ok()?;
    let plaintext = decrypt(&Aes256::new(key.as_bytes().into()), &envelope)?;
    Some(Zeroizing::new(String::from_utf8(plaintext.to_vec()).ok()?))
}

/// Encrypts a plaintext under a key with a fresh IV, as the application does.
/// The demo and the tests use it to write rows.
pub fn encrypt_string(key: &Key, plaintext: &str) -> String {
    let mut iv = [0u8; IV_BYTES];
    getrandom::getrandom(&mut iv).expect("the operating system's random source failed");
    let schedule = Aes256::new(key.as_bytes().into());
    let ciphertext = Encryptor::inner_iv_init(&schedule, &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes());
    envelope::format(&iv, &ciphertext)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> (Key, Key, Keyring) {
        let old = Key::generate();
        let new = Key::generate();
        (old.clone(), new.clone(), Keyring::new(new, vec![old]))
    }

    #[test]
    fn old_value_is_reencrypted_to_same_plaintext() {
        let (old, new, keyring) = keyring();
        let value = encrypt_string(&old, "sk_live_abc");
        let decision = keyring.classify(Some(&value));
        assert_eq!(decision.outcome, Outcome::Reencrypted);
        let new_value = decision.new_value.unwrap();
        assert_eq!(
            decrypt_to_string(&new, &new_value).unwrap().as_str(),
            "sk_live_abc"
        );
        assert!(decrypt_to_string(&old, &new_value).is_none());
    }

    #[test]
    fn each_kind_of_value_gets_its_outcome() {
        let (_, new, keyring) = keyring();
        let other = Key::generate();
        assert_eq!(keyring.classify(None).outcome, Outcome::Null);
        assert_eq!(
            keyring.classify(Some("plain")).outcome,
            Outcome::NotInFormat
        );
        let current = encrypt_string(&new, "x");
        assert_eq!(keyring.classify(Some(&current)).outcome, Outcome::Current);
        let foreign = encrypt_string(&other, "y");
        // A foreign key can pass the padding check by chance; then the value
        // is treated as the old key's, exactly as the application would read it.
        assert!(matches!(
            keyring.classify(Some(&foreign)).outcome,
            Outcome::Undecryptable | Outcome::Reencrypted
        ));
    }

    #[test]
    fn value_under_new_and_old_key_is_ambiguous() {
        // Keys given twice are rejected before a run; a keyring built with the
        // same key on both sides is the simplest value that decrypts under both.
        let key = Key::generate();
        let keyring = Keyring::new(key.clone(), vec![key.clone()]);
        let value = encrypt_string(&key, "a");
        assert_eq!(keyring.classify(Some(&value)).outcome, Outcome::Ambiguous);
    }

    #[test]
    fn two_old_keys_matching_is_ambiguous() {
        let first = Key::generate();
        let keyring = Keyring::new(Key::generate(), vec![first.clone(), first.clone()]);
        let value = encrypt_string(&first, "z");
        assert_eq!(keyring.classify(Some(&value)).outcome, Outcome::Ambiguous);
    }
}
