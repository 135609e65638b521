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

/// Opens `connections` connections of `pool` now (fewer if it already holds some idle) and
/// leaves them idle in it, so the first statements that need them do not pay for connecting:
/// TCP, TLS (native-tls parses the system CA bundle for every connection, ~80 ms of CPU on a
/// small machine) and the session set-up.
pub async fn warm(pool: &PgPool, connections: u32) -> Result<(), sqlx::Error> {
    let held = futures::future::try_join_all((0..connections).map(|_| pool.acquire())).await?;
    drop(held);
    // A dropped connection goes back to the pool in a task of its own, after a ping: wait for
    // those tasks, so that the caller finds the connections idle rather than still on their way
    // back (on a loaded machine the tasks run well after this function would otherwise return).
    let wanted = usize::try_from(connections).unwrap_or(usize::MAX);
    let deadline = tokio::time::Instant::now() + RETURN_TO_POOL_WAIT;
    while pool.num_idle() < wanted.min(pool.size() as usize)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// How long [`warm`] waits for the connections it opened to be idle in the pool again.
const RETURN_TO_POOL_WAIT: Duration = Duration::from_secs(5);

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

/// Why [`grant_writer`] refused.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// No such role.
    #[error("role {0:?} does not exist: create it first (CREATE ROLE ... LOGIN PASSWORD ...)")]
    NoSuchRole(String),
    /// The role would bypass every grant.
    #[error(
        "role {0:?} is a superuser or owns the schema's tables: a writer must be an ordinary role \
         (least privilege is the point)"
    )]
    Privileged(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Grants `role` exactly what `auditflow run` needs in `schema`, and nothing more (idempotent):
/// reading the schema's version; SELECT and INSERT on `events` (the duplicate-tolerant path reads
/// what it skipped), `batches` and `publishers` (the hash chain, the committed-batch log); reading
/// `partition_lifecycle` and `legal_holds` (the premaking upkeep plans from them); and creating
/// partitions only through `auditflow_create_partition`.
/// No UPDATE, DELETE, TRUNCATE, no ownership, no DDL. The staging table is a temporary table:
/// PostgreSQL's default TEMP privilege on the database covers it.
pub async fn grant_writer(pool: &PgPool, schema: &str, role: &str) -> Result<(), GrantError> {
    let found: Option<(bool, bool)> = sqlx::query_as(
        "SELECT r.rolsuper, EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname = $2 AND c.relowner = r.oid) \
         FROM pg_roles r WHERE r.rolname = $1",
    )
    .bind(role)
    .bind(schema)
    .fetch_optional(pool)
    .await?;
    match found {
        None => return Err(GrantError::NoSuchRole(role.to_owned())),
        Some((true, _)) | Some((_, true)) => return Err(GrantError::Privileged(role.to_owned())),
        Some(_) => {}
    }
    let schema_q = quote_ident(schema);
    let role_q = quote_ident(role);
    let mut tx = pool.begin().await?;
    for statement in [
        format!("GRANT USAGE ON SCHEMA {schema_q} TO {role_q}"),
        format!(
            "GRANT SELECT, INSERT ON {schema_q}.events, {schema_q}.batches, \
             {schema_q}.publishers TO {role_q}"
        ),
        format!(
            "GRANT SELECT ON {schema_q}.partition_lifecycle, {schema_q}.legal_holds, \
             {schema_q}._sqlx_migrations TO {role_q}"
        ),
        format!(
            "GRANT EXECUTE ON FUNCTION {schema_q}.auditflow_create_partition(date, text) \
             TO {role_q}"
        ),
    ] {
        sqlx::query(&statement)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The latest migration embedded in this binary.
pub fn required_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The latest migration applied to `schema`, if it was ever migrated.
pub async fn schema_version(pool: &PgPool, schema: &str) -> Result<Option<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = '_sqlx_migrations')",
    )
    .bind(schema)
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar(&format!(
        "SELECT max(version) FROM {}._sqlx_migrations WHERE success",
        quote_ident(schema)
    ))
    .fetch_one(pool)
    .await
}

/// Migrates `schema` when it is behind this binary and the role may; a role that may not (a
/// least-privilege writer) gets a clear error naming `auditflow migrate` instead.
pub async fn ensure_migrated(pool: &PgPool, schema: &str) -> Result<(), EnsureMigratedError> {
    let required = required_version();
    if schema_version(pool, schema).await? == Some(required) {
        return Ok(());
    }
    match migrate(pool, schema).await {
        Ok(()) => Ok(()),
        Err(err) if retry::sqlstate(&err).as_deref() == Some("42501") => {
            let found = schema_version(pool, schema).await.ok().flatten();
            Err(EnsureMigratedError::NotAllowed {
                schema: schema.to_owned(),
                found,
                required,
            })
        }
        Err(err) => Err(err.into()),
    }
}

/// Why [`ensure_migrated`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EnsureMigratedError {
    /// The schema is behind and this role cannot migrate it.
    #[error(
        "schema {schema} is at migration {} and this auditflow needs {required}; this role \
         may not migrate it: run `auditflow migrate` as the schema's owner (and \
         `auditflow migrate --grant-writer ROLE` for this role)",
        found.map_or_else(|| "none (never migrated)".to_owned(), |v| v.to_string())
    )]
    NotAllowed {
        /// The schema.
        schema: String,
        /// Its latest migration, if any.
        found: Option<i64>,
        /// This binary's latest.
        required: i64,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A double-quoted identifier. Callers pass names built from dates and validated schema names.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
