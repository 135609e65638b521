//! Turns a Kafka message payload into a validated [`AuditEvent`].
//!
//! Two wire formats are accepted, told apart per message by their first bytes:
//!
//! - Confluent framing: `0x00`, a 4-byte big-endian schema id, then the Avro binary datum. Without a
//!   registry, schema id `N` means `schemas/audit_event.vN.avsc`. With one
//!   (`AUDITFLOW_SCHEMA_REGISTRY_URL`), it is the registry's id, looked up in the [`RegistryCache`]
//!   that [`registry`] fills; an id not cached yet is [`DecodeError::NotFetched`], the one
//!   error that is not the payload's fault: the caller fetches the schema and decodes again.
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
//!
//! Parts: this file holds the [`Decoder`] (framing, the schema set, errors); `types` compiles
//! schema JSON into Avro types, `schema` checks and compiles a writer schema; `plan` maps writer fields onto the reader's; `wire` reads Avro
//! binary; `fingerprint` computes canonical forms; `rules` holds the content rules
//! ([`validate`]). The encoder the load generator uses lives in `tools::generate::encode`.
//!
//! Pure: decoding touches no network and no file after the [`Decoder`] is built; [`registry`]
//! (the HTTP client of a schema registry) is the only part that talks to the network, and only
//! to fill the cache, off the decode path.

pub mod cache;
mod fingerprint;
pub(crate) mod plan;
pub mod registry;

mod rules;
pub(crate) mod schema;
#[cfg(test)]
mod tests;
pub(crate) mod types;
mod wire;

pub use cache::RegistryCache;
pub use rules::{validate, validate_view, AcceptWindow, Policy, SizeLimits};
pub(crate) use schema::WriterSchema;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apache_avro::Schema;
use chrono::{DateTime, Utc};

use crate::event::{AuditEvent, EventView};

/// The schema version every payload is resolved into; its text is embedded in the binary.
pub const READER_VERSION: u32 = 2;

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

/// The text of an embedded schema (`schemas/audit_event.v1.avsc`, `.v2.avsc`), for registering
/// it with a schema registry.
pub fn embedded_schema(version: u32) -> Option<&'static str> {
    EMBEDDED_SCHEMAS
        .iter()
        .find(|(candidate, _)| *candidate == version)
        .map(|(_, text)| *text)
}

/// Whether data written with `schema` (Avro JSON) can be resolved into the reader schema, by the
/// same check and compilation the sink runs; why not when it cannot.
pub fn check_resolvable(schema: &str) -> Result<(), String> {
    let reader = Schema::parse_str(READER_SCHEMA).map_err(|err| err.to_string())?;
    WriterSchema::load(WriterId::Registry(0), schema, &reader)
        .map(|_| ())
        .map_err(cache::load_error_reason)
}

pub(crate) const CONFLUENT_MAGIC: u8 = 0x00;
pub(crate) const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const CONFLUENT_HEADER_LEN: usize = 5;
const SINGLE_OBJECT_HEADER_LEN: usize = 10;

/// Nesting depth past which a writer-only field is refused instead of skipped. Recursive schemas
/// would otherwise let a crafted payload exhaust the stack.
pub(crate) const MAX_SKIP_DEPTH: usize = 64;

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

/// Which writer schema a payload was decoded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriterId {
    /// `schemas/audit_event.vN.avsc` (or the embedded v1 and v2): the Confluent id is the file's
    /// version.
    File(u32),
    /// The id a schema registry gave the schema (any value up to 2^31-1).
    Registry(u32),
}

impl WriterId {
    /// The file version or the registry id.
    pub fn number(self) -> u32 {
        match self {
            WriterId::File(number) | WriterId::Registry(number) => number,
        }
    }

    /// The file version, when the schema came from a file.
    pub fn file_version(self) -> Option<u32> {
        match self {
            WriterId::File(version) => Some(version),
            WriterId::Registry(_) => None,
        }
    }
}

impl fmt::Display for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriterId::File(version) => write!(f, "v{version}"),
            WriterId::Registry(id) => write!(f, "registry id {id}"),
        }
    }
}

