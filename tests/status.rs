//! The observability server: health and readiness probes, the Prometheus exposition, and the
//! `/status` page rendered by a real headless Chromium, whose numbers must match `/metrics`.
//!
//! Chromium comes from the system's packages (`apt-get install chromium`; `.ci/run` installs
//! it). Without it the browser test fails: a status page nobody checked is not tested.
//! `AUDITFLOW_TEST_CHROMIUM` points at another binary; `AUDITFLOW_STATUS_SCREENSHOT=/path.png`
//! also saves a screenshot of the page as the test fed it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use auditflow::breaker::{Breaker, BreakerConfig, State};
use auditflow::observe::http::HttpLimits;
use auditflow::observe::{self, ObserveServer, StatusBoard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The Prometheus recorder is process-wide, and so are the series the tests look at: one test
/// at a time, so a test's `/metrics` only holds what that test (and earlier ones) recorded.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOPIC: &str = "audit-events";

struct TestServer {
    server: ObserveServer,
    shutdown: CancellationToken,
}

impl TestServer {
    async fn start(board: &Arc<StatusBoard>) -> Self {
        Self::start_with_limits(board, HttpLimits::default()).await
    }

    async fn start_with_limits(board: &Arc<StatusBoard>, limits: HttpLimits) -> Self {
        let handle = observe::install_recorder().expect("recorder");
        let shutdown = CancellationToken::new();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server =
            observe::spawn_with_limits(addr, Arc::clone(board), handle, limits, shutdown.clone())
                .await
                .expect("server starts");
        TestServer { server, shutdown }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server.stopped())
            .await
            .expect("server stops within 10 s of shutdown")
            .expect("server ends cleanly");
    }
}

struct HttpResponse {
    status: u16,
    /// Header lines, lowercased.
    headers: String,
    body: String,
}

/// A plain HTTP/1.1 GET, so the tests need no HTTP client crate.
async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let headers = head.to_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The value of the series `name{labels}` (labels in any order) in an exposition text.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find_map(|(series, value)| {
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let found: BTreeMap<&str, &str> = series_labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key, value.trim_matches('"')))
                .collect();
            (series_name == name && found == wanted).then(|| value.parse().expect("number"))
        })
}

/// Sum of every series of `name`, whatever its labels.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(_, value)| value.parse::<f64>().expect("number"))
        .sum()
}

/// The text directly inside the element with `id` in a serialized DOM.
fn text_by_id(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element with id {id:?} in the rendered page"));
    let start = at + dom[at..].find('>').expect("tag end") + 1;
    let end = start + dom[start..].find('<').expect("text end");
    dom[start..end].trim().to_owned()
}

/// A count as the page shows it ("12,304"), as a number; anything else fails with the text.
fn count_by_id(dom: &str, id: &str) -> f64 {
    let text = text_by_id(dom, id);
    text.replace(',', "").parse().unwrap_or_else(|_| {
        panic!("element {id} shows {text:?}, not a number: did the page's script run?")
    })
}

fn chromium_path() -> PathBuf {
    let path = std::env::var_os("AUDITFLOW_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "headless Chromium not found at {}: the /status page test needs a real browser. Install it \
         with `apt-get update && apt-get install -y --no-install-recommends chromium` (.ci/run \
         does), or set AUDITFLOW_TEST_CHROMIUM to a Chromium binary",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `extra` arguments; returns its stdout.
async fn chromium(url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut command = tokio::process::Command::new(chromium_path());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("chromium finishes within 120 s")
        .expect("chromium runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        stderr.chars().take(4000).collect::<String>()
    );
    String::from_utf8(output.stdout).expect("utf-8 dom")
}

fn breaker_config(open_for: Duration) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 2,
        open_for,
        ..BreakerConfig::INGEST
    }
}

