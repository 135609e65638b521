//! `auditflow verify`: walks the hash chain and recomputes every digest from the stored rows.
//!
//! For every publisher's chain (see [`crate::chain`]), in sequence order, it checks that no link
//! is missing, that each link names its predecessor's digest, and that each link's digest covers
//! what the link says. Then it reads the rows, streamed in (publisher, sequence, partition,
//! offset) order from `events` and from partitions retired by retention (detached, renamed
//! `retired_events_p…`, still queryable), and recomputes each link's per-day digests from them.
//! Days whose partition was dropped after retention are taken from the link, and reported: their
//! rows are gone by design, recorded in `partition_lifecycle`.
//!
//! It stops at the first broken link and names it: an edited row changes its day's digest, a
//! deleted one its count, a row inserted out of band either lands in a link's day (digest) or
//! names no link at all, and a removed link breaks the sequence or the next link's predecessor.
//! `--expect-head` checks that a head kept outside the database (from an invalidation message or
//! the periodic log line) is still in the chain. `--since` recomputes rows only for links
//! committed from that time, after checking every link's digests (cheap: no rows read).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use futures::TryStreamExt as _;
use serde::Serialize;
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

use crate::chain::{self, DayDigest, DayDigests, Hash, StoredRow};
use crate::db::partition::{PartitionSpec, RETIRED_PREFIX};
use crate::db::quote_ident;

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Recompute rows only for links committed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// ... and before this one (the read side's ranges).
    pub until: Option<DateTime<Utc>>,
    /// A link digest (hex) kept outside the database that must be in the chain.
    pub expect_head: Option<String>,
}

/// Why the chain does not verify: the first problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// The publisher (the chain), when the problem is in one.
    pub publisher: Option<Uuid>,
    /// The link's sequence number, when the problem is in one.
    pub batch_seq: Option<u64>,
    /// What is wrong, for a person.
    pub reason: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.publisher, self.batch_seq) {
            (Some(publisher), Some(seq)) => {
                write!(f, "link {seq} of chain {publisher}: {}", self.reason)
            }
            (Some(publisher), None) => write!(f, "chain {publisher}: {}", self.reason),
            _ => f.write_str(&self.reason),
        }
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Chains (publishers) with at least one link.
    pub chains: u64,
    /// Links whose digests were checked.
    pub links: u64,
    /// Links whose rows were recomputed.
    pub links_recomputed: u64,
    /// Rows read and digested.
    pub rows: u64,
    /// Days whose rows retention dropped: taken from the links, not recomputed.
    pub dropped_days: Vec<NaiveDate>,
    /// Rows that carry no link: stored before the chain existed (the migration counted them).
    pub rows_before_chain: u64,
    /// Each chain's last link: publisher, sequence, digest (hex).
    pub heads: Vec<(Uuid, u64, String)>,
    /// Whether `--expect-head` was found (None when not asked).
    pub expected_head_found: Option<bool>,
    /// Seconds spent.
    pub elapsed_s: f64,
    /// Rows per second.
    pub rows_per_s: f64,
    /// The first problem, or none: the chain verifies.
    pub broken: Option<Broken>,
    /// Tables whose append-only triggers (migration 0006) are missing or disabled now.
    pub append_only_disabled: Vec<String>,
}

