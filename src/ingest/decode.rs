//! Turns a Kafka message payload into a validated [`AuditEvent`].
//!
//! Two wire formats are accepted, told apart per message by their first bytes:
//!
//! - Confluent framing: `0x00`, a 4-byte big-endian schema id, then the Avro binary datum. Without a
//!   registry, schema id `N` means `schemas/audit_event.vN.avsc`.
//! - Avro single-object encoding: `0xC3 0x01`, the 8-byte little-endian CRC-64-AVRO fingerprint of
//!   the writer schema's Parsing Canonical Form, then the datum.
//!
//! Every writer schema is parsed, checked against the reader schema (v2) and compiled once, when the
//! [`Decoder`] is built, into a plan: one step per writer field, in writer order, that either fills a
//! field of [`AuditEvent`] or skips the bytes of a field the reader does not know. Decoding a message
//! is then a single pass over its bytes with no per-message schema work. This is Avro schema
//! resolution restricted to the one reader schema we have: fields are matched by name, writer-only
//! fields are skipped, reader fields absent from the writer take their default (`null`), `int`
//! promotes to `long`, `bytes` to `string`, and enum symbols are matched by name.
//!
//! Why not `apache_avro::from_avro_datum` with a reader schema: it rebuilds the schema's name table
//! on every call, materialises a `Value` tree and then resolves it into a second one, and it fails
//! the whole datum with an opaque error when a `uuid` string does not parse (we want that classed as
//! `validation`). apache-avro is still used for what it does well: parsing schemas and the
//! compatibility check at load time, and as an independent encoder in the tests.
//!
//! Fingerprints are computed here from the spec's Parsing Canonical Form rather than with
//! `Schema::fingerprint`: apache-avro 0.21 keeps logical-typed primitives as `{"type":"string"}`
//! instead of `"string"` (AVRO-4004), so its fingerprints differ from those of the Java, Python and
//! Confluent implementations for any schema with a logical type, ours included. Payloads framed with
//! apache-avro's own fingerprint are still recognised, so Rust producers using
//! `GenericSingleObjectWriter` keep working.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use chrono::{DateTime, Duration, Utc};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::event::{Actor, ActorType, AuditEvent, Outcome, Resource};

/// The schema version every payload is resolved into; its text is embedded in the binary.
pub const READER_VERSION: u32 = 2;

/// The longest tenant id, actor id, action, resource type or resource id accepted, in bytes.
pub const MAX_KEY_FIELD_BYTES: usize = 512;

const READER_SCHEMA: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/schemas/audit_event.v2.avsc"
));
const EMBEDDED_SCHEMAS: [(u32, &str); 2] = [
    (
        1,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/audit_event.v1.avsc"
        )),
    ),
    (READER_VERSION, READER_SCHEMA),
];

const CONFLUENT_MAGIC: u8 = 0x00;
const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const CONFLUENT_HEADER_LEN: usize = 5;
const SINGLE_OBJECT_HEADER_LEN: usize = 10;

/// Nesting depth past which a writer-only field is refused instead of skipped. Recursive schemas
/// would otherwise let a crafted payload exhaust the stack.
const MAX_SKIP_DEPTH: usize = 64;

/// How much of a rejected value is quoted in an error message.
const QUOTE_CHARS: usize = 64;

/// The kind of failure, written to the dead-letter header `auditflow.error.class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The bytes are not a decodable message: unknown magic byte, truncated header or datum.
    Decode,
    /// The writer schema is unknown, or its data cannot be resolved into the reader schema.
    Schema,
    /// The event decoded but breaks a content rule (ids, lengths, NUL characters, details JSON).
    Validation,
    /// The event's `occurred_at` is outside the accept window.
    OutOfWindow,
}

impl ErrorClass {
    /// Returns the stable name used in dead-letter headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Decode => "decode",
            ErrorClass::Schema => "schema",
            ErrorClass::Validation => "validation",
            ErrorClass::OutOfWindow => "out_of_window",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The framing a payload arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// `0x00`, 4-byte big-endian schema id, datum.
    Confluent,
    /// `0xC3 0x01`, 8-byte little-endian schema fingerprint, datum.
    SingleObject,
}

impl fmt::Display for WireFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireFormat::Confluent => "confluent",
            WireFormat::SingleObject => "single-object",
        })
    }
}

/// Why a payload was refused. Every variant is permanent for that payload: retrying it gives the
/// same answer, so the caller dead-letters it under [`DecodeError::class`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload has no bytes at all.
    #[error("payload is empty")]
    Empty,
    /// The first bytes match neither framing.
    #[error(
        "unrecognised wire format: payload starts with {prefix}, expected 0x00 (confluent) or 0xc3 0x01 (avro single-object)"
    )]
    UnknownFormat {
        /// The first bytes, in hex.
        prefix: String,
    },
    /// The payload ends inside its framing header.
    #[error("{format} header is truncated: payload has {len} bytes, the header needs {needed}")]
    TruncatedHeader {
        /// The framing recognised from the magic bytes.
        format: WireFormat,
        /// The payload length.
        len: usize,
        /// The header length.
        needed: usize,
    },
    /// A Confluent schema id that names no loaded schema.
    #[error("unknown schema id {0}: no audit_event.v{0}.avsc is loaded")]
    UnknownSchemaId(u32),
    /// A single-object fingerprint that matches no loaded schema.
    #[error("unknown writer schema fingerprint {0:#018x}")]
    UnknownFingerprint(u64),
    /// The datum does not decode with its writer schema (truncated, bad varint, bad UTF-8, trailing
    /// bytes, out-of-range union or enum index).
    #[error("datum written with schema v{version} does not decode at {field}: {reason}")]
    Datum {
        /// The writer schema version.
        version: u32,
        /// The field being read, as a dotted path.
        field: String,
        /// What was wrong with the bytes.
        reason: String,
    },
    /// The datum decoded, but its value has no place in the reader schema (a writer enum symbol the
    /// reader lacks, a null for a required field).
    #[error("datum written with schema v{version} cannot be resolved at {field}: {reason}")]
    Unresolvable {
        /// The writer schema version.
        version: u32,
        /// The reader field, as a dotted path.
        field: &'static str,
        /// Why the value cannot be resolved.
        reason: String,
    },
    /// A field breaks a content rule.
    #[error("{field} is invalid: {reason}")]
    Invalid {
        /// The field, as a dotted path.
        field: &'static str,
        /// Which rule it breaks.
        reason: String,
    },
    /// `occurred_at` is outside `[now - past, now + future]`.
    #[error("occurred_at {occurred_at} is outside the accept window {earliest} to {latest}")]
    OutOfWindow {
        /// The event time.
        occurred_at: DateTime<Utc>,
        /// The earliest time accepted.
        earliest: DateTime<Utc>,
        /// The latest time accepted.
        latest: DateTime<Utc>,
    },
    /// `occurred_at` does not even fit a calendar date.
    #[error("occurred_at of {micros} microseconds since the epoch is not a representable time")]
    UnrepresentableTime {
        /// The raw `timestamp-micros` value.
        micros: i64,
    },
}

impl DecodeError {
    /// Returns the class written to the dead-letter header.
    pub fn class(&self) -> ErrorClass {
        match self {
            DecodeError::Empty
            | DecodeError::UnknownFormat { .. }
            | DecodeError::TruncatedHeader { .. }
            | DecodeError::Datum { .. } => ErrorClass::Decode,
            DecodeError::UnknownSchemaId(_)
            | DecodeError::UnknownFingerprint(_)
            | DecodeError::Unresolvable { .. } => ErrorClass::Schema,
            DecodeError::Invalid { .. } => ErrorClass::Validation,
            DecodeError::OutOfWindow { .. } | DecodeError::UnrepresentableTime { .. } => {
                ErrorClass::OutOfWindow
            }
        }
    }
}

/// Why the schema set could not be built. Raised at start-up, never per message.
#[derive(Debug, thiserror::Error)]
pub enum SchemaLoadError {
    /// The schema directory cannot be listed.
    #[error("cannot list schema directory {path}")]
    ListDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A schema file cannot be read.
    #[error("cannot read schema file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Two files name the same version (e.g. `v2` and `v02`).
    #[error("schema files {first} and {second} both define version {version}")]
    DuplicateVersion {
        /// The version.
        version: u32,
        /// One file.
        first: PathBuf,
        /// The other file.
        second: PathBuf,
    },
    /// A file is not a valid Avro schema.
    #[error("schema v{version} is not a valid avro schema: {reason}")]
    Parse {
        /// The version.
        version: u32,
        /// The parser's complaint.
        reason: String,
    },
    /// Data written with this schema cannot be read with the reader schema.
    #[error("writer schema v{version} cannot be read with reader schema v2: {reason}")]
    Incompatible {
        /// The version.
        version: u32,
        /// What does not resolve.
        reason: String,
    },
}

/// The time range an event's `occurred_at` must fall in, relative to the time of decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptWindow {
    /// How far in the past an event may be.
    pub past: Duration,
    /// How far in the future an event may be (clock skew of producers).
    pub future: Duration,
}

impl Default for AcceptWindow {
    fn default() -> Self {
        AcceptWindow {
            past: Duration::days(30),
            future: Duration::days(1),
        }
    }
}

/// A decoded event and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The event, resolved into the reader schema.
    pub event: AuditEvent,
    /// The version of the schema the producer wrote with.
    pub writer_version: u32,
    /// The framing the payload arrived in.
    pub wire_format: WireFormat,
}

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

/// The known writer schemas, compiled against the reader schema. Built once and shared; decoding
/// takes `&self` and is safe from many threads.
#[derive(Debug)]
pub struct Decoder {
    writers: Vec<WriterSchema>,
    by_version: HashMap<u32, usize>,
    by_fingerprint: HashMap<u64, usize>,
}

impl Decoder {
    /// Builds a decoder for the schemas compiled into the binary (v1 and v2).
    pub fn embedded() -> Self {
        let sources = EMBEDDED_SCHEMAS
            .iter()
            .map(|&(version, text)| (version, text.to_owned()))
            .collect();
        // The embedded schemas are constants checked by this module's tests, not input.
        Self::from_sources(sources).expect("embedded schemas are valid and readable by v2")
    }

