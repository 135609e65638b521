//! A deterministic generator of realistic audit traffic, for `auditflow produce`, the demo and the
//! tests.
//!
//! Everything random comes from one `StdRng` seeded with [`GeneratorConfig::seed`], and event times
//! are relative to [`GeneratorConfig::now`], so the same config yields the same byte stream. The
//! stream mixes three kinds of record, each labelled with what the sink must do with it:
//!
//! - valid events, Confluent-framed, about 20% written with schema v1 and the rest with v2, keyed by
//!   tenant so one tenant's events stay ordered in one partition;
//! - duplicates: the exact bytes of one of the last [`DUPLICATE_WINDOW`] valid events again, as a
//!   producer retry would send them;
//! - invalid records, rotating through one failure of each [`ErrorClass`].
//!
//! The iterator ends once [`GeneratorConfig::count`] valid events have been emitted; duplicates and
//! invalid records come on top of that count.

pub mod encode;

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::event::{Actor, ActorType, AuditEvent, Outcome, Resource};
use crate::ingest::decode::{Decoder, ErrorClass};

/// How many of the most recent valid payloads a duplicate is drawn from.
pub const DUPLICATE_WINDOW: usize = 1000;

/// The schema id that no schema file defines, used for the `schema` class of invalid records.
pub const UNKNOWN_SCHEMA_ID: u32 = 99;

/// The schema id used instead with a registry ([`EventGenerator::with_schema_ids`]): registries
/// number from 1 up, so the largest id one allows is the last to be taken.
pub const UNKNOWN_REGISTRY_SCHEMA_ID: u32 = i32::MAX as u32;

/// How far back valid events' `occurred_at` may lie; well inside the default accept window.
const MAX_EVENT_AGE_SECONDS: i64 = 3 * 60 * 60;

/// Share of valid events written with schema v1 instead of v2.
const V1_SHARE: f64 = 0.2;

/// The payload size a valid event is padded towards, drawn per event.
const TARGET_PAYLOAD_BYTES: std::ops::RangeInclusive<usize> = 500..=640;

const TENANTS: [&str; 8] = [
    "acme-corp",
    "globex",
    "initech",
    "umbrella-health",
    "hooli",
    "stark-industries",
    "wayne-enterprises",
    "tyrell-systems",
];

const ACTORS_PER_TENANT: usize = 25;

/// Resource kinds: type, id prefix and the actions done to them.
const RESOURCES: [(&str, &str, &[&str]); 6] = [
    (
        "order",
        "ord",
        &[
            "order.create",
            "order.update",
            "order.cancel",
            "order.refund",
        ],
    ),
    (
        "user",
        "usr",
        &[
            "user.login",
            "user.logout",
            "user.password_change",
            "user.mfa_enroll",
        ],
    ),
    (
        "invoice",
        "inv",
        &["invoice.create", "invoice.pay", "invoice.void"],
    ),
    (
        "document",
        "doc",
        &["document.view", "document.download", "document.share"],
    ),
    (
        "api_key",
        "key",
        &["api_key.create", "api_key.rotate", "api_key.revoke"],
    ),
    (
        "subscription",
        "sub",
        &[
            "subscription.upgrade",
            "subscription.downgrade",
            "subscription.cancel",
        ],
    ),
];

const USER_AGENTS: [&str; 5] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "okhttp/4.12.0 acme-mobile/5.3.1 (Android 14)",
];

const SERVICES: [&str; 6] = [
    "billing-service",
    "order-service",
    "identity-service",
    "reporting-job",
    "webhook-dispatcher",
    "search-indexer",
];

const FAILURE_REASONS: [&str; 4] = [
    "payment provider declined the card",
    "upstream timeout after 3 retries",
    "validation failed: quantity must be positive",
    "optimistic lock conflict, record changed concurrently",
];

const DENIAL_REASONS: [&str; 3] = [
    "missing permission for this resource",
    "tenant policy forbids this action outside business hours",
    "mfa required for this operation",
];

const REGIONS: [&str; 4] = ["eu-west-1", "eu-central-1", "us-east-1", "ap-southeast-2"];

/// First octets of user IPs: publicly routed ranges, never loopback or private.
const PUBLIC_FIRST_OCTETS: [u8; 10] = [23, 31, 45, 62, 81, 93, 104, 178, 185, 212];

const CHANNELS: [&str; 4] = ["web", "api", "mobile", "batch"];