/// Why a payload was refused. Every variant but [`DecodeError::NotFetched`] is permanent for that
/// payload: retrying it gives the same answer, so the caller dead-letters it under
/// [`DecodeError::class`] ([`DecodeError::is_permanent`] tells which).
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
    /// Not a verdict: the schema registry has not been asked about this id yet (or its 404 is no
    /// longer remembered). The caller fetches it and decodes the payload again.
    #[error("schema id {0} has not been fetched from the schema registry yet")]
    NotFetched(u32),
    /// The schema registry does not know this id (404, error code 40403).
    #[error("schema id {0} is not registered in the schema registry (404, error code 40403)")]
    NotRegistered(u32),
    /// The registry's schema for this id cannot be read with the reader schema (or is not an
    /// Avro schema at all).
    #[error(
        "writer schema id {id} from the schema registry cannot be read with reader schema v2: {reason}"
    )]
    RegistrySchemaUnusable {
        /// The registry id.
        id: u32,
        /// Why not.
        reason: String,
    },
    /// A single-object fingerprint that matches no loaded schema.
    #[error("unknown writer schema fingerprint {0:#018x}")]
    UnknownFingerprint(u64),
    /// The datum does not decode with its writer schema (truncated, bad varint, bad UTF-8, trailing
    /// bytes, out-of-range union or enum index).
    #[error("datum written with schema {writer} does not decode at {field}: {reason}")]
    Datum {
        /// The writer schema.
        writer: WriterId,
        /// The field being read, as a dotted path.
        field: String,
        /// What was wrong with the bytes.
        reason: String,
    },
    /// The datum decoded, but its value has no place in the reader schema (a writer enum symbol the
    /// reader lacks, a null for a required field).
    #[error("datum written with schema {writer} cannot be resolved at {field}: {reason}")]
    Unresolvable {
        /// The writer schema.
        writer: WriterId,
        /// The reader field, as a dotted path.
        field: &'static str,
        /// Why the value cannot be resolved.
        reason: String,
    },
    /// The payload is larger than `AUDITFLOW_MAX_EVENT_BYTES`; nothing of it was read.
    #[error("payload is {len} bytes, the limit is {limit} (AUDITFLOW_MAX_EVENT_BYTES)")]
    TooLarge {
        /// The payload's size.
        len: usize,
        /// The limit.
        limit: usize,
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
    /// False only for [`DecodeError::NotFetched`]: the payload is not at fault and must not be
    /// dead-lettered; everything else gives the same answer however often it is retried.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DecodeError::NotFetched(_))
    }

    /// Returns the class written to the dead-letter header.
    pub fn class(&self) -> ErrorClass {
        match self {
            DecodeError::Empty
            | DecodeError::UnknownFormat { .. }
            | DecodeError::TruncatedHeader { .. }
            | DecodeError::Datum { .. } => ErrorClass::Decode,
            DecodeError::UnknownSchemaId(_)
            | DecodeError::NotFetched(_)
            | DecodeError::NotRegistered(_)
            | DecodeError::RegistrySchemaUnusable { .. }
            | DecodeError::UnknownFingerprint(_)
            | DecodeError::Unresolvable { .. } => ErrorClass::Schema,
            DecodeError::Invalid { .. } | DecodeError::TooLarge { .. } => ErrorClass::Validation,
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

/// A decoded event and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The event, resolved into the reader schema.
    pub event: AuditEvent,
    /// The schema the producer wrote with.
    pub writer: WriterId,
    /// The framing the payload arrived in.
    pub wire_format: WireFormat,
    /// The canonical JSON of `event.details`, once validated ([`Decoder::decode_validated`]):
    /// the hash chain's form of it, written by the check that judged it.
    pub details_canonical: Option<Vec<u8>>,
}

/// A decoded event whose text borrows from the payload: what the consumer validates, hashes and
/// encodes, without copying a field out of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedView<'p> {
    /// The event, resolved into the reader schema.
    pub event: EventView<'p>,
    /// The schema the producer wrote with.
    pub writer: WriterId,
    /// The framing the payload arrived in.
    pub wire_format: WireFormat,
    /// See [`Decoded::details_canonical`].
    pub details_canonical: Option<Vec<u8>>,
}

impl DecodedView<'_> {
    /// The decoded event with its text copied out of the payload.
    pub fn into_decoded(self) -> Decoded {
        Decoded {
            event: self.event.to_event(),
            writer: self.writer,
            wire_format: self.wire_format,
            details_canonical: self.details_canonical,
        }
    }
}

/// The known writer schemas, compiled against the reader schema. Built once and shared; decoding
/// takes `&self` and is safe from many threads.
#[derive(Debug)]
pub struct Decoder {
    writers: Vec<WriterSchema>,
    by_version: HashMap<u32, usize>,
    by_fingerprint: HashMap<u64, usize>,
    /// With a registry: where Confluent ids are looked up instead of `by_version`.
    registry: Option<Arc<RegistryCache>>,
}

