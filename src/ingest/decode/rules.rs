//! The content rules every decoded event must pass before it is stored: non-empty key fields,
//! every field within its size limit, no NUL anywhere Postgres cannot store it, `details` a JSON
//! object, and `occurred_at` inside the accept window.

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::DecodeError;
use crate::chain;
use crate::config::SinkConfig;
use crate::event::{AuditEvent, EventView};

/// What an event may be: when it happened and how large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// The accepted `occurred_at` range.
    pub window: AcceptWindow,
    /// The largest payload and fields accepted.
    pub sizes: SizeLimits,
}

impl Policy {
    /// The policy the `AUDITFLOW_ACCEPT_*` and `AUDITFLOW_MAX_*_BYTES` variables set.
    pub fn from_config(sink: &SinkConfig) -> Self {
        Policy {
            window: AcceptWindow::from_config(sink),
            sizes: SizeLimits::from_config(sink),
        }
    }
}

/// The time range an event's `occurred_at` must fall in, relative to the time of decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptWindow {
    /// How far in the past an event may be.
    pub past: Duration,
    /// How far in the future an event may be (clock skew of producers).
    pub future: Duration,
}

impl AcceptWindow {
    /// The window `AUDITFLOW_ACCEPT_PAST_DAYS` and `AUDITFLOW_ACCEPT_FUTURE_DAYS` set.
    pub fn from_config(sink: &SinkConfig) -> Self {
        AcceptWindow {
            past: Duration::days(i64::from(sink.accept_past_days)),
            future: Duration::days(i64::from(sink.accept_future_days)),
        }
    }
}

impl Default for AcceptWindow {
    fn default() -> Self {
        AcceptWindow {
            past: Duration::days(30),
            future: Duration::days(1),
        }
    }
}

/// The largest event and fields accepted, in bytes. A payload over `event_bytes` is refused
/// before it is read; field limits are checked on the decoded event, whose strings are slices of
/// the payload until then, so no declared length ever sizes an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// `AUDITFLOW_MAX_EVENT_BYTES`: the whole payload.
    pub event_bytes: usize,
    /// `AUDITFLOW_MAX_KEY_FIELD_BYTES`: tenant id, actor id, action, resource type and id.
    pub key_field_bytes: usize,
    /// `AUDITFLOW_MAX_TEXT_FIELD_BYTES`: actor ip and user agent, reason, trace and session ids.
    pub text_field_bytes: usize,
    /// `AUDITFLOW_MAX_DETAILS_BYTES`: the `details` JSON text.
    pub details_bytes: usize,
}

impl SizeLimits {
    /// The limits the `AUDITFLOW_MAX_*_BYTES` variables set.
    pub fn from_config(sink: &SinkConfig) -> Self {
        SizeLimits {
            event_bytes: sink.max_event_bytes,
            key_field_bytes: sink.max_key_field_bytes,
            text_field_bytes: sink.max_text_field_bytes,
            details_bytes: sink.max_details_bytes,
        }
    }
}

impl Default for SizeLimits {
    fn default() -> Self {
        SizeLimits {
            event_bytes: 1_000_000,
            key_field_bytes: 512,
            text_field_bytes: 8_192,
            details_bytes: 65_536,
        }
    }
}

