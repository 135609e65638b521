//! `auditflow serve` against the real PostgreSQL and Redis: filters and cursors, the cost
//! guard and partition pruning, token scopes, and every way a cached result is invalidated.

#[path = "common/proxy.rs"]
mod proxy;
mod serve_common;

use std::collections::BTreeSet;
use std::time::Duration;

use auditflow::serve::guard;
use auditflow::serve::query::{self, ParseLimits};
use chrono::{DateTime, Utc};
use serve_common::{day, enc, event, ts, ServeEnv};
use uuid::Uuid;

fn page_path(params: &[(&str, String)]) -> String {
    let query: Vec<String> = params
        .iter()
        .map(|(key, value)| format!("{key}={}", enc(value)))
        .collect();
    format!("/v1/events?{}", query.join("&"))
}

/// Ids and times the API returns for every page of a query, following `next_cursor`.
async fn all_pages(
    serve: &serve_common::RunningServe,
    params: &[(&str, String)],
    between_pages: impl Fn(usize) -> Option<Vec<auditflow::event::AuditEvent>>,
    env: &ServeEnv,
) -> Vec<(Uuid, DateTime<Utc>)> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        let mut with_cursor = params.to_vec();
        if let Some(cursor) = &cursor {
            with_cursor.push(("cursor", cursor.clone()));
        }
        let response = serve.get(&page_path(&with_cursor), None).await;
        assert_eq!(response.status, 200, "{}", response.body);
        let body = response.json();
        for event in body["events"].as_array().unwrap() {
            seen.push((
                Uuid::parse_str(event["event_id"].as_str().unwrap()).unwrap(),
                DateTime::parse_from_rfc3339(event["occurred_at"].as_str().unwrap())
                    .unwrap()
                    .with_timezone(&Utc),
            ));
        }
        if let Some(events) = between_pages(page) {
            env.write_and_announce(&events).await;
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    seen
}