const NOTE_WORDS: [&str; 20] = [
    "customer",
    "requested",
    "change",
    "via",
    "support",
    "ticket",
    "approved",
    "by",
    "manager",
    "after",
    "review",
    "of",
    "the",
    "account",
    "history",
    "and",
    "recent",
    "activity",
    "in",
    "region",
];

/// What the generator is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Distinct valid events to emit; duplicates and invalid records come on top.
    pub count: u64,
    /// Duplicates per valid event, e.g. `0.1` for one retry per ten events. Negative or NaN
    /// counts as zero.
    pub duplicate_ratio: f64,
    /// Invalid records per valid event. Negative or NaN counts as zero.
    pub invalid_ratio: f64,
    /// Seeds every random choice; the same config gives the same bytes.
    pub seed: u64,
    /// The time events are generated around: valid ones lie in the three hours before it.
    pub now: DateTime<Utc>,
}

/// What a generated record is, so tests and the demo can check what the sink did with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A new event that must be stored.
    Valid,
    /// The exact payload of an earlier valid record, which must not be stored twice.
    Duplicate,
    /// A record the sink must dead-letter with this class.
    Invalid(ErrorClass),
}

/// One Kafka record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedRecord {
    /// The message key: `tenant/resource type/resource id`, so the events of one resource stay
    /// ordered in one partition (and a producer's retry lands where the original did) while a
    /// tenant's traffic spreads over the topic.
    pub key: Vec<u8>,
    /// The message value.
    pub payload: Vec<u8>,
    /// What the record is.
    pub kind: RecordKind,
}

/// How many records of each kind were emitted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GeneratorStats {
    /// Distinct valid events.
    pub valid: u64,
    /// Re-sent copies of valid events.
    pub duplicates: u64,
    /// Records that must be dead-lettered.
    pub invalid: u64,
}

/// The invalid records, emitted in turn.
#[derive(Debug, Clone, Copy)]
enum Defect {
    Garbage,
    UnknownSchema,
    BadEventId,
    DetailsNotObject,
    TooOld,
}

const DEFECTS: [Defect; 5] = [
    Defect::Garbage,
    Defect::UnknownSchema,
    Defect::BadEventId,
    Defect::DetailsNotObject,
    Defect::TooOld,
];

impl Defect {
    fn class(self) -> ErrorClass {
        match self {
            Defect::Garbage => ErrorClass::Decode,
            Defect::UnknownSchema => ErrorClass::Schema,
            Defect::BadEventId | Defect::DetailsNotObject => ErrorClass::Validation,
            Defect::TooOld => ErrorClass::OutOfWindow,
        }
    }
}

/// A fixed actor, so the same people and services recur across the stream.
#[derive(Debug, Clone)]
struct ActorProfile {
    tenant: &'static str,
    id: String,
    actor_type: ActorType,
    ip: Option<String>,
    user_agent: Option<String>,
    session_id: Option<String>,
}

/// Yields [`GeneratedRecord`]s until `count` valid events have been emitted.
#[derive(Debug)]
pub struct EventGenerator {
    config: GeneratorConfig,
    rng: StdRng,
    decoder: Decoder,
    actors: Vec<ActorProfile>,
    /// Keys and payloads of the most recent valid events, the pool duplicates are drawn from.
    recent: VecDeque<(Vec<u8>, Vec<u8>)>,
    next_defect: usize,
    stats: GeneratorStats,
    /// Schema version to the id written in the Confluent header; empty: the version itself.
    schema_ids: std::collections::BTreeMap<u32, u32>,
    unknown_schema_id: u32,
}

impl EventGenerator {
    /// Creates a generator; nothing is generated until it is iterated.
    pub fn new(config: GeneratorConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let actors = TENANTS
            .iter()
            .flat_map(|tenant| (0..ACTORS_PER_TENANT).map(move |index| (*tenant, index)))
            .map(|(tenant, index)| make_actor(&mut rng, tenant, index))
            .collect();
        EventGenerator {
            config,
            rng,
            decoder: Decoder::embedded(),
            actors,
            recent: VecDeque::with_capacity(DUPLICATE_WINDOW),
            next_defect: 0,
            stats: GeneratorStats::default(),
            schema_ids: std::collections::BTreeMap::new(),
            unknown_schema_id: UNKNOWN_SCHEMA_ID,
        }
    }

