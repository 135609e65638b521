//! What a request asks for, as SQL: filters, keyset pagination with an opaque cursor, and the
//! encoding of rows as JSON and CSV.
//!
//! Every query names `tenant_id` and a bounded `occurred_at` range, so the planner prunes to the
//! partitions of the range and uses `events_tenant_time_idx`. Pagination is keyset on
//! `(occurred_at, event_id)`, never OFFSET: a page is as cheap at the millionth row as at the
//! first, and rows inserted meanwhile cause neither duplicates nor gaps between pages.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgArguments;
use sqlx::Arguments as _;
use uuid::Uuid;

use super::error::ApiError;

/// Columns read, in this order, by every query (see [`EventRow`]).
pub const SELECT_COLUMNS: &str =
    "event_id, occurred_at, tenant_id, actor_id, actor_type, actor_ip, \
    actor_user_agent, action, resource_type, resource_id, outcome, reason, trace_id, \
    details::text AS details, session_id, content_hash, schema_version, kafka_topic, \
    kafka_partition, kafka_offset, kafka_timestamp, ingested_at";

/// Column names of the CSV header and the JSON object keys, in order.
pub const FIELD_NAMES: [&str; 22] = [
    "event_id",
    "occurred_at",
    "tenant_id",
    "actor_id",
    "actor_type",
    "actor_ip",
    "actor_user_agent",
    "action",
    "resource_type",
    "resource_id",
    "outcome",
    "reason",
    "trace_id",
    "details",
    "session_id",
    "content_hash",
    "schema_version",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_timestamp",
    "ingested_at",
];

/// Which way pages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Newest first (the default).
    Desc,
    /// Oldest first.
    Asc,
}

impl Order {
    fn sql(self) -> &'static str {
        match self {
            Order::Desc => "DESC",
            Order::Asc => "ASC",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Order::Desc => "desc",
            Order::Asc => "asc",
        }
    }
}

/// The position after the last row of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `occurred_at` of the last row returned.
    pub occurred_at: DateTime<Utc>,
    /// `event_id` of the last row returned.
    pub event_id: Uuid,
    /// The order the cursor was made for.
    pub order: Order,
}

impl Cursor {
    /// Encodes the cursor as an opaque string (hex of order, microseconds and id).
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(25);
        bytes.push(match self.order {
            Order::Desc => b'd',
            Order::Asc => b'a',
        });
        bytes.extend_from_slice(&self.occurred_at.timestamp_micros().to_be_bytes());
        bytes.extend_from_slice(self.event_id.as_bytes());
        let mut text = String::with_capacity(50);
        for byte in bytes {
            let _ = write!(text, "{byte:02x}");
        }
        text
    }

    /// Decodes what [`Cursor::encode`] made.
    pub fn decode(text: &str) -> Option<Self> {
        if text.len() != 50 || !text.is_ascii() {
            return None;
        }
        let bytes: Vec<u8> = (0..25)
            .map(|index| u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok())
            .collect::<Option<_>>()?;
        let order = match bytes[0] {
            b'd' => Order::Desc,
            b'a' => Order::Asc,
            _ => return None,
        };
        let micros = i64::from_be_bytes(bytes[1..9].try_into().ok()?);
        let event_id = Uuid::from_slice(&bytes[9..25]).ok()?;
        Some(Cursor {
            occurred_at: DateTime::from_timestamp_micros(micros)?,
            event_id,
            order,
        })
    }
}

/// The filters every query and export takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filters {
    /// Required.
    pub tenant: String,
    /// Inclusive start.
    pub from: DateTime<Utc>,
    /// Exclusive end.
    pub to: DateTime<Utc>,
    /// Optional exact filters, by column (`actor_id`, `outcome`, ...).
    pub exact: BTreeMap<&'static str, String>,
    /// `action`: exact, or a prefix when it ended in `*` (stored without the `*`).
    pub action: Option<ActionFilter>,
    /// One event, for `/v1/events/{event_id}`.
    pub event_id: Option<Uuid>,
}

