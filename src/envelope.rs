//! The stored value format, `base64(IV) ":" base64(ciphertext)`, read the way
//! the Node.js application reads it and written in canonical form.
//!
//! The application does `value.split(":")`, takes the first two parts and
//! decodes each with `Buffer.from(part, "base64")`. Node's decoder (v20) is
//! lenient, and this module reproduces it so that every value the application
//! can read is read here too:
//! - both alphabets are accepted (`+/` and `-_`);
//! - characters outside the alphabet, such as whitespace and newlines, are skipped;
//! - decoding stops at the first `=`, so padding is optional;
//! - a final group of 2 or 3 characters yields 1 or 2 bytes, and a lone final
//!   character yields nothing;
//! - JavaScript strings are UTF-16, and the decoder reads the low byte of each
//!   UTF-16 code unit, so a non-ASCII character can decode as an ASCII one.
//!
//! Values written by this tool are canonical: standard alphabet, padded, no
//! whitespace, exactly two parts.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Length of the CBC initialisation vector in bytes.
pub const IV_BYTES: usize = 16;

/// AES block length in bytes.
pub const BLOCK_BYTES: usize = 16;

/// The reason a value is not in the format. No variant carries value bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no ':' separator")]
    NoSeparator,
    #[error("IV decodes to {0} bytes, expected 16")]
    IvLength(usize),
    #[error("ciphertext is empty")]
    EmptyCiphertext,
    #[error("ciphertext of {0} bytes is not a whole number of 16-byte blocks")]
    PartialBlock(usize),
}

/// A parsed value: IV and ciphertext bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub iv: [u8; IV_BYTES],
    pub ciphertext: Vec<u8>,
}

/// Parses a stored value as the application would before decrypting it.
pub fn parse(value: &str) -> Result<Envelope, FormatError> {
    let mut parts = value.split(':');
    let iv_text = parts.next().unwrap_or("");
    let ciphertext_text = parts.next().ok_or(FormatError::NoSeparator)?;

    let mut iv_bytes = Vec::with_capacity(IV_BYTES);
    decode_node_base64(iv_text, &mut iv_bytes);
    let iv: [u8; IV_BYTES] = iv_bytes
        .as_slice()
        .try_into()
        .map_err(|_| FormatError::IvLength(iv_bytes.len()))?;

    let mut ciphertext = Vec::with_capacity(ciphertext_text.len() / 4 * 3 + 3);
    decode_node_base64(ciphertext_text, &mut ciphertext);
    if ciphertext.is_empty() {
        return Err(FormatError::EmptyCiphertext);
    }
    if ciphertext.len() % BLOCK_BYTES != 0 {
        return Err(FormatError::PartialBlock(ciphertext.len()));
    }
    Ok(Envelope { iv, ciphertext })
}

/// Formats IV and ciphertext canonically: standard alphabet, padded, no whitespace.
pub fn format(iv: &[u8; IV_BYTES], ciphertext: &[u8]) -> String {
    let mut out = String::with_capacity(25 + ciphertext.len().div_ceil(3) * 4);
    STANDARD.encode_string(iv, &mut out);
    out.push(':');
    STANDARD.encode_string(ciphertext, &mut out);
    out
}

/// Maps a byte to its 6-bit value in either base64 alphabet, or `None`.
fn sextet(byte: u8) -> Option<u8> {
    match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    }
}

/// Decodes `text` the way Node's `Buffer.from(text, "base64")` does, appending to `out`.
pub fn decode_node_base64(text: &str, out: &mut Vec<u8>) {
    // Canonical base64, which is what the application writes, gives the same
    // bytes under a strict decoder, and the base64 crate's is several times
    // faster. Anything the strict decoder rejects takes the lenient path.
    let start = out.len();
    if STANDARD.decode_vec(text, out).is_ok() {
        return;
    }
    out.truncate(start);
    decode_lenient(text, out);
}