    /// Writes the id a schema registry gave each schema version (e.g. `{1: 4812, 2: 4813}`)
    /// in the Confluent header instead of the version, as Confluent's serializers do, and
    /// [`UNKNOWN_REGISTRY_SCHEMA_ID`] for the `schema` class of invalid records.
    /// An empty map changes nothing.
    pub fn with_schema_ids(mut self, ids: std::collections::BTreeMap<u32, u32>) -> Self {
        if !ids.is_empty() {
            self.unknown_schema_id = UNKNOWN_REGISTRY_SCHEMA_ID;
        }
        self.schema_ids = ids;
        self
    }

    /// Puts the id that stands for `version` into a Confluent header.
    fn frame_id(&self, payload: &mut [u8], version: u32) {
        if let Some(id) = self.schema_ids.get(&version) {
            payload[1..5].copy_from_slice(&id.to_be_bytes());
        }
    }

    /// Returns how many records of each kind were emitted so far.
    pub fn stats(&self) -> GeneratorStats {
        self.stats
    }

    fn next_valid(&mut self) -> GeneratedRecord {
        let version = if self.rng.random_bool(V1_SHARE) { 1 } else { 2 };
        let event = self.make_event(version);
        let payload = self.encode(&event, version);
        let key = record_key(&event);
        if self.recent.len() == DUPLICATE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((key.clone(), payload.clone()));
        self.stats.valid += 1;
        GeneratedRecord {
            key,
            payload,
            kind: RecordKind::Valid,
        }
    }

    fn next_duplicate(&mut self) -> Option<GeneratedRecord> {
        if self.recent.is_empty() {
            return None;
        }
        let index = self.rng.random_range(0..self.recent.len());
        let (key, payload) = self.recent[index].clone();
        self.stats.duplicates += 1;
        Some(GeneratedRecord {
            key,
            payload,
            kind: RecordKind::Duplicate,
        })
    }

    fn next_invalid(&mut self) -> GeneratedRecord {
        let defect = DEFECTS[self.next_defect % DEFECTS.len()];
        self.next_defect += 1;
        let mut event = self.make_event(2);
        let payload = match defect {
            Defect::Garbage => {
                let length = self.rng.random_range(16..200);
                let mut bytes: Vec<u8> = (0..length).map(|_| self.rng.random()).collect();
                // Anything but the two magic bytes, or it would be a framing of its own.
                bytes[0] = self.rng.random_range(0x01..0xC3);
                bytes
            }
            Defect::UnknownSchema => {
                let mut payload = self.encode(&event, 2);
                payload[1..5].copy_from_slice(&self.unknown_schema_id.to_be_bytes());
                payload
            }
            Defect::BadEventId => {
                let event_id =
                    format!("evt-{:012}", self.rng.random_range(0..1_000_000_000_000u64));
                let mut payload = self
                    .decoder
                    .encode_confluent_with_event_id(&event, &event_id, 2)
                    .expect("the embedded v2 schema encodes every generated event");
                self.frame_id(&mut payload, 2);
                payload
            }
            Defect::DetailsNotObject => {
                event.details = Some(r#"["details", "must", "be", "an", "object"]"#.to_owned());
                self.encode(&event, 2)
            }
            Defect::TooOld => {
                event.occurred_at = self.config.now - Duration::days(400);
                self.encode(&event, 2)
            }
        };
        self.stats.invalid += 1;
        GeneratedRecord {
            key: record_key(&event),
            payload,
            kind: RecordKind::Invalid(defect.class()),
        }
    }

    fn encode(&self, event: &AuditEvent, version: u32) -> Vec<u8> {
        let mut payload = self
            .decoder
            .encode_confluent(event, version)
            .expect("the embedded schemas encode every generated event");
        self.frame_id(&mut payload, version);
        payload
    }

    /// Makes a valid event whose payload, written with schema `version`, is padded to a target
    /// size between 500 and 640 bytes.
    fn make_event(&mut self, version: u32) -> AuditEvent {
        let rng = &mut self.rng;
        let actor = self.actors[rng.random_range(0..self.actors.len())].clone();
        let (resource_type, prefix, actions) = RESOURCES[rng.random_range(0..RESOURCES.len())];
        let action = actions[rng.random_range(0..actions.len())];
        let resource_id = if resource_type == "user" && actor.actor_type == ActorType::User {
            actor.id.clone()
        } else {
            format!("{prefix}-{:08}", rng.random_range(0..100_000_000u32))
        };
        let roll: f64 = rng.random();
        let (outcome, reason) = if roll < 0.90 {
            (Outcome::Success, None)
        } else if roll < 0.96 {
            let reason = FAILURE_REASONS[rng.random_range(0..FAILURE_REASONS.len())];
            (Outcome::Failure, Some(reason.to_owned()))
        } else {
            let reason = DENIAL_REASONS[rng.random_range(0..DENIAL_REASONS.len())];
            (Outcome::Denied, Some(reason.to_owned()))
        };
        let age = Duration::microseconds(rng.random_range(0..MAX_EVENT_AGE_SECONDS * 1_000_000));
        let details = make_details(rng, action);
        let mut event = AuditEvent {
            event_id: uuid::Builder::from_random_bytes(rng.random()).into_uuid(),
            occurred_at: self.config.now - age,
            tenant_id: actor.tenant.to_owned(),
            actor: Actor {
                id: actor.id,
                actor_type: actor.actor_type,
                ip: actor.ip,
                user_agent: actor.user_agent,
            },
            action: action.to_owned(),
            resource: Resource {
                resource_type: resource_type.to_owned(),
                id: resource_id,
            },
            outcome,
            reason,
            trace_id: Some(hex(rng, 16)),
            details: None,
            session_id: actor.session_id,
        };
        let target = rng.random_range(TARGET_PAYLOAD_BYTES);
        event.details = Some(details.to_string());
        let size = self.encode(&event, version).len();
        // `,"note":""` adds 10 bytes around the padding text.
        if let Some(padding) = target.checked_sub(size + 10).filter(|padding| *padding > 0) {
            let mut padded = details;
            padded["note"] = json!(note_text(&mut self.rng, padding));
            event.details = Some(padded.to_string());
        }
        event
    }
}

impl Iterator for EventGenerator {
    type Item = GeneratedRecord;

