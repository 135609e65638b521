//! The `auditflow` binary: parses the command, sets up telemetry and configuration, and hands
//! over to the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use auditflow::produce::ProduceOptions;
use auditflow::{demo, produce, store, telemetry, Config, Sink};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Kafka-to-PostgreSQL audit-event sink. Configuration comes from AUDITFLOW_* variables.
#[derive(Debug, Parser)]
#[command(name = "auditflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates or upgrades the database schema.
    Migrate,
    /// Runs the sink until SIGINT/SIGTERM (or until idle).
    Run {
        /// Exit 0 once everything received is stored and committed and nothing new arrived for
        /// SECS seconds; prints a JSON summary line.
        #[arg(long, value_name = "SECS")]
        until_idle: Option<f64>,
    },
    /// Writes realistic Confluent-framed audit events to the topic.
    Produce {
        /// Distinct valid events to write.
        #[arg(long)]
        count: u64,
        /// Producer-retry duplicates, relative to valid events.
        #[arg(long, default_value_t = 0.0)]
        duplicate_ratio: f64,
        /// Invalid records, relative to valid events.
        #[arg(long, default_value_t = 0.0)]
        invalid_ratio: f64,
        /// Records per second (unlimited when absent).
        #[arg(long, value_name = "EPS")]
        rate: Option<f64>,
        /// Random seed; the same seed writes the same records.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Runs the whole flow on an embedded broker (or AUDITFLOW_KAFKA_BROKERS) and prints a summary.
    Demo {
        /// Distinct valid events to produce.
        #[arg(long, default_value_t = 20_000)]
        count: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(config.sink.log_format == "json");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "auditflow failed");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let url = config.require_database_url()?;
            let pool = store::connect(&config.database, url.expose()).await?;
            store::migrate(&pool, &config.database.db_schema)
                .await
                .context("migrating the database")?;
            tracing::info!(schema = %config.database.db_schema, "database schema is up to date");
            Ok(())
        }
        Command::Run { until_idle } => {
            config.require_brokers()?;
            config.require_database_url()?;
            telemetry::init_metrics(&config.sink.metrics_addr).context("AUDITFLOW_METRICS_ADDR")?;
            let shutdown = shutdown_on_signal();
            let sink = Sink::build(config).await?;
            let idle = until_idle.map(Duration::from_secs_f64);
            let summary = sink.run_until_stopped(shutdown, idle).await?;
            if idle.is_some() {
                println!("{}", serde_json::to_string(&summary)?);
            }
            tracing::info!(?summary, "stopped");
            Ok(())
        }
        Command::Produce {
            count,
            duplicate_ratio,
            invalid_ratio,
            rate,
            seed,
        } => {
            let options = ProduceOptions {
                count,
                duplicate_ratio,
                invalid_ratio,
                rate,
                seed: seed.unwrap_or_else(rand::random),
            };
            let brokers = config.require_brokers()?.to_owned();
            let summary = produce::produce(&brokers, &config, &options).await?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Demo { count } => {
            let shutdown = shutdown_on_signal();
            let report = demo::run(config, count, shutdown).await?;
            println!("{report}");
            Ok(())
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(err) => {
                        tracing::error!(error = %err, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        trigger.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; draining");
        trigger.cancel();
    });
    token
}
