//! `GET /v1/export`: every matching row, oldest first, streamed as NDJSON or CSV in constant
//! memory whatever the number of rows.
//!
//! The plan is checked first (so a refusal is a proper 422, before any byte of the body). Then a
//! task owns the connection, reads rows from sqlx's stream one at a time, and hands ~64 KiB
//! chunks to the response through a channel of a few chunks: when the client reads slowly the
//! channel fills, the task stops reading, PostgreSQL's socket buffer fills and the server waits.
//! Nothing is ever collected. The export holds a query slot for its whole duration and runs
//! under `AUDITFLOW_SERVE_EXPORT_STATEMENT_TIMEOUT_MS`. If the database fails midway, the
//! response is cut off without its final chunk, so a client can tell it is incomplete.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;

use super::api::AppState;
use super::error::ApiError;
use super::guard::{self, CostLimits};
use super::metrics as m;
use super::query::{self, EventRow};

/// Bytes gathered before a chunk is handed to the response.
const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks in flight between the reading task and the response.
const CHUNKS_IN_FLIGHT: usize = 4;

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (`application/x-ndjson`), the default.
    Ndjson,
    /// RFC 4180 CSV with a header line (`text/csv`).
    Csv,
}

fn format_of(params: &[(String, String)], headers: &HeaderMap) -> Result<Format, ApiError> {
    if let Some((_, format)) = params.iter().find(|(name, _)| name == "format") {
        return match format.as_str() {
            "ndjson" | "json" => Ok(Format::Ndjson),
            "csv" => Ok(Format::Csv),
            other => Err(ApiError::bad_request(format!(
                "format must be ndjson or csv, got {other:?}"
            ))),
        };
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    Ok(if accept.contains("text/csv") {
        Format::Csv
    } else {
        Format::Ndjson
    })
}

/// `GET /v1/export`.
pub async fn export(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    start(state, headers, params)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Keeps a file name to safe characters.
fn file_part(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

async fn start(
    state: AppState,
    headers: HeaderMap,
    params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let principal = state.admit(&headers)?;
    let limits = query::ParseLimits {
        max_span: state.config.max_span(),
        default_limit: state.config.serve_default_limit,
        max_limit: state.config.serve_max_limit,
    };
    let filters = query::parse_filters(&params, &limits, &["format"])?;
    if !principal.scope.allows(&filters.tenant) {
        return Err(ApiError::forbidden());
    }
    let format = format_of(&params, &headers)?;
    let permit = state.gate.permit().await?;
    let sql = filters.export_sql(&state.schema);
    let cost = CostLimits {
        max_cost: f64::INFINITY,
        max_rows: state.config.serve_export_max_rows,
        seq_scan_max_rows: state.config.serve_seq_scan_max_rows,
    };
    let timeout_ms = state.config.serve_export_statement_timeout_ms;
    let (transaction, arguments) = state
        .gate
        .run("export", async {
            let mut transaction = state.pool.begin().await?;
            sqlx::query(&format!("SET LOCAL statement_timeout = {timeout_ms}"))
                .execute(&mut *transaction)
                .await?;
            guard::check(&mut transaction, &state.schema, &sql, &cost, "this export").await?;
            Ok((transaction, sql.arguments()?))
        })
        .await?;

    let (chunk_tx, mut chunk_rx) =
        tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(CHUNKS_IN_FLIGHT);
    let task_state = Arc::clone(&state);
    tokio::spawn(async move {
        // The slot is held until the last row is handed over (or the client left).
        let _permit = permit;
        let _state = task_state;
        let mut transaction = transaction;
        let mut buffer = Vec::with_capacity(CHUNK_BYTES + 8 * 1024);
        if format == Format::Csv {
            buffer.extend_from_slice(&query::csv_header());
        }
        let mut num_rows: u64 = 0;
        {
            let mut rows = sqlx::query_as_with::<_, EventRow, _>(&sql.text, arguments)
                .fetch(&mut *transaction);
            while let Some(row) = rows.next().await {
                match row {
                    Ok(row) => {
                        num_rows += 1;
                        match format {
                            Format::Ndjson => {
                                row.write_json(&mut buffer);
                                buffer.push(b'\n');
                            }
                            Format::Csv => row.write_csv(&mut buffer),
                        }
                        if buffer.len() >= CHUNK_BYTES {
                            let chunk = Bytes::from(std::mem::replace(
                                &mut buffer,
                                Vec::with_capacity(CHUNK_BYTES + 8 * 1024),
                            ));
                            if chunk_tx.send(Ok(chunk)).await.is_err() {
                                tracing::info!(num_rows, "export abandoned by its client");
                                return;
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, num_rows, "export failed midway; response cut off");
                        let _ = chunk_tx
                            .send(Err(std::io::Error::other("export failed midway")))
                            .await;
                        return;
                    }
                }
            }
        }
        if !buffer.is_empty() {
            let _ = chunk_tx.send(Ok(Bytes::from(buffer))).await;
        }
        let _ = transaction.rollback().await;
        metrics::counter!(m::RESPONSES, "source" => "export").increment(1);
        tracing::debug!(num_rows, "export finished");
    });
    let stream = futures::stream::poll_fn(move |cx| chunk_rx.poll_recv(cx));
    let (content_type, extension) = match format {
        Format::Ndjson => ("application/x-ndjson", "ndjson"),
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
    };
    let disposition = format!(
        "attachment; filename=\"auditflow-{}-{}.{extension}\"",
        file_part(&filters.tenant),
        filters.from.format("%Y%m%dT%H%M%SZ")
    );
    let mut response = Body::from_stream(stream).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        response_headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
