//! The hand-written decoder against apache-avro, on random and mutated payloads: for every datum,
//! both must make the same accept/reject decision and, when they accept, read the same values.
//!
//! Writers: v1, v2 and a v3 with writer-only fields of every Avro kind (arrays, maps, nested
//! records, unions, fixed, enums, bytes, floats), which exercise the decoder's skipping. Payloads:
//! valid events with random content (encoded by apache-avro, not by auditflow), the same with 1-4
//! random mutations (bit flips, byte changes, insertions, deletions, truncation, a varint replaced
//! by an extreme one), and random bytes.
//!
//! The decoder is deliberately stricter than apache-avro in four documented ways, which the
//! comparison applies before comparing: the `uuid` event id must be the 36-character hyphenated
//! form, `occurred_at` must be a representable time (apache-avro reads the event id as a plain
//! string here, so both rules are checked on apache-avro's values), a varint may not carry more
//! than 64 bits (apache-avro drops the excess bits of a tenth byte; the comparison checks that the
//! payload holds such a varint), and an array or map block written with a negative count must
//! hold exactly the number of bytes it declares (apache-avro reads the size and ignores it; the
//! comparison checks that apache-avro's own encoding of what it read differs from the payload,
//! which it does when the payload used such a block).
//!
//! `AUDITFLOW_FUZZ_CASES` sets the number of cases (default 20,000, a few seconds in a debug
//! build); `AUDITFLOW_FUZZ_SEED` the seed (default: a fixed one, printed). For a long run:
//! `AUDITFLOW_FUZZ_CASES=5000000 cargo test --release --test decode_differential -- --nocapture`.

