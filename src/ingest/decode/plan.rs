//! The reader side: where each field of the reader schema (v2) lands in [`AuditEvent`], and the
//! per-writer plan of [`Step`]s that fills it.

use chrono::DateTime;
use serde_json::Value as Json;
use uuid::Uuid;

use super::rules::invalid;
use super::types::{RecordDef, WireType};
use super::{DecodeError, WriterId, QUOTE_CHARS};
use crate::event::{ActorType, AuditEvent, EventView, Outcome};

/// A leaf field of the reader schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
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
pub(crate) enum SlotKind {
    Text,
    OptionalText,
    Timestamp,
    ActorType,
    Outcome,
}

impl Slot {
    pub(crate) const ALL: [Slot; 15] = [
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

    pub(crate) fn path(self) -> &'static str {
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

    pub(crate) fn kind(self) -> SlotKind {
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
    pub(crate) fn is_required(self) -> bool {
        self.kind() != SlotKind::OptionalText
    }

    pub(crate) fn value_of<'e>(self, event: &'e AuditEvent, event_id: &'e str) -> SlotValue<'e> {
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
pub(crate) enum ReaderField {
    Leaf(Slot),
    Record(&'static [(&'static str, ReaderField)]),
}

pub(crate) const ACTOR_FIELDS: &[(&str, ReaderField)] = &[
    ("id", ReaderField::Leaf(Slot::ActorId)),
    ("type", ReaderField::Leaf(Slot::ActorType)),
    ("ip", ReaderField::Leaf(Slot::ActorIp)),
    ("user_agent", ReaderField::Leaf(Slot::ActorUserAgent)),
];

pub(crate) const RESOURCE_FIELDS: &[(&str, ReaderField)] = &[
    ("type", ReaderField::Leaf(Slot::ResourceType)),
    ("id", ReaderField::Leaf(Slot::ResourceId)),
];

/// The reader schema (v2) as this module maps it; a test checks it against the embedded text.
pub(crate) const EVENT_FIELDS: &[(&str, ReaderField)] = &[
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
pub(crate) enum Step {
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
pub(crate) enum Conv {
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
pub(crate) enum EnumValue {
    Actor(ActorType),
    Outcome(Outcome),
}

pub(crate) fn compile_plan(
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
pub(crate) enum SlotValue<'a> {
    Text(&'a str),
    Null,
    Micros(i64),
    Actor(ActorType),
    Outcome(Outcome),
}

/// The reader leaves filled so far; strings borrow from the payload until the event is built.
#[derive(Default)]
pub(crate) struct Fields<'a> {
    pub(crate) event_id: Option<&'a str>,
    pub(crate) occurred_at: Option<i64>,
    pub(crate) tenant_id: Option<&'a str>,
    actor_id: Option<&'a str>,
    pub(crate) actor_type: Option<ActorType>,
    actor_ip: Option<&'a str>,
    actor_user_agent: Option<&'a str>,
    pub(crate) action: Option<&'a str>,
    pub(crate) resource_type: Option<&'a str>,
    resource_id: Option<&'a str>,
    pub(crate) outcome: Option<Outcome>,
    pub(crate) reason: Option<&'a str>,
    pub(crate) trace_id: Option<&'a str>,
    pub(crate) details: Option<&'a str>,
    pub(crate) session_id: Option<&'a str>,
}

impl<'a> Fields<'a> {
    pub(crate) fn set(&mut self, slot: Slot, value: SlotValue<'a>) -> Result<(), String> {
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

    /// The event, its text borrowing from the payload, once every required field has a value.
    pub(crate) fn into_view(self, writer: WriterId) -> Result<EventView<'a>, DecodeError> {
        let missing = |slot: Slot| DecodeError::Unresolvable {
            writer,
            field: slot.path(),
            reason: "the writer provided no value and the reader field has no default".to_owned(),
        };
        let text = |value: Option<&'a str>, slot: Slot| value.ok_or_else(|| missing(slot));
        let event_id = parse_event_id(self.event_id.ok_or_else(|| missing(Slot::EventId))?)?;
        let micros = self.occurred_at.ok_or_else(|| missing(Slot::OccurredAt))?;
        let occurred_at = DateTime::from_timestamp_micros(micros)
            .ok_or(DecodeError::UnrepresentableTime { micros })?;
        Ok(EventView {
            event_id,
            occurred_at,
            tenant_id: text(self.tenant_id, Slot::TenantId)?,
            actor_id: text(self.actor_id, Slot::ActorId)?,
            actor_type: self.actor_type.ok_or_else(|| missing(Slot::ActorType))?,
            actor_ip: self.actor_ip,
            actor_user_agent: self.actor_user_agent,
            action: text(self.action, Slot::Action)?,
            resource_type: text(self.resource_type, Slot::ResourceType)?,
            resource_id: text(self.resource_id, Slot::ResourceId)?,
            outcome: self.outcome.ok_or_else(|| missing(Slot::Outcome))?,
            reason: self.reason,
            trace_id: self.trace_id,
            details: self.details,
            session_id: self.session_id,
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
