//! Where the test database and Redis are, and SQL run from `Drop` impls. Used by every test
//! crate, including those that set up without the rest of `common` (tests/serve_common).
#![allow(dead_code)]

use sqlx::postgres::PgPoolOptions;

/// Where Postgres is; `AUDITFLOW_TEST_DATABASE_URL` overrides.
pub fn database_url() -> String {
    std::env::var("AUDITFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Where Redis is; `AUDITFLOW_TEST_REDIS_URL` overrides.
pub fn redis_url() -> String {
    std::env::var("AUDITFLOW_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Drops a test's schema from a `Drop` impl: on a thread of its own, since the test's runtime may
/// be shutting down.
pub fn drop_schema_blocking(schema: &str) {
    run_sql_blocking(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
}

/// Runs `sql` (one or more statements, errors ignored) as the test database's superuser, on a
/// thread and runtime of its own: for `Drop` impls, which may run while the test's runtime is
/// shutting down.
pub fn run_sql_blocking(sql: &str) {
    let sql = sql.to_owned();
    block_on_own_thread(async move {
        if let Ok(pool) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
        {
            let _ = sqlx::raw_sql(&sql).execute(&pool).await;
        }
    });
}

/// Runs `work` to completion on a thread and current-thread runtime of its own, and waits for
/// it: cleanup from `Drop` impls, which may run while the test's runtime is shutting down.
pub fn block_on_own_thread(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work);
    })
    .join();
}
