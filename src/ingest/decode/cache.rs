//! The writer schemas a schema registry gave, by id. [`super::registry`] fills it; the
//! [`Decoder`](super::Decoder) reads it for every Confluent-framed message once a registry is
//! configured.
//!
//! An id's schema never changes, so each is fetched once, parsed, checked against the reader
//! schema and compiled into a plan once (`WriterSchema::load`, the same code path as the local
//! files), and kept for the life of the process. The verdict is kept too when it is final: a
//! schema that cannot be read with the reader schema is remembered as unusable (its records are
//! dead-lettered without asking again), and an id the registry does not know (404) is remembered
//! for the not-found TTL only, since it may be registered later.
//!
//! Bounds, so that a flood of random ids cannot grow memory: at most `capacity` schemas
//! (`AUDITFLOW_SCHEMA_REGISTRY_CACHE_CAPACITY`) and [`NOT_FOUND_CAPACITY`] remembered 404s.
//! Past either bound the entry inserted longest ago goes (first in, first out); an evicted schema
//! is fetched again if it shows up again, an evicted 404 is asked again. Eviction happens only
//! when something is inserted, never on the read path.
//!
//! Reads take a `parking_lot` read lock for one hash lookup and clone an `Arc`: no allocation,
//! no await, and writers (one insert per fetched id) hold the write lock only for the insert,
//! never while compiling.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use parking_lot::RwLock;

use super::{DecodeError, SchemaLoadError, WriterId, WriterSchema, READER_SCHEMA, READER_VERSION};

/// 404s remembered at most; past it the oldest is forgotten (about 40 bytes each).
pub const NOT_FOUND_CAPACITY: usize = 10_000;

/// Schemas fetched from a registry, compiled against the reader schema; shared by the decoder
/// (reads) and the registry client (inserts).
#[derive(Debug)]
pub struct RegistryCache {
    reader: Schema,
    capacity: usize,
    not_found_ttl: Duration,
    state: RwLock<State>,
    num_evictions: AtomicU64,
    /// Confluent ids looked up (one per message); exported by the registry's reporter.
    num_lookups: AtomicU64,
    /// Of those, ids the cache knew nothing about.
    num_misses: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    by_id: HashMap<u32, Entry>,
    /// The ids of `by_id` in insertion order: the front goes first.
    order: VecDeque<u32>,
    /// Both fingerprints of every usable schema (see [`WriterSchema::load`]), for single-object
    /// payloads written with a schema that so far only the registry had.
    by_fingerprint: HashMap<u64, Arc<WriterSchema>>,
    /// Ids the registry answered 404 for, and until when that answer stands.
    not_found: HashMap<u32, Instant>,
    /// `not_found` insertions in order, with the expiry each set; a stale pair (the id was
    /// remembered again later, or found since) is skipped when it reaches the front.
    not_found_order: VecDeque<(u32, Instant)>,
}

#[derive(Debug, Clone)]
enum Entry {
    Ready {
        writer: Arc<WriterSchema>,
        legacy_fingerprint: u64,
    },
    /// Registered, but not readable as an audit event: the reason, as dead letters carry it.
    Unusable(Arc<str>),
}

/// What the cache knows about an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Compiled and ready.
    Ready,
    /// Registered, but cannot be read with the reader schema.
    Unusable,
    /// The registry said 404 within the not-found TTL.
    NotFound,
    /// Nothing (never asked, evicted, or the 404 expired): fetch it.
    Unknown,
}

impl RegistryCache {
    /// An empty cache keeping at most `capacity` schemas and remembering 404s for
    /// `not_found_ttl`.
    pub fn new(capacity: usize, not_found_ttl: Duration) -> Result<Self, SchemaLoadError> {
        let reader = Schema::parse_str(READER_SCHEMA).map_err(|err| SchemaLoadError::Parse {
            version: READER_VERSION,
            reason: err.to_string(),
        })?;
        Ok(RegistryCache {
            reader,
            capacity: capacity.max(1),
            not_found_ttl,
            state: RwLock::new(State::default()),
            num_evictions: AtomicU64::new(0),
            num_lookups: AtomicU64::new(0),
            num_misses: AtomicU64::new(0),
        })
    }

