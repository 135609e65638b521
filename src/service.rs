//! `auditflow run`: one replica. The sink ([`crate::ingest`]), partition upkeep beside it
//! ([`crate::ops::partitions`]) and the observability endpoints ([`crate::observe`]), built
//! together and stopped together.
//!
//! The endpoints outlive the sink's drain, so `/metrics` and `/readyz` tell the truth until the
//! process exits. Upkeep runs on the owner's connection (`AUDITFLOW_MAINTENANCE_DATABASE_URL`)
//! or, when the sink's role owns `events`, on the sink's pool; a least-privilege writer alone
//! only premakes partitions. The maintenance advisory lock makes one replica do each round.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::sink::SinkTuning;
use crate::ingest::{notify, RunSummary, Sink};
use crate::observe::{self, ObserveServer, StatusBoard};
use crate::ops::partitions::{self, PartitionLifecycle};

/// A replica, built and ready to run.
pub struct Service {
    sink: Sink,
    server: Option<ObserveServer>,
    server_shutdown: CancellationToken,
    lifecycle: PartitionLifecycle,
}

impl Service {
    /// Starts the endpoints on `AUDITFLOW_METRICS_ADDR`, then builds the sink (which connects,
    /// migrates and subscribes).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.require_brokers()?;
        config.require_database_url()?;
        let server_shutdown = CancellationToken::new();
        let board = Arc::new(StatusBoard::new(config.instance_id()));
        let server = observe::start(
            &config.sink.metrics_addr,
            Arc::clone(&board),
            server_shutdown.clone(),
        )
        .await
        .context("AUDITFLOW_METRICS_ADDR")?;
        if server.is_some() {
            notify::describe_metrics();
            partitions::describe_metrics();
        }
        let partition_config = config.partitions.clone();
        let maintenance_url = config.database.maintenance_database_url.clone();
        let pool_settings = config.database.pool_settings();
        let sink = Sink::build_with_board(config, board).await?;
        let store = sink.store();
        // Retention detaches and drops: the owner's work. With the owner's URL it runs here;
        // on the sink's own connection only if the sink's role owns `events` (a one-role
        // deployment); otherwise upkeep premakes only, through the partition function.
        let (maintenance_pool, partition_config) = match maintenance_url {
            Some(url) => (
                crate::db::connect(url.expose(), &pool_settings)
                    .await
                    .context("connecting with AUDITFLOW_MAINTENANCE_DATABASE_URL")?,
                partition_config,
            ),
            None if owns_events(store.pool(), store.schema()).await? => {
                (store.pool().clone(), partition_config)
            }
            None => {
                tracing::warn!(
                    schema = store.schema(),
                    "partition retention is not configured: this role does not own the events \
                     table and AUDITFLOW_MAINTENANCE_DATABASE_URL is unset; partitions are premade, \
                     none is retired or dropped here (run `auditflow partitions apply` as the owner)"
                );
                (
                    store.pool().clone(),
                    crate::config::PartitionConfig {
                        partition_retention_days: 0,
                        ..partition_config
                    },
                )
            }
        };
        let lifecycle = PartitionLifecycle::new(maintenance_pool, store.schema(), partition_config);
        Ok(Service {
            sink,
            server,
            server_shutdown,
            lifecycle,
        })
    }

    /// The handle a live reload uses to retune the sink.
    pub fn tuning(&self) -> SinkTuning {
        self.sink.tuning()
    }

    /// Runs the sink and partition upkeep until `shutdown` (or idleness, see
    /// [`Sink::run_until_stopped`]), then stops upkeep and the endpoints.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
        until_idle: Option<Duration>,
    ) -> anyhow::Result<RunSummary> {
        let maintenance_shutdown = CancellationToken::new();
        let maintenance = tokio::spawn(partitions::run_maintenance(
            self.lifecycle,
            maintenance_shutdown.clone(),
        ));
        let summary = self.sink.run_until_stopped(shutdown, until_idle).await;
        maintenance_shutdown.cancel();
        if let Err(err) = maintenance.await {
            tracing::warn!(error = %err, "partition maintenance task failed");
        }
        tracing::debug!("partition maintenance stopped");
        self.server_shutdown.cancel();
        if let Some(server) = self.server {
            server.stopped().await?;
        }
        tracing::debug!("endpoints stopped");
        summary
    }
}

/// Whether the connected role owns (or is a member of the owner of) `schema.events`.
async fn owns_events(pool: &sqlx::PgPool, schema: &str) -> anyhow::Result<bool> {
    let owns: Option<bool> = sqlx::query_scalar(
        "SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = 'events'",
    )
    .bind(schema)
    .fetch_optional(pool)
    .await
    .context("reading who owns the events table")?;
    Ok(owns.unwrap_or(false))
}
