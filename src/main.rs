//! The `auditflow` binary: parses the command, sets up telemetry and configuration, and hands
//! over to the library.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use auditflow::breaker::Breaker;
use auditflow::config::{parse_registry_urls, ConfigError};
use auditflow::ingest::decode::registry::SchemaRegistry;
use auditflow::ops::partitions::{self, PartitionLifecycle};
use auditflow::ops::replay::{self, OffsetRange, ReplayFilter, ReplayOptions};
use auditflow::ops::schemas;
use auditflow::reload::{ConfigSource, LiveConfig};
use auditflow::service::Service;
use auditflow::tools::produce::ProduceOptions;
use auditflow::tools::{bench, demo, produce};
use auditflow::{telemetry, Config};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tokio::sync::watch;
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
    /// Creates or upgrades the database schema (run it as the schema's owner).
    Migrate {
        /// Also grant ROLE exactly what `auditflow run` needs and nothing more (idempotent):
        /// SELECT and INSERT on the trail, partitions only through a function. See the README's
        /// "Deploying with least privilege".
        #[arg(long, value_name = "ROLE")]
        grant_writer: Option<String>,
    },
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
        /// Register the writer schemas under `<topic>-value` in this schema registry
        /// (comma-separated URLs) and write its ids, as Confluent's serializers do. Credentials
        /// and TLS come from AUDITFLOW_SCHEMA_REGISTRY_*.
        #[arg(long, value_name = "URL")]
        schema_registry: Option<String>,
    },
    /// Schema registry checks for producer teams.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Re-publishes dead-lettered records to their source topic, up to the end of the
    /// dead-letter topic as it was at start; parks records replayed too often. Resumable: the
    /// same command continues where an interrupted one stopped. Prints a JSON summary line.
    Replay {
        /// Only records with this auditflow.error.class (repeatable: any of them).
        #[arg(long = "error-class", value_name = "CLASS")]
        error_classes: Vec<String>,
        /// Only records that failed at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME", value_parser = replay::parse_time)]
        since: Option<DateTime<Utc>>,
        /// Only records that failed before this time (RFC 3339).
        #[arg(long, value_name = "TIME", value_parser = replay::parse_time)]
        until: Option<DateTime<Utc>>,
        /// Only records from this partition of the source topic.
        #[arg(long, value_name = "N")]
        source_partition: Option<i32>,
        /// Only records from these source offsets, inclusive (FROM.., ..TO also work).
        #[arg(long, value_name = "FROM..TO")]
        source_offsets: Option<OffsetRange>,
        /// Stop after N matching records.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        /// Report what would be replayed (error classes, most common messages); write and
        /// commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Re-publish to this topic instead of each record's source topic.
        #[arg(long, value_name = "TOPIC")]
        to_topic: Option<String>,
        /// Records written per second (unlimited when absent).
        #[arg(long, value_name = "EPS")]
        rate: Option<f64>,
        /// Park a record instead once it has been replayed N times.
        #[arg(long, value_name = "N", default_value_t = replay::DEFAULT_MAX_ATTEMPTS)]
        max_attempts: u32,
        /// Where records out of attempts go (default: the dead-letter topic + ".parking").
        #[arg(long, value_name = "TOPIC")]
        parking_topic: Option<String>,
        /// Consumer group keeping the progress (default: derived from the dead-letter topic and
        /// a hash of the filters and destinations).
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
    },
    /// Measures the COPY ceiling, the sink's throughput and its latency at half throughput;
    /// prints one JSON line (see BENCHMARKS.md).
    Bench {
        /// Events per phase.
        #[arg(long, default_value_t = 500_000)]
        events: u64,
        /// Partitions of the benchmark topics (the mock broker keeps ~5 MB per partition).
        #[arg(long, default_value_t = 128)]
        partitions: i32,
        /// Seconds the latency phase feeds the sink.
        #[arg(long, default_value_t = 10)]
        latency_seconds: u64,
    },
    /// Measures `auditflow serve` on a generated table: latency cold and warm, staleness,
    /// RSS under key churn, database load with Redis up and down, a 1,000,000-row export;
    /// prints one JSON line (see BENCHMARKS.md).
    BenchServe {
        /// Rows generated in the scratch schema.
        #[arg(long, default_value_t = 5_000_000)]
        rows: u64,
        /// Daily partitions they spread over.
        #[arg(long, default_value_t = 10)]
        days: u32,
        /// Seconds of each staleness phase.
        #[arg(long, default_value_t = 15)]
        staleness_seconds: u64,
        /// The reconciliation interval of the instance measured, ms.
        #[arg(long, default_value_t = 1000)]
        reconcile_interval_ms: u64,
        /// The L1 bound of the instance measured, bytes.
        #[arg(long, default_value_t = 32 * 1024 * 1024)]
        cache_bytes: u64,
    },
    /// Verifies the hash chain: every link's digests, then every stored row recomputed into its
    /// link's per-day digests. Exits 0 when the trail is intact, 1 naming the first broken link.
    /// Reads only.
    Verify {
        /// Recompute rows only for links committed at or after this time (every link's digests
        /// are still checked).
        #[arg(long, value_name = "TIME", value_parser = replay::parse_time)]
        since: Option<DateTime<Utc>>,
        /// A chain head (hex link digest, from an invalidation message's `head` or the sink's
        /// periodic log line) kept outside the database, which must still be in the chain.
        #[arg(long, value_name = "HEX")]
        expect_head: Option<String>,
        /// One JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The partition lifecycle of the events table: plan, apply, legal holds, restore.
    Partitions {
        #[command(subcommand)]
        command: PartitionsCommand,
    },
    /// Serves the query API, the viewer page and its metrics on AUDITFLOW_SERVE_ADDR until
    /// SIGINT/SIGTERM; SIGHUP reloads the tokens file. Reads only; never migrates.
    Serve,
    /// Runs the whole flow on an embedded broker (or AUDITFLOW_KAFKA_BROKERS) and prints a summary.
    Demo {
        /// Distinct valid events to produce.
        #[arg(long, default_value_t = 20_000)]
        count: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut live = match LiveConfig::load(ConfigSource::from_env()) {
        Ok(live) => live,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let config = live.config();
    if let Some(log) =
        telemetry::init_logging(config.sink.log_format == "json", &config.log_directives())
    {
        live.on_reload(move |config| {
            if let Err(err) = log.set(&config.log_directives()) {
                tracing::warn!(error = %err, "log level not changed");
            }
        });
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, live)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "auditflow failed");
            eprintln!("error: {err:#}");
            // Bad configuration found once a command knows what it needs, or a request refused
            // before anything was done: exit 2, as at start.
            if err
                .chain()
                .any(|cause| cause.is::<ConfigError>() || cause.is::<UsageError>())
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A command line refused before anything was done (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

async fn execute(command: Command, mut live: LiveConfig) -> anyhow::Result<()> {
    let config: Config = live.config().clone();
    match command {
        Command::Migrate { grant_writer } => {
            let url = config.require_database_url()?;
            let pool = auditflow::db::connect(url.expose(), &config.database.pool_settings())
                .await
                .context("connecting to the database")?;
            let schema = &config.database.db_schema;
            auditflow::db::migrate(&pool, schema)
                .await
                .context("migrating the database")?;
            tracing::info!(%schema, "database schema is up to date");
            if let Some(role) = grant_writer {
                auditflow::db::grant_writer(&pool, schema, &role)
                    .await
                    .with_context(|| format!("granting the writer role {role:?}"))?;
                tracing::info!(%schema, role, "writer role granted");
            }
            Ok(())
        }
        Command::Run { until_idle } => {
            let shutdown = shutdown_on_signal();
            let service = Service::build(config).await?;
            let tuning = service.tuning();
            live.on_reload(move |config| tuning.apply(config));
            let _reloader = live.spawn_on_sighup(shutdown.clone());
            let idle = until_idle.map(Duration::from_secs_f64);
            let summary = service.run_until_stopped(shutdown, idle).await?;
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
            schema_registry,
        } => {
            let options = ProduceOptions {
                count,
                duplicate_ratio,
                invalid_ratio,
                rate,
                seed: seed.unwrap_or_else(rand::random),
            };
            let brokers = config.require_brokers()?.to_owned();
            let summary = match schema_registry {
                Some(urls) => {
                    let registry = registry_client(&config, Some(&urls), "--schema-registry")?;
                    produce::produce_registered(&brokers, &config, &options, &registry).await?
                }
                None => produce::produce(&brokers, &config, &options).await?,
            };
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Schemas {
            command:
                SchemasCommand::Check {
                    subject,
                    json,
                    schema_registry,
                },
        } => {
            let registry = registry_client(
                &config,
                schema_registry.as_deref(),
                "AUDITFLOW_SCHEMA_REGISTRY_URL",
            )?;
            let subject = subject.unwrap_or_else(|| format!("{}-value", config.kafka.kafka_topic));
            let report = schemas::check(&registry, &subject)
                .await
                .with_context(|| format!("reading subject {subject} from the schema registry"))?;
            print_result(json, &report)?;
            anyhow::ensure!(
                report.all_readable(),
                "{} of {} version(s) of {subject} cannot be read by auditflow",
                if report.versions.is_empty() {
                    0
                } else {
                    report.num_unreadable()
                },
                report.versions.len()
            );
            Ok(())
        }
        Command::Replay {
            error_classes,
            since,
            until,
            source_partition,
            source_offsets,
            max,
            dry_run,
            to_topic,
            rate,
            max_attempts,
            parking_topic,
            group,
        } => {
            let options = ReplayOptions {
                filter: ReplayFilter {
                    error_classes,
                    since,
                    until,
                    source_partition,
                    source_offsets,
                },
                max,
                dry_run,
                to_topic,
                rate,
                max_attempts,
                parking_topic,
                group,
            };
            let shutdown = shutdown_on_signal();
            // --rate wins at start; AUDITFLOW_REPLAY_RATE from a SIGHUP reload wins after.
            let (rate_tx, rate_rx) = watch::channel(rate.or(config.sink.replay_rate));
            live.on_reload(move |config| {
                rate_tx.send_replace(config.sink.replay_rate.or(rate));
            });
            let _reloader = live.spawn_on_sighup(shutdown.clone());
            let summary =
                replay::replay_with_live_rate(&config, &options, rate_rx, shutdown).await?;
            eprintln!("{summary}");
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Bench {
            events,
            partitions,
            latency_seconds,
        } => {
            let options = bench::BenchOptions {
                events,
                partitions,
                latency_duration: Duration::from_secs(latency_seconds),
            };
            let report = bench::run(config, &options).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::BenchServe {
            rows,
            days,
            staleness_seconds,
            reconcile_interval_ms,
            cache_bytes,
        } => {
            let options = auditflow::tools::bench_serve::BenchServeOptions {
                rows,
                days,
                staleness_seconds,
                reconcile_interval_ms,
                cache_bytes,
            };
            let report = auditflow::tools::bench_serve::run(config, &options).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Partitions { command } => partitions_command(command, &config).await,
        Command::Verify {
            since,
            expect_head,
            json,
        } => {
            let url = config.require_database_url()?;
            let pool = auditflow::db::connect(url.expose(), &config.database.pool_settings())
                .await
                .context("connecting to the database")?;
            let options = auditflow::ops::verify::VerifyOptions {
                since,
                until: None,
                expect_head,
            };
            let report =
                auditflow::ops::verify::verify(&pool, &config.database.db_schema, &options)
                    .await
                    .context("verifying the hash chain")?;
            print_result(json, &report)?;
            let why = match &report.broken {
                Some(broken) => broken.to_string(),
                None if !report.append_only_disabled.is_empty() => format!(
                    "append-only protection is off on {}",
                    report.append_only_disabled.join(", ")
                ),
                None => "the expected head is not in the chain".to_owned(),
            };
            anyhow::ensure!(report.is_intact(), "the audit trail does not verify: {why}");
            Ok(())
        }
        Command::Serve => {
            let shutdown = shutdown_on_signal();
            let serve = auditflow::serve::Serve::build(&config).await?;
            let _reloader = live.spawn_on_sighup(shutdown.clone());
            serve.run_until_stopped(shutdown).await
        }
        Command::Demo { count } => {
            let shutdown = shutdown_on_signal();
            let report = demo::run(config, count, shutdown).await?;
            println!("{report}");
            Ok(())
        }
    }
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Fetches every version of the subject from the schema registry and reports which can and
    /// cannot be resolved into auditflow's reader schema; exits 0 when all can, 1 otherwise.
    Check {
        /// The subject (default: `<AUDITFLOW_KAFKA_TOPIC>-value`, the TopicNameStrategy).
        #[arg(long)]
        subject: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// The registry (comma-separated URLs) instead of AUDITFLOW_SCHEMA_REGISTRY_URL.
        #[arg(long, value_name = "URL")]
        schema_registry: Option<String>,
    },
}

/// A registry client for `urls` (or AUDITFLOW_SCHEMA_REGISTRY_URL), with the configured
/// credentials and TLS; `origin` names where the URLs came from in errors.
fn registry_client(
    config: &Config,
    urls: Option<&str>,
    origin: &str,
) -> anyhow::Result<SchemaRegistry> {
    let urls = match urls {
        Some(list) => parse_registry_urls(list),
        None => config.registry.urls(),
    };
    if urls.is_empty() {
        return Err(ConfigError::new(format!("{origin} is required and lists no URL")).into());
    }
    config.registry.validate_with_urls(&urls, origin)?;
    let registry = SchemaRegistry::with_urls(&config.registry, urls, config.breakers.interactive())
        .map_err(|err| ConfigError::new(err.to_string()))?;
    Ok(registry)
}

#[derive(Debug, Subcommand)]
enum PartitionsCommand {
    /// Prints what partition maintenance would do now: partitions to create (premake), to retire
    /// (past retention) and to drop (retired, grace over), and why others are kept. Changes
    /// nothing.
    Plan {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Plan as if it were TIME (RFC 3339, or YYYY-MM-DD for midnight UTC).
        #[arg(long, value_name = "TIME", value_parser = partitions::parse_time)]
        now: Option<DateTime<Utc>>,
    },
    /// Does what `plan` prints (planned again, or read from --plan FILE), re-checking every step
    /// as it runs; prints what became of each. Partitions overlapping the protected window around
    /// the real time ([real now - AUDITFLOW_ACCEPT_PAST_DAYS, real now + premake]) are never
    /// retired or dropped. Exits 1 if an action failed or was refused by that window.
    Apply {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Plan and apply as if it were TIME (recorded as the retirement time): for rehearsals on
        /// a scratch schema. A TIME more than 5 minutes from the real time is refused (exit 2)
        /// without --scratch-schema; `plan --now` shows what would happen without changing
        /// anything.
        #[arg(long, value_name = "TIME", value_parser = partitions::parse_time)]
        now: Option<DateTime<Utc>>,
        /// Apply this plan (the output of `plan --json`) instead of planning again. A plan made
        /// for a simulated time is refused like --now.
        #[arg(long, value_name = "FILE", conflicts_with = "now")]
        plan: Option<std::path::PathBuf>,
        /// AUDITFLOW_DB_SCHEMA is a scratch schema holding no real evidence: allow a --now (or a
        /// plan's time) far from the real time. The protected window still applies.
        #[arg(long)]
        scratch_schema: bool,
        /// When maintenance is running elsewhere (a replica, another `apply`), wait up to SECS
        /// for it to finish, then plan and apply; if it still runs then, report that and exit 0
        /// without doing anything.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        wait: u64,
    },
    /// Places a legal hold on [FROM, TO): no partition overlapping it is retired or dropped until
    /// it is released. Prints the hold's id.
    Hold {
        /// Start of the held range (RFC 3339 or YYYY-MM-DD), inclusive.
        #[arg(long, value_name = "TIME", value_parser = partitions::parse_time)]
        from: DateTime<Utc>,
        /// End of the held range, exclusive.
        #[arg(long, value_name = "TIME", value_parser = partitions::parse_time)]
        to: DateTime<Utc>,
        /// Why (case number, request); stored with the hold.
        #[arg(long)]
        reason: String,
    },
    /// Releases legal hold ID.
    Release {
        /// The id `hold` printed.
        id: i64,
    },
    /// Lists the active legal holds.
    Holds {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-attaches retired partition NAME (`retired_events_p…` or `events_p…`) under its original
    /// name, with every row it had.
    Restore {
        /// The partition.
        name: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Restore as if it were TIME (for tests and rehearsals).
        #[arg(long, value_name = "TIME", value_parser = partitions::parse_time, hide = true)]
        now: Option<DateTime<Utc>>,
    },
}

async fn partitions_command(command: PartitionsCommand, config: &Config) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let pool = auditflow::db::connect(url.expose(), &config.database.pool_settings())
        .await
        .context("connecting to the database")?;
    let lifecycle = PartitionLifecycle::new(
        pool,
        config.database.db_schema.clone(),
        config.partitions.clone(),
    )
    .with_breaker(Arc::new(Breaker::new(
        "postgres",
        config.breakers.interactive(),
    )));
    match command {
        PartitionsCommand::Plan { json, now } => {
            let plan = lifecycle
                .plan(now.unwrap_or_else(Utc::now))
                .await
                .context("planning partition maintenance")?;
            print_result(json, &plan)
        }
        PartitionsCommand::Apply {
            json,
            now,
            plan,
            scratch_schema,
            wait,
        } => {
            let wait = Duration::from_secs(wait);
            let report = match plan {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let plan: partitions::Plan = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not a plan", path.display()))?;
                    partitions::check_simulated_now(plan.now, Utc::now(), scratch_schema)
                        .map_err(|refusal| UsageError(format!("the plan's time: {refusal}")))?;
                    lifecycle.apply_waiting(&plan, wait).await
                }
                None => {
                    if let Some(now) = now {
                        partitions::check_simulated_now(now, Utc::now(), scratch_schema)
                            .map_err(UsageError)?;
                    }
                    lifecycle
                        .plan_and_apply(now.unwrap_or_else(Utc::now), wait)
                        .await
                }
            }
            .context("applying partition maintenance")?;
            print_result(json, &report)?;
            let failed = report
                .results
                .iter()
                .filter(|r| matches!(r.outcome, partitions::Outcome::Failed { .. }))
                .count();
            anyhow::ensure!(failed == 0, "{failed} partition action(s) failed");
            let protected = report
                .results
                .iter()
                .filter(|r| matches!(r.outcome, partitions::Outcome::Protected { .. }))
                .count();
            anyhow::ensure!(
                protected == 0,
                "{protected} partition action(s) refused: they would retire or drop partitions in \
                 the protected window {}",
                partitions::Guard::from_real_clock(lifecycle.config())
            );
            Ok(())
        }
        PartitionsCommand::Hold { from, to, reason } => {
            let id = lifecycle
                .hold(from, to, &reason)
                .await
                .context("placing a legal hold")?;
            println!("{id}");
            Ok(())
        }
        PartitionsCommand::Release { id } => {
            lifecycle
                .release(id)
                .await
                .context("releasing a legal hold")?;
            println!("released hold {id}");
            Ok(())
        }
        PartitionsCommand::Holds { json } => {
            let holds = lifecycle.holds().await.context("listing legal holds")?;
            if json {
                println!("{}", serde_json::to_string(&holds)?);
            } else if holds.is_empty() {
                println!("no active legal holds");
            } else {
                for hold in &holds {
                    println!("{hold}");
                }
            }
            Ok(())
        }
        PartitionsCommand::Restore { name, json, now } => {
            let restored = lifecycle
                .restore(&name, now.unwrap_or_else(Utc::now))
                .await
                .with_context(|| format!("restoring {name}"))?;
            print_result(json, &restored)
        }
    }
}

/// Prints `value` as one JSON line or as text.
fn print_result<T: serde::Serialize + std::fmt::Display>(
    json: bool,
    value: &T,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{value}");
    }
    Ok(())
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