async fn fail_until_open(breaker: &Breaker) {
    while breaker.state() != State::Open {
        let _ = breaker
            .call(async { Err::<(), _>("connection refused") }, |_| true)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_the_process_serves() {
    let _serial = SERIAL.lock().await;
    let board = Arc::new(StatusBoard::new("health-test"));
    let server = TestServer::start(&board).await;
    let response = get(server.addr(), "/healthz").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body.trim(), "ok");
    let response = get(server.addr(), "/").await;
    assert_eq!(response.status, 307, "/ leads a person to /status");
    assert!(response.headers.contains("location: /status"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_needs_the_group_and_a_closed_database_breaker() {
    let _serial = SERIAL.lock().await;
    let board = Arc::new(StatusBoard::new("ready-test"));
    let server = TestServer::start(&board).await;
    let readyz = || async {
        let response = get(server.addr(), "/readyz").await;
        let body: serde_json::Value = serde_json::from_str(&response.body).expect("json body");
        (response.status, body)
    };

    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["missing"],
        serde_json::json!(["joined_group", "database_breaker_closed"])
    );

    let postgres = Arc::new(Breaker::new(
        "postgres",
        breaker_config(Duration::from_millis(300)),
    ));
    board.register_breaker(Arc::clone(&postgres));
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "not joined yet: {body}");
    assert_eq!(body["missing"], serde_json::json!(["joined_group"]));

    board.set_joined(true);
    let (status, body) = readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["database_breaker"], "closed");

    fail_until_open(&postgres).await;
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "database breaker open: {body}");
    assert_eq!(body["database_breaker"], "open");
    assert_eq!(
        body["missing"],
        serde_json::json!(["database_breaker_closed"])
    );
    let exposition = get(server.addr(), "/metrics").await.body;
    assert_eq!(
        metric(
            &exposition,
            "auditflow_breaker_state",
            &[("dependency", "postgres")]
        ),
        Some(2.0),
        "the gauge says open too"
    );

    // After the open interval a successful probe closes the breaker: ready again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    postgres
        .call(async { Ok::<(), &str>(()) }, |_| true)
        .await
        .expect("probe succeeds");
    let (status, body) = readyz().await;
    assert_eq!(status, 200, "breaker closed again: {body}");

    board.set_joined(false);
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "left the group: {body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_described_with_prometheus_names_and_buckets() {
    let _serial = SERIAL.lock().await;
    let board = Arc::new(StatusBoard::new("metrics-test"));
    let server = TestServer::start(&board).await;
    // Zero increments register the counters without moving them.
    board.add_consumed(0);
    board.add_stored(0);
    board.add_duplicates(0);
    board.set_partition_lag("metrics-test-topic", 4, 17);
    board.set_pool(2, 5);
    metrics::histogram!("auditflow_batch_flush_duration_seconds").record(0.02);
    metrics::histogram!("auditflow_batch_size_events").record(42.0);

    let response = get(server.addr(), "/metrics").await;
    assert_eq!(response.status, 200);
    assert!(
        response
            .headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        response.headers
    );
    let text = response.body;
    for (name, kind) in [
        ("auditflow_events_consumed_total", "counter"),
        ("auditflow_events_stored_total", "counter"),
        ("auditflow_duplicates_skipped_total", "counter"),
        ("auditflow_consumer_lag_messages", "gauge"),
        ("auditflow_db_pool_connections", "gauge"),
        ("auditflow_batch_flush_duration_seconds", "histogram"),
        ("auditflow_batch_size_events", "histogram"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is a {kind}:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} is described:\n{text}"
        );
    }
    assert_eq!(
        metric(
            &text,
            "auditflow_consumer_lag_messages",
            &[("topic", "metrics-test-topic"), ("partition", "4")]
        ),
        Some(17.0)
    );
    assert_eq!(
        metric(
            &text,
            "auditflow_db_pool_connections",
            &[("state", "in_use")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "auditflow_db_pool_connections", &[("state", "idle")]),
        Some(5.0)
    );
    // Buckets as telemetry.rs sets them, not the exporter's default summaries.
    assert!(
        metric(
            &text,
            "auditflow_batch_flush_duration_seconds_bucket",
            &[("le", "0.025")]
        )
        .is_some_and(|count| count >= 1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "auditflow_batch_size_events_bucket",
            &[("le", "100")]
        )
        .is_some(),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_a_browser_with_the_numbers_of_the_metrics() {
    let _serial = SERIAL.lock().await;
    // Fails before any set-up when there is no browser.
    chromium_path();
    let board = Arc::new(StatusBoard::new("replica-7"));
    let server = TestServer::start(&board).await;

    board.set_joined(true);
    let postgres = Arc::new(Breaker::new(
        "postgres",
        breaker_config(Duration::from_secs(600)),
    ));
    let redis = Arc::new(Breaker::new(
        "redis",
        breaker_config(Duration::from_secs(600)),
    ));
    board.register_breaker(Arc::clone(&postgres));
    board.register_breaker(Arc::clone(&redis));
    board.register_breaker(Arc::new(Breaker::new(
        "dlq",
        breaker_config(Duration::from_secs(600)),
    )));
    fail_until_open(&redis).await;
    board.set_partition_lag(TOPIC, 0, 12);
    board.set_partition_lag(TOPIC, 1, 3456);
    board.set_partition_lag(TOPIC, 2, 0);
    board.set_pool(3, 1);
    board.add_consumed(12_304);
    board.add_stored(12_000);
    board.add_duplicates(300);
    for _ in 0..3 {
        board.record_dead_letter("decode");
    }
    board.record_dead_letter("out_of_window");
    // Let the server sample the counters so throughput has a window to average over.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let url = format!("http://{}/status", server.addr());
    let dom = chromium(&url, &["--dump-dom".to_owned()]).await;
    let exposition = get(server.addr(), "/metrics").await.body;
    let status: serde_json::Value =
        serde_json::from_str(&get(server.addr(), "/status.json").await.body).expect("json");

    // The script ran and fetched /status.json.
    assert_eq!(text_by_id(&dom, "conn"), "live", "{dom}");
    assert_ne!(text_by_id(&dom, "updated"), "never");
    assert_eq!(text_by_id(&dom, "instance"), "replica-7");
    assert_eq!(text_by_id(&dom, "ready"), "ready");

    // Totals equal the Prometheus counters (and /status.json).
    for (id, name, key) in [
        (
            "total-consumed",
            "auditflow_events_consumed_total",
            "consumed",
        ),
        ("total-stored", "auditflow_events_stored_total", "stored"),
        (
            "total-duplicates",
            "auditflow_duplicates_skipped_total",
            "duplicates",
        ),
    ] {
        let from_metrics = metric(&exposition, name, &[]).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(count_by_id(&dom, id), from_metrics, "{id} vs {name}");
        assert_eq!(status["totals"][key].as_f64(), Some(from_metrics));
    }
    assert_eq!(count_by_id(&dom, "total-stored"), 12_000.0);
    assert_eq!(
        count_by_id(&dom, "total-dead-lettered"),
        metric_sum(&exposition, "auditflow_events_dead_lettered_total")
    );
    assert_eq!(count_by_id(&dom, "total-dead-lettered"), 4.0);

    // Dead letters per class, since start and recent.
    for (class, expected) in [("decode", 3.0), ("out_of_window", 1.0)] {
        let from_metrics = metric(
            &exposition,
            "auditflow_events_dead_lettered_total",
            &[("class", class)],
        );
        assert_eq!(from_metrics, Some(expected), "{class}");
        assert_eq!(count_by_id(&dom, &format!("dl-total-{class}")), expected);
        assert_eq!(count_by_id(&dom, &format!("dl-recent-{class}")), expected);
    }

    // Lag per partition equals the gauge.
    for partition in [0, 1, 2] {
        let id = format!("lag-{TOPIC}-{partition}");
        let gauge = metric(
            &exposition,
            "auditflow_consumer_lag_messages",
            &[("topic", TOPIC), ("partition", &partition.to_string())],
        )
        .unwrap_or_else(|| panic!("lag gauge of partition {partition}"));
        assert_eq!(count_by_id(&dom, &id), gauge, "{id}");
    }
    assert_eq!(count_by_id(&dom, "lag-audit-events-1"), 3456.0);
    assert_eq!(count_by_id(&dom, "lag-total"), 3468.0);

    // Breaker states as the gauge encodes them (0 closed, 1 half-open, 2 open).
    for dependency in ["postgres", "redis", "dlq"] {
        let gauge = metric(
            &exposition,
            "auditflow_breaker_state",
            &[("dependency", dependency)],
        );
        let shown = text_by_id(&dom, &format!("breaker-{dependency}"));
        let expected = match gauge {
            Some(0.0) => "closed",
            Some(1.0) => "half-open",
            Some(2.0) => "open",
            other => panic!("breaker gauge of {dependency}: {other:?}"),
        };
        assert_eq!(shown, expected, "{dependency}");
    }
    assert_eq!(text_by_id(&dom, "breaker-redis"), "open");
    assert_eq!(text_by_id(&dom, "breaker-postgres"), "closed");

    assert_eq!(count_by_id(&dom, "pool-in-use"), 3.0);
    assert_eq!(count_by_id(&dom, "pool-idle"), 1.0);
    let rate = count_by_id(&dom, "rate-consumed");
    assert!(rate > 0.0, "throughput shown: {rate}");

    if let Some(path) = std::env::var_os("AUDITFLOW_STATUS_SCREENSHOT") {
        let path = PathBuf::from(path);
        chromium(
            &url,
            &[
                format!("--screenshot={}", path.display()),
                "--window-size=1200,900".to_owned(),
                "--hide-scrollbars".to_owned(),
            ],
        )
        .await;
        assert!(path.exists(), "screenshot written to {}", path.display());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_half_a_request_is_disconnected_after_the_header_timeout() {
    let _serial = SERIAL.lock().await;
    let board = Arc::new(StatusBoard::new("slow-client-test"));
    let server = TestServer::start_with_limits(
        &board,
        HttpLimits {
            header_read_timeout: Duration::from_secs(1),
            ..HttpLimits::default()
        },
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    // The request line and one header, never the blank line that ends the headers.
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is held past 10 s");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed only after the timeout: {:?}",
        started.elapsed()
    );
    // The server still answers others.
    assert_eq!(get(server.addr(), "/healthz").await.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_security_headers_and_the_page_may_not_be_framed() {
    let _serial = SERIAL.lock().await;
    let board = Arc::new(StatusBoard::new("headers-test"));
    let server = TestServer::start(&board).await;
    for path in [
        "/healthz",
        "/metrics",
        "/status",
        "/status.json",
        "/status.js",
    ] {
        let response = get(server.addr(), path).await;
        assert_eq!(response.status, 200, "{path}");
        assert!(
            response.headers.contains("x-content-type-options: nosniff"),
            "{path}: {}",
            response.headers
        );
    }
    let page = get(server.addr(), "/status").await;
    assert!(
        page.headers.contains("x-frame-options: deny"),
        "{}",
        page.headers
    );
    let policy = page
        .headers
        .lines()
        .find_map(|line| line.strip_prefix("content-security-policy: "))
        .expect("a content security policy");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{policy}");
    }
    assert!(
        !page.body.contains("<script>") && !page.body.contains(" style=\""),
        "no inline script or style for the policy to allow"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_schema_registry_and_why_the_replica_is_not_ready() {
    use auditflow::observe::SchemaRegistryStatus;
    let _serial = SERIAL.lock().await;
    chromium_path();
    let board = Arc::new(StatusBoard::new("replica-registry"));
    let server = TestServer::start(&board).await;
    board.set_joined(true);
    board.register_breaker(Arc::new(Breaker::new(
        "postgres",
        breaker_config(Duration::from_secs(600)),
    )));
    let url = format!("http://{}/status", server.addr());

    // Without a registry the section stays hidden and readiness does not mention it.
    let dom = chromium(&url, &["--dump-dom".to_owned()]).await;
    assert_eq!(text_by_id(&dom, "ready"), "ready", "{dom}");
    assert!(dom.contains(r#"id="registry" hidden"#), "{dom}");

    board.set_schema_registry(SchemaRegistryStatus {
        state: "unauthorized",
        urls: vec!["http://sr-1:8081".to_owned(), "http://sr-2:8081".to_owned()],
        cached_ids: 3,
        cache_capacity: 1000,
        not_found_ids: 2,
        last_error: Some(
            "schema registry at http://sr-1:8081 refused the request: HTTP 401".into(),
        ),
        paused: false,
    });
    board.set_schema_registry_paused(true);
    let dom = chromium(&url, &["--dump-dom".to_owned()]).await;
    let (status, body) = {
        let response = get(server.addr(), "/readyz").await;
        (response.status, response.body)
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("schema_registry_authorized"), "{body}");
    assert_eq!(
        text_by_id(&dom, "ready"),
        "not ready: schema registry unauthorized",
        "{dom}"
    );
    assert!(!dom.contains(r#"id="registry" hidden"#), "{dom}");
    assert_eq!(text_by_id(&dom, "registry-state"), "unauthorized");
    assert_eq!(text_by_id(&dom, "registry-cached"), "3 / 1,000");
    assert_eq!(count_by_id(&dom, "registry-not-found"), 2.0);
    assert_eq!(
        text_by_id(&dom, "registry-urls"),
        "http://sr-1:8081, http://sr-2:8081"
    );
    assert!(text_by_id(&dom, "registry-error").contains("HTTP 401"));
    assert!(
        !dom.contains(r#"id="registry-paused" hidden"#),
        "paused is shown: {dom}"
    );
    let exposition = get(server.addr(), "/metrics").await.body;
    assert_eq!(
        metric(&exposition, "auditflow_schema_registry_paused", &[]),
        Some(1.0)
    );
    server.stop().await;
}