/// The `action` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionFilter {
    /// `action=order.update`.
    Exact(String),
    /// `action=order.*`: actions starting with `order.`.
    Prefix(String),
}

/// A page query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    /// What to read.
    pub filters: Filters,
    /// Which way.
    pub order: Order,
    /// Rows per page.
    pub limit: u32,
    /// Where the previous page ended.
    pub cursor: Option<Cursor>,
}

/// A typed query argument, bound in order as `$1`, `$2`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// `text`.
    Text(String),
    /// `timestamptz`.
    Time(DateTime<Utc>),
    /// `uuid`.
    Id(Uuid),
    /// `bigint`.
    Int(i64),
}

/// SQL with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sql {
    /// The statement, with `$n` placeholders.
    pub text: String,
    /// Arguments for the placeholders.
    pub args: Vec<Arg>,
}

impl Sql {
    fn push_arg(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }

    /// The arguments, encoded in order for the placeholders: pass them to `sqlx::query_with`
    /// or `sqlx::query_as_with` with [`Sql::text`].
    pub fn arguments(&self) -> Result<PgArguments, sqlx::Error> {
        let mut arguments = PgArguments::default();
        for arg in &self.args {
            match arg {
                Arg::Text(value) => arguments.add(value.as_str()),
                Arg::Time(value) => arguments.add(*value),
                Arg::Id(value) => arguments.add(*value),
                Arg::Int(value) => arguments.add(*value),
            }
            .map_err(sqlx::Error::Encode)?;
        }
        Ok(arguments)
    }
}