impl VerifyReport {
    /// True when everything checked out.
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
            && self.expected_head_found != Some(false)
            && self.append_only_disabled.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} chain(s), {} link(s), {} recomputed from {} row(s) in {:.1} s ({:.0} rows/s)",
            self.chains,
            self.links,
            self.links_recomputed,
            self.rows,
            self.elapsed_s,
            self.rows_per_s
        )?;
        if !self.dropped_days.is_empty() {
            writeln!(
                f,
                "{} day(s) dropped by retention taken from their links: {} .. {}",
                self.dropped_days.len(),
                self.dropped_days[0],
                self.dropped_days[self.dropped_days.len() - 1]
            )?;
        }
        if self.rows_before_chain > 0 {
            writeln!(
                f,
                "{} row(s) stored before the chain began are not covered",
                self.rows_before_chain
            )?;
        }
        for (publisher, seq, digest) in &self.heads {
            writeln!(f, "head of {publisher}: link {seq} {digest}")?;
        }
        match self.expected_head_found {
            Some(true) => writeln!(f, "expected head found")?,
            Some(false) => writeln!(f, "BROKEN: the expected head is not in the chain")?,
            None => {}
        }
        if !self.append_only_disabled.is_empty() {
            writeln!(
                f,
                "BROKEN: append-only protection is off on {}",
                self.append_only_disabled.join(", ")
            )?;
        }
        match &self.broken {
            Some(broken) => write!(f, "BROKEN: {broken}"),
            None if self.is_intact() => write!(f, "intact"),
            None => Ok(()),
        }
    }
}

/// Errors that stop verification before a verdict (the database, not the chain).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The schema has no hash chain (migrations older than the chain).
    #[error("schema {0} has no hash chain; run auditflow migrate")]
    NoChain(String),
}

struct Link {
    publisher_id: i32,
    publisher: Uuid,
    seq: u64,
    committed_at: DateTime<Utc>,
    prev: Hash,
    digest: Hash,
    days: Vec<DayDigest>,
}

