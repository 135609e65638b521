//! The hash chain against PostgreSQL: what the sink digests from the text a producer sent must
//! equal what `verify` digests from what the database gives back.

mod common;

use auditflow::chain::canonical_json;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A random JSON text in a random but valid formatting: numbers in every notation, strings with
/// every kind of escape, repeated keys, nesting.
fn random_json(rng: &mut StdRng, depth: u32) -> String {
    let space = |rng: &mut StdRng| [" ", "", "\n", "\t "][rng.random_range(0..4)];
    match rng.random_range(0..if depth > 3 { 5 } else { 7 }) {
        0 => "null".into(),
        1 => ["true", "false"][rng.random_range(0..2)].into(),
        2 => {
            let forms = [
                format!("{}", rng.random_range(-1_000_000i64..1_000_000)),
                format!("{}e{}", rng.random_range(1..99), rng.random_range(0..25)),
                format!(
                    "{}.{:03}",
                    rng.random_range(-500..500),
                    rng.random_range(0..1000)
                ),
                format!("{}E-{}", rng.random_range(1..999), rng.random_range(1..9)),
                "-0".into(),
                "0.0".into(),
                format!("{}", rng.random::<u64>()),
                "123456789012345678901234567890".into(),
                "1.000000000000000000001".into(),
            ];
            forms[rng.random_range(0..forms.len())].clone()
        }
        3 | 4 => {
            let pieces = [
                "a",
                "Z",
                " ",
                "é",
                "中",
                "🦀",
                "\\n",
                "\\t",
                "\\\"",
                "\\\\",
                "\\/",
                "\\u00e9",
                "\\u4e2d",
                "\\ud83e\\udd80",
                "\\b",
                "\\f",
                "\\u0001",
            ];
            let text: String = (0..rng.random_range(0..8))
                .map(|_| pieces[rng.random_range(0..pieces.len())])
                .collect();
            format!("\"{text}\"")
        }
        5 => {
            let items: Vec<String> = (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect();
            format!(
                "[{}{}]",
                space(rng),
                items.join(&format!(",{}", space(rng)))
            )
        }
        _ => {
            let keys = ["a", "b", "ab", "B", "é", "key", "k2", ""];
            let entries: Vec<String> = (0..rng.random_range(0..5))
                .map(|_| {
                    format!(
                        "\"{}\"{}:{}{}",
                        keys[rng.random_range(0..keys.len())],
                        space(rng),
                        space(rng),
                        random_json(rng, depth + 1)
                    )
                })
                .collect();
            format!("{{{}}}", entries.join(","))
        }
    }
}

#[tokio::test]
async fn details_canonicalise_the_same_from_the_producers_text_and_from_jsonb() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&common::database_url())
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(0x000d_e7a1);
    let mut checked = 0;
    for _ in 0..3_000 {
        let text = random_json(&mut rng, 0);
        let stored: Result<String, _> = sqlx::query_scalar("SELECT $1::jsonb::text")
            .bind(&text)
            .fetch_one(&pool)
            .await;
        let Ok(stored) = stored else {
            // PostgreSQL refused it (out of range numbers and the like): so does the decoder's
            // validation, which parses details with the same rules before anything is stored.
            continue;
        };
        let ours = canonical_json(&text).unwrap_or_else(|err| panic!("{text}: {err}"));
        let theirs = canonical_json(&stored).unwrap_or_else(|err| panic!("{stored}: {err}"));
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "sent {text}\nstored {stored}"
        );
        checked += 1;
    }
    assert!(checked > 2_500, "only {checked} documents were accepted");
}
