//! An Avro encoder for the load generator and the tests: writes an [`AuditEvent`] with any loaded
//! writer schema, following the same compiled plan the decoder reads with, so what it writes is
//! exactly what that schema's producers write. Not used on the ingest path.

use serde_json::Value as Json;

use crate::event::AuditEvent;
use crate::ingest::decode::plan::{SlotValue, Step};
use crate::ingest::decode::schema::WriterSchema;
use crate::ingest::decode::types::{RecordDef, WireType};
use crate::ingest::decode::{Decoder, CONFLUENT_MAGIC, MAX_SKIP_DEPTH, SINGLE_OBJECT_MAGIC};

/// Why an event could not be encoded with a given writer schema.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// No schema with that version is loaded.
    #[error("no schema v{0} is loaded")]
    UnknownVersion(u32),
    /// The writer schema cannot carry a value of the event.
    #[error("schema v{version} cannot encode {field}: {reason}")]
    Unrepresentable {
        /// The version.
        version: u32,
        /// The field, as a dotted path.
        field: String,
        /// Why not.
        reason: String,
    },
}

impl Decoder {
    /// Encodes an event with Confluent framing, using schema `version` as writer and schema id.
    /// Fields the writer lacks are dropped (v1 drops `session_id`); writer-only fields get their
    /// schema default.
    pub fn encode_confluent(
        &self,
        event: &AuditEvent,
        version: u32,
    ) -> Result<Vec<u8>, EncodeError> {
        let event_id = event.event_id.hyphenated().to_string();
        self.encode_confluent_with_event_id(event, &event_id, version)
    }

    /// Encodes like [`Decoder::encode_confluent`] but writes `event_id` verbatim, so the load
    /// generator and tests can produce ids that are not UUIDs.
    pub(crate) fn encode_confluent_with_event_id(
        &self,
        event: &AuditEvent,
        event_id: &str,
        version: u32,
    ) -> Result<Vec<u8>, EncodeError> {
        let writer = self
            .writer(version)
            .ok_or(EncodeError::UnknownVersion(version))?;
        let mut out = Vec::with_capacity(640);
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&version.to_be_bytes());
        writer.write_event(event, event_id, &mut out)?;
        Ok(out)
    }

    /// Encodes an event with Avro single-object framing, using schema `version` as writer.
    pub fn encode_single_object(
        &self,
        event: &AuditEvent,
        version: u32,
    ) -> Result<Vec<u8>, EncodeError> {
        let writer = self
            .writer(version)
            .ok_or(EncodeError::UnknownVersion(version))?;
        let event_id = event.event_id.hyphenated().to_string();
        let mut out = Vec::with_capacity(640);
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&writer.fingerprint.to_le_bytes());
        writer.write_event(event, &event_id, &mut out)?;
        Ok(out)
    }
}

impl WriterSchema {
    fn write_event(
        &self,
        event: &AuditEvent,
        event_id: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.write_steps(&self.steps, event, event_id, out)
    }