/// Escapes `%`, `_` and `\` so a prefix matches literally in `LIKE`.
fn like_prefix(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len() + 1);
    for character in prefix.chars() {
        if matches!(character, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped.push('%');
    escaped
}

impl Filters {
    /// The `WHERE` clause (without the keyword) and its arguments.
    fn where_clause(&self, sql: &mut Sql) -> String {
        let tenant = sql.push_arg(Arg::Text(self.tenant.clone()));
        let from = sql.push_arg(Arg::Time(self.from));
        let to = sql.push_arg(Arg::Time(self.to));
        let mut clause =
            format!("tenant_id = {tenant} AND occurred_at >= {from} AND occurred_at < {to}");
        for (column, value) in &self.exact {
            let placeholder = sql.push_arg(Arg::Text(value.clone()));
            let _ = write!(clause, " AND {column} = {placeholder}");
        }
        match &self.action {
            Some(ActionFilter::Exact(action)) => {
                let placeholder = sql.push_arg(Arg::Text(action.clone()));
                let _ = write!(clause, " AND action = {placeholder}");
            }
            Some(ActionFilter::Prefix(prefix)) => {
                let placeholder = sql.push_arg(Arg::Text(like_prefix(prefix)));
                let _ = write!(clause, " AND action LIKE {placeholder}");
            }
            None => {}
        }
        if let Some(event_id) = self.event_id {
            let placeholder = sql.push_arg(Arg::Id(event_id));
            let _ = write!(clause, " AND event_id = {placeholder}");
        }
        clause
    }

    /// The export statement: every matching row, oldest first.
    pub fn export_sql(&self, schema: &str) -> Sql {
        let mut sql = Sql {
            text: String::new(),
            args: Vec::new(),
        };
        let clause = self.where_clause(&mut sql);
        sql.text = format!(
            "SELECT {SELECT_COLUMNS} FROM {}.events WHERE {clause} ORDER BY occurred_at ASC, event_id ASC",
            crate::db::quote_ident(schema)
        );
        sql
    }

    /// A stable description of the filters for cache keys.
    fn describe(&self, out: &mut String) {
        let _ = write!(
            out,
            "tenant={:?};from={};to={}",
            self.tenant,
            self.from.timestamp_micros(),
            self.to.timestamp_micros()
        );
        for (column, value) in &self.exact {
            let _ = write!(out, ";{column}={value:?}");
        }
        match &self.action {
            Some(ActionFilter::Exact(action)) => {
                let _ = write!(out, ";action={action:?}");
            }
            Some(ActionFilter::Prefix(prefix)) => {
                let _ = write!(out, ";action_prefix={prefix:?}");
            }
            None => {}
        }
        if let Some(event_id) = self.event_id {
            let _ = write!(out, ";event_id={event_id}");
        }
    }
}

impl PageQuery {
    /// The page statement: `limit + 1` rows, to know whether there is a next page.
    pub fn sql(&self, schema: &str) -> Sql {
        let mut sql = Sql {
            text: String::new(),
            args: Vec::new(),
        };
        let mut clause = self.filters.where_clause(&mut sql);
        if let Some(cursor) = &self.cursor {
            let at = sql.push_arg(Arg::Time(cursor.occurred_at));
            let id = sql.push_arg(Arg::Id(cursor.event_id));
            let comparison = match self.order {
                Order::Desc => "<",
                Order::Asc => ">",
            };
            let _ = write!(
                clause,
                " AND (occurred_at, event_id) {comparison} ({at}, {id})"
            );
        }
        let limit = sql.push_arg(Arg::Int(i64::from(self.limit) + 1));
        let order = self.order.sql();
        sql.text = format!(
            "SELECT {SELECT_COLUMNS} FROM {}.events WHERE {clause} \
             ORDER BY occurred_at {order}, event_id {order} LIMIT {limit}",
            crate::db::quote_ident(schema)
        );
        sql
    }

    /// The cache key: a digest of everything that decides the result.
    pub fn cache_key(&self, kind: &str) -> String {
        let mut description = format!("{kind};");
        self.filters.describe(&mut description);
        let _ = write!(
            description,
            ";order={};limit={}",
            self.order.as_str(),
            self.limit
        );
        if let Some(cursor) = &self.cursor {
            let _ = write!(description, ";cursor={}", cursor.encode());
        }
        let digest = Sha256::digest(description.as_bytes());
        let mut key = String::with_capacity(64);
        for byte in digest {
            let _ = write!(key, "{byte:02x}");
        }
        key
    }
}

/// One stored event as read back.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// Producer's id.
    pub event_id: Uuid,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// Tenant.
    pub tenant_id: String,
    /// Actor id.
    pub actor_id: String,
    /// `USER`, `SERVICE` or `SYSTEM`.
    pub actor_type: String,
    /// Actor IP, if sent.
    pub actor_ip: Option<String>,
    /// Actor user agent, if sent.
    pub actor_user_agent: Option<String>,
    /// Action.
    pub action: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: String,
    /// `SUCCESS`, `FAILURE` or `DENIED`.
    pub outcome: String,
    /// Reason.
    pub reason: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// The JSON object, as text.
    pub details: Option<String>,
    /// Session id.
    pub session_id: Option<String>,
    /// Identity digest.
    pub content_hash: Vec<u8>,
    /// Writer schema version.
    pub schema_version: Option<i16>,
    /// Kafka topic.
    pub kafka_topic: String,
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
    /// Kafka message timestamp.
    pub kafka_timestamp: Option<DateTime<Utc>>,
    /// When auditflow stored it.
    pub ingested_at: DateTime<Utc>,
}

/// RFC 3339 UTC with microseconds, as every time in a response.
pub fn format_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn time_text(at: DateTime<Utc>) -> String {
    format_time(at)
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Appends `text` as a JSON string.
pub fn push_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for character in text.chars() {
        match character {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            // Also escapes < > & so a response can never be sniffed or embedded as markup.
            c if (c as u32) < 0x20 || matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}') => {
                let _ = write!(VecWriter(out), "\\u{:04x}", c as u32);
            }
            c => {
                let mut buffer = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            }
        }
    }
    out.push(b'"');
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

