//! The PostgreSQL side shared by every part: the connection pool, the embedded migrations, how
//! an error is classified ([`retry`]), and the partitions of the `events` table ([`partition`]).
//!
//! Owns: connecting, migrating, naming and creating partitions. Depends on nothing of the
//! pipeline, the commands or configuration: callers pass what they need.

pub mod partition;
pub mod retry;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

/// Migrations embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How to open a pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// The schema every connection uses as its search path.
    pub schema: String,
    /// Connections at most.
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection.
    pub acquire_timeout: Duration,
    /// Statements run on every new connection (session set-up, temporary tables).
    pub session_setup: &'static [&'static str],
}

/// Opens a pool whose connections use the settings' schema as search path and run its session
/// set-up. One connection is tried first, within the acquire timeout, so a database that cannot
/// be reached (refused, wrong password, untrusted certificate) fails with its own error: the
/// pool would only report that it timed out. The pool itself connects on demand.
pub async fn connect(url: &str, settings: &PoolSettings) -> Result<PgPool, sqlx::Error> {
    use sqlx::Connection as _;
    let options = PgConnectOptions::from_str(url)?
        .application_name("auditflow")
        .options([("search_path", settings.schema.as_str())]);
    warn_unless_verified_tls(&options);
    match tokio::time::timeout(
        settings.acquire_timeout,
        sqlx::PgConnection::connect_with(&options),
    )
    .await
    {
        Ok(Ok(connection)) => connection.close().await?,
        Ok(Err(err)) => return Err(err),
        Err(_) => return Err(sqlx::Error::PoolTimedOut),
    }
    let session_setup = settings.session_setup;
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.acquire_timeout)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                conn.execute("SET client_min_messages = warning").await?;
                for statement in session_setup {
                    conn.execute(*statement).await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options);
    Ok(pool)
}

/// Warns when a database beyond this machine is reached without a verified certificate: libpq's
/// default `sslmode=prefer` falls back to plaintext in silence, and `require` trusts any
/// certificate.
fn warn_unless_verified_tls(options: &PgConnectOptions) {
    use sqlx::postgres::PgSslMode;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let verified = matches!(
        options.get_ssl_mode(),
        PgSslMode::VerifyCa | PgSslMode::VerifyFull
    );
    if !local && !verified {
        tracing::warn!(
            host,
            sslmode = ?options.get_ssl_mode(),
            "the database connection is not verified TLS; set sslmode=verify-full and sslrootcert in AUDITFLOW_DATABASE_URL"
        );
    }
}

/// Creates the schema if needed and runs the embedded migrations in it.
///
/// Replicas starting together all migrate: a session advisory lock per schema serializes them
/// (`CREATE SCHEMA IF NOT EXISTS` alone races on the catalog's unique index).
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let key = format!("auditflow.migrate.{schema}");
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *conn)
        .await?;
    let result = async {
        sqlx::query(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .execute(&mut *conn)
        .await?;
        MIGRATOR.run(&mut *conn).await?;
        Ok::<(), sqlx::Error>(())
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *conn)
        .await?;
    result
}

/// A double-quoted identifier. Callers pass names built from dates and validated schema names.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
