//! Who may read what: bearer tokens scoped to tenants, and a rate limit per token.
//!
//! `AUDITFLOW_SERVE_TOKENS_FILE` holds one line per token: the lowercase hex SHA-256 of the
//! token, a space, and a comma-separated list of tenants (`*` for all). Blank lines and lines
//! starting with `#` are ignored. Only digests are stored, so the file leaks no token; a
//! presented token is hashed and looked up. The file is read at start and on SIGHUP; a file
//! that does not parse is rejected whole (naming the line, never its content) and the tokens in
//! force stay.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, HeaderMap};
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// What a token may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant (`*`).
    All,
    /// These tenants.
    Tenants(BTreeSet<String>),
}

impl Scope {
    /// Tells whether `tenant` may be read.
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenants(tenants) => tenants.contains(tenant),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Rate-limit key: a prefix of the token's digest, or `anonymous` without a tokens file.
    pub id: String,
    /// What it may read.
    pub scope: Scope,
}

/// Parses a tokens file; the error names the line.
pub fn parse_tokens(text: &str) -> Result<HashMap<[u8; 32], Scope>, String> {
    let mut tokens = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((digest, tenants)) = line.split_once(char::is_whitespace) else {
            return Err(format!(
                "line {number}: expected \"<sha256 hex> <tenant>[,<tenant>...]\""
            ));
        };
        let digest = decode_digest(digest).ok_or_else(|| {
            format!("line {number}: the first field must be 64 lowercase hex digits (the SHA-256 of the token)")
        })?;
        let tenants: BTreeSet<String> = tenants
            .trim()
            .split(',')
            .map(|tenant| tenant.trim().to_owned())
            .collect();
        if tenants.iter().any(String::is_empty) {
            return Err(format!("line {number}: an empty tenant in the list"));
        }
        let scope = if tenants.contains("*") {
            if tenants.len() > 1 {
                return Err(format!("line {number}: * cannot be combined with tenants"));
            }
            Scope::All
        } else {
            Scope::Tenants(tenants)
        };
        if tokens.insert(digest, scope).is_some() {
            return Err(format!("line {number}: the same token is listed twice"));
        }
    }
    Ok(tokens)
}

fn decode_digest(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(digest)
}

/// The tokens in force.
#[derive(Debug)]
pub struct Tokens {
    file: Option<PathBuf>,
    tokens: RwLock<Arc<HashMap<[u8; 32], Scope>>>,
}

/// Reading a tokens file failed.
#[derive(Debug, thiserror::Error)]
#[error("AUDITFLOW_SERVE_TOKENS_FILE {path}: {reason}")]
pub struct TokensError {
    path: String,
    reason: String,
}

fn read(path: &Path) -> Result<HashMap<[u8; 32], Scope>, TokensError> {
    let error = |reason: String| TokensError {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|err| error(err.to_string()))?;
    parse_tokens(&text).map_err(error)
}

impl Tokens {
    /// No tokens file: every request is allowed every tenant (serve binds loopback only).
    pub fn open() -> Self {
        Tokens {
            file: None,
            tokens: RwLock::new(Arc::new(HashMap::new())),
        }
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        Ok(Tokens {
            tokens: RwLock::new(Arc::new(read(path)?)),
            file: Some(path.to_owned()),
        })
    }

    /// Reads the file again; on error the tokens in force stay. Returns how many are now in
    /// force.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let Some(path) = &self.file else { return Ok(0) };
        let fresh = read(path)?;
        let count = fresh.len();
        *self.tokens.write() = Arc::new(fresh);
        Ok(count)
    }

    /// True when requests need a token.
    pub fn required(&self) -> bool {
        self.file.is_some()
    }

    /// Authenticates a request from its `Authorization` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        if self.file.is_none() {
            return Ok(Principal {
                id: "anonymous".into(),
                scope: Scope::All,
            });
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let tokens = Arc::clone(&self.tokens.read());
        let scope = tokens
            .get(&digest)
            .cloned()
            .ok_or_else(ApiError::unauthorized)?;
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Principal { id, scope })
    }
}

/// Reloads `tokens` on every SIGHUP until `shutdown`.
pub fn reload_on_sighup(
    tokens: Arc<Tokens>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot listen for SIGHUP; tokens are not reloaded");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = hangups.recv() => if received.is_none() { return },
            }
            match tokens.reload() {
                Ok(num_tokens) => tracing::info!(num_tokens, "serve tokens reloaded"),
                Err(err) => {
                    tracing::error!(error = %err, "serve tokens not reloaded; keeping the tokens in force")
                }
            }
        }
    })
}

/// A token bucket per principal.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` requests per second, `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Self {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `id`'s bucket, or says how many seconds until one is there.
    pub fn check(&self, id: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() > 10_000 {
            // Forget buckets that are full again: they are indistinguishable from new ones.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (level, at)| {
                *level + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (level, at) = buckets.entry(id.to_owned()).or_insert((self.burst, now));
        *level = (*level + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *level) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_hex(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn a_tokens_file_maps_digests_to_scopes_and_rejects_bad_lines_by_number() {
        let text = format!(
            "# ops\n{} *\n\n{} acme, globex\n",
            digest_hex("root-token"),
            digest_hex("acme-token")
        );
        let tokens = parse_tokens(&text).unwrap();
        let acme: [u8; 32] = Sha256::digest(b"acme-token").into();
        assert_eq!(
            tokens[&acme],
            Scope::Tenants(["acme".to_owned(), "globex".to_owned()].into())
        );
        for (bad, needle) in [
            ("nothex acme", "line 1"),
            (&format!("{} ", digest_hex("x")), "line 1"),
            (&format!("{} a,,b", digest_hex("x")), "empty tenant"),
            (&format!("{} *,a", digest_hex("x")), "*"),
            (
                &format!("{0} a\n{0} b", digest_hex("x")),
                "line 2: the same token",
            ),
        ] {
            let err = parse_tokens(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
            assert!(
                !err.contains(&digest_hex("x")),
                "never echoes the line: {err}"
            );
        }
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_paces() {
        let limiter = RateLimiter::new(1.0, 3);
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        assert_eq!(limiter.check("a"), Err(1));
        assert!(limiter.check("b").is_ok(), "per principal");
    }
}
