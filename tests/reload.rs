//! Live configuration on SIGHUP, driven through the binary as an operator would.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{signal, wait_exit, TestEnv};
use futures::StreamExt;

/// The `count` of the next invalidation message.
async fn next_count(messages: &mut (impl futures::Stream<Item = redis::Msg> + Unpin)) -> u64 {
    let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("an invalidation within 10 s")
        .expect("subscription open");
    let body: serde_json::Value =
        serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
    body["count"].as_u64().unwrap()
}

/// Waits until the log file contains `needle`.
async fn wait_for_log(path: &std::path::Path, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "log never said {needle:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_settings_and_refuses_what_needs_a_restart() {
    let env = TestEnv::new(1).await;
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("auditflow.env");
    let log_file = dir.path().join("auditflow.log");
    std::fs::write(&env_file, "AUDITFLOW_BATCH_MAX_EVENTS=5000\n").unwrap();

    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(&env.channel).await.unwrap();

    let mut command = Command::new(env!("CARGO_BIN_EXE_auditflow"));
    command
        .arg("run")
        .env_clear()
        .envs(env.vars())
        .env("AUDITFLOW_CONFIG_FILE", &env_file)
        .env("AUDITFLOW_BATCH_MAX_WAIT_MS", "300")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap());
    let mut sink = common::SinkProcess(command.spawn().unwrap());

    env.produce(200, 0.0, 0.0, 1).await;
    assert_eq!(env.wait_for_rows(200, Duration::from_secs(60)).await, 200);

    std::fs::write(
        &env_file,
        "AUDITFLOW_BATCH_MAX_EVENTS=7\nAUDITFLOW_BREAKER_OPEN_MS=1234\n",
    )
    .unwrap();
    signal(&sink, "HUP");
    let log = wait_for_log(&log_file, "configuration reloaded").await;
    assert!(
        log.contains(r#"variable=AUDITFLOW_BATCH_MAX_EVENTS old="5000" new="7""#),
        "{log}"
    );
    assert!(
        log.contains(r#"variable=AUDITFLOW_BREAKER_OPEN_MS old="(unset)" new="1234""#),
        "{log}"
    );

    // Drain the invalidations of the first 200 events, then check the new limit is in force:
    // every batch after the reload holds at most 7 events.
    let mut messages = pubsub.on_message();
    let mut announced = 0;
    while announced < 200 {
        announced += next_count(&mut messages).await;
    }
    env.produce(100, 0.0, 0.0, 2).await;
    let mut after = 0;
    while after < 100 {
        let count = next_count(&mut messages).await;
        assert!(count <= 7, "a batch of {count} after the limit went to 7");
        after += count;
    }
    assert_eq!(env.count_rows().await, 300);

    // A setting that needs a restart rejects the whole reload; the process goes on.
    std::fs::write(
        &env_file,
        "AUDITFLOW_BATCH_MAX_EVENTS=50\nAUDITFLOW_KAFKA_GROUP_ID=elsewhere\nAUDITFLOW_DATABASE_URL=postgres://u:hunter2@h/db\n",
    )
    .unwrap();
    signal(&sink, "HUP");
    let log = wait_for_log(&log_file, "cannot change without a restart").await;
    assert!(log.contains("AUDITFLOW_KAFKA_GROUP_ID"), "{log}");
    assert!(log.contains("AUDITFLOW_DATABASE_URL"), "{log}");
    assert!(!log.contains("hunter2"), "secrets are never logged");

    // An invalid value rejects the reload too.
    std::fs::write(&env_file, "AUDITFLOW_BATCH_MAX_EVENTS=0\n").unwrap();
    signal(&sink, "HUP");
    wait_for_log(
        &log_file,
        "AUDITFLOW_BATCH_MAX_EVENTS must be greater than zero",
    )
    .await;
    assert!(sink.try_wait().unwrap().is_none(), "still running");

    // The running limit is still 7.
    env.produce(30, 0.0, 0.0, 3).await;
    let mut last = 0;
    while last < 30 {
        let count = next_count(&mut messages).await;
        assert!(
            count <= 7,
            "rejected reloads left the limit at 7, saw {count}"
        );
        last += count;
    }

    signal(&sink, "TERM");
    let status = wait_exit(&mut sink, Duration::from_secs(30)).await;
    assert!(status.success());
}
