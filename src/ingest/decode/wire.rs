//! Avro binary encoding, read side: varints, lengths, strings, unions and enums, and skipping
//! whole values of writer-only fields.

use std::fmt;

use super::plan::{Conv, EnumValue, SlotValue};
use super::types::{RecordDef, WireType};
use super::MAX_SKIP_DEPTH;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    Truncated { needed: usize, remaining: usize },
    TruncatedVarint,
    VarintOverflow,
    NegativeLength(i64),
    InvalidUtf8 { valid_up_to: usize },
    IntOutOfRange(i64),
    UnionIndex { index: i64, branches: usize },
    EnumIndex { index: i64, symbols: usize },
    BlockCount(i64),
    TooDeep,
    InvalidBoolean(u8),
    BlockSize { declared: usize, used: usize },
    NegativeBlockSize(i64),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { needed, remaining } => {
                write!(f, "truncated: needs {needed} bytes, {remaining} remain")
            }
            WireError::TruncatedVarint => f.write_str("truncated inside a varint"),
            WireError::VarintOverflow => f.write_str("varint longer than 64 bits"),
            WireError::NegativeLength(length) => write!(f, "negative length {length}"),
            WireError::InvalidUtf8 { valid_up_to } => {
                write!(f, "string is not valid utf-8 after byte {valid_up_to}")
            }
            WireError::IntOutOfRange(value) => {
                write!(f, "int value {value} is out of the 32-bit range")
            }
            WireError::UnionIndex { index, branches } => {
                write!(
                    f,
                    "union branch {index} does not exist, the union has {branches}"
                )
            }
            WireError::EnumIndex { index, symbols } => {
                write!(
                    f,
                    "enum index {index} does not exist, the enum has {symbols} symbols"
                )
            }
            WireError::BlockCount(count) => write!(f, "invalid block count {count}"),
            WireError::TooDeep => write!(f, "nested deeper than {MAX_SKIP_DEPTH} levels"),
            WireError::NegativeBlockSize(size) => {
                write!(f, "block declares a negative size {size}")
            }
            WireError::BlockSize { declared, used } => {
                write!(f, "block declares {declared} bytes, its items take {used}")
            }
            WireError::InvalidBoolean(byte) => {
                write!(f, "boolean byte {byte:#04x} is neither 0 nor 1")
            }
        }
    }
}

pub(crate) enum ReadError {
    Wire(WireError),
    Unresolvable(String),
}

impl From<WireError> for ReadError {
    fn from(err: WireError) -> Self {
        ReadError::Wire(err)
    }
}

/// Reads Avro binary from the front of a slice.
pub(crate) struct Cursor<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn read_long(&mut self) -> Result<i64, WireError> {
        let mut value: u64 = 0;
        for index in 0..10 {
            let Some(&byte) = self.bytes.get(index) else {
                return Err(WireError::TruncatedVarint);
            };
            // The tenth byte holds the 64th bit only.
            if index == 9 && byte > 0x01 {
                return Err(WireError::VarintOverflow);
            }
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                self.bytes = &self.bytes[index + 1..];
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        Err(WireError::VarintOverflow)
    }

    fn read_int(&mut self) -> Result<i32, WireError> {
        let value = self.read_long()?;
        i32::try_from(value).map_err(|_| WireError::IntOutOfRange(value))
    }

