//! Registry authentication for upstream pulls: the Docker `config.json` file, which
//! challenge realms may be sent credentials, how a token is asked for (basic credentials or
//! an OAuth2 refresh token), and bearer tokens cached until they expire (uncached tokens
//! overwhelmed Artifactory in Kraken #235). The parsers are `shoal_proto::docker_config` and
//! `shoal_proto::registry_auth`; credential helpers are run by [`super::credentials`].

use std::path::Path;
use std::time::{Duration, Instant};

pub use shoal_shared::registry_auth::{
    basic_header, bearer_from_response, normalize_host, parse_challenge, Auth, Challenge, Credentials,
    DockerConfig, MAX_TOKEN_JSON,
};

/// Largest `config.json` read.
const MAX_CONFIG: u64 = 1 << 20;
/// Most tokens cached (least recently used out).
const TOKEN_CACHE: u64 = 4096;
/// The OAuth2 `client_id` sent with a refresh-token grant (Docker sends `docker`).
pub const CLIENT_ID: &str = "shoal";
/// How long a `registrytoken` from the config is reused before it is sent afresh (it is
/// the same token: this only bounds how long a refused one stays cached).
pub const REGISTRY_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Why credentials could not be loaded or a token obtained.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {cause}")]
    Config { path: String, cause: String },
}

/// Reads a Docker `config.json` (`auths`, `credsStore`, `credHelpers`).
pub fn load_docker_config(path: &Path) -> Result<DockerConfig, AuthError> {
    let err = |cause: String| AuthError::Config { path: path.display().to_string(), cause };
    let len = std::fs::metadata(path).map_err(|e| err(e.to_string()))?.len();
    if len > MAX_CONFIG {
        return Err(err(format!("larger than {MAX_CONFIG} bytes")));
    }
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    DockerConfig::parse(&text).map_err(|e| err(e.to_string()))
}

/// The request for a bearer token at a challenge's realm, as Docker makes it: with an
/// identity token, the OAuth2 refresh-token grant POSTed as a form (the distribution token
/// spec's `oauth.md`); otherwise a GET, with basic credentials if there are any (`token.md`).
pub fn token_request(
    http: &reqwest::Client,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    auth: Option<&Auth>,
) -> reqwest::RequestBuilder {
    if let Some(refresh) = auth.and_then(|a| a.identity_token.as_deref()) {
        let mut form =
            vec![("grant_type", "refresh_token"), ("refresh_token", refresh), ("client_id", CLIENT_ID)];
        form.extend(service.map(|s| ("service", s)));
        form.push(("scope", scope));
        return http.post(realm).form(&form);
    }
    let mut req = http.get(realm).query(&[("scope", scope)]);
    if let Some(service) = service {
        req = req.query(&[("service", service)]);
    }
    if let Some(c) = auth.and_then(|a| a.basic.as_ref()) {
        req = req.basic_auth(&c.username, Some(&c.password));
    }
    req
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
pub struct TokenCache {
    tokens: moka::sync::Cache<String, Cached>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self { tokens: moka::sync::Cache::new(TOKEN_CACHE) }
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("tokens", &self.tokens.entry_count()).finish()
    }
}

impl TokenCache {
    /// A cached `Authorization` header for `key`, if still valid.
    pub fn get(&self, key: &str) -> Option<String> {
        let entry = self.tokens.get(key)?;
        (entry.expires > Instant::now()).then_some(entry.header)
    }

    pub fn put(&self, key: String, header: String, lifetime: Duration) {
        self.tokens.insert(key, Cached { header, expires: Instant::now() + lifetime });
    }

    pub fn remove(&self, key: &str) {
        self.tokens.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_as_docker_makes_them() {
        let http = reqwest::Client::new();
        let realm = "https://auth.example/token";
        let scope = "repository:a/b:pull";
        let refresh = Auth {
            identity_token: Some("rt&=1".into()),
            basic: Some(Credentials { username: "u".into(), password: "p".into() }),
            ..Auth::default()
        };
        let req = token_request(&http, realm, Some("svc"), scope, Some(&refresh)).build().expect("request");
        assert_eq!(req.method(), reqwest::Method::POST);
        assert_eq!(req.url().as_str(), realm);
        assert!(req.headers().get(reqwest::header::AUTHORIZATION).is_none());
        let body = std::str::from_utf8(req.body().and_then(|b| b.as_bytes()).expect("body")).expect("utf-8");
        assert_eq!(
            body,
            "grant_type=refresh_token&refresh_token=rt%26%3D1&client_id=shoal&service=svc&scope=repository%3Aa%2Fb%3Apull"
        );

        let basic = Auth { identity_token: None, ..refresh };
        let req = token_request(&http, realm, Some("svc"), scope, Some(&basic)).build().expect("request");
        assert_eq!(req.method(), reqwest::Method::GET);
        assert_eq!(req.url().query(), Some("scope=repository%3Aa%2Fb%3Apull&service=svc"));
        assert!(req.headers().get(reqwest::header::AUTHORIZATION).is_some());
        let anonymous = token_request(&http, realm, None, scope, None).build().expect("request");
        assert!(anonymous.headers().get(reqwest::header::AUTHORIZATION).is_none());
    }

    #[test]
    fn tokens_are_cached_until_they_expire() {
        let cache = TokenCache::default();
        cache.put("k".into(), "Bearer t".into(), Duration::from_secs(60));
        assert_eq!(cache.get("k").as_deref(), Some("Bearer t"));
        cache.put("old".into(), "Bearer t".into(), Duration::ZERO);
        assert_eq!(cache.get("old"), None);
    }
}
