//! The API's errors: a status, a stable code, and a message a person can act on.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error answer: `{"error": code, "message": ..., ...details}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`bad_request`, `query_too_expensive`, ...).
    pub code: &'static str,
    /// What happened and what to do about it.
    pub message: String,
    /// More fields merged into the body (the cost guard's estimates).
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed; the message says which parameter and how.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: no token, or one that is not known.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <token> with a token listed in AUDITFLOW_SERVE_TOKENS_FILE",
        )
    }

    /// 403: the token may not read what was asked. Says nothing about the tenant itself.
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is not allowed to read the requested tenant",
        )
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 422: refused by the cost guard before touching the data.
    pub fn too_expensive(
        message: impl Into<String>,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        ApiError {
            details: Some(details),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "query_too_expensive",
                message,
            )
        }
    }

    /// 429: over the token's rate.
    pub fn rate_limited(retry_after_s: u64) -> Self {
        ApiError {
            retry_after_s: Some(retry_after_s),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this token (AUDITFLOW_SERVE_RATE_LIMIT); retry later",
            )
        }
    }

    /// 503: the database is saturated or unavailable; retry later.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            retry_after_s: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// 504: the query ran past its `statement_timeout`.
    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "query_timeout",
            "the query ran longer than its statement_timeout (AUDITFLOW_SERVE_STATEMENT_TIMEOUT_MS); \
             narrow the time range or add a filter",
        )
    }

    /// 500, for failures that are nobody's request's fault. The detail goes to the log, not
    /// the client.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the query failed; the server log has the details",
        )
    }

    /// Maps a database error: the statement timeout (57014) to 504, the rest to 500 after
    /// logging it.
    pub fn from_database(err: &sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = err {
            if db.code().as_deref() == Some("57014") {
                return Self::timeout();
            }
        }
        if matches!(err, sqlx::Error::PoolTimedOut) {
            return Self::unavailable(
                "database_busy",
                "no database connection was free in time; retry later",
            );
        }
        tracing::warn!(error = %err, "serve query failed");
        Self::internal()
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.clone().into());
        if let Some(details) = &self.details {
            for (key, value) in details {
                body.insert(key.clone(), value.clone());
            }
        }
        serde_json::Value::Object(body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        super::metrics::request_failed(self.code);
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after_s {
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