/// Verifies the chain of `schema`.
pub async fn verify(
    pool: &PgPool,
    schema: &str,
    options: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let schema_q = quote_ident(schema);
    let has_chain: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = 'batches' AND column_name = 'digest')",
    )
    .bind(schema)
    .fetch_one(pool)
    .await?;
    if !has_chain {
        return Err(VerifyError::NoChain(schema.to_owned()));
    }
    let mut report = VerifyReport {
        chains: 0,
        links: 0,
        links_recomputed: 0,
        rows: 0,
        dropped_days: Vec::new(),
        rows_before_chain: 0,
        heads: Vec::new(),
        expected_head_found: None,
        elapsed_s: 0.0,
        rows_per_s: 0.0,
        broken: None,
        append_only_disabled: append_only_disabled(pool, schema).await?,
    };
    let links = read_links(pool, &schema_q).await?;
    let expected = options
        .expect_head
        .as_deref()
        .map(|hex| chain::from_hex(hex.trim()).ok_or(hex.to_owned()));
    if let Some(Err(text)) = &expected {
        report.broken = Some(Broken {
            publisher: None,
            batch_seq: None,
            reason: format!("--expect-head {text:?} is not a SHA-256 hex digest"),
        });
    }
    // Links first: sequence, predecessor, own digest.
    let mut by_key: BTreeMap<(i32, u64), usize> = BTreeMap::new();
    let mut found_expected = false;
    let mut previous: Option<&Link> = None;
    for (index, link) in links.iter().enumerate() {
        by_key.insert((link.publisher_id, link.seq), index);
        let first_of_chain = previous.is_none_or(|p| p.publisher_id != link.publisher_id);
        if first_of_chain {
            if let Some(p) = previous {
                report
                    .heads
                    .push((p.publisher, p.seq, chain::to_hex(&p.digest)));
            }
            report.chains += 1;
        }
        report.links += 1;
        if let Some(Ok(hash)) = &expected {
            found_expected |= *hash == link.digest;
        }
        let expected_seq = if first_of_chain {
            1
        } else {
            previous.map_or(1, |p| p.seq + 1)
        };
        let expected_prev = if first_of_chain {
            chain::genesis(link.publisher)
        } else {
            previous.map_or([0; 32], |p| p.digest)
        };
        let problem = if link.seq != expected_seq {
            Some(format!(
                "links {expected_seq}..{} are missing",
                link.seq.saturating_sub(1)
            ))
        } else if link.prev != expected_prev {
            Some("it does not name its predecessor's digest".to_owned())
        } else if chain::link_digest(link.publisher, link.seq, &link.prev, &link.days)
            != link.digest
        {
            Some("its digest does not cover what it records".to_owned())
        } else {
            None
        };
        if let (Some(reason), None) = (problem, &report.broken) {
            report.broken = Some(Broken {
                publisher: Some(link.publisher),
                batch_seq: Some(link.seq),
                reason,
            });
        }
        previous = Some(link);
    }
    if let Some(p) = previous {
        report
            .heads
            .push((p.publisher, p.seq, chain::to_hex(&p.digest)));
    }
    if matches!(expected, Some(Ok(_))) {
        report.expected_head_found = Some(found_expected);
    }
    if report.broken.is_some() {
        return Ok(finish(report, started));
    }

    // Then the rows.
    let dropped: BTreeSet<NaiveDate> = dropped_days(pool, &schema_q).await?;
    report.dropped_days = dropped.iter().copied().collect();
    let in_scope = |link: &Link| {
        options.since.is_none_or(|since| link.committed_at >= since)
            && options.until.is_none_or(|until| link.committed_at < until)
    };
    let sources = row_sources(pool, schema, &schema_q).await?;
    // Columns by name: a retired table's column order may differ from the parent's.
    let columns = "publisher_id, batch_seq, event_id, occurred_at, tenant_id, actor_id, \
         actor_type, actor_ip, actor_user_agent, action, resource_type, resource_id, outcome, \
         reason, trace_id, details::text AS details, session_id, content_hash, schema_version, \
         writer_schema_id, kafka_topic, kafka_partition, kafka_offset, kafka_timestamp";
    let query = format!(
        "SELECT * FROM ({}) AS stored \
         ORDER BY publisher_id NULLS FIRST, batch_seq, kafka_partition, kafka_offset",
        sources
            .iter()
            .map(|table| format!("SELECT {columns} FROM {schema_q}.{table}"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    );
    let mut rows = sqlx::query(&query).fetch(pool);
    let mut current: Option<((i32, u64), DayDigests)> = None;
    let mut seen: BTreeSet<(i32, u64)> = BTreeSet::new();
    let mut unlinked = 0u64;
    let mut compare = |key: (i32, u64), digests: DayDigests, report: &mut VerifyReport| {
        seen.insert(key);
        let Some(&index) = by_key.get(&key) else {
            report.broken.get_or_insert(Broken {
                publisher: None,
                batch_seq: Some(key.1),
                reason: format!(
                    "{} row(s) name link {} of publisher #{}, which does not exist: inserted out of band",
                    digests.len(),
                    key.1,
                    key.0
                ),
            });
            return;
        };
        let link = &links[index];
        if !in_scope(link) {
            return;
        }
        report.links_recomputed += 1;
        let recomputed = digests.finish();
        if let Some(reason) = compare_days(&link.days, &recomputed, &dropped) {
            report.broken.get_or_insert(Broken {
                publisher: Some(link.publisher),
                batch_seq: Some(link.seq),
                reason,
            });
        }
    };
    while let Some(row) = rows.try_next().await? {
        let publisher_id: Option<i32> = row.try_get("publisher_id")?;
        let seq: Option<i64> = row.try_get("batch_seq")?;
        let (Some(publisher_id), Some(seq)) = (publisher_id, seq) else {
            unlinked += 1;
            continue;
        };
        let key = (publisher_id, u64::try_from(seq).unwrap_or_default());
        report.rows += 1;
        if current.as_ref().is_some_and(|(k, _)| *k != key) {
            if let Some((done, digests)) = current.take() {
                compare(done, digests, &mut report);
            }
        }
        let digests = &mut current.get_or_insert_with(|| (key, DayDigests::new())).1;
        let occurred_at: DateTime<Utc> = row.try_get("occurred_at")?;
        let kafka_timestamp: Option<DateTime<Utc>> = row.try_get("kafka_timestamp")?;
        let content_hash: Vec<u8> = row.try_get("content_hash")?;
        let partition: i32 = row.try_get("kafka_partition")?;
        let offset: i64 = row.try_get("kafka_offset")?;
        let stored = StoredRow {
            event_id: row.try_get("event_id")?,
            occurred_at_micros: occurred_at.timestamp_micros(),
            tenant_id: row.try_get("tenant_id")?,
            actor_id: row.try_get("actor_id")?,
            actor_type: row.try_get("actor_type")?,
            actor_ip: row.try_get("actor_ip")?,
            actor_user_agent: row.try_get("actor_user_agent")?,
            action: row.try_get("action")?,
            resource_type: row.try_get("resource_type")?,
            resource_id: row.try_get("resource_id")?,
            outcome: row.try_get("outcome")?,
            reason: row.try_get("reason")?,
            trace_id: row.try_get("trace_id")?,
            details: row.try_get("details")?,
            details_canonical: None,
            session_id: row.try_get("session_id")?,
            content_hash: &content_hash,
            schema_version: row.try_get("schema_version")?,
            writer_schema_id: row.try_get("writer_schema_id")?,
            kafka_topic: row.try_get("kafka_topic")?,
            kafka_partition: partition,
            kafka_offset: offset,
            kafka_timestamp_micros: kafka_timestamp.map(|ts| ts.timestamp_micros()),
        };
        match chain::row_digest(&stored) {
            Ok(digest) => digests.add(occurred_at.date_naive(), partition, offset, digest),
            Err(err) => {
                report.broken.get_or_insert(Broken {
                    publisher: None,
                    batch_seq: Some(key.1),
                    reason: format!("a row's details cannot be read: {err}"),
                });
            }
        }
    }
    if let Some((done, digests)) = current.take() {
        compare(done, digests, &mut report);
    }
    // Links whose rows are all gone, though not all by retention.
    for link in links.iter().filter(|link| in_scope(link)) {
        if report.broken.is_some() {
            break;
        }
        if !seen.contains(&(link.publisher_id, link.seq)) {
            if let Some(reason) = compare_days(&link.days, &[], &dropped) {
                report.broken = Some(Broken {
                    publisher: Some(link.publisher),
                    batch_seq: Some(link.seq),
                    reason,
                });
            }
        }
    }
    report.rows_before_chain = unlinked;
    let allowed: i64 = sqlx::query_scalar(&format!(
        "SELECT coalesce(max(rows_before_chain), 0) FROM {schema_q}.chain_meta"
    ))
    .fetch_one(pool)
    .await?;
    if unlinked > u64::try_from(allowed).unwrap_or_default() && report.broken.is_none() {
        report.broken = Some(Broken {
            publisher: None,
            batch_seq: None,
            reason: format!(
                "{} row(s) carry no link but only {allowed} were stored before the chain began: \
                 rows were inserted out of band",
                unlinked
            ),
        });
    }
    Ok(finish(report, started))
}

fn finish(mut report: VerifyReport, started: Instant) -> VerifyReport {
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.rows_per_s = report.rows as f64 / report.elapsed_s.max(1e-9);
    report
}

/// Compares what a link records with what its rows give; days dropped by retention are taken on
/// the link's word.
fn compare_days(
    recorded: &[DayDigest],
    recomputed: &[DayDigest],
    dropped: &BTreeSet<NaiveDate>,
) -> Option<String> {
    let found: BTreeMap<NaiveDate, &DayDigest> =
        recomputed.iter().map(|day| (day.day, day)).collect();
    for day in recorded {
        if dropped.contains(&day.day) {
            continue;
        }
        match found.get(&day.day) {
            None => return Some(format!("its {} row(s) of {} are gone", day.rows, day.day)),
            Some(again) if again.rows != day.rows => {
                return Some(format!(
                    "{} has {} row(s), the link recorded {}: rows were deleted or inserted",
                    day.day, again.rows, day.rows
                ))
            }
            Some(again) if again.digest != day.digest => {
                return Some(format!(
                    "the rows of {} do not match its digest: a row was changed",
                    day.day
                ))
            }
            Some(_) => {}
        }
    }
    let recorded_days: BTreeSet<NaiveDate> = recorded.iter().map(|day| day.day).collect();
    recomputed
        .iter()
        .find(|day| !recorded_days.contains(&day.day))
        .map(|day| {
            format!(
                "{} row(s) of {} name it but it records none that day: inserted out of band",
                day.rows, day.day
            )
        })
}

async fn read_links(pool: &PgPool, schema_q: &str) -> Result<Vec<Link>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT b.publisher_id, p.publisher, b.batch_seq, b.committed_at, b.prev_digest, \
         b.digest, b.days::text AS days \
         FROM {schema_q}.batches b JOIN {schema_q}.publishers p USING (publisher_id) \
         WHERE b.digest IS NOT NULL ORDER BY b.publisher_id, b.batch_seq"
    ))
    .fetch_all(pool)
    .await?;
    let mut links = Vec::with_capacity(rows.len());
    for row in rows {
        let hash = |name: &str| -> Result<Hash, sqlx::Error> {
            let bytes: Vec<u8> = row.try_get(name)?;
            bytes.try_into().map_err(|_| sqlx::Error::ColumnDecode {
                index: name.to_owned(),
                source: "not a 32-byte digest".into(),
            })
        };
        let days: String = row.try_get("days")?;
        let days: Vec<DayDigest> =
            serde_json::from_str(&days).map_err(|err| sqlx::Error::ColumnDecode {
                index: "days".into(),
                source: Box::new(err),
            })?;
        let seq: i64 = row.try_get("batch_seq")?;
        links.push(Link {
            publisher_id: row.try_get("publisher_id")?,
            publisher: row.try_get("publisher")?,
            seq: u64::try_from(seq).unwrap_or_default(),
            committed_at: row.try_get("committed_at")?,
            prev: hash("prev_digest")?,
            digest: hash("digest")?,
            days,
        });
    }
    Ok(links)
}

