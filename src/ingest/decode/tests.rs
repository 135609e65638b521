//! The decoder against apache-avro, the specification's test vectors and every rejection class.

use super::fingerprint::{canonical_form, crc64_avro};
use super::plan::{Slot, ACTOR_FIELDS, EVENT_FIELDS, RESOURCE_FIELDS};
use super::wire::Cursor;
use super::*;
use crate::event::{content_hash, Actor, ActorType, Outcome, Resource};
use crate::tools::generate::encode::write_long;
use apache_avro::types::Value;
use chrono::Duration;
use chrono::TimeZone;
use serde_json::Value as Json;
use std::sync::Arc;
use uuid::Uuid;

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
    validate(event, now(), &Policy::default())
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
    assert_eq!(decoded.writer, WriterId::File(2));
    assert_eq!(decoded.wire_format, WireFormat::Confluent);
}

#[test]
fn confluent_v1_is_resolved_with_no_session() {
    let decoder = decoder();
    let event = sample_event();
    let payload = decoder.encode_confluent(&event, 1).unwrap();
    let decoded = decoder.decode(&payload).unwrap();
    assert_eq!(decoded.event, without_session(event));
    assert_eq!(decoded.writer, WriterId::File(1));
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
        assert_eq!(decoded.writer, WriterId::File(version));
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
            apache_avro::to_avro_datum(&parse(version), avro_value(&event, with_session)).unwrap();
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
    assert_eq!(decoded.writer, WriterId::File(2));
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
    let actor_extras: Vec<Json> = serde_json::from_str(&format!("[{extra_actor_fields}]")).unwrap();
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
        assert_eq!(decoded.writer, WriterId::File(3));
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
    assert_eq!(decoded.writer, WriterId::File(3));
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
            .decode_validated(&payload, now(), &Policy::default())
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Validation, "{details}");
        assert!(err.to_string().starts_with(expected), "{details}: {err}");
    }
    // An escaped backslash followed by "u0000" is no NUL, and non-ASCII is fine.
    event.details = Some(r#"{"path":"C:\\u0000","name":"Zoë"}"#.to_owned());
    validate(&event, now(), &Policy::default()).unwrap();
    event.details = None;
    validate(&event, now(), &Policy::default()).unwrap();
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
            .decode_validated(&payload, now(), &Policy::default())
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
    let err = validate(&event, now(), &Policy::default()).unwrap_err();
    assert_eq!(err.to_string(), "tenant_id is invalid: must not be empty");

    let mut event = sample_event();
    event.resource.id = "x".repeat(Policy::default().sizes.key_field_bytes);
    validate(&event, now(), &Policy::default()).unwrap();
    event.resource.id.push('x');
    let err = validate(&event, now(), &Policy::default()).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Validation);
    assert_eq!(
        err.to_string(),
        "resource.id is invalid: is 513 bytes long, the limit is 512 (AUDITFLOW_MAX_KEY_FIELD_BYTES)"
    );

    let mut event = sample_event();
    event.action = String::new();
    assert_eq!(validation_class(&event), ErrorClass::Validation);
    let mut event = sample_event();
    event.actor.id = String::new();
    assert_eq!(validation_class(&event), ErrorClass::Validation);
}

