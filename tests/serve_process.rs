//! `auditflow serve` as a person and an operator meet it: the binary streaming a large export
//! in constant memory, and the viewer page rendered by headless Chromium (Debian's `chromium`,
//! which `.ci/run` installs; `AUDITFLOW_TEST_CHROMIUM` points at another binary;
//! `AUDITFLOW_SERVE_SCREENSHOT=/path.png` also saves a screenshot of the page).

mod serve_common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serve_common::{day, enc, event, ts, ServeEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_streams_a_large_result_in_constant_memory() {
    const ROWS: i64 = 200_000;
    let env = ServeEnv::new().await;
    // One event makes the partition; the rest are generated server-side.
    env.write(&[event(0, "acme", day(100))]).await;
    sqlx::query(&format!(
        "INSERT INTO \"{}\".events (event_id, occurred_at, tenant_id, actor_id, actor_type, action, \
           resource_type, resource_id, outcome, details, content_hash, kafka_topic, kafka_partition, \
           kafka_offset) \
         SELECT gen_random_uuid(), $1::timestamptz + g * interval '100 milliseconds', 'acme', \
           'user-' || (g % 100), 'USER', 'order.update', 'order', 'o-' || g, 'SUCCESS', \
           jsonb_build_object('n', g, 'pad', repeat('x', 400)), '\\x00'::bytea, 'audit-events', 0, g \
         FROM generate_series(1, $2::int8) g",
        env.schema
    ))
    .bind(day(100))
    .bind(ROWS - 1)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(&format!("ANALYZE \"{}\".events", env.schema))
        .execute(&env.pool)
        .await
        .unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_auditflow"));
    command.arg("serve").env_clear();
    for (key, value) in env.vars(&[
        ("AUDITFLOW_SERVE_ADDR", &format!("127.0.0.1:{port}")),
        ("AUDITFLOW_SERVE_SEQ_SCAN_MAX_ROWS", "100000000"),
        ("AUDITFLOW_LOG_LEVEL", "warn"),
    ]) {
        command.env(key, value);
    }
    let child = Child(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn auditflow serve"),
    );
    let pid = child.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A small export first, so the baseline includes a warm pool and runtime.
    let warm = serve_common::get(
        addr,
        &format!(
            "/v1/export?tenant=acme&from={}&to={}",
            ts(day(100)),
            ts(day(100) + chrono::Duration::seconds(10))
        ),
        None,
    )
    .await;
    assert_eq!(warm.status, 200, "{}", warm.body);
    let baseline_kib = rss_kib(pid);

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let path = format!(
        "/v1/export?tenant=acme&from={}&to={}",
        ts(day(100)),
        ts(day(101))
    );
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    let (mut num_bytes, mut num_lines, mut peak_kib) = (0usize, 0usize, baseline_kib);
    let mut head = Vec::new();
    let mut in_body = false;
    loop {
        let read = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buffer))
            .await
            .expect("export keeps flowing")
            .unwrap();
        if read == 0 {
            break;
        }
        let mut chunk = &buffer[..read];
        if !in_body {
            head.extend_from_slice(chunk);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let status_line = String::from_utf8_lossy(&head[..end]).to_string();
            assert!(
                status_line.starts_with("HTTP/1.0 200") || status_line.starts_with("HTTP/1.1 200"),
                "{status_line}"
            );
            let body_start = end + 4;
            let already = head.len() - body_start;
            chunk = &buffer[read - already..read];
            in_body = true;
        }
        num_bytes += chunk.len();
        num_lines += chunk.iter().filter(|b| **b == b'\n').count();
        peak_kib = peak_kib.max(rss_kib(pid));
        // Read a little slower than the server writes, so backpressure is exercised.
        if num_lines % 20_000 < 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(num_lines as i64, ROWS, "every row, once");
    let growth_mib = (peak_kib.saturating_sub(baseline_kib)) as f64 / 1024.0;
    let body_mib = num_bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "export: {num_lines} rows, {body_mib:.0} MiB; serve RSS {:.0} MiB before, peak growth {growth_mib:.1} MiB",
        baseline_kib as f64 / 1024.0
    );
    assert!(body_mib > 100.0, "a large export: {body_mib:.0} MiB");
    assert!(
        growth_mib < 48.0,
        "RSS grew {growth_mib:.1} MiB while streaming {body_mib:.0} MiB: the export is buffered"
    );
}