impl EventRow {
    /// The row's values as text, in [`FIELD_NAMES`] order (`None` for NULL); `details` is JSON.
    fn values(&self) -> [Option<String>; 22] {
        [
            Some(self.event_id.to_string()),
            Some(time_text(self.occurred_at)),
            Some(self.tenant_id.clone()),
            Some(self.actor_id.clone()),
            Some(self.actor_type.clone()),
            self.actor_ip.clone(),
            self.actor_user_agent.clone(),
            Some(self.action.clone()),
            Some(self.resource_type.clone()),
            Some(self.resource_id.clone()),
            Some(self.outcome.clone()),
            self.reason.clone(),
            self.trace_id.clone(),
            self.details.clone(),
            self.session_id.clone(),
            Some(hex(&self.content_hash)),
            self.schema_version.map(|version| version.to_string()),
            Some(self.kafka_topic.clone()),
            Some(self.kafka_partition.to_string()),
            Some(self.kafka_offset.to_string()),
            self.kafka_timestamp.map(time_text),
            Some(time_text(self.ingested_at)),
        ]
    }

    /// Appends the row as one JSON object: fields under their column names, `details` as JSON,
    /// numbers as numbers.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (index, (name, value)) in FIELD_NAMES.iter().zip(self.values()).enumerate() {
            if index > 0 {
                out.push(b',');
            }
            push_json_string(out, name);
            out.push(b':');
            match value {
                None => out.extend_from_slice(b"null"),
                // jsonb's text output is valid JSON.
                Some(text) if *name == "details" => out.extend_from_slice(text.as_bytes()),
                Some(text)
                    if matches!(*name, "schema_version" | "kafka_partition" | "kafka_offset") =>
                {
                    out.extend_from_slice(text.as_bytes())
                }
                Some(text) => push_json_string(out, &text),
            }
        }
        out.push(b'}');
    }

    /// Appends the row as one CSV record (RFC 4180; NULL as an empty field, values verbatim).
    pub fn write_csv(&self, out: &mut Vec<u8>) {
        for (index, value) in self.values().iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            if let Some(text) = value {
                push_csv_field(out, text);
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends one CSV field, quoted when it holds a separator, a quote or a line break.
pub fn push_csv_field(out: &mut Vec<u8>, text: &str) {
    if text.contains([',', '"', '\n', '\r']) {
        out.push(b'"');
        out.extend_from_slice(text.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(text.as_bytes());
    }
}

/// The CSV header record.
pub fn csv_header() -> Vec<u8> {
    let mut out = FIELD_NAMES.join(",").into_bytes();
    out.extend_from_slice(b"\r\n");
    out
}

/// Parses an RFC 3339 time (or `YYYY-MM-DD`, midnight UTC) from parameter `name`.
pub fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(value) {
        return Ok(at.with_timezone(&Utc));
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        if let Some(midnight) = day.and_hms_opt(0, 0, 0) {
            return Ok(midnight.and_utc());
        }
    }
    Err(ApiError::bad_request(format!(
        "{name} must be an RFC 3339 time such as 2026-03-01T00:00:00Z (or a date, 2026-03-01), got {value:?}"
    )))
}

/// The filters allowed besides `tenant`, `from`, `to` and `action`, by parameter, with the
/// column each one compares.
pub const EXACT_FILTERS: [(&str, &str); 7] = [
    ("actor", "actor_id"),
    ("actor_type", "actor_type"),
    ("resource_type", "resource_type"),
    ("resource_id", "resource_id"),
    ("outcome", "outcome"),
    ("trace_id", "trace_id"),
    ("session_id", "session_id"),
];

/// Limits the parser enforces.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// The longest `to - from`.
    pub max_span: chrono::Duration,
    /// `limit` when absent.
    pub default_limit: u32,
    /// The largest `limit`.
    pub max_limit: u32,
}

/// Parses the filters of `params`; `extra` names the other parameters the caller accepts.
pub fn parse_filters(
    params: &[(String, String)],
    limits: &ParseLimits,
    extra: &[&str],
) -> Result<Filters, ApiError> {
    let mut seen = BTreeMap::new();
    for (name, value) in params {
        let known = matches!(name.as_str(), "tenant" | "from" | "to" | "action")
            || EXACT_FILTERS.iter().any(|(param, _)| param == name)
            || extra.contains(&name.as_str());
        if !known {
            return Err(ApiError::bad_request(format!(
                "unknown parameter {name:?}; filters are tenant, from, to, actor, actor_type, action, \
                 resource_type, resource_id, outcome, trace_id, session_id"
            )));
        }
        if seen.insert(name.as_str(), value.as_str()).is_some() {
            return Err(ApiError::bad_request(format!(
                "parameter {name:?} is given twice"
            )));
        }
    }
    let required = |name: &str| {
        seen.get(name)
            .filter(|value| !value.is_empty())
            .copied()
            .ok_or_else(|| ApiError::bad_request(format!("{name} is required")))
    };
    let tenant = required("tenant")?.to_owned();
    let from = parse_time("from", required("from")?)?;
    let to = parse_time("to", required("to")?)?;
    if from >= to {
        return Err(ApiError::bad_request("from must be before to"));
    }
    if to - from > limits.max_span {
        return Err(ApiError::bad_request(format!(
            "the range from {} to {} spans more than {} days (AUDITFLOW_SERVE_MAX_SPAN_DAYS); narrow it",
            time_text(from),
            time_text(to),
            limits.max_span.num_days()
        )));
    }
    let mut exact = BTreeMap::new();
    for (param, column) in EXACT_FILTERS {
        if let Some(value) = seen.get(param) {
            let value = match param {
                "actor_type" | "outcome" => value.to_ascii_uppercase(),
                _ => (*value).to_owned(),
            };
            exact.insert(column, value);
        }
    }
    let action = seen
        .get("action")
        .map(|action| match action.strip_suffix('*') {
            Some(prefix) => ActionFilter::Prefix(prefix.to_owned()),
            None => ActionFilter::Exact((*action).to_owned()),
        });
    Ok(Filters {
        tenant,
        from,
        to,
        exact,
        action,
        event_id: None,
    })
}

/// Parses a page query: the filters plus `limit`, `order` and `cursor`.
pub fn parse_page(
    params: &[(String, String)],
    limits: &ParseLimits,
) -> Result<PageQuery, ApiError> {
    let filters = parse_filters(params, limits, &["limit", "order", "cursor"])?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let limit = match get("limit") {
        None | Some("") => limits.default_limit,
        Some(text) => match text.parse::<u32>() {
            Ok(limit) if limit >= 1 && limit <= limits.max_limit => limit,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be a whole number from 1 to {} (AUDITFLOW_SERVE_MAX_LIMIT), got {text:?}",
                    limits.max_limit
                )))
            }
        },
    };
    let order = match get("order") {
        None | Some("") | Some("desc") => Order::Desc,
        Some("asc") => Order::Asc,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order must be desc or asc, got {other:?}"
            )))
        }
    };
    let cursor = match get("cursor") {
        None | Some("") => None,
        Some(text) => match Cursor::decode(text) {
            Some(cursor) if cursor.order == order => Some(cursor),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "this cursor was made for the other order; keep order as it was",
                ))
            }
            None => {
                return Err(ApiError::bad_request(
                    "cursor is not one this API returned (pass next_cursor as it is)",
                ))
            }
        },
    };
    Ok(PageQuery {
        filters,
        order,
        limit,
        cursor,
    })
}