use apache_avro::types::Value;
use apache_avro::Schema;
use auditflow::event::{ActorType, AuditEvent, Outcome};
use auditflow::ingest::decode::{DecodeError, Decoder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value as Json;

/// Writer-only fields of every kind, added to v2 to make v3.
const V3_EXTRA_FIELDS: &str = r#"[
  {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
  {"name": "labels", "type": {"type": "map", "values": ["null", "long", "string"]}, "default": {}},
  {"name": "origin", "type": ["null", {"type": "record", "name": "Origin", "fields": [
      {"name": "region", "type": "string"},
      {"name": "zone", "type": {"type": "enum", "name": "Zone", "symbols": ["A", "B", "C"]}},
      {"name": "weight", "type": "double"},
      {"name": "ratio", "type": "float"},
      {"name": "flag", "type": "boolean"},
      {"name": "blob", "type": "bytes"},
      {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
      {"name": "hops", "type": {"type": "array", "items": "int"}}
  ]}], "default": null},
  {"name": "sequence", "type": "long", "default": 0}
]"#;

struct Writer {
    /// The Confluent schema id the decoder knows it by.
    id: u32,
    /// The schema as the decoder loads it.
    text: String,
    /// The same with the event id's `uuid` logical type removed, for apache-avro.
    plain: Schema,
    /// Whether it has v2's `session_id` and v3's extra fields.
    has_session: bool,
    has_extras: bool,
}

fn without_uuid_logical_type(text: &str) -> String {
    let mut json: Json = serde_json::from_str(text).unwrap();
    json["fields"][0]["type"] = Json::String("string".into());
    json.to_string()
}

fn writers(dir: &std::path::Path) -> (Vec<Writer>, Schema) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");
    let v1 = std::fs::read_to_string(format!("{root}/audit_event.v1.avsc")).unwrap();
    let v2 = std::fs::read_to_string(format!("{root}/audit_event.v2.avsc")).unwrap();
    let mut v3: Json = serde_json::from_str(&v2).unwrap();
    let extras: Vec<Json> = serde_json::from_str(V3_EXTRA_FIELDS).unwrap();
    v3["fields"].as_array_mut().unwrap().extend(extras);
    let v3 = v3.to_string();
    std::fs::write(dir.join("audit_event.v3.avsc"), &v3).unwrap();
    let reader = Schema::parse_str(&without_uuid_logical_type(&v2)).unwrap();
    let writer = |id, text: &str, has_session, has_extras| Writer {
        id,
        text: text.to_owned(),
        plain: Schema::parse_str(&without_uuid_logical_type(text)).unwrap(),
        has_session,
        has_extras,
    };
    (
        vec![
            writer(1, &v1, false, false),
            writer(2, &v2, true, false),
            writer(3, &v3, true, true),
        ],
        reader,
    )
}

fn random_text(rng: &mut StdRng) -> String {
    const ALPHABET: &[&str] = &[
        "a", "Z", "0", "-", " ", "\t", "\n", "\\", "\"", "é", "ß", "中", "🦀", "\u{0}", "{", "}",
    ];
    let len = match rng.random_range(0..10) {
        0 => 0,
        1 => rng.random_range(100..600),
        _ => rng.random_range(1..24),
    };
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
        .collect()
}

fn random_event_id(rng: &mut StdRng) -> String {
    let uuid = uuid::Uuid::from_u128(rng.random());
    match rng.random_range(0..12) {
        0 => uuid.simple().to_string(),
        1 => uuid.braced().to_string(),
        2 => uuid.hyphenated().to_string().to_uppercase(),
        3 => random_text(rng),
        4 => format!("{}x", &uuid.hyphenated().to_string()[..35]),
        _ => uuid.hyphenated().to_string(),
    }
}

fn optional(rng: &mut StdRng) -> Value {
    if rng.random_bool(0.3) {
        Value::Union(0, Box::new(Value::Null))
    } else {
        Value::Union(1, Box::new(Value::String(random_text(rng))))
    }
}

fn random_micros(rng: &mut StdRng) -> i64 {
    match rng.random_range(0..20) {
        0 => rng.random(),
        1 => i64::MIN,
        2 => i64::MAX,
        _ => rng.random_range(0..4_102_444_800_000_000),
    }
}

/// A random event as apache-avro values, for `writer`.
fn random_record(rng: &mut StdRng, writer: &Writer) -> Value {
    let enum_value = |rng: &mut StdRng, symbols: &[&str]| {
        let index = rng.random_range(0..symbols.len());
        Value::Enum(index as u32, symbols[index].to_owned())
    };
    let mut fields = vec![
        ("event_id".to_owned(), Value::String(random_event_id(rng))),
        ("occurred_at".to_owned(), Value::Long(random_micros(rng))),
        ("tenant_id".to_owned(), Value::String(random_text(rng))),
        (
            "actor".to_owned(),
            Value::Record(vec![
                ("id".into(), Value::String(random_text(rng))),
                (
                    "type".into(),
                    enum_value(rng, &["USER", "SERVICE", "SYSTEM"]),
                ),
                ("ip".into(), optional(rng)),
                ("user_agent".into(), optional(rng)),
            ]),
        ),
        ("action".to_owned(), Value::String(random_text(rng))),
        (
            "resource".to_owned(),
            Value::Record(vec![
                ("type".into(), Value::String(random_text(rng))),
                ("id".into(), Value::String(random_text(rng))),
            ]),
        ),
        (
            "outcome".to_owned(),
            enum_value(rng, &["SUCCESS", "FAILURE", "DENIED"]),
        ),
        ("reason".to_owned(), optional(rng)),
        ("trace_id".to_owned(), optional(rng)),
        ("details".to_owned(), optional(rng)),
    ];
    if writer.has_session {
        fields.push(("session_id".to_owned(), optional(rng)));
    }
    if writer.has_extras {
        let tags = (0..rng.random_range(0..4))
            .map(|_| Value::String(random_text(rng)))
            .collect();
        let labels = (0..rng.random_range(0..4))
            .map(|i| {
                let value = match rng.random_range(0..3) {
                    0 => Value::Union(0, Box::new(Value::Null)),
                    1 => Value::Union(1, Box::new(Value::Long(rng.random()))),
                    _ => Value::Union(2, Box::new(Value::String(random_text(rng)))),
                };
                (format!("k{i}"), value)
            })
            .collect();
        let origin = if rng.random_bool(0.5) {
            Value::Union(0, Box::new(Value::Null))
        } else {
            Value::Union(
                1,
                Box::new(Value::Record(vec![
                    ("region".into(), Value::String(random_text(rng))),
                    ("zone".into(), enum_value(rng, &["A", "B", "C"])),
                    ("weight".into(), Value::Double(rng.random())),
                    ("ratio".into(), Value::Float(rng.random())),
                    ("flag".into(), Value::Boolean(rng.random())),
                    (
                        "blob".into(),
                        Value::Bytes((0..rng.random_range(0..8)).map(|_| rng.random()).collect()),
                    ),
                    ("digest".into(), Value::Fixed(4, vec![1, 2, 3, 4])),
                    (
                        "hops".into(),
                        Value::Array(
                            (0..rng.random_range(0..5))
                                .map(|_| Value::Int(rng.random()))
                                .collect(),
                        ),
                    ),
                ])),
            )
        };
        fields.push(("tags".to_owned(), Value::Array(tags)));
        fields.push(("labels".to_owned(), Value::Map(labels)));
        fields.push(("origin".to_owned(), origin));
        fields.push(("sequence".to_owned(), Value::Long(rng.random())));
    }
    Value::Record(fields)
}

/// Changes a valid datum in 1-4 places.
fn mutate(rng: &mut StdRng, mut datum: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=4) {
        if datum.is_empty() {
            datum.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..datum.len());
        match rng.random_range(0..7) {
            0 => datum[at] ^= 1 << rng.random_range(0..8),
            1 => datum[at] = rng.random(),
            2 => {
                datum.remove(at);
            }
            3 => datum.insert(at, rng.random()),
            4 => datum.truncate(at),
            5 => {
                // An extreme varint: a huge length, a negative one, or an overlong encoding.
                let replacement: &[u8] = match rng.random_range(0..3) {
                    0 => &[0xFE, 0xFF, 0xFF, 0xFF, 0x0F],
                    1 => &[0x01],
                    _ => &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
                };
                datum.splice(at..at, replacement.iter().copied());
            }
            _ => {
                let end = (at + rng.random_range(1..16)).min(datum.len());
                let copy = datum[at..end].to_vec();
                datum.splice(at..at, copy);
            }
        }
    }
    datum
}