#[test]
fn every_field_has_a_configurable_size_limit_that_names_its_variable() {
    let policy = Policy {
        sizes: SizeLimits {
            event_bytes: 10_000,
            key_field_bytes: 16,
            text_field_bytes: 32,
            details_bytes: 64,
        },
        ..Policy::default()
    };
    let check = |event: &AuditEvent| validate(event, now(), &policy);
    let mut event = sample_event();
    event.actor.user_agent = None;
    event.details = Some(format!(r#"{{"k":"{}"}}"#, "v".repeat(56)));
    check(&event).expect("64 bytes of details fit");
    event.details = Some(format!(r#"{{"k":"{}"}}"#, "v".repeat(57)));
    let err = check(&event).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Validation);
    assert_eq!(
        err.to_string(),
        "details is invalid: is 65 bytes long, the limit is 64 (AUDITFLOW_MAX_DETAILS_BYTES)"
    );
    let mut event = sample_event();
    event.details = None;
    event.actor.user_agent = None;
    event.reason = Some("r".repeat(33));
    let err = check(&event).unwrap_err();
    assert!(
        err.to_string().contains("AUDITFLOW_MAX_TEXT_FIELD_BYTES"),
        "{err}"
    );
    let mut event = sample_event();
    event.details = None;
    event.actor.user_agent = None;
    event.tenant_id = "t".repeat(17);
    assert!(check(&event)
        .unwrap_err()
        .to_string()
        .contains("AUDITFLOW_MAX_KEY_FIELD_BYTES"));
}

#[test]
fn a_payload_over_the_event_limit_is_refused_before_it_is_read() {
    let decoder = decoder();
    let payload = decoder.encode_confluent(&sample_event(), 2).unwrap();
    let policy = Policy {
        sizes: SizeLimits {
            event_bytes: payload.len() - 1,
            ..SizeLimits::default()
        },
        ..Policy::default()
    };
    let err = decoder
        .decode_validated(&payload, now(), &policy)
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Validation);
    assert_eq!(
        err.to_string(),
        format!(
            "payload is {} bytes, the limit is {} (AUDITFLOW_MAX_EVENT_BYTES)",
            payload.len(),
            payload.len() - 1
        )
    );
    // Even garbage is refused by size first: nothing of it is parsed.
    let garbage = vec![0xFFu8; payload.len()];
    assert!(matches!(
        decoder.decode_validated(&garbage, now(), &policy),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn a_declared_length_beyond_the_payload_allocates_nothing_and_fails_as_truncated() {
    // A string field claiming 2^62 bytes: the reader compares it with what remains and fails,
    // it never sizes a buffer by it.
    let decoder = decoder();
    let mut payload = vec![0, 0, 0, 0, 2];
    let mut huge = Vec::new();
    crate::tools::generate::encode::write_long(&mut huge, 1 << 62);
    payload.extend_from_slice(&huge);
    let err = decoder.decode(&payload).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Decode);
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn occurred_at_must_be_inside_the_window() {
    let window = Policy::default();
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
fn the_content_hash_format_does_not_change() {
    // Pinned: stored rows' `content_hash` tells a redelivery from a reused id across versions.
    // Derived outside this code too (Python's hashlib over the encoding `view_content_hash`
    // writes: tag, id, microseconds, length-prefixed texts, optional ones behind a 0/1 byte).
    let hash = content_hash(&sample_event());
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(hex, "3756ba40b06c773936b94318e7292d53");
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

/// A payload written with local schema `version`, framed with registry id `id`.
fn framed_with_id(decoder: &Decoder, event: &AuditEvent, version: u32, id: u32) -> Vec<u8> {
    let mut payload = decoder.encode_confluent(event, version).unwrap();
    payload[1..5].copy_from_slice(&id.to_be_bytes());
    payload
}

fn registry_decoder() -> (Decoder, Arc<RegistryCache>) {
    let cache = Arc::new(RegistryCache::new(100, std::time::Duration::from_secs(30)).unwrap());
    (decoder().with_registry(Arc::clone(&cache)), cache)
}

#[test]
fn with_a_registry_confluent_ids_are_registry_ids_not_file_versions() {
    let (decoder, cache) = registry_decoder();
    let event = sample_event();
    // Id 2 is a local file version, but with a registry it means the registry's id 2.
    let payload = framed_with_id(&decoder, &event, 2, 2);
    let err = decoder.decode(&payload).unwrap_err();
    assert!(matches!(err, DecodeError::NotFetched(2)), "{err:?}");
    assert!(!err.is_permanent());

    cache
        .install(
            2,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/schemas/audit_event.v1.avsc"
            )),
        )
        .unwrap();
    cache.install(100_023, READER_SCHEMA).unwrap();
    // Registry id 2 is v1's text: the v1 bytes written under it decode, without session_id.
    let v1_payload = framed_with_id(&decoder, &event, 1, 2);
    let decoded = decoder.decode(&v1_payload).unwrap();
    assert_eq!(decoded.writer, WriterId::Registry(2));
    assert_eq!(decoded.event, without_session(event.clone()));
    let v2_payload = framed_with_id(&decoder, &event, 2, 100_023);
    let decoded = decoder
        .decode_validated(&v2_payload, now(), &Policy::default())
        .unwrap();
    assert_eq!(decoded.writer, WriterId::Registry(100_023));
    assert_eq!(decoded.event, event);
    assert_eq!(decoded.writer.file_version(), None);
    assert_eq!(decoded.writer.number(), 100_023);
    assert_eq!(cache.num_lookups(), 3);
    assert_eq!(cache.num_misses(), 1);
}

#[test]
fn registry_verdicts_are_permanent_schema_errors_naming_the_id() {
    let (decoder, cache) = registry_decoder();
    let event = sample_event();
    cache.remember_not_found(4_812);
    let err = decoder
        .decode(&framed_with_id(&decoder, &event, 2, 4_812))
        .unwrap_err();
    assert!(matches!(err, DecodeError::NotRegistered(4_812)), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(err.class(), ErrorClass::Schema);
    assert!(err.to_string().contains("4812"), "{err}");

    let mut incompatible: Json = serde_json::from_str(READER_SCHEMA).unwrap();
    assert_eq!(incompatible["fields"][1]["name"], "occurred_at");
    incompatible["fields"][1]["type"] = Json::from("string");
    let incompatible = incompatible.to_string();
    let reason = cache.install(17, &incompatible).unwrap_err();
    assert!(reason.contains("occurred_at"), "{reason}");
    let err = decoder
        .decode(&framed_with_id(&decoder, &event, 2, 17))
        .unwrap_err();
    assert!(
        matches!(err, DecodeError::RegistrySchemaUnusable { id: 17, .. }),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Schema);
    assert!(err.to_string().contains("occurred_at"), "{err}");

    // A bad datum under a registry schema names the registry id.
    cache.install(18, READER_SCHEMA).unwrap();
    let mut truncated = framed_with_id(&decoder, &event, 2, 18);
    truncated.truncate(20);
    let err = decoder.decode(&truncated).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Decode);
    assert!(err.to_string().contains("registry id 18"), "{err}");
}

#[test]
fn single_object_payloads_resolve_against_schemas_fetched_so_far() {
    let (decoder, cache) = registry_decoder();
    let v3 = v3_schema(V3_EXTRA_FIELD, "");
    let (_dir, v3_decoder) = decoder_with_v3(&v3);
    let event = sample_event();
    let payload = v3_decoder.encode_single_object(&event, 3).unwrap();
    let err = decoder.decode(&payload).unwrap_err();
    assert!(matches!(err, DecodeError::UnknownFingerprint(_)), "{err:?}");
    cache.install(30_001, &v3).unwrap();
    let decoded = decoder.decode(&payload).unwrap();
    assert_eq!(decoded.writer, WriterId::Registry(30_001));
    assert_eq!(decoded.wire_format, WireFormat::SingleObject);
    assert_eq!(decoded.event, event);
    // Local files still come first.
    let local = decoder.encode_single_object(&event, 2).unwrap();
    assert_eq!(decoder.decode(&local).unwrap().writer, WriterId::File(2));
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
            .decode_validated(std::hint::black_box(&payload), now(), &Policy::default())
            .unwrap();
        std::hint::black_box(decoded);
    }
    let ours = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);

    let started = std::time::Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(decoder.decode(std::hint::black_box(&payload)).unwrap());
    }
    let decode_only = started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);

    // The same payload through a registry-backed decoder, warm (the id is cached): the
    // registry must add nothing measurable per event. Rounds alternate so drift hits both.
    let (registry_decoder, cache) = registry_decoder();
    cache.install(100_023, READER_SCHEMA).unwrap();
    let registry_payload = framed_with_id(&decoder, &event, 2, 100_023);
    let time_per_event = |decoder: &Decoder, payload: &[u8]| {
        let started = std::time::Instant::now();
        for _ in 0..iterations {
            let decoded = decoder
                .decode_validated(std::hint::black_box(payload), now(), &Policy::default())
                .unwrap();
            std::hint::black_box(decoded);
        }
        started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
    };
    let (mut local_runs, mut registry_runs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        local_runs.push(time_per_event(&decoder, &payload));
        registry_runs.push(time_per_event(&registry_decoder, &registry_payload));
    }
    let median = |runs: &mut Vec<f64>| {
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    };
    let (local, registry) = (median(&mut local_runs), median(&mut registry_runs));
    println!(
        "decode+validate per event, median of 5 x {iterations}: local files {local:.3} us, registry warm {registry:.3} us ({:+.1}%)",
        (registry / local - 1.0) * 100.0
    );

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
