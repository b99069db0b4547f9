//! A row's position in its table (`ctid`), read and written in PostgreSQL's
//! binary form.
//!
//! Every batch reads the position of each of its rows, and in a table
//! without partitions or inheritance children its UPDATE finds each row
//! again by it. As text, each position costs the server a conversion to
//! text and one back, and this process a string. In binary it is six bytes.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueFormat, PgValueRef, Postgres,
};

/// The type IDs of `tid` and `tid[]`. Built-in types have fixed IDs in
/// PostgreSQL's catalog.
const TID: Oid = Oid(27);
const TID_ARRAY: Oid = Oid(1010);

/// A row's position: the block of the table and the row's line pointer in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowPosition {
    pub block: u32,
    pub offset: u16,
}

impl RowPosition {
    /// Reads a position in PostgreSQL's text form, such as `(12,3)`.
    pub fn parse(text: &str) -> Option<RowPosition> {
        let inner = text.strip_prefix('(')?.strip_suffix(')')?;
        let (block, offset) = inner.split_once(',')?;
        Some(RowPosition {
            block: block.parse().ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

/// PostgreSQL's text form, as the checkpoint records a position.
impl std::fmt::Display for RowPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({},{})", self.block, self.offset)
    }
}

impl sqlx::Type<Postgres> for RowPosition {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(TID)
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        ty.oid() == Some(TID)
    }
}

impl PgHasArrayType for RowPosition {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(TID_ARRAY)
    }

    fn array_compatible(ty: &PgTypeInfo) -> bool {
        ty.oid() == Some(TID_ARRAY)
    }
}

/// The binary form: the block as 4 bytes and the line pointer as 2, big-endian.
impl sqlx::Encode<'_, Postgres> for RowPosition {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.extend_from_slice(&self.block.to_be_bytes());
        buf.extend_from_slice(&self.offset.to_be_bytes());
        Ok(IsNull::No)
    }

    fn size_hint(&self) -> usize {
        6
    }
}

impl sqlx::Decode<'_, Postgres> for RowPosition {
    fn decode(value: PgValueRef<'_>) -> Result<RowPosition, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => match value.as_bytes()? {
                &[b0, b1, b2, b3, o0, o1] => Ok(RowPosition {
                    block: u32::from_be_bytes([b0, b1, b2, b3]),
                    offset: u16::from_be_bytes([o0, o1]),
                }),
                bytes => Err(format!("a row position of {} bytes, expected 6", bytes.len()).into()),
            },
            PgValueFormat::Text => {
                let text = value.as_str()?;
                RowPosition::parse(text)
                    .ok_or_else(|| format!("{text:?} is not a row position (block,offset)").into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let position = RowPosition {
            block: u32::MAX,
            offset: 291,
        };
        assert_eq!(position.to_string(), "(4294967295,291)");
        assert_eq!(RowPosition::parse(&position.to_string()), Some(position));
        assert_eq!(
            RowPosition::parse("(0,1)"),
            Some(RowPosition {
                block: 0,
                offset: 1
            })
        );
        for bad in [
            "",
            "(1,2",
            "1,2)",
            "(1)",
            "(x,1)",
            "(1,65536)",
            "(4294967296,1)",
            "(-1,1)",
        ] {
            assert_eq!(RowPosition::parse(bad), None, "{bad:?}");
        }
    }
}
