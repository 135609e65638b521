//! The content rules every decoded event must pass before it is stored: non-empty, bounded key
//! fields, no NUL anywhere Postgres cannot store it, `details` a JSON object, and `occurred_at`
//! inside the accept window.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{AcceptWindow, DecodeError, MAX_KEY_FIELD_BYTES};
use crate::event::AuditEvent;

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

pub(crate) fn invalid(field: &'static str, reason: String) -> DecodeError {
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