    fn next(&mut self) -> Option<GeneratedRecord> {
        if self.stats.valid >= self.config.count {
            return None;
        }
        let duplicate_weight = non_negative(self.config.duplicate_ratio);
        let invalid_weight = non_negative(self.config.invalid_ratio);
        let roll = self.rng.random::<f64>() * (1.0 + duplicate_weight + invalid_weight);
        let record = if roll < 1.0 {
            self.next_valid()
        } else if roll < 1.0 + duplicate_weight {
            // Nothing to repeat yet at the very start: send a new event instead.
            match self.next_duplicate() {
                Some(record) => record,
                None => self.next_valid(),
            }
        } else {
            self.next_invalid()
        };
        Some(record)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = self.config.count.saturating_sub(self.stats.valid);
        (usize::try_from(remaining).unwrap_or(usize::MAX), None)
    }
}

/// The key a producer of this event would use (see [`GeneratedRecord::key`]).
fn record_key(event: &AuditEvent) -> Vec<u8> {
    format!(
        "{}/{}/{}",
        event.tenant_id, event.resource.resource_type, event.resource.id
    )
    .into_bytes()
}

fn non_negative(ratio: f64) -> f64 {
    if ratio.is_finite() && ratio > 0.0 {
        ratio
    } else {
        0.0
    }
}

fn hex(rng: &mut StdRng, num_bytes: usize) -> String {
    (0..num_bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

fn make_actor(rng: &mut StdRng, tenant: &'static str, index: usize) -> ActorProfile {
    let roll: f64 = rng.random();
    if roll < 0.85 {
        ActorProfile {
            tenant,
            id: format!("usr-{:06}", rng.random_range(0..1_000_000u32)),
            actor_type: ActorType::User,
            ip: Some(format!(
                "{}.{}.{}.{}",
                PUBLIC_FIRST_OCTETS[rng.random_range(0..PUBLIC_FIRST_OCTETS.len())],
                rng.random::<u8>(),
                rng.random::<u8>(),
                rng.random_range(1..255u8)
            )),
            user_agent: Some(USER_AGENTS[rng.random_range(0..USER_AGENTS.len())].to_owned()),
            session_id: Some(format!("sess-{}", hex(rng, 12))),
        }
    } else if roll < 0.95 {
        let service = SERVICES[index % SERVICES.len()];
        ActorProfile {
            tenant,
            id: format!("svc-{service}"),
            actor_type: ActorType::Service,
            ip: Some(format!(
                "10.{}.{}.{}",
                rng.random::<u8>(),
                rng.random::<u8>(),
                rng.random_range(1..255u8)
            )),
            user_agent: Some(format!("{service}/2.{}.{} (rust)", index % 7, index % 13)),
            session_id: None,
        }
    } else {
        ActorProfile {
            tenant,
            id: "system-scheduler".to_owned(),
            actor_type: ActorType::System,
            ip: None,
            user_agent: None,
            session_id: None,
        }
    }
}

/// Details fitting the action: request metadata plus what changed.
fn make_details(rng: &mut StdRng, action: &str) -> serde_json::Value {
    let client_version = format!(
        "{}.{}.{}",
        rng.random_range(1..6),
        rng.random_range(0..20),
        rng.random_range(0..50)
    );
    let mut details = json!({
        "request_id": format!("req-{}", hex(rng, 8)),
        "channel": CHANNELS[rng.random_range(0..CHANNELS.len())],
        "region": REGIONS[rng.random_range(0..REGIONS.len())],
        "client_version": client_version,
        "latency_ms": rng.random_range(2..1500),
    });
    let (_, verb) = action.split_once('.').unwrap_or((action, action));
    details["changes"] = match verb {
        "update" | "upgrade" | "downgrade" => json!([
            {"field": "status", "from": "pending", "to": "confirmed"},
            {"field": "quantity", "from": rng.random_range(1..10), "to": rng.random_range(1..10)},
        ]),
        "pay" | "refund" => {
            let currency = ["EUR", "USD", "GBP"][rng.random_range(0..3)];
            json!({"amount_cents": rng.random_range(100..500_000), "currency": currency})
        }
        "login" => {
            let method = ["password", "sso", "passkey"][rng.random_range(0..3)];
            json!({"method": method, "mfa": rng.random_bool(0.7)})
        }
        _ => json!({}),
    };
    details
}

/// Plain words, cut to exactly `length` bytes.
fn note_text(rng: &mut StdRng, length: usize) -> String {
    let mut text = String::with_capacity(length + 16);
    while text.len() < length {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(NOTE_WORDS[rng.random_range(0..NOTE_WORDS.len())]);
    }
    text.truncate(length);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode::{validate, Policy, WriterId};
    use chrono::TimeZone;
    use std::collections::HashSet;

    fn config(count: u64, seed: u64) -> GeneratorConfig {
        GeneratorConfig {
            count,
            duplicate_ratio: 0.1,
            invalid_ratio: 0.05,
            seed,
            now: Utc.with_ymd_and_hms(2025, 3, 14, 0, 30, 0).unwrap(),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let first: Vec<GeneratedRecord> = EventGenerator::new(config(500, 7)).collect();
        let second: Vec<GeneratedRecord> = EventGenerator::new(config(500, 7)).collect();
        assert_eq!(first, second);
        let other: Vec<GeneratedRecord> = EventGenerator::new(config(500, 8)).collect();
        assert_ne!(first, other);
    }

    #[test]
    fn stops_after_count_valid_events_and_counts_every_kind() {
        let mut generator = EventGenerator::new(config(10_000 * 100 / 115, 42));
        let records: Vec<GeneratedRecord> = generator.by_ref().collect();
        let stats = generator.stats();
        let count_of = |wanted: fn(&RecordKind) -> bool| {
            records.iter().filter(|record| wanted(&record.kind)).count() as u64
        };
        assert_eq!(stats.valid, 10_000 * 100 / 115);
        assert_eq!(count_of(|kind| *kind == RecordKind::Valid), stats.valid);
        assert_eq!(
            count_of(|kind| *kind == RecordKind::Duplicate),
            stats.duplicates
        );
        assert_eq!(
            count_of(|kind| matches!(kind, RecordKind::Invalid(_))),
            stats.invalid
        );
        assert_eq!(
            records.last().map(|record| record.kind),
            Some(RecordKind::Valid)
        );
        assert!(generator.next().is_none());

        let total = records.len() as f64;
        assert!((total - 10_000.0).abs() < 300.0, "{total} records");
        let duplicate_ratio = stats.duplicates as f64 / stats.valid as f64;
        let invalid_ratio = stats.invalid as f64 / stats.valid as f64;
        assert!(
            (duplicate_ratio - 0.1).abs() < 0.015,
            "duplicates {duplicate_ratio}"
        );
        assert!(
            (invalid_ratio - 0.05).abs() < 0.01,
            "invalid {invalid_ratio}"
        );

        // Every class of invalid record shows up.
        let classes: HashSet<ErrorClass> = records
            .iter()
            .filter_map(|record| match record.kind {
                RecordKind::Invalid(class) => Some(class),
                _ => None,
            })
            .collect();
        assert_eq!(classes.len(), 4);
    }

    #[test]
    fn every_record_decodes_as_its_kind_says() {
        let config = config(3_000, 3);
        let now = config.now;
        let decoder = Decoder::embedded();
        let window = Policy::default();
        let mut valid_payloads: HashSet<Vec<u8>> = HashSet::new();
        let mut event_ids = HashSet::new();
        let mut tenants = HashSet::new();
        let mut actors = HashSet::new();
        let mut num_v1 = 0;
        let (mut smallest, mut largest) = (usize::MAX, 0);
        for record in EventGenerator::new(config) {
            let result = decoder.decode_validated(&record.payload, now, &window);
            match record.kind {
                RecordKind::Valid => {
                    let decoded = result.unwrap();
                    let event = &decoded.event;
                    assert_eq!(record.key, record_key(event), "keyed by resource");
                    assert_eq!(event.event_id.get_version_num(), 4);
                    assert!(event.occurred_at <= now);
                    assert!(event.occurred_at > now - Duration::hours(3));
                    assert!(event.trace_id.is_some());
                    assert!(event.details.is_some());
                    assert!(event_ids.insert(event.event_id), "ids are unique");
                    if decoded.writer == WriterId::File(1) {
                        num_v1 += 1;
                        assert_eq!(event.session_id, None);
                    }
                    tenants.insert(event.tenant_id.clone());
                    actors.insert(event.actor.id.clone());
                    smallest = smallest.min(record.payload.len());
                    largest = largest.max(record.payload.len());
                    valid_payloads.insert(record.payload);
                }
                RecordKind::Duplicate => {
                    assert!(result.is_ok());
                    assert!(
                        valid_payloads.contains(&record.payload),
                        "duplicate of an earlier valid record"
                    );
                }
                RecordKind::Invalid(class) => {
                    let err = result.expect_err("invalid record must be rejected");
                    assert_eq!(err.class(), class, "{err}");
                }
            }
        }
        assert!(
            (450..700).contains(&smallest),
            "smallest valid payload {smallest}"
        );
        assert!(
            (450..700).contains(&largest),
            "largest valid payload {largest}"
        );
        let v1_share = f64::from(num_v1) / 3_000.0;
        assert!((v1_share - V1_SHARE).abs() < 0.03, "v1 share {v1_share}");
        assert_eq!(tenants.len(), TENANTS.len());
        assert!(actors.len() > 150, "{} actors", actors.len());
    }

    #[test]
    fn zero_ratios_give_only_valid_events_and_zero_count_gives_nothing() {
        let mut config = config(200, 1);
        config.duplicate_ratio = 0.0;
        config.invalid_ratio = f64::NAN;
        assert!(EventGenerator::new(config.clone()).all(|record| record.kind == RecordKind::Valid));
        config.count = 0;
        assert_eq!(EventGenerator::new(config).count(), 0);
    }

    #[test]
    fn with_registry_ids_the_headers_carry_them_and_the_rest_is_unchanged() {
        let plain: Vec<GeneratedRecord> = EventGenerator::new(config(300, 5)).collect();
        let ids = [(1, 4_812), (2, 100_023)].into_iter().collect();
        let registered: Vec<GeneratedRecord> = EventGenerator::new(config(300, 5))
            .with_schema_ids(ids)
            .collect();
        assert_eq!(plain.len(), registered.len());
        let id_of =
            |payload: &[u8]| u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
        let mut seen = std::collections::BTreeSet::new();
        for (plain, registered) in plain.iter().zip(&registered) {
            assert_eq!(plain.kind, registered.kind);
            if plain.payload[0] != 0 {
                assert_eq!(plain.payload, registered.payload, "garbage stays garbage");
                continue;
            }
            assert_eq!(plain.payload[5..], registered.payload[5..], "same datum");
            let expected = match id_of(&plain.payload) {
                1 => 4_812,
                2 => 100_023,
                UNKNOWN_SCHEMA_ID => UNKNOWN_REGISTRY_SCHEMA_ID,
                other => panic!("unexpected id {other}"),
            };
            assert_eq!(id_of(&registered.payload), expected);
            seen.insert(expected);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn generated_events_pass_validation_directly() {
        let config = config(50, 11);
        let now = config.now;
        let decoder = Decoder::embedded();
        let mut generator = EventGenerator::new(config);
        for _ in 0..50 {
            let event = generator.make_event(2);
            validate(&event, now, &Policy::default()).unwrap();
            let payload = decoder.encode_confluent(&event, 2).unwrap();
            assert_eq!(decoder.decode(&payload).unwrap().event, event);
        }
        assert_eq!(generator.stats(), GeneratorStats::default());
    }
}
