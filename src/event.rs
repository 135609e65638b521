//! The audit event as the rest of the pipeline sees it, once decoded and validated.
//!
//! The Avro schemas in `schemas/` are the wire contract; this module is the in-memory one. Decoding
//! (`crate::ingest::decode`) turns a Kafka payload into an [`AuditEvent`]; storage (`crate::ingest::store`) writes it
//! as one row of the partitioned `events` table.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Who performed the action.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor {
    /// The actor's id in its own system (user id, service name, ...).
    pub id: String,
    /// What kind of actor this is.
    pub actor_type: ActorType,
    /// Client IP address as sent by the producer, if known.
    pub ip: Option<String>,
    /// Client user agent as sent by the producer, if known.
    pub user_agent: Option<String>,
}

/// Kinds of actor, the Avro enum `ActorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorType {
    /// A person.
    User,
    /// Another service acting on its own behalf.
    Service,
    /// The platform itself (jobs, schedulers).
    System,
}

impl ActorType {
    /// The Avro symbol, which is also the value stored in Postgres.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::User => "USER",
            ActorType::Service => "SERVICE",
            ActorType::System => "SYSTEM",
        }
    }

    /// Parses an Avro symbol.
    pub fn from_symbol(symbol: &str) -> Option<Self> {
        match symbol {
            "USER" => Some(ActorType::User),
            "SERVICE" => Some(ActorType::Service),
            "SYSTEM" => Some(ActorType::System),
            _ => None,
        }
    }
}

/// The thing acted upon.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resource {
    /// Resource kind, e.g. `order`.
    pub resource_type: String,
    /// Resource id within its kind.
    pub id: String,
}

/// How the action ended, the Avro enum `Outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The action took effect.
    Success,
    /// The action was attempted and failed.
    Failure,
    /// The action was refused by authorization.
    Denied,
}

impl Outcome {
    /// The Avro symbol, which is also the value stored in Postgres.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "SUCCESS",
            Outcome::Failure => "FAILURE",
            Outcome::Denied => "DENIED",
        }
    }

    /// Parses an Avro symbol.
    pub fn from_symbol(symbol: &str) -> Option<Self> {
        match symbol {
            "SUCCESS" => Some(Outcome::Success),
            "FAILURE" => Some(Outcome::Failure),
            "DENIED" => Some(Outcome::Denied),
            _ => None,
        }
    }
}

/// One audit event, resolved into the current reader schema (v2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuditEvent {
    /// The producer's id for the event; with `occurred_at`, the deduplication key.
    pub event_id: Uuid,
    /// When it happened, microsecond precision, UTC. Decides the table partition.
    pub occurred_at: DateTime<Utc>,
    /// The tenant the event belongs to.
    pub tenant_id: String,
    /// Who did it.
    pub actor: Actor,
    /// What was done, e.g. `order.update`.
    pub action: String,
    /// What it was done to.
    pub resource: Resource,
    /// How it ended.
    pub outcome: Outcome,
    /// Free-text reason, typically for failures and denials.
    pub reason: Option<String>,
    /// Distributed trace id, if the producer had one.
    pub trace_id: Option<String>,
    /// A JSON object as text; stored as jsonb. Validated to be an object.
    pub details: Option<String>,
    /// Session id (schema v2); `None` for events written with v1.
    pub session_id: Option<String>,
}

/// An [`AuditEvent`] whose text borrows from elsewhere, typically the Kafka payload it was decoded
/// from: what the consumer validates, hashes and encodes into a row without copying a field.
/// Flat, where [`AuditEvent`] nests `actor` and `resource`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventView<'a> {
    /// See [`AuditEvent::event_id`].
    pub event_id: Uuid,
    /// See [`AuditEvent::occurred_at`].
    pub occurred_at: DateTime<Utc>,
    /// See [`AuditEvent::tenant_id`].
    pub tenant_id: &'a str,
    /// See [`Actor::id`].
    pub actor_id: &'a str,
    /// See [`Actor::actor_type`].
    pub actor_type: ActorType,
    /// See [`Actor::ip`].
    pub actor_ip: Option<&'a str>,
    /// See [`Actor::user_agent`].
    pub actor_user_agent: Option<&'a str>,
    /// See [`AuditEvent::action`].
    pub action: &'a str,
    /// See [`Resource::resource_type`].
    pub resource_type: &'a str,
    /// See [`Resource::id`].
    pub resource_id: &'a str,
    /// See [`AuditEvent::outcome`].
    pub outcome: Outcome,
    /// See [`AuditEvent::reason`].
    pub reason: Option<&'a str>,
    /// See [`AuditEvent::trace_id`].
    pub trace_id: Option<&'a str>,
    /// See [`AuditEvent::details`].
    pub details: Option<&'a str>,
    /// See [`AuditEvent::session_id`].
    pub session_id: Option<&'a str>,
}

