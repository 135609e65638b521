//! Writer schemas: parsed and checked against the reader schema once, then compiled into the
//! [`Step`] plan that decoding runs per message (see [`super::plan`]).

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde_json::Value as Json;

use super::fingerprint::{canonical_form, crc64_avro};
use super::plan::{compile_plan, Fields, Slot, Step, EVENT_FIELDS};
use super::types::{Compiler, RecordDef, WireType};
use super::wire::{Cursor, ReadError, WireError};
use super::{DecodeError, SchemaLoadError, WriterId};
use crate::event::EventView;

/// One writer schema, compiled against the reader schema.
#[derive(Debug)]
pub(crate) struct WriterSchema {
    /// The file version or registry id it was loaded as.
    pub(crate) id: WriterId,
    /// CRC-64-AVRO of the spec's Parsing Canonical Form.
    pub(crate) fingerprint: u64,
    /// One step per writer field of the top-level record, in writer order.
    pub(crate) steps: Vec<Step>,
    /// Every record type of the writer schema, for skipping and for encoding defaults.
    pub(crate) records: Vec<RecordDef>,
}

impl WriterSchema {
    /// Parses, checks and compiles one schema. Also returns the fingerprint apache-avro computes for
    /// it, which Rust producers put in single-object headers.
    pub(crate) fn load(
        id: WriterId,
        text: &str,
        reader: &Schema,
    ) -> Result<(Self, u64), SchemaLoadError> {
        let version = id.number();
        let parse_error = |reason: String| SchemaLoadError::Parse { version, reason };
        let incompatible = |reason: String| SchemaLoadError::Incompatible { version, reason };
        let schema = Schema::parse_str(text).map_err(|err| parse_error(err.to_string()))?;
        SchemaCompatibility::can_read(&schema, reader)
            .map_err(|err| incompatible(err.to_string()))?;
        let json: Json = serde_json::from_str(text).map_err(|err| parse_error(err.to_string()))?;
        let canonical = canonical_form(&json).map_err(parse_error)?;
        let fingerprint = crc64_avro(canonical.as_bytes());
        let legacy_fingerprint = u64::from_le_bytes(
            schema
                .fingerprint::<apache_avro::rabin::Rabin>()
                .bytes
                .try_into()
                .map_err(|_| parse_error("rabin fingerprint is not 8 bytes".to_owned()))?,
        );

        let mut compiler = Compiler::default();
        let top = compiler.compile(&json, None).map_err(parse_error)?;
        let WireType::Record(top_index) = top else {
            return Err(incompatible(
                "the top-level schema is not a record".to_owned(),
            ));
        };
        let mut covered = Vec::new();
        let steps = compile_plan(&compiler.records, top_index, EVENT_FIELDS, "", &mut covered)
            .map_err(incompatible)?;
        if let Some(missing) = Slot::ALL
            .iter()
            .find(|slot| slot.is_required() && !covered.contains(slot))
        {
            return Err(incompatible(format!(
                "the writer has no field {} and the reader field has no default",
                missing.path()
            )));
        }
        let writer = WriterSchema {
            id,
            fingerprint,
            steps,
            records: compiler.records,
        };
        Ok((writer, legacy_fingerprint))
    }

    pub(crate) fn read_event<'p>(&self, datum: &'p [u8]) -> Result<EventView<'p>, DecodeError> {
        let mut cursor = Cursor { bytes: datum };
        let mut fields = Fields::default();
        self.run_steps(&self.steps, &mut cursor, &mut fields)?;
        if !cursor.bytes.is_empty() {
            return Err(DecodeError::Datum {
                writer: self.id,
                field: "end of record".to_owned(),
                reason: format!("{} trailing bytes after the datum", cursor.bytes.len()),
            });
        }
        fields.into_view(self.id)
    }

    fn run_steps<'a>(
        &self,
        steps: &[Step],
        cursor: &mut Cursor<'a>,
        fields: &mut Fields<'a>,
    ) -> Result<(), DecodeError> {
        for step in steps {
            match step {
                Step::Slot { slot, conv, .. } => {
                    let value = cursor.read_conv(conv).map_err(|err| match err {
                        ReadError::Wire(err) => self.datum_error(slot.path(), err),
                        ReadError::Unresolvable(reason) => self.unresolvable(slot.path(), reason),
                    })?;
                    fields
                        .set(*slot, value)
                        .map_err(|reason| self.unresolvable(slot.path(), reason))?;
                }
                Step::Group { steps, .. } => self.run_steps(steps, cursor, fields)?,
                Step::Skip { path, wire, .. } => {
                    cursor
                        .skip(wire, &self.records, 0)
                        .map_err(|err| self.datum_error(path, err))?;
                }
            }
        }
        Ok(())
    }

    fn datum_error(&self, field: &str, err: WireError) -> DecodeError {
        DecodeError::Datum {
            writer: self.id,
            field: field.to_owned(),
            reason: err.to_string(),
        }
    }

    fn unresolvable(&self, field: &'static str, reason: String) -> DecodeError {
        DecodeError::Unresolvable {
            writer: self.id,
            field,
            reason,
        }
    }
}