/// Node's lenient decoding, character by character.
fn decode_lenient(text: &str, out: &mut Vec<u8>) {
    let mut group = [0u8; 4];
    let mut filled = 0;

    // ASCII text needs no UTF-16 view: each byte is its own code unit.
    let mut feed = |unit: u8| -> bool {
        if unit == b'=' {
            return false;
        }
        if let Some(value) = sextet(unit) {
            group[filled] = value;
            filled += 1;
            if filled == 4 {
                out.push((group[0] << 2) | (group[1] >> 4));
                out.push((group[1] << 4) | (group[2] >> 2));
                out.push((group[2] << 6) | group[3]);
                filled = 0;
            }
        }
        true
    };
    if text.is_ascii() {
        for byte in text.bytes() {
            if !feed(byte) {
                break;
            }
        }
    } else {
        for unit in text.encode_utf16() {
            // Node truncates each UTF-16 code unit to its low byte.
            if !feed(unit as u8) {
                break;
            }
        }
    }

    // A trailing partial group: 2 characters give one byte, 3 give two.
    if filled >= 2 {
        out.push((group[0] << 2) | (group[1] >> 4));
    }
    if filled == 3 {
        out.push((group[1] << 4) | (group[2] >> 2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        decode_node_base64(text, &mut out);
        out
    }

    #[test]
    fn decoder_matches_standard_base64() {
        for length in 0..40 {
            let data: Vec<u8> = (0..length as u8).map(|b| b.wrapping_mul(37)).collect();
            assert_eq!(decoded(&STANDARD.encode(&data)), data, "length {length}");
        }
    }

    #[test]
    fn strict_path_agrees_with_lenient_decoder() {
        // Random strings over the characters that matter to either decoder.
        let alphabet: Vec<char> = "ABCQwxyz0189+/-_= \n*\u{141}".chars().collect();
        for _ in 0..20_000 {
            let length = rand::random::<usize>() % 24;
            let text: String = (0..length)
                .map(|_| alphabet[rand::random::<usize>() % alphabet.len()])
                .collect();
            let mut lenient = Vec::new();
            decode_lenient(&text, &mut lenient);
            assert_eq!(decoded(&text), lenient, "{text:?}");
        }
        for length in 0..64 {
            let data: Vec<u8> = (0..length as u8).map(|b| b.wrapping_mul(91)).collect();
            let text = STANDARD.encode(&data);
            let mut lenient = Vec::new();
            decode_lenient(&text, &mut lenient);
            assert_eq!(decoded(&text), lenient, "{text:?}");
        }
    }

    #[test]
    fn decoder_accepts_node_leniencies() {
        assert_eq!(decoded("aGVsbG8"), b"hello");
        assert_eq!(decoded("aGVs\nbG8=\n"), b"hello");
        assert_eq!(decoded(" a G V s b G 8 = "), b"hello");
        assert_eq!(decoded("-_-_"), decoded("+/+/"));
        // Decoding stops at the first '='.
        assert_eq!(decoded("aGk=aGVsbG8="), b"hi");
        // A lone trailing character yields nothing.
        assert_eq!(decoded("aGVsbG8hA"), b"hello!");
        // Characters outside the alphabet are skipped.
        assert_eq!(decoded("aG*Vs#bG8"), b"hello");
    }

    #[test]
    fn decoder_truncates_utf16_code_units() {
        // U+0141 has low byte 0x41 ('A'); U+00E9 has low byte 0xE9, which is skipped.
        assert_eq!(decoded("\u{141}\u{141}\u{141}\u{141}"), decoded("AAAA"));
        assert_eq!(decoded("AA\u{e9}AA"), decoded("AAAA"));
    }

    #[test]
    fn parse_reads_first_two_parts() {
        let value = format(&[7u8; 16], &[9u8; 32]);
        let extra = format!("{value}:AAAA");
        assert_eq!(parse(&extra).unwrap(), parse(&value).unwrap());
    }

    #[test]
    fn parse_rejects_malformed_values() {
        assert_eq!(parse("no-separator"), Err(FormatError::NoSeparator));
        assert_eq!(parse(""), Err(FormatError::NoSeparator));
        assert_eq!(parse(":"), Err(FormatError::IvLength(0)));
        assert_eq!(
            parse("b3MCQDaKej3zO0RE:NAdA0UNtqFBtJzcz3mvDBA=="),
            Err(FormatError::IvLength(12))
        );
        assert_eq!(
            parse("AAAAAAAAAAAAAAAAAAAAAA==:"),
            Err(FormatError::EmptyCiphertext)
        );
        assert_eq!(
            parse("AAAAAAAAAAAAAAAAAAAAAA==:AAAA"),
            Err(FormatError::PartialBlock(3))
        );
    }

    #[test]
    fn format_is_canonical() {
        let value = format(&[0xfb; 16], &[0xff; 16]);
        assert_eq!(value, "+/v7+/v7+/v7+/v7+/v7+w==://///////////////////w==");
    }
}