/// Bytes appended after a datum for apache-avro: 0xFF is a varint continuation and invalid
/// UTF-8, so a read that runs past the datum's end fails or ends beyond it.
const SENTINEL: [u8; 16] = [0xFF; 16];

/// apache-avro's reading of `datum` into the reader schema; a datum must be consumed whole.
///
/// apache-avro 0.21 answers `Null` for a string cut short by the end of its input, and a null
/// union branch for a union index cut short, instead of an error (`decode.rs`, the
/// `UnexpectedEof` arms): read alone, a truncated datum would "decode". Reading it with
/// [`SENTINEL`] after it turns such a read into one that ends past the datum, which counts as a
/// rejection here.
fn avro_read(writer: &Schema, reader: &Schema, datum: &[u8]) -> Option<Value> {
    let mut padded = datum.to_vec();
    padded.extend_from_slice(&SENTINEL);
    let mut cursor = std::io::Cursor::new(&padded);
    let value = apache_avro::from_avro_datum(writer, &mut cursor, Some(reader)).ok()?;
    (cursor.position() as usize == datum.len()).then_some(value)
}

fn field<'v>(fields: &'v [(String, Value)], name: &str) -> &'v Value {
    &fields
        .iter()
        .find(|(key, _)| key == name)
        .unwrap_or_else(|| panic!("no field {name}"))
        .1
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Union(_, inner) => text(inner),
        Value::Null => None,
        other => panic!("not text: {other:?}"),
    }
}

fn symbol(value: &Value) -> String {
    match value {
        Value::Enum(_, symbol) => symbol.clone(),
        other => panic!("not an enum: {other:?}"),
    }
}

/// What the decoder must answer for apache-avro's reading, under the decoder's two stricter
/// rules.
enum Expected {
    Event(Box<AuditEvent>),
    BadEventId,
    UnrepresentableTime,
}

fn expected(value: &Value) -> Expected {
    let Value::Record(fields) = value else {
        panic!("not a record: {value:?}")
    };
    let event_id = text(field(fields, "event_id")).unwrap();
    let Some(event_id) = (event_id.len() == 36)
        .then(|| uuid::Uuid::try_parse(&event_id).ok())
        .flatten()
    else {
        return Expected::BadEventId;
    };
    let micros = match field(fields, "occurred_at") {
        Value::Long(micros) | Value::TimestampMicros(micros) => *micros,
        other => panic!("occurred_at is {other:?}"),
    };
    let Some(occurred_at) = chrono::DateTime::from_timestamp_micros(micros) else {
        return Expected::UnrepresentableTime;
    };
    let Value::Record(actor) = field(fields, "actor") else {
        panic!("actor")
    };
    let Value::Record(resource) = field(fields, "resource") else {
        panic!("resource")
    };
    Expected::Event(Box::new(AuditEvent {
        event_id,
        occurred_at,
        tenant_id: text(field(fields, "tenant_id")).unwrap(),
        actor: auditflow::event::Actor {
            id: text(field(actor, "id")).unwrap(),
            actor_type: ActorType::from_symbol(&symbol(field(actor, "type"))).unwrap(),
            ip: text(field(actor, "ip")),
            user_agent: text(field(actor, "user_agent")),
        },
        action: text(field(fields, "action")).unwrap(),
        resource: auditflow::event::Resource {
            resource_type: text(field(resource, "type")).unwrap(),
            id: text(field(resource, "id")).unwrap(),
        },
        outcome: Outcome::from_symbol(&symbol(field(fields, "outcome"))).unwrap(),
        reason: text(field(fields, "reason")),
        trace_id: text(field(fields, "trace_id")),
        details: text(field(fields, "details")),
        session_id: text(field(fields, "session_id")),
    }))
}

