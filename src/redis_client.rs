//! Redis clients, shared by the invalidation publisher and the read side: `redis://` plain, or
//! `rediss://` over TLS verified against the system's roots or the operator's CA
//! (`AUDITFLOW_REDIS_CA_FILE`). redis-rs takes a custom CA only over rustls, so Redis is the one
//! dependency whose TLS is not OpenSSL's.

use std::path::Path;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    /// The URL does not parse (the reason never repeats the URL, which may hold a password).
    #[error("invalid redis url: {0}")]
    Url(redis::RedisError),
    /// The CA file cannot be read.
    #[error("cannot read the redis CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A CA file was given for a plain `redis://` URL.
    #[error("a CA file is set but the redis url is not rediss://")]
    CaWithoutTls,
}

/// Builds a client for `url` (no network access); `ca_file` is the PEM of the CA that signed the
/// server's certificate, for `rediss://` URLs.
pub fn open(url: &str, ca_file: Option<&Path>) -> Result<redis::Client, RedisClientError> {
    let Some(path) = ca_file else {
        return redis::Client::open(url).map_err(RedisClientError::Url);
    };
    if !url.starts_with("rediss://") {
        return Err(RedisClientError::CaWithoutTls);
    }
    let root_cert = std::fs::read(path).map_err(|source| RedisClientError::CaFile {
        path: path.display().to_string(),
        source,
    })?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        },
    )
    .map_err(RedisClientError::Url)
}