    fn write_steps(
        &self,
        steps: &[Step],
        event: &AuditEvent,
        event_id: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        for step in steps {
            match step {
                Step::Slot { slot, wire, .. } => {
                    let value = slot.value_of(event, event_id);
                    write_slot(out, &value, wire).map_err(|reason| {
                        EncodeError::Unrepresentable {
                            version: self.id.number(),
                            field: slot.path().to_owned(),
                            reason,
                        }
                    })?;
                }
                Step::Group { steps, .. } => self.write_steps(steps, event, event_id, out)?,
                Step::Skip {
                    path,
                    wire,
                    default,
                } => {
                    let unrepresentable = |reason: String| EncodeError::Unrepresentable {
                        version: self.id.number(),
                        field: path.clone(),
                        reason,
                    };
                    let default = default.as_ref().ok_or_else(|| {
                        unrepresentable(
                            "the reader has no such field and the writer field has no default"
                                .to_owned(),
                        )
                    })?;
                    write_default(out, wire, default, &self.records, 0).map_err(unrepresentable)?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn write_long(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8 & 0x7f) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// Whether a writer type (a union branch) can carry the value.
fn carries(wire: &WireType, value: &SlotValue<'_>) -> bool {
    match (wire, value) {
        (WireType::String | WireType::Bytes, SlotValue::Text(_)) => true,
        (WireType::Null, SlotValue::Null) => true,
        (WireType::Long { .. }, SlotValue::Micros(_)) => true,
        (WireType::Int, SlotValue::Micros(micros)) => i32::try_from(*micros).is_ok(),
        (WireType::Enum(symbols), SlotValue::Actor(actor_type)) => {
            symbols.iter().any(|symbol| symbol == actor_type.as_str())
        }
        (WireType::Enum(symbols), SlotValue::Outcome(outcome)) => {
            symbols.iter().any(|symbol| symbol == outcome.as_str())
        }
        _ => false,
    }
}

fn write_slot(out: &mut Vec<u8>, value: &SlotValue<'_>, wire: &WireType) -> Result<(), String> {
    let enum_index = |symbols: &[String], symbol: &str| {
        symbols
            .iter()
            .position(|candidate| candidate == symbol)
            .ok_or_else(|| format!("the writer enum has no symbol {symbol}"))
    };
    match (wire, value) {
        (WireType::Union(branches), _) => {
            let index = branches
                .iter()
                .position(|branch| carries(branch, value))
                .ok_or_else(|| format!("no branch of the writer union can carry {value:?}"))?;
            write_long(out, index as i64);
            write_slot(out, value, &branches[index])
        }
        (WireType::String | WireType::Bytes, SlotValue::Text(text)) => {
            write_bytes(out, text.as_bytes());
            Ok(())
        }
        (WireType::Null, SlotValue::Null) => Ok(()),
        (WireType::Long { .. }, SlotValue::Micros(micros)) => {
            write_long(out, *micros);
            Ok(())
        }
        (WireType::Int, SlotValue::Micros(micros)) => {
            let micros =
                i32::try_from(*micros).map_err(|_| format!("{micros} does not fit an int"))?;
            write_long(out, i64::from(micros));
            Ok(())
        }
        (WireType::Enum(symbols), SlotValue::Actor(actor_type)) => {
            write_long(out, enum_index(symbols, actor_type.as_str())? as i64);
            Ok(())
        }
        (WireType::Enum(symbols), SlotValue::Outcome(outcome)) => {
            write_long(out, enum_index(symbols, outcome.as_str())? as i64);
            Ok(())
        }
        (wire, value) => Err(format!(
            "writer type {} cannot carry {value:?}",
            wire.describe()
        )),
    }
}

/// Writes a field default given as schema JSON (a union's default is for its first branch; bytes
/// and fixed defaults are strings of code points 0-255).
fn write_default(
    out: &mut Vec<u8>,
    wire: &WireType,
    default: &Json,
    records: &[RecordDef],
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_SKIP_DEPTH {
        return Err("default nested too deeply".to_owned());
    }
    let mismatch = || format!("default {default} does not fit {}", wire.describe());
    let latin1 = |text: &str| {
        text.chars()
            .map(|character| u8::try_from(u32::from(character)).ok())
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(mismatch)
    };
    match (wire, default) {
        (WireType::Null, Json::Null) => {}
        (WireType::Boolean, Json::Bool(value)) => out.push(u8::from(*value)),
        (WireType::Int, Json::Number(number)) => {
            let value = number
                .as_i64()
                .and_then(|value| i32::try_from(value).ok())
                .ok_or_else(mismatch)?;
            write_long(out, i64::from(value));
        }
        (WireType::Long { .. }, Json::Number(number)) => {
            write_long(out, number.as_i64().ok_or_else(mismatch)?)
        }
        (WireType::Float, Json::Number(number)) => {
            out.extend_from_slice(&(number.as_f64().ok_or_else(mismatch)? as f32).to_le_bytes())
        }
        (WireType::Double, Json::Number(number)) => {
            out.extend_from_slice(&number.as_f64().ok_or_else(mismatch)?.to_le_bytes())
        }
        (WireType::String, Json::String(text)) => write_bytes(out, text.as_bytes()),
        (WireType::Bytes, Json::String(text)) => write_bytes(out, &latin1(text)?),
        (WireType::Fixed(size), Json::String(text)) => {
            let bytes = latin1(text)?;
            if bytes.len() != *size {
                return Err(mismatch());
            }
            out.extend_from_slice(&bytes);
        }
        (WireType::Enum(symbols), Json::String(symbol)) => {
            let index = symbols
                .iter()
                .position(|candidate| candidate == symbol)
                .ok_or_else(mismatch)?;
            write_long(out, index as i64);
        }
        (WireType::Array(item), Json::Array(items)) => {
            if !items.is_empty() {
                write_long(out, items.len() as i64);
                for value in items {
                    write_default(out, item, value, records, depth + 1)?;
                }
            }
            write_long(out, 0);
        }
        (WireType::Map(value_type), Json::Object(entries)) => {
            if !entries.is_empty() {
                write_long(out, entries.len() as i64);
                for (key, value) in entries {
                    write_bytes(out, key.as_bytes());
                    write_default(out, value_type, value, records, depth + 1)?;
                }
            }
            write_long(out, 0);
        }
        (WireType::Union(branches), _) => {
            let first = branches.first().ok_or_else(mismatch)?;
            write_long(out, 0);
            write_default(out, first, default, records, depth + 1)?;
        }
        (WireType::Record(index), Json::Object(values)) => {
            for field in &records[*index].fields {
                let value = values
                    .get(&field.name)
                    .or(field.default.as_ref())
                    .ok_or_else(|| format!("default has no value for field {}", field.name))?;
                write_default(out, &field.wire, value, records, depth + 1)?;
            }
        }
        _ => return Err(mismatch()),
    }
    Ok(())
}