/// Checks the content rules and the accept window. Content problems are reported before the time
/// window, so an event that is both malformed and late is classed `validation`.
///
/// A valid event's `details` comes back as its canonical JSON (see [`chain::canonicalize`]),
/// which the hash chain's row digest needs: the check that judges `details` writes it on the way.
pub fn validate(
    event: &AuditEvent,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Result<Option<Vec<u8>>, DecodeError> {
    validate_view(&event.view(), now, policy)
}

/// [`validate`] of a view.
pub fn validate_view(
    event: &EventView<'_>,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Result<Option<Vec<u8>>, DecodeError> {
    if event.event_id.is_nil() {
        return Err(invalid("event_id", "is the nil uuid".to_owned()));
    }
    let sizes = &policy.sizes;
    for (field, value) in [
        ("tenant_id", event.tenant_id),
        ("actor.id", event.actor_id),
        ("action", event.action),
        ("resource.type", event.resource_type),
        ("resource.id", event.resource_id),
    ] {
        if value.is_empty() {
            return Err(invalid(field, "must not be empty".to_owned()));
        }
        check_text(
            field,
            Some(value),
            sizes.key_field_bytes,
            "AUDITFLOW_MAX_KEY_FIELD_BYTES",
        )?;
    }
    for (field, value) in [
        ("actor.ip", event.actor_ip),
        ("actor.user_agent", event.actor_user_agent),
        ("reason", event.reason),
        ("trace_id", event.trace_id),
        ("session_id", event.session_id),
    ] {
        check_text(
            field,
            value,
            sizes.text_field_bytes,
            "AUDITFLOW_MAX_TEXT_FIELD_BYTES",
        )?;
    }
    let canonical = match event.details {
        Some(details) => {
            check_text(
                "details",
                Some(details),
                sizes.details_bytes,
                "AUDITFLOW_MAX_DETAILS_BYTES",
            )?;
            Some(check_details_json(details)?)
        }
        None => None,
    };
    check_window(event.occurred_at, now, &policy.window)?;
    Ok(canonical)
}

pub(crate) fn invalid(field: &'static str, reason: String) -> DecodeError {
    DecodeError::Invalid { field, reason }
}

/// Checks a text field's size against `limit` (set by `variable`) and that it has no NUL.
fn check_text(
    field: &'static str,
    value: Option<&str>,
    limit: usize,
    variable: &str,
) -> Result<(), DecodeError> {
    if let Some(text) = value.filter(|text| text.len() > limit) {
        return Err(invalid(
            field,
            format!(
                "is {} bytes long, the limit is {limit} ({variable})",
                text.len()
            ),
        ));
    }
    match value.and_then(nul_position) {
        Some(position) => Err(invalid(
            field,
            format!(
                "contains a nul character at byte {position}, which postgres text cannot store"
            ),
        )),
        None => Ok(()),
    }
}

/// Where the first NUL byte of `text` is. The fields are short, so the usual answer (none)
/// comes from one branch-free pass the compiler turns into vector compares; only a text that has
/// one is searched again for where.
fn nul_position(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    if bytes.iter().fold(false, |found, &byte| found | (byte == 0)) {
        bytes.iter().position(|&byte| byte == 0)
    } else {
        None
    }
}

/// Nesting below this is judged by the one pass alone; serde_json refuses nesting deeper than 128.
const ONE_PASS_DEPTH: usize = 100;

/// Checks that `details` is a JSON object with no NUL in any string or key, and returns its
/// canonical JSON. One pass of the canonical writer judges the ordinary document; whatever it
/// cannot vouch for alone (not an object, a NUL, deep nesting, a number beyond a double's range,
/// broken syntax) is judged by serde_json as it always was, so the verdicts and their messages do
/// not depend on which pass ran.
fn check_details_json(details: &str) -> Result<Vec<u8>, DecodeError> {
    let mut canonical = Vec::with_capacity(chain::canonical::capacity_for(details));
    let written = chain::canonicalize(details, &mut canonical);
    if let Ok(facts) = written {
        if facts.object && !facts.nul && facts.depth < ONE_PASS_DEPTH && !facts.huge_number {
            return Ok(canonical);
        }
    }
    check_details_json_serde(details)?;
    match written {
        Ok(_) => Ok(canonical),
        // JSON to serde_json, but with a number no stored value can have (an exponent of ten
        // digits): without a canonical form the row could not join the hash chain.
        Err(err) => Err(invalid(
            "details",
            format!("has no canonical form for the hash chain: {err}"),
        )),
    }
}

fn check_details_json_serde(details: &str) -> Result<(), DecodeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The one pass decides only what it can vouch for; every verdict and message is the one
    /// serde_json alone gave, and an accepted document comes back canonical.
    #[test]
    fn details_verdicts_are_serde_json_s() {
        // 80, 110 and 140 levels: the one pass alone, serde_json accepting, serde_json refusing.
        let nested = |pairs: usize| format!("{}{}", "{\"a\":[".repeat(pairs), "]}".repeat(pairs));
        let (deep, deeper, deepest) = (nested(40), nested(55), nested(70));
        for details in [
            r#"{"b":1,"a":{"c":[true,null,"x"]}}"#,
            r#" { "z" : 1.50 , "a" : -0 } "#,
            r#"{"k":1,"k":2}"#,
            "{}",
            "[]",
            "\"text\"",
            "12",
            "null",
            "true",
            r#"{"a":"\u0000"}"#,
            r#"{"\u0000":1}"#,
            r#"{"a":["\u0000"]}"#,
            r#"{"a":"\\u0000"}"#,
            r#"{"a":1e300}"#,
            r#"{"a":1e309}"#,
            r#"{"a":-2e400}"#,
            r#"{"a":1e-400}"#,
            r#"{"a":123456789012345678901234567890}"#,
            &deep,
            &deeper,
            &deepest,
            r#"{"a":1,}"#,
            r#"{"a":01}"#,
            r#"{"a":"\ud800"}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"a":1} x"#,
            "",
        ] {
            let old = check_details_json_serde(details);
            let new = check_details_json(details);
            match (&old, &new) {
                (Ok(()), Ok(canonical)) => assert_eq!(
                    canonical,
                    &chain::canonical_json(details).unwrap(),
                    "{details}"
                ),
                (Err(old), Err(new)) => assert_eq!(old.to_string(), new.to_string()),
                _ => panic!("{details}: {old:?} before, {new:?} now"),
            }
        }
    }

    #[test]
    fn json_without_a_canonical_form_is_refused_not_stored_with_a_broken_digest() {
        // serde_json reads the exponent as a double's underflow to zero; no stored value has it.
        let details = r#"{"a":1e-10000000000}"#;
        assert!(check_details_json_serde(details).is_ok());
        let err = check_details_json(details).unwrap_err().to_string();
        assert!(err.contains("no canonical form"), "{err}");
    }

    #[test]
    fn the_first_nul_is_found_wherever_it_is() {
        assert_eq!(nul_position(""), None);
        assert_eq!(nul_position("user-42"), None);
        assert_eq!(nul_position(&"é".repeat(100)), None);
        for length in [1, 15, 16, 17, 63, 64, 65, 300] {
            for at in [0, length / 2, length - 1] {
                let mut text = "x".repeat(length);
                text.replace_range(at..=at, "\0");
                assert_eq!(nul_position(&text), Some(at), "length {length}");
                text.push('\0');
                assert_eq!(nul_position(&text), Some(at), "two nuls, length {length}");
            }
        }
    }
}
