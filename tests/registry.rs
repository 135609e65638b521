//! The sink, `produce` and `schemas check` against a real Confluent-compatible schema registry
//! (Karapace, see `tests/common/registry.rs`). Every test skips, saying so, when the registry
//! is not running.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use auditflow::ingest::dlq::header as dlq_header;
use auditflow::tools::generate::{EventGenerator, GeneratorConfig, RecordKind};
use auditflow::Sink;
use chrono::Utc;
use common::registry::{self, CountingProxy, OwnedRegistry, Registrar};
use common::{header, TestEnv};
use tokio_util::sync::CancellationToken;

const IDLE: Duration = Duration::from_secs(2);

/// Valid events (no duplicates, no invalid records) written with the embedded v1 and v2 and
/// framed with registry ids `v1_id` and `v2_id`.
fn events(count: u64, seed: u64, v1_id: u32, v2_id: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    EventGenerator::new(GeneratorConfig {
        count,
        duplicate_ratio: 0.0,
        invalid_ratio: 0.0,
        seed,
        now: Utc::now(),
    })
    .with_schema_ids(BTreeMap::from([(1, v1_id), (2, v2_id)]))
    .map(|record| {
        assert_eq!(record.kind, RecordKind::Valid);
        (record.key, record.payload)
    })
    .collect()
}

fn schema_id(payload: &[u8]) -> u32 {
    u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]])
}

/// Registers fillers, then the test's own v1 and v2 under `<topic>-value`; returns their ids,
/// which are then above every local schema file version.
async fn register_v1_v2(registrar: &Registrar, env: &TestEnv) -> (u32, u32) {
    registrar.fillers(3).await;
    let tag = common::suffix();
    let subject = format!("{}-value", env.topic);
    let v1 = registrar
        .register(&subject, &registry::unique_schema(1, &tag))
        .await;
    let v2 = registrar
        .register(&subject, &registry::unique_schema(2, &tag))
        .await;
    assert!(
        v1 > 2 && v2 > 2 && v1 != v2,
        "filler-shifted ids: {v1}, {v2}"
    );
    (v1, v2)
}

async fn run_until_idle(env: &TestEnv, overrides: &[(&str, &str)]) -> auditflow::RunSummary {
    let sink = Sink::build(env.config(overrides))
        .await
        .expect("build sink");
    tokio::time::timeout(
        Duration::from_secs(180),
        sink.run_until_stopped(CancellationToken::new(), Some(IDLE)),
    )
    .await
    .expect("sink drained in time")
    .expect("sink run")
}

