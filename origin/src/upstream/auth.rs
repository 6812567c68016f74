//! Registry authentication for upstream pulls: credentials from a Docker `config.json`
//! file, which challenge realms may be sent them, and bearer tokens cached until they expire
//! (uncached tokens overwhelmed Artifactory in Kraken #235). The parsers are
//! `shoal_proto::registry_auth`.

use std::path::Path;
use std::time::{Duration, Instant};

use dashmap::DashMap;

pub use shoal_shared::registry_auth::{
    basic_header, bearer_from_response, normalize_host, parse_challenge, Challenge, Credentials,
    DockerConfig, MAX_TOKEN_JSON,
};

/// Largest `config.json` read.
const MAX_CONFIG: u64 = 1 << 20;
/// Most tokens cached before the cache is dropped.
const TOKEN_CACHE: usize = 4096;

/// Why credentials could not be loaded or a token obtained.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {cause}")]
    Config { path: String, cause: String },
}

/// Reads the `auths` section of a Docker `config.json`.
pub fn load_docker_config(path: &Path) -> Result<DockerConfig, AuthError> {
    let err = |cause: String| AuthError::Config { path: path.display().to_string(), cause };
    let len = std::fs::metadata(path).map_err(|e| err(e.to_string()))?.len();
    if len > MAX_CONFIG {
        return Err(err(format!("larger than {MAX_CONFIG} bytes")));
    }
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    DockerConfig::parse(&text).map_err(err)
}

/// Moved to `shoal_shared` (the agent checks clients' credentials against upstreams too).
pub use shoal_shared::registry_client::realm_allowed;

/// A token and the scheme it is sent with.
#[derive(Clone)]
struct Cached {
    header: String,
    expires: Instant,
}

/// Authorization headers by scope, reused until they expire. Never printed.
#[derive(Default)]
pub struct TokenCache {
    tokens: DashMap<String, Cached>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("tokens", &self.tokens.len()).finish()
    }
}

impl TokenCache {
    /// A cached `Authorization` header for `key`, if still valid.
    pub fn get(&self, key: &str) -> Option<String> {
        let entry = self.tokens.get(key)?;
        (entry.expires > Instant::now()).then(|| entry.header.clone())
    }

    pub fn put(&self, key: String, header: String, lifetime: Duration) {
        if self.tokens.len() >= TOKEN_CACHE {
            self.tokens.clear();
        }
        self.tokens.insert(key, Cached { header, expires: Instant::now() + lifetime });
    }

    pub fn remove(&self, key: &str) {
        self.tokens.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_cached_until_they_expire() {
        let cache = TokenCache::default();
        cache.put("k".into(), "Bearer t".into(), Duration::from_secs(60));
        assert_eq!(cache.get("k").as_deref(), Some("Bearer t"));
        cache.put("old".into(), "Bearer t".into(), Duration::ZERO);
        assert_eq!(cache.get("old"), None);
    }
}