    /// The bound on schemas kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Schemas (usable or not) kept now.
    pub fn num_cached(&self) -> usize {
        self.state.read().by_id.len()
    }

    /// 404s remembered now (expired ones included until they are pruned).
    pub fn num_not_found(&self) -> usize {
        self.state.read().not_found.len()
    }

    /// Schemas dropped because the cache was full.
    pub fn num_evictions(&self) -> u64 {
        self.num_evictions.load(Ordering::Relaxed)
    }

    /// Ids looked up by the decoder so far.
    pub fn num_lookups(&self) -> u64 {
        self.num_lookups.load(Ordering::Relaxed)
    }

    /// Lookups the cache could not answer (the id had to be fetched).
    pub fn num_misses(&self) -> u64 {
        self.num_misses.load(Ordering::Relaxed)
    }

    /// What is known about `id` now.
    pub fn known(&self, id: u32) -> Known {
        self.known_at(id, Instant::now())
    }

    fn known_at(&self, id: u32, now: Instant) -> Known {
        let state = self.state.read();
        match state.by_id.get(&id) {
            Some(Entry::Ready { .. }) => Known::Ready,
            Some(Entry::Unusable(_)) => Known::Unusable,
            None if state.not_found.get(&id).is_some_and(|until| *until > now) => Known::NotFound,
            None => Known::Unknown,
        }
    }

    /// The compiled writer for `id`, or the decode error its records get: permanent when the
    /// registry's answer is known, [`DecodeError::NotFetched`] when it must be asked.
    pub(crate) fn writer(&self, id: u32) -> Result<Arc<WriterSchema>, DecodeError> {
        self.num_lookups.fetch_add(1, Ordering::Relaxed);
        let state = self.state.read();
        match state.by_id.get(&id) {
            Some(Entry::Ready { writer, .. }) => Ok(Arc::clone(writer)),
            Some(Entry::Unusable(reason)) => Err(DecodeError::RegistrySchemaUnusable {
                id,
                reason: reason.to_string(),
            }),
            None => match state.not_found.get(&id) {
                // Only ids that were 404 pay for reading the clock.
                Some(until) if *until > Instant::now() => Err(DecodeError::NotRegistered(id)),
                _ => {
                    self.num_misses.fetch_add(1, Ordering::Relaxed);
                    Err(DecodeError::NotFetched(id))
                }
            },
        }
    }

    /// A usable schema fetched so far whose fingerprint is `fingerprint`.
    pub(crate) fn writer_by_fingerprint(&self, fingerprint: u64) -> Option<Arc<WriterSchema>> {
        self.state.read().by_fingerprint.get(&fingerprint).cloned()
    }

    /// Parses, checks and compiles the schema the registry gave for `id`, and keeps it. Returns
    /// why it cannot be read with the reader schema when it cannot; that verdict is kept too.
    pub fn install(&self, id: u32, schema: &str) -> Result<(), String> {
        match WriterSchema::load(WriterId::Registry(id), schema, &self.reader) {
            Ok((writer, legacy_fingerprint)) => {
                self.insert(
                    id,
                    Entry::Ready {
                        writer: Arc::new(writer),
                        legacy_fingerprint,
                    },
                );
                Ok(())
            }
            Err(err) => {
                let reason = load_error_reason(err);
                self.install_unusable(id, &reason);
                Err(reason)
            }
        }
    }

    /// Keeps `id` as registered but unreadable (not Avro, or not resolvable), with `reason`.
    pub fn install_unusable(&self, id: u32, reason: &str) {
        self.insert(id, Entry::Unusable(Arc::from(reason)));
    }

    /// Remembers that the registry does not know `id`, for the not-found TTL.
    pub fn remember_not_found(&self, id: u32) {
        self.remember_not_found_at(id, Instant::now());
    }