/// What SQL says the query returns, in order.
async fn sql_rows(
    env: &ServeEnv,
    tenant: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    extra: &str,
    desc: bool,
) -> Vec<(Uuid, DateTime<Utc>)> {
    let order = if desc { "DESC" } else { "ASC" };
    sqlx::query_as(&format!(
        "SELECT event_id, occurred_at FROM \"{}\".events \
         WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3 {extra} \
         ORDER BY occurred_at {order}, event_id {order}",
        env.schema
    ))
    .bind(tenant)
    .bind(from)
    .bind(to)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_cursors_return_exactly_the_rows_sql_says_across_partitions_in_both_orders() {
    let env = ServeEnv::new().await;
    // 600 events over three daily partitions, two tenants, many equal timestamps (ties are
    // broken by event_id).
    let events: Vec<_> = (0..600u64)
        .map(|n| {
            let tenant = if n.is_multiple_of(4) {
                "globex"
            } else {
                "acme"
            };
            let at = day(0) + chrono::Duration::minutes((n * 7 % 4320) as i64);
            event(n, tenant, at)
        })
        .collect();
    env.write_and_announce(&events).await;
    let serve = env.serve(&[]).await;
    serve.wait_trusted().await;
    let (from, to) = (
        day(0) + chrono::Duration::hours(5),
        day(2) + chrono::Duration::hours(20),
    );
    for (filters, sql_extra) in [
        (vec![], ""),
        (
            vec![("actor", "user-3".to_owned())],
            "AND actor_id = 'user-3'",
        ),
        (
            vec![("action", "order.*".to_owned())],
            "AND action LIKE 'order.%'",
        ),
        (
            vec![("action", "user.login".to_owned())],
            "AND action = 'user.login'",
        ),
        (
            vec![
                ("outcome", "denied".to_owned()),
                ("resource_id", "o-4".to_owned()),
            ],
            "AND outcome = 'DENIED' AND resource_id = 'o-4'",
        ),
        (
            vec![("trace_id", "trace-5".to_owned())],
            "AND trace_id = 'trace-5'",
        ),
    ] {
        for desc in [true, false] {
            let mut params = vec![
                ("tenant", "acme".to_owned()),
                ("from", ts(from)),
                ("to", ts(to)),
                ("limit", "37".to_owned()),
                ("order", if desc { "desc" } else { "asc" }.to_owned()),
            ];
            params.extend(filters.clone());
            let pages = all_pages(&serve, &params, |_| None, &env).await;
            let expected = sql_rows(&env, "acme", from, to, sql_extra, desc).await;
            assert!(!expected.is_empty(), "{sql_extra}: the test needs rows");
            assert_eq!(pages, expected, "{sql_extra} desc={desc}");
        }
    }
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_while_rows_are_inserted_has_no_duplicate_and_no_gap() {
    let env = ServeEnv::new().await;
    let (from, to) = (day(10), day(13));
    let events: Vec<_> = (0..400u64)
        .map(|n| {
            event(
                n,
                "acme",
                from + chrono::Duration::minutes((n * 11 % 4300) as i64),
            )
        })
        .collect();
    env.write_and_announce(&events).await;
    let serve = env.serve(&[]).await;
    serve.wait_trusted().await;
    for desc in [true, false] {
        let before: BTreeSet<Uuid> = sql_rows(&env, "acme", from, to, "", desc)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let params = vec![
            ("tenant", "acme".to_owned()),
            ("from", ts(from)),
            ("to", ts(to)),
            ("limit", "25".to_owned()),
            ("order", if desc { "desc" } else { "asc" }.to_owned()),
        ];
        // Between pages, insert rows all over the range: behind and ahead of the cursor.
        let pages = all_pages(
            &serve,
            &params,
            |page| {
                Some(
                    (0..5u64)
                        .map(|k| {
                            let n = 10_000 + page as u64 * 10 + k;
                            event(
                                n,
                                "acme",
                                from + chrono::Duration::minutes((n * 37 % 4300) as i64),
                            )
                        })
                        .collect(),
                )
            },
            &env,
        )
        .await;
        let ids: Vec<Uuid> = pages.iter().map(|(id, _)| *id).collect();
        let distinct: BTreeSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "no duplicate");
        assert!(
            before.is_subset(&distinct),
            "no gap: every row present at the start is returned"
        );
        let keys: Vec<(DateTime<Utc>, Uuid)> = pages.iter().map(|(id, at)| (*at, *id)).collect();
        let ordered = keys.windows(2).all(|pair| {
            if desc {
                pair[0] > pair[1]
            } else {
                pair[0] < pair[1]
            }
        });
        assert!(ordered, "strictly ordered by (occurred_at, event_id)");
    }
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_guard_refuses_an_unbounded_scan_and_accepts_the_indexed_query() {
    let env = ServeEnv::new().await;
    // 12,000 rows of one tenant in two partitions, analyzed.
    for chunk in 0..4u64 {
        let events: Vec<_> = (0..3000u64)
            .map(|k| {
                let n = chunk * 3000 + k;
                event(
                    n,
                    "bigco",
                    day(20) + chrono::Duration::seconds((n * 13 % 172_000) as i64),
                )
            })
            .collect();
        env.write(&events).await;
    }
    env.write(&[event(1, "smallco", day(20) + chrono::Duration::hours(1))])
        .await;
    sqlx::query(&format!("ANALYZE \"{}\".events", env.schema))
        .execute(&env.pool)
        .await
        .unwrap();
    let serve = env
        .serve(&[
            ("AUDITFLOW_SERVE_SEQ_SCAN_MAX_ROWS", "1000"),
            ("AUDITFLOW_SERVE_MAX_COST", "2000"),
        ])
        .await;
    let (from, to) = (ts(day(20)), ts(day(22)));

    // The indexed query: newest 50 of a tenant, through events_tenant_time_idx.
    let accepted = serve
        .get(
            &format!("/v1/events?tenant=bigco&from={from}&to={to}&limit=50"),
            None,
        )
        .await;
    assert_eq!(accepted.status, 200, "{}", accepted.body);
    assert_eq!(accepted.json()["events"].as_array().unwrap().len(), 50);

    // Every row of the tenant, sequentially: refused before it runs, with what to do.
    let queries_before = serve.state.gate.num_queries();
    let refused = serve
        .get(
            &format!("/v1/export?tenant=bigco&from={from}&to={to}"),
            None,
        )
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    let body = refused.json();
    assert_eq!(body["error"], "query_too_expensive");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("sequentially") && message.contains("Narrow the time range"),
        "{message}"
    );
    assert!(
        !body["sequential_scans"].as_array().unwrap().is_empty(),
        "{body}"
    );
    assert_eq!(
        serve.state.gate.num_queries(),
        queries_before + 1,
        "planned, not run twice"
    );

    // A filter no index serves over the whole range: the plan's cost is over the limit.
    let unindexed = serve
        .get(
            &format!("/v1/events?tenant=bigco&from={from}&to={to}&session_id=none&limit=10"),
            None,
        )
        .await;
    assert_eq!(unindexed.status, 422, "{}", unindexed.body);
    assert!(
        unindexed.body.contains("sequentially"),
        "{}",
        unindexed.body
    );

    // The small tenant's export is cheap and allowed.
    let small = serve
        .get(
            &format!("/v1/export?tenant=smallco&from={from}&to={to}"),
            None,
        )
        .await;
    assert_eq!(small.status, 200, "{}", small.body);
    assert_eq!(small.body.lines().count(), 1);
    serve.stop().await;

    // With sequential scans allowed, the cost limit alone refuses the unindexed query.
    let serve = env.serve(&[("AUDITFLOW_SERVE_MAX_COST", "300")]).await;
    let by_cost = serve
        .get(
            &format!("/v1/events?tenant=bigco&from={from}&to={to}&session_id=none&limit=10"),
            None,
        )
        .await;
    assert_eq!(by_cost.status, 422, "{}", by_cost.body);
    let body = by_cost.json();
    assert!(body["estimated_cost"].as_f64().unwrap() > 300.0, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("AUDITFLOW_SERVE_MAX_COST"),
        "{body}"
    );
    let indexed = serve
        .get(
            &format!("/v1/events?tenant=bigco&from={from}&to={to}&limit=50"),
            None,
        )
        .await;
    assert_eq!(indexed.status, 200, "{}", indexed.body);
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_names_only_the_partitions_of_the_requested_range() {
    let env = ServeEnv::new().await;
    for offset in 30..35 {
        env.write(&[event(
            offset as u64,
            "acme",
            day(offset) + chrono::Duration::hours(3),
        )])
        .await;
    }
    let config = auditflow::config::Config::from_vars(env.vars(&[])).unwrap();
    let pool = auditflow::serve::connect(&serve_common::database_url(), &env.schema, &config)
        .await
        .unwrap();
    let limits = ParseLimits {
        max_span: chrono::Duration::days(31),
        default_limit: 100,
        max_limit: 1000,
    };
    let params: Vec<(String, String)> = [
        ("tenant", "acme".to_owned()),
        ("from", ts(day(31) + chrono::Duration::hours(2))),
        ("to", ts(day(33))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let page = query::parse_page(&params, &limits).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    // Twice: the second run would use a generic plan without force_custom_plan.
    for _ in 0..7 {
        let plan = guard::explain(&mut conn, &page.sql(&env.schema))
            .await
            .unwrap();
        let partitions: BTreeSet<String> = plan.relations.iter().cloned().collect();
        let expected: BTreeSet<String> = ["events_p20300201", "events_p20300202"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(partitions, expected, "{plan:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cannot_read_another_tenant_and_learns_nothing_about_it() {
    let env = ServeEnv::new().await;
    env.write(&[
        event(1, "acme", day(40) + chrono::Duration::hours(1)),
        event(2, "globex", day(40) + chrono::Duration::hours(2)),
    ])
    .await;
    let tokens = env.tokens_file(&[("acme-token", "acme"), ("root-token", "*")]);
    let serve = env
        .serve(&[
            ("AUDITFLOW_SERVE_TOKENS_FILE", tokens.as_str()),
            ("AUDITFLOW_SERVE_ADDR", "127.0.0.1:0"),
        ])
        .await;
    let range = format!("from={}&to={}", ts(day(40)), ts(day(41)));
    let own = serve
        .get(
            &format!("/v1/events?tenant=acme&{range}"),
            Some("acme-token"),
        )
        .await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.json()["events"].as_array().unwrap().len(), 1);

    let queries_before = serve.state.gate.num_queries();
    let mut answers = Vec::new();
    for tenant in ["globex", "no-such-tenant"] {
        for path in [
            format!("/v1/events?tenant={tenant}&{range}"),
            format!("/v1/export?tenant={tenant}&{range}"),
            format!(
                "/v1/events/{}?tenant={tenant}&at={}",
                Uuid::new_v4(),
                ts(day(40))
            ),
        ] {
            let response = serve.get(&path, Some("acme-token")).await;
            assert_eq!(response.status, 403, "{path}: {}", response.body);
            answers.push(response.body);
        }
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "the same answer whether the tenant exists or not: {answers:?}"
    );
    assert!(!answers[0].contains("globex"));
    assert_eq!(
        serve.state.gate.num_queries(),
        queries_before,
        "refused before touching the database"
    );
    let verify = serve
        .get(&format!("/v1/verify?{range}"), Some("acme-token"))
        .await;
    assert_eq!(verify.status, 403, "verify spans every tenant");

    for token in [None, Some("wrong-token")] {
        let response = serve
            .get(&format!("/v1/events?tenant=acme&{range}"), token)
            .await;
        assert_eq!(response.status, 401, "{token:?}");
    }
    let root = serve
        .get(
            &format!("/v1/events?tenant=globex&{range}"),
            Some("root-token"),
        )
        .await;
    assert_eq!(root.status, 200);

    // A reload (what SIGHUP does) widens the scope; a broken file keeps the tokens in force.
    env.tokens_file(&[("acme-token", "acme,globex")]);
    serve.state.tokens.reload().unwrap();
    let widened = serve
        .get(
            &format!("/v1/events?tenant=globex&{range}"),
            Some("acme-token"),
        )
        .await;
    assert_eq!(widened.status, 200);
    std::fs::write(env.tokens_dir.path().join("tokens"), "not a token line\n").unwrap();
    let err = serve.state.tokens.reload().unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    let still = serve
        .get(
            &format!("/v1/events?tenant=globex&{range}"),
            Some("acme-token"),
        )
        .await;
    assert_eq!(still.status, 200, "the tokens in force stay");
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_non_loopback_address_without_tokens() {
    let env = ServeEnv::new().await;
    let config =
        auditflow::config::Config::from_vars(env.vars(&[("AUDITFLOW_SERVE_ADDR", "0.0.0.0:0")]))
            .unwrap();
    let err = match auditflow::serve::Serve::build(&config).await {
        Ok(_) => panic!("bound a public address without tokens"),
        Err(err) => err,
    };
    assert!(err
        .downcast_ref::<auditflow::config::ConfigError>()
        .is_some());
    assert!(
        err.to_string().contains("AUDITFLOW_SERVE_TOKENS_FILE"),
        "{err}"
    );
}

/// Waits until the serve instance has logged `count` more invalidations than `before`.
async fn wait_for_log(serve: &serve_common::RunningServe, before: u64, count: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while serve.state.cache.log_generation() < before + count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "invalidation never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_result_is_invalidated_by_a_batch_that_touches_it_and_kept_by_one_that_does_not() {
    let env = ServeEnv::new().await;
    env.write_and_announce(&[event(1, "acme", day(50) + chrono::Duration::hours(1))])
        .await;
    let serve = env.serve(&[]).await;
    serve.wait_trusted().await;
    let path = format!(
        "/v1/events?tenant=acme&from={}&to={}",
        ts(day(50)),
        ts(day(51))
    );
    let first = serve.get(&path, None).await;
    assert_eq!(first.header("x-auditflow-cache").as_deref(), Some("miss"));
    let second = serve.get(&path, None).await;
    assert_eq!(second.header("x-auditflow-cache").as_deref(), Some("l1"));

    // Same tenant, another day; another tenant, the same day: kept.
    for unrelated in [
        event(2, "acme", day(52) + chrono::Duration::hours(1)),
        event(3, "globex", day(50) + chrono::Duration::hours(2)),
    ] {
        let generation = serve.state.cache.log_generation();
        env.write_and_announce(&[unrelated]).await;
        wait_for_log(&serve, generation, 1).await;
        let kept = serve.get(&path, None).await;
        assert_eq!(kept.header("x-auditflow-cache").as_deref(), Some("l1"));
        assert_eq!(kept.json()["events"].as_array().unwrap().len(), 1);
    }

    // A batch inside the cached range: the next read goes to the database and sees it.
    let generation = serve.state.cache.log_generation();
    env.write_and_announce(&[event(4, "acme", day(50) + chrono::Duration::hours(5))])
        .await;
    wait_for_log(&serve, generation, 1).await;
    let fresh = serve.get(&path, None).await;
    assert_eq!(fresh.header("x-auditflow-cache").as_deref(), Some("miss"));
    assert_eq!(fresh.json()["events"].as_array().unwrap().len(), 2);
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_message_is_caught_by_the_sequence_gap() {
    let env = ServeEnv::new().await;
    env.write_and_announce(&[event(1, "acme", day(60) + chrono::Duration::hours(1))])
        .await;
    // Reconciliation every minute: only the gap can catch the loss in this test's time.
    let serve = env.serve(&[]).await;
    serve.wait_trusted().await;
    let path = format!(
        "/v1/events?tenant=acme&from={}&to={}",
        ts(day(60)),
        ts(day(61))
    );
    serve.get(&path, None).await;
    assert_eq!(
        serve
            .get(&path, None)
            .await
            .header("x-auditflow-cache")
            .as_deref(),
        Some("l1")
    );
    let flushes = serve.state.cache.num_flushes();
    // Stored, its message lost.
    env.write(&[event(2, "acme", day(60) + chrono::Duration::hours(2))])
        .await;
    let still = serve.get(&path, None).await;
    assert_eq!(
        still.json()["events"].as_array().unwrap().len(),
        1,
        "stale until detected"
    );
    // The next message touches something else entirely, but its batch_seq shows the gap.
    let generation = serve.state.cache.log_generation();
    env.write_and_announce(&[event(3, "globex", day(90))]).await;
    wait_for_log(&serve, generation, 1).await;
    assert_eq!(
        serve.state.cache.num_flushes(),
        flushes + 1,
        "the gap flushed"
    );
    let fresh = serve.get(&path, None).await;
    assert_eq!(fresh.header("x-auditflow-cache").as_deref(), Some("miss"));
    assert_eq!(fresh.json()["events"].as_array().unwrap().len(), 2);
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_lost_with_no_later_message_is_caught_by_reconciliation() {
    let env = ServeEnv::new().await;
    env.write_and_announce(&[event(1, "acme", day(70) + chrono::Duration::hours(1))])
        .await;
    let serve = env
        .serve(&[("AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS", "500")])
        .await;
    serve.wait_trusted().await;
    let path = format!(
        "/v1/events?tenant=acme&from={}&to={}",
        ts(day(70)),
        ts(day(71))
    );
    serve.get(&path, None).await;
    assert_eq!(
        serve
            .get(&path, None)
            .await
            .header("x-auditflow-cache")
            .as_deref(),
        Some("l1")
    );
    // The publisher stores a batch and dies before its message goes out: nothing follows.
    let lost_at = std::time::Instant::now();
    env.write(&[event(2, "acme", day(70) + chrono::Duration::hours(2))])
        .await;
    let mut seen_after = None;
    while lost_at.elapsed() < Duration::from_secs(10) {
        let response = serve.get(&path, None).await;
        if response.json()["events"].as_array().unwrap().len() == 2 {
            seen_after = Some(lost_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen_after = seen_after.expect("reconciliation caught the lost message");
    // Within the interval, plus the reconciliation query and this loop's polling.
    assert!(seen_after < Duration::from_secs(3), "{seen_after:?}");
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_found_by_id_with_its_time_or_a_window_and_verify_checks_its_link() {
    let env = ServeEnv::new().await;
    let stored = event(
        1,
        "acme",
        day(80) + chrono::Duration::microseconds(123_456_789),
    );
    env.write(std::slice::from_ref(&stored)).await;
    let serve = env.serve(&[]).await;
    let by_time = serve
        .get(
            &format!(
                "/v1/events/{}?tenant=acme&at={}",
                stored.event_id,
                enc(&ts(stored.occurred_at))
            ),
            None,
        )
        .await;
    assert_eq!(by_time.status, 200, "{}", by_time.body);
    let body = by_time.json();
    assert_eq!(body["event_id"], stored.event_id.to_string());
    assert_eq!(body["occurred_at"], ts(stored.occurred_at));
    assert_eq!(body["details"]["n"], 1, "details as JSON");
    assert_eq!(body["kafka_topic"], "audit-events");
    assert_eq!(body["kafka_partition"], 0);
    let by_window = serve
        .get(
            &format!(
                "/v1/events/{}?tenant=acme&from={}&to={}",
                stored.event_id,
                ts(day(80)),
                ts(day(81))
            ),
            None,
        )
        .await;
    assert_eq!(by_window.status, 200);
    let elsewhere = serve
        .get(
            &format!(
                "/v1/events/{}?tenant=acme&from={}&to={}",
                stored.event_id,
                ts(day(81)),
                ts(day(82))
            ),
            None,
        )
        .await;
    assert_eq!(elsewhere.status, 404);
    // The range of /v1/verify is the links' commit time.
    let now = Utc::now();
    let committed = format!(
        "/v1/verify?from={}&to={}",
        enc(&ts(now - chrono::Duration::hours(1))),
        enc(&ts(now + chrono::Duration::hours(1)))
    );
    let verify = serve.get(&committed, None).await;
    assert_eq!(verify.status, 200, "{}", verify.body);
    let report = verify.json();
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["links"], 1, "{report}");
    assert_eq!(report["rows"], 1, "{report}");
    // A superuser edits the stored row, past the append-only triggers: the range's
    // verification names the link.
    sqlx::raw_sql(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         UPDATE {}.events SET action = 'order.forged' WHERE event_id = '{}'; COMMIT",
        env.schema, stored.event_id
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let verify = serve.get(&committed, None).await;
    assert_eq!(verify.status, 200, "{}", verify.body);
    let report = verify.json();
    assert_eq!(report["intact"], false, "{report}");
    assert_eq!(report["broken"]["batch_seq"], 1, "{report}");
    // A range with no link committed recomputes nothing, and says so.
    let before = serve
        .get(
            &format!("/v1/verify?from={}&to={}", ts(day(80)), ts(day(81))),
            None,
        )
        .await;
    assert_eq!(before.status, 200, "{}", before.body);
    assert_eq!(before.json()["links_recomputed"], 0);
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_concurrent_identical_requests_run_one_query() {
    let env = ServeEnv::new().await;
    env.write(&[event(1, "acme", day(85) + chrono::Duration::hours(1))])
        .await;
    // Nothing listens on port 1: no L2, no subscription, so every request bypasses the cache
    // and only coalescing stands between the clients and the database.
    let serve = env
        .serve(&[
            ("AUDITFLOW_REDIS_URL", "redis://127.0.0.1:1"),
            ("AUDITFLOW_SERVE_MAX_CONCURRENT_QUERIES", "2"),
        ])
        .await;
    let path = format!(
        "/v1/events?tenant=acme&from={}&to={}",
        ts(day(85)),
        ts(day(86))
    );
    let before = serve.state.gate.num_queries();
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let addr = serve.addr;
            let path = path.clone();
            tokio::spawn(async move { serve_common::get(addr, &path, None).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        let response = request.await.unwrap();
        assert_eq!(
            response.header("x-auditflow-cache").as_deref(),
            Some("bypass")
        );
        statuses.push(response.status);
    }
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    let queries = serve.state.gate.num_queries() - before;
    assert!(
        queries <= 10,
        "200 identical requests ran {queries} queries"
    );
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_redis_connection_bypasses_the_cache_until_resubscribed_then_flushes() {
    let env = ServeEnv::new().await;
    env.write_and_announce(&[event(1, "acme", day(95) + chrono::Duration::hours(1))])
        .await;
    let upstream = serve_common::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = proxy::TcpProxy::start(&upstream).await;
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port());
    let serve = env
        .serve(&[
            ("AUDITFLOW_REDIS_URL", via_proxy.as_str()),
            ("AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS", "60000"),
        ])
        .await;
    serve.wait_trusted().await;
    let path = format!(
        "/v1/events?tenant=acme&from={}&to={}",
        ts(day(95)),
        ts(day(96))
    );
    serve.get(&path, None).await;
    assert_eq!(
        serve
            .get(&path, None)
            .await
            .header("x-auditflow-cache")
            .as_deref(),
        Some("l1")
    );
    let flushes = serve.state.cache.num_flushes();

    proxy.cut().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while serve.state.cache.trusted() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost subscription went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Published while this instance cannot hear it.
    env.write_and_announce(&[event(2, "acme", day(95) + chrono::Duration::hours(2))])
        .await;
    let meanwhile = serve.get(&path, None).await;
    assert_eq!(
        meanwhile.header("x-auditflow-cache").as_deref(),
        Some("bypass")
    );
    assert_eq!(meanwhile.json()["events"].as_array().unwrap().len(), 2);

    proxy.restore().await;
    serve.wait_trusted().await;
    assert!(
        serve.state.cache.num_flushes() > flushes,
        "resubscribing flushed"
    );
    let after = serve.get(&path, None).await;
    assert_eq!(after.header("x-auditflow-cache").as_deref(), Some("miss"));
    assert_eq!(after.json()["events"].as_array().unwrap().len(), 2);
    serve.stop().await;
    proxy.cut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_subscription_stays_trusted_across_its_pings() {
    let env = ServeEnv::new().await;
    let serve = env
        .serve(&[("AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS", "1000")])
        .await;
    serve.wait_trusted().await;
    let flushes = serve.state.cache.num_flushes();
    // Several PING rounds (every 2 s) and reconciliations.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            serve.state.cache.trusted(),
            "the cache stopped being trusted"
        );
    }
    assert_eq!(
        serve.state.cache.num_flushes(),
        flushes,
        "no reconnect happened"
    );
    serve.stop().await;
}