/// The tables of the trail whose append-only triggers are missing or disabled (`ALTER TABLE ...
/// DISABLE TRIGGER`): `events`, each of its partitions (TRUNCATE), `batches`, `publishers`.
async fn append_only_disabled(pool: &PgPool, schema: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH trail AS ( \
             SELECT c.oid, c.relname, c.relispartition FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND (c.relname IN ('events', 'batches', 'publishers') \
                OR c.oid IN (SELECT inhrelid FROM pg_inherits i JOIN pg_class p \
                    ON p.oid = i.inhparent AND p.relname = 'events' AND p.relnamespace = n.oid))), \
         wanted AS ( \
             SELECT oid, relname, 'auditflow_no_truncate' AS tgname FROM trail \
             UNION ALL SELECT oid, relname, 'auditflow_append_only' FROM trail) \
         SELECT DISTINCT w.relname FROM wanted w \
         LEFT JOIN pg_trigger t ON t.tgrelid = w.oid AND t.tgname = w.tgname \
         WHERE t.oid IS NULL OR t.tgenabled = 'D' \
         ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
}

/// The days of partitions retention dropped: their rows are gone by design.
async fn dropped_days(pool: &PgPool, schema_q: &str) -> Result<BTreeSet<NaiveDate>, sqlx::Error> {
    let ranges: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT range_from, range_to FROM {schema_q}.partition_lifecycle WHERE state = 'dropped'"
    ))
    .fetch_all(pool)
    .await?;
    let mut days = BTreeSet::new();
    for (from, to) in ranges {
        let mut day = from.date_naive();
        while day < to.date_naive() {
            days.insert(day);
            day = match day.succ_opt() {
                Some(next) => next,
                None => break,
            };
        }
    }
    Ok(days)
}

/// `events` and every retired (detached, not dropped) partition, whose rows still count.
async fn row_sources(
    pool: &PgPool,
    schema: &str,
    schema_q: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname LIKE 'retired\\_events\\_p%' \
         AND NOT c.relispartition",
    )
    .bind(schema)
    .fetch_all(pool)
    .await?;
    let _ = schema_q;
    let mut sources = vec!["events".to_owned()];
    for name in names {
        // Only tables whose name parses back into one of auditflow's partitions.
        if PartitionSpec::from_retired_name(&name).is_some() && name.starts_with(RETIRED_PREFIX) {
            sources.push(quote_ident(&name));
        }
    }
    Ok(sources)
}