fn chromium_path() -> PathBuf {
    let path = std::env::var_os("AUDITFLOW_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "headless Chromium not found at {}: the viewer test needs a real browser. Install it with \
         `apt-get install -y --no-install-recommends chromium` (.ci/run does), or set \
         AUDITFLOW_TEST_CHROMIUM",
        path.display()
    );
    path
}

async fn chromium(url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut command = tokio::process::Command::new(chromium_path());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("chromium finishes within 120 s")
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
            .chars()
            .take(4000)
            .collect::<String>()
    );
    String::from_utf8(output.stdout).expect("utf-8 dom")
}

fn text_by_id(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element {id:?} in the page"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    dom[start..end].trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_viewer_page_shows_the_apis_page_in_chromium_as_text() {
    chromium_path();
    let env = ServeEnv::new().await;
    let mut events: Vec<_> = (0..12u64)
        .map(|n| event(n, "acme", day(110) + chrono::Duration::minutes(n as i64)))
        .collect();
    // The newest event carries markup: it must show as text, never run.
    events[11].action = "<img src=x onerror=alert(1)>".into();
    env.write_and_announce(&events).await;
    let tokens = env.tokens_file(&[("viewer-token", "acme")]);
    let serve = env
        .serve(&[("AUDITFLOW_SERVE_TOKENS_FILE", tokens.as_str())])
        .await;
    serve.wait_trusted().await;
    let (from, to) = (ts(day(110)), ts(day(111)));
    let api = serve
        .get(
            &format!(
                "/v1/events?tenant=acme&from={}&to={}&limit=5",
                enc(&from),
                enc(&to)
            ),
            Some("viewer-token"),
        )
        .await;
    assert_eq!(api.status, 200);
    let api_ids: Vec<String> = api.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(api_ids.len(), 5);

    let url = format!(
        "http://{}/#tenant=acme&from={}&to={}&limit=5&token=viewer-token&run=1",
        serve.addr,
        enc(&from),
        enc(&to)
    );
    let dom = chromium(&url, &["--dump-dom".to_owned()]).await;
    assert_eq!(text_by_id(&dom, "row-count"), "5", "{dom}");
    assert!(
        text_by_id(&dom, "status").contains("more on the next page"),
        "{dom}"
    );
    let shown_ids: Vec<String> = dom
        .match_indices("class=\"event-id\">")
        .map(|(at, marker)| {
            let start = at + marker.len();
            dom[start..start + dom[start..].find('<').unwrap()].to_owned()
        })
        .collect();
    assert_eq!(
        shown_ids, api_ids,
        "the table shows the API's page, in order"
    );
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "markup from the data is shown as text"
    );
    assert!(
        !dom.contains("<img src=\"x\""),
        "and never becomes an element"
    );
    let next_tag = dom
        .find("id=\"next\"")
        .map(|at| {
            let start = dom[..at].rfind('<').unwrap();
            &dom[start..at + dom[at..].find('>').unwrap()]
        })
        .unwrap_or_default();
    let next_disabled = next_tag.contains("disabled");
    assert!(!next_disabled, "a next page is offered");

    if let Some(path) = std::env::var_os("AUDITFLOW_SERVE_SCREENSHOT") {
        let path = PathBuf::from(path);
        chromium(
            &url,
            &[
                format!("--screenshot={}", path.display()),
                "--window-size=1400,900".to_owned(),
                "--hide-scrollbars".to_owned(),
            ],
        )
        .await;
        assert!(path.exists());
    }
    serve.stop().await;
}