    fn remember_not_found_at(&self, id: u32, now: Instant) {
        let until = now + self.not_found_ttl;
        let mut state = self.state.write();
        let state = &mut *state;
        // Expired answers first, then, if still full, the oldest ones.
        while let Some(&(old_id, old_until)) = state.not_found_order.front() {
            let full = state.not_found.len() >= NOT_FOUND_CAPACITY;
            let stale = state.not_found.get(&old_id) != Some(&old_until);
            if old_until > now && !full && !stale {
                break;
            }
            state.not_found_order.pop_front();
            if state.not_found.get(&old_id) == Some(&old_until) {
                state.not_found.remove(&old_id);
            }
        }
        state.not_found.insert(id, until);
        state.not_found_order.push_back((id, until));
    }

    fn insert(&self, id: u32, entry: Entry) {
        let mut evicted = 0;
        {
            let mut state = self.state.write();
            let state = &mut *state;
            state.not_found.remove(&id);
            if let Entry::Ready {
                writer,
                legacy_fingerprint,
            } = &entry
            {
                for fingerprint in [writer.fingerprint, *legacy_fingerprint] {
                    state
                        .by_fingerprint
                        .entry(fingerprint)
                        .or_insert_with(|| Arc::clone(writer));
                }
            }
            if let Some(previous) = state.by_id.insert(id, entry) {
                forget_fingerprints(state, &previous, id);
                return;
            }
            state.order.push_back(id);
            while state.by_id.len() > self.capacity {
                let Some(oldest) = state.order.pop_front() else {
                    break;
                };
                if let Some(entry) = state.by_id.remove(&oldest) {
                    forget_fingerprints(state, &entry, oldest);
                    evicted += 1;
                }
            }
        }
        if evicted > 0 {
            self.num_evictions.fetch_add(evicted, Ordering::Relaxed);
            metrics::counter!("auditflow_schema_registry_cache_evictions_total").increment(evicted);
            tracing::warn!(
                capacity = self.capacity,
                "schema cache full; dropped the schema fetched longest ago (raise AUDITFLOW_SCHEMA_REGISTRY_CACHE_CAPACITY)"
            );
        }
    }
}

/// Drops the fingerprints `entry` (schema `id`, no longer in `by_id` as such) held, handing each
/// to another kept schema with the same fingerprint if there is one. Runs on eviction only.
fn forget_fingerprints(state: &mut State, entry: &Entry, id: u32) {
    let Entry::Ready {
        writer,
        legacy_fingerprint,
    } = entry
    else {
        return;
    };
    for fingerprint in [writer.fingerprint, *legacy_fingerprint] {
        let held_by_entry = state
            .by_fingerprint
            .get(&fingerprint)
            .is_some_and(|held| Arc::ptr_eq(held, writer) || held.id == WriterId::Registry(id));
        if !held_by_entry {
            continue;
        }
        state.by_fingerprint.remove(&fingerprint);
        let heir = state.by_id.values().find_map(|other| match other {
            Entry::Ready {
                writer,
                legacy_fingerprint,
            } if writer.fingerprint == fingerprint || *legacy_fingerprint == fingerprint => {
                Some(Arc::clone(writer))
            }
            _ => None,
        });
        if let Some(heir) = heir {
            state.by_fingerprint.insert(fingerprint, heir);
        }
    }
}