impl AuditEvent {
    /// The event as a view borrowing its text.
    pub fn view(&self) -> EventView<'_> {
        EventView {
            event_id: self.event_id,
            occurred_at: self.occurred_at,
            tenant_id: &self.tenant_id,
            actor_id: &self.actor.id,
            actor_type: self.actor.actor_type,
            actor_ip: self.actor.ip.as_deref(),
            actor_user_agent: self.actor.user_agent.as_deref(),
            action: &self.action,
            resource_type: &self.resource.resource_type,
            resource_id: &self.resource.id,
            outcome: self.outcome,
            reason: self.reason.as_deref(),
            trace_id: self.trace_id.as_deref(),
            details: self.details.as_deref(),
            session_id: self.session_id.as_deref(),
        }
    }
}

impl EventView<'_> {
    /// The event with its text copied out.
    pub fn to_event(&self) -> AuditEvent {
        let owned = |text: Option<&str>| text.map(str::to_owned);
        AuditEvent {
            event_id: self.event_id,
            occurred_at: self.occurred_at,
            tenant_id: self.tenant_id.to_owned(),
            actor: Actor {
                id: self.actor_id.to_owned(),
                actor_type: self.actor_type,
                ip: owned(self.actor_ip),
                user_agent: owned(self.actor_user_agent),
            },
            action: self.action.to_owned(),
            resource: Resource {
                resource_type: self.resource_type.to_owned(),
                id: self.resource_id.to_owned(),
            },
            outcome: self.outcome,
            reason: owned(self.reason),
            trace_id: owned(self.trace_id),
            details: owned(self.details),
            session_id: owned(self.session_id),
        }
    }
}

/// Returns a 16-byte fingerprint of every field of the event, independent of the wire format and
/// writer schema: the same event written with v1 or v2 (with no session) hashes the same. Used to
/// tell a redelivery (same id, same content) from an id reused for different content.
///
/// `details` is hashed as the text it arrived as, so re-serialised JSON with other spacing or key
/// order hashes differently.
pub fn content_hash(event: &AuditEvent) -> [u8; 16] {
    view_content_hash(&event.view())
}

/// [`content_hash`] of a view.
pub fn view_content_hash(event: &EventView<'_>) -> [u8; 16] {
    let digest = crate::chain::digest_encoded(|out| {
        // Domain separation and a version, so the serialisation can change without silent
        // collisions.
        out.extend_from_slice(b"auditflow.content.v1\0");
        out.extend_from_slice(event.event_id.as_bytes());
        out.extend_from_slice(&event.occurred_at.timestamp_micros().to_be_bytes());
        push_text(out, event.tenant_id);
        push_text(out, event.actor_id);
        push_text(out, event.actor_type.as_str());
        push_optional_text(out, event.actor_ip);
        push_optional_text(out, event.actor_user_agent);
        push_text(out, event.action);
        push_text(out, event.resource_type);
        push_text(out, event.resource_id);
        push_text(out, event.outcome.as_str());
        push_optional_text(out, event.reason);
        push_optional_text(out, event.trace_id);
        push_optional_text(out, event.details);
        push_optional_text(out, event.session_id);
        Ok::<(), std::convert::Infallible>(())
    });
    let Ok(digest) = digest;
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&digest[..16]);
    hash
}

fn push_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// `0` for none, else `1` and the text as [`push_text`] writes it: the row digest's encoding of a
/// text column, shared with it.
fn push_optional_text(out: &mut Vec<u8>, text: Option<&str>) {
    crate::chain::text_field(out, text.map(str::as_bytes));
}