    /// Builds a decoder from every `audit_event.v<N>.avsc` in `dir`, adding the embedded v1 and v2
    /// where the directory lacks them. Fails if any schema does not parse or cannot be read with
    /// the reader schema.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, SchemaLoadError> {
        let dir = dir.as_ref();
        let list_error = |source| SchemaLoadError::ListDir {
            path: dir.to_path_buf(),
            source,
        };
        let mut files: BTreeMap<u32, PathBuf> = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(list_error)? {
            let path = entry.map_err(list_error)?.path();
            let Some(version) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(version_from_file_name)
            else {
                continue;
            };
            if let Some(first) = files.insert(version, path.clone()) {
                return Err(SchemaLoadError::DuplicateVersion {
                    version,
                    first,
                    second: path,
                });
            }
        }
        let mut sources = BTreeMap::new();
        for (version, path) in files {
            let text = std::fs::read_to_string(&path)
                .map_err(|source| SchemaLoadError::ReadFile { path, source })?;
            sources.insert(version, text);
        }
        for (version, text) in EMBEDDED_SCHEMAS {
            sources.entry(version).or_insert_with(|| text.to_owned());
        }
        Self::from_sources(sources)
    }

    fn from_sources(sources: BTreeMap<u32, String>) -> Result<Self, SchemaLoadError> {
        let reader = Schema::parse_str(READER_SCHEMA).map_err(|err| SchemaLoadError::Parse {
            version: READER_VERSION,
            reason: err.to_string(),
        })?;
        let mut decoder = Decoder {
            writers: Vec::with_capacity(sources.len()),
            by_version: HashMap::new(),
            by_fingerprint: HashMap::new(),
        };
        for (version, text) in sources {
            let (writer, legacy_fingerprint) = WriterSchema::load(version, &text, &reader)?;
            let index = decoder.writers.len();
            decoder.by_version.insert(version, index);
            // Identical canonical forms (schemas differing only in docs) share a fingerprint; the
            // lowest version keeps it, which is harmless since they decode identically.
            decoder
                .by_fingerprint
                .entry(writer.fingerprint)
                .or_insert(index);
            decoder
                .by_fingerprint
                .entry(legacy_fingerprint)
                .or_insert(index);
            decoder.writers.push(writer);
        }
        Ok(decoder)
    }

    /// Returns the loaded writer schema versions, ascending.
    pub fn versions(&self) -> Vec<u32> {
        let mut versions: Vec<u32> = self.by_version.keys().copied().collect();
        versions.sort_unstable();
        versions
    }

    /// Returns the CRC-64-AVRO fingerprint of a loaded schema's Parsing Canonical Form, as written
    /// (little-endian) after `0xC3 0x01` in single-object payloads.
    pub fn fingerprint(&self, version: u32) -> Option<u64> {
        self.writer(version).map(|writer| writer.fingerprint)
    }

    /// Decodes a payload into an event resolved into the reader schema. Checks the framing, the
    /// datum and the event id's syntax; the content rules and the time window are [`validate`]'s.
    pub fn decode(&self, payload: &[u8]) -> Result<Decoded, DecodeError> {
        let (writer, wire_format, datum) = self.frame(payload)?;
        let event = writer.read_event(datum)?;
        Ok(Decoded {
            event,
            writer_version: writer.version,
            wire_format,
        })
    }

    /// Decodes a payload and applies [`validate`]: the one call the consumer needs.
    pub fn decode_validated(
        &self,
        payload: &[u8],
        now: DateTime<Utc>,
        window: &AcceptWindow,
    ) -> Result<Decoded, DecodeError> {
        let decoded = self.decode(payload)?;
        validate(&decoded.event, now, window)?;
        Ok(decoded)
    }

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

    fn writer(&self, version: u32) -> Option<&WriterSchema> {
        self.by_version
            .get(&version)
            .map(|&index| &self.writers[index])
    }

    /// Splits a payload into its writer schema, framing and datum.
    fn frame<'p>(
        &self,
        payload: &'p [u8],
    ) -> Result<(&WriterSchema, WireFormat, &'p [u8]), DecodeError> {
        match payload {
            [] => Err(DecodeError::Empty),
            [CONFLUENT_MAGIC, ..] => {
                let (header, datum) =
                    split_header(payload, WireFormat::Confluent, CONFLUENT_HEADER_LEN)?;
                let id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                let writer = self.writer(id).ok_or(DecodeError::UnknownSchemaId(id))?;
                Ok((writer, WireFormat::Confluent, datum))
            }
            [0xC3] | [0xC3, 0x01, ..] => {
                let (header, datum) =
                    split_header(payload, WireFormat::SingleObject, SINGLE_OBJECT_HEADER_LEN)?;
                let mut fingerprint_bytes = [0u8; 8];
                fingerprint_bytes.copy_from_slice(&header[2..]);
                let fingerprint = u64::from_le_bytes(fingerprint_bytes);
                let index = self
                    .by_fingerprint
                    .get(&fingerprint)
                    .ok_or(DecodeError::UnknownFingerprint(fingerprint))?;
                Ok((&self.writers[*index], WireFormat::SingleObject, datum))
            }
            _ => Err(DecodeError::UnknownFormat {
                prefix: payload
                    .iter()
                    .take(4)
                    .map(|byte| format!("{byte:#04x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            }),
        }
    }
}

fn split_header(
    payload: &[u8],
    format: WireFormat,
    needed: usize,
) -> Result<(&[u8], &[u8]), DecodeError> {
    if payload.len() < needed {
        return Err(DecodeError::TruncatedHeader {
            format,
            len: payload.len(),
            needed,
        });
    }
    Ok(payload.split_at(needed))
}

/// Parses `audit_event.v<N>.avsc` into `N`.
fn version_from_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("audit_event.v")?.strip_suffix(".avsc")?;
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Checks the content rules and the accept window. Content problems are reported before the time
/// window, so an event that is both malformed and late is classed `validation`.
pub fn validate(
    event: &AuditEvent,
    now: DateTime<Utc>,
    window: &AcceptWindow,
) -> Result<(), DecodeError> {
    if event.event_id.is_nil() {
        return Err(invalid("event_id", "is the nil uuid".to_owned()));
    }
    check_key_field("tenant_id", &event.tenant_id)?;
    check_key_field("actor.id", &event.actor.id)?;
    check_key_field("action", &event.action)?;
    check_key_field("resource.type", &event.resource.resource_type)?;
    check_key_field("resource.id", &event.resource.id)?;
    check_optional_text("actor.ip", event.actor.ip.as_deref())?;
    check_optional_text("actor.user_agent", event.actor.user_agent.as_deref())?;
    check_optional_text("reason", event.reason.as_deref())?;
    check_optional_text("trace_id", event.trace_id.as_deref())?;
    check_optional_text("session_id", event.session_id.as_deref())?;
    if let Some(details) = event.details.as_deref() {
        check_optional_text("details", Some(details))?;
        check_details_json(details)?;
    }
    check_window(event.occurred_at, now, window)
}

fn invalid(field: &'static str, reason: String) -> DecodeError {
    DecodeError::Invalid { field, reason }
}

fn check_key_field(field: &'static str, value: &str) -> Result<(), DecodeError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty".to_owned()));
    }
    if value.len() > MAX_KEY_FIELD_BYTES {
        return Err(invalid(
            field,
            format!(
                "is {} bytes long, the limit is {MAX_KEY_FIELD_BYTES}",
                value.len()
            ),
        ));
    }
    check_optional_text(field, Some(value))
}

fn check_optional_text(field: &'static str, value: Option<&str>) -> Result<(), DecodeError> {
    match value.and_then(|text| text.find('\0')) {
        Some(position) => Err(invalid(
            field,
            format!(
                "contains a nul character at byte {position}, which postgres text cannot store"
            ),
        )),
        None => Ok(()),
    }
}

fn check_details_json(details: &str) -> Result<(), DecodeError> {
    match serde_json::from_str::<JsonShape>(details) {
        Ok(JsonShape::Object) => Ok(()),
        Ok(JsonShape::Other(kind)) => Err(invalid(
            "details",
            format!("is a json {kind}, not an object"),
        )),
        Err(err) if err.is_data() => Err(invalid("details", err.to_string())),
        Err(err) => Err(invalid("details", format!("is not valid json: {err}"))),
    }
}

fn check_window(
    occurred_at: DateTime<Utc>,
    now: DateTime<Utc>,
    window: &AcceptWindow,
) -> Result<(), DecodeError> {
    let earliest = now
        .checked_sub_signed(window.past)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let latest = now
        .checked_add_signed(window.future)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if occurred_at < earliest || occurred_at > latest {
        return Err(DecodeError::OutOfWindow {
            occurred_at,
            earliest,
            latest,
        });
    }
    Ok(())
}

/// The top-level shape of a JSON document, found while checking every string and key in it for
/// `\u0000` (Postgres jsonb refuses that escape) without building a `serde_json::Value`.
enum JsonShape {
    Object,
    Other(&'static str),
}

impl<'de> Deserialize<'de> for JsonShape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = JsonShape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<JsonShape, E> {
        Ok(JsonShape::Other("boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<JsonShape, E> {
        Ok(JsonShape::Other("number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<JsonShape, E> {
        Ok(JsonShape::Other("number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<JsonShape, E> {
        Ok(JsonShape::Other("number"))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<JsonShape, E> {
        NulFreeVisitor.visit_str(value)?;
        Ok(JsonShape::Other("string"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<JsonShape, E> {
        Ok(JsonShape::Other("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<JsonShape, A::Error> {
        NulFreeVisitor.visit_seq(seq)?;
        Ok(JsonShape::Other("array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<JsonShape, A::Error> {
        NulFreeVisitor.visit_map(map)?;
        Ok(JsonShape::Object)
    }
}

/// Any JSON value with no NUL in any string or key. Strings are seen unescaped, so `\u0000` is
/// caught and `\\u0000` (a backslash followed by `u0000`) is not.
struct NulFree;

impl<'de> Deserialize<'de> for NulFree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NulFreeVisitor)
    }
}

struct NulFreeVisitor;

impl<'de> Visitor<'de> for NulFreeVisitor {
    type Value = NulFree;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<NulFree, E> {
        if value.contains('\0') {
            return Err(E::custom(
                "contains the escape \\u0000, which postgres jsonb cannot store",
            ));
        }
        Ok(NulFree)
    }

    fn visit_unit<E: de::Error>(self) -> Result<NulFree, E> {
        Ok(NulFree)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NulFree, A::Error> {
        while seq.next_element::<NulFree>()?.is_some() {}
        Ok(NulFree)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NulFree, A::Error> {
        while map.next_entry::<NulFree, NulFree>()?.is_some() {}
        Ok(NulFree)
    }
}

/// Returns a 16-byte fingerprint of every field of the event, independent of the wire format and
/// writer schema: the same event written with v1 or v2 (with no session) hashes the same. Used to
/// tell a redelivery (same id, same content) from an id reused for different content.
///
/// `details` is hashed as the text it arrived as, so re-serialised JSON with other spacing or key
/// order hashes differently.
pub fn content_hash(event: &AuditEvent) -> [u8; 16] {
    let mut hasher = Sha256::new();
    // Domain separation and a version, so the serialisation can change without silent collisions.
    hasher.update(b"auditflow.content.v1\0");
    hasher.update(event.event_id.as_bytes());
    hasher.update(event.occurred_at.timestamp_micros().to_be_bytes());
    hash_text(&mut hasher, &event.tenant_id);
    hash_text(&mut hasher, &event.actor.id);
    hash_text(&mut hasher, event.actor.actor_type.as_str());
    hash_optional_text(&mut hasher, event.actor.ip.as_deref());
    hash_optional_text(&mut hasher, event.actor.user_agent.as_deref());
    hash_text(&mut hasher, &event.action);
    hash_text(&mut hasher, &event.resource.resource_type);
    hash_text(&mut hasher, &event.resource.id);
    hash_text(&mut hasher, event.outcome.as_str());
    hash_optional_text(&mut hasher, event.reason.as_deref());
    hash_optional_text(&mut hasher, event.trace_id.as_deref());
    hash_optional_text(&mut hasher, event.details.as_deref());
    hash_optional_text(&mut hasher, event.session_id.as_deref());
    let digest = hasher.finalize();
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&digest[..16]);
    hash
}

fn hash_text(hasher: &mut Sha256, text: &str) {
    hasher.update((text.len() as u64).to_be_bytes());
    hasher.update(text.as_bytes());
}

fn hash_optional_text(hasher: &mut Sha256, text: Option<&str>) {
    match text {
        None => hasher.update([0u8]),
        Some(text) => {
            hasher.update([1u8]);
            hash_text(hasher, text);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writer schemas: loading, canonical form, fingerprint, compiled plan.
// ---------------------------------------------------------------------------------------------

/// One writer schema, compiled against the reader schema.
#[derive(Debug)]
struct WriterSchema {
    version: u32,
    /// CRC-64-AVRO of the spec's Parsing Canonical Form.
    fingerprint: u64,
    /// One step per writer field of the top-level record, in writer order.
    steps: Vec<Step>,
    /// Every record type of the writer schema, for skipping and for encoding defaults.
    records: Vec<RecordDef>,
}

impl WriterSchema {
    /// Parses, checks and compiles one schema. Also returns the fingerprint apache-avro computes for
    /// it, which Rust producers put in single-object headers.
    fn load(version: u32, text: &str, reader: &Schema) -> Result<(Self, u64), SchemaLoadError> {
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
            version,
            fingerprint,
            steps,
            records: compiler.records,
        };
        Ok((writer, legacy_fingerprint))
    }

    fn read_event(&self, datum: &[u8]) -> Result<AuditEvent, DecodeError> {
        let mut cursor = Cursor { bytes: datum };
        let mut fields = Fields::default();
        self.run_steps(&self.steps, &mut cursor, &mut fields)?;
        if !cursor.bytes.is_empty() {
            return Err(DecodeError::Datum {
                version: self.version,
                field: "end of record".to_owned(),
                reason: format!("{} trailing bytes after the datum", cursor.bytes.len()),
            });
        }
        fields.into_event(self.version)
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
            version: self.version,
            field: field.to_owned(),
            reason: err.to_string(),
        }
    }

    fn unresolvable(&self, field: &'static str, reason: String) -> DecodeError {
        DecodeError::Unresolvable {
            version: self.version,
            field,
            reason,
        }
    }

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
                            version: self.version,
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
                        version: self.version,
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

/// A writer type, compiled from the schema JSON. Logical types are dropped (they do not change the
/// encoding), except on `long`, where `occurred_at` needs to know the unit.
#[derive(Debug, Clone)]
enum WireType {
    Null,
    Boolean,
    Int,
    Long {
        logical: Option<String>,
    },
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(Vec<String>),
    Array(Box<WireType>),
    Map(Box<WireType>),
    Union(Vec<WireType>),
    /// Index into the schema's record table, so recursive records stay finite.
    Record(usize),
}

impl WireType {
    fn describe(&self) -> String {
        match self {
            WireType::Null => "null".to_owned(),
            WireType::Boolean => "boolean".to_owned(),
            WireType::Int => "int".to_owned(),
            WireType::Long { logical: None } => "long".to_owned(),
            WireType::Long {
                logical: Some(logical),
            } => format!("long ({logical})"),
            WireType::Float => "float".to_owned(),
            WireType::Double => "double".to_owned(),
            WireType::Bytes => "bytes".to_owned(),
            WireType::String => "string".to_owned(),
            WireType::Fixed(size) => format!("fixed({size})"),
            WireType::Enum(_) => "enum".to_owned(),
            WireType::Array(_) => "array".to_owned(),
            WireType::Map(_) => "map".to_owned(),
            WireType::Union(_) => "union".to_owned(),
            WireType::Record(_) => "record".to_owned(),
        }
    }
}

#[derive(Debug)]
struct RecordDef {
    fields: Vec<FieldDef>,
}

#[derive(Debug)]
struct FieldDef {
    name: String,
    wire: WireType,
    default: Option<Json>,
}

/// Compiles schema JSON (already validated by apache-avro) into [`WireType`]s. Works from the JSON
/// rather than `apache_avro::Schema` because the latter folds `fixed(16)` with logical type `uuid`
/// into the same variant as a `string` uuid, losing how it is encoded.
#[derive(Default)]
struct Compiler {
    records: Vec<RecordDef>,
    named: HashMap<String, WireType>,
}

impl Compiler {
    fn compile(&mut self, json: &Json, namespace: Option<&str>) -> Result<WireType, String> {
        match json {
            Json::String(name) => self.primitive_or_named(name, namespace),
            Json::Array(branches) => branches
                .iter()
                .map(|branch| self.compile(branch, namespace))
                .collect::<Result<_, _>>()
                .map(WireType::Union),
            Json::Object(map) => match map.get("type") {
                Some(Json::String(type_name)) => match type_name.as_str() {
                    "record" | "error" => {
                        let (full_name, own_namespace) = full_name(map, namespace)?;
                        let index = self.records.len();
                        self.records.push(RecordDef { fields: Vec::new() });
                        self.named
                            .insert(full_name.clone(), WireType::Record(index));
                        let field_list = map
                            .get("fields")
                            .and_then(Json::as_array)
                            .ok_or_else(|| format!("record {full_name} has no fields array"))?;
                        let mut fields = Vec::with_capacity(field_list.len());
                        for field in field_list {
                            let name = field
                                .get("name")
                                .and_then(Json::as_str)
                                .ok_or_else(|| format!("a field of {full_name} has no name"))?;
                            let field_type = field
                                .get("type")
                                .ok_or_else(|| format!("field {full_name}.{name} has no type"))?;
                            fields.push(FieldDef {
                                name: name.to_owned(),
                                wire: self.compile(field_type, own_namespace.as_deref())?,
                                default: field.get("default").cloned(),
                            });
                        }
                        self.records[index].fields = fields;
                        Ok(WireType::Record(index))
                    }
                    "enum" => {
                        let (full_name, _) = full_name(map, namespace)?;
                        let symbols = map
                            .get("symbols")
                            .and_then(Json::as_array)
                            .ok_or_else(|| format!("enum {full_name} has no symbols"))?
                            .iter()
                            .map(|symbol| symbol.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| format!("enum {full_name} has a non-string symbol"))?;
                        let wire = WireType::Enum(symbols);
                        self.named.insert(full_name, wire.clone());
                        Ok(wire)
                    }
                    "fixed" => {
                        let (full_name, _) = full_name(map, namespace)?;
                        let size = map
                            .get("size")
                            .and_then(json_size)
                            .ok_or_else(|| format!("fixed {full_name} has no valid size"))?;
                        let wire = WireType::Fixed(size);
                        self.named.insert(full_name, wire.clone());
                        Ok(wire)
                    }
                    "array" => {
                        let items = map.get("items").ok_or("array has no items")?;
                        Ok(WireType::Array(Box::new(self.compile(items, namespace)?)))
                    }
                    "map" => {
                        let values = map.get("values").ok_or("map has no values")?;
                        Ok(WireType::Map(Box::new(self.compile(values, namespace)?)))
                    }
                    "long" => Ok(WireType::Long {
                        logical: map
                            .get("logicalType")
                            .and_then(Json::as_str)
                            .map(str::to_owned),
                    }),
                    other => self.primitive_or_named(other, namespace),
                },
                Some(nested) => self.compile(nested, namespace),
                None => Err("schema object has no type".to_owned()),
            },
            other => Err(format!("{other} is not a schema")),
        }
    }

    fn primitive_or_named(&self, name: &str, namespace: Option<&str>) -> Result<WireType, String> {
        Ok(match name {
            "null" => WireType::Null,
            "boolean" => WireType::Boolean,
            "int" => WireType::Int,
            "long" => WireType::Long { logical: None },
            "float" => WireType::Float,
            "double" => WireType::Double,
            "bytes" => WireType::Bytes,
            "string" => WireType::String,
            _ => {
                let full = resolve_reference(name, namespace, |candidate| {
                    self.named.contains_key(candidate)
                });
                self.named
                    .get(&full)
                    .cloned()
                    .ok_or_else(|| format!("unknown type {name}"))?
            }
        })
    }
}

fn json_size(value: &Json) -> Option<usize> {
    match value {
        Json::Number(number) => number.as_u64().and_then(|size| usize::try_from(size).ok()),
        Json::String(text) => text.parse().ok(),
        _ => None,
    }
}

/// Returns a named type's full name and the namespace its children inherit.
fn full_name(
    map: &serde_json::Map<String, Json>,
    enclosing: Option<&str>,
) -> Result<(String, Option<String>), String> {
    let name = map
        .get("name")
        .and_then(Json::as_str)
        .ok_or("named type has no name")?;
    if let Some((namespace, _)) = name.rsplit_once('.') {
        return Ok((name.to_owned(), Some(namespace.to_owned())));
    }
    let namespace = match map.get("namespace") {
        Some(Json::String(namespace)) if namespace.is_empty() => None,
        Some(Json::String(namespace)) => Some(namespace.clone()),
        _ => enclosing.map(str::to_owned),
    };
    let full = match &namespace {
        Some(namespace) => format!("{namespace}.{name}"),
        None => name.to_owned(),
    };
    Ok((full, namespace))
}

/// Resolves a type reference: a dotted name is already full; otherwise the enclosing namespace is
/// tried first, then the null namespace.
fn resolve_reference(
    name: &str,
    namespace: Option<&str>,
    is_defined: impl Fn(&str) -> bool,
) -> String {
    if name.contains('.') {
        return name.to_owned();
    }
    match namespace {
        Some(namespace) => {
            let qualified = format!("{namespace}.{name}");
            if is_defined(&qualified) || !is_defined(name) {
                qualified
            } else {
                name.to_owned()
            }
        }
        None => name.to_owned(),
    }
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Returns the schema's Parsing Canonical Form as the Avro specification defines it: primitives in
/// their simple form, full names, only `name`, `type`, `fields`, `symbols`, `items`, `values` and
/// `size` kept, in that order, no whitespace.
fn canonical_form(json: &Json) -> Result<String, String> {
    let mut out = String::new();
    write_canonical(json, None, &mut HashSet::new(), &mut out)?;
    Ok(out)
}

fn write_canonical(
    json: &Json,
    namespace: Option<&str>,
    defined: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), String> {
    match json {
        Json::String(name) => write_canonical_name(name, namespace, defined, out),
        Json::Array(branches) => {
            out.push('[');
            for (index, branch) in branches.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(branch, namespace, defined, out)?;
            }
            out.push(']');
        }
        Json::Object(map) => match map.get("type") {
            Some(Json::String(type_name)) => match type_name.as_str() {
                "record" | "error" | "enum" | "fixed" => {
                    let (full, own_namespace) = full_name(map, namespace)?;
                    if !defined.insert(full.clone()) {
                        push_json_string(out, &full);
                        return Ok(());
                    }
                    out.push_str("{\"name\":");
                    push_json_string(out, &full);
                    out.push_str(",\"type\":");
                    push_json_string(out, type_name);
                    match type_name.as_str() {
                        "enum" => {
                            out.push_str(",\"symbols\":[");
                            let symbols = map
                                .get("symbols")
                                .and_then(Json::as_array)
                                .ok_or_else(|| format!("enum {full} has no symbols"))?;
                            for (index, symbol) in symbols.iter().enumerate() {
                                if index > 0 {
                                    out.push(',');
                                }
                                let symbol = symbol.as_str().ok_or_else(|| {
                                    format!("enum {full} has a non-string symbol")
                                })?;
                                push_json_string(out, symbol);
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = map
                                .get("size")
                                .and_then(json_size)
                                .ok_or_else(|| format!("fixed {full} has no valid size"))?;
                            out.push_str(",\"size\":");
                            out.push_str(&size.to_string());
                        }
                        _ => {
                            out.push_str(",\"fields\":[");
                            let fields = map
                                .get("fields")
                                .and_then(Json::as_array)
                                .ok_or_else(|| format!("record {full} has no fields array"))?;
                            for (index, field) in fields.iter().enumerate() {
                                if index > 0 {
                                    out.push(',');
                                }
                                let name = field
                                    .get("name")
                                    .and_then(Json::as_str)
                                    .ok_or_else(|| format!("a field of {full} has no name"))?;
                                let field_type = field
                                    .get("type")
                                    .ok_or_else(|| format!("field {full}.{name} has no type"))?;
                                out.push_str("{\"name\":");
                                push_json_string(out, name);
                                out.push_str(",\"type\":");
                                write_canonical(
                                    field_type,
                                    own_namespace.as_deref(),
                                    defined,
                                    out,
                                )?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                }
                "array" => {
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write_canonical(
                        map.get("items").ok_or("array has no items")?,
                        namespace,
                        defined,
                        out,
                    )?;
                    out.push('}');
                }
                "map" => {
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write_canonical(
                        map.get("values").ok_or("map has no values")?,
                        namespace,
                        defined,
                        out,
                    )?;
                    out.push('}');
                }
                other => write_canonical_name(other, namespace, defined, out),
            },
            Some(nested) => write_canonical(nested, namespace, defined, out)?,
            None => return Err("schema object has no type".to_owned()),
        },
        other => return Err(format!("{other} is not a schema")),
    }
    Ok(())
}

fn write_canonical_name(
    name: &str,
    namespace: Option<&str>,
    defined: &HashSet<String>,
    out: &mut String,
) {
    if PRIMITIVES.contains(&name) {
        push_json_string(out, name);
    } else {
        let full = resolve_reference(name, namespace, |candidate| defined.contains(candidate));
        push_json_string(out, &full);
    }
}

/// Writes a JSON string literal with only the escapes JSON requires, so non-ASCII text stays UTF-8
/// as the [STRINGS] rule asks.
fn push_json_string(out: &mut String, text: &str) {
    out.push_str(&Json::String(text.to_owned()).to_string());
}

/// CRC-64-AVRO, the Rabin fingerprint the Avro specification defines for schema fingerprints.
fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u64; 256];
        for (index, entry) in table.iter_mut().enumerate() {
            let mut fingerprint = index as u64;
            for _ in 0..8 {
                fingerprint = (fingerprint >> 1) ^ (EMPTY & (fingerprint & 1).wrapping_neg());
            }
            *entry = fingerprint;
        }
        table
    });
    bytes.iter().fold(EMPTY, |fingerprint, &byte| {
        (fingerprint >> 8) ^ table[((fingerprint ^ u64::from(byte)) & 0xff) as usize]
    })
}

// ---------------------------------------------------------------------------------------------
// The reader side: where each reader field lands in `AuditEvent`.
// ---------------------------------------------------------------------------------------------

/// A leaf field of the reader schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    EventId,
    OccurredAt,
    TenantId,
    ActorId,
    ActorType,
    ActorIp,
    ActorUserAgent,
    Action,
    ResourceType,
    ResourceId,
    Outcome,
    Reason,
    TraceId,
    Details,
    SessionId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Text,
    OptionalText,
    Timestamp,
    ActorType,
    Outcome,
}

impl Slot {
    const ALL: [Slot; 15] = [
        Slot::EventId,
        Slot::OccurredAt,
        Slot::TenantId,
        Slot::ActorId,
        Slot::ActorType,
        Slot::ActorIp,
        Slot::ActorUserAgent,
        Slot::Action,
        Slot::ResourceType,
        Slot::ResourceId,
        Slot::Outcome,
        Slot::Reason,
        Slot::TraceId,
        Slot::Details,
        Slot::SessionId,
    ];

    fn path(self) -> &'static str {
        match self {
            Slot::EventId => "event_id",
            Slot::OccurredAt => "occurred_at",
            Slot::TenantId => "tenant_id",
            Slot::ActorId => "actor.id",
            Slot::ActorType => "actor.type",
            Slot::ActorIp => "actor.ip",
            Slot::ActorUserAgent => "actor.user_agent",
            Slot::Action => "action",
            Slot::ResourceType => "resource.type",
            Slot::ResourceId => "resource.id",
            Slot::Outcome => "outcome",
            Slot::Reason => "reason",
            Slot::TraceId => "trace_id",
            Slot::Details => "details",
            Slot::SessionId => "session_id",
        }
    }

    fn kind(self) -> SlotKind {
        match self {
            Slot::EventId
            | Slot::TenantId
            | Slot::ActorId
            | Slot::Action
            | Slot::ResourceType
            | Slot::ResourceId => SlotKind::Text,
            Slot::ActorIp
            | Slot::ActorUserAgent
            | Slot::Reason
            | Slot::TraceId
            | Slot::Details
            | Slot::SessionId => SlotKind::OptionalText,
            Slot::OccurredAt => SlotKind::Timestamp,
            Slot::ActorType => SlotKind::ActorType,
            Slot::Outcome => SlotKind::Outcome,
        }
    }

    /// Whether the reader field has no default, so every writer must provide it. The optional
    /// fields all default to `null` in the reader schema (checked by a test).
    fn is_required(self) -> bool {
        self.kind() != SlotKind::OptionalText
    }

    fn value_of<'e>(self, event: &'e AuditEvent, event_id: &'e str) -> SlotValue<'e> {
        let optional =
            |text: &'e Option<String>| text.as_deref().map_or(SlotValue::Null, SlotValue::Text);
        match self {
            Slot::EventId => SlotValue::Text(event_id),
            Slot::OccurredAt => SlotValue::Micros(event.occurred_at.timestamp_micros()),
            Slot::TenantId => SlotValue::Text(&event.tenant_id),
            Slot::ActorId => SlotValue::Text(&event.actor.id),
            Slot::ActorType => SlotValue::Actor(event.actor.actor_type),
            Slot::ActorIp => optional(&event.actor.ip),
            Slot::ActorUserAgent => optional(&event.actor.user_agent),
            Slot::Action => SlotValue::Text(&event.action),
            Slot::ResourceType => SlotValue::Text(&event.resource.resource_type),
            Slot::ResourceId => SlotValue::Text(&event.resource.id),
            Slot::Outcome => SlotValue::Outcome(event.outcome),
            Slot::Reason => optional(&event.reason),
            Slot::TraceId => optional(&event.trace_id),
            Slot::Details => optional(&event.details),
            Slot::SessionId => optional(&event.session_id),
        }
    }
}

/// A field of the reader schema: a leaf, or a nested record.
enum ReaderField {
    Leaf(Slot),
    Record(&'static [(&'static str, ReaderField)]),
}

const ACTOR_FIELDS: &[(&str, ReaderField)] = &[
    ("id", ReaderField::Leaf(Slot::ActorId)),
    ("type", ReaderField::Leaf(Slot::ActorType)),
    ("ip", ReaderField::Leaf(Slot::ActorIp)),
    ("user_agent", ReaderField::Leaf(Slot::ActorUserAgent)),
];

const RESOURCE_FIELDS: &[(&str, ReaderField)] = &[
    ("type", ReaderField::Leaf(Slot::ResourceType)),
    ("id", ReaderField::Leaf(Slot::ResourceId)),
];

/// The reader schema (v2) as this module maps it; a test checks it against the embedded text.
const EVENT_FIELDS: &[(&str, ReaderField)] = &[
    ("event_id", ReaderField::Leaf(Slot::EventId)),
    ("occurred_at", ReaderField::Leaf(Slot::OccurredAt)),
    ("tenant_id", ReaderField::Leaf(Slot::TenantId)),
    ("actor", ReaderField::Record(ACTOR_FIELDS)),
    ("action", ReaderField::Leaf(Slot::Action)),
    ("resource", ReaderField::Record(RESOURCE_FIELDS)),
    ("outcome", ReaderField::Leaf(Slot::Outcome)),
    ("reason", ReaderField::Leaf(Slot::Reason)),
    ("trace_id", ReaderField::Leaf(Slot::TraceId)),
    ("details", ReaderField::Leaf(Slot::Details)),
    ("session_id", ReaderField::Leaf(Slot::SessionId)),
];

/// One writer field's part in decoding and encoding.
#[derive(Debug)]
enum Step {
    /// A reader leaf: `conv` reads the writer's bytes into it, `wire` writes it back.
    Slot {
        slot: Slot,
        conv: Conv,
        wire: WireType,
    },
    /// A nested record the reader also has (`actor`, `resource`).
    Group { steps: Vec<Step> },
    /// A writer-only field: skipped when decoding, written from its default when encoding.
    Skip {
        path: String,
        wire: WireType,
        default: Option<Json>,
    },
}

/// How to read a writer value into a reader leaf.
#[derive(Debug)]
enum Conv {
    Text,
    Null,
    Long,
    Int,
    /// Writer symbol index to the reader value; `None` where the reader lacks the symbol.
    Enum(Vec<(String, Option<EnumValue>)>),
    Union(Vec<Conv>),
    /// A union branch the reader cannot take; only an error if a datum selects it.
    Mismatch(String),
}

#[derive(Debug, Clone, Copy)]
enum EnumValue {
    Actor(ActorType),
    Outcome(Outcome),
}

fn compile_plan(
    records: &[RecordDef],
    record_index: usize,
    reader_fields: &[(&'static str, ReaderField)],
    path_prefix: &str,
    covered: &mut Vec<Slot>,
) -> Result<Vec<Step>, String> {
    let mut steps = Vec::with_capacity(records[record_index].fields.len());
    for field in &records[record_index].fields {
        let reader_field = reader_fields
            .iter()
            .find(|(name, _)| *name == field.name)
            .map(|(_, reader_field)| reader_field);
        steps.push(match reader_field {
            Some(ReaderField::Leaf(slot)) => {
                covered.push(*slot);
                Step::Slot {
                    slot: *slot,
                    conv: conv_for(*slot, &field.wire)?,
                    wire: field.wire.clone(),
                }
            }
            Some(ReaderField::Record(sub_fields)) => match field.wire {
                WireType::Record(sub_index) => Step::Group {
                    steps: compile_plan(
                        records,
                        sub_index,
                        sub_fields,
                        &format!("{path_prefix}{}.", field.name),
                        covered,
                    )?,
                },
                ref other => {
                    return Err(format!(
                        "field {} is written as {}, the reader expects a record",
                        field.name,
                        other.describe()
                    ))
                }
            },
            None => Step::Skip {
                path: format!("{path_prefix}{}", field.name),
                wire: field.wire.clone(),
                default: field.default.clone(),
            },
        });
    }
    Ok(steps)
}

fn conv_for(slot: Slot, wire: &WireType) -> Result<Conv, String> {
    match wire {
        WireType::Union(branches) => {
            let convs: Vec<Conv> = branches
                .iter()
                .map(|branch| conv_for_branch(slot, branch).unwrap_or_else(Conv::Mismatch))
                .collect();
            if convs.iter().all(|conv| matches!(conv, Conv::Mismatch(_))) {
                return Err(format!(
                    "field {}: no branch of the writer union can be read",
                    slot.path()
                ));
            }
            Ok(Conv::Union(convs))
        }
        other => conv_for_branch(slot, other)
            .map_err(|reason| format!("field {}: {reason}", slot.path())),
    }
}

fn conv_for_branch(slot: Slot, wire: &WireType) -> Result<Conv, String> {
    let kind = slot.kind();
    match (kind, wire) {
        (SlotKind::Text | SlotKind::OptionalText, WireType::String | WireType::Bytes) => {
            Ok(Conv::Text)
        }
        (SlotKind::OptionalText, WireType::Null) => Ok(Conv::Null),
        (SlotKind::Timestamp, WireType::Long { logical }) => match logical.as_deref() {
            None | Some("timestamp-micros") => Ok(Conv::Long),
            // Resolution would read the number as microseconds and be silently wrong.
            Some(other) => Err(format!(
                "written as {other}, only timestamp-micros is accepted"
            )),
        },
        (SlotKind::Timestamp, WireType::Int) => Ok(Conv::Int),
        (SlotKind::ActorType, WireType::Enum(symbols)) => Ok(Conv::Enum(
            symbols
                .iter()
                .map(|symbol| {
                    let value = ActorType::from_symbol(symbol).map(EnumValue::Actor);
                    (symbol.clone(), value)
                })
                .collect(),
        )),
        (SlotKind::Outcome, WireType::Enum(symbols)) => Ok(Conv::Enum(
            symbols
                .iter()
                .map(|symbol| {
                    let value = Outcome::from_symbol(symbol).map(EnumValue::Outcome);
                    (symbol.clone(), value)
                })
                .collect(),
        )),
        _ => Err(format!(
            "writer type {} cannot be read as {}",
            wire.describe(),
            match kind {
                SlotKind::Text => "string",
                SlotKind::OptionalText => "optional string",
                SlotKind::Timestamp => "timestamp-micros",
                SlotKind::ActorType => "enum ActorType",
                SlotKind::Outcome => "enum Outcome",
            }
        )),
    }
}

/// A value on its way between the wire and `AuditEvent`, borrowing from the payload or the event.
#[derive(Debug, Clone, Copy)]
enum SlotValue<'a> {
    Text(&'a str),
    Null,
    Micros(i64),
    Actor(ActorType),
    Outcome(Outcome),
}

/// The reader leaves filled so far; strings borrow from the payload until the event is built.
#[derive(Default)]
struct Fields<'a> {
    event_id: Option<&'a str>,
    occurred_at: Option<i64>,
    tenant_id: Option<&'a str>,
    actor_id: Option<&'a str>,
    actor_type: Option<ActorType>,
    actor_ip: Option<&'a str>,
    actor_user_agent: Option<&'a str>,
    action: Option<&'a str>,
    resource_type: Option<&'a str>,
    resource_id: Option<&'a str>,
    outcome: Option<Outcome>,
    reason: Option<&'a str>,
    trace_id: Option<&'a str>,
    details: Option<&'a str>,
    session_id: Option<&'a str>,
}

impl<'a> Fields<'a> {
    fn set(&mut self, slot: Slot, value: SlotValue<'a>) -> Result<(), String> {
        let text = match value {
            SlotValue::Text(text) => Some(text),
            SlotValue::Null if slot.kind() == SlotKind::OptionalText => None,
            SlotValue::Micros(micros) if slot == Slot::OccurredAt => {
                self.occurred_at = Some(micros);
                return Ok(());
            }
            SlotValue::Actor(actor_type) if slot == Slot::ActorType => {
                self.actor_type = Some(actor_type);
                return Ok(());
            }
            SlotValue::Outcome(outcome) if slot == Slot::Outcome => {
                self.outcome = Some(outcome);
                return Ok(());
            }
            other => {
                return Err(format!(
                    "the writer value {other:?} does not fit this field"
                ))
            }
        };
        let target = match slot {
            Slot::EventId => &mut self.event_id,
            Slot::TenantId => &mut self.tenant_id,
            Slot::ActorId => &mut self.actor_id,
            Slot::ActorIp => &mut self.actor_ip,
            Slot::ActorUserAgent => &mut self.actor_user_agent,
            Slot::Action => &mut self.action,
            Slot::ResourceType => &mut self.resource_type,
            Slot::ResourceId => &mut self.resource_id,
            Slot::Reason => &mut self.reason,
            Slot::TraceId => &mut self.trace_id,
            Slot::Details => &mut self.details,
            Slot::SessionId => &mut self.session_id,
            Slot::OccurredAt | Slot::ActorType | Slot::Outcome => {
                return Err("the writer value is text, the reader expects another type".to_owned())
            }
        };
        *target = text;
        Ok(())
    }

    fn into_event(self, version: u32) -> Result<AuditEvent, DecodeError> {
        let missing = |slot: Slot| DecodeError::Unresolvable {
            version,
            field: slot.path(),
            reason: "the writer provided no value and the reader field has no default".to_owned(),
        };
        let text =
            |value: Option<&str>, slot: Slot| value.map(str::to_owned).ok_or_else(|| missing(slot));
        let event_id = parse_event_id(self.event_id.ok_or_else(|| missing(Slot::EventId))?)?;
        let micros = self.occurred_at.ok_or_else(|| missing(Slot::OccurredAt))?;
        let occurred_at = DateTime::from_timestamp_micros(micros)
            .ok_or(DecodeError::UnrepresentableTime { micros })?;
        Ok(AuditEvent {
            event_id,
            occurred_at,
            tenant_id: text(self.tenant_id, Slot::TenantId)?,
            actor: Actor {
                id: text(self.actor_id, Slot::ActorId)?,
                actor_type: self.actor_type.ok_or_else(|| missing(Slot::ActorType))?,
                ip: self.actor_ip.map(str::to_owned),
                user_agent: self.actor_user_agent.map(str::to_owned),
            },
            action: text(self.action, Slot::Action)?,
            resource: Resource {
                resource_type: text(self.resource_type, Slot::ResourceType)?,
                id: text(self.resource_id, Slot::ResourceId)?,
            },
            outcome: self.outcome.ok_or_else(|| missing(Slot::Outcome))?,
            reason: self.reason.map(str::to_owned),
            trace_id: self.trace_id.map(str::to_owned),
            details: self.details.map(str::to_owned),
            session_id: self.session_id.map(str::to_owned),
        })
    }
}

/// Parses the `uuid` logical type: the 36-character hyphenated form RFC 4122 specifies.
fn parse_event_id(text: &str) -> Result<Uuid, DecodeError> {
    let quoted = || {
        let shown: String = text.chars().take(QUOTE_CHARS).collect();
        format!("{shown:?}")
    };
    if text.len() != 36 {
        return Err(invalid(
            "event_id",
            format!("{} is not a hyphenated uuid (36 characters)", quoted()),
        ));
    }
    Uuid::try_parse(text)
        .map_err(|err| invalid("event_id", format!("{} is not a uuid: {err}", quoted())))
}

// ---------------------------------------------------------------------------------------------
// Avro binary encoding.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireError {
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
        }
    }
}

enum ReadError {
    Wire(WireError),
    Unresolvable(String),
}

impl From<WireError> for ReadError {
    fn from(err: WireError) -> Self {
        ReadError::Wire(err)
    }
}

/// Reads Avro binary from the front of a slice.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn read_long(&mut self) -> Result<i64, WireError> {
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

    fn take(&mut self, needed: usize) -> Result<&'a [u8], WireError> {
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

    fn read_conv(&mut self, conv: &Conv) -> Result<SlotValue<'a>, ReadError> {
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
    fn skip(
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
                self.take(1)?;
            }
            WireType::Int | WireType::Long { .. } => {
                self.read_long()?;
            }
            WireType::Float => {
                self.take(4)?;
            }
            WireType::Double => {
                self.take(8)?;
            }
            WireType::Bytes | WireType::String => {
                self.read_bytes()?;
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
                        cursor.read_bytes()?;
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
            if count < 0 {
                if count == i64::MIN {
                    return Err(WireError::BlockCount(count));
                }
                let size = self.read_long()?;
                let size = usize::try_from(size).map_err(|_| WireError::NegativeLength(size))?;
                self.take(size)?;
                continue;
            }
            if zero_width {
                continue;
            }
            // Every item takes at least one byte, so a count beyond the remaining bytes is a lie
            // that would otherwise cost a long loop before failing.
            let count = usize::try_from(count).map_err(|_| WireError::BlockCount(count))?;
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

fn write_long(out: &mut Vec<u8>, value: i64) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use chrono::TimeZone;

    /// A change applied to a copy of the sample event.
    type Mutation = Box<dyn Fn(&mut AuditEvent)>;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 14, 12, 0, 0).unwrap()
    }

    fn sample_event() -> AuditEvent {
        AuditEvent {
            event_id: Uuid::parse_str("7f0c3a52-9d1e-4b6a-8c2f-3e5d7a9b1c04").unwrap(),
            occurred_at: now() - Duration::minutes(5) + Duration::microseconds(123_456),
            tenant_id: "tenant-acme".to_owned(),
            actor: Actor {
                id: "user-4711".to_owned(),
                actor_type: ActorType::User,
                ip: Some("203.0.113.7".to_owned()),
                user_agent: Some("Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0".to_owned()),
            },
            action: "order.update".to_owned(),
            resource: Resource {
                resource_type: "order".to_owned(),
                id: "ord-000123".to_owned(),
            },
            outcome: Outcome::Success,
            reason: None,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned()),
            details: Some(r#"{"status":{"from":"pending","to":"shipped"},"items":3}"#.to_owned()),
            session_id: Some("sess-9f8e7d".to_owned()),
        }
    }

    fn without_session(mut event: AuditEvent) -> AuditEvent {
        event.session_id = None;
        event
    }

    fn decoder() -> Decoder {
        Decoder::embedded()
    }

    fn class_of(result: Result<Decoded, DecodeError>) -> ErrorClass {
        result.expect_err("payload must be rejected").class()
    }

    fn validation_class(event: &AuditEvent) -> ErrorClass {
        validate(event, now(), &AcceptWindow::default())
            .expect_err("event must be rejected")
            .class()
    }

    /// An apache-avro `Value` for an event under the v1 or v2 schema, to encode independently of
    /// this module's encoder.
    fn avro_value(event: &AuditEvent, with_session: bool) -> Value {
        let optional = |text: &Option<String>| match text {
            Some(text) => Value::Union(1, Box::new(Value::String(text.clone()))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let mut fields = vec![
            ("event_id".to_owned(), Value::Uuid(event.event_id)),
            (
                "occurred_at".to_owned(),
                Value::TimestampMicros(event.occurred_at.timestamp_micros()),
            ),
            (
                "tenant_id".to_owned(),
                Value::String(event.tenant_id.clone()),
            ),
            (
                "actor".to_owned(),
                Value::Record(vec![
                    ("id".to_owned(), Value::String(event.actor.id.clone())),
                    ("type".to_owned(), Value::Enum(0, "USER".to_owned())),
                    ("ip".to_owned(), optional(&event.actor.ip)),
                    ("user_agent".to_owned(), optional(&event.actor.user_agent)),
                ]),
            ),
            ("action".to_owned(), Value::String(event.action.clone())),
            (
                "resource".to_owned(),
                Value::Record(vec![
                    (
                        "type".to_owned(),
                        Value::String(event.resource.resource_type.clone()),
                    ),
                    ("id".to_owned(), Value::String(event.resource.id.clone())),
                ]),
            ),
            ("outcome".to_owned(), Value::Enum(0, "SUCCESS".to_owned())),
            ("reason".to_owned(), optional(&event.reason)),
            ("trace_id".to_owned(), optional(&event.trace_id)),
            ("details".to_owned(), optional(&event.details)),
        ];
        if with_session {
            fields.push(("session_id".to_owned(), optional(&event.session_id)));
        }
        Value::Record(fields)
    }

    fn confluent(version: u32, datum: &[u8]) -> Vec<u8> {
        let mut payload = vec![0u8];
        payload.extend_from_slice(&version.to_be_bytes());
        payload.extend_from_slice(datum);
        payload
    }

    fn parse(version: u32) -> Schema {
        let text = EMBEDDED_SCHEMAS
            .iter()
            .find(|(candidate, _)| *candidate == version)
            .unwrap()
            .1;
        Schema::parse_str(text).unwrap()
    }

    #[test]
    fn confluent_v2_round_trips_every_field() {
        let decoder = decoder();
        let event = sample_event();
        let payload = decoder.encode_confluent(&event, 2).unwrap();
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 2]);
        let decoded = decoder.decode(&payload).unwrap();
        assert_eq!(decoded.event, event);
        assert_eq!(decoded.writer_version, 2);
        assert_eq!(decoded.wire_format, WireFormat::Confluent);
    }

    #[test]
    fn confluent_v1_is_resolved_with_no_session() {
        let decoder = decoder();
        let event = sample_event();
        let payload = decoder.encode_confluent(&event, 1).unwrap();
        let decoded = decoder.decode(&payload).unwrap();
        assert_eq!(decoded.event, without_session(event));
        assert_eq!(decoded.writer_version, 1);
    }

    #[test]
    fn single_object_v1_and_v2_decode() {
        let decoder = decoder();
        let event = sample_event();
        for version in [1, 2] {
            let payload = decoder.encode_single_object(&event, version).unwrap();
            assert_eq!(&payload[..2], &[0xC3, 0x01]);
            assert_eq!(
                &payload[2..10],
                &decoder.fingerprint(version).unwrap().to_le_bytes()
            );
            let decoded = decoder.decode(&payload).unwrap();
            assert_eq!(decoded.writer_version, version);
            assert_eq!(decoded.wire_format, WireFormat::SingleObject);
            let expected = if version == 1 {
                without_session(event.clone())
            } else {
                event.clone()
            };
            assert_eq!(decoded.event, expected);
        }
    }

    #[test]
    fn datums_encoded_by_apache_avro_decode_identically() {
        let decoder = decoder();
        let event = sample_event();
        for (version, with_session) in [(1, false), (2, true)] {
            let datum =
                apache_avro::to_avro_datum(&parse(version), avro_value(&event, with_session))
                    .unwrap();
            let decoded = decoder.decode(&confluent(version, &datum)).unwrap();
            let expected = if with_session {
                event.clone()
            } else {
                without_session(event.clone())
            };
            assert_eq!(decoded.event, expected);
            // And our encoder produces the very same bytes.
            assert_eq!(
                decoder.encode_confluent(&event, version).unwrap()[5..],
                datum[..]
            );
        }
    }

    #[test]
    fn apache_avro_resolves_our_v1_bytes_like_we_do() {
        let decoder = decoder();
        let event = sample_event();
        let payload = decoder.encode_confluent(&event, 1).unwrap();
        let value =
            apache_avro::from_avro_datum(&parse(1), &mut &payload[5..], Some(&parse(2))).unwrap();
        let Value::Record(fields) = value else {
            panic!("not a record")
        };
        let session = fields
            .iter()
            .find(|(name, _)| name == "session_id")
            .unwrap();
        assert_eq!(session.1, Value::Union(0, Box::new(Value::Null)));
        assert_eq!(fields[2].1, Value::String(event.tenant_id.clone()));
    }

    /// CRC-64-AVRO as written in the specification, kept deliberately naive (no table).
    fn reference_crc64(bytes: &[u8]) -> u64 {
        const EMPTY: u64 = 0xc15d213aa4d7a795;
        let mut fingerprint = EMPTY;
        for &byte in bytes {
            fingerprint ^= u64::from(byte);
            for _ in 0..8 {
                fingerprint = (fingerprint >> 1) ^ (EMPTY & (fingerprint & 1).wrapping_neg());
            }
        }
        fingerprint
    }

    #[test]
    fn crc64_matches_the_specification_test_vectors() {
        // From the Avro project's share/test/data/schema-tests.txt, as signed 64-bit values.
        assert_eq!(crc64_avro(br#""null""#) as i64, 7195948357588979594);
        assert_eq!(crc64_avro(br#""boolean""#) as i64, -6970731678124411036);
        assert_eq!(
            crc64_avro(br#"{"name":"foo","type":"fixed","size":15}"#) as i64,
            1756455273707447556
        );
        let canonical = canonical_form(&serde_json::from_str(READER_SCHEMA).unwrap()).unwrap();
        assert_eq!(
            crc64_avro(canonical.as_bytes()),
            reference_crc64(canonical.as_bytes())
        );
    }

    #[test]
    fn canonical_form_follows_the_specification() {
        let v1: Json = serde_json::from_str(EMBEDDED_SCHEMAS[0].1).unwrap();
        // Written by hand from the spec's rules: logical types vanish and primitives collapse to
        // their simple form, names are full, docs and defaults go.
        let expected = concat!(
            r#"{"name":"io.auditflow.v1.AuditEvent","type":"record","fields":["#,
            r#"{"name":"event_id","type":"string"},{"name":"occurred_at","type":"long"},"#,
            r#"{"name":"tenant_id","type":"string"},"#,
            r#"{"name":"actor","type":{"name":"io.auditflow.v1.Actor","type":"record","fields":["#,
            r#"{"name":"id","type":"string"},"#,
            r#"{"name":"type","type":{"name":"io.auditflow.v1.ActorType","type":"enum","symbols":["USER","SERVICE","SYSTEM"]}},"#,
            r#"{"name":"ip","type":["null","string"]},{"name":"user_agent","type":["null","string"]}]}},"#,
            r#"{"name":"action","type":"string"},"#,
            r#"{"name":"resource","type":{"name":"io.auditflow.v1.Resource","type":"record","fields":["#,
            r#"{"name":"type","type":"string"},{"name":"id","type":"string"}]}},"#,
            r#"{"name":"outcome","type":{"name":"io.auditflow.v1.Outcome","type":"enum","symbols":["SUCCESS","FAILURE","DENIED"]}},"#,
            r#"{"name":"reason","type":["null","string"]},{"name":"trace_id","type":["null","string"]},"#,
            r#"{"name":"details","type":["null","string"]}]}"#
        );
        assert_eq!(canonical_form(&v1).unwrap(), expected);
        let decoder = decoder();
        assert_eq!(
            decoder.fingerprint(1),
            Some(crc64_avro(expected.as_bytes()))
        );
        // Formatting and docs do not change the fingerprint; a field does.
        let reformatted: Json =
            serde_json::from_str(&serde_json::to_string_pretty(&v1).unwrap()).unwrap();
        assert_eq!(canonical_form(&reformatted).unwrap(), expected);
        assert_ne!(decoder.fingerprint(1), decoder.fingerprint(2));
    }

    #[test]
    fn canonical_form_references_named_types_by_full_name() {
        let schema: Json = serde_json::from_str(
            r#"{"type":"record","name":"R","namespace":"a.b","fields":[
                {"name":"x","type":{"type":"fixed","name":"F","size":"04"}},
                {"name":"y","type":"F"},
                {"name":"z","type":{"type":"array","items":{"type":"map","values":"a.b.F"}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_form(&schema).unwrap(),
            r#"{"name":"a.b.R","type":"record","fields":[{"name":"x","type":{"name":"a.b.F","type":"fixed","size":4}},{"name":"y","type":"a.b.F"},{"name":"z","type":{"type":"array","items":{"type":"map","values":"a.b.F"}}}]}"#
        );
    }

    #[test]
    fn single_object_from_apache_avro_writer_decodes() {
        let decoder = decoder();
        let event = sample_event();
        let mut writer =
            apache_avro::GenericSingleObjectWriter::new_with_capacity(&parse(2), 1024).unwrap();
        let mut payload = Vec::new();
        writer
            .write_value(avro_value(&event, true), &mut payload)
            .unwrap();
        // apache-avro 0.21 fingerprints a different canonical form (AVRO-4004) ...
        assert_ne!(
            &payload[2..10],
            &decoder.fingerprint(2).unwrap().to_le_bytes()
        );
        // ... which is still recognised.
        let decoded = decoder.decode(&payload).unwrap();
        assert_eq!(decoded.event, event);
        assert_eq!(decoded.writer_version, 2);
    }

    #[test]
    fn reader_layout_matches_the_embedded_reader_schema() {
        let json: Json = serde_json::from_str(READER_SCHEMA).unwrap();
        let fields = json["fields"].as_array().unwrap();
        let names: Vec<&str> = fields
            .iter()
            .map(|field| field["name"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = EVENT_FIELDS.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, expected);
        for (name, sub_fields) in [("actor", ACTOR_FIELDS), ("resource", RESOURCE_FIELDS)] {
            let field = fields.iter().find(|field| field["name"] == name).unwrap();
            let sub_names: Vec<&str> = field["type"]["fields"]
                .as_array()
                .unwrap()
                .iter()
                .map(|field| field["name"].as_str().unwrap())
                .collect();
            let expected: Vec<&str> = sub_fields.iter().map(|(name, _)| *name).collect();
            assert_eq!(sub_names, expected);
        }
        // Optional leaves are exactly the reader fields whose default is null.
        let mut with_null_default = Vec::new();
        let mut collect = |fields: &Vec<Json>, prefix: &str| {
            for field in fields {
                if field.get("default") == Some(&Json::Null) {
                    with_null_default.push(format!("{prefix}{}", field["name"].as_str().unwrap()));
                }
            }
        };
        collect(fields, "");
        collect(fields[3]["type"]["fields"].as_array().unwrap(), "actor.");
        collect(fields[5]["type"]["fields"].as_array().unwrap(), "resource.");
        let mut optional: Vec<String> = Slot::ALL
            .iter()
            .filter(|slot| !slot.is_required())
            .map(|slot| slot.path().to_owned())
            .collect();
        with_null_default.sort();
        optional.sort();
        assert_eq!(with_null_default, optional);
    }

    const V3_EXTRA_FIELD: &str = r#"{"name":"region","type":["null","string"],"default":null}"#;

    fn v3_schema(extra_fields: &str, extra_actor_fields: &str) -> String {
        let mut json: Json = serde_json::from_str(READER_SCHEMA).unwrap();
        let extras: Vec<Json> = serde_json::from_str(&format!("[{extra_fields}]")).unwrap();
        let actor_extras: Vec<Json> =
            serde_json::from_str(&format!("[{extra_actor_fields}]")).unwrap();
        json["fields"].as_array_mut().unwrap().extend(extras);
        json["fields"][3]["type"]["fields"]
            .as_array_mut()
            .unwrap()
            .extend(actor_extras);
        json.to_string()
    }

    fn decoder_with_v3(schema: &str) -> (tempfile::TempDir, Decoder) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("audit_event.v3.avsc"), schema).unwrap();
        std::fs::write(dir.path().join("README.md"), "not a schema").unwrap();
        let decoder = Decoder::from_dir(dir.path()).unwrap();
        (dir, decoder)
    }

    #[test]
    fn v3_with_an_extra_optional_field_decodes_as_v2() {
        let (_dir, decoder) = decoder_with_v3(&v3_schema(V3_EXTRA_FIELD, ""));
        assert_eq!(decoder.versions(), vec![1, 2, 3]);
        let event = sample_event();
        for payload in [
            decoder.encode_confluent(&event, 3).unwrap(),
            decoder.encode_single_object(&event, 3).unwrap(),
        ] {
            let decoded = decoder.decode(&payload).unwrap();
            assert_eq!(decoded.event, event);
            assert_eq!(decoded.writer_version, 3);
        }
    }

    #[test]
    fn v3_extra_fields_of_every_kind_are_skipped() {
        let extras = r#"
            {"name":"region","type":["null","string"],"default":null},
            {"name":"tags","type":{"type":"array","items":"string"},"default":[]},
            {"name":"counters","type":{"type":"map","values":"long"},"default":{}},
            {"name":"checksum","type":{"type":"fixed","name":"Md5","size":16},"default":"aaaaaaaaaaaaaaaa"},
            {"name":"score","type":"double","default":0.5},
            {"name":"ratio","type":"float","default":1.5},
            {"name":"flag","type":"boolean","default":true},
            {"name":"level","type":{"type":"enum","name":"Level","symbols":["LOW","HIGH"]},"default":"LOW"},
            {"name":"geo","type":{"type":"record","name":"Geo","fields":[
                {"name":"lat","type":"double"},{"name":"nulls","type":{"type":"array","items":"null"}}]},
             "default":{"lat":1.0,"nulls":[]}}"#;
        let actor_extras = r#"{"name":"department","type":["null","string"],"default":null}"#;
        let schema_text = v3_schema(extras, actor_extras);
        let (_dir, decoder) = decoder_with_v3(&schema_text);
        let event = sample_event();

        // Defaults written by our encoder are skipped.
        let ours = decoder.encode_confluent(&event, 3).unwrap();
        assert_eq!(decoder.decode(&ours).unwrap().event, event);

        // Real values written by apache-avro, an independent encoder, are skipped too.
        let v3 = Schema::parse_str(&schema_text).unwrap();
        let Value::Record(mut fields) = avro_value(&event, true) else {
            unreachable!()
        };
        if let Value::Record(actor) = &mut fields[3].1 {
            actor.push((
                "department".to_owned(),
                Value::Union(1, Box::new(Value::String("finance".to_owned()))),
            ));
        }
        fields.extend([
            (
                "region".to_owned(),
                Value::Union(1, Box::new(Value::String("eu-west-1".to_owned()))),
            ),
            (
                "tags".to_owned(),
                Value::Array(vec![
                    Value::String("a".to_owned()),
                    Value::String("bc".to_owned()),
                ]),
            ),
            (
                "counters".to_owned(),
                Value::Map(
                    [
                        ("x".to_owned(), Value::Long(-7)),
                        ("y".to_owned(), Value::Long(1 << 40)),
                    ]
                    .into(),
                ),
            ),
            ("checksum".to_owned(), Value::Fixed(16, vec![9; 16])),
            ("score".to_owned(), Value::Double(2.25)),
            ("ratio".to_owned(), Value::Float(0.25)),
            ("flag".to_owned(), Value::Boolean(false)),
            ("level".to_owned(), Value::Enum(1, "HIGH".to_owned())),
            (
                "geo".to_owned(),
                Value::Record(vec![
                    ("lat".to_owned(), Value::Double(48.1)),
                    (
                        "nulls".to_owned(),
                        Value::Array(vec![Value::Null, Value::Null]),
                    ),
                ]),
            ),
        ]);
        let datum = apache_avro::to_avro_datum(&v3, Value::Record(fields)).unwrap();
        assert!(datum.len() > ours.len() - 5);
        let decoded = decoder.decode(&confluent(3, &datum)).unwrap();
        assert_eq!(decoded.event, event);
        assert_eq!(decoded.writer_version, 3);
    }

    #[test]
    fn fixed_uuid_extra_field_is_skipped_as_sixteen_raw_bytes() {
        // apache-avro 0.21 parses this as its string-backed uuid type; we must not.
        let extras = r#"{"name":"raw_id","type":["null",{"type":"fixed","name":"RawId","size":16,"logicalType":"uuid"}],"default":null}"#;
        let (_dir, decoder) = decoder_with_v3(&v3_schema(extras, ""));
        let event = sample_event();
        let mut payload = decoder.encode_confluent(&event, 3).unwrap();
        // The last field is raw_id = null (branch 0); make it branch 1 with 16 raw bytes.
        assert_eq!(payload.pop(), Some(0));
        payload.push(2);
        payload.extend_from_slice(&[b'b'; 16]);
        assert_eq!(decoder.decode(&payload).unwrap().event, event);
    }

    #[test]
    fn from_dir_adds_the_embedded_schemas_and_rejects_incompatible_writers() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Decoder::from_dir(dir.path()).unwrap().versions(),
            vec![1, 2]
        );

        // A v4 whose tenant_id is an int cannot be read as v2.
        let mut json: Json = serde_json::from_str(READER_SCHEMA).unwrap();
        json["fields"][2]["type"] = Json::String("int".to_owned());
        std::fs::write(dir.path().join("audit_event.v4.avsc"), json.to_string()).unwrap();
        let err = Decoder::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, SchemaLoadError::Incompatible { version: 4, .. }),
            "{err}"
        );

        // A v5 without a required field cannot be read either.
        std::fs::remove_file(dir.path().join("audit_event.v4.avsc")).unwrap();
        let mut json: Json = serde_json::from_str(READER_SCHEMA).unwrap();
        json["fields"].as_array_mut().unwrap().remove(4);
        std::fs::write(dir.path().join("audit_event.v5.avsc"), json.to_string()).unwrap();
        let err = Decoder::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, SchemaLoadError::Incompatible { version: 5, .. }),
            "{err}"
        );

        // Not JSON at all.
        std::fs::write(dir.path().join("audit_event.v5.avsc"), "{").unwrap();
        let err = Decoder::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, SchemaLoadError::Parse { version: 5, .. }),
            "{err}"
        );

        let missing = Decoder::from_dir(dir.path().join("missing")).unwrap_err();
        assert!(matches!(missing, SchemaLoadError::ListDir { .. }));
    }

    #[test]
    fn file_names_map_to_versions() {
        assert_eq!(version_from_file_name("audit_event.v12.avsc"), Some(12));
        assert_eq!(version_from_file_name("audit_event.v.avsc"), None);
        assert_eq!(version_from_file_name("audit_event.v1.avsc.bak"), None);
        assert_eq!(version_from_file_name("audit_event.v+1.avsc"), None);
        assert_eq!(version_from_file_name("other.v1.avsc"), None);
    }

    #[test]
    fn unknown_schema_id_is_a_schema_error() {
        let decoder = decoder();
        let mut payload = decoder.encode_confluent(&sample_event(), 2).unwrap();
        payload[1..5].copy_from_slice(&99u32.to_be_bytes());
        let err = decoder.decode(&payload).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownSchemaId(99)));
        assert_eq!(err.class(), ErrorClass::Schema);
        assert_eq!(
            err.to_string(),
            "unknown schema id 99: no audit_event.v99.avsc is loaded"
        );
    }

    #[test]
    fn unknown_fingerprint_is_a_schema_error() {
        let decoder = decoder();
        let mut payload = decoder.encode_single_object(&sample_event(), 2).unwrap();
        payload[2] ^= 0xff;
        assert_eq!(class_of(decoder.decode(&payload)), ErrorClass::Schema);
    }

    #[test]
    fn bad_magic_empty_and_short_headers_are_decode_errors() {
        let decoder = decoder();
        let payload = decoder.encode_confluent(&sample_event(), 2).unwrap();
        let mut bad_magic = payload.clone();
        bad_magic[0] = 0x01;
        let err = decoder.decode(&bad_magic).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Decode);
        assert!(err.to_string().contains("0x01 0x00 0x00 0x00"), "{err}");
        assert_eq!(
            class_of(decoder.decode(b"{\"json\":true}")),
            ErrorClass::Decode
        );
        assert_eq!(
            class_of(decoder.decode(&[0xC3, 0x02, 0, 0])),
            ErrorClass::Decode
        );
        assert!(matches!(decoder.decode(&[]), Err(DecodeError::Empty)));
        assert_eq!(class_of(decoder.decode(&[])), ErrorClass::Decode);
        assert_eq!(class_of(decoder.decode(&payload[..3])), ErrorClass::Decode);
        assert_eq!(class_of(decoder.decode(&[0xC3])), ErrorClass::Decode);
        assert_eq!(
            class_of(decoder.decode(&[0xC3, 0x01, 1, 2])),
            ErrorClass::Decode
        );
    }

    #[test]
    fn truncated_datum_is_a_decode_error_at_every_length() {
        let decoder = decoder();
        let payload = decoder.encode_confluent(&sample_event(), 2).unwrap();
        for length in 5..payload.len() {
            let err = decoder.decode(&payload[..length]).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Decode, "length {length}: {err}");
        }
        let err = decoder.decode(&payload[..20]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("datum written with schema v2 does not decode at event_id"),
            "{err}"
        );
    }

    #[test]
    fn trailing_bytes_and_corrupt_bytes_are_decode_errors() {
        let decoder = decoder();
        let mut payload = decoder.encode_confluent(&sample_event(), 2).unwrap();
        payload.push(0);
        assert_eq!(class_of(decoder.decode(&payload)), ErrorClass::Decode);

        // A varint that never ends.
        let mut endless = confluent(2, &[]);
        endless.extend([0xff; 12]);
        assert_eq!(class_of(decoder.decode(&endless)), ErrorClass::Decode);

        // A string that is not UTF-8.
        let mut event = sample_event();
        event.tenant_id = "tenant-\u{e9}".to_owned();
        let mut payload = decoder.encode_confluent(&event, 2).unwrap();
        let position = payload
            .windows(2)
            .position(|pair| pair == [0xc3, 0xa9])
            .unwrap();
        payload[position] = 0xff;
        let err = decoder.decode(&payload).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Decode);
        assert!(err.to_string().contains("tenant_id"), "{err}");
    }

    #[test]
    fn bad_uuid_is_a_validation_error() {
        let decoder = decoder();
        let event = sample_event();
        for bad in [
            "not-a-uuid",
            "7f0c3a52-9d1e-4b6a-8c2f-3e5d7a9b1cZZ",
            "7f0c3a529d1e4b6a8c2f3e5d7a9b1c04",
            "",
        ] {
            let payload = decoder
                .encode_confluent_with_event_id(&event, bad, 2)
                .unwrap();
            let err = decoder.decode(&payload).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Validation, "{bad}: {err}");
            assert!(err.to_string().starts_with("event_id is invalid"), "{err}");
        }
        let mut nil = event;
        nil.event_id = Uuid::nil();
        assert_eq!(validation_class(&nil), ErrorClass::Validation);
    }

    #[test]
    fn details_must_be_a_json_object() {
        let decoder = decoder();
        let mut event = sample_event();
        for (details, expected) in [
            ("{not json", "details is invalid: is not valid json"),
            (
                "[1,2,3]",
                "details is invalid: is a json array, not an object",
            ),
            (
                "\"text\"",
                "details is invalid: is a json string, not an object",
            ),
            ("{} {}", "details is invalid: is not valid json"),
            (r#"{"a":"\ud800"}"#, "details is invalid: is not valid json"),
            (
                r#"{"a":"x\u0000y"}"#,
                "details is invalid: contains the escape \\u0000",
            ),
            (
                r#"{"a":["ok",{"k\u0000":1}]}"#,
                "details is invalid: contains the escape \\u0000",
            ),
        ] {
            event.details = Some(details.to_owned());
            let payload = decoder.encode_confluent(&event, 2).unwrap();
            let err = decoder
                .decode_validated(&payload, now(), &AcceptWindow::default())
                .unwrap_err();
            assert_eq!(err.class(), ErrorClass::Validation, "{details}");
            assert!(err.to_string().starts_with(expected), "{details}: {err}");
        }
        // An escaped backslash followed by "u0000" is no NUL, and non-ASCII is fine.
        event.details = Some(r#"{"path":"C:\\u0000","name":"Zoë"}"#.to_owned());
        validate(&event, now(), &AcceptWindow::default()).unwrap();
        event.details = None;
        validate(&event, now(), &AcceptWindow::default()).unwrap();
    }

    #[test]
    fn nul_characters_are_rejected_in_every_string() {
        let base = sample_event();
        let mutations: Vec<(&str, Mutation)> = vec![
            (
                "tenant_id",
                Box::new(|event| event.tenant_id = "acme\0".to_owned()),
            ),
            (
                "actor.id",
                Box::new(|event| event.actor.id = "u\0".to_owned()),
            ),
            (
                "actor.ip",
                Box::new(|event| event.actor.ip = Some("\0".to_owned())),
            ),
            (
                "actor.user_agent",
                Box::new(|event| event.actor.user_agent = Some("a\0".to_owned())),
            ),
            ("action", Box::new(|event| event.action = "a\0b".to_owned())),
            (
                "resource.type",
                Box::new(|event| event.resource.resource_type = "\0".to_owned()),
            ),
            (
                "resource.id",
                Box::new(|event| event.resource.id = "1\0".to_owned()),
            ),
            (
                "reason",
                Box::new(|event| event.reason = Some("\0".to_owned())),
            ),
            (
                "trace_id",
                Box::new(|event| event.trace_id = Some("\0".to_owned())),
            ),
            (
                "details",
                Box::new(|event| event.details = Some("{\"a\":1}\0".to_owned())),
            ),
            (
                "session_id",
                Box::new(|event| event.session_id = Some("s\0".to_owned())),
            ),
        ];
        let decoder = decoder();
        for (field, mutate) in mutations {
            let mut event = base.clone();
            mutate(&mut event);
            let payload = decoder.encode_confluent(&event, 2).unwrap();
            let err = decoder
                .decode_validated(&payload, now(), &AcceptWindow::default())
                .unwrap_err();
            assert_eq!(err.class(), ErrorClass::Validation, "{field}");
            assert!(
                matches!(err, DecodeError::Invalid { field: f, .. } if f == field),
                "{field}: {err}"
            );
            assert!(err.to_string().contains("nul character"), "{err}");
        }
    }

    #[test]
    fn key_fields_must_be_non_empty_and_bounded() {
        let mut event = sample_event();
        event.tenant_id = String::new();
        assert_eq!(validation_class(&event), ErrorClass::Validation);
        let err = validate(&event, now(), &AcceptWindow::default()).unwrap_err();
        assert_eq!(err.to_string(), "tenant_id is invalid: must not be empty");

        let mut event = sample_event();
        event.resource.id = "x".repeat(MAX_KEY_FIELD_BYTES);
        validate(&event, now(), &AcceptWindow::default()).unwrap();
        event.resource.id.push('x');
        let err = validate(&event, now(), &AcceptWindow::default()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Validation);
        assert_eq!(
            err.to_string(),
            "resource.id is invalid: is 513 bytes long, the limit is 512"
        );

        let mut event = sample_event();
        event.action = String::new();
        assert_eq!(validation_class(&event), ErrorClass::Validation);
        let mut event = sample_event();
        event.actor.id = String::new();
        assert_eq!(validation_class(&event), ErrorClass::Validation);
    }

    #[test]
    fn occurred_at_must_be_inside_the_window() {
        let window = AcceptWindow::default();
        let mut event = sample_event();
        event.occurred_at = now() - Duration::days(30) - Duration::microseconds(1);
        let err = validate(&event, now(), &window).unwrap_err();
        assert_eq!(err.class(), ErrorClass::OutOfWindow);
        event.occurred_at = now() + Duration::days(1) + Duration::seconds(1);
        assert_eq!(validation_class(&event), ErrorClass::OutOfWindow);
        // The bounds themselves are inside.
        event.occurred_at = now() - Duration::days(30);
        validate(&event, now(), &window).unwrap();
        event.occurred_at = now() + Duration::days(1);
        validate(&event, now(), &window).unwrap();
        // Through the decoder, too, with an encoded 400-day-old event.
        let decoder = decoder();
        event.occurred_at = now() - Duration::days(400);
        let payload = decoder.encode_confluent(&event, 1).unwrap();
        assert_eq!(
            class_of(decoder.decode_validated(&payload, now(), &window)),
            ErrorClass::OutOfWindow
        );
    }

    #[test]
    fn unrepresentable_timestamp_is_out_of_window() {
        let decoder = decoder();
        let event = sample_event();
        let mut payload = decoder.encode_confluent(&event, 2).unwrap();
        // Replace occurred_at (right after the 37-byte event id) with i64::MAX.
        let start = 5 + 37;
        let mut original = Cursor {
            bytes: &payload[start..],
        };
        original.read_long().unwrap();
        let end = payload.len() - original.bytes.len();
        let mut replacement = Vec::new();
        write_long(&mut replacement, i64::MAX);
        payload.splice(start..end, replacement);
        let err = decoder.decode(&payload).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnrepresentableTime { micros: i64::MAX }),
            "{err}"
        );
        assert_eq!(err.class(), ErrorClass::OutOfWindow);
    }

    #[test]
    fn content_hash_ignores_the_writer_schema_and_sees_every_field() {
        let decoder = decoder();
        let event = without_session(sample_event());
        let from_v1 = decoder
            .decode(&decoder.encode_confluent(&event, 1).unwrap())
            .unwrap();
        let from_v2 = decoder
            .decode(&decoder.encode_single_object(&event, 2).unwrap())
            .unwrap();
        assert_eq!(content_hash(&from_v1.event), content_hash(&from_v2.event));
        assert_eq!(content_hash(&from_v1.event), content_hash(&event));

        let base = content_hash(&event);
        let mutations: Vec<Mutation> = vec![
            Box::new(|event| event.event_id = Uuid::from_u128(1)),
            Box::new(|event| event.occurred_at += Duration::microseconds(1)),
            Box::new(|event| event.tenant_id.push('x')),
            Box::new(|event| event.actor.id.push('x')),
            Box::new(|event| event.actor.actor_type = ActorType::Service),
            Box::new(|event| event.actor.ip = None),
            Box::new(|event| event.actor.user_agent = Some(String::new())),
            Box::new(|event| event.action.push('x')),
            Box::new(|event| event.resource.resource_type.push('x')),
            Box::new(|event| event.resource.id.push('x')),
            Box::new(|event| event.outcome = Outcome::Denied),
            Box::new(|event| event.reason = Some("r".to_owned())),
            Box::new(|event| event.trace_id = None),
            Box::new(|event| event.details = Some("{}".to_owned())),
            Box::new(|event| event.session_id = Some(String::new())),
            // Moving bytes between adjacent fields must change the hash too.
            Box::new(|event| {
                event.resource.resource_type = "orderord".to_owned();
                event.resource.id = "-000123".to_owned();
            }),
        ];
        for (index, mutate) in mutations.iter().enumerate() {
            let mut changed = event.clone();
            mutate(&mut changed);
            assert_ne!(content_hash(&changed), base, "mutation {index}");
        }
    }

    #[test]
    fn enum_symbols_resolve_by_name_not_position() {
        // A writer that lists the symbols in another order.
        let mut json: Json = serde_json::from_str(READER_SCHEMA).unwrap();
        json["fields"][6]["type"]["symbols"] = serde_json::json!(["DENIED", "SUCCESS", "FAILURE"]);
        let schema = json.to_string();
        let (_dir, decoder) = decoder_with_v3(&schema);
        let mut event = sample_event();
        event.outcome = Outcome::Failure;
        let payload = decoder.encode_confluent(&event, 3).unwrap();
        assert_eq!(
            decoder.decode(&payload).unwrap().event.outcome,
            Outcome::Failure
        );
        let v2_payload = decoder.encode_confluent(&event, 2).unwrap();
        assert_ne!(payload[5..], v2_payload[5..]);
    }

    #[test]
    fn error_classes_have_stable_names() {
        assert_eq!(ErrorClass::Decode.as_str(), "decode");
        assert_eq!(ErrorClass::Schema.as_str(), "schema");
        assert_eq!(ErrorClass::Validation.as_str(), "validation");
        assert_eq!(ErrorClass::OutOfWindow.as_str(), "out_of_window");
        assert_eq!(ErrorClass::OutOfWindow.to_string(), "out_of_window");
    }

    /// Measures decode + validate per event. Run with
    /// `cargo test --release --lib decode::tests::decode_benchmark -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark; run it in release"]
    fn decode_benchmark() {
        let decoder = decoder();
        let mut event = sample_event();
        event.details = Some(format!(
            r#"{{"changes":{{"status":{{"from":"pending","to":"shipped"}},"carrier":"dhl","tracking":"{}"}},"items":[{{"sku":"A-1","qty":2}},{{"sku":"B-7","qty":1}}],"note":"{}"}}"#,
            "1Z999AA10123456784",
            "n".repeat(180)
        ));
        let payload = decoder.encode_confluent(&event, 2).unwrap();
        let iterations = 200_000;
        let started = std::time::Instant::now();
        for _ in 0..iterations {
            let decoded = decoder
                .decode_validated(
                    std::hint::black_box(&payload),
                    now(),
                    &AcceptWindow::default(),
                )
                .unwrap();
            std::hint::black_box(decoded);
        }
        let ours = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);

        let started = std::time::Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(decoder.decode(std::hint::black_box(&payload)).unwrap());
        }
        let decode_only = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);

        let (v2, avro_iterations) = (parse(2), 20_000);
        let started = std::time::Instant::now();
        for _ in 0..avro_iterations {
            let value = apache_avro::from_avro_datum(&v2, &mut &payload[5..], Some(&v2)).unwrap();
            std::hint::black_box(value);
        }
        let apache = started.elapsed().as_secs_f64() * 1e6 / f64::from(avro_iterations);
        println!(
            "payload {} bytes: decode+validate {ours:.2} us, decode only {decode_only:.2} us, apache-avro from_avro_datum with reader schema {apache:.2} us",
            payload.len()
        );
    }
}