/// The writer a payload names: a local file's, or one from the registry cache (an `Arc`, so the
/// cache's lock is not held while the datum is read).
enum Writer<'d> {
    Local(&'d WriterSchema),
    Registry(Arc<WriterSchema>),
}

impl Deref for Writer<'_> {
    type Target = WriterSchema;

    fn deref(&self) -> &WriterSchema {
        match self {
            Writer::Local(writer) => writer,
            Writer::Registry(writer) => writer,
        }
    }
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
            registry: None,
        };
        for (version, text) in sources {
            let (writer, legacy_fingerprint) =
                WriterSchema::load(WriterId::File(version), &text, &reader)?;
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

    /// Looks Confluent ids up in `cache` (filled from a schema registry) instead of the local
    /// files. Single-object payloads still resolve against the local files first, then against
    /// every schema the cache holds.
    pub fn with_registry(mut self, cache: Arc<RegistryCache>) -> Self {
        self.registry = Some(cache);
        self
    }

    /// The registry cache, when Confluent ids are looked up in a registry.
    pub fn registry(&self) -> Option<&Arc<RegistryCache>> {
        self.registry.as_ref()
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
        self.decode_view(payload).map(DecodedView::into_decoded)
    }

    /// [`Decoder::decode`], the event's text borrowing from `payload`.
    pub fn decode_view<'p>(&self, payload: &'p [u8]) -> Result<DecodedView<'p>, DecodeError> {
        let (writer, wire_format, datum) = self.frame(payload)?;
        let event = writer.read_event(datum)?;
        Ok(DecodedView {
            event,
            writer: writer.id,
            wire_format,
            details_canonical: None,
        })
    }

    /// Refuses a payload over the size limit before reading any of it, then decodes it and
    /// applies [`validate`].
    pub fn decode_validated(
        &self,
        payload: &[u8],
        now: DateTime<Utc>,
        policy: &Policy,
    ) -> Result<Decoded, DecodeError> {
        self.decode_view_validated(payload, now, policy)
            .map(DecodedView::into_decoded)
    }

    /// [`Decoder::decode_validated`], the event's text borrowing from `payload`: the one call the
    /// consumer needs.
    pub fn decode_view_validated<'p>(
        &self,
        payload: &'p [u8],
        now: DateTime<Utc>,
        policy: &Policy,
    ) -> Result<DecodedView<'p>, DecodeError> {
        if payload.len() > policy.sizes.event_bytes {
            return Err(DecodeError::TooLarge {
                len: payload.len(),
                limit: policy.sizes.event_bytes,
            });
        }
        let mut decoded = self.decode_view(payload)?;
        decoded.details_canonical = validate_view(&decoded.event, now, policy)?;
        Ok(decoded)
    }

    pub(crate) fn writer(&self, version: u32) -> Option<&WriterSchema> {
        self.by_version
            .get(&version)
            .map(|&index| &self.writers[index])
    }

    /// Splits a payload into its writer schema, framing and datum.
    fn frame<'p>(
        &self,
        payload: &'p [u8],
    ) -> Result<(Writer<'_>, WireFormat, &'p [u8]), DecodeError> {
        match payload {
            [] => Err(DecodeError::Empty),
            [CONFLUENT_MAGIC, ..] => {
                let (header, datum) =
                    split_header(payload, WireFormat::Confluent, CONFLUENT_HEADER_LEN)?;
                let id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                let writer = match &self.registry {
                    Some(cache) => Writer::Registry(cache.writer(id)?),
                    None => Writer::Local(self.writer(id).ok_or(DecodeError::UnknownSchemaId(id))?),
                };
                Ok((writer, WireFormat::Confluent, datum))
            }
            [0xC3] | [0xC3, 0x01, ..] => {
                let (header, datum) =
                    split_header(payload, WireFormat::SingleObject, SINGLE_OBJECT_HEADER_LEN)?;
                let mut fingerprint_bytes = [0u8; 8];
                fingerprint_bytes.copy_from_slice(&header[2..]);
                let fingerprint = u64::from_le_bytes(fingerprint_bytes);
                let writer = match self.by_fingerprint.get(&fingerprint) {
                    Some(&index) => Writer::Local(&self.writers[index]),
                    None => self
                        .registry
                        .as_ref()
                        .and_then(|cache| cache.writer_by_fingerprint(fingerprint))
                        .map(Writer::Registry)
                        .ok_or(DecodeError::UnknownFingerprint(fingerprint))?,
                };
                Ok((writer, WireFormat::SingleObject, datum))
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