/// The reason alone, without the file-oriented "schema vN" framing of [`SchemaLoadError`].
pub(crate) fn load_error_reason(err: SchemaLoadError) -> String {
    match err {
        SchemaLoadError::Parse { reason, .. } => format!("not a valid avro schema: {reason}"),
        SchemaLoadError::Incompatible { reason, .. } => reason,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/audit_event.v1.avsc"
    ));
    const V2: &str = READER_SCHEMA;

    fn cache(capacity: usize) -> RegistryCache {
        RegistryCache::new(capacity, Duration::from_secs(30)).unwrap()
    }

    #[test]
    fn an_installed_schema_is_found_by_id_and_fingerprint() {
        let cache = cache(10);
        assert!(matches!(
            cache.writer(100_023),
            Err(DecodeError::NotFetched(100_023))
        ));
        cache.install(100_023, V2).unwrap();
        let writer = cache.writer(100_023).unwrap();
        assert_eq!(writer.id, WriterId::Registry(100_023));
        assert_eq!(cache.known(100_023), Known::Ready);
        let by_fingerprint = cache.writer_by_fingerprint(writer.fingerprint).unwrap();
        assert_eq!(by_fingerprint.id, WriterId::Registry(100_023));
    }

    #[test]
    fn an_unreadable_schema_is_remembered_with_its_reason() {
        let cache = cache(10);
        let reason = cache
            .install(
                7,
                r#"{"type":"record","name":"AuditEvent","fields":[{"name":"x","type":"int"}]}"#,
            )
            .unwrap_err();
        assert!(reason.contains("event_id"), "{reason}");
        assert_eq!(cache.known(7), Known::Unusable);
        match cache.writer(7) {
            Err(err @ DecodeError::RegistrySchemaUnusable { id: 7, .. }) => {
                assert!(err.is_permanent());
                assert!(err.to_string().contains("event_id"), "{err}");
            }
            other => panic!("{other:?}"),
        }
        let reason = cache.install(8, "{not json").unwrap_err();
        assert!(reason.starts_with("not a valid avro schema"), "{reason}");
    }

    #[test]
    fn a_not_found_id_is_remembered_for_the_ttl_only() {
        let cache = cache(10);
        let start = Instant::now();
        cache.remember_not_found_at(5, start);
        assert_eq!(
            cache.known_at(5, start + Duration::from_secs(29)),
            Known::NotFound
        );
        assert!(matches!(
            cache.writer(5),
            Err(DecodeError::NotRegistered(5))
        ));
        assert_eq!(
            cache.known_at(5, start + Duration::from_secs(30)),
            Known::Unknown
        );
        // Registered later: found from then on.
        cache.install(5, V1).unwrap();
        assert_eq!(cache.known_at(5, start), Known::Ready);
        assert_eq!(cache.num_not_found(), 0);
    }

    #[test]
    fn schemas_past_the_capacity_evict_the_oldest() {
        let cache = cache(2);
        cache.install(1, V1).unwrap();
        cache.install(2, V2).unwrap();
        let v1_fingerprint = cache.writer(1).unwrap().fingerprint;
        cache.install(3, V2).unwrap();
        assert_eq!(cache.num_cached(), 2);
        assert_eq!(cache.num_evictions(), 1);
        assert_eq!(cache.known(1), Known::Unknown, "the oldest went");
        assert!(cache.writer_by_fingerprint(v1_fingerprint).is_none());
        assert_eq!(cache.known(2), Known::Ready);
        assert_eq!(cache.known(3), Known::Ready);
        // Installing again does not count as new.
        cache.install(3, V2).unwrap();
        assert_eq!(cache.num_evictions(), 1);
        // Ids 2 and 3 share v2's fingerprint: it stays served by 3 once 2 goes.
        let v2_fingerprint = cache.writer(2).unwrap().fingerprint;
        cache.install(4, V1).unwrap();
        assert_eq!(cache.known(2), Known::Unknown);
        let heir = cache.writer_by_fingerprint(v2_fingerprint).unwrap();
        assert_eq!(heir.id, WriterId::Registry(3));
    }

    #[test]
    fn remembered_not_found_ids_are_bounded() {
        let cache = cache(10);
        let start = Instant::now();
        for id in 0..(NOT_FOUND_CAPACITY as u32 + 500) {
            cache.remember_not_found_at(id, start);
        }
        assert_eq!(cache.num_not_found(), NOT_FOUND_CAPACITY);
        assert_eq!(cache.known_at(0, start), Known::Unknown, "the oldest went");
        let newest = NOT_FOUND_CAPACITY as u32 + 499;
        assert_eq!(cache.known_at(newest, start), Known::NotFound);
        // Expired answers make room before unexpired ones are dropped.
        let later = start + Duration::from_secs(31);
        cache.remember_not_found_at(1_000_000, later);
        assert_eq!(cache.num_not_found(), 1);
        assert!(cache.state.read().not_found_order.len() <= NOT_FOUND_CAPACITY + 1);
    }
}