/// Renders a page: `{"events": [...], "next_cursor": "..."|null}`. `rows` holds up to
/// `limit + 1` rows; the extra one only says that a next page exists.
pub fn render_page(rows: &[EventRow], query: &PageQuery) -> Vec<u8> {
    let limit = query.limit as usize;
    let page = &rows[..rows.len().min(limit)];
    let mut out = Vec::with_capacity(page.len() * 700 + 64);
    out.extend_from_slice(b"{\"events\":[");
    for (index, row) in page.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        row.write_json(&mut out);
    }
    out.extend_from_slice(b"],\"next_cursor\":");
    match page.last().filter(|_| rows.len() > limit) {
        Some(last) => push_json_string(
            &mut out,
            &Cursor {
                occurred_at: last.occurred_at,
                event_id: last.event_id,
                order: query.order,
            }
            .encode(),
        ),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    // Cached as is: the allocation, not just the length, is what the cache holds.
    out.shrink_to_fit();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn limits() -> ParseLimits {
        ParseLimits {
            max_span: chrono::Duration::days(31),
            default_limit: 100,
            max_limit: 1000,
        }
    }

    #[test]
    fn a_cursor_round_trips_and_rejects_anything_else() {
        let cursor = Cursor {
            occurred_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            event_id: Uuid::from_u128(42),
            order: Order::Asc,
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(Cursor::decode("zz"), None);
        assert_eq!(Cursor::decode(&"x".repeat(50)), None);
    }

    #[test]
    fn filters_become_parameters_never_sql_text() {
        let query = parse_page(
            &params(&[
                ("tenant", "acme'; DROP TABLE events; --"),
                ("from", "2026-03-01"),
                ("to", "2026-03-02T00:00:00Z"),
                ("action", "order.%_*"),
                ("outcome", "denied"),
                ("order", "asc"),
                ("limit", "10"),
            ]),
            &limits(),
        )
        .unwrap();
        let sql = query.sql("audit");
        assert!(!sql.text.contains("DROP"), "{}", sql.text);
        assert!(sql.text.contains("action LIKE $"), "{}", sql.text);
        assert!(sql
            .text
            .contains("ORDER BY occurred_at ASC, event_id ASC LIMIT $"));
        assert!(sql.args.contains(&Arg::Text("order.\\%\\_%".into())));
        assert!(sql.args.contains(&Arg::Text("DENIED".into())));
        assert!(sql.args.contains(&Arg::Int(11)), "limit + 1 rows");
    }

    #[test]
    fn bad_parameters_are_refused_with_what_to_change() {
        for (pairs, needle) in [
            (vec![("from", "2026-03-01"), ("to", "2026-03-02")], "tenant"),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "2026-01-01"),
                    ("to", "2026-03-01"),
                ],
                "AUDITFLOW_SERVE_MAX_SPAN_DAYS",
            ),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "2026-03-02"),
                    ("to", "2026-03-01"),
                ],
                "before",
            ),
            (
                vec![("tenant", "a"), ("from", "yesterday"), ("to", "2026-03-01")],
                "RFC 3339",
            ),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "2026-03-01"),
                    ("to", "2026-03-02"),
                    ("limit", "5000"),
                ],
                "AUDITFLOW_SERVE_MAX_LIMIT",
            ),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "2026-03-01"),
                    ("to", "2026-03-02"),
                    ("colour", "red"),
                ],
                "unknown parameter",
            ),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "2026-03-01"),
                    ("to", "2026-03-02"),
                    ("cursor", "abc"),
                ],
                "cursor",
            ),
        ] {
            let err = parse_page(&params(&pairs), &limits()).unwrap_err();
            assert_eq!(err.status.as_u16(), 400);
            assert!(err.message.contains(needle), "{pairs:?}: {}", err.message);
        }
    }

    #[test]
    fn the_cache_key_changes_with_every_part_of_the_query() {
        let base = params(&[
            ("tenant", "acme"),
            ("from", "2026-03-01"),
            ("to", "2026-03-02"),
        ]);
        let key = |extra: &[(&str, &str)]| {
            let mut all = base.clone();
            all.extend(params(extra));
            parse_page(&all, &limits()).unwrap().cache_key("page")
        };
        let keys = [
            key(&[]),
            key(&[("order", "asc")]),
            key(&[("limit", "5")]),
            key(&[("actor", "u1")]),
            key(&[("action", "order.*")]),
            key(&[("action", "order.")]),
        ];
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        assert_eq!(key(&[]), key(&[]));
    }

    #[test]
    fn json_strings_escape_quotes_controls_and_markup() {
        let mut out = Vec::new();
        push_json_string(&mut out, "a\"b\\c\n<script>&\u{1}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""a\"b\\c\n\u003cscript\u003e\u0026\u0001""#
        );
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        let mut out = Vec::new();
        push_csv_field(&mut out, "plain");
        out.push(b',');
        push_csv_field(&mut out, "a,\"b\"\nc");
        assert_eq!(String::from_utf8(out).unwrap(), "plain,\"a,\"\"b\"\"\nc\"");
    }
}