    pub(crate) fn take(&mut self, needed: usize) -> Result<&'a [u8], WireError> {
        if needed > self.bytes.len() {
            return Err(WireError::Truncated {
                needed,
                remaining: self.bytes.len(),
            });
        }
        let (taken, rest) = self.bytes.split_at(needed);
        self.bytes = rest;
        Ok(taken)
    }

    fn read_bytes(&mut self) -> Result<&'a [u8], WireError> {
        let length = self.read_long()?;
        let length = usize::try_from(length).map_err(|_| WireError::NegativeLength(length))?;
        self.take(length)
    }

    fn read_str(&mut self) -> Result<&'a str, WireError> {
        let bytes = self.read_bytes()?;
        std::str::from_utf8(bytes).map_err(|err| WireError::InvalidUtf8 {
            valid_up_to: err.valid_up_to(),
        })
    }

    fn read_index(
        &mut self,
        count: usize,
        error: impl Fn(i64) -> WireError,
    ) -> Result<usize, WireError> {
        let index = self.read_long()?;
        usize::try_from(index)
            .ok()
            .filter(|index| *index < count)
            .ok_or_else(|| error(index))
    }

    fn read_union_index(&mut self, branches: usize) -> Result<usize, WireError> {
        self.read_index(branches, |index| WireError::UnionIndex { index, branches })
    }

    fn read_enum_index(&mut self, symbols: usize) -> Result<usize, WireError> {
        self.read_index(symbols, |index| WireError::EnumIndex { index, symbols })
    }

    pub(crate) fn read_conv(&mut self, conv: &Conv) -> Result<SlotValue<'a>, ReadError> {
        Ok(match conv {
            Conv::Text => SlotValue::Text(self.read_str()?),
            Conv::Null => SlotValue::Null,
            Conv::Long => SlotValue::Micros(self.read_long()?),
            Conv::Int => SlotValue::Micros(i64::from(self.read_int()?)),
            Conv::Enum(symbols) => {
                let index = self.read_enum_index(symbols.len())?;
                match &symbols[index] {
                    (_, Some(EnumValue::Actor(actor_type))) => SlotValue::Actor(*actor_type),
                    (_, Some(EnumValue::Outcome(outcome))) => SlotValue::Outcome(*outcome),
                    (symbol, None) => {
                        return Err(ReadError::Unresolvable(format!(
                            "writer symbol {symbol} is not in the reader enum"
                        )))
                    }
                }
            }
            Conv::Union(branches) => {
                let index = self.read_union_index(branches.len())?;
                return self.read_conv(&branches[index]);
            }
            Conv::Mismatch(reason) => return Err(ReadError::Unresolvable(reason.clone())),
        })
    }

    /// Skips one value of a writer-only field.
    pub(crate) fn skip(
        &mut self,
        wire: &WireType,
        records: &[RecordDef],
        depth: usize,
    ) -> Result<(), WireError> {
        if depth > MAX_SKIP_DEPTH {
            return Err(WireError::TooDeep);
        }
        match wire {
            WireType::Null => {}
            WireType::Boolean => {
                // The specification allows only 0 and 1.
                let byte = self.take(1)?[0];
                if byte > 1 {
                    return Err(WireError::InvalidBoolean(byte));
                }
            }
            WireType::Int => {
                self.read_int()?;
            }
            WireType::Long { .. } => {
                self.read_long()?;
            }
            WireType::Float => {
                self.take(4)?;
            }
            WireType::Double => {
                self.take(8)?;
            }
            WireType::Bytes => {
                self.read_bytes()?;
            }
            // Skipped or not, a string must be UTF-8 for the datum to be valid Avro.
            WireType::String => {
                self.read_str()?;
            }
            WireType::Fixed(size) => {
                self.take(*size)?;
            }
            WireType::Enum(symbols) => {
                self.read_enum_index(symbols.len())?;
            }
            WireType::Array(item) => {
                let zero_width = is_zero_width(item, records, 0);
                self.skip_blocks(
                    |cursor| {
                        if zero_width {
                            Ok(())
                        } else {
                            cursor.skip(item, records, depth + 1)
                        }
                    },
                    zero_width,
                )?;
            }
            WireType::Map(value) => {
                self.skip_blocks(
                    |cursor| {
                        // Map keys are strings.
                        cursor.read_str()?;
                        cursor.skip(value, records, depth + 1)
                    },
                    false,
                )?;
            }
            WireType::Union(branches) => {
                let index = self.read_union_index(branches.len())?;
                self.skip(&branches[index], records, depth + 1)?;
            }
            WireType::Record(index) => {
                for field in &records[*index].fields {
                    self.skip(&field.wire, records, depth + 1)?;
                }
            }
        }
        Ok(())
    }

    /// Skips the blocks of an array or map. A block whose count is negative carries its size in
    /// bytes and is skipped whole.
    fn skip_blocks(
        &mut self,
        mut skip_item: impl FnMut(&mut Self) -> Result<(), WireError>,
        zero_width: bool,
    ) -> Result<(), WireError> {
        loop {
            let count = self.read_long()?;
            if count == 0 {
                return Ok(());
            }
            // A negative count is followed by the block's size in bytes. The items are read all
            // the same, and must take exactly that many bytes: a size that lies is invalid.
            let declared_size = if count < 0 {
                if count == i64::MIN {
                    return Err(WireError::BlockCount(count));
                }
                let size = self.read_long()?;
                Some(usize::try_from(size).map_err(|_| WireError::NegativeBlockSize(size))?)
            } else {
                None
            };
            let before = self.bytes.len();
            if !zero_width {
                // Every item takes at least one byte, so a count beyond the remaining bytes is a
                // lie that would otherwise cost a long loop before failing.
                let count = usize::try_from(count.unsigned_abs())
                    .map_err(|_| WireError::BlockCount(count))?;
                if count > self.bytes.len() {
                    return Err(WireError::Truncated {
                        needed: count,
                        remaining: self.bytes.len(),
                    });
                }
                for _ in 0..count {
                    skip_item(self)?;
                }
            }
            if let Some(declared) = declared_size {
                let used = before - self.bytes.len();
                if used != declared {
                    return Err(WireError::BlockSize { declared, used });
                }
            }
        }
    }
}

/// Whether values of this type take no bytes (null, fixed(0), records of such), so an array of
/// them can be skipped without iterating its count.
fn is_zero_width(wire: &WireType, records: &[RecordDef], depth: usize) -> bool {
    if depth > MAX_SKIP_DEPTH {
        return false;
    }
    match wire {
        WireType::Null | WireType::Fixed(0) => true,
        WireType::Record(index) => records[*index]
            .fields
            .iter()
            .all(|field| is_zero_width(&field.wire, records, depth + 1)),
        _ => false,
    }
}
