//! The query cost guard: every statement is planned first (`EXPLAIN`, never `ANALYZE`), and a
//! plan that is too expensive is refused with 422 and an explanation before it touches the data.
//!
//! Refused: a total estimated cost above the limit, more estimated rows than the limit, or a
//! sequential scan of a partition that holds more rows than the sequential-scan limit. Sessions
//! run with `plan_cache_mode = force_custom_plan` (see [`super::connect`]), so the plan checked
//! is the plan run, pruned to the partitions of the requested range.

use sqlx::{PgConnection, Row as _};

use super::error::ApiError;
use super::query::Sql;

/// Limits a plan must stay within.
#[derive(Debug, Clone, Copy)]
pub struct CostLimits {
    /// Total estimated cost of the plan.
    pub max_cost: f64,
    /// Estimated rows the plan returns.
    pub max_rows: f64,
    /// Rows of a partition above which a sequential scan of it is refused.
    pub seq_scan_max_rows: f64,
}

/// What the planner said.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Total estimated cost of the top node.
    pub total_cost: f64,
    /// Estimated rows of the top node.
    pub rows: f64,
    /// Every relation a scan node reads (partitions and indexes' tables), in plan order.
    pub relations: Vec<String>,
    /// Relations read by a sequential scan.
    pub seq_scans: Vec<String>,
}

/// Plans `sql` with its arguments (no execution).
pub async fn explain(conn: &mut PgConnection, sql: &Sql) -> Result<Plan, sqlx::Error> {
    let statement = format!("EXPLAIN (FORMAT JSON) {}", sql.text);
    let row = sqlx::query_with(&statement, sql.arguments()?)
        .fetch_one(conn)
        .await?;
    // The json type's binary form is its text.
    let text: String = row.try_get_unchecked(0)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
    let top = &value[0]["Plan"];
    let mut plan = Plan {
        total_cost: top["Total Cost"].as_f64().unwrap_or(f64::INFINITY),
        rows: top["Plan Rows"].as_f64().unwrap_or(f64::INFINITY),
        relations: Vec::new(),
        seq_scans: Vec::new(),
    };
    walk(top, &mut plan);
    Ok(plan)
}

fn walk(node: &serde_json::Value, plan: &mut Plan) {
    if let Some(relation) = node["Relation Name"].as_str() {
        plan.relations.push(relation.to_owned());
        if node["Node Type"].as_str() == Some("Seq Scan") {
            plan.seq_scans.push(relation.to_owned());
        }
    }
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            walk(child, plan);
        }
    }
}

/// Plans `sql` and refuses it when it exceeds `limits`; `what` names the request in the
/// explanation (`this query`, `this export`).
pub async fn check(
    conn: &mut PgConnection,
    schema: &str,
    sql: &Sql,
    limits: &CostLimits,
    what: &str,
) -> Result<Plan, ApiError> {
    let plan = explain(conn, sql)
        .await
        .map_err(|err| ApiError::from_database(&err))?;
    let mut large_seq_scans = Vec::new();
    if !plan.seq_scans.is_empty() {
        // reltuples is -1 until a partition was analyzed: estimate from its size then.
        let sizes: Vec<(String, f64)> = sqlx::query_as(
            "SELECT c.relname::text, CASE WHEN c.reltuples >= 0 THEN c.reltuples::float8 \
                    ELSE pg_relation_size(c.oid)::float8 / 500 END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = ANY($2)",
        )
        .bind(schema)
        .bind(&plan.seq_scans)
        .fetch_all(&mut *conn)
        .await
        .map_err(|err| ApiError::from_database(&err))?;
        large_seq_scans = sizes
            .into_iter()
            .filter(|(_, rows)| *rows > limits.seq_scan_max_rows)
            .collect();
    }
    let mut reasons = Vec::new();
    if plan.total_cost > limits.max_cost {
        reasons.push(format!(
            "its estimated cost {:.0} exceeds AUDITFLOW_SERVE_MAX_COST ({:.0})",
            plan.total_cost, limits.max_cost
        ));
    }
    if plan.rows > limits.max_rows {
        reasons.push(format!(
            "it would return an estimated {:.0} rows, more than the limit ({:.0})",
            plan.rows, limits.max_rows
        ));
    }
    for (partition, rows) in &large_seq_scans {
        reasons.push(format!(
            "it would read all of partition {partition} (~{rows:.0} rows) sequentially, more than \
             AUDITFLOW_SERVE_SEQ_SCAN_MAX_ROWS ({:.0})",
            limits.seq_scan_max_rows
        ));
    }
    if reasons.is_empty() {
        return Ok(plan);
    }
    let mut details = serde_json::Map::new();
    details.insert("estimated_cost".into(), plan.total_cost.into());
    details.insert("estimated_rows".into(), plan.rows.into());
    details.insert(
        "sequential_scans".into(),
        large_seq_scans
            .iter()
            .map(|(partition, rows)| serde_json::json!({"partition": partition, "rows": rows}))
            .collect::<Vec<_>>()
            .into(),
    );
    details.insert(
        "partitions".into(),
        plan.relations
            .iter()
            .cloned()
            .map(serde_json::Value::from)
            .collect::<Vec<_>>()
            .into(),
    );
    Err(ApiError::too_expensive(
        format!(
            "{what} was refused before it ran: {}. Narrow the time range (from/to), or add a \
             filter the indexes serve (resource_type with resource_id), or a more selective one \
             (actor, action, trace_id, session_id)",
            reasons.join("; ")
        ),
        details,
    ))
}