/// (writer_schema_id, schema_version, has session_id) -> rows.
async fn rows_by_writer(env: &TestEnv) -> BTreeMap<(Option<i64>, Option<i16>, bool), i64> {
    let rows: Vec<(Option<i64>, Option<i16>, bool, i64)> = sqlx::query_as(&format!(
        "SELECT writer_schema_id, schema_version, session_id IS NOT NULL, count(*) \
         FROM \"{}\".events GROUP BY 1, 2, 3",
        env.schema
    ))
    .fetch_all(&env.pool)
    .await
    .expect("rows by writer");
    rows.into_iter()
        .map(|(id, version, session, count)| ((id, version, session), count))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_two_registered_writer_schemas_are_stored_with_v2_session_ids() {
    let test = "events_from_two_registered_writer_schemas_are_stored_with_v2_session_ids";
    let Some(url) = registry::registry_url(test) else {
        return;
    };
    let env = TestEnv::new(2).await;
    let (v1, v2) = register_v1_v2(&Registrar::new(&url), &env).await;
    let records = events(600, 31, v1, v2);
    let num_v1 = records.iter().filter(|(_, p)| schema_id(p) == v1).count() as i64;
    let num_v2 = records.len() as i64 - num_v1;
    assert!(num_v1 > 50 && num_v2 > 300, "{num_v1} v1, {num_v2} v2");
    env.produce_payloads(&records).await;

    let proxy = CountingProxy::start(&url).await;
    // The first URL refuses connections: the next one is tried.
    let urls = format!("http://127.0.0.1:{},{}", free_port(), proxy.url());
    let summary = run_until_idle(&env, &[("AUDITFLOW_SCHEMA_REGISTRY_URL", &urls)]).await;
    assert_eq!(summary.stored, records.len() as u64);
    assert_eq!(summary.dead_lettered, 0);
    let rows = rows_by_writer(&env).await;
    // v1 has no session_id; v2's generated users have one (services and the system do not).
    let v1_rows = rows.get(&(Some(i64::from(v1)), None, false)).copied();
    assert_eq!(v1_rows, Some(num_v1), "{rows:?}");
    let v2_with_session = rows
        .get(&(Some(i64::from(v2)), None, true))
        .copied()
        .unwrap_or(0);
    let v2_without = rows
        .get(&(Some(i64::from(v2)), None, false))
        .copied()
        .unwrap_or(0);
    assert_eq!(v2_with_session + v2_without, num_v2, "{rows:?}");
    assert!(v2_with_session > num_v2 / 2, "{rows:?}");
    assert_eq!(rows.len(), 3, "nothing else, no file version: {rows:?}");
    // Each id was fetched once, whatever the number of messages.
    assert_eq!(
        proxy.count(&format!("GET /schemas/ids/{v1}")),
        1,
        "{:?}",
        proxy.requests()
    );
    assert_eq!(
        proxy.count(&format!("GET /schemas/ids/{v2}")),
        1,
        "{:?}",
        proxy.requests()
    );
    assert_eq!(proxy.requests().len(), 2, "{:?}", proxy.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_id_is_dead_lettered_per_record_with_one_request_per_burst() {
    let test = "an_unknown_id_is_dead_lettered_per_record_with_one_request_per_burst";
    let Some(url) = registry::registry_url(test) else {
        return;
    };
    let env = TestEnv::new(2).await;
    let (v1, v2) = register_v1_v2(&Registrar::new(&url), &env).await;
    // An id no registry has handed out yet.
    let unknown = 1_900_000_000 + rand::random::<u32>() % 100_000_000;
    let burst = |seed| {
        events(150, seed, v1, v2)
            .into_iter()
            .map(|(key, mut payload)| {
                payload[1..5].copy_from_slice(&unknown.to_be_bytes());
                (key, payload)
            })
            .collect::<Vec<_>>()
    };
    let good = events(100, 41, v1, v2);
    let proxy = CountingProxy::start(&url).await;
    let sink = Sink::build(env.config(&[
        ("AUDITFLOW_SCHEMA_REGISTRY_URL", &proxy.url()),
        ("AUDITFLOW_SCHEMA_REGISTRY_NOT_FOUND_TTL_MS", "600000"),
    ]))
    .await
    .expect("build sink");
    let board = sink.board();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(sink.run_until_stopped(shutdown.clone(), None));

    let first = burst(42);
    env.produce_payloads(&first).await;
    env.produce_payloads(&good).await;
    wait_until(Duration::from_secs(60), || {
        board.snapshot().totals.dead_lettered >= 150
    })
    .await;
    // A second burst, after the first was answered: the remembered 404 answers it.
    env.produce_payloads(&burst(43)).await;
    wait_until(Duration::from_secs(60), || {
        let totals = board.snapshot().totals;
        totals.dead_lettered >= 300 && totals.stored >= 100
    })
    .await;
    shutdown.cancel();
    let summary = running.await.expect("sink task").expect("sink run");
    assert_eq!(summary.dead_lettered, 300);
    assert_eq!(summary.stored, 100);
    assert_eq!(
        proxy.count(&format!("GET /schemas/ids/{unknown}")),
        1,
        "one request for 300 records: {:?}",
        proxy.requests()
    );

    let dead = env.read_dlq(300, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 300, "each record dead-lettered once");
    let offsets: BTreeSet<(String, String)> = dead
        .iter()
        .map(|m| {
            (
                header(m, dlq_header::SOURCE_PARTITION).unwrap_or_default(),
                header(m, dlq_header::SOURCE_OFFSET).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(offsets.len(), 300, "no record twice");
    for message in &dead {
        assert_eq!(
            header(message, dlq_header::ERROR_CLASS).as_deref(),
            Some("schema")
        );
        let text = header(message, dlq_header::ERROR_MESSAGE).unwrap_or_default();
        assert!(text.contains(&unknown.to_string()), "{text}");
        assert!(text.contains("40403"), "{text}");
    }
    assert!(board.snapshot().schema_registry.unwrap().not_found_ids >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_schema_that_cannot_be_resolved_is_dead_lettered_with_the_reason() {
    let test = "a_registered_schema_that_cannot_be_resolved_is_dead_lettered_with_the_reason";
    let Some(url) = registry::registry_url(test) else {
        return;
    };
    let env = TestEnv::new(1).await;
    let registrar = Registrar::new(&url);
    let (v1, v2) = register_v1_v2(&registrar, &env).await;
    let tag = common::suffix();
    let bad = registrar
        .register(
            &format!("other-{tag}-value"),
            &registry::unresolvable_schema(&tag),
        )
        .await;
    let records: Vec<_> = events(40, 51, v1, v2)
        .into_iter()
        .enumerate()
        .map(|(index, (key, mut payload))| {
            if index % 2 == 0 {
                payload[1..5].copy_from_slice(&bad.to_be_bytes());
            }
            (key, payload)
        })
        .collect();
    env.produce_payloads(&records).await;
    let summary = run_until_idle(&env, &[("AUDITFLOW_SCHEMA_REGISTRY_URL", &url)]).await;
    assert_eq!((summary.stored, summary.dead_lettered), (20, 20));
    let dead = env.read_dlq(20, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 20);
    for message in &dead {
        assert_eq!(
            header(message, dlq_header::ERROR_CLASS).as_deref(),
            Some("schema")
        );
        let text = header(message, dlq_header::ERROR_MESSAGE).unwrap_or_default();
        assert!(text.contains(&format!("writer schema id {bad}")), "{text}");
        assert!(text.contains("cannot be read with reader schema"), "{text}");
        assert!(text.contains("occurred_at"), "the resolution error: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_stopped_for_20_s_mid_stream_loses_nothing_and_dead_letters_nothing() {
    let test = "the_registry_stopped_for_20_s_mid_stream_loses_nothing_and_dead_letters_nothing";
    let Some(mut owned) = OwnedRegistry::start(test).await else {
        return;
    };
    let env = TestEnv::new(2).await;
    let registrar = Registrar::new(&owned.url());
    let (v1, v2) = register_v1_v2(&registrar, &env).await;
    let sink = Sink::build(env.config(&[
        ("AUDITFLOW_SCHEMA_REGISTRY_URL", &owned.url()),
        ("AUDITFLOW_SCHEMA_REGISTRY_TIMEOUT_MS", "1000"),
    ]))
    .await
    .expect("build sink");
    let board = sink.board();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(sink.run_until_stopped(shutdown.clone(), None));

    // Mid-stream: v1 is cached, then the registry goes away and v2 shows up.
    let wave_one: Vec<_> = events(300, 61, v1, v2)
        .into_iter()
        .filter(|(_, payload)| schema_id(payload) == v1)
        .collect();
    env.produce_payloads(&wave_one).await;
    let stored_one = wave_one.len() as u64;
    wait_until(Duration::from_secs(60), || {
        board.snapshot().totals.stored >= stored_one
    })
    .await;

    owned.stop();
    let stopped_at = tokio::time::Instant::now();
    let wave_two = events(400, 62, v1, v2);
    env.produce_payloads(&wave_two).await;
    let total = stored_one + wave_two.len() as u64;
    wait_until(Duration::from_secs(20), || {
        board
            .schema_registry()
            .is_some_and(|status| status.state == "unavailable" && status.paused)
    })
    .await;
    assert!(!board.readiness().ready);
    assert!(board
        .readiness()
        .missing
        .contains(&"schema_registry_available"));
    tokio::time::sleep_until(stopped_at + Duration::from_secs(20)).await;
    let during = board.snapshot().totals;
    assert_eq!(
        during.dead_lettered, 0,
        "nothing dead-lettered while it was down"
    );
    assert!(during.stored < total, "v2 records waited: {during:?}");

    owned.restart();
    wait_until(Duration::from_secs(120), || {
        board.snapshot().totals.stored >= total
    })
    .await;
    wait_until(Duration::from_secs(30), || {
        board
            .schema_registry()
            .is_some_and(|status| status.state == "ok" && !status.paused)
    })
    .await;
    shutdown.cancel();
    let summary = running.await.expect("sink task").expect("sink run");
    assert_eq!(summary.stored, total);
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(summary.duplicates, 0);
    assert_eq!(env.count_rows().await, total as i64);
    assert_eq!(env.count_distinct_ids().await, total as i64);
    assert!(env.read_dlq(0, Duration::from_secs(2)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_works_and_a_wrong_password_pauses_without_dead_lettering() {
    let test = "basic_auth_works_and_a_wrong_password_pauses_without_dead_lettering";
    let Some(url) = registry::auth_registry_url(test) else {
        return;
    };
    let env = TestEnv::new(1).await;
    let registrar = Registrar::new(&url);
    let (v1, v2) = register_v1_v2(&registrar, &env).await;
    let records = events(200, 71, v1, v2);
    env.produce_payloads(&records).await;

    // With the read-only user's credentials: stored.
    let summary = run_until_idle(
        &env,
        &[
            ("AUDITFLOW_SCHEMA_REGISTRY_URL", &url),
            ("AUDITFLOW_SCHEMA_REGISTRY_USERNAME", "reader"),
            ("AUDITFLOW_SCHEMA_REGISTRY_PASSWORD", "r3ad"),
        ],
    )
    .await;
    assert_eq!((summary.stored, summary.dead_lettered), (200, 0));

    // A wrong password, in a new group that reads everything again, through the binary.
    let group = format!("{}-wrong", env.group);
    let log = tempfile::NamedTempFile::new().expect("log file");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut child = sink_process(
        &env,
        &[
            ("AUDITFLOW_KAFKA_GROUP_ID", &group),
            ("AUDITFLOW_SCHEMA_REGISTRY_URL", &url),
            ("AUDITFLOW_SCHEMA_REGISTRY_USERNAME", "reader"),
            ("AUDITFLOW_SCHEMA_REGISTRY_PASSWORD", "not-the-password-h7"),
            ("AUDITFLOW_METRICS_ADDR", &metrics_addr),
        ],
        log.reopen().expect("log handle"),
    );
    let http = reqwest::Client::new();
    let status_url = format!("http://{metrics_addr}/status.json");
    let mut status = serde_json::Value::Null;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if let Ok(response) = http.get(&status_url).send().await {
            let body = response.bytes().await.unwrap_or_default();
            status = serde_json::from_slice(&body).unwrap_or_default();
            if status["schema_registry"]["state"] == "unauthorized"
                && status["schema_registry"]["paused"] == true
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status["schema_registry"]["state"], "unauthorized",
        "{status}"
    );
    assert_eq!(status["schema_registry"]["paused"], true, "{status}");
    // Give it time to do the wrong thing, if it would.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let readyz = http
        .get(format!("http://{metrics_addr}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status().as_u16(), 503);
    let readiness: serde_json::Value = registry::json_body(readyz).await;
    assert!(
        readiness["missing"]
            .as_array()
            .is_some_and(|missing| missing.contains(&"schema_registry_authorized".into())),
        "{readiness}"
    );
    let status_text = http
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status_text).unwrap();
    assert_eq!(status["totals"]["dead_lettered"], 0, "{status}");
    assert_eq!(status["totals"]["stored"], 0, "{status}");
    let metrics = http
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("auditflow_schema_registry_paused 1"),
        "{metrics}"
    );
    common::signal(&child, "TERM");
    common::wait_exit(&mut child, Duration::from_secs(30)).await;
    assert_eq!(env.count_rows().await, 200, "the first run's rows only");
    assert!(env.read_dlq(0, Duration::from_secs(2)).await.is_empty());

    let logged = std::fs::read_to_string(log.path()).unwrap();
    let refusals = logged
        .lines()
        .filter(|line| line.contains("ERROR") && line.contains("schema registry refuses auditflow"))
        .count();
    assert_eq!(refusals, 1, "logged once per interval:\n{logged}");
    for text in [&logged, &status_text, &metrics, &readiness.to_string()] {
        assert!(
            !text.contains("not-the-password-h7"),
            "the password leaked:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_registers_under_topic_value_and_writes_the_registry_ids() {
    let test = "produce_registers_under_topic_value_and_writes_the_registry_ids";
    let Some(url) = registry::registry_url(test) else {
        return;
    };
    let env = TestEnv::new(2).await;
    let registrar = Registrar::new(&url);
    registrar.fillers(3).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"))
        .args([
            "produce",
            "--count",
            "300",
            "--invalid-ratio",
            "0.05",
            "--seed",
            "5",
        ])
        .args(["--schema-registry", &url])
        .env_clear()
        .envs(env.vars())
        .env("AUDITFLOW_SCHEMA_REGISTRY_USERNAME", registry::WRITER.0)
        .env("AUDITFLOW_SCHEMA_REGISTRY_PASSWORD", registry::WRITER.1)
        .output()
        .expect("run produce");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("summary line");
    let v1 = summary["schema_ids"]["1"].as_u64().expect("v1 id") as i64;
    let v2 = summary["schema_ids"]["2"].as_u64().expect("v2 id") as i64;
    assert_ne!(v1, v2);
    let versions: Vec<u32> = registry::json_body(
        reqwest::get(format!("{url}/subjects/{}-value/versions", env.topic))
            .await
            .expect("versions"),
    )
    .await;
    assert_eq!(versions.len(), 2, "both registered under <topic>-value");

    let stored = run_until_idle(&env, &[("AUDITFLOW_SCHEMA_REGISTRY_URL", &url)]).await;
    assert_eq!(stored.stored, 300);
    assert_eq!(stored.dead_lettered, summary["invalid"].as_u64().unwrap());
    let rows = rows_by_writer(&env).await;
    let ids: BTreeSet<Option<i64>> = rows.keys().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, BTreeSet::from([Some(v1), Some(v2)]), "{rows:?}");
    assert!(
        rows.keys().all(|(_, version, _)| version.is_none()),
        "registry ids are not file versions: {rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_check_passes_a_readable_subject_and_fails_one_with_an_unreadable_version() {
    let test = "schemas_check_passes_a_readable_subject_and_fails_one_with_an_unreadable_version";
    let Some(url) = registry::registry_url(test) else {
        return;
    };
    let registrar = Registrar::new(&url);
    registrar.fillers(3).await;
    let tag = common::suffix();
    let good = format!("good-{tag}-value");
    let v1 = registrar
        .register(&good, &registry::unique_schema(1, &tag))
        .await;
    let v2 = registrar
        .register(&good, &registry::unique_schema(2, &tag))
        .await;
    let bad = format!("bad-{tag}-value");
    registrar.set_compatibility(&bad, "NONE").await;
    registrar
        .register(&bad, &registry::unique_schema(2, &tag))
        .await;
    let broken = registrar
        .register(&bad, &registry::unresolvable_schema(&tag))
        .await;

    let check = |subject: &str, json: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"));
        command
            .args(["schemas", "check", "--subject", subject])
            .env_clear()
            .env("AUDITFLOW_SCHEMA_REGISTRY_URL", &url)
            .env("RUST_LOG", "off");
        if json {
            command.arg("--json");
        }
        command.output().expect("run schemas check")
    };
    let passed = check(&good, false);
    let text = String::from_utf8_lossy(&passed.stdout);
    assert_eq!(passed.status.code(), Some(0), "{text}");
    assert!(text.contains("2 version(s), 2 readable, 0 not"), "{text}");
    assert!(
        text.contains(&format!("version 1 (id {v1}): auditflow reads it")),
        "{text}"
    );
    assert!(
        text.contains(&format!("version 2 (id {v2}): auditflow reads it")),
        "{text}"
    );

    let failed = check(&bad, false);
    let text = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1), "{text}");
    assert!(text.contains("2 version(s), 1 readable, 1 not"), "{text}");
    assert!(
        text.contains(&format!("FAIL  version 2 (id {broken}): cannot be read:")),
        "{text}"
    );
    assert!(text.contains("occurred_at"), "says why: {text}");
    let json: serde_json::Value =
        serde_json::from_slice(&check(&bad, true).stdout).expect("json report");
    assert_eq!(json["versions"][1]["readable"], false, "{json}");

    let missing = check(&format!("missing-{tag}-value"), false);
    assert_eq!(missing.status.code(), Some(1));
    let unset = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"))
        .args(["schemas", "check"])
        .env_clear()
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(
        unset.status.code(),
        Some(2),
        "no registry configured is bad configuration"
    );
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// The binary with the test's variables plus `extra`, logging (warn and up) into `log`.
fn sink_process(env: &TestEnv, extra: &[(&str, &str)], log: std::fs::File) -> common::SinkProcess {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"));
    command
        .args(["run"])
        .env_clear()
        .envs(env.vars())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    for (key, value) in extra {
        command.env(key, value);
    }
    common::SinkProcess(command.spawn().expect("spawn auditflow"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_trusted_with_the_ca_file_and_refused_without_it() {
    let test = "https_is_trusted_with_the_ca_file_and_refused_without_it";
    let Some(owned) = OwnedRegistry::start_tls(test).await else {
        return;
    };
    let registrar = Registrar::with_client(&owned.url(), owned.client());
    let tag = common::suffix();
    let subject = format!("tls-{tag}-value");
    let id = registrar
        .register(&subject, &registry::unique_schema(2, &tag))
        .await;
    let ca = tempfile::NamedTempFile::new().expect("ca file");
    std::fs::write(ca.path(), owned.ca_pem().expect("tls")).expect("write ca");
    let check = |ca_file: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"));
        command
            .args(["schemas", "check", "--subject", &subject])
            .env_clear()
            .env("AUDITFLOW_SCHEMA_REGISTRY_URL", owned.url())
            .env("RUST_LOG", "off");
        if let Some(path) = ca_file {
            command.env("AUDITFLOW_SCHEMA_REGISTRY_CA_FILE", path);
        }
        command.output().expect("run schemas check")
    };
    let trusted = check(Some(ca.path()));
    let text = String::from_utf8_lossy(&trusted.stdout);
    assert_eq!(
        trusted.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert!(
        text.contains(&format!("version 1 (id {id}): auditflow reads it")),
        "{text}"
    );
    let untrusted = check(None);
    let errors = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(untrusted.status.code(), Some(1), "{errors}");
    assert!(errors.contains("certificate"), "{errors}");
}