/// Whether `datum` holds nine varint continuation bytes followed by a byte above 1: a varint of
/// more than 64 bits somewhere (the necessary condition for that refusal).
fn has_overlong_varint(datum: &[u8]) -> bool {
    datum
        .windows(10)
        .any(|window| window[..9].iter().all(|byte| byte & 0x80 != 0) && window[9] > 1)
}

/// Whether apache-avro, reading `datum` with the writer schema alone and writing the value back,
/// gives back exactly `datum` (it writes blocks with positive counts only).
fn reencodes_to(writer: &Schema, datum: &[u8]) -> bool {
    let mut padded = datum.to_vec();
    padded.extend_from_slice(&SENTINEL);
    let mut cursor = std::io::Cursor::new(&padded);
    apache_avro::from_avro_datum(writer, &mut cursor, None)
        .ok()
        .and_then(|value| apache_avro::to_avro_datum(writer, value).ok())
        .is_some_and(|encoded| encoded == datum)
}

#[test]
fn the_decoder_agrees_with_apache_avro_on_random_and_mutated_payloads() {
    let cases: u64 = std::env::var("AUDITFLOW_FUZZ_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("AUDITFLOW_FUZZ_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0x00a0_d17f_10e5);
    // apache-avro sizes a Vec by an array's or map's declared count, capped only by this limit
    // (512 MiB by default, counted in items: a crafted count aborts the process trying to
    // allocate tens of gigabytes). The decoder never allocates by a declared length.
    apache_avro::util::max_allocation_bytes(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let (writers, reader) = writers(dir.path());
    let decoder = Decoder::from_dir(dir.path()).expect("v1, v2 and v3 load");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut accepted, mut rejected, mut stricter) = (0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    for case in 0..cases {
        let writer = &writers[rng.random_range(0..writers.len())];
        let datum = match rng.random_range(0..10) {
            0 => (0..rng.random_range(0..200))
                .map(|_| rng.random())
                .collect(),
            1..=4 => {
                apache_avro::to_avro_datum(&writer.plain, random_record(&mut rng, writer)).unwrap()
            }
            _ => {
                let valid =
                    apache_avro::to_avro_datum(&writer.plain, random_record(&mut rng, writer))
                        .unwrap();
                mutate(&mut rng, valid)
            }
        };
        let mut payload = vec![0];
        payload.extend_from_slice(&writer.id.to_be_bytes());
        payload.extend_from_slice(&datum);
        let ours = decoder.decode(&payload);
        let theirs = avro_read(&writer.plain, &reader, &datum);
        let show = || {
            format!(
                "case {case} (seed {seed}), writer v{}, payload {payload:02x?}",
                writer.id
            )
        };
        match (theirs.as_ref().map(expected), &ours) {
            (None, Err(_)) => rejected += 1,
            (None, Ok(decoded)) => panic!(
                "accepted what apache-avro rejects: {:?}\n{}",
                decoded.event,
                show()
            ),
            (Some(_), Err(DecodeError::Datum { reason, .. }))
                if reason.contains("longer than 64 bits") && has_overlong_varint(&datum) =>
            {
                stricter += 1
            }
            (Some(_), Err(DecodeError::Datum { reason, .. }))
                if reason.contains("block declares") && !reencodes_to(&writer.plain, &datum) =>
            {
                stricter += 1
            }
            (Some(Expected::Event(event)), Ok(decoded)) => {
                assert_eq!(
                    &decoded.event,
                    event.as_ref(),
                    "different values\n{}",
                    show()
                );
                assert_eq!(
                    decoded.writer,
                    auditflow::ingest::decode::WriterId::File(writer.id)
                );
                accepted += 1;
            }
            (Some(Expected::Event(event)), Err(err)) => {
                panic!(
                    "rejected ({err}) what apache-avro reads as {event:?}\n{}",
                    show()
                )
            }
            (Some(Expected::BadEventId), Err(DecodeError::Invalid { field, .. }))
                if *field == "event_id" =>
            {
                stricter += 1
            }
            (Some(Expected::UnrepresentableTime), Err(DecodeError::UnrepresentableTime { .. })) => {
                stricter += 1
            }
            (Some(_), other) => panic!("the stricter rule was not applied: {other:?}\n{}", show()),
        }
    }
    eprintln!(
        "{cases} cases in {:.1} s (seed {seed}): {accepted} accepted by both with equal values, \
         {rejected} rejected by both, {stricter} refused by the decoder's stricter id/time rules",
        started.elapsed().as_secs_f64()
    );
    assert!(
        accepted > cases / 10 && rejected > cases / 10,
        "both outcomes are exercised"
    );
    let _ = writers.iter().map(|w| w.text.len()).sum::<usize>();
}
